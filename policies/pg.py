"""Policy-gradient training of the policy network (REINFORCE with a baseline).

Before any scoring, the policy is pretrained by imitation (supervised, no
scorings) to reproduce the exact knapsack selection over stage-1 Taylor importance
at every budget it will search (:func:`imitate_prior`), with soft targets so that it
samples *around* the knapsack selection instead of repeating it; it decides the layers
most important per parameter first (``order``), so a sample that leaves one of them
out spends the freed budget on the next ones. Its first scored
batch is its greedy selection per budget (the knapsack's), so it starts where the
heuristic ends. Then each iteration samples K selections, each under one of the
budgets in turn, scores them all at once (in parallel on Ray workers when a pool is
given), and takes one gradient step on ``-(reward - baseline) * log_prob -
entropy_coef * entropy`` (+ ``prior_coef`` times the imitation loss, which keeps the
policy near the prior). The baseline is an exponential moving average of the mean
reward, one per budget (a larger budget scores higher); advantages are normalised by
the batch's spread so the step size does not depend on the reward scale.
``prior_steps=0`` starts from a random network instead (the ablation; it still decides
the layers in importance order unless ``order="network"``).

Under a training-memory budget as well (the problem's ``memory``), the policy reads and
respects both budgets (:class:`~swr.policies.network.PolicyNetwork` with ``memory=True``),
its prior is the knapsack under both
(:func:`~swr.policies.selectors.memory_knapsack_selection`), and filling keeps both.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from swr.budget import Filling
from swr.memory import MemoryLimit

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
    # imitation of the knapsack prior before any scoring: at most this many steps
    # (0: start from a random network)
    prior_steps: int = 400
    prior_lr: float = 1e-2
    # target probability of the knapsack's decision: below 1, so the pretrained policy
    # still samples other selections near it (at 0.9, about one decision in ten differs)
    prior_confidence: float = 0.9
    # weight of the imitation loss during RL (0: RL alone moves the policy)
    prior_coef: float = 0.0
    # also imitate this many knapsack selections per budget over importances scaled by
    # log-normal noise of ``prior_noise`` (0: the exact knapsack only), so the policy
    # samples like the perturbed knapsack search before RL reweights it
    prior_samples: int = 0
    prior_noise: float = 0.5
    # the order the policy decides the layers in: "importance" (most stage-1 importance
    # per parameter first, as greedy ranks them; network order without importances) or
    # "network". In network order a sample that leaves out a layer spends the freed
    # budget on whatever comes later in the network, or leaves it unspent; in
    # importance order it goes to the next most important layers, as a perturbed
    # knapsack's does (experiments/SEARCH.md)
    order: str = "importance"
    # add the layers a sample left out, in decision order, while they fit its budget: a
    # sample that skips a large layer late in the order can otherwise leave budget that
    # smaller layers could have used. The scored selection is the filled one; the
    # gradient follows the policy's own decisions
    fill: bool = True


@contextmanager
def one_thread():
    """Run the policy's own (tiny) computations on one torch thread, then restore the
    caller's: on a busy machine its many small ops ran about 30 times slower on two
    threads (each op waits for a descheduled OpenMP thread), while the evaluator that
    scores in this process keeps its threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _as_budgets(budget) -> list[int]:
    return [int(budget)] if isinstance(budget, (int, np.integer)) else [int(b) for b in budget]


def prior_masks(values: np.ndarray, costs: np.ndarray, budgets: Sequence[int],
                memory: Optional[MemoryLimit] = None) -> np.ndarray:
    """The knapsack selection over ``values`` at each budget (and ``memory``),
    ``(len(budgets), L)``."""
    from .selectors import memory_knapsack_selection

    return np.stack([memory_knapsack_selection(values, costs, b, memory) for b in budgets])


def decision_order(values: Optional[np.ndarray], costs: np.ndarray, order: str
                   ) -> Optional[list[int]]:
    """The layers in the order the policy decides them: greedy's
    (:func:`~swr.policies.selectors.importance_order`) for ``order="importance"``; None
    (network order) for ``"network"`` or without values."""
    if order not in ("importance", "network"):
        raise ValueError(f"order must be 'importance' or 'network', not {order!r}")
    if order == "network" or values is None:
        return None
    from .selectors import importance_order

    return [int(i) for i in importance_order(values, costs)]


