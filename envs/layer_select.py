"""The layer-selection environment: one decision per candidate layer, in network order.

Observation (a flat float32 vector, all entries in [-1, 1] or [0, 1]):

* the current layer's features (kind one-hot, depth, log-cost, shape, stage-1
  statistics), as prepared by :func:`layer_features`,
* the budget left (fraction of the budget) and the cost of the current layer
  relative to what is left (clipped to 1),
* the decisions so far: +1 reparametrize, -1 freeze, 0 not yet decided.

Action: 0 = freeze, 1 = reparametrize. ``action_masks()`` forbids 1 when the layer
no longer fits; a forbidden action taken anyway (an unmasked agent) is treated as
freeze and flagged in ``info``. The reward is 0 until the last layer, then the
evaluator's score of the selection. The masking, observation and step rules are the
plain functions of :mod:`swr.envs.mdp`, shared with the policy network's rollout.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from .evaluator import CachedEvaluator, Evaluator, SyntheticEvaluator
from .features import layer_features
from .mdp import FREEZE, REPARAM, action_mask, apply_action, observation


class LayerSelectEnv(gym.Env):
    """Choose reparametrize/freeze for each candidate layer under a parameter budget."""

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(self, features: np.ndarray, costs: Sequence[int], budget: int,
                 evaluator: Evaluator, names: Optional[Sequence[str]] = None,
                 render_mode: Optional[str] = None):
        super().__init__()
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or len(features) != len(costs):
            raise ValueError("features must be (layers, F) with one row per cost")
        if budget <= 0:
            raise ValueError(f"budget {budget} must be positive")
        self.features = np.clip(features, -1.0, 1.0)
        self.costs = np.asarray(costs, dtype=np.int64)
        self.budget = int(budget)
        self.names = list(names) if names is not None else list(evaluator.names)
        self.evaluator = evaluator if isinstance(evaluator, CachedEvaluator) else CachedEvaluator(evaluator)
        self.render_mode = render_mode
        n, f = self.features.shape
        self.n_layers = n
        self.observation_space = spaces.Box(-1.0, 1.0, shape=(f + 2 + n,), dtype=np.float32)
        self.action_space = spaces.Discrete(2)
        self._t = 0
        self._left = self.budget
        self._decisions = np.zeros(n, dtype=np.float32)

    # -- gymnasium API --------------------------------------------------------------
    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        self._t = 0
        self._left = self.budget
        self._decisions[:] = 0.0
        return self._obs(), {"budget": self.budget}

    def step(self, action):
        if self._t >= self.n_layers:
            raise RuntimeError("episode is over; call reset()")
        action = int(action)
        if action not in (FREEZE, REPARAM):
            raise ValueError(f"action {action} is not 0 (freeze) or 1 (reparametrize)")
        info: dict[str, Any] = {}
        taken, self._left, masked = apply_action(self.costs, self._t, self._left, action)
        if masked:
            info["masked_action"] = True
        self._decisions[self._t] = 1.0 if taken else -1.0
        self._t += 1
        terminated = self._t == self.n_layers
        reward = 0.0
        if terminated:
            selection = self.selection
            reward = float(self.evaluator(selection))
            info.update(selection=list(selection), cost=self.budget - self._left,
                        score=reward, evaluations=self.evaluator.evaluations)
        return self._obs(), reward, terminated, False, info

    def action_masks(self) -> np.ndarray:
        """[freeze allowed, reparametrize allowed] for the current layer."""
        return action_mask(self.costs, self._t, self._left)

    def render(self):
        if self.render_mode == "ansi":
            marks = "".join({1.0: "R", -1.0: ".", 0.0: "?"}[d] for d in self._decisions)
            return f"{marks}  budget left {self._left}/{self.budget}"
        return None

    # -- helpers --------------------------------------------------------------------
    def steps_left(self) -> int:
        """Decisions left in this episode."""
        return self.n_layers - self._t

    def final_mask(self, action: int) -> np.ndarray:
        """The selection (boolean mask) the episode ends with if ``action`` is taken now,
        at its last layer."""
        mask = self._decisions > 0
        mask[self._t] = apply_action(self.costs, self._t, self._left, action)[0]
        return mask

    @property
    def selection(self) -> tuple[str, ...]:
        return tuple(n for n, d in zip(self.names, self._decisions) if d > 0)

    def _obs(self) -> np.ndarray:
        return observation(self.features, self.costs, self.budget, self._t, self._left,
                           self._decisions)


def make_synthetic_env(n_layers: int = 12, budget_fraction: float = 0.3, seed: int = 0,
                       render_mode: Optional[str] = None) -> LayerSelectEnv:
    """An environment over a made-up network with a deterministic evaluator."""
    rng = np.random.default_rng(seed)
    costs = (2 ** rng.integers(6, 14, size=n_layers)).astype(np.int64)
    names = [f"layer{i}" for i in range(n_layers)]
    stats = [{"name": n, "kind": "conv2d", "cost": int(c), "shape": (int(c),),
              "delta_rel_norm": float(rng.random()), "taylor": float(rng.normal())}
             for n, c in zip(names, costs)]
    budget = max(int(budget_fraction * costs.sum()), int(costs.min()))
    return LayerSelectEnv(layer_features(stats), costs, budget,
                          SyntheticEvaluator(costs, seed=seed, names=names), names,
                          render_mode=render_mode)
