"""``swr bench``: every method at every budget it supports, same data, epochs and seeds.

Each (task, method, budget, seed) is one job; jobs run as Ray tasks when more than
one CPU (or a GPU) is there, else one after another. Every finished job is
appended to ``results.csv`` (rewritten atomically), so an interrupted bench
continues with ``--resume`` and skips what is done. ``results.md`` holds mean ± std
over seeds (plus a per-method average over tasks when there are several), and
``pareto.png`` plots test accuracy against updated parameters.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .budget import Budget, backbone_params
from .errors import BudgetError, SwrError
from .io import read_json, save_png, write_json, write_text
from .pretrain import checkpoint_metrics
from .robustness import cell_name, ensemble_rows
from .search import register_swr_methods

# swr-ppo, swr-random, ...: SWR with each registered searcher, in every process that benches
register_swr_methods()

COLUMNS = ["task", "method", "budget", "seed", "test_acc", "val_acc", "shift_acc",
           "updated_params", "budget_params", "within_budget", "norm_params", "head_params",
           "stored_bytes", "extra_flops", "foldable", "fold_max_abs_diff", "train_seconds",
           "lr", "settings"]

ENSEMBLE_COLUMNS = ["task", "members", "budget", "seed", "test_acc", "shift_acc",
                    "best_member_test_acc", "best_member_shift_acc"]

#: Methods that ignore the budget: run once per seed at their natural size.
NATURAL = "natural"


def expand_tasks(specs: list[str]) -> list[str]:
    """Suites to their tasks: ``kws-synth:all``, ``glyphs:all``, ``imagenet-to-sketch:<root>``."""
    out: list[str] = []
    for spec in specs:
        if spec == "kws-synth:all":
            from .tasks.kws_synth import TARGET_LANGS

            out += [f"kws-synth:{lang}" for lang in TARGET_LANGS]
        elif spec == "glyphs:all":
            from .tasks.glyphs import TARGETS

            out += [f"glyphs:{t}" for t in TARGETS]
        elif spec.startswith("imagenet-to-sketch:"):
            root = Path(spec.split(":", 1)[1])
            names = {"cub": "CUBS_Cropped", "cars": "Stanford_Cars_Cropped", "flowers": "Flowers",
                     "wikiart": "WikiArt", "sketch": "Sketches"}
            for key, folder in names.items():
                found = [p for p in (root / folder, root / key) if p.is_dir()]
                if not found:
                    raise SwrError(f"imagenet-to-sketch: {root} has no {folder}/ (or {key}/) folder")
                out.append(f"imagefolder:{found[0]}")
        else:
            out.append(spec)
    return out


@dataclass
class BenchConfig:
    tasks: list[str]
    checkpoint: str
    methods: list[str]
    budgets: list[str]
    out: str
    seeds: int = 3
    epochs: int = 10
    lr: Optional[float] = None
    batch_size: int = 64
    device: str = "auto"
    workers: Optional[int] = None
    resume: bool = False
    tune: bool = False
    tune_trials: int = 6
    swr_evaluations: int = 100
    supernet_epochs: int = 8
    progress: bool = True
    method_lr: dict = field(default_factory=dict)
    on_bad_file: str = "fail"


#: Learning rates used when not tuned (``--tune``), by backbone family and the method's
#: learning-rate family (:attr:`swr.methods.Method.lr_family`; ``default``: every other
#: method). timm backbones pre-trained on large data take small steps, a head- or
#: norm-only problem a larger one than a whole backbone. BC-ResNet (small, a BatchNorm
#: after every convolution, pre-trained here from scratch at 1e-2) wants steps about ten
#: times larger: these were chosen on kws-synth:de validation accuracy from 1e-3 / 5e-3,
#: 2e-2 and 5e-2 (docs/BENCH.md, "Learning rates").
DEFAULT_LR = {
    "timm": {"full": 1e-3, "low-rank": 3e-3, "adapter": 3e-3, "default": 5e-3},
    "bcresnet": {"head": 5e-2, "norm": 5e-2, "low-rank": 5e-2, "default": 2e-2},
}


def family_lr(family: str, cfg: BenchConfig, backbone: str = "") -> float:
    """The learning rate of a learning-rate family: ``--lr``, else the default table."""
    if cfg.lr is not None:
        return cfg.lr
    table = DEFAULT_LR["bcresnet" if backbone.startswith("bcresnet") else "timm"]
    return table.get(family, table["default"])


def method_lr(method: str, cfg: BenchConfig, backbone: str = "") -> float:
    """The learning rate of ``method``: ``cfg.method_lr``, else ``--lr``, else the default."""
    from .methods import METHODS

    if method in cfg.method_lr:
        return cfg.method_lr[method]
    factory = METHODS.get(method)
    return family_lr(getattr(factory, "lr_family", "default"), cfg, backbone)


def run_job(task_spec: str, method: str, budget: str, seed: int, cfg: BenchConfig,
            lr: float, knobs: dict, threads: int = 0, out_dir: Optional[str] = None,
            predictions: Optional[str] = None) -> dict:
    """One bench cell; loads task and checkpoint itself so it can run in a Ray worker.

    ``predictions``: where to store the trained model's class probabilities on the
    evaluation splits (for the ensembles table)."""
    import torch

    from . import tasks
    from .methods import METHODS, get_method, run_method
    from .pretrain import load_pretrained
    from .search import attach_searcher
    from .train import TrainConfig

    if threads:
        torch.set_num_threads(threads)
    base, meta = load_pretrained(cfg.checkpoint)
    task = tasks.get_task(task_spec, on_bad_file=cfg.on_bad_file)
    budget_params = None if budget == NATURAL else Budget.parse(budget).resolve(backbone_params(base))
    knobs = dict(knobs)
    factory = METHODS[method]
    # what the method takes from the run, unless tuning or the caller set it
    context = {"seed": seed, "device": cfg.device, "out": out_dir,
               "evaluations": cfg.swr_evaluations, "supernet_epochs": cfg.supernet_epochs}
    for name in getattr(factory, "context_knobs", ()):
        if context.get(name) is not None:
            knobs.setdefault(name, context[name])
    for name, family in getattr(factory, "lr_knobs", {}).items():
        knobs.setdefault(name, family_lr(family, cfg, meta["backbone"]))
    tc = TrainConfig(epochs=cfg.epochs, lr=lr, batch_size=cfg.batch_size, seed=seed,
                     device=cfg.device, progress=False, desc=method)
    chosen = get_method(method, **knobs)
    attach_searcher(chosen)
    try:
        row = run_method(chosen, base, task, budget_params, tc, predictions=predictions)
    except BudgetError as e:  # the method cannot be made this small: not a bench failure
        return {"task": task_spec, "method": method, "budget": budget, "seed": seed,
                "skipped": str(e), "skipped_files": list(task.info.get("skipped", []))}
    row.update(task=task_spec, budget=budget, seed=seed, lr=lr,
               settings=json.dumps(row.get("settings", {}), default=str))
    # unreadable data files --on-bad-file skip left out (not a results.csv column)
    return {**{k: row.get(k) for k in COLUMNS},
            "skipped_files": list(task.info.get("skipped", []))}


def plan(cfg: BenchConfig) -> list[tuple[str, str, str, int]]:
    """All (task, method, budget, seed) cells; budget-free methods get one 'natural' budget."""
    from .methods import METHODS, get_method

    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise SwrError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(sorted(METHODS))}")
    for b in cfg.budgets:
        Budget.parse(b)  # fail early on a bad budget
    cells = []
    for task in cfg.tasks:
        for method in cfg.methods:
            budgets = cfg.budgets if get_method(method).respects_budget else [NATURAL]
            for budget in budgets:
                for seed in range(cfg.seeds):
                    cells.append((task, method, budget, seed))
    return cells


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: list[dict], columns: list[str] = COLUMNS) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue())


def _key(row: dict) -> tuple:
    return (row["task"], row["method"], str(row["budget"]), int(row["seed"]))


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> list[dict]:
    """Run (or continue) the bench; returns all result rows."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.tasks = expand_tasks(cfg.tasks)
    cells = plan(cfg)
    results_csv = out / "results.csv"
    rows = read_rows(results_csv) if cfg.resume else []
    done = {_key(r) for r in rows}
    todo = [c for c in cells if c not in done]
    if cfg.tune:
        from .tune import tune_methods

        tuned = tune_methods(cfg, todo, run_job, log)
    else:
        tuned = {}
    log(f"bench: {len(cells)} runs ({len(cells) - len(todo)} done before), "
        f"{len(cfg.tasks)} task(s), methods {', '.join(cfg.methods)}")
    workers = cfg.workers if cfg.workers is not None else (os.cpu_count() or 1)

    backbone = checkpoint_metrics(cfg.checkpoint)["backbone"]

    def job_args(cell):
        task, method, budget, seed = cell
        lr, knobs = tuned.get((task, method, budget), (method_lr(method, cfg, backbone), {}))
        name = cell_name(task, method, budget, seed)
        preds = out / "preds" / f"{name}.safetensors"
        preds.parent.mkdir(parents=True, exist_ok=True)
        return task, method, budget, seed, cfg, lr, knobs, 0, str(out / "runs" / name), str(preds)

    start = time.perf_counter()
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="bench", unit="run", dynamic_ncols=True)

    skipped: dict[tuple[str, str, str], str] = {}
    bad_files_json = out / "skipped_files.json"
    bad_files: dict[str, list[str]] = {}
    if cfg.resume and bad_files_json.is_file():
        bad_files = {t: list(v) for t, v in read_json(bad_files_json, "skipped-files list").items()}
    elif bad_files_json.exists():
        bad_files_json.unlink()  # a fresh bench: the list belongs to the runs it replaces

    def finished(row: dict) -> None:
        new_bad = [p for p in row.pop("skipped_files", []) if p not in bad_files.get(row["task"], [])]
        if new_bad:
            bad_files.setdefault(row["task"], []).extend(new_bad)
            write_json(bad_files_json, {t: sorted(v) for t, v in sorted(bad_files.items())})
        if "skipped" in row:
            key = (row["task"], row["method"], row["budget"])
            if key not in skipped:
                skipped[key] = row["skipped"]
                log(f"bench: {row['method']} at {row['budget']} on {row['task']} not run: "
                    f"{row['skipped']}")
            if bar is not None:
                bar.update(1)
            return
        rows.append(row)
        write_rows(results_csv, rows)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(last=f"{row['method']}@{row['budget']}={float(row['test_acc']):.3f}")

    if workers > 1 and len(todo) > 1:
        import ray

        from .parallel import init_ray

        init_ray()
        remote = ray.remote(num_cpus=1)(run_job)
        threads = max(1, (os.cpu_count() or 1) // workers)
        pending = {}
        queue = list(todo)
        while queue or pending:
            while queue and len(pending) < workers:
                cell = queue.pop(0)
                a = list(job_args(cell))
                a[7] = threads
                pending[remote.remote(*a)] = cell
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                pending.pop(ref)
                finished(ray.get(ref))
    else:
        for cell in todo:
            finished(run_job(*job_args(cell)))
    if bar is not None:
        bar.close()
    rows.sort(key=lambda r: (r["task"], r["method"], _budget_order(r["budget"]), int(r["seed"])))
    write_rows(results_csv, rows)
    notes = "".join(f"\n- `{m}` at {b} on `{t}`: not run ({why})" for (t, m, b), why in skipped.items())
    pairs = ensemble_rows(rows, out / "preds")
    write_rows(out / "ensembles.csv", pairs, ENSEMBLE_COLUMNS)
    bad_notes = "".join(f"\n- `{t}`: {len(v)} file(s), e.g. `{sorted(v)[0]}`"
                        for t, v in sorted(bad_files.items()))
    write_text(out / "results.md", results_markdown(rows)
               + (f"\nMethods that cannot fit a budget:{notes}\n" if notes else "")
               + (f"\nUnreadable data files left out (`--on-bad-file skip`; all listed in "
                  f"skipped_files.json):{bad_notes}\n" if bad_notes else "")
               + robustness_markdown(rows, pairs))
    plot_pareto(out / "pareto.png", rows)
    if any(_f(r["shift_acc"]) is not None for r in rows):
        plot_robustness(out / "robustness.png", rows, pairs)
    log(f"bench: done in {(time.perf_counter() - start) / 60:.1f} min -> {results_csv}")
    return rows


def _is_swr(method: str) -> bool:
    """Whether ``method`` is SWR (with any searcher): the plots highlight it."""
    from .methods import METHODS, SWR

    factory = METHODS.get(method)
    return isinstance(factory, type) and issubclass(factory, SWR)


def _budget_order(b: str) -> float:
    if b == NATURAL:
        return math.inf
    bud = Budget.parse(b)
    return bud.fraction if bud.fraction is not None else float(bud.params)


def _f(v) -> Optional[float]:
    if v in (None, "", "None"):
        return None
    return float(v)


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds per (task, method, budget)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["method"], str(r["budget"])), []).append(r)
    out = []
    for (task, method, budget), rs in groups.items():
        acc = [_f(r["test_acc"]) for r in rs]
        shift = [_f(r["shift_acc"]) for r in rs if _f(r["shift_acc"]) is not None]
        out.append({
            "task": task, "method": method, "budget": budget, "n": len(rs),
            "test_acc": statistics.mean(acc), "test_std": statistics.pstdev(acc) if len(acc) > 1 else 0.0,
            "shift_acc": statistics.mean(shift) if shift else None,
            "updated_params": statistics.mean(_f(r["updated_params"]) for r in rs),
            "stored_bytes": statistics.mean(_f(r["stored_bytes"]) for r in rs),
            "extra_flops": statistics.mean(_f(r["extra_flops"]) for r in rs),
            "foldable": str(rs[0]["foldable"]) in ("True", "true", "1"),
            "train_seconds": statistics.mean(_f(r["train_seconds"]) for r in rs),
        })
    return out


