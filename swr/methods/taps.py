"""TAPS: Task-Adaptive Parameter Sharing (Wallingford et al., CVPR 2022).

Every candidate layer ``l`` gets a weight delta ``dW_l`` and a learned scalar score
``s_l``; the layer computes with ``W_l + I(s_l > tau) * dW_l``. The indicator's
gradient is passed straight through to ``s_l`` (``d loss / d s_l = <dL/dW, dW_l>``),
and a sparsity penalty pushes scores down:

    loss = task loss + penalty * sum_l (cost_l / total cost) * |s_l|

so a layer stays adapted only while its delta pays for its size. This is SWR's
``W + g * dW`` with the gate learned jointly instead of chosen by a policy, so the
layers subclass :class:`~swr.layers.ReparamLayer` and fold with :func:`swr.fold.fold`.

TAPS alone does not hit a given budget. After training, the layers above the
threshold are kept in order of score while they fit the budget (``finalize``);
when that closes a gate that was open, the kept deltas are re-trained briefly
with the selection fixed, since they were trained alongside the dropped ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ..budget import split_budget
from ..errors import SwrError
from ..fold import fold
from ..layers import ReparamLayer
from ..reparam import (candidates, delta_parameters, head_parameters, norm_parameters,
                       reparam_layers, replace_module)
from ..train import TrainConfig, TrainResult, train
from .base import Method, head_state, new_head, norm_state, numel, register_method, train_only


class ScoredReparamLayer(ReparamLayer):
    """A :class:`ReparamLayer` whose gate is ``I(score > threshold)`` while scoring.

    While ``scoring`` the gate is a straight-through estimate: forward uses the hard
    0/1 value, backward treats it as the identity in ``score``. After
    :meth:`fix_gate` it is a plain ReparamLayer with a hard float gate.
    """

    def __init__(self, base_layer: nn.Module, threshold: float, init_score: float):
        super().__init__(base_layer)
        self.threshold = threshold
        self.score = nn.Parameter(torch.tensor(float(init_score),
                                               device=base_layer.weight.device))
        self.scoring = True
        # ReparamLayer.forward skips effective_weight for a closed float gate; keep the
        # float open while scoring so the learned gate is always evaluated.
        self.gate = 1.0

    @property
    def is_open(self) -> bool:
        """Whether the layer's delta is in use now (by score while scoring, else by gate)."""
        return bool(self.score.detach() > self.threshold) if self.scoring else self.gate != 0.0

    def effective_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.scoring:
            return super().effective_weight()
        hard = (self.score > self.threshold).to(self.delta.dtype)
        gate = hard + self.score - self.score.detach()  # value: hard; gradient: to score
        return self.base_layer.weight + gate * self.delta, self.base_layer.bias

    def fix_gate(self, open_: bool) -> None:
        """Stop scoring; the gate becomes a hard ``1.0`` or ``0.0``."""
        self.scoring = False
        self.gate = 1.0 if open_ else 0.0

    def extra_repr(self) -> str:
        return super().extra_repr() + f", score={float(self.score.detach()):.3g}, scoring={self.scoring}"


def scored_layers(model: nn.Module) -> dict[str, ScoredReparamLayer]:
    """The TAPS layers of ``model`` by name, in network order."""
    return {n: m for n, m in reparam_layers(model).items() if isinstance(m, ScoredReparamLayer)}


