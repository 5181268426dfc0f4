"""``swr bench``: every method at every budget it supports, same data, epochs and seeds.

Each (task, method, budget, seed) is one job; jobs run as Ray tasks when more than
one CPU (or a GPU) is there, else one after another. Every finished job is
appended to ``results.csv`` (rewritten atomically), so an interrupted bench
continues with ``--resume`` and skips what is done. ``results.md`` holds mean ± std
over seeds (plus a per-method average over tasks when there are several), and
``pareto.png`` plots test accuracy against updated parameters. Every run of a method
that folds keeps its task delta in ``runs/<task>-<method>-<budget>-s<seed>/
task_delta.safetensors`` (deployable with ``swr fold`` or a task store). The base is a
``swr pretrain`` folder or a backbone + weights file (:mod:`swr.source`).
"""

from __future__ import annotations

import contextlib
import csv
import json
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

from ...budget import Budget, backbone_params
from ...errors import BudgetError, SwrError
from ...io import (check_rerun, left_as_found_on_refusal, out_lock, write_csv, write_json,
                  write_text)
from ...source import base_spec, checkpoint_backbone
from ...robustness import cell_name, ensemble_rows
from ..search import check_fingerprint
from .config import (COLUMNS, ENSEMBLE_COLUMNS, NATURAL, BenchConfig, budget_order, expand_tasks,
                     family_lr, method_lr)
from .plots import plot_pareto, plot_robustness
from .report import _f, budget_markdown, results_markdown, robustness_markdown

def configure_method(method: str, cfg: BenchConfig, seed: int, backbone: str, knobs: dict,
                     out_dir: Optional[str] = None, progress: bool = False):
    """The :class:`~swr.methods.Method` named ``method`` for one run: ``knobs`` plus what
    it takes from the run (seed, device, folder, SWR's evaluations; the learning rates
    of its other phases), with the searcher it asks for attached."""
    from ...methods import METHODS, get_method
    from ..search import attach_searcher

    knobs = dict(knobs)
    factory = METHODS[method]
    # what the method takes from the run, unless tuning or the caller set it
    context = {"seed": seed, "device": cfg.device, "out": out_dir,
               "evaluations": cfg.swr_evaluations, "supernet_epochs": cfg.supernet_epochs}
    for name in getattr(factory, "context_knobs", ()):
        if context.get(name) is not None:
            knobs.setdefault(name, context[name])
    for name, family in getattr(factory, "lr_knobs", {}).items():
        knobs.setdefault(name, family_lr(family, cfg, backbone))
    chosen = get_method(method, **knobs)
    attach_searcher(chosen, progress=progress)
    return chosen


def run_job(task_spec: str, method: str, budget: str, seed: int, cfg: BenchConfig,
            lr: float, knobs: dict, threads: int = 0, out_dir: Optional[str] = None,
            predictions: Optional[str] = None) -> dict:
    """One bench cell; loads task and checkpoint itself so it can run in a Ray worker.

    ``predictions``: where to store the trained model's class probabilities on the
    evaluation splits (for the ensembles table)."""
    import torch

    from ...methods import run_method
    from ...source import load_base, load_task
    from ...train import TrainConfig

    if threads:
        torch.set_num_threads(threads)
    base, meta = load_base(base_spec(cfg.checkpoint, cfg.backbone, cfg.weights))
    task = load_task(task_spec, meta, on_bad_file=cfg.on_bad_file, override=cfg.data_override)
    budget_params = None if budget == NATURAL else Budget.parse(budget).resolve(backbone_params(base))
    tc = TrainConfig(epochs=cfg.epochs, lr=lr, batch_size=cfg.batch_size, seed=seed,
                     device=cfg.device, progress=False, desc=method, log_dir=out_dir)
    if out_dir:  # this cell starts afresh: its epochs.csv and TensorBoard events are new
        from ...runlog import reset

        reset(out_dir)
    chosen = configure_method(method, cfg, seed, meta["backbone"], knobs, out_dir)
    try:
        # every run that folds keeps its task delta in out_dir (deployable as is)
        row = run_method(chosen, base, task, budget_params, tc, predictions=predictions,
                         export=out_dir, backbone=meta["backbone"])
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
    from ...methods import METHODS, get_method

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


