"""Scoring selections in parallel: LocalPool against RayPool with 1 and 2 workers.

K random selections (5% budget) on a bcresnet-2 supernet are scored in chunks of 8,
as a policy-gradient search asks for them, by

* ``LocalPool`` in this process,
* ``RayPool`` with 1 worker, with the threads ``make_pool`` gives it (all cores;
  with OpenMP's default busy-waiting, as before, and with ``OMP_WAIT_POLICY=PASSIVE``,
  RayPool's default now) and with 1 thread,
* ``RayPool`` with 2 workers of 1 thread each (what ``make_pool`` gives 2 workers on
  2 cores),

and reports the scoring phase's wall time, speed-up and efficiency against 1 worker,
the worker start-up cost (``RayPool(...)`` until every actor has built its
evaluator), the bytes shipped (the pickled evaluator factory put once in the object
store, and each call's arguments and result), the round trip of an empty actor call,
whether every pool returned the same scores as ``LocalPool``, and the CPU seconds the
scoring processes got (``cores busy`` = CPU seconds / wall seconds: on a machine that
other work shares, what the workers could actually run on).

    python benchmarks/ray_scaling.py [--quick] [--k 16] [--task auto|synthetic|SPEC]
"""

from __future__ import annotations

import argparse
import pickle
import time

import psutil
import torch

from _common import (bench_task, machine, md_table, median, print_table, random_selections,
                     task_line, timed, write_section)

BACKBONE = "bcresnet-2"
BUDGET = "5%"
CHUNK = 8  # selections per map() call: the search's samples_per_iteration


def random_supernet(task, seed: int = 0):
    """A supernet with random nonzero deltas (scoring time does not depend on training)."""
    from swr.reparam import reparam_layers
    from swr.supernet import build_supernet
    from swr.tasks.backbones import create_backbone

    torch.manual_seed(seed)
    supernet = build_supernet(create_backbone(BACKBONE, num_classes=task.num_classes),
                              task.num_classes)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in reparam_layers(supernet).values():
            scale = layer.base_layer.weight.std() * 0.1 + 1e-3
            layer.delta.copy_(torch.randn(layer.delta.shape, generator=g) * scale)
    return supernet.eval()


def scoring_cpu_seconds() -> float:
    """CPU seconds used so far by this process and its Ray worker processes (the
    actors' hosts); a local Ray instance runs as this process's descendants."""
    me = psutil.Process()
    total = 0.0
    for p in [me] + me.children(recursive=True):
        try:
            if p is me or " ".join(p.cmdline()[:1]).startswith("ray::EvaluatorWorker"):
                t = p.cpu_times()
                total += t.user + t.system
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return total


