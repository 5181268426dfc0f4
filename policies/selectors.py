"""Reference selectors the policy must beat, under the same evaluator and evaluation count.

* random search: random feasible selections,
* greedy: layers by stage-1 Taylor importance per parameter, filled while they fit,
* knapsack: the exact 0/1 knapsack optimum of Taylor importance under the budget
  (dynamic programming over integer costs).

Under a training-memory budget as well (a :class:`~swr.memory.MemoryLimit`) every
selection proposed fits both: random and greedy skip a layer that would break either,
and knapsack solves the parameter knapsack over the layers that fit the memory budget
alone, then drops the earliest selected layers until the selection fits. References
built for that problem:

* knapsack-repaired: the parameter knapsack over all layers, then its earliest selected
  layers dropped until memory fits (what the memory budget costs a parameter-only rule),
* greedy-memory: layers by importance per saved byte (the bytes the layer adds to what
  the selection so far saves), filled while both budgets hold,
* evolution: evolutionary search as in Sparse Update (Lin et al., "On-Device Training
  Under 256KB Memory", NeurIPS 2022): a population of feasible selections, tournament
  parents, uniform crossover and bit-flip mutation, children repaired to feasibility.

Greedy and knapsack each give one deterministic selection; with more evaluations
allowed they spend the rest on the same rule over multiplicatively perturbed
importances (additive noise once multiplicative noise only repeats itself). Every
selector proposes until it has scored its number of *distinct* selections (repeats
cost nothing), so each gets the same number of scorings.
"""

from __future__ import annotations

from functools import reduce
from math import gcd
from typing import Callable, Optional, Protocol, Sequence

import numpy as np

from swr.budget import Filling
from swr.memory import MemoryLimit

from .registry import register_searcher
from .search import PoolSearcher


def random_selection(costs: np.ndarray, budget: int, rng: np.random.Generator,
                     memory: Optional[MemoryLimit] = None) -> np.ndarray:
    """A random feasible selection: layers in random order, each kept with a random
    per-selection probability while it fits (so sparse and full selections both occur)."""
    mask = np.zeros(len(costs), dtype=bool)
    keep = rng.uniform(0.2, 1.0)
    fill = Filling(costs, budget, memory)
    for i in rng.permutation(len(costs)):
        # the coin is drawn only for a layer whose parameters still fit
        if costs[i] <= fill.left and rng.random() < keep and fill.fits(i):
            mask[i] = True
            fill.add(i)
    return mask


def importance_order(values: np.ndarray, costs: np.ndarray) -> np.ndarray:
    """Layer indices by value per parameter, highest first (ties in network order)."""
    return np.argsort(-np.asarray(values, dtype=np.float64) / np.asarray(costs, dtype=np.float64),
                      kind="stable")


def greedy_selection(values: np.ndarray, costs: np.ndarray, budget: int,
                     memory: Optional[MemoryLimit] = None) -> np.ndarray:
    """Highest value per parameter first; skip what does not fit (either budget), continue
    down the list."""
    mask = np.zeros(len(costs), dtype=bool)
    fill = Filling(costs, budget, memory)
    for i in importance_order(values, costs):
        if values[i] <= 0:
            break
        if fill.fits(i):
            mask[i] = True
            fill.add(i)
    return mask


def greedy_memory_selection(values: np.ndarray, costs: np.ndarray, budget: int,
                            memory: Optional[MemoryLimit]) -> np.ndarray:
    """Greedy by importance per saved byte: repeatedly add the layer of highest value per
    byte it adds to what the selection so far saves, among those that keep both budgets
    (a layer above the earliest selected one adds little more than its weight; one below
    adds every activation between the two). Without ``memory``: :func:`greedy_selection`."""
    if memory is None:
        return greedy_selection(values, costs, budget)
    cost = memory.cost
    values = np.asarray(values, dtype=np.float64)
    costs = np.asarray(costs)
    mask = np.zeros(len(costs), dtype=bool)
    covered = cost.start()
    left = budget
    while True:
        committed = cost.bytes_of(covered)
        after = np.rint((covered | cost.member).astype(np.float64) @ cost.weights)
        open_ = (~mask) & (values > 0) & (costs <= left) & (after <= memory.budget)
        if not open_.any():
            return mask
        ratio = np.where(open_, values / np.maximum(after - committed, 1.0), -np.inf)
        i = int(np.argmax(ratio))
        mask[i] = True
        left -= int(costs[i])
        covered = covered | cost.member[i]


