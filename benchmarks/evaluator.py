"""Scoring speed of the SupernetEvaluator, against its floor.

The *floor* is one plain forward pass of the base architecture over the same
validation batches (what scoring a folded task model would cost). One scoring is:
merge the selection's deltas, forward the validation split with BatchNorm statistics
from each validation batch (``bn_stats="val"``, the default: from 32 of its clips,
``bn_clips``; ``"train"`` recalibrates on ``bn_batches x bn_batch_size`` training clips
first), undo. The script measures, on
a bcresnet-2 supernet and the embedded kws task (or its synthetic stand-in):

* selections scored per second and scoring time / floor, for the plain path and the
  prefix-cached path (cold cache, then warm), with the default statistics, with
  statistics from every clip of the batch and with recalibration on training clips, on random selections under a 5% budget
  (what random search and an untrained policy propose) and on late selections (first
  open gate in the second half of the network);
* where a plain scoring's time goes (recalibration / validation / the rest) and the
  top operators (torch.profiler);
* the ideas tried, each timed against its alternative in the same run;
* what the other sources of statistics (more or fewer clips of the validation batch,
  recalibration on training clips, the supernet's) would buy, and how their scores
  rank against statistics from every clip of the batch (their rank agreement with *final*
  accuracy is measured by ``benchmarks/proxy_fidelity.py``).

    python benchmarks/evaluator.py [--quick] [--task auto|synthetic|kws-synth:de] [--threads N]
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
from torch import nn

from swr.stats import kendall_tau, spearman

from _common import (bench_task, kws_base, machine, md_table, median, print_table,
                     random_selections, task_line, timed, write_section)

BACKBONE = "bcresnet-2"
BUDGET = "5%"


def trained_supernet(base, task, epochs: int, seed: int = 0):
    """A supernet on ``base`` trained on ``task`` for ``epochs``, and its validation
    accuracy with all gates open."""
    from swr.supernet import SupernetConfig, build_supernet, train_supernet

    supernet = build_supernet(base, task.num_classes)
    cfg = SupernetConfig(epochs=epochs, seed=seed, device="cpu", progress=False)
    result = train_supernet(supernet, task, cfg)
    return supernet.eval(), result.val_acc


def floor_fn(base: nn.Module, ev):
    """One plain forward pass of the base architecture over the evaluator's val batches."""
    model = copy.deepcopy(base).eval()
    model.reset_classifier(ev.task.num_classes)

    def run():
        with torch.inference_mode():
            for x, _ in ev._val:
                model(x)
    return run


def score_times(ev, sels) -> list[float]:
    return [timed(lambda: ev(s)) for s in sels]



def top_ops(fn, n_ops: int = 8) -> list[list]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [[e.key, e.count, round(e.self_cpu_time_total / 1e3, 1),
             f"{100 * e.self_cpu_time_total / total:.1f}%"] for e in events[:n_ops]]


