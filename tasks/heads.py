"""The classifier-head convention every backbone follows (timm's ``get_classifier()``).

The core never treats the head as a candidate layer and always trains it; these
functions find it. They live with the backbones so that ``swr.tasks`` needs nothing
from the core beyond its errors and atomic writers.
"""

from __future__ import annotations

from typing import Optional

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
