"""Scoring for every searcher: the evaluation log, the scoring run, the pool, the driver.

A :class:`PoolSearcher` (the base of every registered searcher) turns a
:class:`~swr.selection.SearchProblem` into a :class:`~swr.selection.SearchResult`:
it builds the supernet evaluator, the scoring pool (in this process, or Ray workers)
and an :class:`EvaluationLog`, lets the subclass ``propose`` selections through a
:class:`SearchRun`, and writes into the problem's folder:

* ``evaluations.jsonl``, an append-only log of every scoring that makes the search
  resumable: ``--resume`` replays the search from its seed with the logged scores
  served from that log, so it reaches exactly the result of an uninterrupted run and
  only the scorings that were lost are made again;
* ``search.csv`` (one row per distinct selection scored) and ``search.png`` (reward
  over evaluations).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from swr.budget import random_feasible_gates
from swr.envs.evaluator import canonical
from swr.errors import ClusterLostError
from swr.io import save_png, write_csv, writing_error
from swr.selection import SearchProblem, SearchResult

from .registry import SearchSettings


class EvaluationLog:
    """Scores by selection, persisted line by line; the search's resumable state."""

    def __init__(self, path: Path, names: list[str], costs: dict[str, int], resume: bool):
        self.path = path
        self.names = names
        self.costs = costs
        self.saved: dict[tuple[str, ...], float] = {}
        if resume and path.is_file():
            text = path.read_text(errors="replace")
            if text and not text.endswith("\n"):  # cut short by a kill: new records start afresh
                with open(path, "a", encoding="utf-8") as f:
                    f.write("\n")
            for line in text.splitlines():
                try:
                    rec = json.loads(line)
                    self.saved[tuple(rec["selection"])] = float(rec["score"])
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a kill: that scoring is simply redone
        elif path.exists():
            path.unlink()
        self.rows: list[dict] = []
        self.seen: dict[tuple[str, ...], float] = {}
        self.best: tuple[float, tuple[str, ...]] = (-float("inf"), ())
        self.start = time.perf_counter()
        self.replayed = 0
        self._file = None

    def record(self, sel: tuple[str, ...], score: float, fresh: bool,
               details: Optional[dict] = None) -> None:
        """Log ``score`` of ``sel`` once; ``details``: every metric the scoring gave
        (accuracy and log-likelihood), written beside the score."""
        if sel not in self.seen:
            self.seen[sel] = score
            if fresh:
                try:
                    if self._file is None:
                        self._file = open(self.path, "a", encoding="utf-8")
                    self._file.write(json.dumps({"selection": list(sel), "score": score,
                                                 **(details or {})}) + "\n")
                    self._file.flush()
                    os.fsync(self._file.fileno())
                except OSError as e:  # a full disk: name the log, not nothing
                    raise writing_error(e, self.path, None) from e
            else:
                self.replayed += 1
            if score > self.best[0]:
                self.best = (score, sel)
            self.rows.append({"evaluation": len(self.seen), "reward": score,
                              "best_so_far": self.best[0], "cost": sum(self.costs[n] for n in sel),
                              "layers": len(sel), "elapsed_s": round(time.perf_counter() - self.start, 3)})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class SearchRun:
    """Glue between a searcher and the pool: masks in, rewards out, everything logged.

    Every searcher scores through :meth:`score`, which is where evaluations are
    counted, the same way for all: an evaluation is a *distinct* selection scored
    (a repeat is served from the log and costs nothing). Once ``limit`` distinct
    selections are scored, new ones are no longer scored: their reward is NaN and a
    searcher must leave them out.
    """

    def __init__(self, names, costs, budget, pool, log: EvaluationLog, limit: int, progress: bool,
                 memory=None):
        self.names, self.costs, self.budget = names, np.asarray(costs), budget
        self.pool, self.log, self.limit = pool, log, limit
        self.memory = memory  # a swr.memory.MemoryLimit every selection must fit, or None
        self._bar = None
        if progress:
            from swr.progress import progress_bar

            self._bar = progress_bar(limit, "search", "eval")

    def evaluations_left(self) -> int:
        return self.limit - len(self.log.seen)

    def is_new(self, mask: np.ndarray) -> bool:
        """Whether scoring ``mask`` would cost an evaluation."""
        return self._canonical(mask) not in self.log.seen

    def _canonical(self, mask) -> tuple[str, ...]:
        return canonical([n for n, m in zip(self.names, mask) if m], self.names)

    def score(self, masks: list[np.ndarray]) -> list[float]:
        sels = [self._canonical(mask) for mask in masks]
        for sel, mask in zip(sels, masks):
            if sum(self.costs[self.names.index(n)] for n in sel) > self.budget:
                raise AssertionError(f"selector proposed {sel} over the budget")
            if self.memory is not None and not self.memory.fits(np.asarray(mask, dtype=bool)):
                raise AssertionError(f"selector proposed {sel} over the memory budget")
        new = [s for s in dict.fromkeys(sels) if s not in self.log.seen]
        new = new[:max(self.evaluations_left(), 0)]  # the rest are over the limit
        todo = [s for s in new if s not in self.log.saved]
        fresh = dict(zip(todo, self.pool.map(todo))) if todo else {}
        details = getattr(self.pool, "details", {})
        out = []
        for sel in sels:
            if sel in self.log.seen:
                score = self.log.seen[sel]
            elif sel in fresh:
                score = fresh[sel]
                self.log.record(sel, score, fresh=True, details=details.get(sel))
            elif sel in new:
                score = self.log.saved[sel]
                self.log.record(sel, score, fresh=False)
            else:
                score = float("nan")
            out.append(score)
        if self._bar is not None:
            self._bar.n = min(len(self.log.seen), self.limit)
            self._bar.set_postfix(best=f"{self.log.best[0]:.4f}")
            self._bar.refresh()
        return out

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def evaluator_factory(cfg: SearchSettings, supernet, task, norms: bool = True):
    """The picklable recipe of the evaluator every scoring goes through (``cfg.evaluator``);
    ``norms``: whether the task norms train (as the final training's do)."""
    from swr.envs.evaluator import evaluator_metric
    from swr.train import resolve_device

    from .pool import SupernetEvaluatorFactory, TrainedEvaluatorFactory

    metric = evaluator_metric(cfg.evaluator, cfg.reward)
    if cfg.evaluator == "trained":
        return TrainedEvaluatorFactory(supernet, task, device=str(resolve_device(cfg.device)),
                                       epochs=cfg.proxy_epochs, seed=cfg.seed,
                                       metric=metric, norms=norms)
    return SupernetEvaluatorFactory(supernet, task, device=str(resolve_device(cfg.device)),
                                    bn_batches=cfg.bn_batches, seed=cfg.seed, metric=metric,
                                    bn_stats=cfg.bn_stats, bn_clips=cfg.bn_clips)


