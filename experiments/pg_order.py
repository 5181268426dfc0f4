"""The order pg decides layers in: the best supernet score each searcher finds.

For each task: one supernet (stage 1 as ``swr search`` trains it, cached), then, for
search seeds 0..N-1, four searchers with the same number of distinct evaluations on it:
``knapsack``, ``random``, and ``pg`` deciding the layers in network order and in
importance order (``PGConfig.order``). Reported per task: the mean best score each found
(the search's own objective; the seed also picks the scoring clips, so scores are
compared within a seed), the paired difference of each pg against the knapsack with a
95% t interval, and the share of the budget the chosen selection spends. No final
training: ``benchmarks/policy_comparison.py`` measures what the choices train to.

    python benchmarks/pg_order.py --task 'kws-synth:ru?speakers=16,24,24=CKPT_EN' \\
        --budget 5% --seeds 8 --evaluations 16 --supernet-epochs 40 --norms none

Rows go to ``OUT/rows.jsonl`` as they finish (an interrupted run continues where it
stopped); the table goes into experiments/SEARCH.md between the ``bench:pg_order`` markers.
"""

from __future__ import annotations

import sys

import argparse
import json
import re
import statistics
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # _common
from _common import ROOT, fmt_ci, md_table, task_checkpoint, write_section

ARMS = ("knapsack", "random", "pg, network order", "pg, importance order")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", action="append", required=True, metavar="SPEC=CHECKPOINT",
                   help="a task and the swr pretrain folder of its base (repeat)")
    p.add_argument("--budget", default="5%")
    p.add_argument("--seeds", type=int, default=8, help="search seeds 0..N-1")
    p.add_argument("--supernet-seed", type=int, default=0)
    p.add_argument("--evaluations", type=int, default=16)
    p.add_argument("--supernet-epochs", type=int, default=40)
    p.add_argument("--norms", default="none", choices=["auto", "budget", "none", "free"])
    p.add_argument("--out", default=str(ROOT / "runs" / "pg_order"))
    p.add_argument("--no-doc", action="store_true", help="do not rewrite experiments/SEARCH.md")
    p.add_argument("--render-only", action="store_true",
                   help="run no search: report the rows OUT holds for these tasks")
    args = p.parse_args(argv)
    args.pairs = [task_checkpoint(p, item) for item in args.task]
    return args


def searcher(arm: str, seed: int, evaluations: int):
    from swr.policies import SearchSettings, build_searcher
    from swr.policies.pg import PGConfig, PGSearcher

    settings = SearchSettings(evaluations=evaluations, seed=seed, device="cpu", progress=False)
    if arm.startswith("pg, "):
        return PGSearcher(settings, PGConfig(order=arm.split(", ")[1].split()[0]))
    return build_searcher(arm, settings)


def run_task(args, spec: str, ckpt: str, rows_path: Path) -> None:
    from swr.selection import search_selection
    from swr.source import base_spec, load_base, load_task
    from swr.supernet import SupernetConfig

    done = set()
    if rows_path.is_file():
        done = {(r["task"], r["arm"], r["seed"]) for r in map(json.loads,
                                                              rows_path.read_text().splitlines())}
    base, meta = load_base(base_spec(ckpt))
    task = load_task(spec, meta)
    supernet = SupernetConfig(epochs=args.supernet_epochs, gates="budget",
                              seed=args.supernet_seed, device="cpu", progress=False)
    folder = Path(args.out) / re.sub(r"[^A-Za-z0-9._-]+", "_", spec)
    for seed in range(args.seeds):
        for arm in ARMS:
            if (spec, arm, seed) in done:
                continue
            t0 = time.perf_counter()
            res, _ = search_selection(base, task, args.budget,
                                      searcher(arm, seed, args.evaluations), supernet,
                                      folder / f"{arm.replace(', ', '-').replace(' ', '-')}-s{seed}",
                                      meta["backbone"], norms=args.norms)
            row = {"task": spec, "arm": arm, "seed": seed, "score": res["val_score"],
                   "cost": res["cost"], "budget_params": res["delta_budget_params"],
                   "layers": res["layers"], "seconds": time.perf_counter() - t0}
            with open(rows_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{spec} seed {seed} {arm}: {row['score']:.4f}, "
                  f"{row['cost']}/{row['budget_params']} params", flush=True)


def report(args, rows: list[dict]) -> str:
    by = {(r["task"], r["arm"], r["seed"]): r for r in rows}
    table = []
    for spec, _ in args.pairs:
        seeds = sorted({s for (t, a, s) in by if t == spec and
                        all((t, x, s) in by for x in ARMS)})
        if not seeds:
            continue
        for arm in ARMS:
            rs = [by[(spec, arm, s)] for s in seeds]
            diff = [1000 * (by[(spec, arm, s)]["score"] - by[(spec, "knapsack", s)]["score"])
                    for s in seeds]
            same = sum(by[(spec, arm, s)]["layers"] == by[(spec, "knapsack", s)]["layers"]
                       for s in seeds)
            table.append([spec, arm, len(seeds), f"{statistics.mean(r['score'] for r in rs):.4f}",
                          "-" if arm == "knapsack" else fmt_ci(diff),
                          f"{100 * statistics.mean(r['cost'] / r['budget_params'] for r in rs):.1f}",
                          f"{min(r['cost'] / r['budget_params'] for r in rs):.0%}",
                          "-" if arm == "knapsack" else f"{same}/{len(seeds)}"])
    head = (f"Budget {args.budget}, `--norms {args.norms}`, stage 1 {args.supernet_epochs} "
            f"epochs on budget gate sets (supernet seed {args.supernet_seed}), "
            f"{args.evaluations} distinct evaluations per search, search seeds 0-"
            f"{args.seeds - 1}. Score: the search's reward (validation log-likelihood); "
            "the difference to the knapsack in thousandths, paired by seed, with its 95% t "
            "interval (`*`: excludes zero).\n\n")
    return head + md_table(["task", "searcher", "seeds", "best score (mean)",
                            "- knapsack (x1000)", "budget spent % (mean)", "budget spent (min)",
                            "same selection as knapsack"], table)


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    for spec, ckpt in args.pairs if not args.render_only else ():
        run_task(args, spec, ckpt, rows_path)
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    body = report(args, rows)
    print(body)
    if not args.no_doc:
        write_section("pg_order", "The order pg decides layers in (`benchmarks/pg_order.py`)",
                      body, doc=ROOT / "experiments" / "SEARCH.md")


if __name__ == "__main__":
    main()
