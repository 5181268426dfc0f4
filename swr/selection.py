"""Stage 2 as the core sees it: a search problem, a searcher, and what it returns.

The core trains the supernet (stage 1, :func:`swr.supernet.prepare_supernet`), hands
a :class:`SearchProblem` to a :class:`Searcher` and gets back a :class:`SearchResult`.
It never knows which searcher it holds: the learned policies and the reference
selectors live in ``swr.policies`` (``swr.policies.build_searcher(name, settings)``),
and the application passes one in. Any object with a ``name``, ``describe()`` and
``__call__(problem)`` is a searcher, so a notebook can search with a function of its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from .budget import (MemoryBudget, backbone_params, count_feasible, feasible_masks,
                     resolve_budget, selection_cost, split_budget)
from .errors import BudgetError, SwrError
from .progress import report_status
from .reparam import candidates, norm_parameters
from .supernet import SupernetConfig, build_supernet, prepare_supernet
from .train import steps_in_an_epoch

if TYPE_CHECKING:
    from .memory import MemoryCost, MemoryLimit

Selection = tuple[str, ...]

#: The fewest validation examples a search scores selections on. A selection's accuracy
#: on n examples takes one of n + 1 values: on one example every selection scores 0 or
#: 1 and the search cannot tell them apart; from 10 on, scores can order selections.
MIN_VAL_EXAMPLES = 10


def check_search_val(task) -> None:
    """Raise :class:`SwrError` if ``task``'s validation split is too small to search on
    (fewer than :data:`MIN_VAL_EXAMPLES` examples), naming the task and the minimum."""
    n = len(task.val)
    if n < MIN_VAL_EXAMPLES:
        raise SwrError(f"task {task.id} has {n} validation example(s); a search scores "
                       f"selections on them and needs at least {MIN_VAL_EXAMPLES} (on fewer, "
                       f"selections score alike): add examples (an image folder's validation "
                       f"split is held out of its train/ images)")


@dataclass
class SearchProblem:
    """What a searcher searches: the trained supernet's candidate layers under a budget.

    ``names``/``costs`` are the candidate layers in network order, ``stats`` their
    stage-1 statistics (:func:`swr.supernet.layer_statistics`), ``out`` the folder
    for the searcher's own files (its log, ``search.csv``, policy weights).

    A search of several budgets at once has them in ``budgets`` (parameters) and
    ``budget_labels`` (as the user wrote them), and ``budget_params`` is the largest;
    a single-budget problem leaves both empty.
    """

    supernet: nn.Module
    task: object
    names: list[str]
    costs: list[int]
    budget_params: int
    stats: list[dict]
    out: Path
    title: str = ""
    budgets: list[int] = field(default_factory=list)
    budget_labels: list[str] = field(default_factory=list)
    #: where scorings must take BatchNorm statistics from when the supernet decides it
    #: (``"supernet"`` for one trained with the base's norms on random gates: the
    #: statistics the final model keeps); None leaves it to the searcher's settings
    bn_stats: Optional[str] = None
    #: whether the task norms train beside the deltas (stage 1's setting, which the
    #: final training of a single budget shares): an evaluator that trains does the same
    norms_trained: bool = True
    #: a training-memory budget every selection must fit as well (None: parameters only)
    memory: Optional["MemoryLimit"] = None

    @property
    def budget_list(self) -> list[int]:
        """Every budget searched, in parameters (one for a single-budget problem)."""
        return list(self.budgets) or [self.budget_params]

    def single(self, i: int) -> "SearchProblem":
        """The single-budget problem of budget ``i``, its files in that budget's folder."""
        out = self.out / budget_folder(self.budget_labels[i]) if self.budgets else self.out
        return replace(self, budget_params=self.budget_list[i], budgets=[], budget_labels=[],
                       out=out)

    @cached_property
    def feasible_selections(self) -> Optional[int]:
        """How many selections fit ``budget_params`` (:func:`swr.budget.count_feasible`)
        and the memory budget, counted once per problem (None: too many to count)."""
        return count_fitting(self.costs, self.budget_params, self.memory)

    def fitting_masks(self) -> list[np.ndarray]:
        """Every selection that fits both budgets (for a space small enough to score whole)."""
        masks = feasible_masks(self.costs, self.budget_params)
        if self.memory is None or not masks:
            return masks
        return [m for m, ok in zip(masks, self.memory.fitting(np.stack(masks))) if ok]

    @property
    def importance(self) -> np.ndarray:
        """Stage-1 Taylor importance per layer (what greedy and knapsack rank by)."""
        return np.array([s["taylor"] for s in self.stats])