def make_pool(cfg: SearchSettings, factory, names):
    """A :class:`LocalPool` (``workers`` 0) or a :class:`RayPool` of ``workers`` actors."""
    from .pool import LocalPool, RayPool

    device = factory.device
    if cfg.workers <= 0:
        return LocalPool(factory())
    from .ray_setup import available_cpus, init_ray, worker_threads

    init_ray(cfg.ray_address)
    gpus = 1.0 / cfg.workers if device.startswith("cuda") else 0.0
    return RayPool(factory, names, cfg.workers, threads_per_worker=worker_threads(cfg.workers),
                   cpus_per_worker=min(1.0, available_cpus() / cfg.workers),
                   gpus_per_worker=gpus)


def _cluster_lost(error: Exception, cfg: SearchSettings) -> bool:
    """Whether ``error`` ended the search because the Ray cluster went away (the pool
    says so itself; other Ray errors are checked against the cluster)."""
    if isinstance(error, ClusterLostError):
        return True
    if cfg.workers <= 0 or not type(error).__module__.startswith("ray"):
        return False
    from .ray_setup import cluster_alive

    return not cluster_alive()


#: Random draws per missing evaluation before :meth:`PoolSearcher._top_up` gives up.
TOP_UP_DRAWS = 200


class PoolSearcher:
    """The driver every searcher shares; a subclass implements :meth:`propose`.

    A problem with several budgets is searched in one run of ``evaluations`` distinct
    scorings in all: a subclass whose ``propose`` searches all budgets at once says so
    with ``budget_conditioned``; any other gets one budget after another, each with an
    equal share of the evaluations (a selection already scored for one budget is free
    for the next). Either way the best selection of a budget is the best-scoring
    distinct selection that fits it. When no more selections fit the (largest) budget
    than ``evaluations`` allows, the driver scores every one of them instead of asking
    ``propose`` (:meth:`~swr.selection.SearchProblem.fitting_masks`): every searcher then
    returns the best there is.
    """

    name = ""
    #: the driver takes a list of budgets for any searcher (see the class docstring)
    searches_budget_list = True
    #: whether :meth:`propose` searches every budget of the problem itself
    budget_conditioned = False

    def __init__(self, settings: SearchSettings):
        self.settings = settings

    def describe(self) -> dict:
        return {"policy": self.name, "seed": self.settings.seed, "workers": self.settings.workers}

    def propose(self, problem: SearchProblem, run: SearchRun) -> Optional[Path]:
        """Score selections through ``run`` until it has none left; return the path of
        the policy weights written into ``problem.out``, if any."""
        raise NotImplementedError

    def __call__(self, problem: SearchProblem) -> SearchResult:
        s = self.settings
        if problem.bn_stats is not None:  # the supernet's norms fix the statistics
            s = dataclasses.replace(s, bn_stats=problem.bn_stats)
        names, costs = problem.names, problem.costs
        log = EvaluationLog(problem.out / "evaluations.jsonl", names, dict(zip(names, costs)),
                            s.resume)
        factory = evaluator_factory(s, problem.supernet, problem.task,
                                    norms=problem.norms_trained)
        pool = make_pool(s, factory, names)
        run = SearchRun(names, costs, problem.budget_params, pool, log, s.evaluations, s.progress,
                        memory=problem.memory)
        retries = 0
        per_budget_weights: list[Optional[Path]] = []
        try:
            small = problem.feasible_selections
            if small is not None and small <= s.evaluations:
                # no more selections fit than the search may score: score them all, the
                # one way to be sure of the best (any searcher would end the same)
                weights = None
                masks = problem.fitting_masks()
                for i in range(0, len(masks), 32):
                    run.score(masks[i:i + 32])
            elif len(problem.budget_list) > 1 and not self.budget_conditioned:
                weights = None
                per_budget_weights = self._propose_per_budget(problem, run)
            else:
                weights = self.propose(problem, run)
            topped_up = self._top_up(problem, run)
        except Exception as e:
            if not _cluster_lost(e, s):
                raise
            raise ClusterLostError(
                f"{e if isinstance(e, ClusterLostError) else 'lost the Ray cluster'} after "
                f"{len(log.seen)} of {s.evaluations} evaluations; they are saved in "
                f"{log.path}: rerun the same command with --resume (on a restarted cluster, or "
                "without --ray-address to finish on this machine)") from None
        finally:
            run.close()
            log.close()
            retries = pool.retries
            pool.close()
        best_score, best_sel = log.best
        short = None
        if len(log.seen) < s.evaluations:
            space = problem.feasible_selections
            short = (f"every one of the {space} selections that fit the budget was scored"
                     if space is not None and len(log.seen) >= space else
                     f"no new selection was found in {TOP_UP_DRAWS} random draws per "
                     "missing evaluation")
        write_csv(problem.out / "search.csv", log.rows)
        plot_search(problem.out / "search.png", log.rows, problem.title)
        per_budget = []
        if len(problem.budget_list) > 1:
            costs_by_name = dict(zip(names, costs))
            for i, b in enumerate(problem.budget_list):
                fit = [(score, sel) for sel, score in log.seen.items()
                       if sum(costs_by_name[n] for n in sel) <= b]
                # the first scored among equals, like the overall best
                score, sel = max(fit, key=lambda x: x[0]) if fit else (-float("inf"), ())
                w = per_budget_weights[i] if per_budget_weights else weights
                per_budget.append(SearchResult(layers=sel, score=score, evaluations=len(log.seen),
                                               replayed=log.replayed, retries=retries,
                                               policy_weights=str(w) if w else None))
        return SearchResult(layers=best_sel, score=best_score, evaluations=len(log.seen),
                            replayed=log.replayed, retries=retries,
                            policy_weights=str(weights) if weights else None, rows=log.rows,
                            per_budget=per_budget, topped_up=topped_up, short=short)

    def _top_up(self, problem: SearchProblem, run: SearchRun) -> int:
        """Score distinct random feasible selections until ``run`` has none left, when the
        searcher stopped short of its evaluations (a policy that keeps sampling what it
        has scored); returns how many. Equal evaluations per searcher is what makes
        searchers comparable, so none ends with fewer unless the space runs out."""
        left = run.evaluations_left()
        if left <= 0:
            return 0
        g = torch.Generator().manual_seed(self.settings.seed + 7919)
        costs = list(problem.costs)
        before = left
        for _ in range(TOP_UP_DRAWS * before):
            if run.evaluations_left() <= 0:
                break
            mask = np.asarray(random_feasible_gates(costs, problem.budget_params, g,
                                                    problem.memory))
            if run.is_new(mask):
                run.score([mask])
        return before - max(run.evaluations_left(), 0)

    def _propose_per_budget(self, problem: SearchProblem, run: SearchRun) -> list[Optional[Path]]:
        """Search the budgets one after another, each with an equal share of the
        evaluations (the last also gets what the others left); returns each one's
        policy weights, written into its budget's folder."""
        import copy
        from dataclasses import replace

        total = self.settings.evaluations
        budgets = problem.budget_list
        weights = []
        for i in range(len(budgets)):
            share = total // len(budgets) + (1 if i < total % len(budgets) else 0)
            sub_problem = problem.single(i)
            sub_problem.out.mkdir(parents=True, exist_ok=True)
            sub = copy.copy(self)
            sub.settings = replace(self.settings, evaluations=share)
            last = i == len(budgets) - 1
            sub_run = copy.copy(run)
            sub_run.budget = budgets[i]
            sub_run.limit = total if last else min(total, len(run.log.seen) + share)
            weights.append(sub.propose(sub_problem, sub_run))
        return weights


def plot_search(path: Path, rows: list[dict], title: str) -> None:
    """``search.png``: every evaluation's reward and the best so far (see :mod:`swr.plots`)."""
    from swr.plots import search_figure

    save_png(search_figure(rows, title), path)
