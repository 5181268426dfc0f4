"""Searcher ``ppo``: MaskablePPO on the layer-selection environment.

Each environment (in a Ray actor with ``--workers N``, else in this process) builds
its own supernet evaluator, pre-filled with the scores a resumed search already
has; every finished episode is recorded in the search's evaluation log.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from swr.envs.evaluator import CachedEvaluator
from swr.envs.layer_select import LayerSelectEnv

from .registry import register_searcher
from .search import PoolSearcher


class EnvFactory:
    """Picklable recipe for one :class:`LayerSelectEnv` over the supernet."""

    def __init__(self, features: np.ndarray, costs: Sequence[int], budget: int,
                 names: Sequence[str], evaluator_factory, saved: dict):
        self.features, self.costs, self.budget = features, list(costs), budget
        self.names, self.evaluator_factory, self.saved = list(names), evaluator_factory, dict(saved)

    def __call__(self) -> LayerSelectEnv:
        evaluator = CachedEvaluator(self.evaluator_factory())
        evaluator.cache.update(self.saved)  # a resumed search does not rescore
        return LayerSelectEnv(self.features, self.costs, self.budget, evaluator, self.names)


def run_ppo(cfg, features: np.ndarray, costs: Sequence[int], budget: int, names: Sequence[str],
            evaluator_factory, log, out: Path) -> Path:
    """Train MaskablePPO for ``cfg.evaluations`` episodes; record them in ``log``."""
    from .ppo import ppo_select

    n_envs = max(1, cfg.workers)
    use_ray = cfg.workers > 0
    if use_ray:
        from swr.parallel import init_ray

        init_ray(cfg.ray_address)
    factory = EnvFactory(features, costs, budget, names, evaluator_factory, log.saved)

    def record(rec: dict) -> None:
        sel = tuple(rec["selection"])
        log.record(sel, float(rec["score"]), fresh=sel not in log.saved)

    episodes = max(1, cfg.evaluations - 1)  # one more for the final deterministic rollout
    n_steps = max(len(names), 64 // n_envs)
    model, _ = ppo_select([factory] * n_envs, episodes * len(names), seed=cfg.seed,
                          n_steps=n_steps, batch_size=min(64, n_steps * n_envs),
                          use_ray=use_ray, progress=cfg.progress, log=record)
    path = Path(out) / "policy_ppo.zip"
    model.save(str(path))
    return path


class PPOSearcher(PoolSearcher):
    """Searcher ``ppo``: MaskablePPO (sb3-contrib) on the layer-selection environment."""

    name = "ppo"
    uses_pool = False

    def propose(self, problem, run) -> Path:
        from swr.envs.features import layer_features

        return run_ppo(self.settings, layer_features(problem.stats), problem.costs,
                       problem.budget_params, problem.names, self.factory, self.log, problem.out)


register_searcher("ppo", PPOSearcher,
                  "MaskablePPO on the Gymnasium environment swr/LayerSelect-v0")