@dataclass
class SearchResult:
    """The best selection a search scored, and how the search went.

    ``evaluations``: distinct selections scored (``replayed`` of them served from a
    resumed search's log); ``retries``: scorings redone after a worker died;
    ``rows``: one record per distinct selection, in the order they were scored.
    ``per_budget``: for a search of several budgets, the best selection at each
    (``layers``, ``score``, ``policy_weights``; their ``evaluations`` the search's total).
    ``topped_up``: of ``evaluations``, the random feasible selections the driver scored
    after the searcher stopped short of its count; ``short``: why fewer than asked were
    scored (None when the count was reached).
    """

    layers: Selection
    score: float
    evaluations: int
    replayed: int = 0
    retries: int = 0
    policy_weights: Optional[str] = None
    rows: list[dict] = field(default_factory=list)
    per_budget: list["SearchResult"] = field(default_factory=list)
    topped_up: int = 0
    short: Optional[str] = None


#: The most parameter-feasible selections :func:`count_fitting` enumerates to count those
#: that fit a memory budget too; above it the count is unknown (None).
COUNT_FITTING_LIMIT = 200_000


def count_fitting(costs, budget_params: int, memory: Optional["MemoryLimit"]) -> Optional[int]:
    """:func:`swr.budget.count_feasible`, and with ``memory`` the selections among them
    that fit its budget too (enumerated; None above :data:`COUNT_FITTING_LIMIT`)."""
    n = count_feasible(costs, budget_params)
    if memory is None or n is None:
        return n
    if n > COUNT_FITTING_LIMIT:
        return None
    masks = feasible_masks(costs, budget_params)
    return int(memory.fitting(np.stack(masks)).sum()) if masks else 0


def selection_memory(model: nn.Module, task, layers, norms_trained: bool,
                     batch_size: int) -> dict:
    """:func:`swr.memory.training_memory` of training ``layers`` (and the task norms when
    ``norms_trained``, and the head) on a copy of supernet ``model``, on one batch of
    ``task.train``; the supernet itself is left as it was."""
    import copy

    from .memory import training_memory
    from .reparam import set_selection, set_trainable
    from .train import batches

    trial = copy.deepcopy(model).cpu()
    set_selection(trial, layers)
    params = set_trainable(trial, deltas=list(layers), norms=norms_trained, head=True)
    # a batch of its own, as on the device it trains on: a batch of an in-memory split is
    # a view of the whole split, which a saved input would otherwise count whole
    x = next(batches(task.train, batch_size))[0].clone()
    return training_memory(trial, x, params)


#: The batch sizes a :class:`~swr.memory.MemoryCost` is counted at when training uses a
#: larger batch: saved bytes are affine in the batch size, so two small batches give the
#: count at any size for a few small forward passes per layer.
MEMORY_PROBE_BATCHES = (2, 4)


def _trial_storages(trial: nn.Module, x, layers, norms: bool, full: bool = False) -> dict:
    """:func:`swr.memory.saved_storages` of one training step of ``trial`` (a supernet)
    training ``layers``' deltas, the task norms if ``norms``, and the head; with ``full``,
    every base parameter instead of the deltas (full fine-tuning, gates closed)."""
    from .memory import saved_storages
    from .reparam import set_selection, set_trainable

    set_selection(trial, [] if full else layers)
    set_trainable(trial, deltas=[] if full else list(layers), norms=norms or full, head=True)
    if full:
        for name, p in trial.named_parameters():
            if not name.endswith(("delta", "delta_bias")):
                p.requires_grad_(True)
    trial.train()  # as selection_memory measures one step
    return saved_storages(trial, x)


def memory_cost(model: nn.Module, task, batch_size: int) -> "MemoryCost":
    """The :class:`~swr.memory.MemoryCost` of training any selection of supernet
    ``model``'s candidate layers (with the head, and the task norms where asked) on the
    first batch of ``task.train`` at ``batch_size``, the batch :func:`selection_memory`
    measures on: every layer's saved storages measured once, on a copy of ``model``
    (above :data:`MEMORY_PROBE_BATCHES` on two small batches, combined linearly).
    ``full_bytes`` is full fine-tuning's saved bytes on the same batch."""
    import copy

    from .memory import MemoryCost, perturb_weights
    from .train import batches

    trial = copy.deepcopy(model).cpu()
    # the deltas stay zero: an open gate then computes what a closed one does
    perturb_weights(trial, skip=lambda name: name.endswith(("delta", "delta_bias")))
    names = [c.name for c in candidates(trial)]
    x = next(batches(task.train, batch_size))[0]
    n = int(x.shape[0])
    passes, full = [], 0.0
    with _one_thread():
        for b, coef in _probe_batches(n):
            xb = x[:b].clone()
            passes.append((coef, _trial_storages(trial, xb, [], False),
                           _trial_storages(trial, xb, [], True),
                           [_trial_storages(trial, xb, [name], False) for name in names]))
            full += coef * sum(_trial_storages(trial, xb, [], True, full=True).values())
    return MemoryCost.from_storages(names, passes, int(round(full)), n)