def fill_masks(masks: torch.Tensor, costs: np.ndarray, budgets: Sequence[int],
               order: Optional[Sequence[int]] = None,
               memory: Optional[MemoryLimit] = None) -> torch.Tensor:
    """Each selection (a row of ``masks``) with the layers it left out added, in
    ``order`` (default: network order), while they fit its budget (and ``memory``)."""
    out = masks.clone()
    costs = np.asarray(costs, dtype=np.float64)
    seq = range(len(costs)) if order is None else order
    for r, budget in enumerate(budgets):
        row = out[r].numpy()
        fill = Filling(costs, float(budget) - float(costs[row].sum()), memory,
                       memory.cost.covered(row) if memory is not None else None)
        for i in seq:
            if not row[i] and fill.fits(i):
                row[i] = True
                fill.add(i)
    return out


def imitation_loss(policy: PolicyNetwork, feats: torch.Tensor, costs: torch.Tensor,
                   budgets: Sequence[int], targets: torch.Tensor, confidence: float,
                   order: Optional[Sequence[int]] = None,
                   memory: Optional[MemoryLimit] = None) -> tuple[torch.Tensor, int]:
    """Cross-entropy of the policy's decisions along the ``targets`` selections (soft
    labels ``confidence`` / ``1 - confidence``), over the decisions where the layer
    fits; and how many of those decisions the greedy policy gets wrong."""
    logits, fits = policy.forced_logits(feats, costs, budgets, targets, order, memory)
    t = targets.float()
    soft = t * confidence + (1 - t) * (1 - confidence)
    loss = F.binary_cross_entropy_with_logits(logits[fits], soft[fits])
    wrong = int(((logits[fits] > 0) != targets[fits]).sum())
    return loss, wrong


def imitate_prior(policy: PolicyNetwork, feats: torch.Tensor, costs: torch.Tensor,
                  budgets: Sequence[int], targets: torch.Tensor, cfg: PGConfig,
                  extra: Optional[tuple[list[int], torch.Tensor]] = None,
                  order: Optional[Sequence[int]] = None,
                  memory: Optional[MemoryLimit] = None) -> dict:
    """Train ``policy`` to reproduce ``targets`` (one selection per budget) by
    supervised learning, and the ``extra`` (budgets, selections) as well if given;
    stops once its greedy rollout reproduces every target and the loss on them is
    within 0.02 of its floor, or after ``cfg.prior_steps`` steps."""
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.prior_lr)
    c = cfg.prior_confidence
    floor = -(c * np.log(c) + (1 - c) * np.log(1 - c)) if 0 < c < 1 else 0.0
    steps, loss, wrong = 0, float("nan"), -1
    for steps in range(1, cfg.prior_steps + 1):
        out, wrong = imitation_loss(policy, feats, costs, budgets, targets, c, order, memory)
        loss = float(out.detach())
        if wrong == 0 and loss < floor + 0.02:
            break
        if extra is not None:
            out = out + imitation_loss(policy, feats, costs, extra[0], extra[1], c, order,
                                       memory)[0]
        opt.zero_grad()
        out.backward()
        opt.step()
    return {"prior_steps": steps, "prior_loss": loss, "prior_wrong_decisions": wrong}


