"""WiSE-FT: interpolate the weights of the pre-trained and the fully fine-tuned model.

The pre-trained end point keeps the whole backbone and needs a head for the task's
classes: it is the linear probe (phase 1). The fine-tuned end point starts from that
probe and trains everything (phase 2, LP-FT), so both ends share the head's
coordinates and the line between them is meaningful. The mixing weight ``alpha``
(0 = probe, 1 = fine-tuned) is chosen on validation from ``alphas``; the accuracies
of every point on test and ``shift_test`` are kept in the run's settings, so one run
draws the whole in-distribution vs shift trade-off.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from ..errors import SwrError
from ..reparam import head_parameters
from ..robustness import interpolate
from ..train import TrainConfig, TrainResult, evaluate, train
from .base import freeze_batchnorm, frozen_copy, register_method, train_only
from .full import FullFineTune


@register_method
@dataclass
class WiSEFT(FullFineTune):
    """Linear probe, then full fine-tune from it, then the best interpolation on validation.

    Knobs: ``alphas`` (the grid of mixing weights), ``probe_epochs`` (phase 1; default
    a third of the epochs, at least 1; phase 2 gets the rest) and ``probe_lr``
    (phase 1's learning rate; default ten times the fine-tuning rate, as a head
    alone likes larger steps; ``swr bench`` gives it the linear probe's rate).
    Ignores the budget: every backbone weight may change.
    """

    name = "wise-ft"
    lr_family = "default"  # not full fine-tuning's: it starts from a probe
    lr_knobs = {"probe_lr": "head"}  # its probe phase trains what the linear probe trains

    alphas: list = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    probe_epochs: Optional[int] = None
    probe_lr: Optional[float] = None
    #: filled by ``fit``: the chosen weight and every grid point's accuracies
    alpha: Optional[float] = field(default=None, init=False)
    curve: list = field(default_factory=list, init=False)

    def prepare(self, model: nn.Module, task, budget_params: Optional[int]) -> nn.Module:
        if not self.alphas or any(not 0.0 <= float(a) <= 1.0 for a in self.alphas):
            raise SwrError(f"method 'wise-ft': alphas {self.alphas!r} must be weights in [0, 1]")
        self.alphas = sorted(float(a) for a in self.alphas)
        return super().prepare(model, task, budget_params)

    def fit(self, model: nn.Module, task, cfg: TrainConfig) -> TrainResult:
        probe_epochs = self.probe_epochs or max(1, cfg.epochs // 3)
        ft_epochs = max(1, cfg.epochs - probe_epochs)
        head = train_only(model, head_parameters(model).values())
        first = train(model, task, head,
                      dataclasses.replace(cfg, epochs=probe_epochs, lr=self.probe_lr or 10 * cfg.lr,
                                          desc=f"{cfg.desc} (probe)"),
                      before_batch=lambda step: freeze_batchnorm(model))
        probe = frozen_copy(model)
        params = train_only(model, model.parameters())
        second = train(model, task, params,
                       dataclasses.replace(cfg, epochs=ft_epochs, desc=f"{cfg.desc} (fine-tune)"))
        tuned = frozen_copy(model)
        device = next(model.parameters()).device
        shift = getattr(task, "shift_test", None)
        self.curve = []
        best = None
        for a in self.alphas:
            interpolate(probe, tuned, a, out=model)
            point = {"alpha": a, "val_acc": evaluate(model, task.val, device),
                     "test_acc": evaluate(model, task.test, device),
                     "shift_acc": evaluate(model, shift, device) if shift is not None else None}
            self.curve.append(point)
            if best is None or point["val_acc"] > best["val_acc"]:  # ties: the smaller alpha
                best = point
        self.alpha = best["alpha"]
        interpolate(probe, tuned, self.alpha, out=model)
        model.eval()
        return TrainResult(val_acc=best["val_acc"], best_epoch=probe_epochs + second.best_epoch,
                           seconds=first.seconds + second.seconds,
                           history=first.history + second.history)
