"""The policy network: per-layer gate logits, sampled one layer at a time under the budget.

Layer features are embedded and contextualised with a bidirectional GRU over the
network's order (a layer's value depends on its neighbours); then the layers are
decided one at a time, in network order or in any ``order`` given (the searcher
decides the most important layers per parameter first, so that leaving one out frees
budget for the next ones instead of for whatever comes later in the network). At each
step a small head reads the layer's context plus how much budget is left and how much
of it this layer would take, and emits the logit of "reparametrize". A layer that no
longer fits is masked to "freeze" and contributes nothing to the log-probability.
Masking and the budget features are those of the environment (:mod:`swr.envs.mdp`).

The policy is budget-conditioned: the budget itself, as a log-scaled share of the
candidates' total cost (:func:`budget_feature`), is an input of the embedding (so the
context of every layer depends on it) and of the head, and every rollout in a batch
may have its own budget. One trained policy thus gives a selection per budget.

A policy made with ``memory=True`` decides under a training-memory budget too (a
:class:`~swr.memory.MemoryLimit` handed to :meth:`PolicyNetwork.rollout`): a layer that
would break it is masked like one over the parameter budget, and the head also reads
the share of the memory budget the selection so far commits, what the layer would add
relative to what is left, and the memory budget as a share of full fine-tuning's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from swr.envs.mdp import (budget_features, fits as fits_budget, memory_features, memory_step,
                         share_feature)
from swr.memory import MemoryLimit


@dataclass
class Rollout:
    """K sampled selections: masks ``(K, L)``, summed log-probs and entropies ``(K,)``."""

    masks: torch.Tensor
    log_prob: torch.Tensor
    entropy: torch.Tensor


def budget_feature(budget, total_cost: float):
    """The budget as the policy sees it: log10 of its share of the candidates' total
    cost, divided by 3 (0.1% -> -1, 100% -> 0), so budgets an order of magnitude apart
    differ by a third. Takes a number or a tensor of budgets."""
    if isinstance(budget, torch.Tensor):
        return torch.log10(budget.clamp(min=1.0) / total_cost) / 3.0
    return math.log10(max(float(budget), 1.0) / total_cost) / 3.0


def _budget_tensor(budget, k: int) -> torch.Tensor:
    """``k`` budgets: one number for all rollouts, or one per rollout."""
    if isinstance(budget, (int, float)):
        return torch.full((k,), float(budget), dtype=torch.float64)
    b = torch.as_tensor(list(budget) if not isinstance(budget, torch.Tensor) else budget,
                        dtype=torch.float64)
    if b.shape != (k,):
        raise ValueError(f"{len(b)} budgets given for {k} rollouts")
    return b


class _MemoryState:
    """A batch of rollouts' memory: segments covered ``(K, P)`` and the budget's tensors."""

    def __init__(self, memory: MemoryLimit, k: int):
        cost = memory.cost
        self.member = torch.as_tensor(cost.member)
        self.weights = torch.as_tensor(cost.weights, dtype=torch.float64)
        self.budget = float(memory.budget)
        self.covered = torch.as_tensor(cost.start()).expand(k, -1).clone()
        self.share = share_feature(memory.budget, cost.full_bytes)

    def features(self, i: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Layer ``i`` added to each rollout: segments after, whether it fits, and the
        head's memory inputs ``(K, 1)`` each."""
        after, committed, after_bytes = memory_step(self.covered, self.member[i], self.weights)
        used, rel = memory_features(committed, after_bytes, self.budget)
        share = torch.full_like(used, self.share)
        return after, after_bytes <= self.budget, [x.float().unsqueeze(1)
                                                   for x in (used, rel, share)]


