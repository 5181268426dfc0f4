"""What the benchmark scripts share: the machine's description, timing, the tasks they
run on, and writing a script's section of ``docs/PERFORMANCE.md``.

Each script owns one section between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``
and rewrites only that one (the file is replaced atomically), so the scripts can be
run in any order and alone.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "PERFORMANCE.md"

DOC_HEADER = """# Performance

Measured by the scripts in `benchmarks/` (see `benchmarks/README.md`); each script
rewrites its own section below, between its markers, with the machine it ran on and
the exact command. Timings are medians over repeats; comparisons are ratios measured
side by side in the same run.
"""


# -- command lines ------------------------------------------------------------------------
def task_checkpoint(parser, item: str) -> tuple[str, str]:
    """``--task SPEC=CHECKPOINT`` split into (spec, checkpoint folder); a parser error
    unless the folder is a ``swr pretrain`` output."""
    spec, sep, ckpt = item.rpartition("=")
    if not sep or not spec or not Path(ckpt, "metrics.json").is_file():
        parser.error(f"--task {item!r}: expected SPEC=CHECKPOINT with a swr pretrain folder")
    return spec, ckpt


def folder_slug(text: str) -> str:
    """``text`` as one folder name: ``kws-synth:ru?speakers=16,24,24`` ->
    ``kws-synth_ru_speakers_16_24_24``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


# -- the machine --------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def machine() -> dict:
    """The facts a reader needs to compare these numbers with their own."""
    info = {
        "cpu": cpu_model(),
        "cores": cores(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _memory_gib(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load": _load(),
    }
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def _load() -> str:
    """1-minute load average: what else wanted the cores (this box is shared)."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:  # pragma: no cover
        return "?"


def _memory_gib() -> float | None:
    try:
        import psutil

        return round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # pragma: no cover
        return None


def command() -> str:
    """The command line that ran this script, as typed from the project root."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(ROOT)
    except ValueError:
        pass
    return " ".join(["python", str(script)] + [shlex.quote(a) for a in sys.argv[1:]])


def machine_line(info: dict) -> str:
    parts = [f"CPU {info['cpu']}", f"{info['cores']} cores",
             f"{info['torch_threads']} torch threads"]
    if info.get("memory_gib"):
        parts.append(f"{info['memory_gib']} GiB RAM")
    if info.get("gpu"):
        parts.append(f"GPU {info['gpu']}")
    parts += [f"Python {info['python']}", f"torch {info['torch']}"]
    if info.get("ray"):
        parts.append(f"ray {info['ray']}")
    parts.append(info["date"])
    if info.get("load"):
        parts.append(f"1-min load average {info['load']} at the start, {_load()} at the end")
    return ", ".join(parts)


# -- timing -------------------------------------------------------------------------------
def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes (CUDA work is waited for)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def spread(xs: Sequence[float]) -> str:
    """``min-max`` of a series, for the reader to judge the noise."""
    return f"{min(xs):.3g}-{max(xs):.3g}"


# -- the doc ------------------------------------------------------------------------------
#: two-sided 95% Student t quantiles by degrees of freedom (beyond 30: the normal's 1.96)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
       9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120,
       17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069,
       24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042}


def mean_ci95(xs: list[float]) -> tuple[float, float, float]:
    """Mean and the 95% t interval of the mean (NaN bounds for fewer than 2 values)."""
    m = statistics.mean(xs)
    if len(xs) < 2:
        return m, math.nan, math.nan
    half = T95.get(len(xs) - 1, 1.96) * statistics.stdev(xs) / math.sqrt(len(xs))
    return m, m - half, m + half


def fmt_ci(xs: list[float]) -> str:
    """A mean and its 95% t interval in points, ``*`` when the interval excludes zero."""
    if not xs:
        return "-"
    m, lo, hi = mean_ci95(xs)
    if math.isnan(lo):
        return f"{m:+.2f} (n=1)"
    mark = " *" if lo > 0 or hi < 0 else ""
    return f"{m:+.2f} [{lo:+.2f}, {hi:+.2f}]{mark}"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def write_section(name: str, title: str, body: str, info: dict | None = None,
                  doc: Path = DOC) -> None:
    """Replace (or append) section ``name`` of ``doc``, stamped with machine and command."""
    from swr.io import write_text

    info = info or machine()
    text = (f"<!-- bench:{name} -->\n## {title}\n\n"
            f"Command: `{command()}`  \nMachine: {machine_line(info)}\n\n"
            f"{body.strip()}\n<!-- /bench:{name} -->")
    old = doc.read_text(encoding="utf-8") if doc.is_file() else DOC_HEADER
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->",
                         re.S)
    new = pattern.sub(lambda _: text, old) if pattern.search(old) else \
        old.rstrip("\n") + "\n\n" + text + "\n"
    write_text(doc, new)
    print(f"wrote section {name!r} of {doc}")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    print(md_table(headers, rows))
    sys.stdout.flush()


