"""The base model a transfer starts from, in either form users have it.

* a folder written by ``swr pretrain`` (``--checkpoint DIR``), or
* a backbone name and a local weights file (``--backbone timm:NAME --weights FILE``,
  safetensors or a torch checkpoint read with ``weights_only=True``), as timm's
  ``create_model(name, pretrained_cfg_overlay=dict(file=...))`` takes them.

:func:`load_base` turns either into the model and its description; every command
that starts from a base model (search, finetune, fold, bench, store) goes through
it. The description carries the base's image preprocessing (``data_config``): for
a weights file, the model's own timm data config (input size, mean, std,
interpolation, crop pct), because those weights were trained on inputs prepared
that way; for a ``swr pretrain`` folder, what the folder recorded (None for a
source model trained on an embedded suite: the suite's own preprocessing).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .errors import SwrError
# the data-config helpers live with the backbones; re-exported as part of this module's API
from .tasks.backbones import backbone_data_config, model_data_config  # noqa: F401
from .tasks.base import DataOverride
from .tasks.base import task_preprocess  # noqa: F401  (re-exported: where users found it)


@dataclass(frozen=True)
class BaseSpec:
    """Where the base model comes from: ``checkpoint`` or ``backbone`` + ``weights``."""

    checkpoint: Optional[str] = None
    backbone: Optional[str] = None
    weights: Optional[str] = None

    def validate(self) -> "BaseSpec":
        """Raise :class:`SwrError` unless exactly one of the two forms is given."""
        if self.checkpoint and (self.backbone or self.weights):
            raise SwrError("give either --checkpoint DIR (from swr pretrain) or --backbone NAME "
                           "--weights FILE, not both")
        if not self.checkpoint:
            if not self.backbone and not self.weights:
                raise SwrError("no base model: give --checkpoint DIR (from swr pretrain) or "
                               "--backbone NAME --weights FILE")
            if not self.weights:
                raise SwrError(f"--backbone {self.backbone} needs --weights FILE (a local "
                               "safetensors or torch checkpoint; weights are never downloaded)")
            if not self.backbone:
                raise SwrError(f"--weights {self.weights} needs --backbone NAME (e.g. "
                               "timm:resnet50) to build the model the weights belong to")
        return self

    def to_dict(self) -> dict[str, str]:
        """The set fields, with absolute paths (for ``selection.json`` and the like)."""
        out = {k: v for k, v in asdict(self).items() if v}
        for key in ("checkpoint", "weights"):
            if key in out:
                out[key] = str(Path(out[key]).resolve())
        return out

    @classmethod
    def from_dict(cls, d: Any, where: str = "file") -> "BaseSpec":
        """The inverse of :meth:`to_dict`; a malformed entry raises :class:`SwrError`."""
        if not isinstance(d, dict) or not all(isinstance(d.get(k), (str, type(None)))
                                              for k in ("checkpoint", "backbone", "weights")):
            raise SwrError(f"{where} names no valid base model ('base' must map checkpoint or "
                           "backbone + weights to strings)")
        return cls(d.get("checkpoint"), d.get("backbone"), d.get("weights")).validate()

    def __str__(self) -> str:
        if self.checkpoint:
            return f"checkpoint {self.checkpoint}"
        return f"{self.backbone} with weights {self.weights}"


def base_spec(checkpoint: Optional[str] = None, backbone: Optional[str] = None,
              weights: Optional[str] = None) -> BaseSpec:
    """A validated :class:`BaseSpec` from the command-line options."""
    return BaseSpec(checkpoint or None, backbone or None, weights or None).validate()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex, first 16 chars) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def state_hash(model: nn.Module) -> str:
    """SHA-256 (hex, first 16 chars) of every tensor of ``model``'s state dict.

    Unlike :func:`swr.delta.base_hash` it includes norms and head, so two bases that
    differ only in their BatchNorm statistics get different caches.
    """
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def checkpoint_backbone(spec: BaseSpec) -> str:
    """The backbone id of ``spec`` without loading any weights."""
    if spec.checkpoint:
        from .pretrain import checkpoint_metrics

        return checkpoint_metrics(spec.checkpoint)["backbone"]
    return str(spec.backbone)


def load_base(spec: BaseSpec) -> tuple[nn.Module, dict]:
    """The base model (eval mode) and its description, from either form of ``spec``.

    The description holds ``backbone``, ``base`` (``spec.to_dict()``),
    ``weights_sha256`` (the weights file's content hash: caches and outputs key on
    it, not on the path), ``data_config`` (see the module docstring) and, for a
    ``swr pretrain`` folder, that folder's metrics.
    """
    from .tasks.backbones import create_backbone

    spec.validate()
    if spec.checkpoint:
        from .pretrain import load_pretrained

        model, metrics = load_pretrained(spec.checkpoint)
        desc = dict(metrics)
        desc["data_config"] = metrics.get("data_config")
        weights = Path(spec.checkpoint) / "model.safetensors"
    else:
        weights = Path(str(spec.weights))
        model = create_backbone(str(spec.backbone), weights=weights).eval()
        desc = {"backbone": spec.backbone, "data_config": model_data_config(model)}
    desc["base"] = spec.to_dict()
    desc["weights_sha256"] = file_sha256(weights)
    return model, desc


def load_task(task_spec: str, desc: dict, on_bad_file: str = "fail",
              override: Optional[DataOverride] = None, **kwargs: Any):
    """The task ``task_spec`` prepared the way the base described by ``desc`` expects,
    or with a user's ``override`` of its image size and normalisation."""
    from .tasks import get_task

    return get_task(task_spec, on_bad_file=on_bad_file, data_config=desc.get("data_config"),
                    override=override, **kwargs)


__all__ = ["BaseSpec", "DataOverride", "backbone_data_config", "base_spec", "checkpoint_backbone", "file_sha256",
           "load_base", "load_task", "model_data_config", "state_hash", "task_preprocess"]

