"""The layer-selection environment: one decision per candidate layer, in network order.

Observation (a flat float32 vector, all entries in [-1, 1] or [0, 1]):

* the current layer's features (kind one-hot, depth, log-cost, shape, stage-1
  statistics), as prepared by :func:`layer_features`,
* the budget left (fraction of the budget) and the cost of the current layer
  relative to what is left (clipped to 1),
* with a training-memory budget (``memory``, a :class:`swr.memory.MemoryLimit`): both
  budgets (each as :func:`~swr.envs.mdp.share_feature` of its total: the candidates'
  parameters, full fine-tuning's saved bytes), the share of the memory budget the
  partial selection already commits, and what the current layer would add relative to
  what is left,
* the decisions so far: +1 reparametrize, -1 freeze, 0 not yet decided.

Action: 0 = freeze, 1 = reparametrize. ``action_masks()`` forbids 1 when the layer
no longer fits (either budget); a forbidden action taken anyway (an unmasked agent) is
treated as freeze and flagged in ``info``. The reward is 0 until the last layer, then the
evaluator's score of the selection. The masking, observation and step rules are the
plain functions of :mod:`swr.envs.mdp`, shared with the policy network's rollout.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from swr.memory import MemoryCost, MemoryLimit

from .evaluator import CachedEvaluator, Evaluator, SyntheticEvaluator
from .features import layer_features
from .mdp import (FREEZE, REPARAM, action_mask, apply_action, memory_features, memory_step,
                  observation, share_feature)

#: Observation entries a memory budget adds (see the module docstring).
MEMORY_OBS = 4


class LayerSelectEnv(gym.Env):
    """Choose reparametrize/freeze for each candidate layer under a parameter budget."""

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(self, features: np.ndarray, costs: Sequence[int], budget: int,
                 evaluator: Evaluator, names: Optional[Sequence[str]] = None,
                 render_mode: Optional[str] = None, memory: Optional[MemoryLimit] = None):
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
        if memory is not None and len(memory.cost.member) != n:
            raise ValueError(f"memory cost has {len(memory.cost.member)} layers, not {n}")
        self.memory = memory
        self.n_layers = n
        extra = MEMORY_OBS if memory is not None else 0
        self.observation_space = spaces.Box(-1.0, 1.0, shape=(f + 2 + extra + n,),
                                            dtype=np.float32)
        self.action_space = spaces.Discrete(2)
        self._t = 0
        self._left = self.budget
        self._decisions = np.zeros(n, dtype=np.float32)
        self._covered = memory.cost.start() if memory is not None else None

    # -- gymnasium API --------------------------------------------------------------
    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        self._t = 0
        self._left = self.budget
        self._decisions[:] = 0.0
        info = {"budget": self.budget}
        if self.memory is not None:
            self._covered = self.memory.cost.start()
            info["memory_budget"] = self.memory.budget
        return self._obs(), info

    def step(self, action):
        if self._t >= self.n_layers:
            raise RuntimeError("episode is over; call reset()")
        action = int(action)
        if action not in (FREEZE, REPARAM):
            raise ValueError(f"action {action} is not 0 (freeze) or 1 (reparametrize)")
        info: dict[str, Any] = {}
        after, fits_memory = self._memory_after()
        taken, self._left, masked = apply_action(self.costs, self._t, self._left, action,
                                                 fits_memory)
        if masked:
            info["masked_action"] = True
        if taken and after is not None:
            self._covered = after
        self._decisions[self._t] = 1.0 if taken else -1.0
        self._t += 1
        terminated = self._t == self.n_layers
        reward = 0.0
        if terminated:
            selection = self.selection
            reward = float(self.evaluator(selection))
            info.update(selection=list(selection), cost=self.budget - self._left,
                        score=reward, evaluations=self.evaluator.evaluations)
            if self.memory is not None:
                info["memory"] = self.committed_memory
        return self._obs(), reward, terminated, False, info

    def action_masks(self) -> np.ndarray:
        """[freeze allowed, reparametrize allowed] for the current layer."""
        return action_mask(self.costs, self._t, self._left, self._memory_after()[1])

    def render(self):
        if self.render_mode == "ansi":
            marks = "".join({1.0: "R", -1.0: ".", 0.0: "?"}[d] for d in self._decisions)
            memory = ("" if self.memory is None else
                      f", memory {self.committed_memory}/{self.memory.budget} bytes")
            return f"{marks}  budget left {self._left}/{self.budget}{memory}"
        return None

    @property
    def committed_memory(self) -> Optional[int]:
        """The bytes the selection so far saves for backward (None without a memory budget)."""
        return None if self.memory is None else self.memory.cost.bytes_of(self._covered)

    def _memory_after(self) -> tuple[Optional[np.ndarray], bool]:
        """The segments covered with the current layer added, and whether that fits."""
        if self.memory is None or self._t >= self.n_layers:
            return None, True
        cost = self.memory.cost
        after, _, after_bytes = memory_step(self._covered, cost.member[self._t], cost.weights)
        return after, after_bytes <= self.memory.budget

    def _memory_obs(self) -> Optional[np.ndarray]:
        if self.memory is None:
            return None
        cost = self.memory.cost
        t = min(self._t, self.n_layers - 1)
        _, committed, after = memory_step(self._covered, cost.member[t], cost.weights)
        used, rel = memory_features(committed, after, float(self.memory.budget))
        return np.array([share_feature(self.budget, float(self.costs.sum())),
                         share_feature(self.memory.budget, cost.full_bytes), used, rel])

    # -- helpers --------------------------------------------------------------------
    def steps_left(self) -> int:
        """Decisions left in this episode."""
        return self.n_layers - self._t

    def final_mask(self, action: int) -> np.ndarray:
        """The selection (boolean mask) the episode ends with if ``action`` is taken now,
        at its last layer."""
        mask = self._decisions > 0
        mask[self._t] = apply_action(self.costs, self._t, self._left, action,
                                     self._memory_after()[1])[0]
        return mask

    @property
    def selection(self) -> tuple[str, ...]:
        return tuple(n for n, d in zip(self.names, self._decisions) if d > 0)

    def _obs(self) -> np.ndarray:
        return observation(self.features, self.costs, self.budget, self._t, self._left,
                           self._decisions, self._memory_obs())


def chain_memory(activation_bytes: Sequence[int], weight_bytes: Sequence[int],
                 names: Sequence[str], head_bytes: int = 0) -> MemoryCost:
    """The memory cost of a plain chain of layers: training layer ``i`` keeps the
    activations of layers ``i`` and above (``activation_bytes[j]``: what layer ``j``
    keeps) and its own weight; the head keeps ``head_bytes``. Full fine-tuning keeps
    every activation (a synthetic :class:`~swr.memory.MemoryCost` for made-up networks)."""
    n = len(activation_bytes)
    member = np.zeros((n, 2 * n + 1), dtype=bool)
    for i in range(n):
        member[i, i:n] = True
        member[i, n + i] = True
    head = np.zeros(2 * n + 1, dtype=bool)
    head[-1] = True
    weights = np.array([*activation_bytes, *weight_bytes, head_bytes], dtype=np.float64)
    return MemoryCost(tuple(names), member, head, head.copy(), weights,
                      int(sum(activation_bytes)) + int(head_bytes), batch=1)


def make_synthetic_env(n_layers: int = 12, budget_fraction: float = 0.3, seed: int = 0,
                       render_mode: Optional[str] = None,
                       memory_fraction: Optional[float] = None) -> LayerSelectEnv:
    """An environment over a made-up network with a deterministic evaluator; with
    ``memory_fraction``, a training-memory budget of that share of full fine-tuning's
    saved bytes over a chain whose activations shrink with depth (:func:`chain_memory`)."""
    rng = np.random.default_rng(seed)
    costs = (2 ** rng.integers(6, 14, size=n_layers)).astype(np.int64)
    names = [f"layer{i}" for i in range(n_layers)]
    stats = [{"name": n, "kind": "conv2d", "cost": int(c), "shape": (int(c),),
              "delta_rel_norm": float(rng.random()), "taylor": float(rng.normal())}
             for n, c in zip(names, costs)]
    budget = max(int(budget_fraction * costs.sum()), int(costs.min()))
    memory = None
    if memory_fraction is not None:
        acts = (2 ** np.linspace(16, 10, n_layers)).astype(np.int64)
        cost = chain_memory(acts, 4 * costs, names, head_bytes=64)
        # at least the last layer alone fits, so no episode is forced empty
        floor = int(cost.layer_bytes()[-1])
        memory = MemoryLimit(cost, max(int(memory_fraction * cost.full_bytes), floor))
    return LayerSelectEnv(layer_features(stats), costs, budget,
                          SyntheticEvaluator(costs, seed=seed, names=names), names,
                          render_mode=render_mode, memory=memory)
