"""Task deltas: the per-task difference from the base weights, as one safetensors file.

A task delta holds, under three prefixes,

* ``delta/<layer>.weight`` (and ``.bias``): ``g * dW`` of every gated layer,
* ``norm/<key>``: the task's norm parameters and running statistics,
* ``head/<key>``: the task's classifier head,

plus metadata: the backbone id, a hash of the base weights it applies to, the
selection, the budget and the swr version. :func:`apply_task_delta` rebuilds the
folded task model bit-exactly, because it computes ``W + dW`` with the same
operands and dtype as :func:`swr.fold.fold` does.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ._version import __version__
from .errors import ForeignDeltaError, SwrError
from .io import atomic_path, sort_safetensors_metadata
from .reparam import head_names, head_prefix, norm_modules, reparam_layers

FORMAT = "swr-task-delta/1"


def _plain_name(key: str) -> str:
    """State-dict key of the unwrapped model (``x.base_layer.weight`` -> ``x.weight``)."""
    return key.replace(".base_layer.", ".").removeprefix("base_layer.")


def frozen_base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base weights a task delta depends on, under unwrapped names.

    Everything except the head, the norm layers (stored whole in the delta) and the
    deltas themselves. For a merged layer the saved pre-merge weights are used.
    """
    skip_modules = head_names(model)
    norm_prefixes = tuple(n + "." for n in norm_modules(model))
    merged_saved = {}
    for name, layer in reparam_layers(model).items():
        if layer.merged:
            w, b = layer._unmerged
            merged_saved[f"{name}.base_layer.weight"] = w
            if b is not None:
                merged_saved[f"{name}.base_layer.bias"] = b
    out = {}
    for key, t in model.state_dict().items():
        module_name = key.rpartition(".")[0]
        if module_name in skip_modules or key.startswith(norm_prefixes):
            continue
        if key.endswith((".delta", ".delta_bias")) or key in ("delta", "delta_bias"):
            continue
        out[_plain_name(key)] = merged_saved.get(key, t)
    return out


