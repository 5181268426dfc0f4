"""The policy network: per-layer gate logits, sampled in network order under the budget.

Layer features are embedded and contextualised with a bidirectional GRU (a layer's
value depends on its neighbours); at step ``i`` a small head reads the layer's
context plus how much budget is left and how much of it this layer would take,
and emits the logit of "reparametrize". A layer that no longer fits is masked to
"freeze" and contributes nothing to the log-probability. Masking and the budget
features are those of the environment (:mod:`swr.envs.mdp`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from swr.envs.mdp import budget_features, fits as fits_budget


@dataclass
class Rollout:
    """K sampled selections: masks ``(K, L)``, summed log-probs and entropies ``(K,)``."""

    masks: torch.Tensor
    log_prob: torch.Tensor
    entropy: torch.Tensor


class PolicyNetwork(nn.Module):
    def __init__(self, n_features: int, hidden: int = 64):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU())
        self.context = nn.GRU(hidden, hidden, batch_first=True, bidirectional=True)
        self.head = nn.Sequential(nn.Linear(2 * hidden + 2, hidden), nn.ReLU(),
                                  nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(L, F)`` features -> ``(L, 2*hidden)`` per-layer context."""
        ctx, _ = self.context(self.embed(features).unsqueeze(0))
        return ctx.squeeze(0)

    def rollout(self, features: torch.Tensor, costs: torch.Tensor, budget: int, k: int,
                generator: Optional[torch.Generator] = None, greedy: bool = False) -> Rollout:
        """Sample ``k`` selections (or the single most likely one with ``greedy``)."""
        ctx = self(features)
        n = len(costs)
        left = torch.full((k,), float(budget))
        masks = torch.zeros(k, n, dtype=torch.bool)
        log_prob = torch.zeros(k)
        entropy = torch.zeros(k)
        for i in range(n):
            cost = float(costs[i])
            fits = fits_budget(cost, left)
            frac_left, rel_cost = budget_features(left, budget, cost)
            inp = torch.cat([ctx[i].expand(k, -1), frac_left.unsqueeze(1),
                             rel_cost.unsqueeze(1)], dim=1)
            logit = self.head(inp).squeeze(1)
            p = torch.sigmoid(logit)
            if greedy:
                take = p > 0.5
            else:
                take = torch.rand(k, generator=generator) < p.detach()
            take = take & fits
            lp = torch.where(take, F.logsigmoid(logit), F.logsigmoid(-logit))
            ent = -(p * F.logsigmoid(logit) + (1 - p) * F.logsigmoid(-logit))
            log_prob = log_prob + torch.where(fits, lp, torch.zeros_like(lp))
            entropy = entropy + torch.where(fits, ent, torch.zeros_like(ent))
            left = left - take.float() * cost
            masks[:, i] = take
        return Rollout(masks, log_prob, entropy)
