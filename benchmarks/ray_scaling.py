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

Where the rest of 2x goes: every evaluator is wrapped to time each scoring inside
its worker, which splits a pool's wall time into scoring (and how much slower one
scoring gets when two run at once) and the workers' idle time (round trips,
dispatch, the tail of each map() call of 8). The machine's own ceiling is measured
without Ray: the same selections scored by 1 and by 2 plain processes (spawned,
1 thread each, no coordination at all). The per-call overhead of ``RayPool`` is
measured on an evaluator that costs microseconds (``SyntheticEvaluator``), which
bounds what sending several selections per actor call could save.

    python benchmarks/ray_scaling.py [--quick] [--k 16] [--task auto|synthetic|SPEC]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
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


class TimedEvaluator:
    """An evaluator that also reports, with each scoring's metrics, the seconds it took
    inside the process that scored it (``compute_s``): a pool's :func:`score_with_details`
    carries them back to the driver."""

    def __init__(self, inner, build_s: float):
        self.inner, self.names, self.metric = inner, inner.names, inner.metric
        self.build_s = build_s

    def __call__(self, selection) -> float:
        return self.scores(selection)[self.metric]

    def scores(self, selection) -> dict[str, float]:
        t = time.perf_counter()
        out = dict(self.inner.scores(selection))
        out["compute_s"] = time.perf_counter() - t
        out["build_s"] = self.build_s  # building this evaluator, in its worker
        return out


class TimedFactory:
    """Picklable: builds the wrapped factory's evaluator inside :class:`TimedEvaluator`."""

    def __init__(self, inner):
        self.inner = inner
        self.device = inner.device

    def __call__(self) -> TimedEvaluator:
        t = time.perf_counter()
        inner = self.inner()
        return TimedEvaluator(inner, time.perf_counter() - t)


class SyntheticFactory:
    """An evaluator that costs microseconds: what a pool adds per selection."""

    def __init__(self, names):
        self.names = list(names)

    def __call__(self):
        from swr.envs.evaluator import SyntheticEvaluator

        return SyntheticEvaluator([1] * len(self.names), names=self.names)


def chunk_worker_class():
    """A bare Ray actor that scores a list of selections in one call (the idea measured
    against ``RayPool``'s one call per selection)."""
    import ray

    @ray.remote
    class ChunkWorker:
        def __init__(self, factory):
            torch.set_num_threads(1)
            self.evaluator = factory()

        def score_many(self, selections):
            return [float(self.evaluator(s)) for s in selections]

    return ChunkWorker


def compute_seconds(pool, sels) -> float:
    """Seconds the workers spent scoring ``sels`` (timed inside them)."""
    return sum(pool.details[tuple(s)]["compute_s"] for s in sels)


def build_seconds(pool, sels) -> float:
    """The longest time a worker took to build its evaluator (part of the pool's start-up)."""
    return max(pool.details[tuple(s)]["build_s"] for s in sels)


def logliks(pool, sels) -> list[float]:
    return [pool.details[tuple(s)]["loglik"] for s in sels]


def _plain_process(factory_bytes, indexed, barrier, queue) -> None:
    """One plain process (no Ray): build the evaluator, wait for the others, score."""
    torch.set_num_threads(1)
    evaluator = pickle.loads(factory_bytes)()
    barrier.wait()
    t0, c0 = time.time(), time.process_time()
    scored = [(i, evaluator.scores(s)) for i, s in indexed]
    queue.put((t0, time.time(), time.process_time() - c0, scored))


