"""The learned policy against the reference selectors: final test accuracy, paired.

For every task, budget and seed: one supernet (cached, shared by all searchers of
that task and seed, and budget with ``--supernet-gates budget``), then each searcher
(``pg``, ``knapsack``, ``random`` by default) searches with the same number of
*distinct* evaluations (``swr search``), and each searcher's selection gets the same
final training (``swr finetune``: same epochs, learning rate and seed). The
comparison is on final **test** accuracy, paired by (task, budget, seed): the mean
difference ``pg - knapsack`` and ``pg - random`` with a 95% t interval, per task and
budget; and every two searchers' difference pooled over all cells and apart for spaces
over and under ``LARGE_SPACE`` times the evaluations. Search seconds
(stage 2 only; the supernet is shared) are reported per searcher, and per task and
budget how many selections fit (the space the evaluations are drawn from) and in how
many cells two searchers chose the very same layers.

    python benchmarks/policy_comparison.py \\
        --task 'glyphs:fine?images=30,60,100=CKPT_GLYPHS' \\
        --task 'kws-synth:ru?speakers=16,24,24=CKPT_EN' \\
        --budgets 1%,5% --seeds 3 --evaluations 16 --supernet-epochs 40 --norms none

Each ``--task SPEC=CHECKPOINT`` names a task and the ``swr pretrain`` folder of its base
model; a cell is known by the base's backbone too, so one task can be compared on two
backbones in one folder. Every finished cell is appended to ``OUT/cells.jsonl`` at once,
so an interrupted run continues where it stopped (same command). Writes ``OUT/results.json``,
``OUT/cells.csv``, ``experiments/policy-comparison.png`` and experiments/SEARCH.md between the
``bench:policy_comparison`` markers.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from _common import (fmt_ci, folder_slug, machine, md_table, mean_ci95,  # noqa: E402
                     task_checkpoint, write_section)

#: Spaces with more feasible selections than this many times the evaluations are pooled
#: apart ("large"): random search scores under 1/LARGE_SPACE of them.
LARGE_SPACE = 1000


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", action="append", required=True, metavar="SPEC=CHECKPOINT",
                   help="a task and the swr pretrain folder of its base (repeat)")
    p.add_argument("--budgets", default="1%,5%", help="comma-separated budgets")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per task and budget")
    p.add_argument("--policies", default="pg,knapsack,random",
                   help="searchers; the first is compared with each of the others")
    p.add_argument("--evaluations", type=int, default=32,
                   help="distinct selections each searcher scores")
    p.add_argument("--supernet-epochs", type=int, default=10, help="stage-1 epochs")
    p.add_argument("--epochs", type=int, default=15, help="final training epochs (all searchers)")
    p.add_argument("--workers", type=int, default=0, help="Ray workers per search (0: none)")
    p.add_argument("--supernet-gates", default="budget", choices=["budget", "bernoulli"],
                   help="stage-1 gates (swr search --supernet-gates)")
    p.add_argument("--evaluator", default="supernet", choices=["supernet", "trained"],
                   help="what scores a selection in every search (swr search --evaluator)")
    p.add_argument("--proxy-epochs", type=int, default=2,
                   help="with --evaluator trained: its short training's epochs")
    p.add_argument("--norms", default="auto", choices=["auto", "budget", "none", "free"],
                   help="task norms in search and final training (swr search --norms); none: "
                        "deltas only, where the selection is all that differs")
    p.add_argument("--versus", metavar="DIR",
                   help="another comparison folder (e.g. one scored by the other --evaluator): "
                        "report each searcher's paired difference against its cells there, and the first "
                        "searcher's against every other searcher there")
    p.add_argument("--out", default=str(ROOT / "runs" / "policy_comparison"),
                   help="folder for the runs and cells.jsonl (resumable)")
    p.add_argument("--no-doc", action="store_true", help="do not rewrite experiments/SEARCH.md")
    p.add_argument("--render-only", action="store_true",
                   help="run no cell: report the cells OUT holds for these tasks (for runs "
                        "made by several invocations side by side)")
    args = p.parse_args(argv)
    args.pairs = []  # (task, checkpoint, its backbone)
    for item in args.task:
        spec, ckpt = task_checkpoint(p, item)
        args.pairs.append((spec, ckpt, base_of(ckpt)))
    args.budget_list = [b.strip() for b in args.budgets.split(",") if b.strip()]
    args.policy_list = [x.strip() for x in args.policies.split(",") if x.strip()]
    return args


def base_of(ckpt: str) -> str:
    """The backbone of a ``swr pretrain`` folder, e.g. ``timm:regnety_002``."""
    return json.loads(Path(ckpt, "metrics.json").read_text())["backbone"]


def cell_id(c: dict) -> tuple:
    """What pairs the searchers' cells: base, task, budget and seed."""
    return c["base"], c["task"], c["budget"], c["seed"]


