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
import math
import os
import struct
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional

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


#: The tensor types a task delta may hold, by their safetensors names: a model's
#: floating-point weights in any precision a model is kept in, and int64 (BatchNorm's
#: ``num_batches_tracked``). Anything else is refused before any data is read.
DELTA_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                "F64": torch.float64, "I64": torch.int64}
_SAFETENSORS_DTYPES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16",
                       "U16": "uint16", "I32": "int32", "U32": "uint32", "U64": "uint64",
                       "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
#: The largest header a task delta may have (safetensors' own limit).
MAX_HEADER_BYTES = 100_000_000


class TensorSpec(NamedTuple):
    """A tensor as a task delta's header declares it: checked before its data is read."""

    dtype: torch.dtype
    shape: torch.Size

    def numel(self) -> int:
        return math.prod(self.shape)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _unreadable(path, why: str) -> SwrError:
    return SwrError(f"{path} is not a readable safetensors task delta ({why}); re-export it "
                    "with swr finetune")


def _read_header(path: Path) -> tuple[dict[str, TensorSpec], dict[str, str]]:
    """The tensors a safetensors file declares and its raw metadata, checked against the
    file's real size: every declared byte range lies inside the file, the ranges tile
    its data exactly, and every dtype is one of :data:`DELTA_DTYPES`."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _unreadable(path, f"{size} bytes, too short for a safetensors header")
            n = struct.unpack("<Q", prefix)[0]
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise _unreadable(path, f"its header claims {n} bytes, but the file holds "
                                        f"{size - 8} after the length")
            raw = f.read(n)
    except OSError as e:
        raise _unreadable(path, e.strerror or str(e)) from None
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise _unreadable(path, f"its header is not JSON: {str(e)[:100]}") from None
    if not isinstance(header, dict):
        raise _unreadable(path, "its header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise _unreadable(path, "its metadata is not a map of strings")
    data_bytes = size - 8 - n
    specs: dict[str, TensorSpec] = {}
    ranges = []
    for key, entry in header.items():
        if not isinstance(entry, dict):
            raise _unreadable(path, f"entry {key[:80]} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DELTA_DTYPES:
            name = _SAFETENSORS_DTYPES.get(dtype, repr(dtype)[:20]) \
                if isinstance(dtype, str) else repr(dtype)[:20]
            raise _fail(path, f"entry {key[:80]} is {name}; a task delta holds only "
                              f"{', '.join(_dtype_name(d) for d in DELTA_DTYPES.values())} "
                              "tensors")
        ints = lambda v: isinstance(v, list) and all(  # noqa: E731
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2 ** 63 for d in v)
        if not ints(shape) or not (ints(offsets) and len(offsets) == 2):
            raise _unreadable(path, f"entry {key[:80]} has a malformed shape or byte range")
        begin, end = offsets
        declared = math.prod(shape) * DELTA_DTYPES[dtype].itemsize
        if end > data_bytes or begin > end:
            raise _unreadable(path, f"entry {key[:80]} declares bytes {begin} to {end} of the "
                                    f"data, but the file holds {max(data_bytes, 0)} bytes of "
                                    "data")
        if end - begin != declared:
            raise _unreadable(path, f"entry {key[:80]} declares shape {str(tuple(shape))[:80]} "
                                    f"({declared} bytes) over a byte range of {end - begin}")
        specs[key] = TensorSpec(DELTA_DTYPES[dtype], torch.Size(shape))
        ranges.append((begin, end))
    at = 0
    for begin, end in sorted(ranges):
        if begin != at:
            break
        at = end
    if at != data_bytes:
        raise _unreadable(path, f"its declared tensors do not tile its {data_bytes} bytes of "
                                "data (overlapping, missing or extra bytes)")
    return specs, meta


def read_task_delta_header(path: str | os.PathLike
                           ) -> tuple[dict[str, TensorSpec], dict[str, Any]]:
    """The tensors a task delta declares and its decoded metadata, reading no tensor data.

    The header is checked against the file's real size before anything is trusted
    (see :func:`read_task_delta`); a file that is not a swr task delta raises
    :class:`SwrError`.
    """
    path = Path(path)
    if not path.is_file():
        raise SwrError(f"task delta not found: {path}")
    specs, raw = _read_header(path)
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
    return specs, meta


def read_task_delta(path: str | os.PathLike, base_model: Optional[nn.Module] = None, *,
                    backbone: Optional[str] = None, check_hash: bool = False
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a task delta's tensors and decoded metadata (no code is executed): the one
    way every reader (fold, ``apply_task_delta``, the task store, predict) takes one in.

    Before any tensor data is read, the header is checked against the file's real size
    (every declared byte range inside the file, dtypes of :data:`DELTA_DTYPES` only) and
    the declared tensors go through :func:`validate_task_delta`: against ``base_model``
    when given (names, roles, shapes, dtypes; with ``check_hash`` its base hash must be
    the model's, else :class:`~swr.errors.ForeignDeltaError`), else its base-free part.
    A file that declares more than the base holds is refused here, unread. The loaded
    values are then checked too (finite, no negative running variance). Anything wrong
    raises :class:`SwrError` naming the file and the first problem.
    """
    path = Path(path)
    specs, meta = read_task_delta_header(path)
    if base_model is not None and check_hash:
        have = base_hash(base_model)
        if have != meta["base_hash"]:
            raise ForeignDeltaError(
                f"task delta {path} was made for base weights {meta['base_hash']}, but these "
                f"base weights hash to {have}; load the checkpoint the delta was trained from")
    validate_task_delta(base_model, specs, meta, path, backbone=backbone)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise _unreadable(path, e) from None
    if {k: (t.dtype, t.shape) for k, t in tensors.items()} != \
            {k: (s.dtype, s.shape) for k, s in specs.items()}:
        raise _unreadable(path, "its tensors are not the ones its header declared: was it "
                                "changed while being read?")
    validate_task_delta(base_model, tensors, meta, path, backbone=backbone)
    return tensors, meta


