"""Scoring many selections at once: locally, or in parallel on Ray workers.

Each Ray worker builds its own evaluator once (the supernet and the validation
data arrive through the object store, shipped once for all workers) and then
scores selections sent to it. A worker that dies mid-search has its pending
selections retried on another worker, and is replaced; retries are counted. When
the cluster itself goes away (its head no longer answers), :meth:`RayPool.map`
raises :class:`~swr.errors.ClusterLostError` instead of waiting for it.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Sequence

import torch

from swr.envs.evaluator import (BN_CLIPS, PROXY_EPOCHS, Evaluator, SupernetEvaluator,
                                TrainedEvaluator)
from swr.errors import ClusterLostError

log = logging.getLogger("swr.pool")


def shipped_task(task, train: bool):
    """``task`` as an evaluator on a worker needs it: an evaluator reads the val split and
    (``train``) the train split, so the test splits stay in the driver, which shrinks what
    every worker fetches. Anything other than a :class:`~swr.tasks.base.Task` is shipped
    whole."""
    if not (dataclasses.is_dataclass(task) and hasattr(task, "shift_test")):
        return task
    return dataclasses.replace(task, train=task.train if train else None, test=None,
                               shift_test=None)


class SupernetEvaluatorFactory:
    """Picklable recipe for a :class:`SupernetEvaluator` (sent to Ray workers)."""

    def __init__(self, supernet: torch.nn.Module, task, device: str = "cpu", bn_batches: int = 4,
                 seed: int = 0, prefix_cache_mb: float = 256.0, metric: str = "accuracy",
                 bn_stats: str = "val", bn_clips: int | None = BN_CLIPS):
        self.supernet, self.task, self.device = supernet, task, device
        self.bn_batches, self.bn_stats, self.seed = bn_batches, bn_stats, seed
        self.bn_clips = bn_clips
        self.prefix_cache_mb = prefix_cache_mb
        self.metric = metric

    def __getstate__(self) -> dict:
        # the train split only with bn_stats="train" (BN recalibration reads it)
        return {**self.__dict__,
                "task": shipped_task(self.task, train=self.bn_stats == "train")}

    def __call__(self) -> SupernetEvaluator:
        return SupernetEvaluator(self.supernet, self.task, device=self.device,
                                 bn_batches=self.bn_batches, bn_stats=self.bn_stats,
                                 bn_clips=self.bn_clips,
                                 seed=self.seed,
                                 prefix_cache_mb=self.prefix_cache_mb,
                                 metric=self.metric)


class TrainedEvaluatorFactory:
    """Picklable recipe for a :class:`TrainedEvaluator` (sent to Ray workers)."""

    def __init__(self, supernet: torch.nn.Module, task, device: str = "cpu",
                 epochs: int = PROXY_EPOCHS,
                 seed: int = 0, metric: str = "accuracy", norms: bool = True):
        self.supernet, self.task, self.device = supernet, task, device
        self.epochs, self.seed, self.metric, self.norms = epochs, seed, metric, norms

    def __getstate__(self) -> dict:
        # it trains on the train split and scores on val
        return {**self.__dict__, "task": shipped_task(self.task, train=True)}

    def __call__(self) -> TrainedEvaluator:
        return TrainedEvaluator(self.supernet, self.task, device=self.device,
                                epochs=self.epochs, seed=self.seed, metric=self.metric,
                                norms=self.norms)


def score_with_details(evaluator: Evaluator, selection) -> tuple[float, dict | None]:
    """``evaluator(selection)`` and, when the evaluator computes several metrics from one
    scoring (:meth:`SupernetEvaluator.scores`), all of them (else None)."""
    scores = getattr(evaluator, "scores", None)
    if scores is None:
        return float(evaluator(selection)), None
    details = {k: float(v) for k, v in scores(selection).items()}
    return details[evaluator.metric], details


class LocalPool:
    """Scores in this process, one selection after another (no Ray).

    ``details`` keeps every metric of each selection scored, where the evaluator
    gives several (see :func:`score_with_details`)."""

    retries = 0
    workers = 1

    def __init__(self, evaluator: Evaluator):
        self.evaluator = evaluator
        self.names = list(evaluator.names)
        self.details: dict[tuple[str, ...], dict] = {}

    def map(self, selections: Sequence[tuple[str, ...]]) -> list[float]:
        out = []
        for s in selections:
            score, details = score_with_details(self.evaluator, s)
            if details is not None:
                self.details[tuple(s)] = details
            out.append(score)
        return out

    def close(self) -> None:
        pass


class RayPool:
    """Scores selections on ``workers`` Ray actors, each holding its own evaluator.

    Workers with more than one torch thread start with ``OMP_WAIT_POLICY`` set to
    ``omp_wait_policy`` (default ``PASSIVE``; None leaves the environment alone): with
    OpenMP's default busy-waiting, a worker whose cores are shared with any other
    process stalls at every parallel region until its descheduled threads run again;
    on a busy 2-core machine that made a 2-thread worker about 6 times slower than
    one thread (``docs/PERFORMANCE.md``). The variable is read when a process loads
    OpenMP, so it can only be given to a process at its start.
    """

    #: Seconds between liveness checks of the cluster while waiting for results.
    poll_s: float = 5.0

    def __init__(self, factory: Callable[[], Evaluator], names: Sequence[str], workers: int,
                 threads_per_worker: int = 1, cpus_per_worker: float = 1.0,
                 gpus_per_worker: float = 0.0, omp_wait_policy: str | None = "PASSIVE"):
        import ray

        from .ray_setup import init_ray

        init_ray()
        self._ray = ray
        self.names = list(names)
        self.workers = workers
        self.retries = 0
        self.lost = False
        self.details: dict[tuple[str, ...], dict] = {}

        @ray.remote
        class EvaluatorWorker:
            def __init__(self, factory, threads):
                torch.set_num_threads(threads)
                self.evaluator = factory()

            def score(self, selection):
                return score_with_details(self.evaluator, selection)

            def ready(self):
                return True

        options = {"num_cpus": cpus_per_worker, "num_gpus": gpus_per_worker}
        if omp_wait_policy is not None and threads_per_worker > 1:
            options["runtime_env"] = {"env_vars": {"OMP_WAIT_POLICY": omp_wait_policy}}
        self._actor_cls = EvaluatorWorker.options(**options)
        self._factory_ref = ray.put(factory)
        self._threads = threads_per_worker
        self.actors = [self._spawn() for _ in range(workers)]
        ray.get([a.ready.remote() for a in self.actors])

    def _spawn(self):
        return self._actor_cls.remote(self._factory_ref, self._threads)

    def map(self, selections: Sequence[tuple[str, ...]]) -> list[float]:
        ray = self._ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        from .ray_setup import cluster_alive

        results: list[float | None] = [None] * len(selections)
        queue = list(range(len(selections)))
        running: dict = {}  # object ref -> (index, actor slot)
        free = list(range(len(self.actors)))
        while queue or running:
            while queue and free:
                slot = free.pop(0)
                i = queue.pop(0)
                running[self.actors[slot].score.remote(selections[i])] = (i, slot)
            done, _ = ray.wait(list(running), num_returns=1, timeout=self.poll_s)
            if not done and not cluster_alive():
                self._lost()
            for ref in done:
                i, slot = running.pop(ref)
                try:
                    results[i], details = ray.get(ref)
                    if details is not None:
                        self.details[tuple(selections[i])] = details
                except (RayActorError, ActorUnavailableError):
                    # the worker died (killed, out of memory), or its node went away
                    if not cluster_alive():
                        self._lost()
                    self.retries += 1
                    log.warning("evaluator worker %d died; retrying its selection (retry %d)",
                                slot, self.retries)
                    self.actors[slot] = self._spawn()
                    queue.insert(0, i)
                free.append(slot)
        return [float(r) for r in results]

    def _lost(self) -> None:
        from .ray_setup import cluster_address, lost_reason

        self.lost = True
        raise ClusterLostError(f"lost the Ray cluster at {cluster_address() or '(unknown)'}: "
                               f"{lost_reason() or 'its head no longer answers'}")

    def close(self) -> None:
        if not self.lost:  # with the cluster gone there is nothing left to stop
            for a in self.actors:
                self._ray.kill(a)
        self.actors = []