def by_cell(cells) -> dict[tuple, dict]:
    """Cells by (base, task, budget, seed, policy)."""
    return {(*cell_id(c), c["policy"]): c for c in cells}


def cell_folder(args, base: str, task: str, budget: str, seed: int) -> Path:
    """Where the searches and final trainings of one (base, task, budget, seed) go."""
    variant = ("" if args.norms == "auto" else f"-norms-{args.norms}") + (
        "" if args.supernet_gates == "bernoulli" else f"-{args.supernet_gates}-gates") + (
        "" if args.evaluator == "supernet" else f"-{args.evaluator}{args.proxy_epochs}")
    return (Path(args.out) / folder_slug(base) / folder_slug(task)
            / f"b{budget.rstrip('%')}{variant}" / f"s{seed}")


def feasible_space(ckpt: str, delta_budget: int) -> int:
    """How many selections of the base in ``ckpt`` fit ``delta_budget``
    (:func:`swr.budget.count_feasible`), for cells recorded before selection.json said."""
    from swr.budget import count_feasible
    from swr.reparam import candidates
    from swr.source import base_spec, load_base
    from swr.supernet import build_supernet

    base, _ = load_base(base_spec(ckpt))
    return count_feasible([c.params for c in candidates(build_supernet(base, 2))], delta_budget)


def run_cell(args, task: str, ckpt: str, base: str, budget: str, seed: int,
             policy: str) -> dict:
    """One search and its final training; the row that goes into cells.jsonl."""
    from swr.app.finetune import finetune
    from swr.app.search import SearchConfig, run_search
    from swr.supernet import SupernetConfig

    folder = cell_folder(args, base, task, budget, seed)
    search_out = folder / policy
    cfg = SearchConfig(task=task, checkpoint=ckpt, budget=budget, out=str(search_out),
                       policy=policy, seed=seed, evaluations=args.evaluations,
                       workers=args.workers, device="cpu", progress=False,
                       evaluator=args.evaluator, proxy_epochs=args.proxy_epochs,
                       norms=args.norms, supernet=SupernetConfig(epochs=args.supernet_epochs,
                                                                 gates=args.supernet_gates))
    t0 = time.perf_counter()
    sel = run_search(cfg)
    wall = time.perf_counter() - t0
    metrics = finetune(search_out / "selection.json", folder / f"{policy}-final",
                       epochs=args.epochs, seed=seed, device="cpu", progress=False)
    return {"base": base, "task": task, "budget": budget, "seed": seed, "policy": policy,
            "norms": args.norms, "epochs": args.epochs, "evaluator": args.evaluator,
            "proxy_epochs": proxy_epochs(args),
            "supernet_gates": args.supernet_gates, "supernet_epochs": args.supernet_epochs,
            "val_score": sel["val_score"], "evaluations": sel["evaluations"],
            "cost": sel["cost"], "budget_params": sel["budget_params"],
            "updated_params": metrics["updated_params"],
            "layers": len(sel["layers"]), "selection": list(sel["layers"]),
            "feasible_selections": sel["feasible_selections"],
            "search_s": sel["seconds"]["search"],
            "supernet_s": sel["seconds"]["supernet"], "search_wall_s": wall,
            "final_val_acc": metrics["val_acc"], "final_test_acc": metrics["test_acc"],
            "final_s": metrics.get("seconds")}


def paired(cells: list[dict], first: str, other: str, where=lambda c: True) -> list[float]:
    """Test-accuracy differences ``first - other`` (points) over matching cells."""
    by = by_cell(c for c in cells if where(c))
    out = []
    for (*ident, p), c in sorted(by.items()):
        if p == first and (*ident, other) in by:
            out.append(100 * (c["final_test_acc"] - by[(*ident, other)]["final_test_acc"]))
    return out


def same_selection(cells: list[dict], first: str, other: str) -> str:
    """In how many paired cells ``first`` and ``other`` chose the very same layers (their
    final trainings are then identical, and so is their accuracy)."""
    by = by_cell(cells)
    pairs = [(c, by[(*ident, other)]) for (*ident, p), c in by.items()
             if p == first and (*ident, other) in by]
    known = [(a, b) for a, b in pairs if "selection" in a and "selection" in b]
    if not known:
        return "-"
    return f"{sum(sorted(a['selection']) == sorted(b['selection']) for a, b in known)}/{len(known)}"


