"""The layer-selection decision process as plain functions.

One decision per candidate layer, in network order: reparametrize (1) or freeze (0)
under a parameter budget, and optionally a training-memory budget. The memory a
selection commits is not additive: it is the union of segments its layers save
(:class:`swr.memory.MemoryCost`), so a decision tracks the segments ``covered`` so far.
:class:`~swr.envs.layer_select.LayerSelectEnv` (the Gymnasium environment PPO trains
on) and the policy network's own batched rollout
(:meth:`swr.policies.network.PolicyNetwork.rollout`) both step through these, so
masking and what a decision sees are defined once. The budget functions take plain
numbers or torch tensors (a batch of rollouts).
"""

from __future__ import annotations

import math

import numpy as np

FREEZE, REPARAM = 0, 1


def memory_step(covered, member, weights):
    """The segments covered with a layer of segments ``member`` added, and the bytes
    before and after (segment ``weights`` in bytes): numpy ``(P,)``, or torch ``(K, P)``
    with one row per rollout and float64 ``weights``."""
    after = covered | member
    if hasattr(covered, "double"):  # torch
        return after, (covered.double() @ weights).round(), (after.double() @ weights).round()
    return after, float(np.rint(weights @ covered)), float(np.rint(weights @ after))


def memory_features(committed, after, budget: float):
    """What a decision sees of the memory budget: the share of it the selection so far
    commits (at most 1), and what the layer would add relative to what is left (at most 1)."""
    if hasattr(committed, "clamp"):
        return ((committed / budget).clamp(max=1.0),
                ((after - committed) / (budget - committed).clamp(min=1.0)).clamp(0.0, 1.0))
    return (min(1.0, committed / budget),
            min(1.0, max(0.0, (after - committed) / max(budget - committed, 1.0))))


def share_feature(amount: float, total: float) -> float:
    """A budget as a share of its total (parameters of all candidates, or full
    fine-tuning's saved bytes): log10 of the share, divided by 3 and clipped to [-1, 0]
    (0.1% -> -1, 100% -> 0), so budgets an order of magnitude apart differ by a third."""
    return max(-1.0, min(0.0, math.log10(max(amount, 1.0) / max(total, 1.0)) / 3.0))


def fits(cost, left):
    """Whether a layer of ``cost`` parameters still fits in ``left`` (the action mask)."""
    return cost <= left


def budget_features(left, budget, cost):
    """What a decision sees of the budget: the fraction of it left, and the layer's
    cost relative to what is left (at most 1)."""
    if hasattr(left, "clamp"):  # a torch tensor: one value per rollout
        return left / budget, (cost / left.clamp(min=1.0)).clamp(max=1.0)
    return left / budget, min(1.0, cost / max(left, 1))


def action_mask(costs: np.ndarray, t: int, left: int, memory_fits: bool = True) -> np.ndarray:
    """[freeze allowed, reparametrize allowed] at step ``t`` (nothing after the last);
    ``memory_fits``: whether layer ``t`` keeps the memory budget."""
    if t >= len(costs):
        return np.array([True, False])
    return np.array([True, bool(fits(costs[t], left)) and bool(memory_fits)])


def apply_action(costs: np.ndarray, t: int, left: int, action: int,
                 memory_fits: bool = True) -> tuple[bool, int, bool]:
    """Decide layer ``t``: returns (reparametrized, budget left, masked). A
    reparametrization that does not fit (either budget) is taken as freeze and reported
    as masked."""
    cost = int(costs[t])
    wanted = int(action) == REPARAM
    taken = wanted and bool(fits(cost, left)) and bool(memory_fits)
    return taken, left - cost if taken else left, wanted and not taken


def observation(features: np.ndarray, costs: np.ndarray, budget: int, t: int, left: int,
                decisions: np.ndarray, memory: np.ndarray | None = None) -> np.ndarray:
    """The environment's observation: layer ``t``'s features, the budget features, the
    ``memory`` features when there is a memory budget (:meth:`LayerSelectEnv._memory_obs`)
    and the decisions so far (+1 reparametrize, -1 freeze, 0 not yet decided)."""
    t = min(t, len(costs) - 1)
    frac_left, rel_cost = budget_features(left, budget, float(costs[t]))
    extra = [] if memory is None else list(memory)
    return np.concatenate([features[t], [frac_left, rel_cost], extra,
                           decisions]).astype(np.float32)
