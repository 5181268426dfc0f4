"""SWR itself as a PETL method: the one stage 3, used by ``swr bench`` and ``swr finetune``.

``prepare`` runs stage 1 (the supernet, :func:`swr.supernet.prepare_supernet`) and
stage 2 (the search, by the *searcher* it is handed) and returns the supernet with
the chosen gates open; given a ``selection`` instead (``swr finetune --selection``), it
skips both. ``fit`` is stage 3, a recipe that cannot end below what its own subsets
reach on validation:

1. the head is fitted on the frozen base features (the linear probe's solution,
   :func:`swr.train.fit_head`) with the deltas at zero and the base's norms (LP-FT);
2. the selected deltas, the task norms (when the budget holds them) and the head then
   train from there at the backbone family's learning rate, with a step-based linear
   warm-up and cosine decay, keeping the epoch of best validation accuracy;
3. the probe is kept instead when no epoch beats it on validation.

``init="supernet"`` starts step 2 from stage 1's trained deltas, norms and head instead
(the warm start; no probe). ``fold`` gives the base architecture.

The ``norms`` knob says how the task norms relate to the budget
(:func:`swr.budget.split_budget`): ``auto`` (default) trains and counts them when they
fit, leaving the rest to the deltas, and trains deltas only when they do not;
``budget`` refuses norms that do not fit; ``none`` trains deltas only (``swr-deltas``,
the ablation); ``free`` trains them outside the budget. A run that does not train its
norms keeps the base's (affines and BatchNorm statistics), not stage 1's.

The method does not know which searcher it holds: the application builds one by
name (``swr.policies.build_searcher``) from :meth:`SWR.search_settings` and sets
``searcher`` before ``prepare``. :func:`swr_variant` makes a copy of the method whose
searcher name is fixed (``swr-knapsack`` and friends).
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..budget import NORM_MODES, check_selection, selection_cost
from ..delta import task_delta_tensors
from ..errors import BudgetError, SwrError
from ..fold import fold
from ..reparam import (norm_parameters, reparam_layers, restore_norms, set_selection,
                       set_trainable)
from ..selection import Searcher, search_selection
from ..supernet import SupernetConfig, new_supernet
from ..train import TrainConfig, TrainResult, fit_head, train
from .base import Method, new_head, register_method

#: where stage 3 starts (:attr:`SWR.init`)
INITS = ("probe", "supernet")


@register_method
@dataclass
class SWR(Method):
    """Scalable Weight Reparametrization with a searched layer selection."""

    name = "swr"
    foldable = True
    respects_budget = True
    context_knobs: ClassVar[tuple[str, ...]] = ("evaluations", "supernet_epochs", "seed",
                                                "device", "out")

    lr_knobs: ClassVar[dict[str, str]] = {"probe_lr": "head"}  # the probe trains a head

    selector: str = "pg"  # the searcher's name, as the application resolves it
    norms: str = "auto"  # how task norms count against the budget (swr.budget.NORM_MODES)
    evaluations: int = 40
    supernet_epochs: int = 8
    workers: int = 0
    seed: int = 0
    device: str = "auto"
    out: Optional[str] = None
    #: a selection to train as given (no stage 1 or 2); filled by the search otherwise
    selection: list[str] = field(default_factory=list)
    search_val_score: Optional[float] = None
    #: whether the task norms train: with a given selection, as it says; else filled by
    #: ``prepare`` (``auto`` may leave them out)
    norms_trained: Optional[bool] = None
    #: where stage 3 starts: "probe" (LP-FT: the linear probe's head, zero deltas, base
    #: norms) or "supernet" (stage 1's deltas, norms and head)
    init: str = "probe"
    #: with ``init="supernet"`` and a given selection: the stage-1 supernet's weights file
    supernet_file: Optional[str] = None
    #: the probe's learning rate (``swr bench`` gives it the linear probe's)
    probe_lr: Optional[float] = None
    #: fraction of stage 3's optimizer steps spent in linear warm-up
    warmup: float = 0.1
    searcher: Optional[Searcher] = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.init not in INITS:
            raise SwrError(f"method {self.name!r}: init={self.init!r} is not one of "
                           f"{', '.join(INITS)}")
        if not 0 <= self.warmup < 1:
            raise SwrError(f"method {self.name!r}: warmup={self.warmup!r} must be in [0, 1)")
        if self.norms not in NORM_MODES:
            raise SwrError(f"method {self.name!r}: norms={self.norms!r} is not one of "
                           f"{', '.join(NORM_MODES)}")

    @property
    def trains_norms(self) -> bool:
        return bool(self.norms_trained)

    def norms_accounting(self) -> str:
        # auto says which way it went: counted, or deltas only when norms did not fit
        if self.norms == "auto" and self.norms_trained is False:
            return "auto:none"
        return self.norms

    def search_settings(self) -> Optional[dict[str, Any]]:
        return {"policy": self.selector, "evaluations": self.evaluations,
                "workers": self.workers, "seed": self.seed, "device": self.device}

    def prepare(self, model: nn.Module, task, budget_params: Optional[int]) -> nn.Module:
        if budget_params is None:
            raise BudgetError(f"method {self.name!r} needs a budget")
        # the generator as the runner seeded it: the probe's head is drawn from it, so the
        # probe is the linear probe's own solution, not one from another starting point
        seeded = torch.get_rng_state()
        if self.searcher is None and self.selection:
            supernet = self._given_selection(model, task, budget_params)
        else:
            supernet = self._search(model, task, budget_params)
        if self.init == "probe":  # the base itself: zero deltas, base norms (the head is fitted)
            restore_norms(supernet, model)
            with torch.no_grad():
                for layer in reparam_layers(supernet).values():
                    layer.delta.zero_()
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(seeded)
                new_head(supernet, task)
        elif not self.norms_trained:  # stage 1 trained the supernet's norms; these stay base
            restore_norms(supernet, model)
        set_selection(supernet, self.selection)
        set_trainable(supernet, deltas=self.selection, norms=self.norms_trained, head=True)
        return supernet

    def _search(self, model: nn.Module, task, budget_params: int) -> nn.Module:
        """Stages 1 and 2: the trained supernet, with ``selection`` and ``norms_trained`` set."""
        if self.searcher is None:
            raise SwrError(f"method {self.name!r} needs a searcher: set searcher= to one made by "
                           f"swr.policies.build_searcher({self.selector!r}, ...)")
        out = self.out or tempfile.mkdtemp(prefix="swr-search-")
        sn = SupernetConfig(epochs=self.supernet_epochs, seed=self.seed, device=self.device,
                            progress=False, gates="budget")
        result, supernet = search_selection(model, task, budget_params, self.searcher, sn, out,
                                            backbone=type(model).__name__, norms=self.norms)
        self.selection = list(result["layers"])
        self.search_val_score = result["val_score"]
        self.norms_trained = bool(result["norms_trained"])
        return supernet

    def _given_selection(self, model: nn.Module, task, budget_params: int) -> nn.Module:
        """The model to train for a selection given as it is (``swr finetune --selection``),
        once the selection is checked to fit ``budget_params`` less the task norms it
        counts there (``norms`` ``auto`` or ``budget`` with the norms trained)."""
        if self.norms_trained is None:
            raise SwrError(f"method {self.name!r}: a given selection needs norms_trained "
                           "(whether its task norms train)")
        supernet = new_supernet(model, task.num_classes, SupernetConfig(seed=self.seed))
        counted = (sum(p.numel() for p in norm_parameters(supernet).values())
                   if self.norms_trained and self.norms in ("auto", "budget") else 0)
        try:
            check_selection(supernet, self.selection, budget_params - counted)
        except BudgetError as e:
            if not counted:
                raise
            raise BudgetError(f"{e} (the budget of {budget_params} less the {counted} task "
                              "norm parameters it counts)") from None
        if self.init == "supernet":
            if not self.supernet_file:
                raise SwrError(f"method {self.name!r}: init='supernet' with a given selection "
                               "needs supernet_file")
            try:
                supernet.load_state_dict(load_file(str(self.supernet_file)))
            except (SafetensorError, OSError, RuntimeError) as e:
                raise SwrError(f"supernet {self.supernet_file} does not load "
                               f"({str(e).splitlines()[0][:200]}); re-run swr search or use "
                               "--init probe") from None
        return supernet

    def fit(self, model: nn.Module, task, cfg: TrainConfig) -> TrainResult:
        """Stage 3 (see the module docstring): probe, then deltas + norms + head from it,
        the better of the two on validation."""
        history: list[dict] = []
        probe = probe_state = None
        if self.init == "probe":
            probe = fit_head(model, task, dataclasses.replace(
                cfg, lr=self.probe_lr or 10 * cfg.lr, weight_decay=0.0, label_smoothing=0.0))
            probe_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            history.append({"epoch": 0, "phase": "probe", "val_acc": probe.val_acc,
                            "seconds": probe.seconds})
        params = set_trainable(model, deltas=self.selection, norms=bool(self.norms_trained),
                               head=True)
        tuned = train(model, task, params,
                      dataclasses.replace(cfg, warmup_epochs=self.warmup * cfg.epochs),
                      before_batch=self.before_batch(model), regularizer=self.regularizer(model))
        history += tuned.history
        if probe is not None and tuned.val_acc < probe.val_acc:
            model.load_state_dict(probe_state)  # no epoch beat the probe on validation
            model.eval()
            return TrainResult(val_acc=probe.val_acc, best_epoch=0,
                               seconds=probe.seconds + tuned.seconds, history=history)
        seconds = tuned.seconds + (probe.seconds if probe is not None else 0.0)
        return TrainResult(val_acc=tuned.val_acc, best_epoch=tuned.best_epoch, seconds=seconds,
                           history=history, precision=tuned.precision)

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def updated_params(self, model: nn.Module) -> int:
        return selection_cost(model, self.selection) + self.norm_params(model)

    def norm_params(self, model: nn.Module) -> int:
        if not self.norms_trained:
            return 0
        return sum(p.numel() for p in norm_parameters(model).values())

    def stored_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return task_delta_tensors(model)

    def settings(self) -> dict:
        # the searcher object is not a setting: its name is ``selector``
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "searcher"}

    def fold(self, model: nn.Module) -> nn.Module:
        return fold(model)


def swr_variant(name: str, selector: Optional[str] = None, **fixed) -> type:
    """SWR registered as method ``name`` with searcher ``selector`` (default: SWR's) and
    any other knobs in ``fixed`` (``norms="none"`` for ``swr-deltas``) set by the name."""
    what = f"the {selector} searcher" if selector else "SWR's default searcher"
    extra = "".join(f", {k}={v}" for k, v in fixed.items())
    cls = dataclass(type(name.replace("-", "_").upper(), (SWR,), {
        "name": name, "__doc__": f"SWR with {what}{extra}."}))
    default_init = cls.__init__
    if selector is not None:
        fixed = {"selector": selector, **fixed}

    # the knobs are fixed by the name; a knob of the same name would contradict it
    def __init__(self, **knobs):
        knobs.setdefault("selector", fixed.get("selector", SWR.selector))
        for knob, value in fixed.items():
            if knob != "selector" and knobs.setdefault(knob, value) != value:
                raise SwrError(f"method {name!r} is SWR with {knob}={value}; for "
                               f"{knob}={knobs[knob]} use method 'swr'")
        default_init(self, **knobs)

    cls.__init__ = __init__
    return cls


# SWR training its deltas only (no task norms): the deltas' own gain over norm tuning
register_method("swr-deltas", swr_variant("swr-deltas", norms="none"))