def cell_minutes(cells: list[dict]) -> float:
    """Wall minutes the cells took: each search (stage 1 included) plus its final training."""
    return sum(c["search_wall_s"] + (c.get("final_s") or 0.0) for c in cells) / 60


def seed_range(cells: list[dict]) -> str:
    """How many seeds the (base, task, budget) groups hold: "5" or "3-10"."""
    counts = {}
    for c in cells:
        counts.setdefault(cell_id(c)[:3], set()).add(c["seed"])
    lo, hi = min(map(len, counts.values())), max(map(len, counts.values()))
    return str(lo) if lo == hi else f"{lo}-{hi}"


def render(cells: list[dict], args, minutes: float) -> str:
    first, others = args.policy_list[0], args.policy_list[1:]
    tasks = list(dict.fromkeys((c["base"], c["task"]) for c in cells))
    lines = [
        f"Tasks {', '.join(f'`{t}` on `{base}`' for base, t in tasks)}; "
        f"budgets {', '.join(args.budget_list)}; "
        f"{seed_range(cells)} seeds per task and budget; {args.evaluations} distinct "
        f"evaluations per searcher"
        + ("" if args.evaluator == "supernet" else
           f", scored by `--evaluator trained` ({args.proxy_epochs}-epoch trainings)")
        + f"; task norms `--norms {args.norms}`; supernet "
        f"`--supernet-gates {args.supernet_gates}`, "
        f"{args.supernet_epochs} epochs (one per task, seed"
        f"{' and budget' if args.supernet_gates == 'budget' else ''}, shared by the searchers); the "
        f"same final training for every selection ({args.epochs} epochs, `swr finetune`). "
        f"{len(cells)} cells, {cell_minutes(cells):.1f} min of search and final training in "
        f"all (this invocation: {minutes:.1f} min).", "",
        "Final test accuracy (%), mean over seeds (each seed's value in brackets), and the "
        f"paired difference {first} - other in points with its 95% t interval over seeds "
        "(`*`: the interval excludes zero):", ""]
    headers = ["base", "task", "budget", "feasible selections",
               *[f"{p} test %" for p in args.policy_list],
               *[f"{first} - {o}" for o in others],
               *[f"same selection as {o}" for o in others]]
    rows = []
    for base, t in tasks:
        for b in args.budget_list:
            sub = [c for c in cells if cell_id(c)[:3] == (base, t, b)]
            if not sub:
                continue
            space = {c.get("feasible_selections") for c in sub} - {None}
            row = [base, t, b, f"{max(space):,}" if space else "-"]
            for p in args.policy_list:
                accs = [100 * c["final_test_acc"] for c in sorted(sub, key=lambda c: c["seed"])
                        if c["policy"] == p]
                row.append(f"{statistics.mean(accs):.1f} ({', '.join(f'{a:.1f}' for a in accs)})"
                           if accs else "-")
            for o in others:
                row.append(fmt_ci(paired(sub, first, o)))
            for o in others:
                row.append(same_selection(sub, first, o))
            rows.append(row)

    # random search draws under 0.1% of a space over 1,000x the evaluations: where a
    # searcher can beat it, if anywhere
    def big(c: dict) -> bool:
        return (c.get("feasible_selections") or 0) > LARGE_SPACE * c["evaluations"]

    groups = [("all", cells)]
    for label, where in ((f"> {LARGE_SPACE:,}x evaluations", big),
                         (f"<= {LARGE_SPACE:,}x evaluations", lambda c: not big(c))):
        sub = [c for c in cells if where(c)]
        if sub and len(sub) < len(cells):
            groups.append((label, sub))
    # and per base and budget, where two or more tasks share them
    by_base = {}
    for c in cells:
        by_base.setdefault((c["base"], c["budget"]), []).append(c)
    for (base, b), sub in sorted(by_base.items()):
        if len(by_base) > 1 and len({c["task"] for c in sub}) > 1:
            groups.append((f"{base} at {b} ({len({c['task'] for c in sub})} tasks)", sub))

    def complete(sub: list[dict]) -> int:  # cells every searcher has finished
        done = {}
        for c in sub:
            done.setdefault(cell_id(c), set()).add(c["policy"])
        return sum(set(args.policy_list) <= ps for ps in done.values())

    # every two searchers (the knapsack against random search, too), pooled over all cells
    # and by the size of the space
    pairs = [(a, b) for i, a in enumerate(args.policy_list) for b in args.policy_list[i + 1:]]
    lines += [md_table(headers, rows), "",
              "Pooled over cells, every two searchers (points, 95% t interval over the cells "
              "both finished):", "",
              md_table(["feasible selections", "cells (all searchers)",
                        *[f"{a} - {b}" for a, b in pairs],
                        *[f"same selection as {o}" for o in others]],
                       [[label, complete(sub), *[fmt_ci(paired(sub, a, b)) for a, b in pairs],
                         *[same_selection(sub, first, o) for o in others]]
                        for label, sub in groups]), ""]
    scorer = "supernet" if args.evaluator == "supernet" else "trained-proxy"
    lines += ["Search cost per base and searcher (stage 2 only, median seconds per search) and "
              f"the best {scorer} score it found (mean):", ""]
    srows = []
    for base in dict.fromkeys(c["base"] for c in cells):
        for p in args.policy_list:
            sub = [c for c in cells if c["policy"] == p and c["base"] == base]
            if sub:
                srows.append([base, p, f"{statistics.median(c['search_s'] for c in sub):.1f}",
                              f"{statistics.mean(c['evaluations'] for c in sub):.1f}",
                              f"{statistics.mean(c['val_score'] for c in sub):.4f}",
                              f"{statistics.mean(c['updated_params'] or 0 for c in sub):,.0f}"])
    lines += [md_table(["base", "searcher", "search s (median)", "distinct evaluations (mean)",
                        f"best {scorer} score (mean)", "trained params excl. head (mean)"],
                       srows),
              "", "![paired differences](policy-comparison.png)", ""]
    return "\n".join(lines)