@register_method
@dataclass
class TAPS(Method):
    """Learned per-layer gates with a cost-weighted sparsity penalty, then a budget cut.

    Knobs: ``penalty`` (lambda), ``threshold`` (tau), ``init_score`` (all layers
    start open), ``norms`` (train task norms beside the deltas, as SWR does; they
    are charged to the budget first, as SWR's ``norms="auto"``: when they leave no
    room for a layer's delta, they are not trained) and ``retrain_epochs``
    (after the budget cut; default ``max(1, epochs // 4)`` when the cut closed a
    gate that training left open, else 0).

    ``updated_params`` is the delta size of the open layers plus the trained norms
    (``norm_params``). Foldable with :func:`swr.fold.fold`, bit-for-bit the
    arithmetic of the forward.
    """

    name = "taps"
    tunables = {"penalty": [0.1, 1.0, 10.0]}
    foldable = True

    penalty: float = 1.0
    threshold: float = 0.1
    init_score: float = 1.0
    norms: bool = True
    retrain_epochs: Optional[int] = None
    budget_params: Optional[int] = dataclasses.field(default=None, init=False)
    #: filled by ``prepare``: whether the task norms train (they may not fit the budget)
    norms_trained: Optional[bool] = dataclasses.field(default=None, init=False)

    def __post_init__(self):
        if not self.penalty >= 0:
            raise SwrError(f"taps: penalty={self.penalty} must be non-negative")
        if self.retrain_epochs is not None and self.retrain_epochs < 0:
            raise SwrError(f"taps: retrain_epochs={self.retrain_epochs} must be non-negative")

    @property
    def trains_norms(self) -> bool:
        return self.norms if self.norms_trained is None else self.norms_trained

    def norms_accounting(self) -> str:
        if not self.norms:
            return "none"
        return "auto:none" if self.norms_trained is False else "auto"

    def prepare(self, model: nn.Module, task, budget_params: Optional[int]) -> nn.Module:
        if not candidates(model):
            raise SwrError("method 'taps' found no Linear/Conv layer outside the head to adapt")
        new_head(model, task)
        self.budget_params = budget_params
        self.norms_trained = self.norms
        if self.norms and budget_params is not None:
            _, self.norms_trained, _ = split_budget(
                budget_params, numel(norm_parameters(model).values()), "auto",
                min_delta=min(c.params for c in candidates(model)))
        for c in candidates(model):
            replace_module(model, c.name, ScoredReparamLayer(model.get_submodule(c.name),
                                                             self.threshold, self.init_score))
        train_only(model, self.trainable_parameters(model))
        return model

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        layers = scored_layers(model)
        scoring = any(layer.scoring for layer in layers.values())
        if scoring:
            params = [p for layer in layers.values() for p in (layer.delta, layer.score)]
        else:
            params = list(delta_parameters(model, [n for n, m in layers.items() if m.is_open])
                          .values())
        if self.trains_norms:
            params += list(norm_parameters(model).values())
        return params + list(head_parameters(model).values())

    def regularizer(self, model: nn.Module) -> Callable[[], torch.Tensor]:
        layers = list(scored_layers(model).values())
        weights = torch.tensor([layer.cost for layer in layers], dtype=torch.float32)
        weights = weights / weights.sum()

        def sparsity() -> torch.Tensor:
            scores = torch.stack([layer.score for layer in layers])
            return self.penalty * (weights.to(scores) * scores.abs()).sum()

        return sparsity

    def fit(self, model: nn.Module, task, cfg: TrainConfig) -> TrainResult:
        result = train(model, task, self.trainable_parameters(model), cfg,
                       before_batch=self.before_batch(model), regularizer=self.regularizer(model))
        closed_open_gate = self.finalize(model)
        epochs = self.retrain_epochs
        if epochs is None:
            epochs = max(1, cfg.epochs // 4) if closed_open_gate else 0
        if epochs == 0:
            return result
        params = train_only(model, self.trainable_parameters(model))
        again = train(model, task, params, dataclasses.replace(cfg, epochs=epochs,
                                                               desc=f"{cfg.desc} (retrain)"),
                      before_batch=self.before_batch(model))
        return TrainResult(val_acc=again.val_acc, best_epoch=result.best_epoch + again.best_epoch,
                           seconds=result.seconds + again.seconds,
                           history=result.history + again.history)

    def finalize(self, model: nn.Module) -> bool:
        """Fix the gates: keep layers above the threshold, highest score first, within budget.

        Returns whether the budget closed a gate that the scores had open.
        """
        layers = scored_layers(model)
        by_score = sorted(layers.items(), key=lambda item: float(item[1].score.detach()), reverse=True)
        left = self.budget_params
        if left is not None:  # the trained norms were charged first
            left -= self.norm_params(model)
        keep = set()
        for name, layer in by_score:
            if not layer.is_open:
                continue
            if left is None or layer.cost <= left:
                keep.add(name)
                left = None if left is None else left - layer.cost
        closed_open_gate = any(layer.is_open and name not in keep
                               for name, layer in layers.items())
        for name, layer in layers.items():
            layer.fix_gate(name in keep)
        return closed_open_gate

    def updated_params(self, model: nn.Module) -> int:
        deltas = sum(layer.cost for layer in scored_layers(model).values() if layer.is_open)
        return deltas + self.norm_params(model)

    def norm_params(self, model: nn.Module) -> int:
        return numel(norm_parameters(model).values()) if self.trains_norms else 0

    def stored_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        deltas = {f"delta/{name}.weight": layer.delta
                  for name, layer in scored_layers(model).items() if layer.is_open}
        norms = norm_state(model) if self.trains_norms else {}
        return {**deltas, **norms, **head_state(model)}

    def fold(self, model: nn.Module) -> nn.Module:
        return fold(model)
