"""The reparametrized layer: a frozen base layer, a zero-initialised delta and a gate.

    y = layer(x; W + g * dW, b + g * db)

``base_layer`` keeps the pre-trained module untouched (its parameters never train);
``delta`` has the weight's shape and starts at zero, so a freshly wrapped model
computes exactly what the base model computes. The gate ``g`` is a hard 0/1 per
layer; supernet training opens a random subset of gates per batch by setting the
gates from outside (see :mod:`swr.reparam`), never inside ``forward``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Module types that can be reparametrized, and the short kind name reported for each.
CANDIDATE_KINDS: dict[type, str] = {nn.Linear: "linear", nn.Conv1d: "conv1d", nn.Conv2d: "conv2d"}


def layer_kind(module: nn.Module) -> str:
    """Kind name of a candidate module: linear, conv1d, conv2d, dwconv2d, gconv2d, ..."""
    for cls, kind in CANDIDATE_KINDS.items():
        if type(module) is cls:
            if kind.startswith("conv") and module.groups > 1:
                depthwise = module.groups == module.in_channels
                return ("dw" if depthwise else "g") + kind
            return kind
    raise TypeError(f"{type(module).__name__} is not a reparametrizable layer")


def is_candidate(module: nn.Module) -> bool:
    """Exactly Linear / Conv1d / Conv2d (subclasses may change forward, so they are skipped)."""
    return type(module) in CANDIDATE_KINDS


class ReparamLayer(nn.Module):
    """A Linear/Conv1d/Conv2d with a learnable weight delta behind a hard gate.

    Args:
        base_layer: the pre-trained layer; its parameters are frozen.
        bias_delta: also learn a delta of the bias (when the layer has one).
    """

    def __init__(self, base_layer: nn.Module, bias_delta: bool = False):
        super().__init__()
        if not is_candidate(base_layer):
            raise TypeError(f"cannot reparametrize {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.kind = layer_kind(base_layer)
        for p in base_layer.parameters():
            p.requires_grad_(False)
        w = base_layer.weight
        self.delta = nn.Parameter(torch.zeros_like(w))
        has_bias = bias_delta and base_layer.bias is not None
        self.delta_bias = nn.Parameter(torch.zeros_like(base_layer.bias)) if has_bias else None
        # A plain float, not a buffer: gates are a selection, not task state, and a
        # Python branch on it lets a closed gate skip the weight addition entirely.
        self.gate: float = 0.0
        self.merged = False
        self._unmerged: tuple[torch.Tensor, torch.Tensor | None] | None = None

    # -- costs ---------------------------------------------------------------------
    @property
    def cost(self) -> int:
        """Updated parameters when this layer is reparametrized: numel of its deltas."""
        n = self.delta.numel()
        if self.delta_bias is not None:
            n += self.delta_bias.numel()
        return n

    # -- forward -------------------------------------------------------------------
    def effective_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W + g*dW, b + g*db)``: what the layer computes with, and what folding stores."""
        base = self.base_layer
        if self.merged or self.gate == 0.0:
            return base.weight, base.bias
        w = base.weight + self.gate * self.delta
        b = base.bias
        if self.delta_bias is not None:
            b = b + self.gate * self.delta_bias
        return w, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self.merged or self.gate == 0.0:
            return base(x)
        w, b = self.effective_weight()
        if isinstance(base, nn.Linear):
            return F.linear(x, w, b)
        return base._conv_forward(x, w, b)

    # -- merge / unmerge (in place, reversible) ------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Write ``W + g*dW`` into ``base_layer``; :meth:`unmerge` restores it exactly."""
        if self.merged:
            return
        base = self.base_layer
        w, b = self.effective_weight()
        # Keep the pre-merge tensors: subtracting the delta again would round.
        self._unmerged = (base.weight.detach().clone(),
                          None if base.bias is None else base.bias.detach().clone())
        base.weight.copy_(w)
        if b is not None:
            base.bias.copy_(b)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weights saved by :meth:`merge` (bit-exact)."""
        if not self.merged:
            return
        w, b = self._unmerged
        self.base_layer.weight.copy_(w)
        if b is not None:
            self.base_layer.bias.copy_(b)
        self._unmerged = None
        self.merged = False

    def extra_repr(self) -> str:
        return f"kind={self.kind}, gate={self.gate:g}, cost={self.cost}, merged={self.merged}"
