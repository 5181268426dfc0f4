"""Inference FLOPs of a model, as PyTorch's FlopCounterMode counts them."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_flops(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one eval-mode forward pass of ``model`` on ``example``.

    Counted by :class:`torch.utils.flop_counter.FlopCounterMode`: two per
    multiply-accumulate of matrix products, convolutions and attention;
    elementwise work (activations, norms, residual additions) is not counted.
    Pass a single-sample batch for per-sample FLOPs. The model's train/eval mode
    is restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(example)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