class PolicyNetwork(nn.Module):
    def __init__(self, n_features: int, hidden: int = 64, memory: bool = False):
        super().__init__()
        self.memory = memory
        # +1: the budget feature, appended to every layer's features
        self.embed = nn.Sequential(nn.Linear(n_features + 1, hidden), nn.ReLU())
        self.context = nn.GRU(hidden, hidden, batch_first=True, bidirectional=True)
        # context + fraction of budget left + relative cost + the budget feature
        # (+ memory committed, relative memory cost, the memory budget feature)
        self.head = nn.Sequential(nn.Linear(2 * hidden + 3 + (3 if memory else 0), hidden),
                                  nn.ReLU(), nn.Linear(hidden, 1))

    def _check_memory(self, memory: Optional[MemoryLimit]) -> None:
        if (memory is not None) != self.memory:
            raise ValueError("a policy made with memory=True needs a memory budget, and only it "
                             "takes one")

    def forward(self, features: torch.Tensor, budget_feat: torch.Tensor) -> torch.Tensor:
        """``(L, F)`` features and ``(B,)`` budget features -> ``(B, L, 2*hidden)`` context."""
        b = budget_feat.to(features.dtype)
        x = torch.cat([features.unsqueeze(0).expand(len(b), -1, -1),
                       b.view(-1, 1, 1).expand(-1, features.shape[0], 1)], dim=2)
        ctx, _ = self.context(self.embed(x))
        return ctx

    def _contexts(self, features: torch.Tensor, budgets: torch.Tensor, total: float):
        """Per-rollout context ``(K, L, 2h)``, the GRU run once per distinct budget."""
        distinct, index = torch.unique(budgets, return_inverse=True)
        return self(features, budget_feature(distinct, total))[index]

    def rollout(self, features: torch.Tensor, costs: torch.Tensor, budget, k: int,
                generator: Optional[torch.Generator] = None, greedy: bool = False,
                explore: float = 0.0, order: Optional[Sequence[int]] = None,
                memory: Optional[MemoryLimit] = None) -> Rollout:
        """Sample ``k`` selections (or the most likely ones with ``greedy``) under
        ``budget``: one number for all, or a sequence of ``k`` budgets, and ``memory``
        (for a policy made with ``memory=True``), deciding the layers in ``order``
        (default: network order). With ``explore`` > 0 each decision is a coin flip with
        that probability (the policy sampled is the mixture, whatever the size of the
        logits)."""
        self._check_memory(memory)
        mem = _MemoryState(memory, k) if memory is not None else None
        budgets = _budget_tensor(budget, k)
        total = float(costs.sum())
        ctx = self._contexts(features, budgets, total)
        bfeat = budget_feature(budgets, total).float().unsqueeze(1)
        n = len(costs)
        left = budgets.clone()
        masks = torch.zeros(k, n, dtype=torch.bool)
        log_prob = torch.zeros(k)
        entropy = torch.zeros(k)
        for i in (range(n) if order is None else [int(j) for j in order]):
            cost = float(costs[i])
            fits = fits_budget(cost, left)
            frac_left, rel_cost = budget_features(left, budgets, cost)
            extra = []
            if mem is not None:
                after, fits_memory, extra = mem.features(i)
                fits = fits & fits_memory
            inp = torch.cat([ctx[:, i], frac_left.float().unsqueeze(1),
                             rel_cost.float().unsqueeze(1), bfeat, *extra], dim=1)
            logit = self.head(inp).squeeze(1)
            if explore > 0:
                p = (1 - explore) * torch.sigmoid(logit) + explore / 2
                log_take, log_skip = torch.log(p), torch.log1p(-p)
            else:
                p = torch.sigmoid(logit)
                log_take, log_skip = F.logsigmoid(logit), F.logsigmoid(-logit)
            if greedy:
                take = p > 0.5
            else:
                take = torch.rand(k, generator=generator) < p.detach()
            take = take & fits
            lp = torch.where(take, log_take, log_skip)
            ent = -(p * log_take + (1 - p) * log_skip)
            log_prob = log_prob + torch.where(fits, lp, torch.zeros_like(lp))
            entropy = entropy + torch.where(fits, ent, torch.zeros_like(ent))
            left = left - take.double() * cost
            if mem is not None:
                mem.covered = torch.where(take.unsqueeze(1), after, mem.covered)
            masks[:, i] = take
        return Rollout(masks, log_prob, entropy)

    def forced_logits(self, features: torch.Tensor, costs: torch.Tensor,
                      budgets: Sequence[float] | torch.Tensor, masks: torch.Tensor,
                      order: Optional[Sequence[int]] = None,
                      memory: Optional[MemoryLimit] = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(B, L)`` of every decision along the given selections ``(B, L)``
        (teacher forcing: all steps at once, decided in ``order`` as :meth:`rollout`
        does), and where the layer fits ``(B, L)`` (both budgets); both in network order."""
        self._check_memory(memory)
        b = _budget_tensor(budgets, len(masks))
        total = float(costs.sum())
        ctx = self._contexts(features, b, total)
        idx = (torch.as_tensor(list(order), dtype=torch.long) if order is not None
               else torch.arange(len(costs)))
        extra, fits_memory = self._forced_memory(memory, masks[:, idx], idx)
        logits, fits = self._forced(ctx[:, idx], costs[idx], b, masks[:, idx], total, extra)
        if fits_memory is not None:
            fits = fits & fits_memory
        back = torch.empty_like(idx)  # hand back in network order
        back[idx] = torch.arange(len(idx))
        return logits[:, back], fits[:, back]

    def _forced_memory(self, memory: Optional[MemoryLimit], masks: torch.Tensor,
                       idx: torch.Tensor) -> tuple[list[torch.Tensor], Optional[torch.Tensor]]:
        """The head's memory inputs ``(B, L, 1)`` each and where memory fits ``(B, L)``,
        along ``masks`` in decision order (layers ``idx``)."""
        if memory is None:
            return [], None
        cost = memory.cost
        member = torch.as_tensor(cost.member)[idx]  # (L, P), decision order
        weights = torch.as_tensor(cost.weights, dtype=torch.float64)
        taken = masks.unsqueeze(2) & member.unsqueeze(0)  # (B, L, P)
        # the segments covered before each decision: the start and every earlier take
        before = (torch.cumsum(taken.long(), dim=1) - taken.long()) > 0
        covered = before | torch.as_tensor(cost.start())
        after = covered | member.unsqueeze(0)
        committed = (covered.double() @ weights).round()
        after_bytes = (after.double() @ weights).round()
        used, rel = memory_features(committed, after_bytes, float(memory.budget))
        share = torch.full_like(used, share_feature(memory.budget, cost.full_bytes))
        return ([x.float().unsqueeze(2) for x in (used, rel, share)],
                after_bytes <= float(memory.budget))

    def _forced(self, ctx: torch.Tensor, costs: torch.Tensor, b: torch.Tensor,
                masks: torch.Tensor, total: float, extra: Sequence[torch.Tensor] = ()
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forced_logits` with the layers (context, costs, masks, the memory
        inputs ``extra``) already in decision order."""
        spent = torch.cumsum(masks.double() * costs, dim=1) - masks.double() * costs
        left = b.unsqueeze(1) - spent
        fits = fits_budget(costs.unsqueeze(0), left)
        frac_left, rel_cost = budget_features(left, b.unsqueeze(1), costs.unsqueeze(0))
        bfeat = budget_feature(b, total).float().view(-1, 1, 1).expand(-1, masks.shape[1], 1)
        inp = torch.cat([ctx, frac_left.float().unsqueeze(2), rel_cost.float().unsqueeze(2),
                         bfeat, *extra], dim=2)
        return self.head(inp).squeeze(2), fits
