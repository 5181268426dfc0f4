"""Small in-memory tasks and checkpoints for tests that run the pipeline."""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import swr.tasks
from swr.io import write_json
from swr.tasks.backbones import create_backbone, save_checkpoint
from swr.tasks.base import Task, tensor_split


def tiny_audio_task(n_classes: int = 4, per_class: int = 24, seed: int = 0, name="tiny") -> Task:
    """Log-mel-shaped inputs whose class is a band of raised energy: learnable, not trivial.

    ``shift_test`` is the same problem under stronger noise."""
    g = torch.Generator().manual_seed(seed)

    def split(n, noise=1.0):
        y = torch.arange(n_classes).repeat_interleave(n)
        x = noise * torch.randn(len(y), 1, 40, 101, generator=g)
        for i, c in enumerate(y.tolist()):
            band = slice(4 + 8 * c, 10 + 8 * c)
            x[i, 0, band] += 1.0 + 0.5 * torch.rand((), generator=g)
        return tensor_split(x, y)

    return Task(id=f"{name}", modality="audio", class_names=[f"c{i}" for i in range(n_classes)],
                train=split(per_class), val=split(per_class // 3), test=split(per_class // 3),
                input_shape=(1, 40, 101), shift_test=split(per_class // 3, noise=1.6))


def tiny_checkpoint(folder: Path, backbone: str = "bcresnet-1", n_classes: int = 6) -> Path:
    torch.manual_seed(0)
    model = create_backbone(backbone, num_classes=n_classes)
    save_checkpoint(model, folder / "model.safetensors", backbone=backbone)
    write_json(folder / "metrics.json", {"backbone": backbone, "task": "tiny-source", "test_acc": 0.5})
    return folder


def write_clip(path: Path, i: int, sr: int = 16000, channels: int = 1,
               seconds: float = 1.0) -> Path:
    """A 16-bit WAV tone (pitch set by ``i``; channel c at (c + 1) / channels of the
    level) at any rate, channel count and length, for the loaders to resample, mix
    down, pad and crop."""
    t = np.arange(int(sr * seconds)) / sr
    tone = 0.3 * np.sin(2 * np.pi * (220 + 40 * i) * t)
    data = np.stack([tone * (c + 1) / channels for c in range(channels)], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data.astype(np.float32), sr, subtype="PCM_16")
    return path


def in_memory_tasks(tasks: dict[str, Task]):
    """``(get_task, fixture)`` for a test module whose ``--task NAME`` may name ``tasks``.

    ``get_task`` serves the tasks of ``tasks`` by name (the dict is read at each call,
    so a module may add to it) and passes every other name to the real loaders. The
    fixture (module-scoped, autouse once bound to a module name) installs it, runs on
    one thread (2 shared cores) and gives the module the session's cache.
    """
    real_get_task = swr.tasks.get_task

    def get_task(spec: str, **kwargs):
        return tasks[spec] if spec in tasks else real_get_task(spec, **kwargs)

    @pytest.fixture(scope="module", autouse=True)
    def world(tmp_path_factory):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(swr.tasks, "get_task", get_task)
            mp.setenv("SWR_CACHE", str(tmp_path_factory.getbasetemp() / "swr-cache"))
            yield
        torch.set_num_threads(threads)

    return get_task, world


def digits_imagefolder(root: Path, train_per_class: int = 30, test_per_class: int = 10,
                       size: int = 32) -> Path:
    """scikit-learn's bundled handwritten digits (8x8 grey, 1,797 images; no download) as
    an image folder ``root/{train,test}/<digit>/*.png``: each class's first
    ``train_per_class`` images for training, the next ``test_per_class`` for test,
    upscaled to ``size`` px and saved as RGB."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    taken: dict[int, int] = {}
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        n = taken.get(int(label), 0)
        if n >= train_per_class + test_per_class:
            continue
        taken[int(label)] = n + 1
        folder = root / ("train" if n < train_per_class else "test") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        grey = Image.fromarray((image * (255 / 16)).astype(np.uint8))  # 0..16 -> 0..255
        grey.resize((size, size), Image.Resampling.BILINEAR).convert("RGB").save(
            folder / f"{i:04d}.png")
    return root