#: Columns a results.csv row must hold as numbers to be summarised again on --resume.
NUMERIC_COLUMNS = ("test_acc", "updated_params", "stored_bytes", "extra_flops", "train_seconds")


def read_rows(path: Path) -> list[dict]:
    """The rows of a bench's ``results.csv`` (none when it does not exist), each checked.

    Raises:
        SwrError: a wrong header or a row that is not a finished run (it could only be
            a damaged or foreign file), naming the file and its line.
    """
    if not path.is_file():
        return []
    fix = "remove it (its runs are redone) or start a new --out"
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise SwrError(f"{path} is not a results table of swr bench (no column(s) "
                               f"{', '.join(missing[:4])}); {fix}")
            rows = []
            for row in reader:
                if None in row or any(v is None for v in row.values()):
                    raise SwrError(f"{path}:{reader.line_num}: the row does not have one value "
                                   f"per column; {fix}")
                try:
                    int(row["seed"])
                    budget_order(row["budget"])
                    if not (row["task"] and row["method"]):
                        raise ValueError("empty task or method")
                    for c in NUMERIC_COLUMNS:
                        float(row[c])
                except (ValueError, SwrError) as e:
                    raise SwrError(f"{path}:{reader.line_num}: not a finished run ({e}); "
                                   f"{fix}") from None
                rows.append(row)
            return rows
    except (UnicodeDecodeError, csv.Error) as e:
        raise SwrError(f"{path} is not a readable CSV table ({e}); {fix}") from None


def write_rows(path: Path, rows: list[dict], columns: list[str] = COLUMNS) -> None:
    """``results.csv`` and ``ensembles.csv``: ``columns`` in order, other keys left out."""
    write_csv(path, rows, columns)


def _key(row: dict) -> tuple:
    return (row["task"], row["method"], str(row["budget"]), int(row["seed"]))


#: How each entry of a bench's ``fingerprint.json`` is named to the user.
BENCH_FINGERPRINT_LABELS = {
    "base": "base weights (--checkpoint / --weights, by content hash)", "backbone": "backbone",
    "epochs": "--epochs", "lr": "--lr", "method_lr": "per-method learning rates",
    "batch_size": "batch size", "seeds": "--seeds", "swr_evaluations": "--swr-evaluations",
    "supernet_epochs": "supernet epochs", "tune": "--tune", "tune_trials": "tune trials",
    "on_bad_file": "--on-bad-file", "data_override": "--image-size/--mean/--std",
}


def bench_fingerprint(cfg: BenchConfig, backbone: str) -> dict:
    """What every row of a bench depends on beyond its (task, method, budget, seed) key:
    the base weights by content hash and the training settings shared by all runs.
    Tasks, methods and budgets are left out: a resumed bench may add cells."""
    from ...source import file_sha256

    spec = base_spec(cfg.checkpoint, cfg.backbone, cfg.weights)
    weights = Path(spec.checkpoint) / "model.safetensors" if spec.checkpoint else Path(str(spec.weights))
    return {"base": file_sha256(weights) if weights.is_file() else None, "backbone": backbone,
            "epochs": cfg.epochs, "lr": cfg.lr, "method_lr": dict(sorted(cfg.method_lr.items())),
            "batch_size": cfg.batch_size, "seeds": cfg.seeds,
            "swr_evaluations": cfg.swr_evaluations, "supernet_epochs": cfg.supernet_epochs,
            "tune": cfg.tune, "tune_trials": cfg.tune_trials, "on_bad_file": cfg.on_bad_file,
            # absent without one: fingerprints of benches made before the options still match
            **({"data_override": cfg.data_override.as_dict()} if cfg.data_override else {})}


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> list[dict]:
    """Run (or continue) the bench; returns all result rows.

    Holds ``out/.lock`` while it runs (a second bench writing the same ``--out`` is
    refused) and records :func:`bench_fingerprint` in ``out/fingerprint.json``; a
    ``--resume`` with other settings is refused with one line saying what differs.
    """
    # refused before its first result: --out as it was found (taken back while the lock is
    # held, so nothing of another process is touched; out_lock removes a folder it made)
    with out_lock(cfg.out, "bench"), left_as_found_on_refusal(cfg.out, ("results.csv",)):
        # another bench there is refused before any work (loading a suite renders it)
        check_rerun(cfg.out, "bench", BENCH_OUTPUTS, resume=cfg.resume,
                    overwrite=cfg.overwrite, resumable=True)
        check_tasks(cfg)  # a bad task is refused here, before any worker starts
        return _run_bench(cfg, log)


