"""Bottleneck adapters in U-Tuning's parallel and sequential forms.

U-Tuning (Jiang et al., "Rethinking Efficient Tuning Methods from a Unified
Perspective", 2023) writes adapters as a frozen operation ``block`` plus a small
tuner ``A`` (down-projection, GELU, zero-initialised up-projection):

* parallel (``adapter-par``):   ``y = block(x) + A(x)``
* sequential (``adapter-seq``): ``y = block(x) + A(block(x))``

Adapters attach to the backbone's repeated blocks: the elements of an
``nn.Sequential`` / ``nn.ModuleList`` whose members are all of one model-defined
class holding candidate layers (timm ViT ``blocks.*``, ResNet ``layer*.*``,
ConvNeXt ``stages.*.blocks.*``, BC-ResNet ``stages.*.*``); where such blocks
nest, the innermost are used. Token blocks ``(B, N, D)`` get Linear adapters;
NCHW feature-map blocks get 1x1-conv adapters, and a parallel adapter on a
block that changes resolution strides its down-projection to match.

The adapters stay in the task model: not foldable, and their FLOPs are extra.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from ..errors import SwrError
from ..layers import is_candidate
from ..reparam import head_names, head_parameters, replace_module
from ..train import batches
from .base import Method, fit_size, head_state, new_head, numel, register_method, train_only


class Bottleneck(nn.Module):
    """down-projection -> GELU -> up-projection (zero-initialised, so ``A(x) = 0`` at first)."""

    def __init__(self, in_channels: int, out_channels: int, width: int, spatial: bool,
                 stride: tuple[int, int] = (1, 1)):
        super().__init__()
        if spatial:
            self.down = nn.Conv2d(in_channels, width, 1, stride=stride)
            self.up = nn.Conv2d(width, out_channels, 1)
        else:
            self.down = nn.Linear(in_channels, width)
            self.up = nn.Linear(width, out_channels)
        self.act = nn.GELU()
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


class AdaptedBlock(nn.Module):
    """A frozen block with a bottleneck adapter beside it (parallel) or after it (sequential)."""

    def __init__(self, block: nn.Module, adapter: Bottleneck, parallel: bool):
        super().__init__()
        self.block = block
        self.adapter = adapter
        self.parallel = parallel

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.block(x, *args, **kwargs)
        return y + self.adapter(x if self.parallel else y)


def repeated_blocks(model: nn.Module) -> list[str]:
    """Module paths of the backbone's repeated blocks (see the module docstring)."""
    skip = head_names(model)
    found = []
    for name, m in model.named_modules():
        if name in skip or not isinstance(m, (nn.Sequential, nn.ModuleList)) or len(m) == 0:
            continue
        kinds = {type(child) for child in m}
        if len(kinds) != 1:
            continue
        kind = kinds.pop()
        # torch.nn's own containers/layers are not blocks; a block must hold weights to adapt.
        if kind.__module__.startswith("torch.nn"):
            continue
        if not any(is_candidate(sub) for sub in next(iter(m)).modules()):
            continue
        found += [f"{name}.{i}" if name else str(i) for i in range(len(m))]
    # Keep the innermost blocks: drop any block that contains another found block.
    return [b for b in found if not any(o.startswith(b + ".") for o in found)]


def _block_shapes(model: nn.Module, blocks: list[str], example: torch.Tensor
                  ) -> dict[str, tuple[Optional[torch.Size], Optional[torch.Size]]]:
    """(input shape, output shape) of each block, measured by running ``example``."""
    inputs: dict[str, torch.Size] = {}
    outputs: dict[str, torch.Size] = {}

    def recorder(block: str):
        def record(module, args, out):
            inputs[block] = args[0].shape
            outputs[block] = out.shape
        return record

    handles = [model.get_submodule(b).register_forward_hook(recorder(b)) for b in blocks]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {b: (inputs.get(b), outputs.get(b)) for b in blocks}


@dataclass
class _AdapterPlan:
    """One block's adapter before the width is known."""

    block: str
    in_channels: int
    out_channels: int
    spatial: bool
    stride: tuple[int, int]


