"""Two-stage PETL (Zhao et al., "Revisit Parameter-Efficient Transfer Learning: A
Two-Stage Paradigm", 2023).

Stage 1 tunes the norm layers' scale and shift (with the head) to move the
pre-trained feature distribution towards the task. Stage 2 ranks the output
channels of every candidate layer by first-order Taylor importance,

    importance(l, c) = | sum_{w in W_l[c]} w * dL/dw |

with the gradient of the mean training loss over a few batches (eval mode, so no
statistics move), and tunes weight deltas on the most important channels only:
channels are taken in order of importance while their weights fit the budget
left after the norms. A channel's delta is a row of a
:class:`~swr.layers.ReparamLayer` delta behind a fixed 0/1 channel mask, so the
task model folds with :func:`swr.fold.fold` into the base architecture.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BudgetError, SwrError
from ..fold import fold
from ..layers import ReparamLayer
from ..reparam import candidates, head_parameters, norm_parameters, replace_module
from ..train import TrainConfig, TrainResult, batches, resolve_device, train
from .base import Method, head_state, new_head, norm_state, numel, register_method, train_only


class ChannelReparamLayer(ReparamLayer):
    """A :class:`ReparamLayer` (gate open) whose delta is confined to chosen output channels.

    ``y = layer(x; W + mask * dW)`` with ``mask`` a fixed 0/1 vector over output
    channels; masked-out rows of ``dW`` get no gradient and stay zero.
    """

    def __init__(self, base_layer: nn.Module, channels: torch.Tensor):
        super().__init__(base_layer)
        mask = torch.zeros(base_layer.weight.shape[0], dtype=base_layer.weight.dtype,
                           device=base_layer.weight.device)
        mask[channels] = 1
        self.register_buffer("channel_mask", mask)
        self.gate = 1.0

    @property
    def channels(self) -> torch.Tensor:
        """Indices of the tuned output channels."""
        return self.channel_mask.nonzero().flatten()

    @property
    def tuned_params(self) -> int:
        """Delta elements that can change: the tuned channels' rows."""
        return int(self.channel_mask.sum()) * self.delta[0].numel()

    def effective_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        base = self.base_layer
        if self.merged or self.gate == 0.0:
            return base.weight, base.bias
        mask = self.channel_mask.view(-1, *([1] * (self.delta.dim() - 1)))
        return base.weight + self.gate * (mask * self.delta), base.bias


