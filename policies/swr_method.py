"""SWR itself as a PETL method, so ``swr bench`` runs it beside the baselines.

``prepare`` runs stage 1 (supernet) and stage 2 (the search with the chosen
selector) and returns the supernet with the chosen gates open; ``fit`` is stage 3
(train the selected deltas + task norms + head, warm-started from the supernet);
``fold`` gives the base architecture. Names: ``swr`` (policy network), ``swr-ppo``,
``swr-random``, ``swr-greedy``, ``swr-knapsack``.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from swr.budget import selection_cost
from swr.delta import task_delta_tensors
from swr.errors import BudgetError
from swr.fold import fold
from swr.methods.base import Method, register_method
from swr.reparam import norm_parameters, set_selection, set_trainable
from swr.supernet import SupernetConfig


@dataclass
class SWR(Method):
    """Scalable Weight Reparametrization with a searched layer selection."""

    name = "swr"
    foldable = True
    respects_budget = True

    selector: str = "pg"
    evaluations: int = 100
    supernet_epochs: int = 8
    workers: int = 0
    seed: int = 0
    device: str = "auto"
    out: Optional[str] = None
    selection: list[str] = field(default_factory=list)
    search_val_score: Optional[float] = None

    @property
    def trains_norms(self) -> bool:
        return True

    def prepare(self, model: nn.Module, task, budget_params: Optional[int]) -> nn.Module:
        from .search import SearchConfig, search

        if budget_params is None:
            raise BudgetError(f"method {self.name!r} needs a budget")
        out = self.out or tempfile.mkdtemp(prefix="swr-search-")
        cfg = SearchConfig(task=task.id, checkpoint="", budget=str(int(budget_params)), out=out,
                           policy=self.selector, seed=self.seed, evaluations=self.evaluations,
                           workers=self.workers, device=self.device, progress=False,
                           supernet=SupernetConfig(epochs=self.supernet_epochs, progress=False))
        result, supernet = search(model, task, cfg, backbone=type(model).__name__)
        self.selection = list(result["layers"])
        self.search_val_score = result["val_score"]
        set_selection(supernet, self.selection)
        set_trainable(supernet, deltas=self.selection, norms=True, head=True)
        return supernet

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def updated_params(self, model: nn.Module) -> int:
        return selection_cost(model, self.selection)

    def norm_params(self, model: nn.Module) -> int:
        return sum(p.numel() for p in norm_parameters(model).values())

    def stored_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return task_delta_tensors(model)

    def fold(self, model: nn.Module) -> nn.Module:
        return fold(model)


def _variant(selector: str) -> type:
    name = "swr" if selector == "pg" else f"swr-{selector}"
    cls = type(name.replace("-", "_").upper(), (SWR,), {"name": name, "__doc__":
               f"SWR with the {selector} selector."})
    cls = dataclass(cls)
    # the selector is fixed by the name; a knob of the same name would contradict it
    default_init = cls.__init__

    def __init__(self, **knobs):
        knobs.setdefault("selector", selector)
        default_init(self, **knobs)

    cls.__init__ = __init__
    return cls


SWR_VARIANTS = {s: _variant(s) for s in ("pg", "ppo", "random", "greedy", "knapsack")}
for _cls in SWR_VARIANTS.values():
    register_method(_cls.name, _cls)
del _cls
