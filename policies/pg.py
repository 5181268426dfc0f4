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

from .network import PolicyNetwork
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


def train_pg(features: np.ndarray, costs: np.ndarray, budget: int,
             score: Callable[[list[np.ndarray]], list[float]], evaluations_left: Callable[[], int],
             cfg: PGConfig, on_iteration: Optional[Callable[[dict], None]] = None
             ) -> PolicyNetwork:
    """Train a policy until ``evaluations_left()`` reaches 0; return it.

    ``score`` maps a list of boolean masks to rewards (it caches and logs);
    ``evaluations_left`` reports how many distinct scorings the search may still make.
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    feats = torch.as_tensor(features, dtype=torch.float32)
    cost_t = torch.as_tensor(costs, dtype=torch.float64)
    policy = PolicyNetwork(feats.shape[1], cfg.hidden)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    baseline: Optional[float] = None
    for it in range(cfg.max_iterations):
        left = evaluations_left()
        if left <= 0:
            break
        # the last batch shrinks so the search makes exactly its allowed scorings
        k = max(2, min(cfg.samples_per_iteration, left))
        roll = policy.rollout(feats, cost_t, budget, k, generator=gen)
        masks = [m.numpy() for m in roll.masks]
        rewards = torch.tensor(score(masks), dtype=torch.float32)
        mean = float(rewards.mean())
        baseline = mean if baseline is None else \
            cfg.baseline_decay * baseline + (1 - cfg.baseline_decay) * mean
        adv = (rewards - baseline) / (rewards.std(unbiased=False) + 1e-3)
        loss = -(adv * roll.log_prob).mean() - cfg.entropy_coef * roll.entropy.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if on_iteration is not None:
            on_iteration({"iteration": it + 1, "mean_reward": mean, "max_reward": float(rewards.max()),
                          "baseline": baseline, "entropy": float(roll.entropy.mean()),
                          "loss": float(loss)})
    return policy


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
        from safetensors.torch import save_file

        from swr.envs.features import layer_features
        from swr.io import atomic_path

        features = layer_features(problem.stats)
        costs = np.asarray(problem.costs)
        cfg = PGConfig(samples_per_iteration=self.settings.samples_per_iteration,
                       seed=self.settings.seed)
        # one evaluation is kept for the trained policy's most likely selection
        policy = train_pg(features, costs, problem.budget_params, run.score,
                          lambda: run.evaluations_left() - 1, cfg)
        run.score([greedy_mask(policy, features, costs, problem.budget_params)])
        path = problem.out / "policy.safetensors"
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in policy.state_dict().items()}, str(tmp),
                      metadata={"n_features": str(features.shape[1]), "hidden": str(cfg.hidden)})
        return path


register_searcher("pg", PGSearcher, "policy network trained by policy gradient (REINFORCE)")
