"""SSF: scaling and shifting features (Lian, Zhou, Feng, Wang, NeurIPS 2022).

Every candidate layer's output gets a learnable per-channel scale ``gamma`` (init 1)
and shift ``beta`` (init 0): ``y = gamma * layer(x) + beta``. Both fold into the layer
(``W' = gamma * W``, ``b' = gamma * b + beta``), so the task model is the base
architecture and inference costs nothing extra.

A shift can only fold into a bias the layer already has: bias-free layers (in CNNs,
the convolutions that feed a norm) get the scale alone, because adding a bias would
change the base architecture. Their outputs are normalised next anyway, where a
shift before a norm is largely absorbed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..errors import BudgetError
from ..reparam import candidates, head_parameters, replace_module
from .base import Method, head_state, new_head, numel, register_method, train_only


class SSFLayer(nn.Module):
    """A frozen candidate layer followed by a per-output-channel scale (and shift)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        channels = base_layer.weight.shape[0]
        w = base_layer.weight
        self.scale = nn.Parameter(torch.ones(channels, dtype=w.dtype, device=w.device))
        self.shift = (nn.Parameter(torch.zeros_like(base_layer.bias))
                      if base_layer.bias is not None else None)
        # Linear layers keep features last; convolutions put channels at dim 1.
        self.channel_dim = -1 if isinstance(base_layer, nn.Linear) else 1

    def _view(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shape = [1] * y.dim()
        shape[self.channel_dim] = -1
        return t.view(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        y = y * self._view(self.scale, y)
        if self.shift is not None:
            y = y + self._view(self.shift, y)
        return y

    @torch.no_grad()
    def folded(self) -> nn.Module:
        """The base layer with the scale and shift written into its weight and bias."""
        base = self.base_layer
        w = base.weight * self.scale.view(-1, *([1] * (base.weight.dim() - 1)))
        base.weight.copy_(w)
        if base.bias is not None:
            base.bias.copy_(base.bias * self.scale + self.shift)
        return base


def ssf_layers(model: nn.Module) -> dict[str, SSFLayer]:
    """The SSF-wrapped layers of ``model`` by name, in network order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SSFLayer)}


@register_method
@dataclass
class SSF(Method):
    """Per-channel scale (+ shift where a bias exists) after every candidate layer.

    ``updated_params`` counts the scales and shifts. When they do not all fit the
    budget, the layers nearest the head are kept first (the task-specific end of
    the network), skipping any that no longer fit; a budget below every layer's
    cost is refused. Foldable exactly into the base architecture.
    """

    name = "ssf"
    foldable = True

    def prepare(self, model: nn.Module, task, budget_params: Optional[int]) -> nn.Module:
        head = new_head(model, task)
        chosen = self._fit(model, budget_params)
        for name in chosen:
            replace_module(model, name, SSFLayer(model.get_submodule(name)))
        train_only(model, self._ssf_parameters(model) + head)
        return model

    @staticmethod
    def _fit(model: nn.Module, budget_params: Optional[int]) -> list[str]:
        layers = [(c.name, model.get_submodule(c.name)) for c in candidates(model)]
        costs = {n: m.weight.shape[0] * (2 if m.bias is not None else 1) for n, m in layers}
        if budget_params is None or sum(costs.values()) <= budget_params:
            return list(costs)
        chosen, left = [], budget_params
        for name in reversed(list(costs)):
            if costs[name] <= left:
                chosen.append(name)
                left -= costs[name]
        if not chosen:
            raise BudgetError(f"method 'ssf' needs at least {min(costs.values())} parameters "
                              f"for one layer, over the budget of {budget_params}")
        return chosen[::-1]

    @staticmethod
    def _ssf_parameters(model: nn.Module) -> list[nn.Parameter]:
        return [p for layer in ssf_layers(model).values()
                for p in (layer.scale, layer.shift) if p is not None]

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return self._ssf_parameters(model) + list(head_parameters(model).values())

    def updated_params(self, model: nn.Module) -> int:
        return numel(self._ssf_parameters(model))

    def stored_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        out = {}
        for name, layer in ssf_layers(model).items():
            out[f"ssf/{name}.scale"] = layer.scale
            if layer.shift is not None:
                out[f"ssf/{name}.shift"] = layer.shift
        return {**out, **head_state(model)}

    def fold(self, model: nn.Module) -> nn.Module:
        folded = copy.deepcopy(model).eval()
        for name, layer in ssf_layers(folded).items():
            replace_module(folded, name, layer.folded())
        for p in folded.parameters():
            p.requires_grad_(False)
        return folded
