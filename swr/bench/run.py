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
import json
import os
import time
from pathlib import Path
from typing import Callable, Optional

from ..budget import Budget, backbone_params
from ..errors import BudgetError, SwrError
from ..io import read_json, write_csv, write_json, write_text
from ..pretrain import checkpoint_metrics
from ..robustness import cell_name, ensemble_rows
from ..search import register_swr_methods
from .config import (COLUMNS, ENSEMBLE_COLUMNS, NATURAL, BenchConfig, budget_order, expand_tasks,
                     family_lr, method_lr)
from .plots import plot_pareto, plot_robustness
from .report import _f, results_markdown, robustness_markdown

# swr-ppo, swr-random, ...: SWR with each registered searcher, in every process that benches
register_swr_methods()


def run_job(task_spec: str, method: str, budget: str, seed: int, cfg: BenchConfig,
            lr: float, knobs: dict, threads: int = 0, out_dir: Optional[str] = None,
            predictions: Optional[str] = None) -> dict:
    """One bench cell; loads task and checkpoint itself so it can run in a Ray worker.

    ``predictions``: where to store the trained model's class probabilities on the
    evaluation splits (for the ensembles table)."""
    import torch

    from .. import tasks
    from ..methods import METHODS, get_method, run_method
    from ..pretrain import load_pretrained
    from ..search import attach_searcher
    from ..train import TrainConfig

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
    from ..methods import METHODS, get_method

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
    """``results.csv`` and ``ensembles.csv``: ``columns`` in order, other keys left out."""
    write_csv(path, rows, columns)


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
        from ..tune import tune_methods

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

        from ..parallel import init_ray

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
    rows.sort(key=lambda r: (r["task"], r["method"], budget_order(r["budget"]), int(r["seed"])))
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