def _plan(model: nn.Module, block: str,
          shapes: tuple[Optional[torch.Size], Optional[torch.Size]],
          parallel: bool) -> _AdapterPlan:
    x, y = shapes
    if x is None or y is None:
        raise SwrError(f"adapter: block {block} did not run in the forward pass")
    mod = model.get_submodule(block)
    if len(x) == 3 and len(y) == 3:  # tokens (B, N, D): features last
        if parallel and x[1] != y[1]:
            raise SwrError(f"adapter-par: block {block} changes the token count "
                           f"({x[1]} -> {y[1]})")
        src = x[-1] if parallel else y[-1]
        return _AdapterPlan(block, src, y[-1], False, (1, 1))
    if len(x) == 4 and len(y) == 4:
        # A block of Linear layers only on a 4-D tensor is channels-last (e.g. Swin):
        # a 1x1 conv over dim 1 would mix the wrong axis.
        if not any(isinstance(m, nn.Conv2d) for m in mod.modules()):
            raise SwrError(f"adapter: block {block} maps 4-D tensors without convolutions "
                           "(channels-last layout?); only NCHW feature maps are supported")
        if not parallel:
            return _AdapterPlan(block, y[1], y[1], True, (1, 1))
        stride = tuple(max(1, round(a / b)) for a, b in zip(x[2:], y[2:]))
        return _AdapterPlan(block, x[1], y[1], True, stride)
    raise SwrError(f"adapter: block {block} maps shape {tuple(x)} to {tuple(y)}; adapters "
                   "need token (B, N, D) or feature-map (B, C, H, W) blocks")


def _adapters(model: nn.Module) -> dict[str, AdaptedBlock]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedBlock)}


@register_method
@dataclass
class Adapter(Method):
    """A bottleneck adapter of ``width`` channels on every repeated block.

    ``width`` defaults to the largest that fits the budget: the adapters cost
    ``width * sum(in + 1 + out) + sum(out)`` parameters (weights and biases of both
    projections). ``updated_params`` counts all adapter parameters. Not foldable.
    """

    name = "adapter-par"
    lr_family = "adapter"
    tunables = {"width": [None, 2, 4, 8]}
    #: Parallel (``block(x) + A(x)``) or sequential (``block(x) + A(block(x))``).
    parallel: ClassVar[bool] = True

    width: Optional[int] = None

    def prepare(self, model: nn.Module, task, budget_params: Optional[int]) -> nn.Module:
        head = new_head(model, task)
        blocks = repeated_blocks(model)
        if not blocks:
            raise SwrError(f"method {self.name!r} found no repeated blocks in "
                           f"{type(model).__name__} to attach adapters to")
        example = next(batches(task.train, 2))[0].to(next(model.parameters()).device)
        shapes = _block_shapes(model, blocks, example)
        plans = [_plan(model, b, shapes[b], self.parallel) for b in blocks]
        unit = sum(p.in_channels + 1 + p.out_channels for p in plans)
        fixed = sum(p.out_channels for p in plans)
        self.width = fit_size(self.name, "width", unit, fixed, budget_params, self.width)
        ref = next(model.parameters())
        for p in plans:
            adapter = Bottleneck(p.in_channels, p.out_channels, self.width, p.spatial, p.stride)
            adapter.to(device=ref.device, dtype=ref.dtype)
            replace_module(model, p.block,
                           AdaptedBlock(model.get_submodule(p.block), adapter, self.parallel))
        train_only(model, self._adapter_parameters(model) + head)
        return model

    @staticmethod
    def _adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
        return [p for block in _adapters(model).values() for p in block.adapter.parameters()]

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return self._adapter_parameters(model) + list(head_parameters(model).values())

    def updated_params(self, model: nn.Module) -> int:
        return numel(self._adapter_parameters(model))

    def stored_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        out = {f"adapter/{name}.adapter.{k}": t for name, block in _adapters(model).items()
               for k, t in block.adapter.state_dict().items()}
        return {**out, **head_state(model)}


@register_method
@dataclass
class SequentialAdapter(Adapter):
    """The sequential form: ``y = block(x) + A(block(x))`` (see :class:`Adapter`)."""

    name = "adapter-seq"
    parallel: ClassVar[bool] = False
