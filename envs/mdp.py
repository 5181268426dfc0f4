"""The layer-selection decision process as plain functions.

One decision per candidate layer, in network order: reparametrize (1) or freeze (0)
under a parameter budget. :class:`~swr.envs.layer_select.LayerSelectEnv` (the
Gymnasium environment PPO trains on) and the policy network's own batched rollout
(:meth:`swr.policies.network.PolicyNetwork.rollout`) both step through these, so
masking and what a decision sees are defined once. The budget functions take plain
numbers or torch tensors (a batch of rollouts).
"""

from __future__ import annotations

import numpy as np

FREEZE, REPARAM = 0, 1


def fits(cost, left):
    """Whether a layer of ``cost`` parameters still fits in ``left`` (the action mask)."""
    return cost <= left


def budget_features(left, budget, cost):
    """What a decision sees of the budget: the fraction of it left, and the layer's
    cost relative to what is left (at most 1)."""
    if hasattr(left, "clamp"):  # a torch tensor: one value per rollout
        return left / budget, (cost / left.clamp(min=1.0)).clamp(max=1.0)
    return left / budget, min(1.0, cost / max(left, 1))


def action_mask(costs: np.ndarray, t: int, left: int) -> np.ndarray:
    """[freeze allowed, reparametrize allowed] at step ``t`` (nothing after the last)."""
    if t >= len(costs):
        return np.array([True, False])
    return np.array([True, bool(fits(costs[t], left))])


def apply_action(costs: np.ndarray, t: int, left: int, action: int) -> tuple[bool, int, bool]:
    """Decide layer ``t``: returns (reparametrized, budget left, masked). A
    reparametrization that does not fit is taken as freeze and reported as masked."""
    cost = int(costs[t])
    wanted = int(action) == REPARAM
    taken = wanted and bool(fits(cost, left))
    return taken, left - cost if taken else left, wanted and not taken


def observation(features: np.ndarray, costs: np.ndarray, budget: int, t: int, left: int,
                decisions: np.ndarray) -> np.ndarray:
    """The environment's observation: layer ``t``'s features, the budget features and
    the decisions so far (+1 reparametrize, -1 freeze, 0 not yet decided)."""
    t = min(t, len(costs) - 1)
    frac_left, rel_cost = budget_features(left, budget, float(costs[t]))
    return np.concatenate([features[t], [frac_left, rel_cost], decisions]).astype(np.float32)
