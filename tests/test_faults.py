"""Faults in the distributed part: dying Ray workers, failing Ray tasks, unreachable clusters."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import ray.cloudpickle
import torch

import swr.policies.search as search_mod
import swr.tasks
from swr.app.cli import main
from swr.envs.evaluator import SyntheticEvaluator
from swr.policies.pool import RayPool
from swr.app.search import SearchConfig, run_search
from swr.supernet import SupernetConfig

from fixtures import tiny_audio_task, tiny_checkpoint

pytestmark = pytest.mark.ray
TESTS_DIR = Path(__file__).parent

# Pytest imports this file as a top-level module that Ray workers cannot import;
# ship its classes (the failing evaluators) by value instead of by reference.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """A local Ray instance for this module, shut down at its end (unless one was running)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores: the workers need them
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 object_store_memory=100 * 1024**2, log_to_driver=False)
    yield
    if started:
        ray.shutdown()
    torch.set_num_threads(threads)


class DyingEvaluator:
    """Wraps an evaluator; the first one anywhere to reach ``die_on`` calls kills its process."""

    def __init__(self, inner, marker: str, die_on: int):
        self.inner, self.marker, self.die_on = inner, marker, die_on
        self.names = inner.names
        self.calls = 0

    def __call__(self, selection):
        self.calls += 1
        if self.calls == self.die_on:
            try:  # exactly one death across all workers: whoever creates the marker dies
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                pass
            else:
                os._exit(1)
        return self.inner(selection)


class DyingFactory:
    """Picklable factory of :class:`DyingEvaluator` around another factory."""

    def __init__(self, inner, marker: Path, die_on: int = 3):
        self.inner, self.marker, self.die_on = inner, str(marker), die_on
        self.device = getattr(inner, "device", "cpu")

    def __call__(self):
        return DyingEvaluator(self.inner(), self.marker, self.die_on)


class SyntheticFactory:
    def __init__(self, costs, seed=0):
        self.costs, self.seed = costs, seed

    def __call__(self):
        return SyntheticEvaluator(self.costs, seed=self.seed)


def random_selections(names, n, seed=0):
    rng = np.random.default_rng(seed)
    return [tuple(nm for nm, keep in zip(names, rng.random(len(names)) < 0.4) if keep)
            for _ in range(n)]


def test_worker_that_dies_mid_map_is_retried_elsewhere(ray_local, tmp_path):
    costs = list(range(10, 130, 10))
    reference = SyntheticEvaluator(costs)
    sels = random_selections(reference.names, 10)
    pool = RayPool(DyingFactory(SyntheticFactory(costs), tmp_path / "died"), reference.names, 2)
    try:
        scores = pool.map(sels)
    finally:
        pool.close()
    assert (tmp_path / "died").exists()  # a worker really did die
    assert pool.retries >= 1
    assert scores == [reference(s) for s in sels]


def test_killed_actor_is_replaced(ray_local):
    costs = list(range(10, 130, 10))
    reference = SyntheticEvaluator(costs)
    sels = random_selections(reference.names, 8, seed=1)
    pool = RayPool(SyntheticFactory(costs), reference.names, 2)
    try:
        first = pool.map(sels[:4])
        ray.kill(pool.actors[0], no_restart=True)
        second = pool.map(sels[4:])
    finally:
        pool.close()
    assert pool.retries >= 1
    assert first + second == [reference(s) for s in sels]


@pytest.fixture(scope="module")
def tiny_search(tmp_path_factory):
    """The tiny task behind ``tiny`` and a checkpoint; the session's supernet cache."""
    task = tiny_audio_task()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(swr.tasks, "get_task", lambda spec, **kw: task)
        mp.setenv("SWR_CACHE", str(tmp_path_factory.getbasetemp() / "swr-cache"))
        yield tiny_checkpoint(tmp_path_factory.mktemp("faults") / "ckpt")


