"""Full fine-tuning: every parameter trains; the task model is a whole new model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..budget import backbone_params
from .base import Method, frozen_copy, new_head, register_method, train_only


@register_method
@dataclass
class FullFineTune(Method):
    """All parameters train and BatchNorm statistics update.

    ``updated_params`` is every backbone parameter (the budget is ignored); the
    stored task model is the whole state dict, buffers included.
    """

    name = "full"
    lr_family = "full"
    foldable = True
    respects_budget = False

    @property
    def trains_norms(self) -> bool:
        return True

    def prepare(self, model: nn.Module, task, budget_params: Optional[int]) -> nn.Module:
        new_head(model, task)
        train_only(model, model.parameters())
        return model

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return list(model.parameters())

    def updated_params(self, model: nn.Module) -> int:
        return backbone_params(model)

    def stored_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return dict(model.state_dict())

    def fold(self, model: nn.Module) -> nn.Module:
        return frozen_copy(model)