# -- tasks --------------------------------------------------------------------------------
def synthetic_kws(n_train: int = 600, n_val: int = 200, n_classes: int = 12, seed: int = 0):
    """A stand-in for ``kws-synth:<lang>`` of realistic size: log-mel shaped clips
    ``(1, 40, 101)`` whose class is a band of raised energy (learnable, not trivial)."""
    from swr.tasks.base import Task, tensor_split

    g = torch.Generator().manual_seed(seed)

    def split(n: int):
        y = torch.arange(n) % n_classes
        x = torch.randn(n, 1, 40, 101, generator=g)
        lo = 2 + (y * 36) // n_classes
        rows = torch.arange(40)
        band = (rows[None] >= lo[:, None]) & (rows[None] < lo[:, None] + 4)
        x += band[:, None, :, None] * (1.0 + 0.5 * torch.rand(n, 1, 1, 1, generator=g))
        return tensor_split(x, y)

    return Task(id=f"synthetic-kws({n_train}/{n_val})", modality="audio",
                class_names=[f"c{i}" for i in range(n_classes)], train=split(n_train),
                val=split(n_val), test=split(n_val), input_shape=(1, 40, 101))


def kws_cached(lang: str = "de") -> bool:
    """Whether the ``kws-synth:<lang>`` cache is ready (loading it then generates nothing)."""
    try:
        from swr.tasks import kws_synth

        root = kws_synth._cache_root(None)
        return kws_synth._cache_ok(root / lang, kws_synth._config(lang, 0, None, None), False)
    except Exception:  # an older or newer kws_synth: treat as not cached
        return False


def bench_task(spec: str, n_train: int = 600, n_val: int = 200):
    """The task a benchmark runs on: ``auto`` (``kws-synth:de`` when its cache is ready,
    else the synthetic stand-in), ``synthetic``, or any task spec."""
    if spec == "synthetic" or (spec == "auto" and not kws_cached("de")):
        return synthetic_kws(n_train, n_val)
    from swr.tasks import get_task

    return get_task("kws-synth:de" if spec == "auto" else spec)


def kws_base(backbone: str, num_classes: int, checkpoint: str | None = None
             ) -> tuple[torch.nn.Module, str]:
    """The source model to transfer from, and a phrase saying what it is.

    ``checkpoint`` (a ``swr pretrain`` folder), else the cached default kws source model
    when ``swr demo`` / ``default_checkpoint`` has trained one, else random weights.
    """
    from swr.pretrain import DEFAULT_SOURCES, default_checkpoint_dir, load_pretrained
    from swr.tasks.backbones import create_backbone

    if checkpoint is None:
        folder = default_checkpoint_dir("kws")
        if DEFAULT_SOURCES["kws"][1] == backbone and (folder / "metrics.json").is_file():
            checkpoint = str(folder)
    if checkpoint is not None:
        model, meta = load_pretrained(checkpoint)
        model.reset_classifier(num_classes)
        return model.eval(), f"pretrained on {meta.get('task', '?')} ({checkpoint})"
    torch.manual_seed(0)
    return create_backbone(backbone, num_classes=num_classes).eval(), "random-initialised"


def random_selections(supernet, n: int, seed: int, budget: str,
                      late: bool = False) -> list[tuple[str, ...]]:
    """``n`` distinct random feasible selections under ``budget`` (the random selector's
    draw); ``late``: only layers of the second half of the network may open."""
    import numpy as np

    from swr.budget import resolve_budget
    from swr.policies.selectors import random_selection
    from swr.reparam import candidates

    cands = candidates(supernet)
    costs = np.array([c.params for c in cands])
    limit = resolve_budget(supernet, budget)
    if late:
        costs[: len(costs) // 2] = limit + 1  # never fits
    rng = np.random.default_rng(seed)
    out: list[tuple[str, ...]] = []
    while len(out) < n:
        sel = tuple(c.name for c, m in zip(cands, random_selection(costs, limit, rng)) if m)
        if sel and sel not in out:
            out.append(sel)
    return out


def task_line(task) -> str:
    return (f"task `{task.id}`: {len(task.train)} train / {len(task.val)} val clips of "
            f"{tuple(task.input_shape)}, {task.num_classes} classes")