class PGTrainer:
    """The policy, its optimiser and baselines; one :meth:`iterate` is one gradient step.

    ``budget`` is one budget or a list: rollouts take the budgets in turn, and the
    policy is pretrained on the knapsack over ``values`` (Taylor importance) at each
    of them when ``values`` is given and ``cfg.prior_steps`` > 0. ``memory``: a
    training-memory budget every rollout keeps as well.
    """

    def __init__(self, features: np.ndarray, costs: np.ndarray, budget, cfg: PGConfig,
                 on_iteration: Optional[Callable[[dict], None]] = None,
                 values: Optional[np.ndarray] = None, memory: Optional[MemoryLimit] = None):
        torch.manual_seed(cfg.seed)
        self.cfg, self.on_iteration = cfg, on_iteration
        self.memory = memory
        self.budgets = _as_budgets(budget)
        self.budget = self.budgets[0] if len(self.budgets) == 1 else self.budgets
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.feats = torch.as_tensor(features, dtype=torch.float32)
        self.cost_t = torch.as_tensor(costs, dtype=torch.float64)
        self.policy = PolicyNetwork(self.feats.shape[1], cfg.hidden, memory=memory is not None)
        self.order = decision_order(values, np.asarray(costs), cfg.order)
        self.prior: Optional[torch.Tensor] = None
        self.prior_info: dict = {"prior_steps": 0}
        if values is not None and cfg.prior_steps > 0:
            values = np.asarray(values, dtype=np.float64)
            self.prior = torch.as_tensor(prior_masks(values, np.asarray(costs), self.budgets,
                                                     memory))
            extra = None
            if cfg.prior_samples > 0:
                rng = np.random.default_rng(cfg.seed)
                xb = [b for b in self.budgets for _ in range(cfg.prior_samples)]
                xm = np.stack([prior_masks(values * rng.lognormal(0.0, cfg.prior_noise,
                                                                  len(values)),
                                           np.asarray(costs), [b], memory)[0] for b in xb])
                extra = (xb, torch.as_tensor(xm))
            with one_thread():
                self.prior_info = imitate_prior(self.policy, self.feats, self.cost_t,
                                                self.budgets, self.prior, cfg, extra,
                                                self.order, memory)
        self.opt = torch.optim.Adam(self.policy.parameters(), lr=cfg.lr)
        self.baselines: dict[int, float] = {}
        self.iterations = 0
        self._turn = 0  # which budget the next rollout takes
        # chance of a coin flip per decision: raised while batches bring no selection
        # not sampled before (a sharp policy, or one started sharp from the prior, can
        # otherwise spend every remaining iteration on repeats and never reach its
        # evaluations), halved back towards 0 once they do
        self.explore = 0.0
        self._sampled: set[bytes] = set()

    @property
    def baseline(self) -> Optional[float]:
        """The reward baseline (the mean over budgets)."""
        return float(np.mean(list(self.baselines.values()))) if self.baselines else None

    def greedy_masks(self) -> list[np.ndarray]:
        """The policy's most likely selection at each budget."""
        with torch.no_grad(), one_thread():
            roll = self.policy.rollout(self.feats, self.cost_t, self.budgets, len(self.budgets),
                                       greedy=True, order=self.order, memory=self.memory)
        return [m.numpy() for m in self._filled(roll.masks, self.budgets)]

    def _filled(self, masks: torch.Tensor, budgets: Sequence[int]) -> torch.Tensor:
        return fill_masks(masks, self.cost_t.numpy(), budgets, self.order, self.memory) \
            if self.cfg.fill else masks

    def _next_budgets(self, k: int) -> list[int]:
        out = [self.budgets[(self._turn + j) % len(self.budgets)] for j in range(k)]
        self._turn = (self._turn + k) % len(self.budgets)
        return out

    def iterate(self, score: Callable[[list[np.ndarray]], list[float]], k: int) -> None:
        """Sample ``k`` selections, score them, take one step on those that got a score
        (a selection over the search's limit comes back NaN and is left out)."""
        cfg = self.cfg
        self.iterations += 1
        budgets = self._next_budgets(k)
        with one_thread():
            roll = self.policy.rollout(self.feats, self.cost_t, budgets, k, generator=self.gen,
                                       explore=self.explore, order=self.order,
                                       memory=self.memory)
        masks = self._filled(roll.masks, budgets)
        keys = {np.packbits(m.numpy()).tobytes() for m in masks}
        fresh = len(keys - self._sampled)
        self._sampled |= keys
        if fresh == 0:
            self.explore = min(0.5, max(0.05, 2 * self.explore))
        else:
            self.explore = self.explore / 2 if self.explore > 0.01 else 0.0
        rewards = torch.tensor(score([m.numpy() for m in masks]), dtype=torch.float32)
        scored = ~torch.isnan(rewards)
        if int(scored.sum()) < 2:  # no spread to learn from
            return
        if float(rewards[scored].std()) == 0.0:
            # all tied: no step, since normalising would blow the baseline's lag up into
            # a push towards whatever was sampled (the policy collapsed that way on
            # accuracy rewards, where many selections score the same); logged with loss 0
            self._report(rewards[scored], roll.entropy[scored], 0.0)
            return
        keep = [b for b, s in zip(budgets, scored.tolist()) if s]
        if not bool(scored.all()):
            rewards, roll = rewards[scored], Rollout(roll.masks[scored], roll.log_prob[scored],
                                                    roll.entropy[scored])
        base = torch.zeros_like(rewards)
        for b in dict.fromkeys(keep):
            sel = torch.tensor([x == b for x in keep])
            mean = float(rewards[sel].mean())
            old = self.baselines.get(b)
            self.baselines[b] = mean if old is None else \
                cfg.baseline_decay * old + (1 - cfg.baseline_decay) * mean
            base[sel] = self.baselines[b]
        centred = rewards - base
        adv = centred / (centred.std(unbiased=False) + 1e-3)
        with one_thread():
            loss = -(adv * roll.log_prob).mean() - cfg.entropy_coef * roll.entropy.mean()
            if self.prior is not None and cfg.prior_coef > 0:
                loss = loss + cfg.prior_coef * imitation_loss(
                    self.policy, self.feats, self.cost_t, self.budgets, self.prior,
                    cfg.prior_confidence, self.order, self.memory)[0]
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
        self._report(rewards, roll.entropy, float(loss.detach()))

    def _report(self, rewards: torch.Tensor, entropy: torch.Tensor, loss: float) -> None:
        """Hand this iteration's record (scored rewards, their entropies) to ``on_iteration``."""
        if self.on_iteration is not None:
            self.on_iteration({"iteration": self.iterations, "mean_reward": float(rewards.mean()),
                               "max_reward": float(rewards.max()), "baseline": self.baseline,
                               "entropy": float(entropy.mean().detach()), "loss": loss})