def proxy_epochs(args):
    """The epochs of the trained proxy the searches score with (None: the supernet's score)."""
    return args.proxy_epochs if args.evaluator == "trained" else None


def same_settings(c: dict, args, evaluator: bool = True) -> bool:
    """Whether cell ``c`` was made with this run's settings (and evaluator)."""
    return (c.get("norms", "auto") == args.norms
            and c.get("supernet_gates", "bernoulli") == args.supernet_gates
            and c.get("supernet_epochs", args.supernet_epochs) == args.supernet_epochs
            and c.get("epochs", args.epochs) == args.epochs
            and (not evaluator or (
                c.get("evaluator", "supernet") == args.evaluator
                and c.get("proxy_epochs") == proxy_epochs(args))))


def versus_table(cells: list[dict], other: list[dict], args) -> list[str]:
    """Each searcher here minus the same searcher in ``other``, and the first searcher
    here minus each other searcher there (points, paired by base, task, budget and
    seed), per base, task and budget."""
    mine, theirs = by_cell(cells), by_cell(other)
    first = args.policy_list[0]
    rivals = [p for p in dict.fromkeys(k[4] for k in theirs) if p != first]
    arms = [(p, p) for p in args.policy_list] + [(first, r) for r in rivals]
    groups = [[g] for g in dict.fromkeys(cell_id(c)[:3] for c in cells)]
    if len(groups) > 1:
        groups.append([g for (g,) in groups])  # and pooled over them all
    rows = []
    for g in groups:
        row = [*g[0]] if len(g) == 1 else ["all", "", ""]
        for here, there in arms:
            d = [100 * (c["final_test_acc"] - theirs[(*k[:4], there)]["final_test_acc"])
                 for k, c in sorted(mine.items())
                 if k[:3] in g and k[4] == here and (*k[:4], there) in theirs]
            row.append(fmt_ci(d) + f" ({len(d)})" if d else "-")
        rows.append(row)
    return [f"Each searcher here minus the same searcher in `{args.versus}`, and {first} here "
            "minus each other searcher there (final test accuracy, points, paired by seed; "
            "95% t interval; cells in brackets):", "",
            md_table(["base", "task", "budget", *args.policy_list,
                      *[f"{first} - {r} there" for r in rivals]], rows), ""]


