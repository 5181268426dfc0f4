"""LoRA (Hu et al., ICLR 2022) through Hugging Face ``peft``.

Every candidate Linear / Conv1d / Conv2d gets a rank-``r`` update ``scale * B @ A``
(``B`` zero-initialised, so training starts from the base model), trained with the
head; afterwards peft's ``merge_and_unload`` writes ``W + scale * B @ A`` into the
base weights, giving the base architecture back.

Grouped and depthwise convolutions (``groups > 1``) are left out: peft cannot merge
a LoRA update into them, and the task model must fold. On BC-ResNet this excludes
the depthwise frequency/temporal convolutions; the pointwise ones are adapted.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..errors import SwrError
from ..reparam import candidates, head_parameters
from .base import Method, fit_size, head_state, new_head, numel, register_method

# The kinds peft can merge; grouped/depthwise convs ("dwconv2d", "gconv2d", ...) are not.
_MERGEABLE_KINDS = ("linear", "conv1d", "conv2d")


def lora_targets(model: nn.Module) -> list[str]:
    """Names of the candidate layers LoRA adapts (candidates peft can merge into)."""
    return [c.name for c in candidates(model) if c.kind in _MERGEABLE_KINDS]


def rank_cost(layer: nn.Module) -> int:
    """Parameters one rank of LoRA adds to ``layer``: ``A`` (in x kernel) plus ``B`` (out)."""
    if isinstance(layer, nn.Linear):
        return layer.in_features + layer.out_features
    return layer.in_channels * math.prod(layer.kernel_size) + layer.out_channels


def _lora_modules(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    names = {m: n for n, m in model.named_modules()}
    out = {}
    for layer in _lora_modules(model):
        for part in (layer.lora_A, layer.lora_B):
            for key, p in part.named_parameters():
                out[f"{names[part]}.{key}"] = p
    return out


@register_method
@dataclass
class LoRA(Method):
    """Low-rank weight updates on the mergeable candidate layers, one rank for all.

    Knobs: ``rank`` (default: the largest rank whose LoRA parameters fit the
    budget) and ``alpha`` (default: equal to the rank, so ``scale = alpha / rank``
    is 1 whatever rank the budget allows). ``updated_params`` counts the ``A`` and
    ``B`` factors. Foldable by merging, within 1e-5 in fp32.
    """

    name = "lora"
    lr_family = "low-rank"
    tunables = {"rank": [None, 1, 2, 4]}
    foldable = True

    rank: Optional[int] = None
    alpha: Optional[float] = None

    def prepare(self, model: nn.Module, task, budget_params: Optional[int]) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        head = new_head(model, task)
        targets = lora_targets(model)
        if not targets:
            raise SwrError("method 'lora' found no Linear/Conv layer peft can merge into "
                           "outside the head")
        unit = sum(rank_cost(model.get_submodule(n)) for n in targets)
        self.rank = fit_size(self.name, "rank", unit, 0, budget_params, self.rank)
        if self.alpha is None:
            self.alpha = float(self.rank)
        # An anchored alternation of exact module paths: peft full-matches a string
        # pattern, so no other module whose name merely ends like a target is adapted.
        pattern = "^(" + "|".join(re.escape(n) for n in targets) + ")$"
        config = LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=0.0,
                            target_modules=pattern, bias="none")
        model = get_peft_model(model, config)
        # peft freezes everything but the LoRA factors; the new head trains too.
        for p in head:
            p.requires_grad_(True)
        return model

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return list(_lora_parameters(model).values()) + list(head_parameters(model).values())

    def updated_params(self, model: nn.Module) -> int:
        return numel(_lora_parameters(model).values())

    def stored_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        lora = {f"lora/{k}": p for k, p in _lora_parameters(model).items()}
        return {**lora, **head_state(model)}

    def fold(self, model: nn.Module) -> nn.Module:
        folded = copy.deepcopy(model).merge_and_unload().eval()
        for p in folded.parameters():
            p.requires_grad_(False)
        return folded
