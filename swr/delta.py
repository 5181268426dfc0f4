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
from safetensors.torch import load_file
from torch import nn

from ._version import __version__
from .budget import check_selection
from .errors import ForeignDeltaError, SwrError
from .io import save_safetensors
from .reparam import (candidates, head_names, head_prefix, norm_modules, reparam_layers,
                      replace_module)

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
    tensors.update(task_state_tensors(model))
    return {k: v.cpu().contiguous().clone() for k, v in tensors.items()}


def task_state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The ``norm/`` and ``head/`` entries every task delta carries: the task's whole norm
    state (parameters and running statistics) and its head."""
    tensors: dict[str, torch.Tensor] = {}
    for name, m in norm_modules(model).items():
        for key, t in m.state_dict().items():
            tensors[f"norm/{name}.{key}"] = t.detach()
    head = head_prefix(model)
    if head is not None:
        for key, t in model.get_submodule(head).state_dict().items():
            tensors[f"head/{head}.{key}"] = t.detach()
    return tensors


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
    if budget_params is not None:  # the metadata may not claim a budget the deltas exceed
        check_selection(model, selection, budget_params)
    head = head_prefix(model)
    num_classes = None
    if head is not None:
        w = model.get_submodule(head).state_dict().get("weight")
        num_classes = None if w is None else int(w.shape[0])
    return save_task_delta(tensors, path, {
        "backbone": backbone, "base_hash": base or base_hash(model), "selection": selection,
        "budget_params": budget_params, "task": task, "num_classes": num_classes, "head": head,
        **(extra or {})})


def save_task_delta(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                    meta: dict[str, Any]) -> int:
    """Write task-delta ``tensors`` with ``meta`` (plus format and version) to ``path``,
    atomically and byte-reproducibly; returns the file size. A full disk is an OSError."""
    meta = {"format": FORMAT, **meta, "swr_version": __version__}
    metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    return save_safetensors(tensors, path, metadata)


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


def _fail(path, what: str) -> SwrError:
    return SwrError(f"task delta {path} {what}; re-export it with swr finetune from this "
                    "base model")


def _task_delta_roles(base_model: nn.Module, head: Optional[str]) -> dict[str, set[str]]:
    """The state-dict keys of ``base_model`` each prefix of a task delta may name."""
    deltas = set()
    for c in candidates(base_model):  # never the head: its layers are stored under head/
        deltas.add(f"{c.name}.weight")
        if getattr(base_model.get_submodule(c.name), "bias", None) is not None:
            deltas.add(f"{c.name}.bias")
    norms = {f"{n}.{k}" if n else k for n, m in norm_modules(base_model).items()
             for k in m.state_dict()}
    heads = set() if head is None else \
        {f"{head}.{k}" for k in base_model.get_submodule(head).state_dict()}
    return {"delta": deltas, "norm": norms, "head": heads}


def validate_task_delta(base_model: nn.Module, tensors: dict[str, torch.Tensor],
                        meta: dict[str, Any], path: str | os.PathLike = "",
                        backbone: Optional[str] = None) -> None:
    """Check a task delta against the plain base model it is about to change.

    Every tensor must have the role its prefix claims (``delta/`` a candidate layer's
    weight or bias, ``norm/`` a norm layer's parameter or running statistic, ``head/``
    the head), name an entry of ``base_model`` of the same shape and dtype, and hold
    finite values; the delta must hold every norm and head entry; its metadata must
    agree with its tensors (``selection`` lists exactly the layers with ``delta/``
    entries, which fit ``budget_params``; ``head`` is the model's head; ``backbone``,
    when given, is the delta's). Raises :class:`SwrError` naming the first problem.
    The head must already have the delta's class count.
    """
    if backbone is not None and meta.get("backbone") != backbone:
        raise _fail(path, f"was made for backbone {meta.get('backbone')!r}, not {backbone!r}")
    head = head_prefix(base_model)
    if meta.get("head") != head:
        raise _fail(path, f"names head {meta.get('head')!r}, but the base model's head is "
                          f"{head!r}; was it made for another backbone?")
    selection = meta.get("selection")
    if not (isinstance(selection, list) and all(isinstance(n, str) for n in selection)):
        raise _fail(path, f"has no selection list in its metadata (got {selection!r})")
    budget = meta.get("budget_params")
    if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool)
                               or budget <= 0):
        raise _fail(path, f"has budget_params {budget!r}: expected a positive integer")
    roles = _task_delta_roles(base_model, head)
    state = base_model.state_dict()
    seen: dict[str, set[str]] = {kind: set() for kind in roles}
    for key, t in tensors.items():
        kind, _, name = key.partition("/")
        if kind not in roles:
            raise _fail(path, f"holds an unknown entry {key} (expected delta/, norm/ or head/)")
        if name not in roles[kind]:
            what = {"delta": "a gated layer's weight or bias", "norm": "a norm layer's entry",
                    "head": "an entry of the head"}[kind]
            where = "the base model lacks it" if name not in state else "it is not"
            raise _fail(path, f"entry {key} must name {what} of the base model, but {where}")
        target = state[name]
        if t.shape != target.shape:
            raise _fail(path, f"entry {key} has shape {tuple(t.shape)}, the base model's "
                              f"{name} {tuple(target.shape)}")
        if t.dtype != target.dtype:
            raise _fail(path, f"entry {key} is {str(t.dtype).removeprefix('torch.')}, the base "
                              f"model's {name} {str(target.dtype).removeprefix('torch.')}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise _fail(path, f"entry {key} holds NaN or infinite values")
        seen[kind].add(name)
    for kind in ("norm", "head"):
        missing = sorted(roles[kind] - seen[kind])
        if missing:
            raise _fail(path, f"lacks {kind}/{missing[0]}"
                              f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}")
    # a layer's delta may change its weight, its bias or both: BitFit's changes only the
    # bias of every layer that has one (squeeze-excitation convolutions, say)
    layers = {name.rpartition(".")[0] for name in seen["delta"]}
    if len(set(selection)) != len(selection) or set(selection) != layers:
        odd = sorted(set(selection) ^ layers) or ["a layer listed twice"]
        raise _fail(path, f"metadata lists selection {selection[:4]}"
                          f"{'...' if len(selection) > 4 else ''}, but its delta/ entries "
                          f"are for {sorted(layers)[:4]}{'...' if len(layers) > 4 else ''} "
                          f"(differ at {odd[0]})")
    cost = sum(tensors[f"delta/{n}"].numel() for n in seen["delta"])
    if budget is not None and cost > budget:
        raise _fail(path, f"updates {cost} parameters, over the budget of {budget} its "
                          "metadata states")


@torch.no_grad()
def apply_task_delta(base_model: nn.Module, path: str | os.PathLike,
                     check_hash: bool = True, backbone: Optional[str] = None) -> nn.Module:
    """Rebuild the folded task model from plain base weights and a task delta, in place.

    ``base_model`` is an unwrapped backbone loaded with the base weights. Its head is
    resized to the task's classes (``reset_classifier``) when needed. A delta made
    for other base weights raises :class:`~swr.errors.ForeignDeltaError`; one whose
    tensors or metadata do not fit the model (see :func:`validate_task_delta`;
    ``backbone`` is the base model's backbone id, checked when given) raises
    :class:`~swr.errors.SwrError` before any weight is changed (a head resized for it
    is put back). Returns the model in eval mode.
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
    resized = None  # (the head it had, its class count) when resized below
    if head and n is not None:
        weight = tensors.get(f"head/{head}.weight") if isinstance(head, str) else None
        if not isinstance(n, int) or weight is None or weight.dim() == 0 or weight.shape[0] != n:
            raise SwrError(f"task delta {path} has malformed head metadata (head {head!r}, "
                           f"num_classes {n!r}, no matching head weight); re-export it with "
                           "swr finetune")
        if head != head_prefix(base_model):
            raise SwrError(f"task delta {path} names head {head!r} that the base model lacks; "
                           "was it made for another backbone?")
        current = base_model.get_submodule(head)
        if getattr(current, "weight", None) is None or current.weight.shape[0] != n:
            dtype = current.weight.dtype if getattr(current, "weight", None) is not None \
                else None
            resized = (current, getattr(base_model, "num_classes", None))
            base_model.reset_classifier(n)
            if dtype is not None:  # a freshly built head is fp32; keep the model's dtype
                base_model.get_submodule(head).to(dtype)
    try:
        validate_task_delta(base_model, tensors, meta, path, backbone=backbone)
    except SwrError:
        if resized is not None:  # a refused delta leaves the model as it came
            replace_module(base_model, head, resized[0])
            if resized[1] is not None:
                base_model.num_classes = resized[1]
        raise
    state = base_model.state_dict()
    for key, t in tensors.items():
        kind, _, name = key.partition("/")
        target = state[name]
        if kind == "delta":
            target.copy_(target + t)
        else:
            target.copy_(t)
    return base_model.eval()
