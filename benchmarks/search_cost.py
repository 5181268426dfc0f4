"""What the whole SWR pipeline costs next to a full fine-tune of the same model.

SWR = supernet training (E epochs) + per-layer statistics + policy search (N
evaluations, ``swr.search.search``) + final training of the chosen deltas, task
norms and head (E epochs, ``swr.train.train``) + folding. The reference is
``swr.methods.run_method("full", ...)`` for the same E epochs on the same task and
machine. Both start from the same base model; the supernet cache is pointed at a
temporary folder so nothing is reused between runs.

    python benchmarks/search_cost.py [--quick] [--epochs E] [--evaluations N] [--workers W]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from _common import bench_task, kws_base, machine, md_table, print_table, task_line, write_section

BACKBONE = "bcresnet-2"
BUDGET = "5%"


def final_training(supernet, base, task, layers, epochs: int, seed: int = 0):
    """Stage 3 as ``swr finetune`` runs it: selected deltas + norms + head, then fold."""
    from swr.fold import fold
    from swr.reparam import set_selection, set_trainable
    from swr.train import TrainConfig, train

    model = copy.deepcopy(supernet)
    set_selection(model, layers)
    params = set_trainable(model, deltas=layers, norms=True, head=True)
    t0 = time.perf_counter()
    result = train(model, task, params, TrainConfig(epochs=epochs, seed=seed, device="cpu",
                                                    progress=False, desc="finetune"))
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    fold(model.cpu())
    return t_train, time.perf_counter() - t0, result.val_acc


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="E=2, N=16 (a few minutes)")
    ap.add_argument("--epochs", type=int, default=None, help="E (default 5; quick 2)")
    ap.add_argument("--evaluations", type=int, default=None, help="N (default 40; quick 16)")
    ap.add_argument("--workers", type=int, default=0, help="Ray workers for the search (0: none)")
    ap.add_argument("--policy", default="pg")
    ap.add_argument("--task", default="auto",
                    help="auto (kws-synth:de if cached, else synthetic), synthetic, or a spec")
    ap.add_argument("--checkpoint", default=None, help="swr pretrain folder of the source model")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: see docs/PERFORMANCE.md)")
    ap.add_argument("--no-doc", action="store_true", help="print only; leave the doc alone")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from swr.methods import run_method
    from swr.parallel import shutdown_ray
    from swr.search import SearchConfig, search
    from swr.supernet import SupernetConfig
    from swr.train import TrainConfig

    epochs = args.epochs or (2 if args.quick else 5)
    evaluations = args.evaluations or (16 if args.quick else 40)
    info = machine()
    task = bench_task(args.task)  # loaded before SWR_CACHE moves: the data stays cached
    base, base_desc = kws_base(BACKBONE, task.num_classes, args.checkpoint)
    print(task_line(task), "; base", base_desc, flush=True)

    with tempfile.TemporaryDirectory(prefix="swr-bench-") as tmp:
        os.environ["SWR_CACHE"] = tmp  # a fresh supernet cache: stage 1 really runs
        cfg = SearchConfig(task=task.id, checkpoint="", budget=BUDGET, out=os.path.join(tmp, "out"),
                           policy=args.policy, evaluations=evaluations, workers=args.workers,
                           device="cpu", progress=False,
                           supernet=SupernetConfig(epochs=epochs, progress=False))
        t0 = time.perf_counter()
        result, supernet = search(copy.deepcopy(base), task, cfg, backbone=BACKBONE)
        t_search_total = time.perf_counter() - t0
        shutdown_ray()
        meta = json.loads((Path(result["supernet"]) / "supernet.json").read_text())
    t_train, t_fold, final_acc = final_training(supernet, base, task, result["layers"], epochs)
    t_swr = t_search_total + t_train + t_fold
    t0 = time.perf_counter()
    full = run_method("full", base, task, None,
                      TrainConfig(epochs=epochs, device="cpu", progress=False, desc="full"))
    t_full = time.perf_counter() - t0

    s_super = result["seconds"]["supernet"]
    s_train_super = meta["seconds"]  # the training loop alone; the rest is layer statistics
    s_stats = s_super - s_train_super
    s_search = result["seconds"]["search"]
    s_other = t_search_total - s_super - s_search  # budget, features, CSV/PNG outputs
    per_eval = s_search / max(result["evaluations"], 1)
    stages = [
        ["1. supernet training", round(s_train_super, 1), f"{100 * s_train_super / t_swr:.0f}%",
         round(s_train_super / t_full, 2)],
        ["   per-layer statistics (8 x 128 clips, forward + backward), cache write",
         round(s_stats, 1),
         f"{100 * s_stats / t_swr:.0f}%", round(s_stats / t_full, 2)],
        [f"2. policy search ({result['evaluations']} evaluations, {args.policy}, "
         f"{args.workers or 'no'} Ray workers)", round(s_search, 1),
         f"{100 * s_search / t_swr:.0f}%", round(s_search / t_full, 2)],
        ["   search set-up and outputs", round(s_other, 1), f"{100 * s_other / t_swr:.0f}%",
         round(s_other / t_full, 2)],
        ["3. final training of the selection", round(t_train, 1), f"{100 * t_train / t_swr:.0f}%",
         round(t_train / t_full, 2)],
        ["   fold", round(t_fold, 2), f"{100 * t_fold / t_swr:.1f}%", round(t_fold / t_full, 3)],
        ["SWR pipeline, total", round(t_swr, 1), "100%", round(t_swr / t_full, 2)],
        ["full fine-tune (run_method('full'), whole call)", round(t_full, 1), "-", 1.0],
        ["  of which training", round(full["train_seconds"], 1), "-",
         round(full["train_seconds"] / t_full, 2)],
    ]
    headers = ["stage", "s", "share of SWR", "x full fine-tune"]
    print_table(headers, stages)
    accs = (f"validation accuracy: SWR selection after final training {final_acc:.3f} "
            f"(search's best supernet score {result['val_score']:.3f}), full fine-tune "
            f"{full['val_acc']:.3f}; selection: {len(result['layers'])} layers, "
            f"{result['cost']:,} of {result['budget_params']:,} budget parameters")
    print(accs)
    if args.no_doc:
        return
    body = f"""{task_line(task)}; `{BACKBONE}` base {base_desc}; E = {epochs} epochs for the
supernet, the final training and the full fine-tune; N = {evaluations} evaluations;
budget {BUDGET}; batch size 64; {args.threads} torch thread(s). One run.

{md_table(headers, stages)}

One search evaluation cost {per_eval:.2f} s here ({per_eval / (t_full / epochs):.2f} epochs of
full fine-tuning). {accs}.
"""
    write_section("search_cost", "Cost of the SWR pipeline against full fine-tuning "
                  "(`benchmarks/search_cost.py`)", body, info)


if __name__ == "__main__":
    main()
