"""Reference selectors the policy must beat, under the same evaluator and evaluation count.

* random search: random feasible selections,
* greedy: layers by stage-1 Taylor importance per parameter, filled while they fit,
* knapsack: the exact 0/1 knapsack optimum of Taylor importance under the budget
  (dynamic programming over integer costs).

Greedy and knapsack each give one deterministic selection; with more evaluations
allowed they spend the rest on the same rule over multiplicatively perturbed
importances (additive noise once multiplicative noise only repeats itself). Every
selector proposes until it has scored its number of *distinct* selections (repeats
cost nothing), so each gets the same number of scorings.
"""

from __future__ import annotations

from functools import reduce
from math import gcd
from typing import Callable, Protocol, Sequence

import numpy as np

from .registry import register_searcher
from .search import PoolSearcher

def random_selection(costs: np.ndarray, budget: int, rng: np.random.Generator) -> np.ndarray:
    """A random feasible selection: layers in random order, each kept with a random
    per-selection probability while it fits (so sparse and full selections both occur)."""
    mask = np.zeros(len(costs), dtype=bool)
    keep = rng.uniform(0.2, 1.0)
    left = budget
    for i in rng.permutation(len(costs)):
        if costs[i] <= left and rng.random() < keep:
            mask[i] = True
            left -= costs[i]
    return mask


def importance_order(values: np.ndarray, costs: np.ndarray) -> np.ndarray:
    """Layer indices by value per parameter, highest first (ties in network order)."""
    return np.argsort(-np.asarray(values, dtype=np.float64) / np.asarray(costs, dtype=np.float64),
                      kind="stable")


def greedy_selection(values: np.ndarray, costs: np.ndarray, budget: int) -> np.ndarray:
    """Highest value per parameter first; skip what does not fit, continue down the list."""
    mask = np.zeros(len(costs), dtype=bool)
    left = budget
    for i in importance_order(values, costs):
        if values[i] <= 0:
            break
        if costs[i] <= left:
            mask[i] = True
            left -= costs[i]
    return mask


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


def run_selector(name: str, values: Sequence[float], costs: Sequence[int], budget: int,
                 evaluations: int, seed: int, run: Run, batch: int = 8) -> None:
    """Run reference selector ``name`` (random | greedy | knapsack), scoring through
    ``run`` until it has scored ``evaluations`` distinct selections."""
    rng = np.random.default_rng(seed)
    values = np.asarray(values, dtype=np.float64)
    costs = np.asarray(costs, dtype=np.int64)
    if name == "random":
        propose_until_done(lambda i: random_selection(costs, budget, rng), run, evaluations, batch)
    elif name == "greedy":
        perturbed_search(lambda v: greedy_selection(v, costs, budget), values, evaluations,
                         rng, run, batch)
    elif name == "knapsack":
        perturbed_search(lambda v: knapsack_selection(v, costs, budget), values, evaluations,
                         rng, run, batch)
    else:
        raise ValueError(f"unknown selector {name!r}")


class SelectorSearcher(PoolSearcher):
    """Searchers ``random``, ``greedy`` and ``knapsack`` (the reference selectors)."""

    def __init__(self, settings, name: str):
        super().__init__(settings)
        self.name = name

    def propose(self, problem, run) -> None:
        s = self.settings
        run_selector(self.name, problem.importance, problem.costs, problem.budget_params,
                     s.evaluations, s.seed, run,
                     batch=max(s.samples_per_iteration, s.workers or 1))


register_searcher("random", lambda s: SelectorSearcher(s, "random"),
                  "random feasible selections")
register_searcher("greedy", lambda s: SelectorSearcher(s, "greedy"),
                  "layers by stage-1 Taylor importance per parameter, then perturbed")
register_searcher("knapsack", lambda s: SelectorSearcher(s, "knapsack"),
                  "exact knapsack over stage-1 Taylor importance, then perturbed")
