"""The search on a 2-node local Ray cluster against one node.

One ``swr.app.search.search`` (pg, same seed, same evaluations, same cached supernet) run

* in this process (``workers=0``; this run also trains the supernet, which the
  others then load from the cache, so every timed search starts from the same one),
* on a one-node cluster of 1 CPU with 1 worker (``ray start --head --num-cpus 1``),
* on a one-node cluster of 2 CPUs with 2 workers (``ray start --head --num-cpus 2``),
* on a two-node cluster of 1 CPU per node with 2 workers, one on each node (``ray start
  --head --num-cpus 1`` plus ``ray start --address HEAD --num-cpus 1`` on this machine),

each cluster joined as ``swr search --ray-address HEAD`` joins it, and started and
stopped around its run (its start is not timed). Reports the search stage's wall
time (``seconds.search``: the pool's start-up and every scoring), the whole
``search()`` call, and whether every run chose the same selection with the same score.
Both nodes share this machine's cores: the two-node cluster shows what crossing
nodes costs (actors on another raylet, the evaluator fetched by a second object
store), not more hardware.

Clusters use token authentication where Ray asks for it (``RAY_AUTH_MODE=token``,
the token in ``~/.ray/auth_token``, written by ``ray start``), a temp folder of
their own, no dashboard and a 200 MB object store per node; they are stopped by
process id at the end, also when a run fails (never ``ray stop``, which would stop
every Ray instance on the machine).

    python benchmarks/ray_cluster.py [--quick] [--evaluations 32] [--task auto|synthetic|SPEC]
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import subprocess
import sys
import tempfile
import time

import psutil
import torch

from _common import bench_task, kws_base, machine, md_table, print_table, task_line, write_section

BACKBONE = "bcresnet-2"
BUDGET = "5%"
PORT = 6397  # not Ray's default 6379: leaves any other cluster on this machine alone
OBJECT_STORE_BYTES = 200_000_000


def cluster_processes(temp_dir: str) -> set[psutil.Process]:
    """The processes of the Ray nodes started with ``--temp-dir temp_dir``: those with the
    folder in their command line, and their children (the workers, the agents)."""
    me = psutil.Process()
    spare = {me.pid} | {p.pid for p in me.parents()}  # never this process or its callers
    found = [p for p in psutil.process_iter(["cmdline"])
             if p.pid not in spare and temp_dir in " ".join(p.info["cmdline"] or [])]
    procs = set(found)
    for p in found:
        try:
            procs.update(p.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    return procs


class LocalCluster:
    """``ray start`` nodes on this machine in a temp folder of their own; :meth:`stop`
    ends exactly the processes they started (found by that folder in their command
    lines, and their children), by process id."""

    def __init__(self, cpus_per_node: list[int], port: int = PORT):
        self.cpus_per_node, self.port = cpus_per_node, port
        # short: Ray's Unix socket paths under it must stay below ~107 characters
        self.temp_dir = tempfile.mkdtemp(prefix="swr-ray-", dir="/tmp")
        self.address = ""

    def _ray(self, *args: str) -> None:
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", *args,
               f"--object-store-memory={OBJECT_STORE_BYTES}", "--disable-usage-stats"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[3:5])} failed: {done.stdout[-2000:]}"
                               f"{done.stderr[-2000:]}")

    def start(self) -> float:
        """Start the head and the other nodes; seconds it took."""
        from swr.policies.ray_setup import _probe

        t = time.perf_counter()
        # every node and the driver on the loopback address: Ray wants a driver's address
        # to be one of its nodes'
        self._ray("--head", f"--port={self.port}", f"--num-cpus={self.cpus_per_node[0]}",
                  "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                  f"--temp-dir={self.temp_dir}")
        self.address = f"127.0.0.1:{self.port}"
        _probe(self.address)
        for cpus in self.cpus_per_node[1:]:
            self._ray(f"--address={self.address}", f"--num-cpus={cpus}",
                      "--node-ip-address=127.0.0.1")
        return time.perf_counter() - t

    def stop(self) -> None:
        procs = cluster_processes(self.temp_dir)
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class CpuMeter:
    """CPU seconds used while it runs by this process and a cluster's processes (those
    with the cluster's temp folder in their command line, and their children: the
    Ray workers), sampled every ``every`` seconds so that workers which exit are
    counted up to their last sample; and by every other process on the machine
    (the whole machine's busy time less those)."""

    def __init__(self, temp_dir: str | None, every: float = 0.5):
        import threading

        self.temp_dir, self.every = temp_dir, every
        self.last: dict[tuple[int, float], float] = {}
        self.first: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _ours(self) -> list[psutil.Process]:
        me = psutil.Process()
        return [me] + [p for p in cluster_processes(self.temp_dir) if p != me] \
            if self.temp_dir else [me] + me.children(recursive=True)

    def _sample(self) -> None:
        for p in self._ours():
            try:
                key, t = (p.pid, p.create_time()), p.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            self.first.setdefault(key, 0.0)  # started since __enter__: all of it counts
            self.last[key] = t.user + t.system

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    def __enter__(self) -> "CpuMeter":
        self._busy0 = self._busy()
        # processes already running count from now; later ones (workers) from their start
        for p in self._ours():
            try:
                t = p.cpu_times()
                self.first[(p.pid, p.create_time())] = self.last[(p.pid, p.create_time())] = \
                    t.user + t.system
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.ours = sum(self.last[k] - self.first.get(k, 0.0) for k in self.last)
        self.others = max(0.0, self._busy() - self._busy0 - self.ours)


def run_search(base, task, tmp: str, name: str, evaluations: int, epochs: int, seed: int,
               workers: int, address: str | None, temp_dir: str | None) -> dict:
    """One search; its result, the wall time of the whole call, the cluster's nodes, and
    the CPU seconds it used and other processes used meanwhile (:class:`CpuMeter`)."""
    import ray

    from swr.app.search import SearchConfig, search
    from swr.supernet import SupernetConfig

    cfg = SearchConfig(task=task.id, checkpoint="", budget=BUDGET, out=os.path.join(tmp, name),
                       policy="pg", seed=seed, evaluations=evaluations, workers=workers,
                       device="cpu", progress=False, ray_address=address,
                       supernet=SupernetConfig(epochs=epochs, progress=False))
    t0 = time.perf_counter()
    try:
        with CpuMeter(temp_dir) as cpu:
            result, _ = search(copy.deepcopy(base), task, cfg, backbone=BACKBONE)
        wall = time.perf_counter() - t0
        nodes = len([n for n in ray.nodes() if n["Alive"]]) if ray.is_initialized() else 0
    finally:
        if ray.is_initialized():
            ray.shutdown()  # leave the cluster, which is stopped next
    return {"result": result, "wall": wall, "nodes": nodes, "cpu": cpu.ours,
            "others": cpu.others}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="12 evaluations, 1 supernet epoch (a few minutes)")
    ap.add_argument("--evaluations", type=int, default=None, help="per search (default 32)")
    ap.add_argument("--epochs", type=int, default=None, help="supernet epochs (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--task", default="auto",
                    help="auto (kws-synth:de if cached, else synthetic), synthetic, or a spec")
    ap.add_argument("--checkpoint", default=None, help="swr pretrain folder of the source model")
    ap.add_argument("--no-doc", action="store_true", help="print only; leave the doc alone")
    args = ap.parse_args(argv)
    evaluations = args.evaluations or (12 if args.quick else 32)
    epochs = args.epochs or (1 if args.quick else 2)
    torch.set_num_threads(1)  # the driver: the workers need the cores
    # clusters started by `ray start` ask for a token; a driver without this is refused
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    info = machine()
    task = bench_task(args.task)  # loaded before SWR_CACHE moves: the data stays cached
    base, base_desc = kws_base(BACKBONE, task.num_classes, args.checkpoint)
    print(task_line(task), "; base", base_desc, flush=True)

    runs = [("in this process (workers=0)", None, 0),
            ("1 node x 1 CPU, 1 worker", [1], 1),
            ("1 node x 2 CPUs, 2 workers", [2], 2),
            ("2 nodes x 1 CPU, 2 workers (one per node)", [1, 1], 2)]
    headers = ["run", "nodes", "workers", "cluster start s (not timed)", "search stage s",
               "search() call s", "CPU s (this run)", "cores busy (this run)",
               "cores busy (other processes)", "evaluations", "best score", "layers"]
    rows, out = [], {}
    with tempfile.TemporaryDirectory(prefix="swr-bench-") as tmp:
        os.environ["SWR_CACHE"] = tmp  # a fresh supernet cache, filled by the first run
        for label, nodes, workers in runs:
            cluster = LocalCluster(nodes) if nodes else None
            try:
                started = cluster.start() if cluster else 0.0
                r = run_search(base, task, tmp, f"run{len(rows)}", evaluations, epochs, args.seed,
                               workers, cluster.address if cluster else None,
                               cluster.temp_dir if cluster else None)
            finally:
                if cluster:
                    cluster.stop()
            res = r["result"]
            out[label] = r
            rows.append([label, r["nodes"] or "-", workers,
                         round(started, 1) if cluster else "-",
                         round(res["seconds"]["search"], 1), round(r["wall"], 1),
                         round(r["cpu"], 1), round(r["cpu"] / r["wall"], 2),
                         round(r["others"] / r["wall"], 2), res["evaluations"],
                         round(res["val_score"], 4), len(res["layers"])])
            print_table(headers, rows[-1:])
    labels = [r[0] for r in runs]
    t = {k: out[k]["result"]["seconds"]["search"] for k in labels}
    inproc, one1, one2, two = labels
    speed_headers = ["comparison", "search stage speed-up"]
    speed = [["2 nodes x 1 CPU vs 1 node x 1 CPU (a second node added)",
              round(t[one1] / t[two], 2)],
             ["2 nodes x 1 CPU vs 1 node x 2 CPUs (the same 2 workers, across nodes)",
              round(t[one2] / t[two], 2)],
             ["1 node x 2 CPUs vs 1 node x 1 CPU", round(t[one1] / t[one2], 2)],
             ["2 nodes x 1 CPU vs in this process", round(t[inproc] / t[two], 2)]]
    print_table(speed_headers, speed)
    ref = out[inproc]["result"]
    same = {k: (out[k]["result"]["layers"] == ref["layers"]
                and out[k]["result"]["val_score"] == ref["val_score"]) for k in labels}
    print("same selection and score as in this process:", same)
    if args.no_doc:
        return
    body = f"""{task_line(task)}; `{BACKBONE}` base {base_desc}; supernet {epochs} epoch(s)
(trained by the first run, loaded from the cache by the others); pg search, seed {args.seed},
{evaluations} evaluations, budget {BUDGET}, samples per iteration 8; driver 1 torch
thread, each worker the threads `make_pool` gives it. Every cluster was started with
`ray start` on this machine (`--num-cpus` per node as listed, no dashboard, 200 MB object
store per node, token authentication) before its run and stopped after it; the search
joined it with `ray_address` (`swr search --ray-address`). `search stage s` is
`seconds.search` of the result: the pool's start-up (actors placed, evaluator fetched
and built) and every scoring. `CPU s (this run)`: what the driver and the cluster's
processes (its Ray services and workers) used during the `search()` call, sampled every
0.5 s; `cores busy`: CPU seconds / the call's wall seconds, for this run and for every
other process on the machine meanwhile (a shared machine: what was left to the run).
Both nodes of the 2-node cluster share this machine's 2 cores, so it shows what
spreading the workers over two nodes costs, not more hardware. One run each.

{md_table(headers, rows)}

{md_table(speed_headers, speed)}

Same selection and best score as the in-process search: {", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in same.items())}.
"""
    write_section("ray_cluster",
                  "The search on a 2-node local Ray cluster (`benchmarks/ray_cluster.py`)", body, info)


if __name__ == "__main__":
    main()