def _fail(path, what: str) -> SwrError:
    return SwrError(f"task delta {path} {what}; re-export it with swr finetune from this "
                    "base model")


def task_delta_classes(tensors: Mapping[str, Any], meta: dict[str, Any]) -> Optional[int]:
    """The class count of a task delta's head: ``num_classes`` of its metadata, else the
    first dimension of its head weight; None without either."""
    n = meta.get("num_classes")
    if n is not None:
        return n
    head = meta.get("head")
    w = tensors.get(f"head/{head}.weight") if isinstance(head, str) else None
    return int(w.shape[0]) if w is not None and len(w.shape) else None


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


def validate_task_delta(base_model: Optional[nn.Module],
                        tensors: Mapping[str, "torch.Tensor | TensorSpec"],
                        meta: dict[str, Any], path: str | os.PathLike = "",
                        backbone: Optional[str] = None) -> None:
    """The one check of a task delta, before anything uses it.

    ``tensors`` are loaded tensors, or the :class:`TensorSpec` of a header (then values
    are not checked yet: :func:`read_task_delta` checks the header first, the data
    after). Without ``base_model`` only what needs no model is checked: every entry is
    ``delta/``, ``norm/`` or ``head/`` of a dtype of :data:`DELTA_DTYPES`; floating-point
    values are finite and a BatchNorm ``running_var`` is never below zero; the metadata
    agrees with the tensors (``selection`` lists exactly the layers with ``delta/``
    entries, which fit ``budget_params``; ``num_classes`` is the head weight's first
    dimension; ``backbone``, when given, is the delta's). With ``base_model`` (the plain
    model it is about to change) every tensor must also have the role its prefix claims
    (``delta/`` a candidate layer's weight or bias, ``norm/`` a norm layer's parameter
    or running statistic, ``head/`` the head) and name an entry of the model of the same
    shape (the head's first dimension may be the delta's class count) and dtype, and the
    delta must hold every norm and head entry. Raises :class:`SwrError` naming the first
    problem.
    """
    if backbone is not None and meta.get("backbone") != backbone:
        raise _fail(path, f"was made for backbone {meta.get('backbone')!r}, not {backbone!r}")
    head = meta.get("head")
    if base_model is not None and head != head_prefix(base_model):
        raise _fail(path, f"names head {head!r}, but the base model's head is "
                          f"{head_prefix(base_model)!r}; was it made for another backbone?")
    if head is not None and not isinstance(head, str):
        raise _fail(path, f"names head {head!r}: expected a module name")
    n = meta.get("num_classes")
    if n is not None:
        weight = tensors.get(f"head/{head}.weight") if head else None
        if not (isinstance(n, int) and not isinstance(n, bool) and n > 0) or weight is None \
                or not len(weight.shape) or weight.shape[0] != n:
            raise _fail(path, f"has malformed head metadata (head {head!r}, num_classes {n!r}, "
                              "no head weight with that many rows)")
    selection = meta.get("selection")
    if not (isinstance(selection, list) and all(isinstance(s, str) for s in selection)):
        raise _fail(path, f"has no selection list in its metadata (got {selection!r})")
    budget = meta.get("budget_params")
    if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool)
                               or budget <= 0):
        raise _fail(path, f"has budget_params {budget!r}: expected a positive integer")
    if base_model is not None:
        roles = _task_delta_roles(base_model, head)
        state = base_model.state_dict()
        base_w = state.get(f"{head}.weight") if head else None
        base_n = int(base_w.shape[0]) if base_w is not None and base_w.dim() else None
        classes = task_delta_classes(tensors, meta)
    seen: dict[str, set[str]] = {"delta": set(), "norm": set(), "head": set()}
    allowed = set(DELTA_DTYPES.values())
    for key, t in tensors.items():
        kind, _, name = key.partition("/")
        if kind not in seen or not name:
            raise _fail(path, f"holds an unknown entry {key} (expected delta/, norm/ or head/)")
        if base_model is not None:
            if name not in roles[kind]:
                what = {"delta": "a gated layer's weight or bias",
                        "norm": "a norm layer's entry", "head": "an entry of the head"}[kind]
                where = "the base model lacks it" if name not in state else "it is not"
                raise _fail(path, f"entry {key} must name {what} of the base model, but {where}")
            target = state[name]
            want = tuple(target.shape)
            if kind == "head" and want and want[0] == base_n and classes is not None:
                want = (classes, *want[1:])  # the head is resized to the task's classes
            if tuple(t.shape) != want:
                raise _fail(path, f"entry {key} has shape {tuple(t.shape)}, the base model's "
                                  f"{name} {want}")
            if t.dtype != target.dtype:
                raise _fail(path, f"entry {key} is {_dtype_name(t.dtype)}, the base model's "
                                  f"{name} {_dtype_name(target.dtype)}")
        elif t.dtype not in allowed:
            raise _fail(path, f"entry {key} is {_dtype_name(t.dtype)}; a task delta holds only "
                              f"{', '.join(_dtype_name(d) for d in DELTA_DTYPES.values())} "
                              "tensors")
        if isinstance(t, torch.Tensor):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise _fail(path, f"entry {key} holds NaN or infinite values")
            if kind == "norm" and name.endswith("running_var") and bool((t < 0).any()):
                raise _fail(path, f"entry {key} holds negative values, but a running "
                                  "variance is never below zero")
        seen[kind].add(name)
    if base_model is not None:
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
    :class:`~swr.errors.SwrError` before any weight is changed: it is read and checked
    by :func:`read_task_delta` against ``base_model`` first. Returns the model in eval
    mode.
    """
    if reparam_layers(base_model):
        raise SwrError("apply_task_delta expects the plain base model, not a reparametrized one")
    tensors, meta = read_task_delta(path, base_model, backbone=backbone, check_hash=check_hash)
    head, n = meta.get("head"), task_delta_classes(tensors, meta)
    if head and n is not None:
        current = base_model.get_submodule(head)
        weight = getattr(current, "weight", None)
        if weight is None or weight.shape[0] != n:
            classes = getattr(base_model, "num_classes", None)
            base_model.reset_classifier(n)
            if weight is not None:  # a freshly built head is fp32; keep the model's dtype
                base_model.get_submodule(head).to(weight.dtype)
            state = base_model.state_dict()
            odd = [k for k, t in tensors.items()
                   if k.startswith("head/") and (state.get(k[5:]) is None
                                                 or state[k[5:]].shape != t.shape)]
            if odd:  # a refused delta leaves the model as it came
                replace_module(base_model, head, current)
                if classes is not None:
                    base_model.num_classes = classes
                raise _fail(path, f"entry {odd[0]} does not fit the head resized to {n} classes")
    state = base_model.state_dict()
    for key, t in tensors.items():
        kind, _, name = key.partition("/")
        target = state[name]
        if kind == "delta":
            target.copy_(target + t)
        else:
            target.copy_(t)
    return base_model.eval()