def knapsack_selection(values: np.ndarray, costs: np.ndarray, budget: int) -> np.ndarray:
    """Exact 0/1 knapsack: maximise the summed value with summed cost <= budget.

    Costs are divided by their greatest common divisor first, which keeps the table
    small for real networks (channel counts share factors).
    """
    values = np.maximum(np.asarray(values, dtype=np.float64), 0.0)
    costs = np.asarray(costs, dtype=np.int64)
    g = int(reduce(gcd, costs.tolist()))
    w = costs // g
    cap = int(budget // g)
    n = len(w)
    best = np.zeros(cap + 1)
    take = np.zeros((n, cap + 1), dtype=bool)
    for i in range(n):
        wi = int(w[i])
        if wi > cap or values[i] <= 0:
            continue
        cand = best[:cap + 1 - wi] + values[i]
        better = cand > best[wi:]
        take[i, wi:] = better
        best[wi:] = np.where(better, cand, best[wi:])
    mask = np.zeros(n, dtype=bool)
    c = int(np.argmax(best))
    for i in range(n - 1, -1, -1):
        if take[i, c]:
            mask[i] = True
            c -= int(w[i])
    return mask


def memory_knapsack_selection(values: np.ndarray, costs: np.ndarray, budget: int,
                              memory: Optional[MemoryLimit]) -> np.ndarray:
    """The knapsack under both budgets: the parameter knapsack over the layers that fit
    the memory budget alone, then its earliest layers dropped until the selection fits
    (layers alone fitting do not always fit together). Without ``memory``: the knapsack."""
    if memory is None:
        return knapsack_selection(values, costs, budget)
    alone = memory.cost.layer_bytes() <= memory.budget
    values = np.where(alone, np.asarray(values, dtype=np.float64), 0.0)
    return memory.repair(knapsack_selection(values, costs, budget))


def repaired_knapsack_selection(values: np.ndarray, costs: np.ndarray, budget: int,
                                memory: Optional[MemoryLimit]) -> np.ndarray:
    """The parameter knapsack over every layer, then its earliest selected layers dropped
    until memory fits (the parameters they free stay unspent)."""
    mask = knapsack_selection(values, costs, budget)
    return mask if memory is None else memory.repair(mask)


def repair(mask: np.ndarray, costs: np.ndarray, budget: int, memory: Optional[MemoryLimit],
           rng: np.random.Generator) -> np.ndarray:
    """``mask`` made feasible: random selected layers dropped until the parameters fit,
    then the earliest until memory fits."""
    mask = np.array(mask, dtype=bool)
    while costs[mask].sum() > budget:
        mask[rng.choice(np.flatnonzero(mask))] = False
    return mask if memory is None else memory.repair(mask)


def evolution_search(values: np.ndarray, costs: np.ndarray, budget: int,
                     memory: Optional[MemoryLimit], evaluations: int,
                     rng: np.random.Generator, run: "Run", batch: int = 8,
                     population: int = 16, crossover: float = 0.5) -> None:
    """Evolutionary search of feasible selections, scoring through ``run`` until it has
    scored ``evaluations`` distinct ones.

    The first generation is the knapsack under both budgets
    (:func:`memory_knapsack_selection`, where pg starts too) and random feasible
    selections; then each generation of ``batch`` children takes parents by tournament
    (of two) among the ``population`` best scored so far, crosses two of them (uniformly,
    with probability ``crossover``), flips each decision with probability 1/layers
    (at least one), and repairs the child (:func:`repair`)."""
    costs = np.asarray(costs, dtype=np.int64)
    n = len(costs)
    scored: dict[bytes, tuple[float, np.ndarray]] = {}

    def score(masks: list[np.ndarray]) -> None:
        for m, r in zip(masks, run.score(masks)):
            if not np.isnan(r):
                scored[np.packbits(m).tobytes()] = (float(r), m)

    first = [memory_knapsack_selection(values, costs, budget, memory)]
    first += [random_selection(costs, budget, rng, memory) for _ in range(population - 1)]
    score(first[:max(run.evaluations_left(), 0)])

    def child() -> np.ndarray:
        pool = sorted(scored.values(), key=lambda sm: -sm[0])[:population]

        def parent() -> np.ndarray:
            a, b = rng.integers(len(pool), size=2)
            return pool[min(a, b)][1]  # the pool is best first: the better of two

        kid = parent().copy()
        if rng.random() < crossover:
            kid = np.where(rng.random(n) < 0.5, kid, parent())
        flip = rng.random(n) < 1.0 / n
        flip[rng.integers(n)] = True
        return repair(kid ^ flip, costs, budget, memory, rng)

    for _ in range(MAX_PROPOSALS_PER_EVALUATION * max(evaluations, 1)):
        left = run.evaluations_left()
        if left <= 0 or not scored:
            return
        kids: dict[bytes, np.ndarray] = {}
        for _ in range(MAX_PROPOSALS_PER_EVALUATION * batch):
            if len(kids) >= min(batch, left):
                break
            kid = child()
            key = np.packbits(kid).tobytes()
            if run.is_new(kid) and key not in kids:
                kids[key] = kid
        if not kids:
            return  # no new feasible selection near the population: the driver tops up
        score(list(kids.values()))


class Run(Protocol):
    """What a selector scores through (:class:`~swr.policies.search.SearchRun`)."""

    def score(self, masks: list[np.ndarray]) -> list[float]: ...

    def evaluations_left(self) -> int: ...

    def is_new(self, mask: np.ndarray) -> bool: ...


#: Proposals per allowed evaluation before a selector gives up finding new selections
#: (a space smaller than the evaluations asked for, or a rule that keeps repeating).
MAX_PROPOSALS_PER_EVALUATION = 50


def propose_until_done(propose: Callable[[int], np.ndarray], run: Run, evaluations: int,
                       batch: int = 8) -> None:
    """Score ``propose(i)`` for i = 0, 1, ... until ``run`` has scored ``evaluations``
    distinct selections (or proposals run out), ``batch`` new ones per scoring call."""
    pending: list[np.ndarray] = []
    new: set[bytes] = set()
    for i in range(MAX_PROPOSALS_PER_EVALUATION * max(evaluations, 1)):
        left = run.evaluations_left()
        if left - len(new) <= 0:
            break
        mask = propose(i)
        pending.append(mask)
        if run.is_new(mask):
            new.add(np.packbits(mask).tobytes())
        if len(pending) >= batch or len(new) >= left:
            run.score(pending)
            pending, new = [], set()
    if pending:
        run.score(pending)


def perturbed_search(rule: Callable[[np.ndarray], np.ndarray], values: np.ndarray,
                     evaluations: int, rng: np.random.Generator, run: Run,
                     batch: int = 8) -> None:
    """Score ``rule(values)``, then ``rule`` on noisier and noisier copies of ``values``.

    The first ``evaluations`` proposals scale each value by log-normal noise. That never
    changes a value's sign, so when it keeps proposing selections already scored (all
    importances at or below zero give the empty selection every time), the proposals
    after those add Gaussian noise on the values' own scale instead, which can.
    """
    scale = float(np.std(values)) or float(np.abs(values).max()) or 1.0

    def propose(i: int) -> np.ndarray:
        if i == 0:
            return rule(values)
        sigma = 0.2 + 0.8 * i / max(evaluations, 1)
        if i < evaluations:
            return rule(values * rng.lognormal(0.0, sigma, size=len(values)))
        return rule(values + rng.normal(0.0, scale * sigma, size=len(values)))

    propose_until_done(propose, run, evaluations, batch)


#: The rule each perturbed reference selector applies to (perturbed) importances.
RULES: dict[str, Callable[..., np.ndarray]] = {
    "greedy": greedy_selection,
    "knapsack": memory_knapsack_selection,
    "knapsack-repaired": repaired_knapsack_selection,
    "greedy-memory": greedy_memory_selection,
}


def run_selector(name: str, values: Sequence[float], costs: Sequence[int], budget: int,
                 evaluations: int, seed: int, run: Run, batch: int = 8,
                 memory: Optional[MemoryLimit] = None) -> None:
    """Run reference selector ``name`` (random, evolution, or one of :data:`RULES`),
    scoring through ``run`` until it has scored ``evaluations`` distinct selections, each
    within ``budget`` parameters and, given ``memory``, its budget of saved bytes."""
    rng = np.random.default_rng(seed)
    values = np.asarray(values, dtype=np.float64)
    costs = np.asarray(costs, dtype=np.int64)
    if name == "random":
        propose_until_done(lambda i: random_selection(costs, budget, rng, memory), run,
                           evaluations, batch)
    elif name == "evolution":
        evolution_search(values, costs, budget, memory, evaluations, rng, run, batch,
                         population=2 * batch)
    elif name in RULES:
        rule = RULES[name]
        perturbed_search(lambda v: rule(v, costs, budget, memory), values, evaluations,
                         rng, run, batch)
    else:
        raise ValueError(f"unknown selector {name!r}")


class SelectorSearcher(PoolSearcher):
    """The reference selectors (``random``, ``greedy``, ``knapsack``, ``knapsack-repaired``,
    ``greedy-memory``, ``evolution``)."""

    def __init__(self, settings, name: str):
        super().__init__(settings)
        self.name = name

    def propose(self, problem, run) -> None:
        s = self.settings
        run_selector(self.name, problem.importance, problem.costs, problem.budget_params,
                     s.evaluations, s.seed, run,
                     batch=max(s.samples_per_iteration, s.workers or 1), memory=problem.memory)


register_searcher("random", lambda s: SelectorSearcher(s, "random"),
                  "random feasible selections")
register_searcher("greedy", lambda s: SelectorSearcher(s, "greedy"),
                  "layers by stage-1 Taylor importance per parameter, then perturbed")
register_searcher("knapsack", lambda s: SelectorSearcher(s, "knapsack"),
                  "exact knapsack over stage-1 Taylor importance, then perturbed")
register_searcher("knapsack-repaired", lambda s: SelectorSearcher(s, "knapsack-repaired"),
                  "knapsack over parameters, then its earliest layers dropped until "
                  "--train-memory fits; then perturbed")
register_searcher("greedy-memory", lambda s: SelectorSearcher(s, "greedy-memory"),
                  "layers by stage-1 Taylor importance per saved byte of training memory, "
                  "then perturbed")
register_searcher("evolution", lambda s: SelectorSearcher(s, "evolution"),
                  "evolutionary search of feasible selections (as in Sparse Update)")
