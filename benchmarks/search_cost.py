"""What the whole SWR pipeline costs next to a full fine-tune of the same epochs.

SWR = ``swr search`` (stage 1: the supernet, S epochs, and its per-layer statistics;
stage 2: N evaluations by the policy) + ``swr finetune`` (stage 3: the chosen deltas,
task norms when they are counted, and the head, F epochs, warm-started from the
supernet; fold; export). Each arm runs those two library calls exactly as the CLI
does, from loading the base to writing the task delta, with a supernet cache of its
own (the task data is shared), so stage 1 really runs in every arm. The reference is
``run_method("full", ...)`` for E epochs on the same task and machine, in the same run.

Arms (E from ``--epochs``):

* ``old``: S = E, F = E, ``--bn-stats train`` (BatchNorm recalibrated on 4 x 128
  training clips per scoring: the evaluator's default before validation-batch
  statistics; a deltas-only search scores with the supernet's statistics whatever
  it asks, and the table's BN column says what scored),
* ``default``: the pipeline with swr's defaults scaled to E (``swr.app.search`` and
  ``swr.app.finetune``'s defaults are S = 10, F = 20 for E = 20),
* ``E total``: S + F = E (the supernet's epochs count towards the final training,
  which starts from its deltas), the default evaluator.

    python benchmarks/search_cost.py --checkpoint CKPT_EN --task kws-synth:de \\
        [--task glyphs:sketch=CKPT_GLYPHS] [--epochs 20] [--evaluations 40] [--budget 5%]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import tempfile
import time
from pathlib import Path

import torch

from _common import command, machine, md_table, print_table, task_line, write_section


def arms(epochs: int) -> list[tuple[str, int, int, str]]:
    """(name, supernet epochs S, final epochs F, BatchNorm statistics) of every arm."""
    from swr.app.search import SearchConfig

    bn = SearchConfig.bn_stats  # the default evaluator
    s_default = max(1, round(epochs * 10 / 20))  # swr search 10 : swr finetune 20
    s_total = max(1, epochs // 4)
    return [("old", epochs, epochs, "train"),
            ("default", s_default, epochs, bn),
            ("E total", s_total, epochs - s_total, bn)]


@contextlib.contextmanager
def fresh_supernet_cache(tmp: Path):
    """For the duration, ``SWR_CACHE`` is ``tmp``: no supernets, the task data linked to
    the current cache's. The previous ``SWR_CACHE`` (or its absence) comes back after."""
    from swr.io import cache_dir

    real = cache_dir()
    tmp.mkdir(parents=True)
    if real.is_dir():
        for entry in real.iterdir():
            if entry.name != "supernets":
                (tmp / entry.name).symlink_to(entry.resolve())
    before = os.environ.get("SWR_CACHE")
    os.environ["SWR_CACHE"] = str(tmp)
    try:
        yield tmp
    finally:
        if before is None:
            os.environ.pop("SWR_CACHE", None)
        else:
            os.environ["SWR_CACHE"] = before


def run_arm(spec: str, checkpoint: str, name: str, s_epochs: int, f_epochs: int, bn: str,
            evaluations: int, budget: str, policy: str, seed: int, tmp: Path) -> dict:
    """One SWR pipeline, search then final training, timed stage by stage."""
    from swr.app.finetune import finetune
    from swr.policies.ray_setup import shutdown_ray
    from swr.app.search import SearchConfig, run_search
    from swr.supernet import SupernetConfig

    slug = name.replace(" ", "-")
    cfg = SearchConfig(task=spec, checkpoint=checkpoint, budget=budget, out=str(tmp / slug),
                       policy=policy, evaluations=evaluations, workers=0, seed=seed,
                       device="cpu", progress=False, bn_stats=bn,
                       supernet=SupernetConfig(epochs=s_epochs, progress=False))
    with fresh_supernet_cache(tmp / f"cache-{slug}"):
        t0 = time.perf_counter()
        result = run_search(cfg)
        t_search = time.perf_counter() - t0
        shutdown_ray()
        t0 = time.perf_counter()
        m = finetune(Path(cfg.out) / "selection.json", tmp / f"{slug}-final", epochs=f_epochs,
                     seed=seed, device="cpu", progress=False)
        t_final = time.perf_counter() - t0
    sec = result["seconds"]
    # what scored: a deltas-only search scores with its supernet's (= the base's) statistics
    return {"arm": name, "S": s_epochs, "F": f_epochs, "bn": result["bn_stats"],
            "supernet_s": sec["supernet"], "search_s": sec["search"],
            "other_s": t_search - sec["supernet"] - sec["search"], "final_s": t_final,
            "total_s": t_search + t_final, "evaluations": result["evaluations"],
            "val_acc": m["val_acc"], "test_acc": m["test_acc"], "layers": len(m["layers"]),
            "trained": m["updated_params"], "budget": m["budget_params"]}


