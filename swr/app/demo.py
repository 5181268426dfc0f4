"""``swr demo``: the main job, end to end on an embedded suite.

Pretrain the source model (cached), then for several target tasks run SWR at a 5%
budget beside the main baselines, and write ``report.md`` with the results table,
the Pareto plot and a per-layer selection map (which layers each target chose).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from .bench import BenchConfig, run_bench, summarize
from ..errors import SwrError
from ..io import check_rerun, out_lock, save_png, write_text
from ..pretrain import default_checkpoint, load_pretrained
from ..reparam import candidates

SUITES = {
    # suite: (targets, methods)
    "kws": (["kws-synth:de", "kws-synth:fr", "kws-synth:pl"],
            ["linear", "norm", "lora", "full", "wise-ft", "swr-knapsack", "swr"]),
    "glyphs": (["glyphs:sketch", "glyphs:painting", "glyphs:greek"],
               ["linear", "norm", "lora", "full", "wise-ft", "swr-knapsack", "swr"]),
}
QUICK_METHODS = ["linear", "norm", "full", "swr"]


#: What a demo writes into its ``--out``: a folder holding one holds a demo.
DEMO_OUTPUTS = ("report.md", "summary.json", "selection_map.png", "bench")


def run_demo(out: str | Path, suite: str = "kws", quick: bool = False, seeds: int = 1,
             workers: int | None = None, device: str = "auto", resume: bool = False,
             overwrite: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run the demo and write ``out/report.md``; returns a summary dict.

    ``out`` is locked while the demo runs; one that holds an earlier demo is refused
    unless ``resume`` (its bench continues; other settings are refused) or
    ``overwrite`` (its bench is replaced).
    """
    if suite not in SUITES:
        raise SwrError(f"--suite {suite!r}: choose one of {', '.join(SUITES)}")
    with out_lock(out, "demo"):
        check_rerun(out, "demo", DEMO_OUTPUTS, resume=resume, overwrite=overwrite,
                    resumable=True)
        return _run_demo(Path(out), suite, quick, seeds, workers, device, resume, overwrite, log)


