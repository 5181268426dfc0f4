"""SWR itself as a PETL method, so ``swr bench`` runs it beside the baselines.

``prepare`` runs stage 1 (the supernet, :func:`swr.supernet.prepare_supernet`) and
stage 2 (the search, by the *searcher* it is handed) and returns the supernet with
the chosen gates open; ``fit`` is stage 3 (train the selected deltas + task norms +
head, warm-started from the supernet); ``fold`` gives the base architecture.

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
from torch import nn

from ..budget import NORM_MODES, selection_cost
from ..delta import task_delta_tensors
from ..errors import BudgetError, SwrError
from ..fold import fold
from ..reparam import norm_parameters, restore_norms, set_selection, set_trainable
from ..selection import Searcher, search_selection
from ..supernet import SupernetConfig
from .base import Method


@dataclass
class SWR(Method):
    """Scalable Weight Reparametrization with a searched layer selection."""

    name = "swr"
    foldable = True
    respects_budget = True
    context_knobs: ClassVar[tuple[str, ...]] = ("evaluations", "supernet_epochs", "seed",
                                                "device", "out")

    selector: str = "pg"  # the searcher's name, as the application resolves it
    norms: str = "auto"  # how task norms count against the budget (swr.budget.NORM_MODES)
    evaluations: int = 40
    supernet_epochs: int = 8
    workers: int = 0
    seed: int = 0
    device: str = "auto"
    out: Optional[str] = None
    selection: list[str] = field(default_factory=list)
    search_val_score: Optional[float] = None
    #: filled by ``prepare``: whether the task norms train (``auto`` may leave them out)
    norms_trained: Optional[bool] = field(default=None, init=False)
    searcher: Optional[Searcher] = field(default=None, repr=False, compare=False)

    def __post_init__(self):
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
        if not self.norms_trained:  # stage 1 trained the supernet's norms; these stay base
            restore_norms(supernet, model)
        set_selection(supernet, self.selection)
        set_trainable(supernet, deltas=self.selection, norms=self.norms_trained, head=True)
        return supernet

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
