"""The classifier-head convention every backbone follows (timm's ``get_classifier()``).

The core never treats the head as a candidate layer and always trains it; these
functions find it. They live with the backbones so that ``swr.tasks`` needs nothing
from the core beyond its errors and atomic writers.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def head_module(model: nn.Module) -> Optional[nn.Module]:
    """The classifier head (timm's ``get_classifier()`` convention), or None."""
    get = getattr(model, "get_classifier", None)
    if get is None:
        return None
    head = get()
    return head if isinstance(head, nn.Module) else None


def head_names(model: nn.Module) -> set[str]:
    """Module paths of the head and everything inside it."""
    head = head_module(model)
    if head is None:
        return set()
    inside = {id(m) for m in head.modules()}
    return {name for name, m in model.named_modules() if id(m) in inside}


def head_prefix(model: nn.Module) -> Optional[str]:
    """Module path of the head itself (e.g. ``fc``, ``head.fc``)."""
    head = head_module(model)
    if head is None:
        return None
    for name, m in model.named_modules():
        if m is head:
            return name
    return None


class PooledClassifier(nn.Module):
    """The timm-style interface the keyword spotters share: ``forward_features`` (each
    network's own) gives pooled ``num_features``, ``head`` is a Linear on them, and
    ``pretrained_cfg`` names the expected input size and the classifier."""

    num_features: int

    def _init_head(self, architecture: str, in_chans: int, n_mels: int,
                   num_classes: int) -> None:
        self.num_classes = num_classes
        self.head: nn.Module = self._make_head(num_classes)
        # mirrors timm's pretrained_cfg so code written for timm models can read the
        # expected input size (log-mels of 101 frames) and the classifier's name
        self.pretrained_cfg = {"architecture": architecture,
                               "input_size": (in_chans, n_mels, 101),
                               "num_classes": num_classes, "first_conv": "stem.0",
                               "classifier": "head"}
        self.default_cfg = self.pretrained_cfg

    def _make_head(self, num_classes: int) -> nn.Module:
        """Linear classifier on the pooled features; ``0`` classes gives an identity."""
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        """The classification head (an ``nn.Linear``, or ``nn.Identity`` with 0 classes)."""
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a freshly initialised one for ``num_classes`` classes."""
        self.num_classes = num_classes
        self.head = self._make_head(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooled features -> logits (or the features themselves with ``pre_logits``)."""
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