def plot(cells: list[dict], args, path: Path) -> None:
    """Paired differences per (task, budget) with their 95% intervals, one colour per rival."""
    from matplotlib.figure import Figure

    from swr.io import save_png

    first, others = args.policy_list[0], args.policy_list[1:]
    groups = [(base, t, b) for base, t in dict.fromkeys((c["base"], c["task"]) for c in cells)
              for b in args.budget_list]
    fig = Figure(figsize=(max(6, 1.3 * len(groups)), 4.5))
    ax = fig.subplots()
    width = 0.8 / max(len(others), 1)
    for j, o in enumerate(others):
        xs, ms, errs = [], [], [[], []]
        for i, group in enumerate(groups):
            d = paired([c for c in cells if cell_id(c)[:3] == group], first, o)
            if not d:
                continue
            m, lo, hi = mean_ci95(d)
            xs.append(i + (j - (len(others) - 1) / 2) * width)
            ms.append(m)
            errs[0].append(0 if math.isnan(lo) else m - lo)
            errs[1].append(0 if math.isnan(hi) else hi - m)
        ax.bar(xs, ms, width, yerr=errs, capsize=3, label=f"{first} - {o}", color=f"C{j}")
    ax.axhline(0, color="black", lw=0.8)
    # the task without its ?modifier, the backbone without timm:, the budget: one line each
    ax.set_xticks(range(len(groups)), [f"{t.split('?')[0]}\n{base.removeprefix('timm:')}\n{b}"
                                       for base, t, b in groups], fontsize=7)
    ax.set_ylabel("test accuracy difference (points)")
    ax.set_title("Paired final test accuracy differences\n(bars: mean over seeds; whiskers: "
                 "95% t interval)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


def backfill(args, cells: list[dict]) -> None:
    """Give cells recorded before the ``selection`` and ``feasible_selections`` fields
    existed those fields, from their selection.json and the base, where they are here."""
    ckpts = {(t, base): ck for t, ck, base in args.pairs}
    spaces: dict[tuple[str, int], int] = {}
    for c in cells:
        sel_file = cell_folder(args, *cell_id(c)) / c["policy"] / "selection.json"
        if "selection" in c or not sel_file.is_file():
            continue
        sel = json.loads(sel_file.read_text())
        c["selection"] = list(sel["layers"])
        if "feasible_selections" in sel:
            c["feasible_selections"] = sel["feasible_selections"]
        elif (c["task"], c["base"]) in ckpts:
            key = (c["task"], c["base"], sel["delta_budget_params"])
            if key not in spaces:
                spaces[key] = feasible_space(ckpts[key[:2]], sel["delta_budget_params"])
            c["feasible_selections"] = spaces[key]


def main(argv=None) -> None:
    args = parse_args(argv)
    from tqdm import tqdm

    from swr.io import write_csv, write_json

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "cells.jsonl"
    cells = []
    if log_path.exists():
        cells = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    # cells of other settings in the same folder are neither reused nor reported
    cells = [c for c in cells if same_settings(c, args)]
    # cells recorded before they named their base: the base given for their task
    first_base = {}
    for t, _, base in args.pairs:
        first_base.setdefault(t, base)
    for c in cells:
        c.setdefault("base", first_base.get(c["task"]))
    backfill(args, cells)
    done = set(by_cell(cells))
    todo = [(t, ck, base, b, s, p) for t, ck, base in args.pairs for s in range(args.seeds)
            for b in args.budget_list for p in args.policy_list
            if (base, t, b, s, p) not in done and not args.render_only]
    wanted = {(t, base) for t, _, base in args.pairs}
    cells = [c for c in cells if (c["task"], c["base"]) in wanted]
    info = machine()
    start = time.perf_counter()
    with tqdm(total=len(todo), desc="policy comparison", unit="cell", file=sys.stderr) as bar:
        for t, ck, base, b, s, p in todo:
            row = run_cell(args, t, ck, base, b, s, p)
            cells.append(row)
            with open(log_path, "a") as f:  # one whole line per finished cell
                f.write(json.dumps(row) + "\n")
            bar.update(1)
            bar.set_postfix(last=f"{t} {b} s{s} {p} {row['final_test_acc']:.3f}")
    minutes = (time.perf_counter() - start) / 60
    write_csv(out / "cells.csv", cells)
    write_json(out / "results.json", {"args": {k: v for k, v in vars(args).items()
                                               if k != "pairs"}, "cells": cells,
                                      "minutes_this_run": minutes, "machine": info})
    plot(cells, args, out / "policy-comparison.png")
    section = render(cells, args, minutes)
    if args.versus:
        other_log = Path(args.versus) / "cells.jsonl"
        other = [c for c in (json.loads(line) for line in other_log.read_text().splitlines()
                             if line.strip()) if same_settings(c, args, evaluator=False)]
        section += "\n" + "\n".join(versus_table(cells, other, args))
    print(section)
    if not args.no_doc:
        plot(cells, args, ROOT / "experiments" / "policy-comparison.png")
        write_section("policy_comparison", "The learned policy against the reference selectors "
                      "(`benchmarks/policy_comparison.py`)", section, info,
                      doc=ROOT / "experiments" / "SEARCH.md")


if __name__ == "__main__":
    main()