def search_cfg(ckpt, out, workers=2):
    return SearchConfig(task="tiny", checkpoint=str(ckpt), budget="10%", out=str(out),
                        policy="pg", evaluations=10, samples_per_iteration=4, seed=3,
                        workers=workers, progress=False, device="cpu",
                        supernet=SupernetConfig(epochs=1, progress=False))


def test_search_survives_a_dying_worker(ray_local, tiny_search, tmp_path, monkeypatch):
    """A Ray worker dies on its third scoring: retried elsewhere, same result as no fault."""
    clean = run_search(search_cfg(tiny_search, tmp_path / "clean", workers=0))  # in-process
    make = search_mod.evaluator_factory
    monkeypatch.setattr(search_mod, "evaluator_factory", lambda cfg, supernet, task, **kw:
                        DyingFactory(make(cfg, supernet, task, **kw), tmp_path / "died"))
    faulty = run_search(search_cfg(tiny_search, tmp_path / "faulty"))
    assert (tmp_path / "died").exists()
    assert faulty["worker_retries"] > 0
    assert (faulty["layers"], faulty["val_score"], faulty["evaluations"]) == \
        (clean["layers"], clean["val_score"], clean["evaluations"])


def test_trained_evaluator_scores_the_same_on_ray_workers(ray_local, tiny_search, tmp_path):
    """--evaluator trained ships the train split to the workers: same scores, same result."""
    import dataclasses

    local = run_search(dataclasses.replace(search_cfg(tiny_search, tmp_path / "local", workers=0),
                                           evaluator="trained", evaluations=4))
    ray_run = run_search(dataclasses.replace(search_cfg(tiny_search, tmp_path / "ray"),
                                             evaluator="trained", evaluations=4))
    assert ray_run["layers"] == local["layers"] and ray_run["val_score"] == local["val_score"]
    assert ray_run["evaluator"] == "trained" and ray_run["workers"] == 2


def test_failing_ray_task_is_one_line(ray_local, tiny_search, tmp_path, capsys):
    """An SwrError raised inside a Ray task (parallel bench runs) still ends in one line, exit 2."""
    args = ["bench", "--task", "kws-synth:xx", "--checkpoint", str(tiny_search), "--methods",
            "norm", "--seeds", "2", "--epochs", "1", "--workers", "2", "--device", "cpu",
            "--out", str(tmp_path / "bench")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # the bench's progress bar had started: it is closed, and the error is the last line
    assert "Traceback" not in "\n".join(err) and sum("error" in line for line in err) == 1, err
    assert err[-1].startswith("swr bench: error: unknown kws-synth language 'xx'; known: ")


SEARCH_SCRIPT = r"""
import os, sys
sys.path.insert(0, os.environ["SWR_TESTS_DIR"])
from fixtures import tiny_audio_task
import swr.tasks
task = tiny_audio_task()
swr.tasks.get_task = lambda spec, **kw: task
from swr.app.cli import main
sys.exit(main(sys.argv[1:]))
"""


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


@pytest.mark.parametrize("address", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}",
                                     "no-such-host.invalid:6379"])