def run_task(spec: str, checkpoint: str, args, tmp: Path) -> tuple[str, list[list]]:
    from swr.methods import run_method
    from swr.source import base_spec, load_base, load_task
    from swr.train import TrainConfig

    base, meta = load_base(base_spec(checkpoint))
    task = load_task(spec, meta)
    line = f"{task_line(task)}; `{meta['backbone']}` base"
    print(line, flush=True)
    t0 = time.perf_counter()
    full = run_method("full", copy.deepcopy(base), task, None,
                      TrainConfig(epochs=args.epochs, device="cpu", progress=False, desc="full",
                                  seed=args.seed))
    t_full = time.perf_counter() - t0
    rows = [["full fine-tune", "-", args.epochs, "-", "-", "-", round(t_full, 1),
             round(t_full, 1), 1.0, f"{full['val_acc']:.4f}", f"{full['test_acc']:.4f}",
             f"{full['updated_params']:,}"]]
    print(f"full fine-tune: {t_full:.1f} s", flush=True)
    for name, s, f, bn in arms(args.epochs):
        r = run_arm(spec, checkpoint, name, s, f, bn, args.evaluations, args.budget,
                    args.policy, args.seed, tmp / task.id.replace(":", "-"))
        rows.append([f"SWR {name}", r["S"], r["F"], r["bn"],
                     f"{r['supernet_s']:.1f}",
                     f"{r['search_s']:.1f} ({r['search_s'] / max(r['evaluations'], 1):.2f}/eval)",
                     round(r["final_s"], 1), round(r["total_s"], 1),
                     round(r["total_s"] / t_full, 2), f"{r['val_acc']:.4f}",
                     f"{r['test_acc']:.4f}",
                     f"{r['trained']:,} of {r['budget']:,} ({r['layers']} layers)"])
        print(f"SWR {name}: {r['total_s']:.1f} s", flush=True)
    print_table(HEADERS, rows)
    return line, rows


HEADERS = ["pipeline", "supernet epochs S", "final epochs F", "BN statistics", "stage 1 s",
           "search s", "final training s", "total s", "x full fine-tune", "val acc", "test acc",
           "trained params (excl. head)"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--checkpoint", help="swr pretrain folder of the base for --task specs "
                    "without =CKPT")
    ap.add_argument("--task", action="append", default=None,
                    help="SPEC or SPEC=CKPT, repeatable (default kws-synth:de with --checkpoint)")
    ap.add_argument("--epochs", type=int, default=20, help="E (default 20, swr finetune's)")
    ap.add_argument("--evaluations", type=int, default=40, help="N (default 40)")
    ap.add_argument("--budget", default="5%")
    ap.add_argument("--policy", default="pg")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: see docs/PERFORMANCE.md)")
    ap.add_argument("--no-doc", action="store_true", help="print only; leave the doc alone")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tasks = []
    for t in args.task or ["kws-synth:de"]:
        spec, sep, ckpt = t.rpartition("=")
        if not sep or ckpt.isdigit():  # no checkpoint (a ?shots=N spec ends in digits)
            spec, ckpt = t, ""
        if not (ckpt or args.checkpoint):
            ap.error(f"--task {t}: give SPEC=CKPT or --checkpoint")
        tasks.append((spec, str(Path(ckpt or args.checkpoint).resolve())))
    info = machine()
    sections = []
    with tempfile.TemporaryDirectory(prefix="swr-cost-") as tmp:
        for spec, ckpt in tasks:
            line, rows = run_task(spec, ckpt, args, Path(tmp))
            sections.append(f"{line}:\n\n{md_table(HEADERS, rows)}\n")
    if args.no_doc:
        return
    old, default, total = arms(args.epochs)
    body = f"""E = {args.epochs} epochs for the full fine-tune; N = {args.evaluations} evaluations ({args.policy});
budget {args.budget}; batch size 64; seed {args.seed}; {args.threads} torch thread(s); one run per
arm. Arms: `old` is the pipeline before the scoring rewrite (S = F = E, BatchNorm
recalibrated on training clips per scoring, as asked with `--bn-stats train`; the
`BN statistics` column says what scored: where no budget trains the task norms, stage 1
keeps the base's norms and every arm scores with those statistics); `default` scales
swr's defaults to E
(S = {default[1]}, F = {default[2]}); `E total` counts the supernet's epochs towards the
final training (S = {total[1]}, F = {total[2]}; stage 3 starts from the supernet's deltas).
Each SWR time is `swr search` + `swr finetune` as library calls, loading and writing
included, with a supernet cache of its own.

{chr(10).join(sections)}"""
    write_section("search_cost", "Cost of the SWR pipeline against full fine-tuning "
                  "(`benchmarks/search_cost.py`)", body, info)


if __name__ == "__main__":
    main()
