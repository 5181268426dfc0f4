"""Wrapping a model's candidate layers, and choosing which gates are open.

A *candidate* is every ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` of the
backbone outside its classifier head, found by module type (never by parameter
name). ``reparametrize`` wraps each one in a :class:`~swr.layers.ReparamLayer`;
a *selection* is the set of candidate names whose gates are open.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import nn

from .errors import SwrError
from .layers import ReparamLayer, is_candidate, layer_kind
# the head convention belongs to the backbones; the core uses it everywhere
from .tasks.heads import head_module, head_names, head_prefix

# Norm layers whose affine parameters (and running statistics) are task state.
# SubSpectralNorm and timm's norm layers are found through their inner / parent
# classes (BatchNorm2d, LayerNorm); register_norm_type adds others.
_NORM_TYPES: list[type] = [nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
                           nn.modules.instancenorm._InstanceNorm]
try:  # RMSNorm exists from torch 2.4
    _NORM_TYPES.append(nn.RMSNorm)
except AttributeError:  # pragma: no cover
    pass


def register_norm_type(cls: type) -> None:
    """Treat modules of type ``cls`` as norm layers (tuned by norm tuning, stored per task)."""
    if cls not in _NORM_TYPES:
        _NORM_TYPES.append(cls)


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, tuple(_NORM_TYPES))


@dataclass(frozen=True)
class Candidate:
    """One reparametrizable layer: its module path, kind, weight shape and delta cost."""

    name: str
    kind: str
    shape: tuple[int, ...]
    params: int

    def as_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "shape": list(self.shape),
                "params": self.params}


# -- enumeration ----------------------------------------------------------------------
def _iter_candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of candidate layers in registration (network) order.

    Already-wrapped layers are reported under the wrapper's name.
    """
    skip = head_names(model)
    for name, m in model.named_modules():
        if name in skip:
            continue
        if isinstance(m, ReparamLayer):
            yield name, m
        elif is_candidate(m) and not name.endswith(".base_layer") and name != "base_layer":
            yield name, m


def candidates(model: nn.Module, bias_delta: bool = False) -> list[Candidate]:
    """Every candidate layer of ``model`` (wrapped or not), in network order."""
    out = []
    for name, m in _iter_candidates(model):
        if isinstance(m, ReparamLayer):
            out.append(Candidate(name, m.kind, tuple(m.delta.shape), m.cost))
            continue
        cost = m.weight.numel()
        if bias_delta and m.bias is not None:
            cost += m.bias.numel()
        out.append(Candidate(name, layer_kind(m), tuple(m.weight.shape), cost))
    return out


def reparam_layers(model: nn.Module) -> dict[str, ReparamLayer]:
    """The wrapped layers of ``model`` by name, in network order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ReparamLayer)}


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at path ``name`` inside ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def reparametrize(model: nn.Module, *, bias_delta: bool = False,
                  include: Optional[Callable[[str, nn.Module], bool]] = None) -> nn.Module:
    """Wrap every candidate layer of ``model`` in place and return it.

    Args:
        bias_delta: also learn bias deltas.
        include: optional predicate ``(name, module) -> bool`` restricting which
            candidates are wrapped (e.g. only attention projections).

    All gates start closed, so the wrapped model computes exactly the base model.
    """
    for name, m in list(_iter_candidates(model)):
        if isinstance(m, ReparamLayer):
            continue
        if include is not None and not include(name, m):
            continue
        replace_module(model, name, ReparamLayer(m, bias_delta=bias_delta))
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """Replace every ReparamLayer by its (unchanged) base layer, discarding deltas, in place."""
    for name, layer in list(reparam_layers(model).items()):
        layer.unmerge()
        replace_module(model, name, layer.base_layer)
    return model


# -- selections and gates -------------------------------------------------------------
def set_selection(model: nn.Module, selection: Iterable[str]) -> None:
    """Open the gates of the layers named in ``selection``, close all others."""
    layers = reparam_layers(model)
    chosen = set(selection)
    unknown = chosen - layers.keys()
    if unknown:
        example = ", ".join(list(layers)[:3])
        raise SwrError(f"selection names unknown layer(s) {sorted(unknown)[:5]}; "
                       f"layer names look like: {example}")
    for name, layer in layers.items():
        layer.gate = 1.0 if name in chosen else 0.0


def get_selection(model: nn.Module) -> list[str]:
    """Names of the layers whose gates are open, in network order."""
    return [n for n, m in reparam_layers(model).items() if m.gate != 0.0]


def sample_gates(model: nn.Module, p: float | Sequence[float],
                 generator: Optional[torch.Generator] = None) -> list[str]:
    """Open each gate independently with probability ``p`` (scalar or one per layer).

    Used per batch while training the supernet, so every delta learns to be useful
    with many different subsets of the others open. Returns the open names.
    """
    layers = reparam_layers(model)
    probs = torch.as_tensor(p, dtype=torch.float64).expand(len(layers))
    opened = torch.rand(len(layers), generator=generator, dtype=torch.float64) < probs
    for (name, layer), o in zip(layers.items(), opened.tolist()):
        layer.gate = 1.0 if o else 0.0
    return [n for (n, _), o in zip(layers.items(), opened.tolist()) if o]


# -- parameter groups -----------------------------------------------------------------
def norm_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Norm layers outside the head, outermost only (SubSpectralNorm's inner BN is
    reported once, under the registered type if any)."""
    skip = head_names(model)
    out: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if name in skip or not is_norm(m):
            continue
        if any(name.startswith(p + ".") for p in out):
            continue
        out[name] = m
    return out


def norm_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Affine parameters of the norm layers (the task norms)."""
    return {f"{n}.{k}" if n else k: p for n, m in norm_modules(model).items()
            for k, p in m.named_parameters()}


@torch.no_grad()
def restore_norms(model: nn.Module, base: nn.Module) -> None:
    """Give ``model``'s norm layers the state (affines and running statistics) of the same
    norm layers in ``base``: a model that does not train its task norms keeps the base's,
    even when it starts from a supernet whose norms stage 1 trained."""
    source = norm_modules(base)
    for name, m in norm_modules(model).items():
        if name not in source:
            raise ValueError(f"norm layer {name!r} is not in the base model")
        m.load_state_dict(source[name].state_dict())


def head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    head = head_module(model)
    prefix = head_prefix(model)
    if head is None:
        return {}
    return {f"{prefix}.{k}": p for k, p in head.named_parameters()}


def delta_parameters(model: nn.Module, selection: Optional[Iterable[str]] = None
                     ) -> dict[str, nn.Parameter]:
    """Delta parameters of all wrapped layers, or of those in ``selection``."""
    keep = None if selection is None else set(selection)
    out = {}
    for name, layer in reparam_layers(model).items():
        if keep is not None and name not in keep:
            continue
        out[f"{name}.delta"] = layer.delta
        if layer.delta_bias is not None:
            out[f"{name}.delta_bias"] = layer.delta_bias
    return out


def set_trainable(model: nn.Module, *, deltas: bool | Iterable[str] = True,
                  norms: bool = True, head: bool = True) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze the requested groups; return the trainable list.

    ``deltas`` is True (all), False (none) or an iterable of layer names.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    groups: dict[str, nn.Parameter] = {}
    if deltas is not False:
        groups.update(delta_parameters(model, None if deltas is True else deltas))
    if norms:
        groups.update(norm_parameters(model))
    if head:
        groups.update(head_parameters(model))
    for p in groups.values():
        p.requires_grad_(True)
    return list(groups.values())