def plain_processes(factory, sels, n: int) -> tuple:
    """Score ``sels`` split over ``n`` spawned processes, each from the start of a common
    barrier to its last selection: (wall s, scores, CPU s, seconds inside scorings,
    log-likelihoods)."""
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    shares = [list(enumerate(sels))[i::n] for i in range(n)]
    # pickled here, not by multiprocessing: its pickler moves tensors into shared memory,
    # and the processes would then merge deltas into one another's weights
    blob = pickle.dumps(factory)
    procs = [ctx.Process(target=_plain_process, args=(blob, share, barrier, queue))
             for share in shares]
    # as Ray starts a worker of 1 CPU: OpenMP told of its one thread before it loads
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        for p in procs:
            p.start()
    finally:
        if saved is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    try:
        got = [queue.get(timeout=1800) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    scores: list[float] = [0.0] * len(sels)
    loglik: list[float] = [0.0] * len(sels)
    compute = 0.0
    for _, _, _, scored in got:
        for i, details in scored:
            scores[i] = float(details[factory.inner.metric])
            loglik[i] = float(details["loglik"])
            compute += details["compute_s"]
    wall = max(g[1] for g in got) - min(g[0] for g in got)
    return wall, scores, sum(g[2] for g in got), compute, loglik


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
    ap.add_argument("--quick", action="store_true", help="K=8 (a few minutes)")
    ap.add_argument("--k", type=int, default=None, help="selections to score (default 16)")
    ap.add_argument("--task", default="auto",
                    help="auto (kws-synth:de if cached, else synthetic), synthetic, or a spec")
    ap.add_argument("--prefix-cache-mb", type=float, default=256.0,
                    help="evaluator prefix cache per worker (0: plain path)")
    ap.add_argument("--no-doc", action="store_true", help="print only; leave the doc alone")
    args = ap.parse_args(argv)
    import ray
    from ray import cloudpickle

    from swr.policies.ray_setup import init_ray, local_cpus, shutdown_ray, worker_threads
    from swr.policies.pool import LocalPool, RayPool, SupernetEvaluatorFactory
    from swr.reparam import reparam_layers

    k = args.k or (8 if args.quick else 16)
    info = machine()
    task = bench_task(args.task)
    print(task_line(task), flush=True)
    supernet = random_supernet(task)
    sels = random_selections(supernet, k, seed=1, budget=BUDGET)
    inner = SupernetEvaluatorFactory(supernet, task, device="cpu",
                                     prefix_cache_mb=args.prefix_cache_mb)
    factory = TimedFactory(inner)
    names = list(reparam_layers(supernet))

    # -- bytes --------------------------------------------------------------------------
    factory_bytes = len(cloudpickle.dumps(inner))
    full_bytes = len(cloudpickle.dumps((supernet, task)))
    call_bytes = [len(pickle.dumps((s,))) for s in sels]
    result_bytes = len(pickle.dumps((0.5, {"accuracy": 0.5, "loglik": -0.5})))

    headers = ["pool", "workers", "threads/worker", "OMP_WAIT_POLICY", "start-up s", "scoring s",
               "scorings/s", "CPU s", "cores busy", "CPU s/scoring", "s/scoring in a worker",
               "workers scoring"]

    def row(label, workers, threads, policy, start, wall, cpu, compute):
        # `workers scoring`: the share of the workers' wall time spent inside a scoring
        return [label, workers, threads, policy, start, round(wall, 1), round(k / wall, 3),
                round(cpu, 1), round(cpu / wall, 2), round(cpu / k, 2), round(compute / k, 2),
                f"{100 * compute / (workers * wall):.0f}%"]

    # -- the machine's ceiling: plain processes, no Ray ----------------------------------
    rows, scores_by, times, computes, loglik_by, builds = [], {}, {}, {}, {}, {}
    for n in (1, 2):
        label = f"{n} plain process{'es' if n > 1 else ''}, no Ray"
        wall, scores_by[label], cpu, computes[label], loglik_by[label] = \
            plain_processes(factory, sels, n)
        times[label] = wall
        rows.append(row(label, n, 1, "-", "-", wall, cpu, computes[label]))
        print_table(headers, rows[-1:])

    t0 = time.perf_counter()
    init_ray()
    t_init = time.perf_counter() - t0
    cpus = local_cpus()
    startup = {}

    # LocalPool: the driver, one thread (the thread question is the Ray rows')
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    local = LocalPool(factory())
    startup["LocalPool"] = time.perf_counter() - t0
    t_local, scores_by["LocalPool"], cpu_local = score_all(local, sels)
    computes["LocalPool"] = compute_seconds(local, sels)
    loglik_by["LocalPool"] = logliks(local, sels)
    rows.append(row("LocalPool (this process)", 1, 1, "-", round(startup["LocalPool"], 2),
                    t_local, cpu_local, computes["LocalPool"]))
    print_table(headers, rows[-1:])

    t1, t2 = worker_threads(1), worker_threads(2)
    configs = [(f"RayPool, 1 worker x {t1} threads, OMP default (before)", 1, t1, None),
               (f"RayPool, 1 worker x {t1} threads (make_pool)", 1, t1, "PASSIVE"),
               ("RayPool, 1 worker x 1 thread", 1, 1, "PASSIVE"),
               (f"RayPool, 2 workers x {t2} thread(s) (make_pool)", 2, t2, "PASSIVE")]
    rtt = {}
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
            computes[label] = compute_seconds(pool, sels)
            loglik_by[label], builds[label] = logliks(pool, sels), build_seconds(pool, sels)
        finally:
            pool.close()
        shown = "-" if threads == 1 else (policy or "unset (OpenMP: active)")
        rows.append(row(label, workers, threads, shown, round(startup[label], 2), times[label],
                        cpu, computes[label]))
        print_table(headers, rows[-1:])

    # -- what RayPool adds per selection: an evaluator that costs microseconds ------------
    n_cheap = 16 * CHUNK
    cheap = SyntheticFactory(names)
    cheap_sels = [tuple(names[j] for j in range(len(names)) if (i >> (j % 8)) & 1)
                  for i in range(n_cheap)]
    per_sel, per_sel_batched = {}, {}
    ChunkWorker = chunk_worker_class()
    for workers in (1, 2):
        pool = RayPool(cheap, names, workers, threads_per_worker=1,
                       cpus_per_worker=min(1.0, cpus / workers))
        try:
            pool.map(cheap_sels[:CHUNK])  # warm: the workers' first calls
            per_sel[workers] = score_all(pool, cheap_sels)[0] / n_cheap
        finally:
            pool.close()
        # the idea: one actor call per worker per map() call, carrying its share of the 8
        actors = [ChunkWorker.options(num_cpus=min(1.0, cpus / workers)).remote(cheap)
                  for _ in range(workers)]
        try:
            ray.get([a.score_many.remote(cheap_sels[:CHUNK]) for a in actors])  # warm
            t0 = time.perf_counter()
            for i in range(0, n_cheap, CHUNK):
                chunk = cheap_sels[i:i + CHUNK]
                ray.get([a.score_many.remote(chunk[j::workers]) for j, a in enumerate(actors)])
            per_sel_batched[workers] = (time.perf_counter() - t0) / n_cheap
        finally:
            for a in actors:
                ray.kill(a)
    shutdown_ray()

    plain1, plain2 = "1 plain process, no Ray", "2 plain processes, no Ray"
    before, one, one_t1, two = (c[0] for c in configs)
    per_scoring = {label: computes[label] / k for label in computes}
    speed = [
        ["2 workers vs 1 worker (both as make_pool sizes them)", round(times[one] / times[two], 2),
         round(times[one] / times[two] / 2, 2)],
        ["2 workers vs 1 worker x 1 thread", round(times[one_t1] / times[two], 2),
         round(times[one_t1] / times[two] / 2, 2)],
        ["2 workers vs LocalPool (1 thread)", round(t_local / times[two], 2),
         round(t_local / times[two] / 2, 2)],
        ["ceiling: 2 plain processes vs 1 (no Ray)", round(times[plain1] / times[plain2], 2),
         round(times[plain1] / times[plain2] / 2, 2)],
        [f"1 worker x {t1} threads: OMP_WAIT_POLICY=PASSIVE vs unset",
         round(times[before] / times[one], 2), "-"],
        [f"1 worker: {t1} threads vs 1 thread", round(times[one_t1] / times[one], 2), "-"],
    ]
    speed_headers = ["comparison", "speed-up", "efficiency (per worker)"]
    print_table(speed_headers, speed)
    # speed-up = (s/scoring alone / s/scoring side by side) x 2 x (share of the time scoring)
    slow = per_scoring[two] / per_scoring[one_t1]
    busy2 = computes[two] / (2 * times[two])
    busy1 = computes[one_t1] / times[one_t1]
    plain_slow = per_scoring[plain2] / per_scoring[plain1]
    plain_busy = computes[plain2] / (2 * times[plain2])
    why_headers = ["factor of 2 workers vs 1 worker x 1 thread", "value"]
    why = [
        ["one scoring, side by side vs alone (s inside a worker; the machine: shared cores, "
         "caches, memory)", f"{slow:.2f}x slower"],
        ["  the same without Ray: 2 plain processes vs 1", f"{plain_slow:.2f}x slower"],
        ["share of the workers' time spent scoring, 2 workers (the rest: idle at the end of "
         "each map() call of 8, dispatch, round trips)", f"{100 * busy2:.0f}%"],
        ["  the same, 1 worker", f"{100 * busy1:.0f}%"],
        ["  the same, 2 plain processes (no coordination)", f"{100 * plain_busy:.0f}%"],
        ["2 x busy share(2) / busy share(1) / slow-down = the speed-up",
         f"{2 * busy2 / busy1 / slow:.2f}x (measured {times[one_t1] / times[two]:.2f}x)"],
        ["RayPool's cost per selection on a microsecond evaluator, 1 worker / 2 workers (ms)",
         f"{per_sel[1] * 1e3:.2f} / {per_sel[2] * 1e3:.2f}"],
        ["  the same with each worker's share of a map() call sent in one actor call",
         f"{per_sel_batched[1] * 1e3:.2f} / {per_sel_batched[2] * 1e3:.2f} "
         f"({per_sel[2] / per_sel_batched[2]:.1f}x less with 2 workers)"],
        ["pool start-up, 1 worker x 1 thread / 2 workers (s)",
         f"{startup[one_t1]:.2f} / {startup[two]:.2f}"],
        ["  of which building the evaluator inside a worker (the rest: the actor's process, "
         "its imports, fetching the factory)", f"{builds[one_t1]:.2f} / {builds[two]:.2f}"],
        ["  start-up as a share of the scoring phase here, 2 workers",
         f"{100 * startup[two] / times[two]:.0f}%"],
        ["  RayPool's cost as a share of one scoring here (the most that several selections "
         "per actor call could save)", f"{100 * per_sel[2] / per_scoring[two]:.2f}%"],
    ]
    print_table(why_headers, why)
    same = {label: scores_by[label] == scores_by["LocalPool"] for label in scores_by}
    # the continuous metric: how far apart two processes' scorings of one selection are
    drift = {label: max(abs(a - b) for a, b in zip(loglik_by[label], loglik_by["LocalPool"]))
             for label in loglik_by}
    payload = [
        ["evaluator factory, pickled (object store, once)", f"{factory_bytes:,}"],
        ["  the same supernet + the whole task, pickled", f"{full_bytes:,}"],
        ["per call: arguments (one selection), median", f"{int(median(call_bytes)):,}"],
        ["per call: result (score and its metrics)", f"{result_bytes:,}"],
    ]
    print_table(["payload", "bytes"], payload)
    print("round trip of an empty actor call (ms):", {k_: round(v * 1e3, 2) for k_, v in rtt.items()})
    print("scores identical to LocalPool:", same)
    print("largest |log-likelihood difference| from LocalPool's:",
          {k_: f"{v:.2g}" for k_, v in drift.items()})
    if args.no_doc:
        return
    body = f"""{task_line(task)}; `{BACKBONE}` supernet with random nonzero deltas; K = {k}
random 5% selections scored in map() calls of {CHUNK} (as the policy-gradient search asks
for them); evaluator prefix cache {args.prefix_cache_mb:g} MiB per worker (each worker
fills its own). Ray started locally with {cpus} CPUs in {t_init:.1f} s (not counted below).
One run; start-up is the time to construct the pool until every actor has built its
evaluator. `CPU s` is what the driver and the evaluator worker processes used during
the scoring phase; `cores busy` = CPU s / scoring s, the cores they actually got.
`s/scoring in a worker` is timed inside the process that scored; `workers scoring` is
the share of the workers' wall time spent inside a scoring. The plain processes
(spawned, 1 thread, no Ray, each scoring its half without waiting for the other)
are the machine's ceiling for two scorers.

{md_table(headers, rows)}

{md_table(speed_headers, speed)}

Where the rest of 2x goes (2 workers of 1 thread against 1 worker of 1 thread):

{md_table(why_headers, why)}

Bytes shipped:

{md_table(["payload", "bytes"], payload)}

Round trip of an empty actor call: {", ".join(f"{k_}: {v * 1e3:.2f} ms" for k_, v in rtt.items())}.
Scores (accuracy) identical to LocalPool's: {", ".join(f"{k_}: {'yes' if v else 'no'}" for k_, v in same.items())}.
Largest difference of a selection's mean log-likelihood from LocalPool's: {", ".join(f"{k_}: {v:.2g}" for k_, v in drift.items())}.
"""
    write_section("ray_scaling", "Ray scaling (`benchmarks/ray_scaling.py`)", body, info)


if __name__ == "__main__":
    main()