def _run_demo(out: Path, suite, quick, seeds, workers, device, resume, overwrite, log) -> dict:
    start = time.perf_counter()
    targets, methods = SUITES[suite]
    if quick:
        methods = QUICK_METHODS
    log(f"demo: pretraining (or loading the cached) {suite} source model ...")
    ckpt = default_checkpoint(suite, quick=quick)
    source = json.loads((ckpt / "metrics.json").read_text())
    log(f"demo: source {source['backbone']} on {source['task']}: test acc {source['test_acc']:.4f}")
    # the full demo runs every method as a default bench does; the quick one trims the
    # epochs and SWR's search so that it stays within minutes on 2 CPU cores
    sizes = dict(epochs=6, swr_evaluations=24, supernet_epochs=3) if quick else {}
    cfg = BenchConfig(tasks=targets, checkpoint=str(ckpt), methods=methods, budgets=["5%"],
                      out=str(out / "bench"), seeds=seeds, device=device, workers=workers,
                      resume=resume, overwrite=overwrite, **sizes)
    rows = run_bench(cfg, log=log)
    table = (out / "bench" / "results.md").read_text()
    base, _ = load_pretrained(ckpt)
    layers = candidates(base)
    selection_map = plot_selection_map(out / "selection_map.png", rows, [c.name for c in layers],
                                       {c.name: c.params for c in layers})
    seconds = time.perf_counter() - start
    report = [
        f"# swr demo ({suite}{', quick' if quick else ''})", "",
        f"Source model: `{source['backbone']}` pre-trained on `{source['task']}` "
        f"(test accuracy {source['test_acc']:.4f}). Targets: {', '.join(targets)}. "
        f"Budget for budgeted methods: 5% of the backbone's parameters. "
        f"Seeds: {seeds}. Epochs per method: {cfg.epochs}. Wall time: {seconds / 60:.1f} min.", "",
        "## Results", "", table, "",
        "![pareto](bench/pareto.png)", "",
        *(["Accuracy on the shifted test split (unseen speakers or fonts, harder conditions) "
           "against the plain test split: each method, the WiSE-FT line and every ensemble "
           "of two methods.", "", "![robustness](bench/robustness.png)", ""]
          if (out / "bench" / "robustness.png").is_file() else []),
        "## Which layers each target chose (SWR)", "",
        "![selection map](selection_map.png)" if selection_map else "(no SWR runs)", "",
        "## What the names mean", "",
        *[f"- `{m}`: {METHOD_NOTES[m]}" for m in sorted({r['method'] for r in rows})
          if m in METHOD_NOTES],
        "- budget `natural`: a method of fixed size (it trains what it trains, whatever the "
        "budget); its trained parameters are counted like everyone's.",
        "- norms `auto:none`: SWR's task norms did not fit the budget, so it trained deltas "
        "(and the head) only; `auto`: they fit and were counted in it.",
        "- Ensembles average the class probabilities of two of these runs.", "",
    ]
    report[report.index("## Results"):report.index("## Results")] = [
        "## Verdict", "", verdict(rows, targets, seeds, out / "bench" / "preds"), ""]
    write_text(out / "report.md", "\n".join(report))
    summary = {"seconds": seconds, "source": source, "rows": summarize(rows)}
    write_text(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    log("\n" + table)
    log(f"demo: done in {seconds / 60:.1f} min -> {out / 'report.md'}")
    return summary


#: One line per method, for the report's legend (only the methods that ran are listed).
METHOD_NOTES = {
    "linear": "a new head on the frozen base (the linear probe)",
    "norm": "the norm layers' affines and statistics, and the head",
    "bitfit": "every bias, and the head",
    "lora": "LoRA (peft) at the largest rank within the budget, and the head",
    "full": "every weight (full fine-tuning)",
    "wise-ft": "linear probe, then every weight from it, then the weight-space interpolation "
               "between the two chosen on validation",
    "swr": "SWR: deltas on the layers the policy network chose within the budget, the task "
           "norms when they fit, the head; started from the linear probe",
    "swr-knapsack": "SWR with the exact knapsack over stage-1 Taylor importance in place of "
                    "the policy",
}


def verdict(rows: list[dict], targets: list[str], seeds: int, pred_dir=None) -> str:
    """One paragraph on SWR's place, read off the comparison at equal trained parameters:
    at each budget, SWR against every method that fits it (paired differences with their
    95% intervals) and against the references that train more."""
    from .bench.report import budget_groups

    groups = budget_groups(rows, pred_dir)
    refs = next((g["methods"] for g in groups if g["limit"] is None), [])
    parts = []
    for g in groups:
        if g["limit"] is None or g["swr"] is None:
            continue
        me = next(e for e in g["methods"] if e["method"] == g["swr"])
        others = [e for e in g["methods"] if "swr_minus" in e]
        said = []
        for e in others:
            ci = ("" if e["low"] != e["low"] else
                  f" [{100 * e['low']:+.1f}, {100 * e['high']:+.1f}]")
            sure = ("" if e["low"] != e["low"] else " (an interval above zero)" if e["low"] > 0
                    else " (an interval below zero)" if e["high"] < 0 else
                    " (the interval holds zero: no difference shown)")
            said.append(f"{e['method']} {100 * e['swr_minus']:+.1f} points{ci}{sure}, over "
                        f"{e['pairs']} {e['unit']}")
        place = ("the best" if g["best"] == g["swr"] else
                 f"behind {g['best']}")
        parts.append(f"At {g['budget']} ({g['limit']:,} trained parameters) `{g['swr']}` "
                     f"averages {100 * me['test_acc']:.1f}% and is {place} among the methods "
                     f"that fit; SWR minus each: " + "; ".join(said) + ".")
        for r in refs:
            parts.append(f"`{r['method']}` trains {r['updated_params']:,.0f} parameters "
                         f"({r['updated_params'] / max(1, g['limit']):.0f}x the budget) and "
                         f"averages {100 * r['test_acc']:.1f}% "
                         f"({100 * (me['test_acc'] - r['test_acc']):+.1f} points for SWR).")
    return (" ".join(parts) + f" Averages over {', '.join(targets)} and {seeds} seed(s); "
            "intervals are 95% intervals of the paired difference (over runs, or over test "
            "clips when there are few runs: then the spread of training seeds is not in "
            "them).") if parts else "No SWR run to compare."


def plot_selection_map(path: Path, rows: list[dict], layer_names: list[str],
                       costs: dict[str, int] | None = None) -> bool:
    """A tasks x layers grid: filled where SWR reparametrized that layer (seed 0), with
    each layer's parameter cost (``costs``) above it."""
    from ..plots import selection_map_figure

    picks = {}
    for r in rows:
        if r["method"] != "swr" or int(r["seed"]) != 0:
            continue
        settings = json.loads(r["settings"]) if isinstance(r["settings"], str) else r["settings"]
        picks[r["task"]] = settings.get("selection", [])
    if not picks:
        return False
    budgets = sorted({str(r["budget"]) for r in rows if r["method"] == "swr"})
    save_png(selection_map_figure(picks, layer_names, costs or {},
                                  f"layers reparametrized by SWR (budget {', '.join(budgets)}, "
                                  f"seed 0)"), path)
    return True
