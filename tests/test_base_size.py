"""A base carries the input size and normalisation it was trained with, and image tasks
use them: a `swr pretrain` checkpoint at 32 px prepares an image folder at 32 px, with
the source's mean and std and an augmentation that suits small images."""

import numpy as np
from PIL import Image

from swr.pretrain import pretrain
from swr.source import BaseSpec, load_base, load_task


def test_a_pretrained_checkpoint_prepares_an_image_folder_at_its_own_size(tmp_path):
    ckpt = tmp_path / "ckpt"
    metrics = pretrain("glyphs:source?images=3,2,2", "timm:resnet10t", ckpt, epochs=1,
                       device="cpu", progress=False)
    cfg = metrics["data_config"]
    assert cfg["input_size"] == [3, 32, 32] and len(cfg["mean"]) == len(cfg["std"]) == 3
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("zero", "one"):
            (tmp_path / "digits" / split / c).mkdir(parents=True)
            for i in range(12):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
                    tmp_path / "digits" / split / c / f"{i}.png")
    _, desc = load_base(BaseSpec(checkpoint=str(ckpt)))
    task = load_task(f"imagefolder:{tmp_path / 'digits'}", desc)
    assert task.input_shape == (3, 32, 32)
    assert task.info["augment"] == "light"
    assert task.info["preprocess"]["mean"] == cfg["mean"]
    x, _ = task.train[0]
    assert tuple(x.shape) == (3, 32, 32)