def _train_while(trainer: PGTrainer, score, evaluations_left: Callable[[], int]) -> None:
    cfg = trainer.cfg
    while trainer.iterations < cfg.max_iterations:
        left = evaluations_left()
        if left <= 0:
            break
        # the last batch shrinks so the search makes exactly its allowed scorings
        trainer.iterate(score, max(2, min(cfg.samples_per_iteration, left)))


class PGSearcher(PoolSearcher):
    """Searcher ``pg``: the policy network, started from the knapsack prior and trained
    by policy gradient on the scores; one budget-conditioned policy for every budget
    of the problem."""

    name = "pg"
    budget_conditioned = True

    def __init__(self, settings, config: Optional[PGConfig] = None):
        super().__init__(settings)
        # the policy's own settings (samples per iteration and seed come from ``settings``)
        self.config = config or PGConfig()

    def propose(self, problem, run) -> Path:
        from swr.envs.features import layer_features
        from swr.io import save_safetensors
        from swr.runlog import RunLog
        from swr.runlog import reset as reset_runlog

        features = layer_features(problem.stats)
        costs = np.asarray(problem.costs)
        budgets = problem.budget_list
        cfg = replace(self.config, samples_per_iteration=self.settings.samples_per_iteration,
                      seed=self.settings.seed)
        # every iteration's reward, entropy and loss (a resumed search replays its
        # iterations, so the log starts afresh either way)
        reset_runlog(problem.out, ("search_iterations",))
        iterations = RunLog(problem.out, "search_iterations", tag="search")

        def on_iteration(rec: dict) -> None:
            values = {k: v for k, v in rec.items() if k != "iteration"}
            iterations.record(rec["iteration"], {**values, "best": run.log.best[0],
                                                 "evaluations": len(run.log.seen)})

        trainer = PGTrainer(features, costs, budgets, cfg, on_iteration,
                            values=problem.importance, memory=problem.memory)
        # first: the pretrained policy's greedy selection at each budget (the knapsack's),
        # and the knapsack's own where imitation missed it, so pg starts where it ends
        first = trainer.greedy_masks()
        if trainer.prior is not None:
            first += [p for g, p in zip(list(first), trainer.prior.numpy())
                      if not np.array_equal(g, p)]
        run.score(first)
        # one evaluation per budget is kept for the trained policy's greedy selections ...
        _train_while(trainer, run.score, lambda: run.evaluations_left() - len(budgets))
        policy = trainer.policy
        run.score(trainer.greedy_masks())
        # ... and when those were scored before, training goes on to the last evaluation
        _train_while(trainer, run.score, run.evaluations_left)
        iterations.close()
        path = problem.out / "policy.safetensors"
        meta = {"n_features": str(features.shape[1]), "hidden": str(cfg.hidden),
                "budgets": ",".join(map(str, budgets)),
                # the layer indices in the order the policy decides them ("": network order)
                "order": ",".join(map(str, trainer.order or [])),
                # "1": its selections are its rollouts filled in that order (fill_masks)
                "fill": str(int(cfg.fill)),
                # the training-memory budget in bytes it decided under ("": none)
                "memory_budget": "" if problem.memory is None else str(problem.memory.budget),
                **{k: str(v) for k, v in trainer.prior_info.items()}}
        save_safetensors({k: v.contiguous() for k, v in policy.state_dict().items()}, path, meta)
        return path


register_searcher("pg", PGSearcher, "policy network started from the knapsack prior and "
                  "trained by policy gradient (REINFORCE); one policy for a list of budgets")
