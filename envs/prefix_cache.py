"""The prefix cache: replay the frozen prefix of the supernet instead of recomputing it.

Used by :class:`~swr.envs.evaluator.SupernetEvaluator` (``prefix_cache_mb > 0``).
For every selection whose first open gate comes late in the network, the work
before that gate (its outputs on the recalibration and validation batches, and its
recalibrated BatchNorm statistics) is the same, so it is recorded once and replayed:
the skipped modules run a stand-in ``forward`` while a selection is scored. Logits
are bit-identical to the plain path; a boundary is used only after a probe run shows so.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
from torch import nn

from swr.fold import merge, unmerge
from swr.reparam import set_selection
from swr.train import batches, batchnorm_snapshot, restore_batchnorm

Selection = tuple[str, ...]


class PrefixCache:
    """Replays the frozen prefix of the supernet instead of recomputing it.

    A *boundary* is a module ``M`` that runs once per forward pass and cuts the
    network: nothing computed before ``M`` is used after it except through ``M``'s
    output. For a selection whose first open gate runs after ``M``, everything up to
    ``M`` computes what it computes with all gates closed, so ``M``'s outputs (on
    each recalibration batch, in training-mode BatchNorm, and on each validation
    batch, in eval mode with recalibrated statistics) and the recalibrated
    statistics of the BatchNorms up to ``M`` do not depend on the selection.

    To replay, the outermost modules that run before ``M`` return an empty tensor
    of their usual shape instead of computing, and ``M`` returns a copy of its
    recorded output. The cut is not assumed from the module tree: a boundary is used
    only after a probe batch run that way, with the skipped modules returning NaN so
    that any use of them shows, gives bit-identical logits to the full model.
    Boundaries are recorded lazily, the first time a selection needs one, while that
    selection is scored (no extra forward pass), until ``max_bytes``, and only where
    they skip at least ``min_skip`` of the forward pass.
    """

    def __init__(self, ev, max_bytes: int, min_skip: float,
                 probe: torch.Tensor, order: list[str], shapes: dict[str, tuple]):
        self.ev, self.model = ev, ev.model
        self.max_bytes, self.min_skip, self.bytes, self.hits = max_bytes, min_skip, 0, 0
        self.probe, self.order, self.shapes = probe, order, shapes
        self.modules = dict(self.model.named_modules())
        self.start = {n: i for i, n in enumerate(order)}
        self.end = dict(self.start)  # the last call position inside a module's subtree
        for n in order:
            parent = n
            while parent:
                parent = parent.rpartition(".")[0]
                self.end[parent] = max(self.end.get(parent, -1), self.start[n])
        # the work before each call position, as output elements of the leaf modules so far
        # (a proxy for the compute a replay skips: convs, norms and activations all scale
        # with the size of what they produce)
        work = [math.prod(shapes[n][0]) if n in shapes and not any(
            True for _ in self.modules[n].children()) else 0 for n in order]
        self.work_before = np.cumsum(work) / max(sum(work), 1)
        self.bns = [(self.start[n], m) for n, m in self.modules.items()
                    if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
                    and n in self.start]
        self.saved_bn = batchnorm_snapshot(m for _, m in self.bns)
        inside_reparam = tuple(f"{n}." for n in ev.names)
        # boundary candidates, latest cut first; among equal cuts the outermost module
        self.candidates = sorted((n for n in order if n and not n.startswith(inside_reparam)),
                                 key=lambda n: (-self.end[n], self.start[n]))
        self.verified: dict[str, bool] = {}
        self.closed_stats: dict[int, tuple] = {}  # id(bn) -> statistics, prefix gates closed
        self.cache: dict[str, list[torch.Tensor]] = {}  # boundary -> outputs, recal then val
        self.batch = 0  # the batch size the prefix stubs fake
        self.verifying = False
        # recalibration batches exactly as recalibrate_batchnorm draws them
        self.recal: list[torch.Tensor] = []
        if ev.recalibrates:
            g = torch.Generator().manual_seed(ev.seed)
            for i, (x, _) in enumerate(batches(ev.task.train, ev.bn_batch_size, shuffle=True,
                                               generator=g)):
                if i >= ev.bn_batches:
                    break
                self.recal.append(x.to(ev.device))

    @classmethod
    def build(cls, ev, max_bytes: int, min_skip: float
              ) -> "PrefixCache | None":
        """Record the call order and output shapes on a probe batch; None where the
        model calls a layer or BatchNorm more than once per pass (no single place)."""
        if not ev._val or len(ev._val[0][0]) < 3:
            return None
        model = ev.model
        # shapes are read at batch 2 and cuts verified at batch 3, so a module whose
        # output does not scale with the batch cannot pass for one that does
        probe = ev._val[0][0][:2]
        names = {m: n for n, m in model.named_modules()}
        order: list[str] = []
        calls: dict[str, int] = {}
        shapes: dict[str, tuple] = {}

        def pre_hook(mod, args):
            n = names[mod]
            calls[n] = calls.get(n, 0) + 1
            if calls[n] == 1:
                order.append(n)

        def hook(mod, args, out):
            if isinstance(out, torch.Tensor) and out.dim() > 0 and len(out) == len(probe):
                shapes[names[mod]] = (tuple(out.shape[1:]), out.dtype, out.device)

        handles = [m.register_forward_pre_hook(pre_hook) for m in model.modules()]
        handles += [m.register_forward_hook(hook) for m in model.modules()]
        try:
            set_selection(model, [])
            with torch.inference_mode():
                model(probe)
        finally:
            for h in handles:
                h.remove()
        shared = [n for n, c in calls.items() if c > 1 and (
            n in ev.names or isinstance(model.get_submodule(n), nn.modules.batchnorm._BatchNorm))]
        if shared or any(n not in calls for n in ev.names):
            return None
        return cls(ev, max_bytes, min_skip, ev._val[0][0][:3], order, shapes)

    # -- boundaries ------------------------------------------------------------------------
    def _replay(self, boundary: str, outputs: Iterator[torch.Tensor]) -> "_Patched":
        """Context: the prefix is skipped and ``boundary`` returns its next recorded output."""
        ancestors, n = set(), boundary
        while n:
            n = n.rpartition(".")[0]
            ancestors.add(n)
        first = self.start[boundary]
        patches = []
        for n in self.order:
            if self.start[n] < first and n not in ancestors and n.rpartition(".")[0] in ancestors:
                patches.append((self.modules[n], self._fake(n)))
        patches.append((self.modules[boundary], lambda *a, **k: next(outputs).clone()))
        return _Patched(patches)

    def _fake(self, name: str):
        """A stand-in for a skipped module: an empty tensor shaped like its output."""
        if name not in self.shapes:
            return lambda *a, **k: a[0] if a else None
        shape, dtype, device = self.shapes[name]
        if self.verifying:  # NaN poisons every result the skipped work still reaches
            return lambda *a, **k: torch.full((self.batch, *shape), float("nan"), dtype=dtype,
                                              device=device)
        return lambda *a, **k: torch.empty((self.batch, *shape), dtype=dtype, device=device)

    def _verify(self, names: list[str]) -> None:
        """Check the cut at each of ``names`` (one reference pass records them all)."""
        model, probe = self.model, self.probe
        recorded: dict[str, torch.Tensor] = {}

        def recorder(name):
            def hook(mod, args, out):
                if isinstance(out, torch.Tensor):
                    recorded[name] = out.clone()
            return hook

        handles = [self.modules[n].register_forward_hook(recorder(n)) for n in names]
        try:
            with torch.inference_mode():
                ref = model(probe)
        finally:
            for h in handles:
                h.remove()
        self.batch, self.verifying = len(probe), True
        try:
            for n in names:
                ok = False
                if n in recorded:
                    try:
                        with torch.inference_mode(), self._replay(n, iter([recorded[n]])):
                            out = model(probe.clone())
                        ok = isinstance(out, torch.Tensor) and out.shape == ref.shape \
                            and torch.equal(out, ref)
                    except Exception:  # a faked prefix fed a module what it cannot take
                        ok = False
                self.verified[n] = ok
                if ok:  # the caller wants the latest cut: later names can wait
                    break
        finally:
            self.verifying = False

    def _latest(self, first_open: int, cached_only: bool) -> str | None:
        """The latest usable boundary that ends before call position ``first_open``."""
        before = [n for n in self.candidates if self.end[n] < first_open]
        if cached_only:
            return next((n for n in before if n in self.cache), None)
        for i, n in enumerate(before):
            if n not in self.verified:
                self._verify([m for m in before[i:] if m not in self.verified])
            if self.verified[n]:
                return n
        return None

    # -- scoring ---------------------------------------------------------------------------
    def logits(self, sel: Selection) -> list[torch.Tensor]:
        ev, model = self.ev, self.model
        first_open = min((self.start[n] for n in sel), default=len(self.order))
        use = self._latest(first_open, cached_only=True)
        # the latest cut before the first open gate, where recording one could pay
        worth = first_open > 0 and self.work_before[first_open - 1] >= self.min_skip
        want = self._latest(first_open, cached_only=False) if worth else None
        use_end = self.end[use] if use is not None else -1
        record = None
        if want is not None and self.end[want] > use_end:
            samples = sum(len(x) for x in self.recal) + sum(len(x) for x, _ in ev._val)
            shape, dtype, _ = self.shapes.get(want, ((), torch.float32, None))
            need = samples * math.prod(shape) * dtype.itemsize
            if want in self.shapes and self.bytes + need <= self.max_bytes and \
                    self.work_before[self.end[want]] >= self.min_skip:
                record = want
        self.hits += use is not None
        set_selection(model, sel)
        merge(model)
        recorded: list[torch.Tensor] = []
        try:
            with torch.inference_mode():
                if self.recal:
                    for pos, m in self.bns:
                        if pos <= use_end:  # skipped: it holds the closed-prefix statistics
                            for buf, value in zip(
                                    (m.running_mean, m.running_var, m.num_batches_tracked),
                                    self.closed_stats[id(m)]):
                                buf.copy_(value)
                        else:  # as recalibrate_batchnorm: cumulative average from scratch
                            m.reset_running_stats()
                            m.momentum = None
                        m.train()
                    self._run(self.recal, use, 0, record, recorded)
                    for pos, m in self.bns:
                        m.eval()
                        if record is not None and pos <= self.end[record]:
                            self.closed_stats.setdefault(id(m), (
                                m.running_mean.clone(), m.running_var.clone(),
                                m.num_batches_tracked.clone()))
                with ev.val_batch_statistics():
                    out = self._run([x for x, _ in ev._val], use, len(self.recal), record,
                                    recorded)
            if record is not None:
                self.cache[record] = recorded
                self.bytes += sum(t.numel() * t.element_size() for t in recorded)
            return out
        finally:
            unmerge(model)
            restore_batchnorm(self.saved_bn)
            for _, m in self.bns:
                m.eval()
            set_selection(model, [])

    def _run(self, inputs: list[torch.Tensor], use: str | None, offset: int,
             record: str | None, recorded: list[torch.Tensor]) -> list[torch.Tensor]:
        """Forward ``inputs``, replaying boundary ``use`` (its outputs for these inputs
        start at ``offset``) and appending ``record``'s outputs to ``recorded``."""
        model = self.model
        handle = None
        if record is not None:
            handle = self.modules[record].register_forward_hook(
                lambda m, a, out: recorded.append(out.clone()))
        try:
            if use is None:
                return [model(x) for x in inputs]
            outs = []
            replayed = iter(self.cache[use][offset:offset + len(inputs)])
            with self._replay(use, replayed):
                for x in inputs:
                    self.batch = len(x)
                    # glue code between the skipped modules sees the raw input: a copy
                    # keeps an in-place op there off the held data
                    outs.append(model(x.clone()))
            return outs
        finally:
            if handle is not None:
                handle.remove()


class _Patched:
    """Context: modules run a different ``forward`` (an instance attribute) for a while."""

    def __init__(self, patches):
        self.patches = patches

    def __enter__(self) -> "_Patched":
        for m, fn in self.patches:
            m.forward = fn
        return self

    def __exit__(self, *exc) -> bool:
        for m, _ in self.patches:
            del m.forward
        return False
