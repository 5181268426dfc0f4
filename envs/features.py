"""Per-layer feature vectors for the environment and the policy network."""

from __future__ import annotations

from typing import Sequence

import numpy as np

KINDS = ("linear", "conv1d", "conv2d", "dwconv1d", "dwconv2d", "gconv1d", "gconv2d")


def _standardize(v: np.ndarray) -> np.ndarray:
    """Zero mean, unit spread, squashed into [-1, 1] (robust to a single huge layer)."""
    v = np.asarray(v, dtype=np.float64)
    spread = v.std() if v.std() > 0 else 1.0
    return np.tanh((v - v.mean()) / spread)


def layer_features(stats: Sequence[dict]) -> np.ndarray:
    """``(layers, F)`` float32 features from stage-1 statistics (see supernet docs).

    Columns: kind one-hot, relative depth, log-cost (standardised), cost share,
    delta relative norm (standardised), Taylor importance (standardised), Taylor
    importance per parameter (standardised), kernel size flag (1x1 vs larger).
    """
    n = len(stats)
    kind = np.zeros((n, len(KINDS)), dtype=np.float32)
    for i, s in enumerate(stats):
        if s["kind"] in KINDS:
            kind[i, KINDS.index(s["kind"])] = 1.0
    depth = np.linspace(0.0, 1.0, n) if n > 1 else np.zeros(1)
    cost = np.array([s["cost"] for s in stats], dtype=np.float64)
    rel = np.array([s.get("delta_rel_norm", 0.0) for s in stats])
    taylor = np.array([s.get("taylor", 0.0) for s in stats])
    shape = [tuple(s.get("shape", ())) for s in stats]
    spatial = np.array([1.0 if len(sh) > 2 and int(np.prod(sh[2:])) > 1 else 0.0 for sh in shape])
    cols = [depth, _standardize(np.log(cost)), cost / cost.sum(), _standardize(rel),
            _standardize(taylor), _standardize(taylor / cost), spatial]
    return np.concatenate([kind, np.stack(cols, axis=1)], axis=1).astype(np.float32)