def ideas(ev_plain, supernet, task, sel) -> list[list]:
    """Each idea against its alternative, timed side by side (median of repeats)."""
    from swr.fold import merge, unmerge
    from swr.reparam import set_selection
    from swr.train import recalibrate_batchnorm, restore_batchnorm

    rows = []
    model = ev_plain.model
    val = ev_plain._val
    reps = 5  # each pair timed back to back, so load drifts hit both alike

    def paired(label, a, b, note):
        ta, tb = [], []
        for _ in range(reps):
            ta.append(timed(a))
            tb.append(timed(b))
        rows.append([label, round(median(ta) * 1e3, 1), round(median(tb) * 1e3, 1),
                     round(median(tb) / median(ta), 2), note])

    def val_pass(grad_mode):
        def run():
            with grad_mode():
                for x, _ in val:
                    model(x)
        return run

    set_selection(model, sel)
    # 1. merge once per selection vs W + g*dW inside every layer call
    merge(model)
    merged = val_pass(torch.inference_mode)
    t_merged = [timed(merged) for _ in range(reps)]
    unmerge(model)
    t_unmerged = [timed(val_pass(torch.inference_mode)) for _ in range(reps)]
    rows.append(["merge W+dW once per selection (done)", round(median(t_merged) * 1e3, 1),
                 round(median(t_unmerged) * 1e3, 1), round(median(t_unmerged) / median(t_merged), 2),
                 "alternative: add the delta inside every layer call (val pass)"])
    # 2. inference_mode vs no_grad for the validation pass
    paired("torch.inference_mode (done)", val_pass(torch.inference_mode), val_pass(torch.no_grad),
           "alternative: torch.no_grad (val pass)")
    # 3. pre-batched in-memory validation tensors vs a DataLoader
    loader = torch.utils.data.DataLoader(task.val, batch_size=ev_plain.batch_size)

    def through_loader():
        with torch.inference_mode():
            for x, _ in loader:
                model(x)
    paired("pre-batched val tensors (done)", val_pass(torch.inference_mode), through_loader,
           "alternative: torch DataLoader over the TensorDataset")
    # 4. restoring BN statistics: direct copies vs load_state_dict(strict=False)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in bns]

    def copy_back():
        for m, (a, b, c) in zip(bns, saved):
            m.running_mean.copy_(a)
            m.running_var.copy_(b)
            m.num_batches_tracked.copy_(c)
    paired("restore BN stats by tensor copies (done, cached path)", copy_back,
           lambda: restore_batchnorm(ev_plain._bn_state),
           "alternative: load_state_dict(strict=False) (plain path)")
    # 5. recalibration in the default 4 x 128 vs one batch of 512 (same clips)
    merge(model)
    paired("recalibrate 4 x 128 (bn_stats='train')",
           lambda: recalibrate_batchnorm(model, task.train, 4, 128),
           lambda: recalibrate_batchnorm(model, task.train, 1, 512),
           "alternative: 1 x 512 (changes the statistics, see fidelity table)")
    unmerge(model)
    restore_batchnorm(ev_plain._bn_state)
    set_selection(model, [])
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer selections (about a minute)")
    ap.add_argument("--task", default="auto",
                    help="auto (kws-synth:de if cached, else synthetic), synthetic, or a spec")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: see docs/PERFORMANCE.md)")
    ap.add_argument("--checkpoint", default=None,
                    help="swr pretrain folder of the source model (default: the cached kws "
                         "source model if any, else random weights)")
    ap.add_argument("--no-doc", action="store_true", help="print only; leave the doc alone")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from swr.envs.evaluator import SupernetEvaluator
    from swr.train import recalibrate_batchnorm

    info = machine()
    task = bench_task(args.task)
    n = 3 if args.quick else 5
    print(task_line(task), flush=True)
    base, base_desc = kws_base(BACKBONE, task.num_classes, args.checkpoint)
    # the search's default is 10 supernet epochs: fewer leave the scores of different
    # selections too close together for the fidelity table to mean anything
    epochs = 3 if args.quick else 10
    supernet, supernet_acc = trained_supernet(base, task, epochs)
    print(f"base {base_desc}; supernet val acc (all gates open) {supernet_acc:.3f}", flush=True)
    ev_plain = SupernetEvaluator(copy.deepcopy(supernet), task, device="cpu", prefix_cache_mb=0)
    ev_recal = SupernetEvaluator(copy.deepcopy(supernet), task, device="cpu", prefix_cache_mb=0,
                                 bn_stats="train")
    ev_all = SupernetEvaluator(copy.deepcopy(supernet), task, device="cpu", prefix_cache_mb=0,
                               bn_clips=None)
    floor = floor_fn(base, ev_plain)
    floor()
    sels = {"random 5%": random_selections(supernet, 2 * n, seed=1, budget=BUDGET),
            "late 5%": random_selections(supernet, 2 * n, seed=2, budget=BUDGET, late=True)}

    # -- plain vs prefix-cached, selections interleaved with floor passes -----------------
    rows, t_floor, fast = [], [], {}
    for kind, ss in sels.items():
        ev_fast = fast[kind] = SupernetEvaluator(copy.deepcopy(supernet), task, device="cpu")
        cold, warm, plain, recal, every = [], [], [], [], []
        for i, s in enumerate(ss):
            t_floor.append(timed(floor))
            recal.append(timed(lambda: ev_recal(s)))
            every.append(timed(lambda: ev_all(s)))
            plain.append(timed(lambda: ev_plain(s)))
            (cold if i < n else warm).append(timed(lambda: ev_fast(s)))
        f = median(t_floor)
        cache = ev_fast.prefix_cache_info()
        # speed-up: per selection, plain over cached timed back to back, then the median
        paired = [p / c for p, c in zip(plain, cold + warm)]
        for label, ts, ratios in (("recalibrated on training clips, plain", recal,
                                   [r / p for r, p in zip(recal, plain)]),
                                  ("statistics from every clip, plain", every,
                                   [e / p for e, p in zip(every, plain)]),
                                  ("plain", plain, [1.0]),
                                  ("prefix cache, cold (first half)", cold, paired[:n]),
                                  ("prefix cache, warm (second half)", warm, paired[n:])):
            rows.append([kind, label, len(ts), round(median(ts), 3), round(1 / median(ts), 2),
                         round(median(ts) / f, 2), round(median(ratios), 2)])
        rows.append([kind, f"(cache: {len(cache['boundaries'])} boundaries, "
                     f"{cache['bytes'] / 2**20:.0f} MiB, {cache['hits']} replays)",
                     "", "", "", "", ""])
        print_table(["selections", "evaluator", "n", "s/scoring", "scorings/s", "x floor",
                     "speed-up"], rows[-6:])
    f = median(t_floor)
    n_val = len(task.val)

    # -- where a plain scoring's time goes --------------------------------------------------
    from swr.fold import merge, unmerge
    from swr.reparam import set_selection
    from swr.train import restore_batchnorm

    s0 = sels["random 5%"][0]
    model = ev_recal.model
    set_selection(model, s0)
    merge(model)
    t_recal = [timed(lambda: recalibrate_batchnorm(model, task.train, ev_recal.bn_batches,
                                                   ev_recal.bn_batch_size)) for _ in range(3)]
    unmerge(model)
    restore_batchnorm(ev_recal._bn_state)
    set_selection(model, [])
    t_total = [timed(lambda: ev_recal(s0)) for _ in range(3)]
    t_val = [timed(lambda: ev_plain(s0)) for _ in range(3)]
    recal_clips = min(len(task.train), ev_recal.bn_batches * ev_recal.bn_batch_size)
    breakdown = [
        ["floor: base forward over val", n_val, round(f, 3), 1.0],
        ["plain scoring, default (validation-batch statistics)", n_val,
         round(median(t_val), 3), round(median(t_val) / f, 2)],
        ["plain scoring recalibrated on training clips, total", recal_clips + n_val,
         round(median(t_total), 3), round(median(t_total) / f, 2)],
        ["  of which BN recalibration", recal_clips, round(median(t_recal), 3),
         round(median(t_recal) / f, 2)],
        ["  of which validation + merge/restore", n_val,
         round(median(t_total) - median(t_recal), 3),
         round((median(t_total) - median(t_recal)) / f, 2)],
    ]
    print_table(["part", "clips", "s", "x floor"], breakdown)

    ev_warm = fast["late 5%"]  # its cache is warm by now
    prof_sel = sels["late 5%"][:2]
    ops_plain = top_ops(lambda: [ev_plain(s) for s in prof_sel])
    ops_fast = top_ops(lambda: [ev_warm(s) for s in prof_sel])
    op_headers = ["op", "calls", "self CPU ms", "share"]
    print_table(op_headers, ops_plain)
    print_table(op_headers, ops_fast)

    idea_rows = ideas(ev_recal, supernet, task, s0)
    idea_headers = ["idea", "ms (idea)", "ms (alternative)", "alternative / idea", "note"]
    print_table(idea_headers, idea_rows)

    # -- fewer / larger recalibration batches: speed and fidelity ---------------------------
    fid_sels = random_selections(supernet, 6 if args.quick else 12, seed=3, budget=BUDGET)
    # the reference is last stop's default: statistics from every clip of the batch
    configs = [("each validation batch's own, every clip (bn_clips=None)", "val", None, 0, 0),
               ("each validation batch's own, 32 clips (the default)", "val", 32, 0, 0),
               ("each validation batch's own, 16 clips", "val", 16, 0, 0),
               ("4 x 128 training clips", "train", None, 4, 128),
               ("1 x 128 training clips", "train", None, 1, 128),
               ("none (supernet statistics)", "supernet", None, 0, 1)]
    if not args.quick:
        configs.insert(2, ("each validation batch's own, 64 clips", "val", 64, 0, 0))
        configs.insert(5, ("2 x 128 training clips", "train", None, 2, 128))
    ref_scores = None
    fid_rows = []
    for label, bn, clips, nb, bs in configs:
        ev = SupernetEvaluator(copy.deepcopy(supernet), task, device="cpu", bn_batches=nb,
                               bn_batch_size=max(bs, 1), prefix_cache_mb=0, bn_stats=bn,
                               bn_clips=clips, metric="loglik")
        ts, scores = [], []
        for s in fid_sels:
            t_floor.append(timed(floor))
            ts.append(timed(lambda: scores.append(ev(s))))
        if ref_scores is None:
            ref_scores = scores
        same_best = int(np.argmax(scores)) == int(np.argmax(ref_scores))
        top3 = len(set(np.argsort(scores)[-3:]) & set(np.argsort(ref_scores)[-3:]))
        fid_rows.append([label, min(len(task.train), nb * bs) if bn == "train" else 0,
                         round(median(ts), 3), round(median(ts) / median(t_floor), 2),
                         round(kendall_tau(scores, ref_scores), 3),
                         round(spearman(scores, ref_scores), 3),
                         round(float(np.max(np.abs(np.subtract(scores, ref_scores)))), 3),
                         "yes" if same_best else "no", f"{top3}/3",
                         f"{min(scores):.3f}-{max(scores):.3f}"])
    fid_headers = ["BatchNorm statistics", "training clips", "s/scoring (plain)", "x floor",
                   "Kendall tau vs every clip", "Spearman vs every clip", "max |score diff|",
                   "same best", "top-3 overlap", "score range"]
    print_table(fid_headers, fid_rows)

    if args.no_doc:
        return
    body = f"""{task_line(task)}; `{BACKBONE}` base {base_desc}; supernet trained
{epochs} epoch(s) (val accuracy with all gates open {supernet_acc:.3f}); budget {BUDGET}; evaluator defaults (BatchNorm statistics
from 32 clips of each validation batch, validation shuffled once and cut into near-equal
batches of up to 512; the "every clip" rows take them from the whole batch, last stop's
default; the "recalibrated" rows recalibrate on 4 x 128 training clips instead); {args.threads} torch
thread(s). The floor is a plain forward pass of the base architecture over the same
validation batches: median {f * 1e3:.0f} ms for {n_val} clips. Every scoring below was timed
next to a floor pass in the same loop, so ratios share the machine's state.

### Plain path against the prefix cache

Random 5% selections are what random search and an untrained policy propose; late
selections open gates only in the second half of the network (a policy that has learnt
to leave the early layers frozen). Cold: the cache is being filled (verification of
the cut and recording ride along with these scorings); warm: new selections from the
same distribution after that. Each selection is scored on both paths back to back;
the speed-up is the median of those pairs' ratios. The cache records a boundary only
where replaying it skips at least 25% of the forward pass (`prefix_min_skip`), so most
random selections, whose first open gate is in the first stage, run as on the plain
path. Scores are bit-identical on both paths
(`tests/test_evaluator_perf_equiv.py`).

{md_table(["selections", "evaluator", "n", "s/scoring", "scorings/s", "x floor", "speed-up vs plain (median of pairs)"], rows)}

### Where a plain scoring's time goes

{md_table(["part", "clips", "s", "x floor"], breakdown)}

Top operators (torch.profiler, self CPU time) over {len(prof_sel)} plain scorings of late
selections:

{md_table(op_headers, ops_plain)}

and over the same {len(prof_sel)} scorings with a warm prefix cache:

{md_table(op_headers, ops_fast)}

### Ideas tried, each against its alternative in the same run

{md_table(idea_headers, idea_rows)}

### Where the BatchNorm statistics come from: speed against agreement

The same {len(fid_sels)} random selections scored (log-likelihood, plain path) with other
sources of BatchNorm statistics, against statistics from every clip of each validation
batch (the default before `bn_clips`). Agreement with those scores is not the goal: the
rank agreement with *final* accuracy is, and benchmarks/proxy_fidelity.py measures it
(experiments/SEARCH.md).

{md_table(fid_headers, fid_rows)}
"""
    write_section("evaluator", "Evaluator throughput (`benchmarks/evaluator.py`)", body, info)


if __name__ == "__main__":
    main()