def channel_layers(model: nn.Module) -> dict[str, ChannelReparamLayer]:
    """The channel-masked layers of ``model`` by name, in network order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ChannelReparamLayer)}


def taylor_channel_importance(model: nn.Module, task, n_batches: int, batch_size: int,
                              device: torch.device) -> dict[str, torch.Tensor]:
    """``|sum_{w in channel} w * dL/dw|`` per output channel of every candidate layer.

    The gradient is that of the summed mean losses of ``n_batches`` training
    batches, taken in eval mode; nothing in ``model`` is left changed.
    """
    layers = {c.name: model.get_submodule(c.name) for c in candidates(model)}
    was_training = model.training
    saved_flags = {p: p.requires_grad for p in model.parameters()}
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers.values():
        layer.weight.requires_grad_(True)
        layer.weight.grad = None
    g = torch.Generator().manual_seed(0)
    try:
        for i, (x, y) in enumerate(batches(task.train, batch_size, shuffle=True, generator=g)):
            if i >= n_batches:
                break
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            loss.backward()
        # A layer the forward never reached has no gradient: it cannot matter to the loss.
        importance = {name: (layer.weight * layer.weight.grad).flatten(1).sum(1).abs().detach()
                      if layer.weight.grad is not None
                      else torch.zeros(layer.weight.shape[0], device=layer.weight.device)
                      for name, layer in layers.items()}
    finally:
        for layer in layers.values():
            layer.weight.grad = None
        for p, flag in saved_flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return importance


@register_method
@dataclass
class TwoStage(Method):
    """Norm tuning, then Taylor-selected channel deltas within the budget.

    Knobs: ``norm_epochs`` (stage 1; default ``max(1, epochs // 3)``, stage 2
    gets the rest, at least 1) and ``importance_batches``. The budget is required:
    the norm affines are charged to it first, the channels fill what is left.
    ``updated_params`` = norm affines + tuned channel rows. Foldable.
    """

    name = "two-stage"
    foldable = True

    norm_epochs: Optional[int] = None
    importance_batches: int = 8
    budget_params: Optional[int] = dataclasses.field(default=None, init=False)

    def __post_init__(self):
        if self.norm_epochs is not None and self.norm_epochs < 1:
            raise SwrError(f"two-stage: norm_epochs={self.norm_epochs} must be at least 1")
        if self.importance_batches < 1:
            raise SwrError(f"two-stage: importance_batches={self.importance_batches} must be "
                           "at least 1")

    @property
    def trains_norms(self) -> bool:
        return True

    def prepare(self, model: nn.Module, task, budget_params: Optional[int]) -> nn.Module:
        if budget_params is None:
            raise SwrError("method 'two-stage' selects channels to fill a budget; give "
                           "budget_params")
        head = new_head(model, task)
        norms = list(norm_parameters(model).values())
        if numel(norms) > budget_params:
            raise BudgetError(f"method 'two-stage' tunes {numel(norms)} norm parameters in "
                              f"stage 1, over the budget of {budget_params}; raise the budget")
        self.budget_params = budget_params
        train_only(model, norms + head)
        return model

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        deltas = [layer.delta for layer in channel_layers(model).values()]
        return deltas + list(norm_parameters(model).values()) + list(head_parameters(model).values())

    def fit(self, model: nn.Module, task, cfg: TrainConfig) -> TrainResult:
        stage1_epochs = self.norm_epochs or max(1, cfg.epochs // 3)
        stage2_epochs = max(1, cfg.epochs - stage1_epochs)
        first = train(model, task, self.trainable_parameters(model),
                      dataclasses.replace(cfg, epochs=stage1_epochs, desc=f"{cfg.desc} (norms)"))
        importance = taylor_channel_importance(model, task, self.importance_batches,
                                               cfg.batch_size, resolve_device(cfg.device))
        self._select_channels(model, importance)
        params = train_only(model, self.trainable_parameters(model))
        second = train(model, task, params,
                       dataclasses.replace(cfg, epochs=stage2_epochs,
                                           desc=f"{cfg.desc} (channels)"))
        return TrainResult(val_acc=second.val_acc, best_epoch=stage1_epochs + second.best_epoch,
                           seconds=first.seconds + second.seconds,
                           history=first.history + second.history)

    def _select_channels(self, model: nn.Module, importance: dict[str, torch.Tensor]) -> None:
        """Wrap each layer with at least one chosen channel in a ChannelReparamLayer."""
        left = self.budget_params - numel(norm_parameters(model).values())
        row_cost = {name: model.get_submodule(name).weight[0].numel() for name in importance}
        ranked = sorted(((float(v), name, c) for name, scores in importance.items()
                         for c, v in enumerate(scores.tolist())), reverse=True)
        chosen: dict[str, list[int]] = {}
        for _, name, channel in ranked:
            if row_cost[name] <= left:
                chosen.setdefault(name, []).append(channel)
                left -= row_cost[name]
        for name, channels in chosen.items():
            replace_module(model, name, ChannelReparamLayer(model.get_submodule(name),
                                                            torch.tensor(channels)))

    def updated_params(self, model: nn.Module) -> int:
        channels = sum(layer.tuned_params for layer in channel_layers(model).values())
        return numel(norm_parameters(model).values()) + channels

    def stored_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        rows = {}
        for name, layer in channel_layers(model).items():
            idx = layer.channels
            rows[f"channels/{name}.index"] = idx
            rows[f"channels/{name}.delta"] = layer.delta[idx]
        return {**rows, **norm_state(model), **head_state(model)}

    def fold(self, model: nn.Module) -> nn.Module:
        return fold(model)