def results_markdown(rows: list[dict]) -> str:
    summary = summarize(rows)
    tasks = sorted({s["task"] for s in summary})
    lines = ["| task | method | budget | test acc (mean ± std) | shift acc | updated params | "
             "stored bytes | extra FLOPs | foldable | train s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in sorted(summary, key=lambda s: (s["task"], _budget_order(s["budget"]), -s["test_acc"])):
        shift = "" if s["shift_acc"] is None else f"{s['shift_acc']:.4f}"
        lines.append(f"| {s['task']} | {s['method']} | {s['budget']} | "
                     f"{s['test_acc']:.4f} ± {s['test_std']:.4f} (n={s['n']}) | {shift} | "
                     f"{s['updated_params']:,.0f} | {s['stored_bytes']:,.0f} | "
                     f"{s['extra_flops']:,.0f} | {'yes' if s['foldable'] else 'no'} | "
                     f"{s['train_seconds']:.1f} |")
    if len(tasks) > 1:
        lines += ["", "Average over tasks (test accuracy):", "",
                  "| method | budget | " + " | ".join(tasks) + " | average |",
                  "|---|---|" + "---|" * len(tasks) + "---|"]
        by = {(s["method"], s["budget"], s["task"]): s["test_acc"] for s in summary}
        for method, budget in sorted({(s["method"], s["budget"]) for s in summary},
                                     key=lambda mb: (mb[0], _budget_order(mb[1]))):
            accs = [by.get((method, budget, t)) for t in tasks]
            known = [a for a in accs if a is not None]
            cells = " | ".join("" if a is None else f"{a:.4f}" for a in accs)
            avg = f"{statistics.mean(known):.4f}" if len(known) == len(tasks) else "(incomplete)"
            lines.append(f"| {method} | {budget} | {cells} | {avg} |")
    return "\n".join(lines) + "\n"


def plot_pareto(path: Path, rows: list[dict], title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(rows)
    tasks = sorted({s["task"] for s in summary})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        methods = sorted({s["method"] for s in summary if s["task"] == task})
        for i, method in enumerate(methods):
            pts = sorted((max(s["updated_params"], 1), s["test_acc"], s["test_std"])
                         for s in summary if s["task"] == task and s["method"] == method)
            xs, ys, es = zip(*pts)
            marker = "*" if _is_swr(method) else "o"
            ax.errorbar(xs, ys, yerr=es, marker=marker, ms=10 if marker == "*" else 5,
                        capsize=2, label=method, color=f"C{i % 10}")
        ax.set_xscale("log")
        ax.set_xlabel("updated backbone parameters (log)")
        ax.set_ylabel("test accuracy")
        ax.set_title(title or task, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_png(fig, path)


def _mean(values) -> Optional[float]:
    known = [v for v in values if v is not None]
    return statistics.mean(known) if known else None


def _fmt(v: Optional[float]) -> str:
    return "" if v is None else f"{v:.4f}"


def summarize_ensembles(pairs: list[dict]) -> list[dict]:
    """Mean over seeds per (task, members, budget)."""
    groups: dict[tuple, list[dict]] = {}
    for p in pairs:
        groups.setdefault((p["task"], p["members"], p["budget"]), []).append(p)
    return [{"task": t, "members": m, "budget": b, "n": len(ps),
             **{k: _mean(_f(p[k]) for p in ps) for k in ENSEMBLE_COLUMNS[4:]}}
            for (t, m, b), ps in groups.items()]


def wise_curves(rows: list[dict]) -> dict[str, list[dict]]:
    """Per task, the WiSE-FT curve (accuracies per mixing weight, mean over seeds)."""
    points: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        if r["method"] != "wise-ft":
            continue
        settings = json.loads(r["settings"]) if isinstance(r["settings"], str) else r["settings"]
        for pt in settings.get("curve", []):
            points.setdefault((r["task"], float(pt["alpha"])), []).append(pt)
    curves: dict[str, list[dict]] = {}
    for (task, alpha), pts in sorted(points.items()):
        curves.setdefault(task, []).append(
            {"alpha": alpha, **{k: _mean(_f(p.get(k)) for p in pts)
                                for k in ("val_acc", "test_acc", "shift_acc")}})
    return curves


def robustness_markdown(rows: list[dict], pairs: list[dict], top: int = 12) -> str:
    """The WiSE-FT curve and the best pairwise ensembles, per task ('' when neither ran)."""
    lines: list[str] = []
    for task, curve in wise_curves(rows).items():
        lines += ["", f"WiSE-FT on `{task}`: weights (1 - alpha) x linear probe + alpha x "
                  "fully fine-tuned (from the probe); alpha chosen on validation.", "",
                  "| alpha | val acc | test acc | shift acc |", "|---|---|---|---|"]
        lines += [f"| {p['alpha']:g} | {_fmt(p['val_acc'])} | {_fmt(p['test_acc'])} | "
                  f"{_fmt(p['shift_acc'])} |" for p in curve]
    summary = summarize_ensembles(pairs)
    for task in sorted({s["task"] for s in summary}):
        mine = sorted((s for s in summary if s["task"] == task), key=lambda s: -s["test_acc"])
        shown = mine[:top]
        lines += ["", f"Prediction ensembles on `{task}` (softmax average of two runs with the "
                  f"same seed; {len(shown)} best of {len(mine)} pairs by test accuracy, all in "
                  "ensembles.csv):", "",
                  "| members | budget | test acc | shift acc | best member test | "
                  "best member shift | test gain | shift gain |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in shown:
            gain = [None if a is None or b is None else a - b for a, b in
                    ((s["test_acc"], s["best_member_test_acc"]),
                     (s["shift_acc"], s["best_member_shift_acc"]))]
            lines.append(f"| {s['members']} | {s['budget']} | {_fmt(s['test_acc'])} | "
                         f"{_fmt(s['shift_acc'])} | {_fmt(s['best_member_test_acc'])} | "
                         f"{_fmt(s['best_member_shift_acc'])} | "
                         + " | ".join("" if g is None else f"{g:+.4f}" for g in gain) + " |")
    if not lines:
        return ""
    return "\n## Ensembles and robustness\n" + "\n".join(lines) + "\n"


def plot_robustness(path: Path, rows: list[dict], pairs: list[dict]) -> None:
    """Shift accuracy against test accuracy: methods, the WiSE-FT line, ensembles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = [s for s in summarize(rows) if s["shift_acc"] is not None]
    ens = [s for s in summarize_ensembles(pairs) if s["shift_acc"] is not None]
    curves = wise_curves(rows)
    tasks = sorted({s["task"] for s in summary})
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        methods = sorted({s["method"] for s in summary if s["task"] == task})
        for i, method in enumerate(methods):
            pts = [(s["test_acc"], s["shift_acc"]) for s in summary
                   if s["task"] == task and s["method"] == method]
            marker = "*" if _is_swr(method) else "o"
            ax.scatter(*zip(*pts), marker=marker, s=90 if marker == "*" else 30,
                       label=method, color=f"C{i % 10}", zorder=3)
        curve = [p for p in curves.get(task, []) if p["shift_acc"] is not None]
        if curve:
            ax.plot([p["test_acc"] for p in curve], [p["shift_acc"] for p in curve], "-",
                    color="0.4", lw=1, label="WiSE-FT (alpha 0 to 1)", zorder=2)
            for p in curve:
                ax.annotate(f"{p['alpha']:g}", (p["test_acc"], p["shift_acc"]), fontsize=6)
        mine = [s for s in ens if s["task"] == task]
        if mine:
            ax.scatter([s["test_acc"] for s in mine], [s["shift_acc"] for s in mine], marker="x",
                       s=16, color="black", alpha=0.35, label="ensembles of two", zorder=1)
        ax.set_xlabel("test accuracy")
        ax.set_ylabel("shift_test accuracy")
        ax.set_title(task, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_png(fig, path)
