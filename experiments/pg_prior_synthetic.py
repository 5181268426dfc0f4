"""pg's knapsack prior and its RL settings on synthetic problems (seconds, no task data).

Each problem: 40 layers with costs of a convolutional network, scored by
``swr.envs.SyntheticEvaluator`` (a saturating sum of hidden per-layer utilities minus
a penalty for adjacent selected layers); the "Taylor importance" the knapsack and the
prior see is that utility times log-normal noise (sigma 0.7), so the heuristic is
informative but wrong in places. Every searcher gets the same number of distinct
scorings for the budgets 1%, 2%, 5%, 10% of the total cost: pg one budget-conditioned
search of all four, the reference selectors an equal share per budget (as
``swr search --budget 1%,2%,5%,10%`` runs them). Reported: the best score per budget,
averaged over the problems.

    python benchmarks/pg_prior_synthetic.py [--evaluations 48] [--problems 4]
"""

from __future__ import annotations

import sys

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # _common
from _common import ROOT, machine, md_table, print_table, write_section

DOC = ROOT / "experiments" / "SEARCH.md"
SHARES = (0.01, 0.02, 0.05, 0.1)

#: variant name -> (searcher, PGConfig overrides)
VARIANTS = {
    "knapsack": ("knapsack", None), "random": ("random", None),
    "pg (prior, defaults)": ("pg", {}),
    "pg without imitation (prior_steps=0; importance order kept)": ("pg", {"prior_steps": 0}),
    "pg without prior (prior_steps=0, network order)": ("pg", {"prior_steps": 0,
                                                               "order": "network"}),
    "pg, lr 1e-3": ("pg", {"lr": 1e-3}),
    "pg, prior_coef 0.5": ("pg", {"prior_coef": 0.5}),
    "pg, prior_confidence 0.8": ("pg", {"prior_confidence": 0.8}),
    "pg, prior_confidence 0.95": ("pg", {"prior_confidence": 0.95}),
    "pg, prior_samples 8": ("pg", {"prior_samples": 8}),
    "pg, prior_samples 8, prior_confidence 0.99": ("pg", {"prior_samples": 8,
                                                           "prior_confidence": 0.99}),
    "pg, network order (the default before 2026-12-04)": ("pg", {"order": "network"}),
}


def problem(seed: int):
    from swr.envs import SyntheticEvaluator

    rng = np.random.default_rng(seed)
    n = 40
    costs = rng.choice([64, 128, 256, 512, 1152, 2304, 4608], size=n)
    names = [f"l{i}" for i in range(n)]
    evaluator = SyntheticEvaluator(costs, seed=seed, names=names)
    taylor = evaluator.utility * rng.lognormal(0.0, 0.7, size=n)
    stats = [{"name": nm, "kind": "conv2d", "cost": int(c), "taylor": float(t),
              "shape": (8, 8, 3, 3)} for nm, c, t in zip(names, costs, taylor)]
    return costs, names, evaluator, taylor, stats


def best_per_budget(variant: str, seed: int, evaluations: int) -> list[float]:
    from dataclasses import replace

    from swr.policies.pg import PGConfig, PGSearcher
    from swr.policies.pool import LocalPool
    from swr.policies.registry import SearchSettings
    from swr.policies.search import EvaluationLog, SearchRun
    from swr.policies.selectors import run_selector
    from swr.selection import SearchProblem

    searcher, over = VARIANTS[variant]
    costs, names, evaluator, taylor, stats = problem(seed)
    budgets = [int(costs.sum() * s) for s in SHARES]
    folder = Path(tempfile.mkdtemp(prefix="pg_prior_"))
    log = EvaluationLog(folder / "evaluations.jsonl", names, dict(zip(names, costs)), False)
    run = SearchRun(names, costs, max(budgets), LocalPool(evaluator), log, evaluations, False)
    if searcher == "pg":
        prob = SearchProblem(None, None, names, list(costs), max(budgets), stats, folder,
                             budgets=budgets, budget_labels=[f"{s:%}" for s in SHARES])
        PGSearcher(SearchSettings(evaluations=evaluations, seed=0, progress=False),
                   replace(PGConfig(), **over)).propose(prob, run)
    else:  # an equal share per budget, as the search driver gives them
        for b in budgets:
            share = evaluations // len(budgets)
            run.budget, run.limit = b, len(log.seen) + share
            run_selector(searcher, taylor, costs, b, share, 0, run)
    log.close()
    by_name = dict(zip(names, costs))
    return [max(v for s, v in log.seen.items() if sum(by_name[n] for n in s) <= b)
            for b in budgets]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--evaluations", type=int, default=48, help="distinct scorings in all")
    p.add_argument("--problems", type=int, default=4)
    p.add_argument("--variants", help="names of VARIANTS separated by ; (default: all)")
    p.add_argument("--no-doc", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    info = machine()
    rows = []
    for variant in args.variants.split(";") if args.variants else VARIANTS:
        res = np.array([best_per_budget(variant, seed, args.evaluations)
                        for seed in range(args.problems)])
        rows.append([variant] + [f"{v:.4f}" for v in res.mean(0)] + [f"{res.mean():.4f}"])
        print(rows[-1], flush=True)
    head = ["searcher"] + [f"{s:.0%}" for s in SHARES] + ["mean"]
    print_table(head, rows)
    if not args.no_doc:
        body = (f"{args.problems} synthetic problems, {args.evaluations} distinct scorings in "
                "all per searcher and problem; best score per budget, mean over the problems.\n\n"
                + md_table(head, rows))
        write_section("pg_prior_synthetic", "pg's prior and RL settings on synthetic problems",
                      body, info, DOC)


if __name__ == "__main__":
    main()
