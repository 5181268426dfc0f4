"""BitFit (Ben Zaken et al., 2022): tune only the bias terms of the backbone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..reparam import head_names, head_parameters
from .base import Method, frozen_copy, head_state, new_head, numel, register_method, train_only


def bias_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every module's own ``bias`` parameter outside the head (Linear, Conv, norm shifts).

    Found as the ``bias`` attribute each module registers, not by matching names:
    convolutions built without a bias (most convs that feed a norm) contribute
    nothing, and a norm's shift counts as the bias it is.
    """
    skip = head_names(model)
    out = {}
    for name, m in model.named_modules():
        if name in skip:
            continue
        bias = dict(m.named_parameters(recurse=False)).get("bias")
        if isinstance(bias, nn.Parameter):
            out[f"{name}.bias" if name else "bias"] = bias
    return out


@register_method
@dataclass
class BitFit(Method):
    """Biases only (those that exist); BatchNorm statistics stay the base ones.

    ``updated_params`` is the number of bias elements; the budget is ignored.
    Foldable trivially: the task model is the base architecture with new biases.
    """

    name = "bitfit"
    foldable = True
    respects_budget = False

    def prepare(self, model: nn.Module, task, budget_params: Optional[int]) -> nn.Module:
        head = new_head(model, task)
        train_only(model, list(bias_parameters(model).values()) + head)
        return model

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return list(bias_parameters(model).values()) + list(head_parameters(model).values())

    def updated_params(self, model: nn.Module) -> int:
        return numel(bias_parameters(model).values())

    def stored_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        biases = {f"bias/{k}": p for k, p in bias_parameters(model).items()}
        return {**biases, **head_state(model)}

    def fold(self, model: nn.Module) -> nn.Module:
        return frozen_copy(model)
