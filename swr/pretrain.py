"""Pretraining the source model, and loading the checkpoints it writes.

A checkpoint is a folder: ``model.safetensors`` (the state dict, with the backbone
id and class names in its metadata) and ``metrics.json`` (``test_acc``, ``val_acc``,
``epochs``, ``seconds``, ``task``, ``backbone``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from . import tasks
from .errors import SwrError
from .io import cache_dir, check_output, check_run_folder, read_json, run_folder, write_json
from .runlog import TRAINING_LOGS
from .tasks.backbones import (backbone_data_config, check_backbone_name, create_backbone,
                             save_checkpoint)
from .tasks.base import DataOverride
from .train import TrainConfig, evaluate, resolve_device, train

#: The embedded defaults: source task, backbone, epochs, learning rate; the quick
#: variants keep ``swr demo --quick`` within minutes on 2 CPU cores from a cold cache.
DEFAULT_SOURCES = {
    "kws": ("kws-synth:en", "bcresnet-2", 40, 1e-2),
    "glyphs": ("glyphs:source", "timm:resnet10t", 15, 3e-3),
}
QUICK_SOURCES = {
    "kws": ("kws-synth:en", "bcresnet-1.5", 20, 3e-2),
    "glyphs": ("glyphs:source", "timm:resnet10t", 4, 3e-3),
}

#: Every file of a checkpoint folder: the folder ``pretrain`` replaces may hold only these.
OUTPUTS = {"model.safetensors", "history.json", "metrics.json",
           *TRAINING_LOGS}


def pretrain(task_spec: str, backbone: str, out: str | Path, epochs: int = 40,
             lr: float = 1e-2, batch_size: int = 64, seed: int = 0, device: str = "auto",
             weights: Optional[str] = None, progress: bool = True,
             on_bad_file: str = "fail", overwrite: bool = False,
             data_override: Optional[DataOverride] = None) -> dict:
    """Train ``backbone`` on ``task_spec``, keep the best on validation, write ``out``.

    Started from ``weights`` (pre-trained elsewhere), image tasks are prepared with the
    backbone's own timm data config, which ``metrics.json`` records for the commands
    that use this checkpoint; ``data_override`` (``--image-size``, ``--mean``, ``--std``)
    replaces its values, and is recorded too. ``out`` is locked while the run goes on; one that holds
    an earlier checkpoint is refused unless ``overwrite``. The run, its live logs
    included, is staged and replaces ``out`` only once complete.
    """
    check_backbone_name(backbone)  # before the task is made (a suite renders on first use)
    check_output(out, {"--weights": weights, "--task": tasks.task_data_path(task_spec)})
    check_run_folder(out, OUTPUTS)
    with run_folder(out, "pretrain", OUTPUTS, overwrite=overwrite) as stage:
        return _pretrain(task_spec, backbone, stage, epochs, lr, batch_size, seed, device,
                         weights, progress, on_bad_file, data_override)


def _pretrain(task_spec, backbone, stage: Path, epochs, lr, batch_size, seed, device, weights,
              progress, on_bad_file, data_override) -> dict:
    data_config = backbone_data_config(backbone) if weights is not None else None
    task = tasks.get_task(task_spec, on_bad_file=on_bad_file, data_config=data_config,
                          override=data_override)
    if data_config is not None and data_override:
        data_config = data_override.apply(data_config)
    torch.manual_seed(seed)
    model = create_backbone(backbone, num_classes=task.num_classes, weights=weights)
    params = [p.requires_grad_(True) for p in model.parameters()]  # everything trains
    cfg = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, device=device,
                      weight_decay=1e-3, warmup_epochs=min(2.0, epochs / 5), label_smoothing=0.05,
                      progress=progress, desc=f"pretrain {backbone} on {task_spec}",
                      log_dir=str(stage))
    start = time.perf_counter()
    result = train(model, task, params, cfg)
    dev = resolve_device(device)
    metrics = {
        "task": task_spec, "backbone": backbone, "classes": task.class_names,
        "val_acc": result.val_acc, "test_acc": evaluate(model, task.test, dev),
        "shift_acc": evaluate(model, task.shift_test, dev) if task.shift_test is not None else None,
        "epochs": epochs, "best_epoch": result.best_epoch, "seed": seed, "lr": lr,
        "seconds": time.perf_counter() - start, "device": str(dev),
        "params": sum(p.numel() for p in model.parameters()),
        "skipped_files": list(task.info.get("skipped", [])),
        # how its inputs were prepared: the tasks that use this checkpoint prepare theirs
        # the same way (size, mean, std), not at a default 224 px
        "data_config": data_config if data_config is not None else trained_data_config(task),
        "data_override": data_override.as_dict() if data_override else None,
    }
    save_checkpoint(model.cpu(), stage / "model.safetensors", backbone=backbone,
                    task=task_spec, classes=task.class_names)
    write_json(stage / "history.json", result.history)
    write_json(stage / "metrics.json", metrics)
    return metrics


def trained_data_config(task) -> Optional[dict]:
    """The timm-style data config of the inputs an image ``task`` was prepared as (None
    for audio): what a model trained on it expects of any other image task."""
    from .tasks.base import task_preprocess

    if task.modality != "image":
        return None
    pre = task_preprocess(task)
    size = int(pre.get("image_size") or task.input_shape[-1])
    out = {"input_size": [3, size, size], "interpolation": pre.get("interpolation") or "bilinear",
           "crop_pct": float(pre.get("crop_pct") or 1.0)}
    for key in ("mean", "std"):
        if pre.get(key):
            out[key] = [float(v) for v in pre[key]]
    return out


def checkpoint_metrics(checkpoint: str | Path) -> dict:
    """The metrics of a ``swr pretrain`` folder (``backbone`` checked), without the weights."""
    ckpt = Path(checkpoint)
    if ckpt.is_file():
        raise SwrError(f"--checkpoint {ckpt} is a file; give the folder written by swr pretrain")
    metrics = read_json(ckpt / "metrics.json", "checkpoint metrics")
    if not isinstance(metrics, dict) or not isinstance(metrics.get("backbone"), str):
        raise SwrError(f"{ckpt / 'metrics.json'} names no backbone; re-run swr pretrain")
    from .tasks.backbones import check_backbone_name

    try:  # the name typed and the name read from a file pass the same check
        check_backbone_name(metrics["backbone"])
    except SwrError as e:
        raise SwrError(f"{ckpt / 'metrics.json'}: backbone {metrics['backbone']!r} is not a "
                       f"backbone swr knows ({e}); re-run swr pretrain or fix the key") from None
    return metrics


def load_pretrained(checkpoint: str | Path) -> tuple[nn.Module, dict]:
    """The pre-trained model and its metrics from a ``swr pretrain`` folder."""
    metrics = checkpoint_metrics(checkpoint)
    model = create_backbone(metrics["backbone"], weights=Path(checkpoint) / "model.safetensors")
    return model.eval(), metrics


def default_checkpoint_dir(suite: str = "kws", seed: int = 0, quick: bool = False) -> Path:
    """Where :func:`default_checkpoint` keeps a suite's source model (trained or not)."""
    sources = QUICK_SOURCES if quick else DEFAULT_SOURCES
    if suite not in sources:
        raise SwrError(f"unknown suite {suite!r}; known: {', '.join(sources)}")
    task, backbone, epochs, _ = sources[suite]
    return cache_dir("pretrained",
                     f"{task.replace(':', '-')}_{backbone.replace(':', '-')}_e{epochs}_s{seed}")


def default_checkpoint(suite: str = "kws", seed: int = 0, quick: bool = False,
                       progress: bool = True) -> Path:
    """The cached pre-trained source model of an embedded suite, trained on first use."""
    out = default_checkpoint_dir(suite, seed, quick)
    if not (out / "metrics.json").is_file():
        task, backbone, epochs, lr = (QUICK_SOURCES if quick else DEFAULT_SOURCES)[suite]
        pretrain(task, backbone, out, epochs=epochs, lr=lr, seed=seed, progress=progress)
    return out
