"""One budget-conditioned search for a list of budgets against a search per budget.

On a target task from a pre-trained source model (stage 1 trained once and cached
first, so every search below reuses it and the timings are those of stage 2):

(a) wall time of one ``swr search --budget 1%,2%,5%,10%`` (pg, ``--evaluations N`` in
    total) against one single-budget pg search with the same ``--evaluations N``;
(b) each budget's best validation score from that search against a separate pg search
    at that budget and the knapsack selector at that budget, each with N evaluations;
(c) pg with the knapsack prior against pg from a random network (``prior_steps=0``),
    both budget lists with N evaluations, for each seed.

    python benchmarks/budget_conditioned.py --checkpoint CKPT [--task kws-synth:de]
        [--budgets 1%,2%,5%,10%] [--evaluations 48] [--seeds 1] [--prior-seeds 2]

Writes its section of docs/SEARCH.md and OUT/results.json (OUT: --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from _common import ROOT, machine, md_table, print_table, write_section

DOC = ROOT / "docs" / "SEARCH.md"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="swr pretrain folder of the source model")
    p.add_argument("--task", default="kws-synth:de")
    p.add_argument("--budgets", default="1%,2%,5%,10%")
    p.add_argument("--evaluations", type=int, default=48, help="N, per search")
    p.add_argument("--seeds", type=int, default=1, help="seeds of (a) and (b)")
    p.add_argument("--prior-seeds", type=int, default=2, help="seeds of (c)")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--supernet-epochs", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", default=str(ROOT / "runs" / "budget_conditioned"))
    p.add_argument("--no-doc", action="store_true", help="print only")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine()

    from swr.policies.pg import PGConfig, PGSearcher
    from swr.policies.registry import register_searcher
    from swr.search import SearchConfig, run_search
    from swr.supernet import SupernetConfig

    budgets = args.budgets.split(",")
    out = Path(args.out)
    results: dict = {"args": vars(args), "runs": []}

    def search(name: str, policy: str, budget: str, seed: int, evaluations: int) -> dict:
        cfg = SearchConfig(task=args.task, checkpoint=args.checkpoint, budget=budget,
                           out=str(out / f"seed{seed}" / name), policy=policy, seed=seed,
                           evaluations=evaluations, workers=args.workers, progress=False,
                           device="cpu",
                           supernet=SupernetConfig(epochs=args.supernet_epochs, progress=False))
        t = time.perf_counter()
        r = run_search(cfg)
        wall = time.perf_counter() - t
        entries = r.get("budgets", [r])
        rec = {"name": name, "policy": policy, "budget": budget, "seed": seed, "wall_s": wall,
               "search_s": r["seconds"]["search"], "supernet_s": r["seconds"]["supernet"],
               "evaluations": r["evaluations"],
               "val": {e["budget"]: e["val_score"] for e in entries},
               "cost": {e["budget"]: [e["cost"], e["budget_params"]] for e in entries}}
        results["runs"].append(rec)
        print(f"{name} seed {seed}: {wall:.1f} s wall ({rec['search_s']:.1f} s search), "
              f"{rec['evaluations']} evaluations, val {rec['val']}", flush=True)
        return rec

    # stage 1 once, into the cache every search below reads
    t = time.perf_counter()
    warm = search("stage1", "knapsack", budgets[0], 0, 1)
    stage1_s = time.perf_counter() - t
    n = args.evaluations
    table_ab, table_c, walls = [], [], []
    for seed in range(args.seeds):
        multi = search("pg-list", "pg", ",".join(budgets), seed, n)
        singles = {b: search(f"pg-{b}", "pg", b, seed, n) for b in budgets}
        knap = {b: search(f"knapsack-{b}", "knapsack", b, seed, n) for b in budgets}
        walls.append((multi["wall_s"], statistics.mean(s["wall_s"] for s in singles.values()),
                      multi["search_s"], statistics.mean(s["search_s"] for s in singles.values())))
        for b in budgets:
            table_ab.append([b, seed, f"{multi['val'][b]:.4f}", f"{singles[b]['val'][b]:.4f}",
                             f"{knap[b]['val'][b]:.4f}", f"{multi['cost'][b][0]}/{multi['cost'][b][1]}"])
    register_searcher("pg-noprior", lambda s: PGSearcher(s, PGConfig(prior_steps=0)),
                      "pg from a random network (ablation)")
    for seed in range(args.prior_seeds):
        done = [r for r in results["runs"] if r["name"] == "pg-list" and r["seed"] == seed]
        with_prior = done[0] if done else search("pg-list", "pg", ",".join(budgets), seed, n)
        without = search("pg-noprior-list", "pg-noprior", ",".join(budgets), seed, n)
        for b in budgets:
            table_c.append([b, seed, f"{with_prior['val'][b]:.4f}", f"{without['val'][b]:.4f}"])

    head_ab = ["budget", "seed", "4-budget pg search", "separate pg search", "knapsack",
               "cost/budget (4-budget)"]
    head_c = ["budget", "seed", "pg with prior", "pg without prior"]
    wall_rows = [[seed, f"{m:.1f}", f"{s:.1f}", f"{m / s:.2f}", f"{ms:.1f}", f"{ss:.1f}",
                  f"{ms / ss:.2f}"] for seed, (m, s, ms, ss) in enumerate(walls)]
    head_w = ["seed", "4-budget search wall s", "single-budget search wall s (mean of 4)",
              "ratio", "4-budget stage 2 s", "single stage 2 s", "ratio (stage 2)"]
    for h, rows in ((head_w, wall_rows), (head_ab, table_ab), (head_c, table_c)):
        print_table(h, rows)
    out.mkdir(parents=True, exist_ok=True)
    results["stage1_s"] = stage1_s
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if args.no_doc:
        return
    body = (f"Task `{args.task}`, budgets {args.budgets}, {n} distinct evaluations per search "
            f"(the 4-budget search: {n} in total), `--workers {args.workers}`, supernet "
            f"{args.supernet_epochs} epochs, trained (or read from the cache: "
            f"{warm['supernet_s']:.0f} s) by a first search of {warm['evaluations']} "
            "scoring and read from the cache by every search below; the wall times are "
            "whole `run_search` calls.\n\n"
            "(a) Wall time, one search of the 4 budgets vs one single-budget search:\n\n"
            + md_table(head_w, wall_rows) +
            "\n\n(b) Best validation score per budget:\n\n" + md_table(head_ab, table_ab) +
            "\n\n(c) pg with the knapsack prior vs from a random network (4-budget searches):"
            "\n\n" + md_table(head_c, table_c))
    write_section("budget_conditioned", "One search for a list of budgets", body, info, DOC)


if __name__ == "__main__":
    main()
