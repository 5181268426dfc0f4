"""What one training step costs in memory, counted exactly and device-independently.

Backward needs the activations autograd saves in the forward pass; which ones depends on
what trains: a frozen prefix below the earliest trained layer saves nothing, one early
trained layer keeps the activations of every layer above it. :func:`training_memory`
counts the bytes saved for backward in one forward pass with
``torch.autograd.graph.saved_tensors_hooks``, each storage once (a ReLU's output saved
by it and by the next layer counts once) and the model's own parameters and buffers
left out (they are resident anyway), plus the trainable state an AdamW step adds: a
gradient and two moments per trained parameter.

A search under a training-memory budget asks for the saved bytes of many selections,
too many to measure each. :class:`MemoryCost` answers them from a few measurements:
which storages autograd saves when one layer alone trains (:func:`saved_storages`, keyed
by content so that passes can be compared), for each layer. A selection saves what any
of its layers would save alone (an op saves its tensors when any input needs a gradient),
so its bytes are those of the union of its layers' sets. :class:`MemoryLimit` is such a
cost with a budget in bytes, which searchers ask whether a selection still fits.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

#: Tensors per trained parameter that training adds: its gradient and AdamW's two moments.
OPTIMIZER_COPIES = 3


def _saved(model: nn.Module, x: torch.Tensor,
           key: Callable[[torch.UntypedStorage], object]) -> dict:
    """``{key(storage): bytes}`` of every storage autograd saves in one forward pass of
    ``model`` on ``x``, each once, the model's parameters and buffers left out."""
    resident = {t.untyped_storage().data_ptr()
                for t in [*model.parameters(), *model.buffers()] if t.numel()}
    seen: dict[int, tuple[object, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        # a storage is keyed when first saved: its content then is what it holds
        if ptr not in resident and storage.nbytes() and ptr not in seen:
            seen[ptr] = (key(storage), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return dict(seen.values())


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd saves for backward in one forward pass of ``model`` on ``x``:
    every saved storage once, the model's parameters and buffers left out."""
    return sum(_saved(model, x, lambda storage: storage.data_ptr()).values())


def _content(storage: torch.UntypedStorage) -> bytes:
    raw = torch.empty(0, dtype=torch.uint8, device=storage.device)
    raw.set_(storage, 0, (storage.nbytes(),))
    return hashlib.blake2b(raw.cpu().numpy().tobytes(), digest_size=16).digest()


def saved_storages(model: nn.Module, x: torch.Tensor, seed: int = 0) -> dict[tuple, int]:
    """What :func:`saved_bytes` counts, storage by storage: ``{key: bytes}``, a storage's
    key its content digest and how many storages of the same content this pass saved
    before it (two copies of one tensor are two storages).

    Two passes over the same ``x`` with the same weights compute the same activations,
    so a storage both save has the same key in both, whichever parameters train; random
    draws (dropout) are made from ``seed`` in every pass for the same reason. Weights
    that make distinct activations equal (a zero-initialised residual branch adds
    nothing) make distinct storages look alike: measure on perturbed weights
    (:func:`perturb_weights`)."""
    count: dict[bytes, int] = {}

    def key(storage: torch.UntypedStorage) -> tuple:
        digest = _content(storage)
        count[digest] = count.get(digest, -1) + 1
        return digest, count[digest]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _saved(model, x, key)


@torch.no_grad()
def perturb_weights(model: nn.Module, skip: Callable[[str], bool] = lambda name: False,
                    scale: float = 1e-2, seed: int = 0) -> None:
    """Add Gaussian noise of ``scale`` to every floating parameter of ``model`` whose name
    ``skip`` does not match (in place): what a step saves depends on shapes, not values,
    and noise makes activations that equal weights would make alike differ."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.is_floating_point() and not skip(name):
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device))


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


@dataclass(frozen=True)
class MemoryCost:
    """The bytes a training step saves for backward, for any selection of candidate layers.

    Storages are grouped into segments: ``member[i, p]`` says whether segment ``p`` is
    saved when layer ``i`` (of ``names``, in network order) trains; ``head`` and ``norms``
    what training the head, and the task norms, save; ``weights[p]`` its bytes. A
    selection saves the union of its layers' segments and those of the head (and of the
    norms when ``norms_trained``). ``full_bytes`` is full fine-tuning's saved bytes (the
    reference of a budget given as a percentage); ``batch`` the batch size all are for.
    """

    names: tuple[str, ...]
    member: np.ndarray
    head: np.ndarray
    norms: np.ndarray
    weights: np.ndarray
    full_bytes: int
    batch: int
    norms_trained: bool = False

    @classmethod
    def from_storages(cls, names: Sequence[str],
                      passes: Sequence[tuple[float, dict, dict, Sequence[dict]]],
                      full_bytes: int, batch: int) -> "MemoryCost":
        """The cost from measured storage sets: ``passes`` are ``(coefficient, head, norms,
        per layer)``, each set ``{key: bytes}`` as :func:`saved_storages` gives them. The
        bytes of a selection are the sum over passes of coefficient x the bytes of its
        union in that pass: one pass at the training batch with coefficient 1, or two
        smaller batches combined linearly (saved bytes are affine in the batch size)."""
        columns: list[np.ndarray] = []
        weights: list[float] = []
        for coef, head, norms, layers in passes:
            keys = list(dict.fromkeys([*head, *norms, *(k for layer in layers for k in layer)]))
            index = {k: j for j, k in enumerate(keys)}
            rows = np.zeros((len(layers) + 2, len(keys)), dtype=bool)
            for r, found in enumerate([head, norms, *layers]):
                rows[r, [index[k] for k in found]] = True
            size = {}
            for found in (head, norms, *layers):
                size.update(found)
            columns.append(rows)
            weights += [coef * size[k] for k in keys]
        rows = np.concatenate(columns, axis=1)
        # storages saved by the same layers are one segment: a few per layer remain
        patterns, inverse = np.unique(rows.T, axis=0, return_inverse=True)
        merged = np.bincount(inverse.ravel(), weights=np.asarray(weights, dtype=np.float64),
                             minlength=len(patterns))
        patterns = patterns.T
        return cls(tuple(names), patterns[2:], patterns[0], patterns[1], merged,
                   int(full_bytes), int(batch))

    def for_norms(self, trained: bool) -> "MemoryCost":
        """This cost with the task norms trained beside the selection, or not."""
        return replace(self, norms_trained=bool(trained))

    def start(self) -> np.ndarray:
        """The segments the empty selection saves (the head's, and the norms' if trained)."""
        return self.head | self.norms if self.norms_trained else self.head.copy()

    def covered(self, mask: np.ndarray) -> np.ndarray:
        """The segments selection ``mask`` (one boolean per layer) saves."""
        mask = np.asarray(mask, dtype=bool)
        return self.start() | self.member[mask].any(axis=0)

    def bytes_of(self, covered: np.ndarray) -> int:
        """The bytes of a set of segments."""
        return int(round(float(self.weights @ covered)))

    def saved_bytes(self, mask: np.ndarray) -> int:
        """The bytes selection ``mask`` saves for backward."""
        return self.bytes_of(self.covered(mask))

    def layer_bytes(self) -> np.ndarray:
        """The bytes each layer saves when it alone is selected."""
        start = self.start()
        return np.array([self.bytes_of(start | row) for row in self.member], dtype=np.int64)


@dataclass(frozen=True)
class MemoryLimit:
    """A :class:`MemoryCost` with a budget of ``budget`` saved bytes (``label``: as given)."""

    cost: MemoryCost
    budget: int
    label: str = ""

    def fits(self, mask: np.ndarray) -> bool:
        """Whether selection ``mask`` saves at most the budget."""
        return self.cost.saved_bytes(mask) <= self.budget

    def fits_adding(self, covered: np.ndarray, i: int) -> bool:
        """Whether a selection saving ``covered`` still fits with layer ``i`` added."""
        return self.cost.bytes_of(covered | self.cost.member[i]) <= self.budget

    def repair(self, mask: np.ndarray) -> np.ndarray:
        """``mask`` with its earliest selected layers dropped until it fits: the earliest
        layer decides how far down backward must keep activations."""
        mask = np.array(mask, dtype=bool)
        for i in np.flatnonzero(mask):
            if self.fits(mask):
                break
            mask[i] = False
        return mask

    def fitting(self, masks: np.ndarray) -> np.ndarray:
        """Which rows of ``masks`` ``(N, layers)`` fit."""
        masks = np.asarray(masks, dtype=bool)
        if not len(masks):
            return np.zeros(0, dtype=bool)
        cov = self.cost.start() | (masks.astype(np.int64) @ self.cost.member.astype(np.int64) > 0)
        return np.rint(cov.astype(np.float64) @ self.cost.weights) <= self.budget


__all__ = ["OPTIMIZER_COPIES", "MemoryCost", "MemoryLimit", "perturb_weights", "saved_bytes",
           "saved_storages", "training_memory"]