def check_tasks(cfg: BenchConfig) -> None:
    """Load the base and every task of ``cfg`` once, in this process, before any run: a
    missing folder, an unreadable file or a bounded option (:mod:`swr.tasks.options`)
    ends the bench with its one line instead of failing in each Ray worker."""
    from ...source import load_base, load_task

    cfg.tasks = expand_tasks(cfg.tasks)
    plan(cfg)  # unknown methods and budgets first: they cost nothing to check
    _, meta = load_base(base_spec(cfg.checkpoint, cfg.backbone, cfg.weights))
    for task in cfg.tasks:
        load_task(task, meta, on_bad_file=cfg.on_bad_file, override=cfg.data_override)


#: What a bench writes into its ``--out``: a folder holding one holds a bench, and
#: ``--overwrite`` removes these (and nothing else) before the new bench starts.
BENCH_OUTPUTS = ("fingerprint.json", "results.csv", "results.md", "pareto.png", "robustness.png",
                 "ensembles.csv", "skipped_files.json", "runs", "preds")


def _run_bench(cfg: BenchConfig, log: Callable[[str], None]) -> list[dict]:
    out = Path(cfg.out)
    if cfg.overwrite and not cfg.resume:  # run_bench allowed it: the old bench goes
        for name in BENCH_OUTPUTS:
            old = out / name
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            elif old.exists() or old.is_symlink():
                old.unlink()
    out.mkdir(parents=True, exist_ok=True)
    cfg.tasks = expand_tasks(cfg.tasks)
    cells = plan(cfg)
    results_csv = out / "results.csv"
    rows = read_rows(results_csv) if cfg.resume else []
    done = {_key(r) for r in rows}
    todo = [c for c in cells if c not in done]
    log(f"bench: {len(cells)} runs ({len(cells) - len(todo)} done before), "
        f"{len(cfg.tasks)} task(s), methods {', '.join(cfg.methods)}")
    from ...policies.ray_setup import resolve_workers

    workers = resolve_workers(cfg.workers)

    backbone = checkpoint_backbone(base_spec(cfg.checkpoint, cfg.backbone, cfg.weights))

    def job_args(cell):
        task, method, budget, seed = cell
        lr, knobs = tuned.get((task, method, budget), (method_lr(method, cfg, backbone), {}))
        name = cell_name(task, method, budget, seed)
        preds = out / "preds" / f"{name}.safetensors"
        preds.parent.mkdir(parents=True, exist_ok=True)
        return task, method, budget, seed, cfg, lr, knobs, 0, str(out / "runs" / name), str(preds)

    start = time.perf_counter()
    skipped: dict[tuple[str, str, str], str] = {}
    bad_files_json = out / "skipped_files.json"
    bad_files: dict[str, list[str]] = {}
    if cfg.resume and bad_files_json.is_file():
        try:
            bad_files = json.loads(bad_files_json.read_text(encoding="utf-8"))
        except (ValueError, RecursionError):
            bad_files = None  # damaged: refused below like any other wrong content
        if not (isinstance(bad_files, dict) and all(
                isinstance(v, list) and all(isinstance(p, str) for p in v)
                for v in bad_files.values())):
            raise SwrError(f"{bad_files_json} is not the skipped-files list of swr bench (a JSON "
                           f"object of task: [file, ...]); remove it or start a new --out")
    elif bad_files_json.exists():
        bad_files_json.unlink()  # a fresh bench: the list belongs to the runs it replaces
    # before any run (and any tuning): results of other settings are never resumed
    check_fingerprint(out, bench_fingerprint(cfg, backbone), cfg.resume, command="bench",
                      state="results.csv", labels=BENCH_FINGERPRINT_LABELS)
    if cfg.tune:
        from ..tune import tune_methods

        tuned = tune_methods(cfg, todo, run_job, log)
    else:
        tuned = {}

    # after the resumed state is checked: an error is then the only line printed
    bar = None
    if cfg.progress:
        from ...progress import progress_bar

        bar = progress_bar(len(todo), "bench", "run")
    last = ""  # the last finished run's result, shown beside what runs now

    def show(now: str, refresh: bool = True) -> None:
        """The bar's postfix: the run(s) going on and what they do, then the last result
        (a log gets it at most every LOG_INTERVAL seconds, see swr.progress)."""
        if bar is not None:
            bar.set_postfix_str("; ".join(t for t in (now, last) if t), refresh=refresh)

    def finished(row: dict) -> None:
        nonlocal last
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
            last = f"last {row['method']}@{row['budget']}={float(row['test_acc']):.3f}"
            show("", refresh=False)  # shown by the update
            bar.update(1)

    if workers > 1 and len(todo) > 1:
        import ray

        from ...policies.ray_setup import init_ray, worker_threads

        init_ray()
        # on a GPU the workers share it: each asks Ray for its share, so none waits for one
        from ...train import resolve_device

        gpus = 1.0 / workers if resolve_device(cfg.device).type == "cuda" else 0.0
        remote = ray.remote(num_cpus=1, num_gpus=gpus)(run_job)
        threads = worker_threads(workers)
        pending = {}
        queue = list(todo)

        def show_running() -> None:  # a worker's epochs stay in it: the runs' names
            names = [run_label(c) for c in pending.values()]
            show(f"running {', '.join(names[:2])}"
                 + (f" and {len(names) - 2} more" if len(names) > 2 else ""))

        try:
            while queue or pending:
                while queue and len(pending) < workers:
                    cell = queue.pop(0)
                    a = list(job_args(cell))
                    a[7] = threads
                    pending[remote.remote(*a)] = cell
                show_running()
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    pending.pop(ref)
                    finished(ray.get(ref))
        except BaseException:
            _abandon(pending)  # the error's line stays the only one printed
            raise
    else:
        from ...progress import status_reported_to

        for cell in todo:
            label, method = run_label(cell), cell[1]
            show(label)
            # the run's own epochs (and SWR's search), as its training loops report them
            with status_reported_to(
                    lambda text: show(f"{label}: {text.removeprefix(method + ' ')}")):
                result = run_job(*job_args(cell))
            finished(result)
    if bar is not None:
        bar.close()
    rows.sort(key=lambda r: (r["task"], r["method"], budget_order(r["budget"]), int(r["seed"])))
    write_rows(results_csv, rows)
    notes = "".join(f"\n- `{m}` at {b} on `{t}`: not run ({why})" for (t, m, b), why in skipped.items())
    pairs = ensemble_rows(rows, out / "preds")
    write_rows(out / "ensembles.csv", pairs, ENSEMBLE_COLUMNS)
    bad_notes = "".join(f"\n- `{t}`: {len(v)} file(s), e.g. `{sorted(v)[0]}`"
                        for t, v in sorted(bad_files.items()))
    write_text(out / "results.md", results_markdown(rows) + budget_markdown(rows, out / "preds")
               + (f"\nMethods that cannot fit a budget:{notes}\n" if notes else "")
               + (f"\nUnreadable data files left out (`--on-bad-file skip`; all listed in "
                  f"skipped_files.json):{bad_notes}\n" if bad_notes else "")
               + robustness_markdown(rows, pairs))
    plot_pareto(out / "pareto.png", rows)
    if any(_f(r["shift_acc"]) is not None for r in rows):
        plot_robustness(out / "robustness.png", rows, pairs)
    log(f"bench: done in {(time.perf_counter() - start) / 60:.1f} min -> {results_csv}")
    return rows




