"""Evaluators: the terminal reward of a selection.

An evaluator maps a selection (a tuple of layer names) to a validation score.
:class:`SupernetEvaluator` scores on the trained supernet; :class:`SyntheticEvaluator`
is a deterministic stand-in with a known optimum, for tests and environment checks.
:class:`CachedEvaluator` memoises any evaluator by selection.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from swr.reparam import reparam_layers, set_selection
from swr.fold import merge, unmerge
from swr.train import batches, recalibrate_batchnorm, resolve_device

Selection = tuple[str, ...]


class Evaluator(Protocol):
    names: Sequence[str]

    def __call__(self, selection: Iterable[str]) -> float: ...


def canonical(selection: Iterable[str], names: Sequence[str]) -> Selection:
    """A selection in network order without duplicates: the cache key."""
    chosen = set(selection)
    return tuple(n for n in names if n in chosen)


class SupernetEvaluator:
    """Validation accuracy of a selection on the trained supernet.

    Per selection: open its gates and fold ``W + dW`` into the weights once
    (``merge``), recalibrate BatchNorm statistics on a few training batches when
    the backbone has BatchNorm, score the validation split held in memory, undo.

    With ``prefix_cache_mb > 0`` the work of the *frozen prefix* (every module that
    runs before the first open gate) is not redone: its outputs on the
    recalibration batches and on the validation split, and its recalibrated
    BatchNorm statistics, are the same for every selection whose gates open later,
    so they are captured once and replayed (see :class:`_PrefixCache`). Scores are
    bit-identical to the plain path (``prefix_cache_mb=0``).
    """

    def __init__(self, supernet: nn.Module, task, device: str | torch.device = "cpu",
                 bn_batches: int = 4, bn_batch_size: int = 128, batch_size: int = 512,
                 seed: int = 0, prefix_cache_mb: float = 512.0):
        self.model = supernet
        self.task = task
        self.device = resolve_device(device)
        self.names = list(reparam_layers(supernet))
        self.bn_batches = bn_batches
        self.bn_batch_size = bn_batch_size
        self.batch_size = batch_size
        self.seed = seed
        self.has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in supernet.modules())
        self.model.to(self.device).eval()
        # BN recalibration starts from the supernet's statistics each time.
        self._bn_state = {k: v.clone() for k, v in supernet.state_dict().items()
                          if "running_" in k or k.endswith("num_batches_tracked")}
        self._val = [(x.to(self.device), y.to(self.device))
                     for x, y in batches(task.val, batch_size)]
        self._prefix = None
        if prefix_cache_mb > 0:
            self._prefix = _PrefixCache.build(self, int(prefix_cache_mb * 2**20))

    @torch.inference_mode(False)
    def __call__(self, selection: Iterable[str]) -> float:
        sel = canonical(selection, self.names)
        if self._prefix is not None:
            return self._prefix.score(sel)
        set_selection(self.model, sel)
        merge(self.model)
        try:
            if self.has_bn and self.bn_batches > 0:
                recalibrate_batchnorm(self.model, self.task.train, self.bn_batches,
                                      self.bn_batch_size, self.device, seed=self.seed)
            correct = total = 0
            with torch.inference_mode():
                for x, y in self._val:
                    correct += int((self.model(x).argmax(-1) == y).sum())
                    total += len(y)
        finally:
            unmerge(self.model)
            if self.has_bn:
                self.model.load_state_dict(self._bn_state, strict=False)
            set_selection(self.model, [])
        return correct / max(total, 1)


def _passthrough(*args, **kwargs):
    """Stands in for a prefix module whose output is not needed: returns its input."""
    return args[0] if args else None


class _PrefixCache:
    """Replays the frozen prefix of the supernet instead of recomputing it.

    A *boundary* is a module ``M`` that runs once per forward pass and cuts the
    network: nothing computed before ``M`` is used after it except through ``M``'s
    output. For a selection whose first open gate runs after ``M``, everything up to
    ``M`` computes what it computes with all gates closed, so ``M``'s outputs (on
    each recalibration batch, in training-mode BatchNorm, and on each validation
    batch, in eval mode with recalibrated statistics) and the recalibrated
    statistics of the BatchNorms up to ``M`` do not depend on the selection.

    The cut is not assumed from the module tree: a boundary is used only after a
    probe batch, run with the prefix stubbed out and ``M`` replaced by its recorded
    output, gives bit-identical logits to the full model. Boundaries are filled
    lazily, the first time a selection needs one, while that selection is scored
    (the capture costs no extra forward pass), until ``max_bytes`` are held.
    """

    def __init__(self, ev: "SupernetEvaluator", max_bytes: int, probe: torch.Tensor,
                 order: list[str]):
        self.ev = ev
        self.model = ev.model
        self.max_bytes = max_bytes
        self.bytes = 0
        self.probe = probe
        modules = dict(self.model.named_modules())
        self.modules = modules
        start = {n: i for i, n in enumerate(order)}
        # end[n]: the last call position inside n's subtree (n itself included)
        end = dict(start)
        for n in order:
            parent = n
            while parent:
                parent = parent.rpartition(".")[0]
                if parent in end:
                    end[parent] = max(end[parent], start[n])
        self.start, self.end, self.order = start, end, order
        self.layer_start = {name: start[name] for name in ev.names}
        self.bns = [(start[n], m) for n, m in modules.items()
                    if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
                    and n in start]
        self.saved_bn = [(m, m.running_mean.clone(), m.running_var.clone(),
                          m.num_batches_tracked.clone(), m.momentum) for _, m in self.bns]
        inside_reparam = tuple(f"{n}." for n in ev.names)
        # boundary candidates, latest cut first; ties: the outermost module
        self.candidates = sorted(
            (n for n in order if n and not n.startswith(inside_reparam)),
            key=lambda n: (-end[n], start[n]))
        self.verified: dict[str, bool] = {}
        self.closed_stats: dict[int, tuple] = {}  # id(bn) -> recalibrated stats, gates closed
        self.cache: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self.per_sample_bytes: dict[str, int] = {}
        # recalibration batches exactly as recalibrate_batchnorm draws them
        self.recal = []
        if ev.has_bn and ev.bn_batches > 0:
            g = torch.Generator().manual_seed(ev.seed)
            for i, (x, _) in enumerate(batches(ev.task.train, ev.bn_batch_size, shuffle=True,
                                               generator=g)):
                if i >= ev.bn_batches:
                    break
                self.recal.append(x.to(ev.device))
        self.hits = 0

    @classmethod
    def build(cls, ev: "SupernetEvaluator", max_bytes: int) -> "_PrefixCache | None":
        """Discover the call order on a probe batch; None where caching cannot apply."""
        if not ev._val:
            return None
        model = ev.model
        probe = ev._val[0][0][:2]
        order: list[str] = []
        calls: dict[str, int] = {}
        names = {m: n for n, m in model.named_modules()}

        def pre_hook(mod, args):
            n = names[mod]
            calls[n] = calls.get(n, 0) + 1
            if calls[n] == 1:
                order.append(n)

        handles = [m.register_forward_pre_hook(pre_hook) for m in model.modules()]
        try:
            set_selection(model, [])
            with torch.inference_mode():
                model(probe)
        finally:
            for h in handles:
                h.remove()
        # a layer or BatchNorm run twice per pass (shared weights) has no single place
        # in the order: keep the plain path
        shared = [n for n, c in calls.items() if c > 1 and (
            n in ev.names or isinstance(model.get_submodule(n) if n else model,
                                        nn.modules.batchnorm._BatchNorm))]
        if shared or any(n not in calls for n in ev.names):
            return None
        return cls(ev, max_bytes, probe, order)

    # -- boundaries --------------------------------------------------------------------
    def _prefix_roots(self, boundary: str) -> list[nn.Module]:
        """The outermost modules that run before ``boundary`` and are not its ancestors."""
        ancestors = set()
        n = boundary
        while n:
            n = n.rpartition(".")[0]
            ancestors.add(n)
        s = self.start[boundary]
        return [self.modules[n] for n in self.order
                if self.start[n] < s and n not in ancestors and n.rpartition(".")[0] in ancestors]

    def _replay(self, boundary: str, outputs: Iterator[torch.Tensor]):
        """Context: the prefix is skipped and ``boundary`` returns the next recorded output."""
        stubs = [(m, _passthrough) for m in self._prefix_roots(boundary)]
        stubs.append((self.modules[boundary], lambda *a, **k: next(outputs).clone()))
        return _Patched(stubs)

    def _verify(self, boundary: str) -> bool:
        ok = self.verified.get(boundary)
        if ok is not None:
            return ok
        model, mod = self.model, self.modules[boundary]
        seen: list[torch.Tensor] = []
        handle = mod.register_forward_hook(lambda m, a, out: seen.append(out))
        ok = False
        try:
            with torch.inference_mode():
                ref = model(self.probe)
                handle.remove()
                if len(seen) == 1 and isinstance(seen[0], torch.Tensor):
                    recorded = seen[0].clone()
                    with self._replay(boundary, iter([recorded])):
                        out = model(self.probe.clone())
                    ok = isinstance(out, torch.Tensor) and out.shape == ref.shape \
                        and torch.equal(out, ref)
                    self.per_sample_bytes[boundary] = recorded[0].numel() * recorded.element_size()
        except Exception:  # the stubbed prefix fed a module something it cannot take
            ok = False
        finally:
            handle.remove()
        self.verified[boundary] = ok
        return ok

    def _best(self, first_open: int, cached_only: bool) -> str | None:
        """The latest verified boundary that ends before call position ``first_open``."""
        for n in self.candidates:
            if self.end[n] >= first_open:
                continue
            if cached_only:
                if n in self.cache:
                    return n
            elif self._verify(n):
                return n
        return None

    # -- scoring -------------------------------------------------------------------------
    def score(self, sel: Selection) -> float:
        ev, model = self.ev, self.model
        first_open = min((self.layer_start[n] for n in sel), default=len(self.order))
        use = self._best(first_open, cached_only=True)
        want = self._best(first_open, cached_only=False)
        capture = None
        if want is not None and want != use:
            need = self.per_sample_bytes[want] * (sum(len(x) for x in self.recal)
                                                  + sum(len(x) for x, _ in ev._val))
            if self.bytes + need <= self.max_bytes:
                capture = want
        if use is not None:
            self.hits += 1
        use_end = self.end[use] if use is not None else -1
        set_selection(model, sel)
        merge(model)
        try:
            with torch.inference_mode():
                recal_out, val_out = [], []
                if self.recal:
                    for pos, m in self.bns:
                        if pos <= use_end:  # replayed: its statistics are the closed ones
                            mean, var, count = self.closed_stats[id(m)]
                            m.running_mean.copy_(mean)
                            m.running_var.copy_(var)
                            m.num_batches_tracked.copy_(count)
                        else:
                            m.reset_running_stats()
                            m.momentum = None
                        m.train()
                    self._run(self.recal, use, 0, capture, recal_out)
                    for pos, m in self.bns:
                        m.eval()
                    if capture is not None:
                        cut = self.end[capture]
                        for pos, m in self.bns:
                            if pos <= cut and id(m) not in self.closed_stats:
                                self.closed_stats[id(m)] = (m.running_mean.clone(),
                                                            m.running_var.clone(),
                                                            m.num_batches_tracked.clone())
                logits = self._run([x for x, _ in ev._val], use, len(self.recal), capture,
                                   val_out)
                correct = total = 0
                for out, (_, y) in zip(logits, ev._val):
                    correct += int((out.argmax(-1) == y).sum())
                    total += len(y)
            if capture is not None:
                self.cache[capture] = (recal_out, val_out)
                self.bytes += sum(t.numel() * t.element_size() for t in recal_out + val_out)
        finally:
            unmerge(model)
            for m, mean, var, count, momentum in self.saved_bn:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
                m.momentum = momentum
                m.eval()
            set_selection(model, [])
        return correct / max(total, 1)

    def _run(self, inputs: list[torch.Tensor], use: str | None, offset: int,
             capture: str | None, captured: list[torch.Tensor]) -> list[torch.Tensor]:
        """Forward ``inputs``, replaying boundary ``use`` (its recorded outputs start at
        ``offset``) and recording ``capture``'s outputs into ``captured``."""
        model = self.model
        handle = None
        if capture is not None:
            handle = self.modules[capture].register_forward_hook(
                lambda m, a, out: captured.append(out.clone()))
        try:
            if use is None:
                return [model(x) for x in inputs]
            recal, val = self.cache[use]
            recorded = iter((recal + val)[offset:offset + len(inputs)])
            with self._replay(use, recorded):
                return [model(x) for x in inputs]
        finally:
            if handle is not None:
                handle.remove()


class _Patched:
    """Context: give modules a different ``forward`` for a while (instance attribute)."""

    def __init__(self, patches):
        self.patches = patches

    def __enter__(self):
        for m, fn in self.patches:
            m.forward = fn
        return self

    def __exit__(self, *exc):
        for m, _ in self.patches:
            del m.forward
        return False


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
