"""Policy search with sb3-contrib's MaskablePPO over the layer-selection environment.

Rollouts run in the environments it is handed (the search hands it
:class:`~swr.policies.ppo_search.PooledVecEnv`, which scores through the search's pool,
in-process or on Ray) or in-process ones built from factories; every finished episode is one selection scored by the environment's evaluator. The
search keeps the best selection seen: the policy is a means to find a selection and
is discarded afterwards.

Counting, for honest comparison with other searches: ``evaluations`` is the number
of terminal steps (selections asked of an evaluator, repeats included);
``evaluator_calls`` is how many of them the evaluators actually scored, i.e. cache
misses, summed over the environments (each environment has its own cache).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from sb3_contrib import MaskablePPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv
from swr.progress import progress_bar


@dataclass
class PPOResult:
    """What one MaskablePPO training saw: its best episode and the counts that go with it
    (the search's own result is :class:`swr.selection.SearchResult`)."""

    selection: tuple[str, ...]
    score: float
    cost: int
    evaluations: int
    evaluator_calls: int
    timesteps: int
    masked_actions: int
    seconds: float
    source: str  # "rollout" (an episode during training) or "deterministic" (the final policy)

    def as_dict(self) -> dict:
        return asdict(self)


class _Tally:
    """Running count of finished episodes and the best selection among them."""

    def __init__(self, log: Callable[[dict], None] | None):
        self.log = log
        self.evaluations = 0
        self.masked_actions = 0
        self.calls_per_env: dict[int, int] = {}
        self.best: dict | None = None

    def observe(self, info: dict, env_index: int, timesteps: int, source: str) -> None:
        """Account for one step's ``info``; episodes end with ``selection`` in it."""
        # Masked training never takes a forbidden action; a nonzero count is a bug.
        self.masked_actions += int(bool(info.get("masked_action")))
        if "selection" not in info:
            return
        self.evaluations += 1
        # Each environment reports its own cache's size: the latest value is its total.
        self.calls_per_env[env_index] = int(info.get("evaluations", 0))
        record = {"episode": self.evaluations, "timesteps": timesteps, "env": env_index,
                  "selection": list(info["selection"]), "score": float(info["score"]),
                  "cost": int(info["cost"]), "evaluator_calls": self.evaluator_calls,
                  "source": source}
        if self.log is not None:
            self.log(record)
        # Higher score wins; on a tie the cheaper selection does.
        if self.best is None or (record["score"], -record["cost"]) > (self.best["score"], -self.best["cost"]):
            self.best = record

    @property
    def evaluator_calls(self) -> int:
        return sum(self.calls_per_env.values())

    def result(self, timesteps: int, seconds: float) -> PPOResult | None:
        if self.best is None:
            return None
        return PPOResult(selection=tuple(self.best["selection"]), score=self.best["score"],
                            cost=self.best["cost"], evaluations=self.evaluations,
                            evaluator_calls=self.evaluator_calls, timesteps=timesteps,
                            masked_actions=self.masked_actions, seconds=seconds,
                            source=self.best["source"])


class _EpisodeCallback(BaseCallback):
    """Feeds every step's infos to the tally and drives the progress bar."""

    def __init__(self, tally: _Tally, total_timesteps: int, progress: bool,
                 stop: Callable[[], bool] | None = None):
        super().__init__()
        self.tally, self.stop = tally, stop
        self.bar = progress_bar(total_timesteps, "ppo", "step", leave=False,
                                disable=not progress)

    def _on_step(self) -> bool:
        for i, info in enumerate(self.locals["infos"]):
            self.tally.observe(info, i, self.num_timesteps, "rollout")
        self.bar.update(self.training_env.num_envs)
        if self.tally.best is not None:
            self.bar.set_postfix(best=f"{self.tally.best['score']:.4f}",
                                 evals=self.tally.evaluations)
        return self.stop is None or not self.stop()

    def _on_training_end(self) -> None:
        self.bar.close()


def train_ppo(env_fns: Sequence[Callable[[], gym.Env]], total_timesteps: int, seed: int = 0,
              n_steps: int = 64, batch_size: int = 64, learning_rate: float = 3e-4,
              progress: bool = True,
              log: Callable[[dict], None] | None = None, n_epochs: int = 4,
              gamma: float = 1.0, ent_coef: float = 0.01, net_arch: Sequence[int] = (64, 64),
              final_rollout: bool = False, stop: Callable[[int], bool] | None = None,
              vec_env: VecEnv | None = None, log_dir: str | None = None
              ) -> tuple[MaskablePPO, PPOResult | None]:
    """Train MaskablePPO on the environments and return it with the best selection seen.

    Args:
        env_fns: one factory per parallel environment (run in this process unless
            ``vec_env`` is given).
        total_timesteps: environment steps (layer decisions) over all environments.
        n_steps: steps per environment per policy update.
        progress: show a progress bar.
        log: called with a record (selection, score, cost, counts) per finished episode.
        gamma: 1 by default: the reward comes only at the end of a fixed-length
            episode, and discounting would only make early layers' decisions look
            less important.
        final_rollout: after training, also run the deterministic policy once (on
            environment 0, with action masks) and count it like any episode.
        stop: ``stop(reserve)`` ends training early once it is true (checked after
            every step); ``reserve`` is 1 while the final rollout is still to come. If
            ``stop(0)`` is still false after the final rollout, training goes on until
            it is (or ``total_timesteps`` more steps are taken).
        vec_env: ready environments to train on instead of building them from
            ``env_fns`` (they are closed at the end all the same).
        log_dir: where SB3's training statistics go per update (``ppo.csv`` and
            TensorBoard events, see :mod:`swr.policies.sb3_log`); None: nowhere.

    Returns:
        The trained model and the best selection seen, or ``None`` if no episode
        finished within ``total_timesteps``.
    """
    if not env_fns:
        raise ValueError("need at least one environment factory")
    start = time.perf_counter()
    if vec_env is None:
        vec_env = DummyVecEnv(list(env_fns))
    tally = _Tally(log)
    try:
        model = MaskablePPO("MlpPolicy", vec_env, n_steps=n_steps, batch_size=batch_size,
                            n_epochs=n_epochs, learning_rate=learning_rate, gamma=gamma,
                            ent_coef=ent_coef, seed=seed, device="cpu", verbose=0,
                            policy_kwargs={"net_arch": list(net_arch)})
        if log_dir is not None:
            from .sb3_log import sb3_logger

            model.set_logger(sb3_logger(log_dir))
        else:  # SB3's default logger would leave an empty SB3-<date> folder in the temp dir
            from stable_baselines3.common.logger import Logger

            model.set_logger(Logger(folder=None, output_formats=[]))
        reserve = 1 if final_rollout else 0
        model.learn(total_timesteps, callback=_EpisodeCallback(
            tally, total_timesteps, progress, None if stop is None else lambda: stop(reserve)))
        if final_rollout:
            _deterministic_rollout(model, vec_env, tally)
            if stop is not None and not stop(0):
                # the final rollout found nothing new: train on (from fresh episodes, as
                # it left environment 0 at the end of one) until the last evaluation
                model.learn(total_timesteps, reset_num_timesteps=True, callback=_EpisodeCallback(
                    tally, total_timesteps, progress, lambda: stop(0)))
    finally:
        vec_env.close()
    return model, tally.result(model.num_timesteps, time.perf_counter() - start)


def ppo_select(env_fns: Sequence[Callable[[], gym.Env]], total_timesteps: int,
               **kwargs: Any) -> tuple[MaskablePPO, PPOResult]:
    """:func:`train_ppo` (same arguments) with the final deterministic rollout.

    Returns the model and the better of that rollout and the best episode seen
    during training; the rollout counts as one more evaluation.
    """
    model, result = train_ppo(env_fns, total_timesteps, final_rollout=True, **kwargs)
    assert result is not None  # the final rollout always finishes an episode
    return model, result


def _deterministic_rollout(model: MaskablePPO, vec_env: VecEnv, tally: _Tally) -> None:
    """One greedy episode on environment 0, driven through ``env_method`` so it runs
    wherever that environment lives (and uses its evaluator cache)."""
    obs, _ = vec_env.env_method("reset", indices=0)[0]
    done = False
    while not done:
        # A copy: arrays coming back from another process are read-only (torch warns).
        masks = np.array(vec_env.env_method("action_masks", indices=0)[0])
        action, _ = model.predict(obs, deterministic=True, action_masks=masks)
        obs, _, terminated, truncated, info = vec_env.env_method("step", int(action), indices=0)[0]
        done = terminated or truncated
        tally.observe(info, 0, model.num_timesteps, "deterministic")
