"""The pipeline on a GPU: supernet training and selection scoring throughput.

With ``--device auto`` (the default) on a machine without CUDA it prints
``no CUDA device; skipped`` and exits 0. On a GPU it measures, for a bcresnet-2
supernet on the embedded kws task (or a synthetic stand-in of ``--n-train`` /
``--n-val`` clips):

* supernet training: training clips per second (``swr.supernet.train_supernet``,
  per-epoch validation included, first epoch excluded as warm-up),
* scoring: ``SupernetEvaluator`` scorings per second and clips per second (BN
  recalibration + validation), plain path and prefix cache, against the floor (a
  forward pass of the base architecture over the same validation batches),
* the whole search (``swr.app.search.search``, policy gradient, in-process and, with
  ``--workers 2``, two Ray workers sharing the GPU).

    python benchmarks/gpu.py [--quick] [--device auto|cuda|cuda:N] [--n-train 4096 --n-val 1024]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import (DOC, bench_task, kws_base, machine, md_table, median, print_table,
                     task_line, timed, write_section)

BACKBONE = "bcresnet-2"
BUDGET = "5%"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer epochs and scorings")
    ap.add_argument("--device", default="auto", help="auto (CUDA if present), cuda, cuda:N")
    ap.add_argument("--task", default="auto",
                    help="auto (kws-synth:de if cached, else synthetic), synthetic, or a spec")
    ap.add_argument("--n-train", type=int, default=4096, help="synthetic stand-in: train clips")
    ap.add_argument("--n-val", type=int, default=1024, help="synthetic stand-in: val clips")
    ap.add_argument("--checkpoint", default=None, help="swr pretrain folder of the source model")
    ap.add_argument("--workers", type=int, default=2, help="Ray workers for the search run "
                                                           "(0: in-process only)")
    ap.add_argument("--doc", default=str(DOC), help="the file whose gpu section is rewritten")
    ap.add_argument("--no-doc", action="store_true", help="print only; leave the doc alone")
    args = ap.parse_args(argv)
    from swr.train import resolve_device

    if args.device == "auto" and not torch.cuda.is_available():
        print("no CUDA device; skipped")
        return
    device = resolve_device(args.device)
    on_gpu = device.type == "cuda"  # --device cpu: the same measurements, printed only
    from swr.envs.evaluator import SupernetEvaluator
    from swr.app.search import SearchConfig, search
    from swr.supernet import SupernetConfig, build_supernet, train_supernet

    info = machine()
    task = bench_task(args.task, args.n_train, args.n_val)
    base, base_desc = kws_base(BACKBONE, task.num_classes, args.checkpoint)
    device_name = torch.cuda.get_device_name(device) if on_gpu else f"CPU ({info['cpu']})"
    print(task_line(task), "; base", base_desc, "; device", device_name, flush=True)
    epochs = 2 if args.quick else 4
    n_scores = 6 if args.quick else 16

    # -- supernet training ---------------------------------------------------------------
    supernet = build_supernet(base, task.num_classes)
    result = train_supernet(supernet, task, SupernetConfig(epochs=epochs, device=str(device),
                                                           progress=False))
    ends = [h["seconds"] for h in result.history]
    steady = (ends[-1] - ends[0]) / max(epochs - 1, 1)  # per epoch, warm-up epoch excluded
    train_rows = [["supernet training (batch 64, random gates, + per-epoch validation)",
                   epochs, round(ends[0], 2), round(steady, 2),
                   round(len(task.train) / steady)]]
    print_table(["stage", "epochs", "first epoch s", "later epochs s", "train clips/s"],
                train_rows)

    # -- scoring ------------------------------------------------------------------------
    from swr.budget import resolve_budget
    from swr.policies.selectors import random_selection
    from swr.reparam import candidates

    supernet.eval()
    cands = candidates(supernet)
    costs = np.array([c.params for c in cands])
    budget = resolve_budget(supernet, BUDGET)
    rng = np.random.default_rng(1)
    sels = [tuple(c.name for c, m in zip(cands, random_selection(costs, budget, rng)) if m)
            for _ in range(2 * n_scores)]
    floor_model = copy.deepcopy(base).to(device).eval()
    floor_model.reset_classifier(task.num_classes)
    floor_model.to(device)
    score_rows = []
    for label, mb in (("plain", 0.0), ("prefix cache (warm)", 256.0)):
        ev = SupernetEvaluator(copy.deepcopy(supernet), task, device=device, prefix_cache_mb=mb)

        def floor():
            with torch.inference_mode():
                for x, _ in ev._val:
                    floor_model(x)
        floor()
        if mb:
            for s in sels[n_scores:]:  # fill the cache first
                ev(s)
        ts, fs = [], []
        for s in sels[:n_scores]:
            fs.append(timed(floor))
            ts.append(timed(lambda: ev(s)))
        clips = sum(len(x) for x, _ in ev._val) + min(len(task.train), ev.bn_batches * ev.bn_batch_size)
        score_rows.append([label, n_scores, round(median(ts) * 1e3, 1), round(1 / median(ts), 1),
                           round(clips / median(ts)), round(median(ts) / median(fs), 2),
                           round(median(fs) * 1e3, 1)])
    score_headers = ["evaluator", "scorings", "ms/scoring", "scorings/s", "clips/s", "x floor",
                     "floor ms"]
    print_table(score_headers, score_rows)

    # -- the search -------------------------------------------------------------------------
    search_rows = []
    worker_counts = sorted({0, args.workers})
    if args.workers and importlib.util.find_spec("ray") is None:
        print("ray is not installed: the search runs in-process only")
        worker_counts = [0]
    with tempfile.TemporaryDirectory(prefix="swr-bench-") as tmp:
        os.environ["SWR_CACHE"] = tmp
        for workers in worker_counts:
            cfg = SearchConfig(task=task.id, checkpoint="", budget=BUDGET,
                               out=os.path.join(tmp, f"out{workers}"), policy="pg",
                               evaluations=n_scores * 2, workers=workers, device=str(device),
                               progress=False,
                               supernet=SupernetConfig(epochs=epochs, progress=False))
            t0 = time.perf_counter()
            r, _ = search(copy.deepcopy(base), task, cfg, backbone=BACKBONE)
            total = time.perf_counter() - t0
            if workers:
                from swr.policies.ray_setup import shutdown_ray

                shutdown_ray()
            search_rows.append([workers or "0 (in-process)", r["evaluations"],
                                round(r["seconds"]["supernet"], 1), round(r["seconds"]["search"], 1),
                                round(r["evaluations"] / r["seconds"]["search"], 2),
                                round(total, 1)])
    search_headers = ["Ray workers", "evaluations", "supernet s (cached after the first run)",
                      "search s", "evaluations/s", "total s"]
    print_table(search_headers, search_rows)
    if args.no_doc or not on_gpu:
        return
    body = f"""{task_line(task)}; `{BACKBONE}` base {base_desc}; device
{device_name}; budget {BUDGET}; pipeline defaults (batch 64 training,
BN recalibration 4 x 128, validation in batches of 512).

{md_table(["stage", "epochs", "first epoch s", "later epochs s", "train clips/s"], train_rows)}

Scoring {n_scores} random 5% selections (timed next to a floor pass each):

{md_table(score_headers, score_rows)}

Whole search (supernet {epochs} epochs, {n_scores * 2} evaluations):

{md_table(search_headers, search_rows)}
"""
    write_section("gpu", "GPU (`benchmarks/gpu.py`)", body, info, doc=Path(args.doc))


if __name__ == "__main__":
    sys.exit(main())
