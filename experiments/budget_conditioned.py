"""One search for a list of budgets against a search per budget: cost and final accuracy.

Per seed, on one task:

* one ``swr search --budget 1%,2%,5%,10%`` (pg, ``--evaluations N`` in total), whose
  supernet trains once, on gate sets of the largest budget;
* one single-budget pg search per budget (``--evaluations N`` each), each with the
  supernet of its own budget (the default ``--supernet-gates budget``);
* every selection of both final-trained the same way (``swr finetune``: same epochs and
  seed, from the supernet its search used), as a user would.

Reported: (a) the seconds of the list search against one single-budget search, stage 1
plus stage 2 (what ``selection.json`` records; loading the base and the task, the same
for both, is left out). Each supernet's training time is taken from the search that
trained it: the largest budget's single search shares the list's supernet, so it is
charged the list's stage 1. (b) per budget, the final test accuracy of the list search's selection
against the separate search's, paired by seed, with a 95% t interval.

    python benchmarks/budget_conditioned.py --task 'glyphs:fine?images=30,60,100=CKPT' \\
        --budgets 1%,2%,5%,10% --evaluations 32 --seeds 3 --first-seed 100 --norms none

Seeds whose supernets are already cached report stage 1 as the cache load, so measure
stage 1 with seeds (``--first-seed``) or a ``SWR_CACHE`` no earlier run used. Each
finished seed is appended to ``OUT/seeds.jsonl`` (an interrupted run continues; runs
with other ``--first-seed`` can go side by side with ``--no-doc``); the run that ends
with the report writes ``OUT/results.json`` and experiments/SEARCH.md between the
``bench:budget_conditioned`` markers (``--render-only``: report what OUT holds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # _common
from _common import ROOT, fmt_ci, machine, md_table, task_checkpoint, write_section

DOC = ROOT / "experiments" / "SEARCH.md"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", required=True, metavar="SPEC=CHECKPOINT",
                   help="the task and the swr pretrain folder of its base")
    p.add_argument("--budgets", default="1%,2%,5%,10%")
    p.add_argument("--evaluations", type=int, default=32,
                   help="distinct evaluations per search (the list search: in total)")
    p.add_argument("--seeds", type=int, default=3, help="how many seeds ...")
    p.add_argument("--first-seed", type=int, default=100, help="... starting at this one")
    p.add_argument("--supernet-epochs", type=int, default=40, help="stage-1 epochs")
    p.add_argument("--epochs", type=int, default=8, help="final training epochs")
    p.add_argument("--norms", default="auto", choices=["auto", "budget", "none", "free"],
                   help="how the task norms meet the budget (swr search --norms)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", default=str(ROOT / "runs" / "budget_conditioned"))
    p.add_argument("--no-doc", action="store_true", help="do not rewrite experiments/SEARCH.md")
    p.add_argument("--render-only", action="store_true",
                   help="run nothing: report the seeds OUT holds")
    args = p.parse_args(argv)
    args.spec, args.ckpt = task_checkpoint(p, args.task)
    args.budget_list = [b.strip() for b in args.budgets.split(",") if b.strip()]
    if len(args.budget_list) < 2:
        p.error(f"--budgets {args.budgets!r}: give at least two budgets")
    return args


def run_seed(args, seed: int) -> dict:
    """The list search, one search per budget and the final training of every selection."""
    from swr.app.finetune import finetune
    from swr.app.search import SearchConfig, run_search
    from swr.supernet import SupernetConfig

    folder = Path(args.out) / f"seed{seed}"

    def search(name: str, budget: str) -> dict:
        cfg = SearchConfig(task=args.spec, checkpoint=args.ckpt, budget=budget,
                           out=str(folder / name), policy="pg", seed=seed,
                           evaluations=args.evaluations, device="cpu", progress=False,
                           norms=args.norms,
                           supernet=SupernetConfig(epochs=args.supernet_epochs, gates="budget"))
        return run_search(cfg)

    def final(selection_file: Path, name: str) -> dict:
        m = finetune(selection_file, folder / f"{name}-final", epochs=args.epochs, seed=seed,
                     device="cpu", progress=False)
        return {"val": m["val_acc"], "test": m["test_acc"]}

    many = search("list", ",".join(args.budget_list))
    row = {"seed": seed, "task": args.spec, "evaluations": args.evaluations,
           "list": {"seconds": many["seconds"]["supernet"] + many["seconds"]["search"],
                    "stage1_s": many["seconds"]["supernet"],
                    "stage2_s": many["seconds"]["search"], "supernet": many["supernet"]},
           "budgets": {}}
    stage1 = {many["supernet"]: many["seconds"]["supernet"]}  # by the supernet's folder
    for entry in many["budgets"]:
        b = entry["budget"]
        one = search(f"single-{b}", b)
        # a supernet another search trained is only loaded here: charge its training
        trained = stage1.setdefault(one["supernet"], one["seconds"]["supernet"])
        row["budgets"][b] = {
            "list": {"layers": entry["layers"], "val_score": entry["val_score"],
                     **final(folder / "list" / entry["selection_file"], f"list-{b}")},
            "single": {"layers": one["layers"], "val_score": one["val_score"],
                       "seconds": trained + one["seconds"]["search"],
                       "stage1_s": trained, "stage2_s": one["seconds"]["search"],
                       **final(folder / f"single-{b}" / "selection.json", f"single-{b}")},
            "feasible_selections": entry["feasible_selections"]}
        print(f"seed {seed} {b}: list {100 * row['budgets'][b]['list']['test']:.2f}% "
              f"single {100 * row['budgets'][b]['single']['test']:.2f}%", flush=True)
    return row


def render(rows: list[dict], args) -> str:
    budgets = list(rows[0]["budgets"])
    wall = []
    for r in rows:
        singles = [r["budgets"][b]["single"] for b in budgets]
        one = statistics.mean(s["seconds"] for s in singles)
        two = statistics.mean(s["stage2_s"] for s in singles)
        wall.append([r["seed"], f"{r['list']['seconds']:.1f}", f"{r['list']['stage1_s']:.1f}",
                     f"{one:.1f}", f"{r['list']['seconds'] / one:.2f}",
                     f"{r['list']['stage2_s']:.1f}", f"{two:.1f}",
                     f"{r['list']['stage2_s'] / two:.2f}"])
    ratios = [r["list"]["seconds"] / statistics.mean(r["budgets"][b]["single"]["seconds"]
                                                     for b in budgets) for r in rows]
    acc = []
    for b in budgets:
        lt = [100 * r["budgets"][b]["list"]["test"] for r in rows]
        st = [100 * r["budgets"][b]["single"]["test"] for r in rows]
        same = sum(sorted(r["budgets"][b]["list"]["layers"])
                   == sorted(r["budgets"][b]["single"]["layers"]) for r in rows)
        acc.append([b, f"{rows[0]['budgets'][b]['feasible_selections']:,}",
                    f"{statistics.mean(lt):.2f} ({', '.join(f'{x:.1f}' for x in lt)})",
                    f"{statistics.mean(st):.2f} ({', '.join(f'{x:.1f}' for x in st)})",
                    fmt_ci([x - y for x, y in zip(lt, st)]), f"{same}/{len(rows)}"])
    pooled = [100 * (r["budgets"][b]["list"]["test"] - r["budgets"][b]["single"]["test"])
              for r in rows for b in budgets]
    acc.append(["all", "", "", "", fmt_ci(pooled), ""])
    return "\n".join([
        f"Task `{args.spec}`, budgets {', '.join(budgets)}; pg with {rows[0]['evaluations']} "
        f"distinct evaluations per search (the list search: {rows[0]['evaluations']} in "
        f"total); `--norms {args.norms}`; stage 1 {args.supernet_epochs} epochs on budget "
        f"gate sets (the list search's on the largest budget's, each single search's on its "
        f"own); every selection final-trained {args.epochs} epochs with the seed of its "
        f"search. {len(rows)} seeds ({', '.join(str(r['seed']) for r in rows)}).", "",
        "(a) Seconds (stage 1 + stage 2) of the one search for every budget against a "
        "single-budget search (mean over the budgets; the largest budget's single search is "
        "charged the stage 1 of the list search, whose supernet it shares):", "",
        md_table(["seed", "list search s", "its stage 1 s", "single search s (mean)",
                  "ratio", "list stage 2 s", "single stage 2 s (mean)", "ratio (stage 2)"], wall),
        "", f"Ratio over seeds: {statistics.mean(ratios):.2f} (mean), {max(ratios):.2f} (max).",
        "", "(b) Final test accuracy (%) of each budget's selection, mean over seeds (per "
        "seed in brackets), and the paired difference list - separate in points with its 95% "
        "t interval over seeds (`*`: excludes zero):", "",
        md_table(["budget", "feasible selections", "list search", "separate search",
                  "list - separate", "same selection"], acc), ""])


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    info = machine()
    out = Path(args.out)
    log = out / "seeds.jsonl"
    done = {}
    if log.is_file():
        for line in log.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            done[r["seed"]] = r
    if not args.render_only:
        out.mkdir(parents=True, exist_ok=True)
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            if seed in done:
                continue
            done[seed] = run_seed(args, seed)
            with open(log, "a", encoding="utf-8") as f:
                f.write(json.dumps(done[seed]) + "\n")
    rows = [done[s] for s in sorted(done) if done[s]["task"] == args.spec]
    if not rows:
        sys.exit(f"{log}: no seed of {args.spec} recorded yet")
    body = render(rows, args)
    print(body)
    from swr.io import write_json

    write_json(out / "results.json", {"args": {k: v for k, v in vars(args).items()},
                                      "seeds": rows})
    if not args.no_doc:
        write_section("budget_conditioned", "One search for a list of budgets", body, info, DOC)


if __name__ == "__main__":
    main()