def full_finetune_saved_bytes(model: nn.Module, task, batch_size: int) -> int:
    """Full fine-tuning's saved bytes on the batch :func:`memory_cost` measures (its
    ``full_bytes``, without measuring every layer): what a ``--train-memory``
    percentage is of."""
    import copy

    from .train import batches

    trial = copy.deepcopy(model).cpu()
    x = next(batches(task.train, batch_size))[0]
    with _one_thread():
        full = sum(coef * sum(_trial_storages(trial, x[:b].clone(), [], True,
                                              full=True).values())
                   for b, coef in _probe_batches(int(x.shape[0])))
    return int(round(full))


def _probe_batches(n: int) -> list[tuple[int, float]]:
    """(batch, coefficient) pairs whose combination gives saved bytes at batch ``n``."""
    lo, hi = MEMORY_PROBE_BATCHES
    return [(n, 1.0)] if n <= hi else [(lo, (hi - n) / (hi - lo)), (hi, (n - lo) / (hi - lo))]


class _one_thread:
    """Many passes on a few examples run on one torch thread: ops this small gain nothing
    from more, and on a busy machine each would wait for a descheduled OpenMP thread; the
    caller's thread count is restored after."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


def memory_limit(probe: nn.Module, task, train_memory, budgets: list, budgets_params: list[int],
                 splits: list[tuple[int, bool, bool]], norms: str, batch_size: int
                 ) -> tuple[list[tuple[int, bool, bool]], "MemoryLimit"]:
    """The memory budget ``train_memory`` (``"30%"`` of full fine-tuning's saved bytes, or
    a size) over supernet ``probe``'s layers, and the norm ``splits`` (one per budget, as
    :func:`norm_split` gives them) it leaves: training the task norms keeps activations
    down to the first norm, so where that does not fit, ``auto`` trains deltas only (the
    whole budget theirs) and the other modes refuse. Refuses, one line each, a budget
    below what the head (and norms) alone save and a pair of budgets no layer fits."""
    from .memory import MemoryLimit

    wanted = MemoryBudget.parse(train_memory)
    cost = memory_cost(probe, task, batch_size)
    limit = wanted.resolve(cost.full_bytes)
    shown = f"--train-memory {train_memory} ({limit} bytes of the {cost.full_bytes} full " \
            "fine-tuning saves)"
    norm_bytes = cost.for_norms(True).bytes_of(cost.for_norms(True).start())
    fitted = []
    for params, (delta, trained, counted) in zip(budgets_params, splits):
        if trained and norm_bytes > limit:
            if norms != "auto":
                raise BudgetError(f"{shown} cannot hold the {norm_bytes} bytes that training the "
                                  "task norms saves; use --norms none, or raise --train-memory")
            delta, trained, counted = params, False, False
        fitted.append((delta, trained, counted))
    cost = cost.for_norms(any(trained for _, trained, _ in fitted))
    start = cost.bytes_of(cost.start())
    if start > limit:
        raise BudgetError(f"{shown} is below the {start} bytes that training the head alone "
                          "saves; raise it")
    layer_bytes = cost.layer_bytes()
    costs = np.array([c.params for c in candidates(probe)])
    for label, (delta, _, _) in zip(budgets, fitted):
        if not ((layer_bytes <= limit) & (costs <= delta)).any():
            raise BudgetError(f"no layer fits both --budget {label} ({delta} delta parameters) "
                              f"and {shown}: the layer that saves least needs "
                              f"{int(layer_bytes.min())} bytes; raise either")
    return fitted, MemoryLimit(cost, limit, str(train_memory))


def budget_folder(label: str) -> str:
    """The sub-folder of a search of several budgets that holds budget ``label``'s
    selection (``budget-5%``)."""
    return f"budget-{label}"


def budget_list(budget) -> list:
    """``budget`` as a list: a list or tuple as is, a comma-separated string split
    (``"1%,5%"``), anything else as its only item."""
    if isinstance(budget, (list, tuple)):
        return list(budget)
    if isinstance(budget, str) and "," in budget:
        return [b.strip() for b in budget.split(",")]
    return [budget]


@runtime_checkable
class Searcher(Protocol):
    """A stage-2 search: ``searcher(problem) -> SearchResult``."""

    name: str

    def describe(self) -> dict:
        """What to report about this searcher (``policy``, ``seed``, ``workers``, ...)."""

    def __call__(self, problem: SearchProblem) -> SearchResult: ...


def search_selection(base_model: nn.Module, task, budget, searcher: Searcher,
                     supernet: SupernetConfig, out: str | Path, backbone: str,
                     norms: str = "auto", train_memory=None) -> tuple[dict, nn.Module]:
    """Stage 1 (cached) and stage 2 with ``searcher``; returns (result, trained supernet).

    ``budget`` is anything :func:`swr.budget.resolve_budget` takes (``"5%"``, a
    fraction, a parameter count), or a list of them (or ``"1%,5%"``): one search for
    all, whose result has an entry per budget in ``"budgets"`` (the best selection
    scored that fits it) beside the search's own figures. ``norms`` (one of
    :data:`swr.budget.NORM_MODES`) says whether the task norms train and count against
    each budget (:func:`swr.budget.split_budget`); the searcher is handed what is left
    for the deltas. A budget no layer fits in, or ``norms="budget"`` with norms that do
    not fit, fails before stage 1, as does a validation split of fewer than
    :data:`MIN_VAL_EXAMPLES` examples. A supernet with ``gates="budget"`` and no
    ``gate_budget_params`` of its own trains on gate sets within the deltas' largest share.
    Each budget's result records ``norms``,
    ``norms_trained``, ``norm_params`` (the task norms' size), ``delta_budget_params``
    and ``updated_params`` (deltas + trained norms). The supernet is returned with
    every gate closed.

    ``train_memory`` (:class:`swr.budget.MemoryBudget`: ``"30%"`` of full fine-tuning's
    saved bytes, or a size) bounds what one training step saves for backward as well
    (:func:`memory_limit`, checked before stage 1): every selection scored fits both,
    and each result records ``train_memory``, ``train_memory_bytes``,
    ``full_finetune_saved_bytes`` and ``memory_model_saved_bytes`` (the selection's
    saved bytes as the search's :class:`~swr.memory.MemoryCost` counts them, beside the
    measured ``training_memory``).
    """
    check_search_val(task)
    budgets = budget_list(budget)
    probe = build_supernet(base_model, task.num_classes, bias_delta=supernet.bias_delta)
    budgets_params = [resolve_budget(probe, b) for b in budgets]
    if len(budgets) > 1:
        _check_budget_list(budgets, budgets_params, searcher)
    # (deltas' share, norms trained, norms counted) per budget
    splits = [norm_split(probe, b, norms) for b in budgets_params]
    limit = None
    if train_memory is not None:
        splits, limit = memory_limit(probe, task, train_memory, budgets, budgets_params, splits,
                                     norms, supernet.batch_size)
    delta_budgets = [d for d, _, _ in splits]
    if not any(trained for _, trained, _ in splits):
        # no budget trains the task norms: neither does stage 1, so the deltas learn with
        # the base's norms and statistics, those the final model keeps
        supernet = replace(supernet, norms=False)
    if supernet.gates == "budget" and supernet.gate_budget_params < 1:
        # stage 1 trains on the gate sets the search may propose: the deltas' largest share
        supernet = replace(supernet, gate_budget_params=max(delta_budgets))
    supernet.validate()
    norm_count = sum(p.numel() for p in norm_parameters(probe).values())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, meta, folder = prepare_supernet(base_model, task, supernet, backbone)
    t_supernet = time.perf_counter() - t0
    cands = candidates(model)
    many = len(budgets) > 1
    shown = ",".join(str(b) for b in budgets)
    problem = SearchProblem(model, task, [c.name for c in cands], [c.params for c in cands],
                            max(delta_budgets), meta["stats"], out,
                            title=f"{searcher.name} on {task.id}, budget {shown}",
                            budgets=delta_budgets if many else [],
                            budget_labels=[str(b) for b in budgets] if many else [],
                            # deltas only on a supernet of random gate sets: its
                            # statistics, those the final model keeps; on one of budget
                            # gate sets val-batch statistics ranked better (experiments/SEARCH.md)
                            bn_stats=None if supernet.norms or supernet.gates == "budget"
                            else "supernet", norms_trained=supernet.norms, memory=limit)
    t1 = time.perf_counter()
    report_status(f"search ({searcher.name})")
    found = searcher(problem)
    t_search = time.perf_counter() - t1
    info = searcher.describe()

    def entry(res: SearchResult, i: int, label) -> dict:
        delta_budget, norms_trained, _ = splits[i]
        cost = selection_cost(model, res.layers)
        # the space the searcher drew from: near the evaluations, every searcher ends alike
        # (the largest budget's is the problem's own, counted once)
        feasible = (problem.feasible_selections if delta_budget == problem.budget_params
                    else count_fitting(problem.costs, delta_budget, limit))
        return {
            "layers": list(res.layers), "cost": cost,
            "budget_params": budgets_params[i], "budget": str(label),
            "norms": norms, "norms_trained": norms_trained, "norm_params": norm_count,
            "delta_budget_params": delta_budget,
            "feasible_selections": feasible,
            "updated_params": cost + (norm_count if norms_trained else 0),
            "backbone_params": backbone_params(model), "val_score": res.score,
            "policy": info.get("policy", searcher.name), "seed": info.get("seed"),
            "evaluations": found.evaluations,
            "evaluations_requested": getattr(getattr(searcher, "settings", None),
                                             "evaluations", None),
            "evaluations_topped_up": found.topped_up, "evaluations_short": found.short,
            "replayed_evaluations": found.replayed, "worker_retries": found.retries,
            "task": task.id, "backbone": backbone,
            "supernet": str(folder), "supernet_val_acc_all_open": meta["val_acc_all_open"],
            "supernet_steps": supernet.epochs * steps_in_an_epoch(task.train, supernet.batch_size),
            # what scored: the statistics the supernet fixed; None: the searcher's setting
            "bn_stats": problem.bn_stats,
            "seconds": {"supernet": t_supernet, "search": t_search},
            "policy_weights": res.policy_weights,
            "workers": info.get("workers", 0),
            # one training step of the final training of this selection at the supernet's
            # batch size: activations saved for backward, and gradients + AdamW moments
            "training_memory": selection_memory(model, task, res.layers, norms_trained,
                                                supernet.batch_size),
            **({} if limit is None else {
                "train_memory": limit.label, "train_memory_bytes": limit.budget,
                "full_finetune_saved_bytes": limit.cost.full_bytes,
                "memory_model_saved_bytes": limit.cost.saved_bytes(
                    np.isin(problem.names, list(res.layers)))}),
        }

    if not many:
        return entry(found, 0, budgets[0]), model
    largest = budgets_params.index(max(budgets_params))
    result = {k: v for k, v in entry(found, largest, shown).items()
              if k not in ("layers", "cost", "val_score", "norms_trained", "updated_params")}
    result["budgets"] = [entry(res, i, label) for i, (res, label)
                         in enumerate(zip(found.per_budget, budgets))]
    return result, model


def norm_split(model: nn.Module, budget_params: int, norms: str) -> tuple[int, bool, bool]:
    """:func:`swr.budget.split_budget` for ``model`` (a supernet): its task norms' size, and
    its cheapest layer as the least the deltas must be left."""
    norm_count = sum(p.numel() for p in norm_parameters(model).values())
    cheapest = min((c.params for c in candidates(model)), default=1)
    return split_budget(budget_params, norm_count, norms, min_delta=cheapest)


def _check_budget_list(budgets: list, resolved: list[int], searcher: Searcher) -> None:
    """Refuse a budget list with a repeat, or for a searcher that takes one budget."""
    from .errors import SwrError

    seen: dict[int, object] = {}
    for b, params in zip(budgets, resolved):
        if params in seen:
            raise SwrError(f"--budget lists {seen[params]} and {b}, both {params} parameters; "
                           "give each budget once")
        seen[params] = b
    if not getattr(searcher, "searches_budget_list", False):
        raise SwrError(f"searcher {searcher.name!r} searches one budget at a time; give "
                       "--budget a single value")


def supernet_settings(cfg: SupernetConfig, seed: int, device: str, progress: bool) -> SupernetConfig:
    """``cfg`` with the run's seed, device and progress (a copy; ``cfg`` is left alone)."""
    return replace(cfg, seed=seed, device=device, progress=progress)


__all__ = ["SearchProblem", "SearchResult", "Searcher", "Selection", "budget_folder", "budget_list",
           "count_fitting", "full_finetune_saved_bytes", "memory_cost", "memory_limit",
           "norm_split", "search_selection", "supernet_settings"]