def base_hash(model: nn.Module) -> str:
    """SHA-256 (hex, first 16 chars) of the frozen base weights: names, dtypes, shapes, bytes."""
    h = hashlib.sha256()
    for key, t in sorted(frozen_base_state(model).items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def task_delta_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of a task delta for a reparametrized model (open gates only)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in reparam_layers(model).items():
        if layer.gate == 0.0:
            continue
        tensors[f"delta/{name}.weight"] = (layer.gate * layer.delta).detach()
        if layer.delta_bias is not None:
            tensors[f"delta/{name}.bias"] = (layer.gate * layer.delta_bias).detach()
    for name, m in norm_modules(model).items():
        for key, t in m.state_dict().items():
            tensors[f"norm/{name}.{key}"] = t.detach()
    head = head_prefix(model)
    if head is not None:
        for key, t in model.get_submodule(head).state_dict().items():
            tensors[f"head/{head}.{key}"] = t.detach()
    return {k: v.cpu().contiguous().clone() for k, v in tensors.items()}


def export_task_delta(model: nn.Module, path: str | os.PathLike, *, backbone: str,
                      budget_params: Optional[int] = None, task: str = "",
                      base: Optional[str] = None, extra: Optional[dict] = None) -> int:
    """Write the task delta of ``model`` (a reparametrized model) to ``path``.

    Args:
        backbone: backbone id (e.g. ``bcresnet-2``, ``timm:resnet18``).
        budget_params: the budget the selection was made under (metadata).
        task: task id (metadata).
        base: hash of the base weights; computed from ``model`` when not given.
        extra: more metadata (JSON-serialisable).

    Returns the file size in bytes: the per-task storage cost.
    """
    if any(layer.merged for layer in reparam_layers(model).values()):
        raise SwrError("unmerge the model before exporting its task delta")
    tensors = task_delta_tensors(model)
    selection = [n for n, m in reparam_layers(model).items() if m.gate != 0.0]
    head = head_prefix(model)
    num_classes = None
    if head is not None:
        w = model.get_submodule(head).state_dict().get("weight")
        num_classes = None if w is None else int(w.shape[0])
    meta: dict[str, Any] = {
        "format": FORMAT, "backbone": backbone, "base_hash": base or base_hash(model),
        "selection": selection, "budget_params": budget_params, "task": task,
        "num_classes": num_classes, "head": head, "swr_version": __version__,
    }
    if extra:
        meta.update(extra)
    metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        sort_safetensors_metadata(tmp)  # same delta, same bytes
    return Path(path).stat().st_size


def read_task_delta(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a task delta's tensors and decoded metadata (no code is executed)."""
    path = Path(path)
    if not path.is_file():
        raise SwrError(f"task delta not found: {path}")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise SwrError(f"{path} is not a readable safetensors task delta ({e}); "
                       "re-export it with swr finetune") from None
    if raw.get("format") != FORMAT:
        raise SwrError(f"{path} is not a swr task delta (format {raw.get('format')!r}, "
                       f"expected {FORMAT!r})")
    missing = [k for k in ("base_hash", "backbone") if k not in raw]
    if missing:
        raise SwrError(f"{path} is a damaged swr task delta: its metadata lacks "
                       f"{', '.join(missing)}; re-export it with swr finetune")
    meta: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except (ValueError, RecursionError):
            meta[k] = v
    meta["base_hash"] = raw["base_hash"]
    meta["backbone"] = raw["backbone"]
    return tensors, meta


@torch.no_grad()
def apply_task_delta(base_model: nn.Module, path: str | os.PathLike,
                     check_hash: bool = True) -> nn.Module:
    """Rebuild the folded task model from plain base weights and a task delta, in place.

    ``base_model`` is an unwrapped backbone loaded with the base weights. Its head is
    resized to the task's classes (``reset_classifier``) when needed. A delta made
    for other base weights raises :class:`~swr.errors.ForeignDeltaError`.
    """
    if reparam_layers(base_model):
        raise SwrError("apply_task_delta expects the plain base model, not a reparametrized one")
    tensors, meta = read_task_delta(path)
    if check_hash:
        have = base_hash(base_model)
        if have != meta["base_hash"]:
            raise ForeignDeltaError(
                f"task delta {path} was made for base weights {meta['base_hash']}, but these "
                f"base weights hash to {have}; load the checkpoint the delta was trained from")
    head = meta.get("head")
    n = meta.get("num_classes")
    if head and n is not None:
        weight = tensors.get(f"head/{head}.weight") if isinstance(head, str) else None
        if not isinstance(n, int) or weight is None or weight.dim() == 0 or weight.shape[0] != n:
            raise SwrError(f"task delta {path} has malformed head metadata (head {head!r}, "
                           f"num_classes {n!r}, no matching head weight); re-export it with "
                           "swr finetune")
        try:
            current = base_model.get_submodule(head)
        except AttributeError:
            raise SwrError(f"task delta {path} names head {head!r} that the base model lacks; "
                           "was it made for another backbone?") from None
        if getattr(current, "weight", None) is None or current.weight.shape[0] != n:
            base_model.reset_classifier(n)
    # Freshly built heads are fp32; match the stored dtypes before copying.
    state = base_model.state_dict()
    for key, t in tensors.items():
        kind, _, name = key.partition("/")
        if kind == "delta":
            target = state.get(name)
            if target is None:
                raise SwrError(f"task delta {path} names layer {name} that the base model "
                               "lacks; was it made for another backbone?")
            if target.shape != t.shape:
                raise SwrError(f"task delta {path}: delta of {name} has shape {tuple(t.shape)}, "
                               f"the base model's {tuple(target.shape)}; was it made for "
                               "another backbone?")
            target.copy_(target + t.to(target.dtype))
        elif kind in ("norm", "head"):
            target = state.get(name)
            if target is None or target.shape != t.shape:
                raise SwrError(f"task delta {path}: {name} does not fit the base model "
                               f"(have {None if target is None else tuple(target.shape)}, "
                               f"delta {tuple(t.shape)})")
            target.copy_(t)
        else:
            raise SwrError(f"task delta {path} holds an unknown entry {key}")
    return base_model
