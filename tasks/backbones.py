"""Backbones by name, weights from local files: the public face of the backbone registry.

Each family registers itself in the module that defines it (:mod:`.registry`; e.g.
``bcresnet-<tau>`` in :mod:`.bcresnet`), and the import below collects them; the timm
family (``timm:<model_name>``) is defined here. To add a family: one module with a
builder decorated by ``@register_backbone``, and its name on that import line.
The functions here (:func:`check_backbone_name`, :func:`create_backbone`,
:func:`input_shape`, :func:`backbone_data_config`, :func:`backbone_family`) answer by
looking the name up there.

Weights never come from a hub: ``--weights PATH`` points at a safetensors file or a
torch checkpoint (read with ``weights_only=True``, so it cannot run code).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from swr.errors import SwrError
from swr.io import save_safetensors

# the family modules register themselves on import; timm's family is registered below
from . import bcresnet, dscnn  # noqa: F401
from .heads import head_prefix
# BACKBONES and find_family are re-exported: read here, the registry holds every family
from .registry import (BACKBONES, BackboneFamily, backbone_forms, check_name,  # noqa: F401
                       find_family, register_backbone)

_TIMM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]*(\.[A-Za-z0-9_-]+)?$")


def similar_names(name: str, known: list[str], n: int = 8) -> list[str]:
    """The ``n`` names of ``known`` closest to ``name``: those it starts (or that start
    it), nearest in length first, then the closest by edit-distance ratio."""
    import difflib

    prefix = sorted((k for k in known if k.startswith(name) or name.startswith(k)),
                    key=lambda k: (abs(len(k) - len(name)), k))
    close = difflib.get_close_matches(name, known, n=n, cutoff=0.6)
    return list(dict.fromkeys(prefix[:n // 2] + close + prefix[n // 2:]))[:n]


def check_backbone_name(name: object) -> str:
    """``name`` if it names a backbone swr can build, else :class:`SwrError` (one line).

    The one check of a backbone name, whether typed or read from a file
    (``metrics.json``, ``store.json``, a delta's metadata).
    """
    return check_name(name)


def backbone_family(name: str) -> BackboneFamily:
    """The registered family of backbone ``name`` (its modality, input shape, learning-rate
    row, builder); a name swr cannot build raises :class:`SwrError`."""
    check_backbone_name(name)
    return find_family(name)


def _timm_name(name: str) -> str:
    import timm

    model = name.removeprefix("timm:")
    if not model or model.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        raise SwrError(f"backbone {name!r}: hub and remote weights are not used; give a "
                       "timm architecture name and --weights PATH to a local file")
    if not _TIMM_NAME.match(model):
        raise SwrError(f"backbone {name!r} is not a timm model name (letters, digits and '_', "
                       "optionally '.<tag>'); see swr list backbones 'timm:*'")
    arch = model.split(".")[0]
    if not timm.is_model(arch):
        close = similar_names(arch, timm.list_models())
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise SwrError(f"unknown timm model {arch!r}{hint}")
    return model


def _timm_description() -> str:
    import timm

    return (f"any of timm's {len(timm.list_models())} architectures "
            "(`swr list backbones 'timm:resnet*'` lists them)")


def _timm_members(pattern: str) -> list[str]:
    import timm

    return [f"timm:{n}" for n in timm.list_models(pattern)]


def _timm_data_config(name: str) -> Optional[dict]:
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(_timm_name(name))
    if cfg is None:
        return None
    resolved = resolve_data_config({}, pretrained_cfg=cfg.to_dict())
    return {k: (list(resolved[k]) if isinstance(resolved[k], tuple) else resolved[k])
            for k in DATA_CONFIG_KEYS if k in resolved}


# Registered after the family modules above, so that it is listed last.
@register_backbone(prefix="timm:", forms=("timm:<model_name>",), check=_timm_name,
                   description=_timm_description, members=_timm_members,
                   data_config=_timm_data_config, modality="image", input_shape=(3, 224, 224),
                   num_classes=1000, lr_family="timm")
def _create_timm(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    import timm

    return timm.create_model(_timm_name(name), pretrained=False, num_classes=num_classes,
                             **kwargs)


#: The backbone names users can type, as registered by the built-in families.
BACKBONE_FORMS = backbone_forms()


def create_backbone(name: str, num_classes: Optional[int] = None,
                    weights: Optional[str | os.PathLike] = None, **kwargs: Any) -> nn.Module:
    """Build backbone ``name`` with ``num_classes`` outputs, optionally loading ``weights``.

    With ``weights`` and no ``num_classes``, the head is sized from the checkpoint;
    weights without a head (a feature extractor) get a new one.
    """
    if weights is not None and str(weights).lower() in ("hub", "imagenet", "pretrained", "true"):
        raise SwrError(f"--weights {weights}: weights are never downloaded; give the path "
                       "of a local safetensors or torch checkpoint file")
    state = meta = None
    if weights is not None:
        state, meta = read_checkpoint(weights)
    model = _build(name, num_classes or 1, **kwargs)
    if state is not None:
        head = head_prefix(model)
        if head and not any(k.startswith(f"{head}.") for k in state):
            # feature-extractor weights (timm's num_classes=0) hold no head: keep a new one
            state = {**{k: v for k, v in model.state_dict().items() if k.startswith(f"{head}.")},
                     **state}
        head_w = state.get(f"{head}.weight") if head else None
        ckpt_classes = int(head_w.shape[0]) if head_w is not None and head_w.dim() else None
        if ckpt_classes is not None and ckpt_classes != (num_classes or 1):
            model = _build(name, ckpt_classes, **kwargs)
        load_state(model, state, weights, backbone=name)
        if num_classes is not None and ckpt_classes is not None and num_classes != ckpt_classes:
            model.reset_classifier(num_classes)
    elif num_classes is None:
        model = _build(name, _default_classes(name), **kwargs)
    return model


def _default_classes(name: str) -> int:
    family = find_family(name)
    return family.num_classes if family is not None else 1


def _build(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    family = find_family(name)
    if family is None:
        raise SwrError(f"unknown backbone {name!r}; known: {', '.join(backbone_forms())}")
    return family.build(name, num_classes=num_classes, **kwargs)


def input_shape(model: nn.Module, name: str = "") -> tuple[int, ...]:
    """Per-sample input shape the backbone expects (C, H, W) or (1, mels, frames)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    if "input_size" in cfg:
        return tuple(cfg["input_size"])
    family = find_family(name)
    # an unnamed model without a data config is taken for an ImageNet-sized image model
    return family.input_shape if family is not None else (3, 224, 224)


# -- checkpoints ----------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a state dict from safetensors or a torch checkpoint (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise SwrError(f"weights file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(8)
    if path.suffix == ".safetensors" or (len(head) == 8 and not head.startswith(b"PK")
                                         and not head.startswith(b"\x80")):
        try:
            state = load_file(str(path))
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
            return state, meta
        except (SafetensorError, OSError, ValueError) as e:
            if path.suffix == ".safetensors":
                raise SwrError(f"cannot read safetensors weights {path}: {e}") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors of many kinds; weights_only refuses code
        text = str(e)
        if text.startswith("Weights only load failed"):
            # torch's first paragraph suggests weights_only=False (running the file's code);
            # the reason is in the next one
            parts = [p.strip() for p in text.split("\n\n") if p.strip()]
            reason = parts[1] if len(parts) > 1 else parts[0]
            raise SwrError(f"refused weights {path}: a pickle that is not a weights-only torch "
                           f"checkpoint ({' '.join(reason.split())[:200]}); nothing in it was "
                           "run; convert it to safetensors where it came from") from None
        raise SwrError(f"cannot read weights {path} as safetensors or a weights-only torch "
                       f"checkpoint ({text.splitlines()[0][:200] if text else type(e).__name__})"
                       ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise SwrError(f"{path} holds no state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    return state, {}


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: Any = "checkpoint",
               backbone: str = "") -> None:
    """Load ``state`` strictly; mismatches name the missing/unexpected keys, and
    non-float or non-finite values where the model has float weights, and a negative
    BatchNorm running variance, are refused."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:4]}{'...' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}")
        if wrong:
            parts.append(f"shape mismatch at {wrong[:4]}")
        raise SwrError(f"weights {source} do not fit backbone {backbone or type(model).__name__}: "
                       + "; ".join(parts) + "; use the checkpoint made for this backbone")
    # load_state_dict would cast int8 codes to float and copy NaN silently: a wrong model
    for key, have in own.items():
        if not have.is_floating_point():
            continue
        t = state[key]
        if not t.is_floating_point():
            raise SwrError(f"weights {source}: {key} is {str(t.dtype).removeprefix('torch.')}, "
                           "where the model has floating-point weights (a quantized or damaged "
                           "checkpoint?); give float weights")
        if not bool(torch.isfinite(t).all()):
            raise SwrError(f"weights {source}: {key} holds NaN or infinite values (a diverged "
                           "or damaged checkpoint); give finite weights")
        # as in a task delta: a negative variance makes BatchNorm output NaN for every input
        if key.endswith("running_var") and bool((t < 0).any()):
            raise SwrError(f"weights {source}: {key} holds negative values, but a running "
                           "variance is never below zero (a damaged checkpoint); give the "
                           "checkpoint as it was saved")
    model.load_state_dict(state, strict=True)


def save_checkpoint(model: nn.Module, path: str | os.PathLike, **metadata: Any) -> int:
    """Write ``model``'s state dict to safetensors (atomic); returns the size in bytes."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    return save_safetensors(state, path, meta)


#: The parts of a timm data config that decide how images are prepared for a model.
DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def model_data_config(model: nn.Module) -> Optional[dict]:
    """The timm data config of ``model`` (None for a model without one, e.g. BC-ResNet)."""
    if getattr(model, "pretrained_cfg", None) is None and \
            getattr(model, "default_cfg", None) is None:
        return None
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    return {k: (list(cfg[k]) if isinstance(cfg[k], tuple) else cfg[k])
            for k in DATA_CONFIG_KEYS if k in cfg}


def backbone_data_config(name: str) -> Optional[dict]:
    """The timm data config of backbone ``name`` without building it (None for a family
    without one, e.g. the keyword spotters)."""
    family = find_family(name)
    if family is None or family.data_config is None:
        return None
    return family.data_config(name)
