"""Policy network vs reference selectors at equal evaluation counts (issue: the search).

On a target task from the pre-trained source model: for each seed, one supernet,
then every policy (pg, ppo, random, greedy, knapsack) with the same number of
evaluations; the best selection found (by validation score) gets the final
training, reported next to linear probe and full fine-tuning.

    python benchmarks/policy_comparison.py --checkpoint CKPT [--task kws-synth:de]
        [--budget 5%] [--seeds 3] [--evaluations 80] [--workers 2]

Writes docs/SEARCH.md (between markers) and runs/policy_comparison/results.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--task", default="kws-synth:de")
    p.add_argument("--budget", default="5%")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--evaluations", type=int, default=80)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--supernet-epochs", type=int, default=10)
    p.add_argument("--epochs", type=int, default=15, help="final training / baseline epochs")
    p.add_argument("--policies", help="comma-separated searchers (default: every registered one)")
    p.add_argument("--out", default=str(ROOT / "runs" / "policy_comparison"))
    args = p.parse_args()

    from swr.policies import searcher_names
    from swr.finetune import finetune
    from swr.io import write_json
    from swr.methods import run_method
    from swr.search import SearchConfig, run_search
    from swr.pretrain import load_pretrained
    from swr.supernet import SupernetConfig
    from swr.tasks import get_task
    from swr.train import TrainConfig

    out = Path(args.out)
    policies = args.policies.split(",") if args.policies else searcher_names()
    results: dict = {"args": vars(args), "search": [], "final": []}
    start = time.perf_counter()
    for seed in range(args.seeds):
        best = None
        for policy in policies:
            cfg = SearchConfig(task=args.task, checkpoint=args.checkpoint, budget=args.budget,
                               out=str(out / f"s{seed}-{policy}"), policy=policy, seed=seed,
                               evaluations=args.evaluations, workers=args.workers, device="cpu",
                               supernet=SupernetConfig(epochs=args.supernet_epochs), progress=False)
            t = time.perf_counter()
            r = run_search(cfg)
            row = {"seed": seed, "policy": policy, "val_score": r["val_score"],
                   "evaluations": r["evaluations"], "cost": r["cost"],
                   "budget_params": r["budget_params"], "layers": len(r["layers"]),
                   "seconds": time.perf_counter() - t}
            results["search"].append(row)
            print(json.dumps(row), flush=True)
            if best is None or r["val_score"] > best[1]:
                best = (policy, r["val_score"])
        m = finetune(out / f"s{seed}-{best[0]}" / "selection.json", out / f"s{seed}-final",
                     epochs=args.epochs, seed=seed, device="cpu", progress=False)
        results["final"].append({"seed": seed, "method": f"swr ({best[0]})", "test_acc": m["test_acc"],
                                 "updated_params": m["updated_params"]})
        base, _ = load_pretrained(args.checkpoint)
        task = get_task(args.task)
        for method in ("linear", "full"):
            row = run_method(method, base, task, None,
                             TrainConfig(epochs=args.epochs, lr=5e-3 if method == "linear" else 1e-3,
                                         seed=seed, device="cpu", progress=False))
            results["final"].append({"seed": seed, "method": method, "test_acc": row["test_acc"],
                                     "updated_params": row["updated_params"]})
        print(json.dumps(results["final"][-3:]), flush=True)
        write_json(out / "results.json", results)
    results["minutes"] = (time.perf_counter() - start) / 60
    write_json(out / "results.json", results)
    section = render(results, args)
    update_doc(ROOT / "docs" / "SEARCH.md", "policy_comparison", section)
    print(section)


def render(results: dict, args) -> str:
    lines = [f"Task `{args.task}`, budget {args.budget}, {args.evaluations} evaluations per "
             f"policy, {args.seeds} seeds, {args.workers} Ray workers; supernet "
             f"{args.supernet_epochs} epochs, final training and baselines {args.epochs} epochs. "
             f"Machine: {platform.processor() or platform.machine()}, Python {sys.version.split()[0]}. "
             f"Total {results.get('minutes', 0):.1f} min.", "",
             "Command: `python benchmarks/policy_comparison.py --checkpoint CKPT "
             f"--task {args.task} --budget {args.budget} --seeds {args.seeds} "
             f"--evaluations {args.evaluations} --workers {args.workers}`", "",
             "| policy | best validation score per seed | mean | evaluations |", "|---|---|---|---|"]
    by: dict = {}
    for r in results["search"]:
        by.setdefault(r["policy"], []).append(r)
    for policy, rs in by.items():
        vals = [r["val_score"] for r in rs]
        lines.append(f"| {policy} | {', '.join(f'{v:.4f}' for v in vals)} | "
                     f"{statistics.mean(vals):.4f} | {rs[0]['evaluations']} |")
    lines += ["", "| final method | test accuracy per seed | mean | updated params |", "|---|---|---|---|"]
    fin: dict = {}
    for r in results["final"]:
        fin.setdefault(r["method"].split(" ")[0], []).append(r)
    for method, rs in fin.items():
        accs = [r["test_acc"] for r in rs]
        label = method if method != "swr" else \
            "swr, best policy per seed: " + ", ".join(r["method"][5:-1] for r in rs)
        lines.append(f"| {label} | "
                     f"{', '.join(f'{a:.4f}' for a in accs)} | {statistics.mean(accs):.4f} | "
                     f"{rs[0]['updated_params']:,} |")
    return "\n".join(lines) + "\n"


def update_doc(path: Path, key: str, section: str) -> None:
    from swr.io import write_text

    start, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    text = path.read_text() if path.exists() else "# Search: policy vs reference selectors\n\n"
    block = f"{start}\n{section}{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    write_text(path, text)


if __name__ == "__main__":
    main()