def score_all(pool, sels) -> tuple[float, list[float], float]:
    """(wall seconds, scores, CPU seconds) of scoring ``sels`` in chunks of CHUNK."""
    scores: list[float] = []
    cpu = scoring_cpu_seconds()
    t = time.perf_counter()
    for i in range(0, len(sels), CHUNK):
        scores += pool.map(sels[i:i + CHUNK])
    wall = time.perf_counter() - t
    return wall, scores, scoring_cpu_seconds() - cpu


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="K=8 (about two minutes)")
    ap.add_argument("--k", type=int, default=None, help="selections to score (default 16)")
    ap.add_argument("--task", default="auto",
                    help="auto (kws-synth:de if cached, else synthetic), synthetic, or a spec")
    ap.add_argument("--prefix-cache-mb", type=float, default=256.0,
                    help="evaluator prefix cache per worker (0: plain path)")
    ap.add_argument("--no-doc", action="store_true", help="print only; leave the doc alone")
    args = ap.parse_args(argv)
    import ray
    from ray import cloudpickle

    from swr.parallel import init_ray, local_cpus, shutdown_ray, worker_threads
    from swr.policies.pool import LocalPool, RayPool, SupernetEvaluatorFactory
    from swr.reparam import reparam_layers

    k = args.k or (8 if args.quick else 16)
    info = machine()
    task = bench_task(args.task)
    print(task_line(task), flush=True)
    supernet = random_supernet(task)
    sels = random_selections(supernet, k, seed=1, budget=BUDGET)
    factory = SupernetEvaluatorFactory(supernet, task, device="cpu",
                                       prefix_cache_mb=args.prefix_cache_mb)
    names = list(reparam_layers(supernet))

    # -- bytes --------------------------------------------------------------------------
    factory_bytes = len(cloudpickle.dumps(factory))
    full_bytes = len(cloudpickle.dumps((supernet, task)))
    call_bytes = [len(pickle.dumps((s,))) for s in sels]
    result_bytes = len(pickle.dumps(0.5))

    t0 = time.perf_counter()
    init_ray()
    t_init = time.perf_counter() - t0
    cpus = local_cpus()
    rows, scores_by = [], {}
    startup = {}

    # LocalPool: the driver, one thread (the thread question is the Ray rows')
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    local = LocalPool(factory())
    startup["LocalPool"] = time.perf_counter() - t0
    t_local, scores_by["LocalPool"], cpu_local = score_all(local, sels)
    headers = ["pool", "workers", "threads/worker", "OMP_WAIT_POLICY", "start-up s", "scoring s",
               "scorings/s", "CPU s", "cores busy", "CPU s/scoring"]
    rows.append(["LocalPool (this process)", 1, 1, "-", round(startup["LocalPool"], 2),
                 round(t_local, 1), round(k / t_local, 3), round(cpu_local, 1),
                 round(cpu_local / t_local, 2), round(cpu_local / k, 2)])
    print_table(headers, rows)

    t1, t2 = worker_threads(1), worker_threads(2)
    configs = [(f"RayPool, 1 worker x {t1} threads, OMP default (before)", 1, t1, None),
               (f"RayPool, 1 worker x {t1} threads (make_pool)", 1, t1, "PASSIVE"),
               ("RayPool, 1 worker x 1 thread", 1, 1, "PASSIVE"),
               (f"RayPool, 2 workers x {t2} thread(s) (make_pool)", 2, t2, "PASSIVE")]
    times, rtt = {}, {}
    for label, workers, threads, policy in configs:
        t0 = time.perf_counter()
        pool = RayPool(factory, names, workers, threads_per_worker=threads,
                       cpus_per_worker=min(1.0, cpus / workers), omp_wait_policy=policy)
        startup[label] = time.perf_counter() - t0
        try:
            a = pool.actors[0]
            ray.get(a.ready.remote())
            rtt[label] = median([timed(lambda: ray.get(a.ready.remote())) for _ in range(20)])
            times[label], scores_by[label], cpu = score_all(pool, sels)
        finally:
            pool.close()
        shown = "-" if threads == 1 else (policy or "unset (OpenMP: active)")
        rows.append([label, workers, threads, shown, round(startup[label], 2),
                     round(times[label], 1), round(k / times[label], 3), round(cpu, 1),
                     round(cpu / times[label], 2), round(cpu / k, 2)])
        print_table(headers, rows[-1:])
    shutdown_ray()

    before, one, one_t1, two = (c[0] for c in configs)
    speed = [
        ["2 workers vs 1 worker (both as make_pool sizes them)", round(times[one] / times[two], 2),
         round(times[one] / times[two] / 2, 2)],
        ["2 workers vs 1 worker x 1 thread", round(times[one_t1] / times[two], 2),
         round(times[one_t1] / times[two] / 2, 2)],
        ["2 workers vs LocalPool (1 thread)", round(t_local / times[two], 2),
         round(t_local / times[two] / 2, 2)],
        [f"1 worker x {t1} threads: OMP_WAIT_POLICY=PASSIVE vs unset",
         round(times[before] / times[one], 2), "-"],
        [f"1 worker: {t1} threads vs 1 thread", round(times[one_t1] / times[one], 2), "-"],
    ]
    speed_headers = ["comparison", "speed-up", "efficiency (per worker)"]
    print_table(speed_headers, speed)
    same = {label: scores_by[label] == scores_by["LocalPool"] for label in scores_by}
    payload = [
        ["evaluator factory, pickled (object store, once)", f"{factory_bytes:,}"],
        ["  the same supernet + the whole task, pickled", f"{full_bytes:,}"],
        ["per call: arguments (one selection), median", f"{int(median(call_bytes)):,}"],
        ["per call: result (a float)", f"{result_bytes:,}"],
    ]
    print_table(["payload", "bytes"], payload)
    print("round trip of an empty actor call (ms):", {k_: round(v * 1e3, 2) for k_, v in rtt.items()})
    print("scores identical to LocalPool:", same)
    if args.no_doc:
        return
    body = f"""{task_line(task)}; `{BACKBONE}` supernet with random nonzero deltas; K = {k}
random 5% selections scored in map() calls of {CHUNK} (as the policy-gradient search asks
for them); evaluator prefix cache {args.prefix_cache_mb:g} MiB per worker (each worker
fills its own). Ray started locally with {cpus} CPUs in {t_init:.1f} s (not counted below).
One run; start-up is the time to construct the pool until every actor has built its
evaluator. `CPU s` is what the driver and the evaluator worker processes used during
the scoring phase; `cores busy` = CPU s / scoring s, the cores they actually got.

{md_table(headers, rows)}

{md_table(speed_headers, speed)}

Bytes shipped:

{md_table(["payload", "bytes"], payload)}

Round trip of an empty actor call: {", ".join(f"{k_}: {v * 1e3:.2f} ms" for k_, v in rtt.items())}.
Scores identical to LocalPool's: {", ".join(f"{k_}: {'yes' if v else 'no'}" for k_, v in same.items())}.
"""
    write_section("ray_scaling", "Ray scaling (`benchmarks/ray_scaling.py`)", body, info)


if __name__ == "__main__":
    main()
