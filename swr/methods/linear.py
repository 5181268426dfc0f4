"""Linear probing: train only a new head on the frozen backbone's features."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..reparam import head_parameters
from ..train import TrainConfig, TrainResult, fit_head
from .base import Method, frozen_copy, head_state, new_head, register_method, train_only


@register_method
@dataclass
class LinearProbe(Method):
    """Head only. The backbone, BatchNorm statistics included, stays the base model.

    Updates no backbone parameter (``updated_params`` is 0) and ignores the budget;
    stores the head; the task model is the base model with the new head.
    """

    name = "linear"
    lr_family = "head"
    foldable = True
    respects_budget = False

    def prepare(self, model: nn.Module, task, budget_params: Optional[int]) -> nn.Module:
        train_only(model, new_head(model, task))
        return model

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return list(head_parameters(model).values())

    def fit(self, model: nn.Module, task, cfg: TrainConfig) -> TrainResult:
        """The head fitted on the frozen features (:func:`swr.train.fit_head`): the same
        solution SWR's stage 3 starts from, so SWR keeps it unless it beats it."""
        return fit_head(model, task, dataclasses.replace(cfg, weight_decay=0.0,
                                                         label_smoothing=0.0))

    def updated_params(self, model: nn.Module) -> int:
        return 0

    def stored_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return head_state(model)

    def fold(self, model: nn.Module) -> nn.Module:
        return frozen_copy(model)
