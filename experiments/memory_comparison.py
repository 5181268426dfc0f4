"""The learned policy against the memory-aware references, under a parameter budget and a
training-memory budget at once (issue #33).

For every seed: one supernet (cached, shared by every searcher of that seed), then each
searcher (``pg``, ``knapsack-repaired``, ``greedy-memory``, ``evolution`` by default)
searches with the same number of *distinct* evaluations under ``--budget`` and
``--train-memory`` (``swr search``). Reported per searcher: the score of its final
selection on the supernet (what every searcher maximises: the evaluator's mean
log-likelihood on validation by default), the paired difference ``first - other`` over
seeds with its 95% t interval, the selection's measured saved bytes as a share of full
fine-tuning's, and the search's seconds. With ``--epochs N`` each selection also gets the
same final training (``swr finetune``) and its test accuracy is reported the same way.

    python experiments/memory_comparison.py --task kws-synth:de --checkpoint CKPT_EN \\
        --budget 5% --train-memory 30% --seeds 3 --evaluations 16 --supernet-epochs 4

Every finished cell is appended to ``OUT/cells.jsonl`` at once, so an interrupted run
continues where it stopped (same command); the table is printed and written to
``OUT/results.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import folder_slug, md_table, mean_ci95  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", required=True, help="task spec, e.g. kws-synth:de")
    p.add_argument("--checkpoint", required=True, help="swr pretrain folder of the base")
    p.add_argument("--budget", default="5%", help="parameter budget (swr search --budget)")
    p.add_argument("--train-memory", default="30%", help="memory budget (--train-memory)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    p.add_argument("--policies", default="pg,knapsack-repaired,greedy-memory,evolution",
                   help="searchers; the first is compared with each of the others")
    p.add_argument("--evaluations", type=int, default=16,
                   help="distinct selections each searcher scores")
    p.add_argument("--supernet-epochs", type=int, default=4, help="stage-1 epochs")
    p.add_argument("--epochs", type=int, default=0,
                   help="final training epochs of every selection (0: none, scores only)")
    p.add_argument("--out", default=str(ROOT / "runs" / "memory_comparison"),
                   help="folder for the runs and cells.jsonl (resumable)")
    args = p.parse_args(argv)
    args.policy_list = [x.strip() for x in args.policies.split(",") if x.strip()]
    return args


def run_cell(args, seed: int, policy: str) -> dict:
    """One search (and, with ``--epochs``, its final training): a row of cells.jsonl."""
    from swr.app.search import SearchConfig, run_search
    from swr.supernet import SupernetConfig

    folder = (Path(args.out) / folder_slug(args.task) / f"b{args.budget.rstrip('%')}"
              f"-m{folder_slug(args.train_memory)}" / f"s{seed}")
    cfg = SearchConfig(task=args.task, checkpoint=args.checkpoint, budget=args.budget,
                       train_memory=args.train_memory, out=str(folder / policy), policy=policy,
                       seed=seed, evaluations=args.evaluations, workers=0, device="cpu",
                       progress=False, overwrite=True,
                       supernet=SupernetConfig(epochs=args.supernet_epochs, gates="budget"))
    t0 = time.perf_counter()
    sel = run_search(cfg)
    row = {"task": args.task, "budget": args.budget, "train_memory": args.train_memory,
           "seed": seed, "policy": policy, "val_score": sel["val_score"],
           "reward": sel["reward"], "evaluations": sel["evaluations"],
           "evaluations_topped_up": sel["evaluations_topped_up"],
           "feasible_selections": sel["feasible_selections"],
           "layers": list(sel["layers"]), "cost": sel["cost"],
           "budget_params": sel["budget_params"], "norms_trained": sel["norms_trained"],
           "saved_bytes": sel["training_memory"]["saved_bytes"],
           "memory_model_saved_bytes": sel["memory_model_saved_bytes"],
           "train_memory_bytes": sel["train_memory_bytes"],
           "full_finetune_saved_bytes": sel["full_finetune_saved_bytes"],
           "search_s": sel["seconds"]["search"], "supernet_s": sel["seconds"]["supernet"],
           "wall_s": time.perf_counter() - t0}
    if args.epochs > 0:
        from swr.app.finetune import finetune

        m = finetune(folder / policy / "selection.json", folder / f"{policy}-final",
                     epochs=args.epochs, seed=seed, device="cpu", progress=False)
        row.update(final_val_acc=m["val_acc"], final_test_acc=m["test_acc"])
    return row


def paired(cells: list[dict], first: str, other: str, key: str, scale: float) -> list[float]:
    """``scale * (first - other)`` of ``key`` over the seeds both have."""
    by = {(c["seed"], c["policy"]): c for c in cells}
    return [scale * (by[(s, first)][key] - by[(s, other)][key])
            for s, p in sorted(by) if p == first and (s, other) in by]


def fmt_diff(xs: list[float]) -> str:
    """A mean difference and its 95% t interval to 4 decimals (scores differ by
    thousandths of a nat), ``*`` when the interval excludes zero."""
    if not xs:
        return "-"
    m, lo, hi = mean_ci95(xs)
    if len(xs) < 2:
        return f"{m:+.4f} (n=1)"
    return f"{m:+.4f} [{lo:+.4f}, {hi:+.4f}]" + (" *" if lo > 0 or hi < 0 else "")


def render(cells: list[dict], args) -> str:
    first = args.policy_list[0]
    metrics = [("val_score", "val score", 1.0)]
    if all("final_test_acc" in c for c in cells):
        metrics.append(("final_test_acc", "test %", 100.0))
    headers = ["searcher"]
    for _, name, _ in metrics:
        headers += [f"{name} (per seed)", f"{first} - searcher"]
    headers += ["saved bytes % of full FT", "layers", "search s"]
    rows = []
    for p in args.policy_list:
        sub = sorted((c for c in cells if c["policy"] == p), key=lambda c: c["seed"])
        if not sub:
            continue
        row = [p]
        for key, _, scale in metrics:
            xs = [scale * c[key] for c in sub]
            row += [f"{statistics.mean(xs):.4f} ({', '.join(f'{x:.4f}' for x in xs)})",
                    "-" if p == first else fmt_diff(paired(cells, first, p, key, scale))]
        row += [", ".join(f"{100 * c['saved_bytes'] / c['full_finetune_saved_bytes']:.1f}"
                          for c in sub),
                ", ".join(str(len(c["layers"])) for c in sub),
                f"{statistics.mean(c['search_s'] for c in sub):.1f}"]
        rows.append(row)
    c0 = cells[0]
    head = (f"`{args.task}` from `{args.checkpoint}`; --budget {args.budget} "
            f"({c0['budget_params']} parameters), --train-memory {args.train_memory} "
            f"({c0['train_memory_bytes']} of the {c0['full_finetune_saved_bytes']} bytes full "
            f"fine-tuning saves); {args.evaluations} distinct evaluations per searcher; "
            f"supernet {args.supernet_epochs} epochs; seeds "
            f"{sorted({c['seed'] for c in cells})}; score: {c0['reward']} on validation, "
            f"paired differences with 95% t intervals over seeds.")
    return head + "\n\n" + md_table(headers, rows) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "cells.jsonl"
    cells = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    done = {(c["task"], c["budget"], c["train_memory"], c["seed"], c["policy"]) for c in cells}
    for seed in range(args.seeds):
        for policy in args.policy_list:
            if (args.task, args.budget, args.train_memory, seed, policy) in done:
                continue
            row = run_cell(args, seed, policy)
            with open(log, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            cells.append(row)
            print(f"seed {seed} {policy}: val {row['val_score']:.4f}, "
                  f"{len(row['layers'])} layers, {row['search_s']:.1f} s", flush=True)
    mine = [c for c in cells if (c["task"], c["budget"], c["train_memory"])
            == (args.task, args.budget, args.train_memory) and c["policy"] in args.policy_list]
    text = render(mine, args)
    (out / "results.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
