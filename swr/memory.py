"""What one training step costs in memory, counted exactly and device-independently.

Backward needs the activations autograd saves in the forward pass; which ones depends on
what trains: a frozen prefix below the earliest trained layer saves nothing, one early
trained layer keeps the activations of every layer above it. :func:`training_memory`
counts the bytes saved for backward in one forward pass with
``torch.autograd.graph.saved_tensors_hooks``, each storage once (a ReLU's output saved
by it and by the next layer counts once) and the model's own parameters and buffers
left out (they are resident anyway), plus the trainable state an AdamW step adds: a
gradient and two moments per trained parameter.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

#: Tensors per trained parameter that training adds: its gradient and AdamW's two moments.
OPTIMIZER_COPIES = 3


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd saves for backward in one forward pass of ``model`` on ``x``:
    every saved storage once, the model's parameters and buffers left out."""
    resident = {t.untyped_storage().data_ptr()
                for t in [*model.parameters(), *model.buffers()] if t.numel()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in resident and storage.nbytes():
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(seen.values())


def training_memory(model: nn.Module, x: torch.Tensor,
                    trainable: Iterable[nn.Parameter]) -> dict:
    """One training step of ``model`` on batch ``x`` with ``trainable`` updated (their
    ``requires_grad`` set as the training sets it): ``saved_bytes`` (activations kept for
    backward), ``state_bytes`` (gradients and AdamW moments of the trained parameters)
    and their sum ``bytes``; ``batch`` is ``x``'s batch size."""
    was = model.training
    model.train()
    try:
        saved = saved_bytes(model, x)
    finally:
        model.train(was)
    state = OPTIMIZER_COPIES * sum(p.numel() * p.element_size() for p in trainable
                                   if p.requires_grad)
    return {"saved_bytes": saved, "state_bytes": state, "bytes": saved + state,
            "batch": int(x.shape[0])}


__all__ = ["OPTIMIZER_COPIES", "saved_bytes", "training_memory"]