def test_unreachable_cluster_fails_fast_with_one_line(tmp_path, address):
    """No cluster at --ray-address: one clear line before any training, in a fresh process."""
    address = address.format(port=closed_port())
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    env = dict(os.environ, SWR_TESTS_DIR=str(TESTS_DIR), SWR_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(
        [sys.executable, "-c", SEARCH_SCRIPT, "search", "--task", "tiny", "--checkpoint",
         str(ckpt), "--budget", "10%", "--out", str(tmp_path / "out"), "--workers", "2",
         "--ray-address", address, "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=120)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(err) == 1 and f"cannot reach Ray cluster at {address}" in err[0], err
    assert not (tmp_path / "cache" / "supernets").exists()  # failed before stage 1


HEAD_SCRIPT = r"""
import sys
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 2, "include_dashboard": False, "object_store_memory": 100 * 1024**2})
print(cluster.address, flush=True)
sys.stdin.readline()  # the test says when the head goes away
cluster.remove_node(cluster.head_node, allow_graceful=False)
print("head gone", flush=True)
"""

SLOW_SEARCH_SCRIPT = r"""
import os, sys, time
sys.path.insert(0, os.environ["SWR_TESTS_DIR"])
from fixtures import tiny_audio_task
import swr.tasks
import swr.policies.search as search_mod
task = tiny_audio_task()
swr.tasks.get_task = lambda spec, **kw: task

class Slow:  # one second per scoring, so that the head can go away mid-search
    def __init__(self, inner):
        self.inner, self.names = inner, inner.names
    def __call__(self, selection):
        time.sleep(1.0)
        return self.inner(selection)

class SlowFactory:
    def __init__(self, inner):
        self.inner, self.device = inner, inner.device
    def __call__(self):
        return Slow(self.inner())

make = search_mod.evaluator_factory
search_mod.evaluator_factory = lambda cfg, supernet, task, **kw: SlowFactory(
    make(cfg, supernet, task, **kw))
from swr.app.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_head_going_away_mid_search_stops_cleanly_and_resumes(tiny_search, tmp_path, monkeypatch):
    """The head of a joined cluster dies mid-search: one clear line, exit 75, the evaluations
    so far kept; --resume finishes on this machine with the result of an uninterrupted run."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SWR_CACHE", str(cache))  # the subprocess's supernet, reused below
    env = dict(os.environ, SWR_TESTS_DIR=str(TESTS_DIR), SWR_CACHE=str(cache))
    head = subprocess.Popen([sys.executable, "-c", HEAD_SCRIPT], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        address = head.stdout.readline().strip()
        assert address, "the test cluster did not start"
        out = tmp_path / "run"
        args = ["search", "--task", "tiny", "--checkpoint", str(tiny_search), "--budget", "10%",
                "--out", str(out), "--policy", "random", "--evaluations", "12", "--seed", "3",
                "--workers", "2", "--device", "cpu", "--supernet-epochs", "1",
                "--samples-per-iteration", "2"]
        proc = subprocess.Popen([sys.executable, "-c", SLOW_SEARCH_SCRIPT, *args,
                                 "--ray-address", address],
                                stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        log = out / "evaluations.jsonl"
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if log.is_file() and len(log.read_text().splitlines()) >= 2:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the search ended before the head could go away"
        head.stdin.write("go\n")
        head.stdin.flush()
        assert head.stdout.readline().strip() == "head gone"
        _, err = proc.communicate(timeout=90)
    finally:
        if head.poll() is None:
            head.kill()
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("swr search")]
    assert proc.returncode == 75, err[-3000:]
    assert len(lines) == 1 and "lost the Ray cluster" in lines[0] and "--resume" in lines[0], err
    assert "Traceback" not in err
    kept = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()]
    assert 2 <= len(kept) < 12
    assert not (out / "selection.json").exists()

    # resume on this machine (no cluster): the kept scores are replayed, not recomputed
    resumed = run_search(SearchConfig(
        task="tiny", checkpoint=str(tiny_search), budget="10%", out=str(out), policy="random",
        evaluations=12, seed=3, workers=0, resume=True, progress=False, device="cpu",
        samples_per_iteration=2,  # the CLI's default gates, as the interrupted run had
        supernet=SupernetConfig(epochs=1, progress=False, gates="budget")))
    clean = run_search(SearchConfig(
        task="tiny", checkpoint=str(tiny_search), budget="10%", out=str(tmp_path / "clean"),
        policy="random", evaluations=12, seed=3, workers=0, progress=False, device="cpu",
        samples_per_iteration=2,  # the CLI's default gates, as the interrupted run had
        supernet=SupernetConfig(epochs=1, progress=False, gates="budget")))
    assert resumed["replayed_evaluations"] == len(kept)
    assert (resumed["layers"], resumed["val_score"], resumed["evaluations"]) == \
        (clean["layers"], clean["val_score"], clean["evaluations"])