def run_label(cell: tuple) -> str:
    """A bench cell as the progress bar names it: ``kws-synth:fr swr 5% s0`` (a long task
    spec, e.g. a path, keeps its end)."""
    task, method, budget, seed = cell
    if len(task) > 40:
        task = "..." + task[-37:]
    return f"{task} {method} {budget} s{seed}"


def _abandon(refs) -> None:
    """Cancel the Ray runs still pending when a bench stops, and collect their outcome,
    so that Ray does not print an "Unhandled error" traceback for each at exit."""
    import ray

    for ref in refs:
        with contextlib.suppress(Exception):
            ray.cancel(ref, force=True)
    for ref in refs:
        with contextlib.suppress(Exception):
            ray.get(ref, timeout=5)


def finetune_method(method: str, task_spec: str, base, out: str | Path,
                    budget: Optional[str] = None, epochs: int = 20, lr: Optional[float] = None,
                    batch_size: int = 64, seed: int = 0, device: str = "auto",
                    progress: bool = True, on_bad_file: str = "fail",
                    knobs: Optional[dict] = None, overwrite: bool = False,
                    data_override=None) -> dict:
    """Train any foldable method on ``task_spec`` from ``base`` and keep the result
    (``swr finetune --method``).

    The run is a bench cell's (:func:`configure_method`, then
    :func:`swr.methods.runner.run_method`). Writes, like ``swr finetune --selection``,
    ``task_delta.safetensors``, ``model.safetensors`` (the deployed task model: base +
    delta), ``history.json`` and ``metrics.json`` (the bench row plus task, backbone,
    base, lr and epochs) into ``out``, staged so that ``out`` is all new or all old;
    returns the metrics. ``base`` is a :class:`swr.source.BaseSpec`. ``lr`` defaults to
    the bench's default for the method and backbone family; ``budget`` is needed by the
    methods that size themselves to one (``lora``, ``swr``, ...). ``data_override``
    (a :class:`swr.tasks.base.DataOverride`) replaces the base's image size and
    normalisation, and is recorded.
    """
    from ..finetune import OUTPUTS
    from ...io import check_output, check_run_folder, run_folder
    from ...methods import get_method, run_method
    from ...source import load_base, load_task
    from ...tasks import task_data_path
    from ...train import TrainConfig

    # before any work: the run may not overwrite what it reads, nor a folder of other files
    check_output(out, {"--checkpoint": base.checkpoint, "--weights": base.weights,
                       "--task": task_data_path(task_spec)})
    outputs = OUTPUTS | {"search"}
    check_run_folder(out, outputs)
    recipe = get_method(method, **(knobs or {}))  # unknown names and knobs fail first
    if not recipe.foldable:
        raise SwrError(f"method {method!r} does not fold into the base architecture, so it has "
                       "no task delta to keep; measure it with swr bench")
    if recipe.respects_budget and budget is None:
        raise SwrError(f"method {method!r} sizes itself to a budget: give --budget "
                       "(e.g. 5% or 20000)")
    base_model, desc = load_base(base)
    task = load_task(task_spec, desc, on_bad_file=on_bad_file, override=data_override)
    budget_params = (Budget.parse(budget).resolve(backbone_params(base_model))
                     if recipe.respects_budget else None)
    cfg = BenchConfig(tasks=[task_spec], checkpoint=base.checkpoint or "", methods=[method],
                      budgets=[budget or NATURAL], out=str(out), epochs=epochs, lr=lr,
                      batch_size=batch_size, device=device, on_bad_file=on_bad_file)
    lr = method_lr(method, cfg, desc["backbone"])
    tc = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, device=device,
                     progress=progress, desc=method)
    with run_folder(out, "finetune", outputs, overwrite=overwrite) as stage:
        chosen = configure_method(method, cfg, seed, desc["backbone"], knobs or {},
                                  str(stage / "search"), progress)
        row = run_method(chosen, base_model, task, budget_params, tc, export=str(stage),
                         export_model=True, backbone=desc["backbone"])
        metrics = {**row, "task": task_spec, "backbone": desc["backbone"], "base": desc["base"],
                   "weights_sha256": desc["weights_sha256"], "lr": lr, "epochs": epochs,
                   "seed": seed, "classes": list(task.class_names),
                   "skipped_files": list(task.info.get("skipped", [])),
                   "data_override": data_override.as_dict() if data_override else None}
        write_json(stage / "metrics.json", metrics)
    return metrics
