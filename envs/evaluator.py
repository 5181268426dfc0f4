"""Evaluators: the terminal reward of a selection.

An evaluator maps a selection (a tuple of layer names) to a validation score.
:class:`SupernetEvaluator` scores on the trained supernet (its shared deltas);
:class:`TrainedEvaluator` scores after a short training of the selection's own deltas;
:class:`SyntheticEvaluator` is a deterministic stand-in with a known optimum, for tests
and environment checks. :class:`CachedEvaluator` memoises any evaluator by selection.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Iterable, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from swr.reparam import reparam_layers, set_selection, set_trainable
from swr.fold import merge, unmerge
from swr.train import (TrainConfig, batches, batchnorm_snapshot, freeze_batchnorm,
                       recalibrate_batchnorm, resolve_device, restore_batchnorm, train)

from .prefix_cache import PrefixCache

Selection = tuple[str, ...]

log = logging.getLogger("swr.evaluator")


class Evaluator(Protocol):
    names: Sequence[str]

    def __call__(self, selection: Iterable[str]) -> float: ...


def canonical(selection: Iterable[str], names: Sequence[str]) -> Selection:
    """A selection in network order without duplicates: the cache key."""
    chosen = set(selection)
    return tuple(n for n in names if n in chosen)


#: What an evaluator can score a selection by (``metric``).
METRICS = ("accuracy", "loglik")

#: The evaluators a search can score with (``swr search --evaluator``), and the metric
#: each ranks final accuracy best by when none is given (experiments/SEARCH.md).
EVALUATORS = {"supernet": "loglik", "trained": "accuracy"}


def evaluator_metric(evaluator: str, reward: str | None = None) -> str:
    """What ``evaluator`` scores a selection by: ``reward``, else its own default."""
    return reward or EVALUATORS[evaluator]


#: Epochs of :class:`TrainedEvaluator`'s short training by default: a proxy of the final
#: training, kept short because every evaluation pays for it.
PROXY_EPOCHS = 2

#: Where :class:`SupernetEvaluator` takes BatchNorm statistics from (``bn_stats``).
BN_STATS = ("train", "val", "supernet")

#: How many clips of each validation batch the ``"val"`` statistics come from by default
#: (``bn_clips``; None: all of them): enough to rank selections as the whole batch's
#: statistics do, at a fraction of the statistics pass (experiments/SEARCH.md,
#: docs/PERFORMANCE.md).
BN_CLIPS = 32


def even_batch_size(n: int, batch_size: int) -> int:
    """The largest batch size of at most ``batch_size`` that splits ``n`` examples into
    batches of near-equal size (no small last batch, whose statistics would be noisy)."""
    k = max(1, math.ceil(n / max(batch_size, 1)))
    return max(1, math.ceil(n / k))


def val_scores(logits: Iterable[torch.Tensor], labels: Iterable[torch.Tensor]) -> dict[str, float]:
    """Accuracy and mean true-class log-probability over batches of logits and labels."""
    correct = total = 0
    loglik = 0.0
    for z, y in zip(logits, labels):
        correct += int((z.argmax(-1) == y).sum())
        total += len(y)
        # summed in float64 so the mean does not depend on how the split is batched
        logp = torch.log_softmax(z.double(), dim=-1)
        loglik += float(logp.gather(1, y.view(-1, 1)).sum())
    return {"accuracy": correct / max(total, 1), "loglik": loglik / max(total, 1)}


class SupernetEvaluator:
    """Validation score of a selection on the trained supernet.

    ``metric`` says which: ``"accuracy"`` (the share of validation examples classified
    right) or ``"loglik"`` (the mean log-probability of the true class, higher is
    better: continuous, so two selections that classify the same clips still differ).
    :meth:`scores` gives both from the same logits.

    Per selection: open its gates and fold ``W + dW`` into the weights once
    (``merge``), score the validation split held in memory, undo.

    A selection changes the features every later BatchNorm sees, so the supernet's
    statistics (accumulated under random gates) do not fit it. ``bn_stats`` says where
    the statistics come from:

    * ``"val"`` (default): each validation batch is normalised by its own statistics
      (running statistics untouched). One pass, no training clips. The split is
      shuffled once (seeded by ``seed``, so every batch is a sample of the whole split,
      even when the split is stored sorted by class) and cut into near-equal batches of
      at most ``batch_size``. With ``bn_clips`` the statistics come from the batch's
      first ``bn_clips`` clips (a random sample, by the shuffle) and normalise all of
      it: the statistics pass, the one cost a scoring has over a plain forward, shrinks
      in proportion (default :data:`BN_CLIPS`); ``None`` takes them from the whole
      batch (BatchNorm in training mode). It ranks selections by final accuracy as well
      as ``"train"`` at a fraction of the cost (experiments/SEARCH.md, "Does the evaluator
      predict...").
    * ``"train"``: recalibrate on ``bn_batches x bn_batch_size`` training clips
      (cumulative average), then score in eval mode; about 3x the cost of the
      validation pass itself.
    * ``"supernet"``: keep the supernet's statistics (no recalibration).

    With ``prefix_cache_mb > 0`` the work of the *frozen prefix* (every module that
    runs before the first open gate) is not redone: its outputs on the
    recalibration batches and on the validation split, and its recalibrated
    BatchNorm statistics, are the same for every selection whose gates open later,
    so they are recorded once and replayed (see :class:`~swr.envs.prefix_cache.PrefixCache`). Logits and
    scores are bit-identical to the plain path (``prefix_cache_mb=0``); the cache
    holds at most ``prefix_cache_mb`` MiB of activations, and records a boundary only
    where replaying it skips at least ``prefix_min_skip`` of the forward pass
    (measured as the share of module output elements computed before it): early
    boundaries hold the largest activations and save the least. Like the BatchNorm
    snapshot both paths restore, the cache assumes the supernet does not change while
    this evaluator scores on it.
    """

    def __init__(self, supernet: nn.Module, task, device: str | torch.device = "cpu",
                 bn_batches: int = 4, bn_batch_size: int = 128, batch_size: int = 512,
                 seed: int = 0, prefix_cache_mb: float = 256.0, prefix_min_skip: float = 0.25,
                 metric: str = "accuracy", bn_stats: str = "val",
                 bn_clips: int | None = BN_CLIPS):
        if metric not in METRICS:
            raise ValueError(f"evaluator metric {metric!r} is not one of {', '.join(METRICS)}")
        if bn_stats not in BN_STATS:
            raise ValueError(f"evaluator bn_stats {bn_stats!r} is not one of {', '.join(BN_STATS)}")
        if bn_clips is not None and bn_clips < 2:
            raise ValueError(f"evaluator bn_clips must be at least 2 (or None), got {bn_clips}")
        self.metric = metric
        self.bn_stats = bn_stats
        self.bn_clips = bn_clips
        self.model = supernet
        self.task = task
        self.device = resolve_device(device)
        self.names = list(reparam_layers(supernet))
        self.bn_batches = bn_batches
        self.bn_batch_size = bn_batch_size
        self.batch_size = batch_size
        self.seed = seed
        self._bns = [m for m in supernet.modules()
                     if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.has_bn = bool(self._bns)
        self.model.to(self.device).eval()
        # BN recalibration starts from the supernet's statistics each time.
        self._bn_state = batchnorm_snapshot(supernet.modules())
        val = list(batches(task.val, batch_size))
        if bn_stats == "val" and val:
            # statistics come from each batch: a shuffled split makes every batch (and the
            # first bn_clips of it) a random sample, and equal sizes leave no noisy remainder
            x, y = torch.cat([b[0] for b in val]), torch.cat([b[1] for b in val])
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
            x, y = x[order], y[order]
            bs = even_batch_size(len(x), batch_size)
            val = [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(x), bs)]
        self._val = [(x.to(self.device), y.to(self.device)) for x, y in val]
        self._prefix = None
        if prefix_cache_mb > 0:
            self._prefix = PrefixCache.build(self, int(prefix_cache_mb * 2**20),
                                              prefix_min_skip)

    @torch.inference_mode(False)
    def __call__(self, selection: Iterable[str]) -> float:
        return self.scores(selection)[self.metric]

    @torch.inference_mode(False)
    def scores(self, selection: Iterable[str]) -> dict[str, float]:
        """Every metric of ``selection`` from one scoring: ``{"accuracy": ..., "loglik": ...}``."""
        return val_scores(self.val_logits(selection), [y for _, y in self._val])

    @torch.inference_mode(False)
    def val_logits(self, selection: Iterable[str]) -> list[torch.Tensor]:
        """The supernet's validation logits under ``selection``, one tensor per batch."""
        sel = canonical(selection, self.names)
        if self._prefix is not None:
            try:
                return self._prefix.logits(sel)
            except Exception as e:  # the model and its statistics are restored by now
                log.warning("prefix cache disabled after %s: %s; scoring on the plain path",
                            type(e).__name__, e)
                self._prefix = None
        set_selection(self.model, sel)
        merge(self.model)
        try:
            if self.recalibrates:
                recalibrate_batchnorm(self.model, self.task.train, self.bn_batches,
                                      self.bn_batch_size, self.device, seed=self.seed)
            with torch.inference_mode(), self.val_batch_statistics():
                return [self.model(x) for x, _ in self._val]
        finally:
            unmerge(self.model)
            if self.has_bn:
                restore_batchnorm(self._bn_state)
            set_selection(self.model, [])

    @property
    def recalibrates(self) -> bool:
        """Whether a scoring recalibrates BatchNorm on training clips first."""
        return self.has_bn and self.bn_stats == "train" and self.bn_batches > 0

    @contextlib.contextmanager
    def val_batch_statistics(self):
        """With ``bn_stats="val"``: BatchNorms normalise by the batch's own statistics
        (of its first ``bn_clips`` clips) for the duration; the running statistics they
        overwrite are restored by the caller (``restore_batchnorm``)."""
        if self.bn_stats != "val" or not self.has_bn:
            yield
            return
        if self.bn_clips is None:
            for m in self._bns:
                m.train()
            try:
                yield
            finally:
                for m in self._bns:
                    m.eval()
            return
        k = self.bn_clips

        def sample_statistics(m, args):
            # eval-mode BatchNorm then normalises the whole batch by the sample's biased
            # statistics, as training mode would by the whole batch's
            x = args[0]
            _, mean, invstd = torch.native_batch_norm(x[:k], None, None, None, None,
                                                      True, 0.0, m.eps)
            m.running_mean.copy_(mean)
            m.running_var.copy_(invstd.pow(-2).sub_(m.eps))

        hooks = [m.register_forward_pre_hook(sample_statistics) for m in self._bns
                 if m.track_running_stats]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()

    def prefix_cache_info(self) -> dict:
        """What the prefix cache holds: boundaries, bytes, and scorings that replayed one."""
        p = self._prefix
        if p is None:
            return {"enabled": False, "boundaries": [], "bytes": 0, "hits": 0}
        return {"enabled": True, "boundaries": list(p.cache), "bytes": p.bytes, "hits": p.hits}


class TrainedEvaluator:
    """Validation score of a selection after a short training of its own deltas.

    Per selection: start from the supernet (its trained deltas, head and norms, where a
    final training with ``init="supernet"`` starts), train the selection's deltas and the head (and the task norms
    when ``norms``; else BatchNorm keeps the supernet's statistics) for ``epochs`` with the
    final training's loop (:func:`swr.train.train`: AdamW, cosine schedule, ``lr``,
    ``batch_size``), keep the best state on validation, and score validation. The
    supernet's state is restored after every scoring, and the global random state too.

    A scoring costs a short final training, several times a :class:`SupernetEvaluator`
    scoring. It is meant for where the supernet's shared deltas do not predict what a
    selection's own deltas learn (tiny delta budgets); where and how well it ranks is
    measured in experiments/SEARCH.md ("A trained proxy").

    Every selection trains on the same data order, drawn from ``seed`` + 1: not the
    order of a final training with the search's own seed, whose luck the score would
    otherwise share.
    """

    def __init__(self, supernet: nn.Module, task, device: str | torch.device = "cpu",
                 epochs: int = PROXY_EPOCHS, lr: float = 3e-3, batch_size: int = 64, seed: int = 0,
                 metric: str = "accuracy", norms: bool = True, batch_size_eval: int = 512):
        if metric not in METRICS:
            raise ValueError(f"evaluator metric {metric!r} is not one of {', '.join(METRICS)}")
        if epochs < 1:
            raise ValueError(f"evaluator epochs must be at least 1, got {epochs}")
        self.metric, self.epochs, self.lr, self.batch_size = metric, epochs, lr, batch_size
        self.seed, self.norms = seed, norms
        self.model = supernet
        self.task = task
        self.device = resolve_device(device)
        self.names = list(reparam_layers(supernet))
        self.model.to(self.device).eval()
        self._state = {k: v.detach().clone() for k, v in supernet.state_dict().items()}
        self._trainable = [p.requires_grad for p in supernet.parameters()]
        self._val = [(x.to(self.device), y.to(self.device))
                     for x, y in batches(task.val, batch_size_eval)]

    def __call__(self, selection: Iterable[str]) -> float:
        return self.scores(selection)[self.metric]

    @torch.inference_mode(False)
    def scores(self, selection: Iterable[str]) -> dict[str, float]:
        """Every metric of ``selection`` after its short training."""
        sel = list(canonical(selection, self.names))
        model = self.model
        set_selection(model, sel)
        params = set_trainable(model, deltas=sel, norms=self.norms, head=True)
        cfg = TrainConfig(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                          seed=self.seed + 1, device=str(self.device), progress=False,
                          desc="proxy")
        try:
            with torch.random.fork_rng(devices=[]):
                train(model, self.task, params, cfg,
                      before_batch=None if self.norms else lambda step: freeze_batchnorm(model))
            with torch.inference_mode():
                return val_scores((model(x) for x, _ in self._val), (y for _, y in self._val))
        finally:
            model.load_state_dict(self._state)
            for p, flag in zip(model.parameters(), self._trainable):
                p.requires_grad_(flag)
            set_selection(model, [])
            model.eval()


class SyntheticEvaluator:
    """A deterministic reward with structure like the real one, for tests.

    Each layer has a hidden utility; the score is a saturating function of the sum
    of utilities of the selected layers, minus a small interaction penalty between
    adjacent selected layers. Same seed, same scores.
    """

    def __init__(self, costs: Sequence[int], seed: int = 0, names: Sequence[str] | None = None):
        rng = np.random.default_rng(seed)
        self.names = list(names) if names is not None else [f"layer{i}" for i in range(len(costs))]
        self.costs = list(costs)
        self.utility = rng.gamma(1.0, 1.0, size=len(costs)) * np.log1p(np.asarray(costs, float))
        self.utility /= self.utility.sum()
        self.calls = 0

    def __call__(self, selection: Iterable[str]) -> float:
        self.calls += 1
        chosen = set(selection)
        mask = np.array([n in chosen for n in self.names], dtype=float)
        u = float((mask * self.utility).sum())
        adjacent = float((mask[1:] * mask[:-1]).sum())
        return 1.0 - math.exp(-4.0 * u) - 0.002 * adjacent


class CachedEvaluator:
    """Memoises an evaluator by canonical selection; counts real evaluations."""

    def __init__(self, evaluator: Evaluator):
        self.evaluator = evaluator
        self.names = list(evaluator.names)
        self.cache: dict[Selection, float] = {}
        self.hits = 0

    def __call__(self, selection: Iterable[str]) -> float:
        key = canonical(selection, self.names)
        if key in self.cache:
            self.hits += 1
            return self.cache[key]
        score = float(self.evaluator(key))
        self.cache[key] = score
        return score

    @property
    def evaluations(self) -> int:
        return len(self.cache)
