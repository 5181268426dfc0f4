"""Policy-gradient training of the policy network (REINFORCE with a baseline).

Each iteration samples K selections from the policy, scores them all at once
(in parallel on Ray workers when a pool is given), and takes one gradient step on
``-(reward - baseline) * log_prob - entropy_coef * entropy``. The baseline is an
exponential moving average of the mean reward; advantages are normalised by the
batch's spread so the step size does not depend on the reward scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .network import PolicyNetwork, Rollout
from .registry import register_searcher
from .search import PoolSearcher


@dataclass
class PGConfig:
    samples_per_iteration: int = 8
    lr: float = 3e-3
    entropy_coef: float = 0.01
    baseline_decay: float = 0.8
    hidden: int = 64
    max_iterations: int = 1000
    seed: int = 0


class PGTrainer:
    """The policy, its optimiser and baseline; one :meth:`iterate` is one gradient step."""

    def __init__(self, features: np.ndarray, costs: np.ndarray, budget: int, cfg: PGConfig,
                 on_iteration: Optional[Callable[[dict], None]] = None):
        torch.manual_seed(cfg.seed)
        self.cfg, self.budget, self.on_iteration = cfg, budget, on_iteration
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.feats = torch.as_tensor(features, dtype=torch.float32)
        self.cost_t = torch.as_tensor(costs, dtype=torch.float64)
        self.policy = PolicyNetwork(self.feats.shape[1], cfg.hidden)
        self.opt = torch.optim.Adam(self.policy.parameters(), lr=cfg.lr)
        self.baseline: Optional[float] = None
        self.iterations = 0

    def iterate(self, score: Callable[[list[np.ndarray]], list[float]], k: int) -> None:
        """Sample ``k`` selections, score them, take one step on those that got a score
        (a selection over the search's limit comes back NaN and is left out)."""
        cfg = self.cfg
        self.iterations += 1
        roll = self.policy.rollout(self.feats, self.cost_t, self.budget, k, generator=self.gen)
        rewards = torch.tensor(score([m.numpy() for m in roll.masks]), dtype=torch.float32)
        scored = ~torch.isnan(rewards)
        if int(scored.sum()) < 2:  # no spread to learn from
            return
        if not bool(scored.all()):
            rewards, roll = rewards[scored], Rollout(roll.masks[scored], roll.log_prob[scored],
                                                    roll.entropy[scored])
        mean = float(rewards.mean())
        self.baseline = mean if self.baseline is None else \
            cfg.baseline_decay * self.baseline + (1 - cfg.baseline_decay) * mean
        adv = (rewards - self.baseline) / (rewards.std(unbiased=False) + 1e-3)
        loss = -(adv * roll.log_prob).mean() - cfg.entropy_coef * roll.entropy.mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        if self.on_iteration is not None:
            self.on_iteration({"iteration": self.iterations, "mean_reward": mean,
                               "max_reward": float(rewards.max()), "baseline": self.baseline,
                               "entropy": float(roll.entropy.mean().detach()),
                               "loss": float(loss.detach())})


def train_pg(features: np.ndarray, costs: np.ndarray, budget: int,
             score: Callable[[list[np.ndarray]], list[float]], evaluations_left: Callable[[], int],
             cfg: PGConfig, on_iteration: Optional[Callable[[dict], None]] = None
             ) -> PolicyNetwork:
    """Train a policy until ``evaluations_left()`` reaches 0; return it.

    ``score`` maps a list of boolean masks to rewards (it caches and logs);
    ``evaluations_left`` reports how many distinct scorings the search may still make.
    """
    trainer = PGTrainer(features, costs, budget, cfg, on_iteration)
    _train_while(trainer, score, evaluations_left)
    return trainer.policy


def _train_while(trainer: PGTrainer, score, evaluations_left: Callable[[], int]) -> None:
    cfg = trainer.cfg
    while trainer.iterations < cfg.max_iterations:
        left = evaluations_left()
        if left <= 0:
            break
        # the last batch shrinks so the search makes exactly its allowed scorings
        trainer.iterate(score, max(2, min(cfg.samples_per_iteration, left)))


def greedy_mask(policy: PolicyNetwork, features: np.ndarray, costs: np.ndarray,
                budget: int) -> np.ndarray:
    """The policy's most likely selection."""
    with torch.no_grad():
        roll = policy.rollout(torch.as_tensor(features, dtype=torch.float32),
                              torch.as_tensor(costs, dtype=torch.float64), budget, 1, greedy=True)
    return roll.masks[0].numpy()


class PGSearcher(PoolSearcher):
    """Searcher ``pg``: the policy network trained by policy gradient on the scores."""

    name = "pg"

    def propose(self, problem, run) -> Path:
        from swr.envs.features import layer_features
        from swr.io import save_safetensors
        from swr.runlog import RunLog
        from swr.runlog import reset as reset_runlog

        features = layer_features(problem.stats)
        costs = np.asarray(problem.costs)
        cfg = PGConfig(samples_per_iteration=self.settings.samples_per_iteration,
                       seed=self.settings.seed)
        # every iteration's reward, entropy and loss (a resumed search replays its
        # iterations, so the log starts afresh either way)
        reset_runlog(problem.out, ("search_iterations",))
        iterations = RunLog(problem.out, "search_iterations", tag="search")

        def on_iteration(rec: dict) -> None:
            values = {k: v for k, v in rec.items() if k != "iteration"}
            iterations.record(rec["iteration"], {**values, "best": run.log.best[0],
                                                 "evaluations": len(run.log.seen)})

        trainer = PGTrainer(features, costs, problem.budget_params, cfg, on_iteration)
        # one evaluation is kept for the trained policy's most likely selection ...
        _train_while(trainer, run.score, lambda: run.evaluations_left() - 1)
        policy = trainer.policy
        run.score([greedy_mask(policy, features, costs, problem.budget_params)])
        # ... and when that one was scored before, training goes on to the last evaluation
        _train_while(trainer, run.score, run.evaluations_left)
        iterations.close()
        path = problem.out / "policy.safetensors"
        save_safetensors({k: v.contiguous() for k, v in policy.state_dict().items()}, path,
                         {"n_features": str(features.shape[1]), "hidden": str(cfg.hidden)})
        return path


register_searcher("pg", PGSearcher, "policy network trained by policy gradient (REINFORCE)")
