"""What limits SWR on BatchNorm-heavy bases: its task norms, which a small budget cannot hold.

Runs SWR at a budget twice per (task, seed) with the same search settings as
``swr bench``: as the bench does (``norms="auto"``: the norms train only when they fit
the budget) and with the norms trained beside the deltas outside the budget
(``norms="free"``), and prints the accuracy of each and the paired difference.

    python experiments/norms_ablation.py --checkpoint ckpt/en --task kws-synth:fr \\
        --task kws-synth:de --task kws-synth:pl --budget 5% --seeds 1
"""

from __future__ import annotations

import argparse
import json
import statistics

import swr.policies  # noqa: F401  (registers the searchers)
from swr.app.bench import BenchConfig, configure_method, method_lr
from swr.budget import Budget, backbone_params
from swr.methods import run_method
from swr.source import BaseSpec, load_base, load_task
from swr.stats import paired_interval
from swr.train import TrainConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--task", action="append", required=True)
    p.add_argument("--budget", default="5%")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--epochs", type=int, default=10)
    args = p.parse_args()
    base, desc = load_base(BaseSpec(checkpoint=args.checkpoint))
    budget = Budget.parse(args.budget).resolve(backbone_params(base))
    cfg = BenchConfig(tasks=args.task, checkpoint=args.checkpoint, methods=["swr"],
                      budgets=[args.budget], out="", epochs=args.epochs, device="cpu")
    rows = []
    for spec in args.task:
        task = load_task(spec, desc)
        for seed in range(args.seeds):
            out = {"task": spec, "seed": seed}
            for norms in ("auto", "free"):
                method = configure_method("swr", cfg, seed, desc["backbone"], {"norms": norms})
                tc = TrainConfig(epochs=args.epochs, lr=method_lr("swr", cfg, desc["backbone"]),
                                 seed=seed, device="cpu", progress=False)
                row = run_method(method, base, task, budget, tc)
                out[norms] = {"test_acc": row["test_acc"], "updated_params": row["updated_params"],
                              "norm_params": row["norm_params"]}
            print(json.dumps(out))
            rows.append(out)
    d = [r["free"]["test_acc"] - r["auto"]["test_acc"] for r in rows]
    mean, lo, hi = paired_interval(d)
    print(f"norms free minus auto at {args.budget}: {100 * mean:+.2f} points "
          f"[{100 * lo:+.2f}, {100 * hi:+.2f}] over {len(d)} runs; auto averages "
          f"{100 * statistics.mean(r['auto']['test_acc'] for r in rows):.2f}%, free "
          f"{100 * statistics.mean(r['free']['test_acc'] for r in rows):.2f}%")


if __name__ == "__main__":
    main()
