"""Norm tuning: tune the affine parameters of every norm layer (and re-estimate BN statistics)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..reparam import head_parameters, norm_parameters
from .base import (Method, frozen_copy, head_state, new_head, norm_state, numel, register_method,
                   train_only)


@register_method
@dataclass
class NormTuning(Method):
    """BatchNorm / LayerNorm / GroupNorm (SubSpectralNorm's inner BatchNorm) affines.

    ``updated_params`` is the number of affine elements (the budget is ignored);
    BatchNorm statistics are re-estimated on the task and stored with the affines.
    Foldable trivially: the task model is the base architecture.
    """

    name = "norm"
    lr_family = "norm"
    foldable = True
    respects_budget = False

    @property
    def trains_norms(self) -> bool:
        return True

    def prepare(self, model: nn.Module, task, budget_params: Optional[int]) -> nn.Module:
        head = new_head(model, task)
        train_only(model, list(norm_parameters(model).values()) + head)
        return model

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return list(norm_parameters(model).values()) + list(head_parameters(model).values())

    def updated_params(self, model: nn.Module) -> int:
        return numel(norm_parameters(model).values())

    def stored_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {**norm_state(model), **head_state(model)}

    def fold(self, model: nn.Module) -> nn.Module:
        return frozen_copy(model)
