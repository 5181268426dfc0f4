"""Resident memory of a search: the driver plus its Ray processes.

A local Ray instance started by the driver runs as the driver's descendants (GCS,
raylet, agents, and the worker processes that host the evaluator actors), so the
driver's process tree is exactly this search's footprint, other Ray sessions on the
machine excluded. A sampler thread adds up the tree's RSS every 0.25 s; the peak of
that sum is reported per part (driver, Ray workers, Ray's own services), together with
the sum of USS (memory unique to each process; RSS counts shared library pages once
per process).

* Peak: ``swr.app.search.search`` (policy gradient) with N = 0 (in-process), 1 and 2
  Ray workers. The supernet is trained by the first run and served from its cache
  to the others, so those peaks are the search phase's.
* Growth: RSS read after every scoring call of a long search with 2 workers, with
  the evaluators' prefix cache at its default (it grows until its cap) and switched
  off; the slope (least squares, MiB per 100 evaluations) over all of it and over
  its second half.

    python benchmarks/memory.py [--quick] [--evaluations N] [--long N]
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import threading
import time

import numpy as np
import psutil
import torch

from _common import bench_task, kws_base, machine, md_table, print_table, task_line, write_section

BACKBONE = "bcresnet-2"
BUDGET = "5%"
MiB = 2**20


def is_ray_worker(cmdline: str) -> bool:
    """A process that hosts (or waits to host) an actor, as opposed to Ray's services:
    workers retitle themselves ``ray::<Actor>`` / ``ray::IDLE`` and start as
    ``default_worker.py``; the agents are titled ``ray::...Agent``."""
    if cmdline.startswith("ray::"):
        return not cmdline.split()[0].endswith("Agent")
    return "default_worker.py" in cmdline


def tree_memory(uss: bool = False) -> dict[str, float]:
    """Bytes held by this process and its descendants, by part."""
    me = psutil.Process()
    parts = {"driver": 0.0, "ray workers": 0.0, "ray services": 0.0}
    for p in [me] + me.children(recursive=True):
        try:
            mem = p.memory_full_info().uss if uss else p.memory_info().rss
            name = " ".join(p.cmdline()) if p is not me else ""
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if p is me:
            parts["driver"] += mem
        elif is_ray_worker(name):
            parts["ray workers"] += mem
        else:
            parts["ray services"] += mem
    parts["total"] = sum(parts.values())
    return parts


class Sampler:
    """Samples ``tree_memory`` in a thread; keeps the peak of each part."""

    def __init__(self, every_s: float = 0.25):
        self.every = every_s
        self.peak: dict[str, float] = {}
        self.peak_uss = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        n = 0
        while not self._stop.is_set():
            m = tree_memory()
            if m["total"] >= self.peak.get("total", 0.0):
                self.peak = m
            if n % 8 == 0:  # USS reads every page map: less often
                self.peak_uss = max(self.peak_uss, tree_memory(uss=True)["total"])
            n += 1
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False


class MeasuredPool:
    """Wraps the search's pool: reads the tree's RSS after every scoring call."""

    def __init__(self, pool, trace: list):
        self.pool, self.trace = pool, trace
        self.names, self.workers = pool.names, pool.workers

    @property
    def retries(self):
        return self.pool.retries

    def map(self, selections):
        out = self.pool.map(selections)
        prev = self.trace[-1][0] if self.trace else 0
        self.trace.append((prev + len(selections), tree_memory()["total"]))
        return out

    def close(self):
        self.pool.close()


def run_search(base, task, workers: int, evaluations: int, out: str, trace: list | None = None,
               policy: str = "pg", prefix_cache_mb: float | None = None):
    from swr.policies.ray_setup import shutdown_ray
    from swr.policies import search as search_mod
    from swr.app.search import SearchConfig, search
    from swr.supernet import SupernetConfig

    cfg = SearchConfig(task=task.id, checkpoint="", budget=BUDGET, out=out,
                                  policy=policy, evaluations=evaluations, workers=workers,
                                  device="cpu", progress=False,
                                  supernet=SupernetConfig(epochs=2, progress=False))
    real, real_factory = search_mod.make_pool, search_mod.evaluator_factory
    if trace is not None:
        search_mod.make_pool = lambda *a, **k: MeasuredPool(real(*a, **k), trace)
    if prefix_cache_mb is not None:
        def factory(*a, **k):
            f = real_factory(*a, **k)
            f.prefix_cache_mb = prefix_cache_mb
            return f
        search_mod.evaluator_factory = factory
    try:
        with Sampler() as s:
            t0 = time.perf_counter()
            result, _ = search(copy.deepcopy(base), task, cfg, backbone=BACKBONE)
            seconds = time.perf_counter() - t0
            shutdown_ray()
    finally:
        search_mod.make_pool, search_mod.evaluator_factory = real, real_factory
    return s, result, seconds


def slope(points) -> float:
    """MiB per 100 evaluations, least squares."""
    if len(points) < 3:
        return float("nan")
    x = np.array([p[0] for p in points], float)
    y = np.array([p[1] for p in points], float) / MiB
    return float(np.polyfit(x, y, 1)[0] * 100)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer evaluations (a few minutes)")
    ap.add_argument("--evaluations", type=int, default=None, help="per peak run (default 10)")
    ap.add_argument("--long", type=int, default=None, help="long runs' evaluations (default 80)")
    ap.add_argument("--task", default="auto",
                    help="auto (kws-synth:de if cached, else synthetic), synthetic, or a spec")
    ap.add_argument("--checkpoint", default=None, help="swr pretrain folder of the source model")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the driver")
    ap.add_argument("--no-doc", action="store_true", help="print only; leave the doc alone")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    evaluations = args.evaluations or (6 if args.quick else 10)
    long_n = args.long or (32 if args.quick else 80)
    info = machine()
    task = bench_task(args.task)
    base, base_desc = kws_base(BACKBONE, task.num_classes, args.checkpoint)
    print(task_line(task), "; base", base_desc, flush=True)
    idle = tree_memory()

    rows = []
    with tempfile.TemporaryDirectory(prefix="swr-bench-") as tmp:
        os.environ["SWR_CACHE"] = tmp  # one fresh supernet, trained once, shared by the runs
        for workers in (0, 1, 2):
            s, result, seconds = run_search(base, task, workers, evaluations,
                                            os.path.join(tmp, f"peak{workers}"))
            p = s.peak
            rows.append([workers or "0 (in-process)", result["evaluations"], round(seconds, 1),
                         round(p["driver"] / MiB), round(p["ray workers"] / MiB),
                         round(p["ray services"] / MiB), round(p["total"] / MiB),
                         round(s.peak_uss / MiB)])
            print_table(["Ray workers", "evaluations", "s", "driver", "ray workers",
                         "ray services", "total RSS", "total USS"], rows[-1:])
        growth, long_s, samples = [], {}, {}
        for mb in (256.0, 0.0):
            trace: list = []
            _, _, long_s[mb] = run_search(base, task, 2, long_n, os.path.join(tmp, f"long{mb:g}"),
                                          trace, policy="random", prefix_cache_mb=mb)
            half = [t for t in trace if t[0] > trace[-1][0] / 2]
            label = f"prefix cache {mb:g} MiB" if mb else "prefix cache off"
            for span, pts in (("all of it", trace), ("second half", half)):
                growth.append([label, span, f"{pts[0][0]}-{pts[-1][0]}", round(pts[0][1] / MiB),
                               round(pts[-1][1] / MiB), round(slope(pts), 1)])
            samples[label] = ", ".join(f"{n}: {m / MiB:.0f}"
                                       for n, m in trace[:: max(1, len(trace) // 12)])
    growth_headers = ["evaluators", "span", "evaluations", "RSS first (MiB)", "RSS last (MiB)",
                      "slope (MiB / 100 evaluations)"]
    print_table(growth_headers, growth)
    peak_headers = ["Ray workers", "evaluations", "wall s", "driver MiB", "Ray worker processes MiB",
                    "Ray services MiB", "total RSS MiB", "total USS MiB"]
    if args.no_doc:
        return
    body = f"""{task_line(task)}; `{BACKBONE}` base {base_desc}; supernet 2 epochs; budget
{BUDGET}; evaluator defaults (prefix cache up to 256 MiB per evaluator). Before the runs
the driver held {idle['driver'] / MiB:.0f} MiB (data and models loaded).

Peak over each whole search (sampled every 0.25 s; parts at the moment of the
total's peak):

{md_table(peak_headers, rows)}

Long searches: random policy, {long_n} evaluations on 2 Ray workers, with the evaluators'
prefix cache at its default and switched off ({", ".join(f"{v:.0f} s" for v in long_s.values())});
total RSS of the tree after each scoring call.

{md_table(growth_headers, growth)}

RSS (MiB) by evaluations done: {"; ".join(f"{k}: {v}" for k, v in samples.items())}.
"""
    write_section("memory", "Memory of a search (`benchmarks/memory.py`)", body, info)


if __name__ == "__main__":
    main()
