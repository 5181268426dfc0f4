"""Searcher ``ppo``: MaskablePPO on the layer-selection environment.

The environments run in this process (one per worker, at least one) and score
through the search's :class:`~swr.policies.search.SearchRun`, like every other
searcher: the episodes that end together are scored in one call to the pool (in
this process, or on Ray workers), a selection seen before costs nothing, and PPO
trains until the run has scored its number of distinct selections (keeping one for
the final deterministic rollout).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from stable_baselines3.common.vec_env import DummyVecEnv

from swr.envs.layer_select import LayerSelectEnv

from .registry import register_searcher
from .search import PoolSearcher, SearchRun

#: Episodes per allowed evaluation before PPO gives up finding new selections.
MAX_EPISODES_PER_EVALUATION = 50


class RunEvaluator:
    """An evaluator that scores through the search's run (its log and pool)."""

    def __init__(self, run: SearchRun):
        self.run, self.names = run, list(run.names)

    def __call__(self, selection: Iterable[str]) -> float:
        chosen = set(selection)
        return self.run.score([np.array([n in chosen for n in self.names])])[0]


class PooledVecEnv(DummyVecEnv):
    """In-process environments whose episode-ending scorings go to the pool together.

    Episodes all have one step per layer, so the environments finish together: before
    a step, the selections it will finish are scored in one call (in parallel on Ray
    workers); each environment's own scoring then finds them in the log.
    """

    def __init__(self, env_fns, run: SearchRun):
        super().__init__(env_fns)
        self.run = run

    def step_async(self, actions: np.ndarray) -> None:
        finishing = [env.final_mask(int(a)) for env, a in zip(self.envs, actions)
                     if env.steps_left() == 1]
        if len(finishing) > 1:
            self.run.score(finishing)
        super().step_async(actions)


def run_ppo(settings, features: np.ndarray, costs: Sequence[int], budget: int,
            names: Sequence[str], run: SearchRun, out: Path, memory=None) -> Path:
    """Train MaskablePPO until ``run`` has its evaluations; save the model in ``out``.
    ``memory``: a training-memory budget (:class:`swr.memory.MemoryLimit`) the
    environments mask and observe beside the parameter budget."""
    from .ppo import ppo_select

    n_envs = max(1, settings.workers)
    evaluator = RunEvaluator(run)

    def make_env() -> LayerSelectEnv:
        return LayerSelectEnv(features, costs, budget, evaluator, names, memory=memory)

    def stop(reserve: int) -> bool:
        return run.evaluations_left() <= reserve

    n_steps = max(len(names), 64 // n_envs)
    episodes = MAX_EPISODES_PER_EVALUATION * settings.evaluations
    vec_env = PooledVecEnv([make_env] * n_envs, run)
    model, _ = ppo_select([make_env] * n_envs, episodes * len(names), seed=settings.seed,
                          n_steps=n_steps, batch_size=min(64, n_steps * n_envs),
                          progress=False, stop=stop, vec_env=vec_env,
                          log_dir=str(out))
    path = Path(out) / "policy_ppo.zip"
    model.save(str(path))
    return path


class PPOSearcher(PoolSearcher):
    """Searcher ``ppo``: MaskablePPO (sb3-contrib) on the layer-selection environment."""

    name = "ppo"

    def propose(self, problem, run) -> Path:
        from swr.envs.features import layer_features

        return run_ppo(self.settings, layer_features(problem.stats), problem.costs,
                       problem.budget_params, problem.names, run, problem.out,
                       memory=problem.memory)


register_searcher("ppo", PPOSearcher,
                  "MaskablePPO on the Gymnasium environment swr/LayerSelect-v0")
