"""Statistics for comparisons: the paired difference of two methods with its 95%
interval, and rank statistics (Kendall's tau-b and Spearman's rho, ties handled the
standard way, a Fisher-z 95% interval for a correlation); numpy only.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .errors import SwrError


def _pair(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise SwrError(f"rank correlation needs two 1-d sequences of one length, got shapes "
                       f"{x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise SwrError("rank correlation needs finite values (found NaN or inf)")
    return x, y


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b of ``a`` and ``b``: (concordant - discordant) pairs over
    ``sqrt((n0 - ties_a) * (n0 - ties_b))``. NaN when either side is constant or has
    fewer than two values (no ranking to compare)."""
    x, y = _pair(a, b)
    # O(n^2) over pairs: the sets compared here hold tens of values
    dx = np.sign(x[:, None] - x[None, :])
    dy = np.sign(y[:, None] - y[None, :])
    iu = np.triu_indices(len(x), k=1)
    sx, sy = dx[iu], dy[iu]
    n0 = len(sx)
    untied_x = float(np.count_nonzero(sx))
    untied_y = float(np.count_nonzero(sy))
    if n0 == 0 or untied_x == 0 or untied_y == 0:
        return float("nan")
    return float((sx * sy).sum()) / math.sqrt(untied_x * untied_y)


def average_ranks(a: Sequence[float]) -> np.ndarray:
    """Ranks 1..n of ``a``; tied values share the mean of the ranks they span."""
    x = np.asarray(a, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rho: Pearson correlation of the average ranks. NaN when either
    side is constant or has fewer than two values."""
    x, y = _pair(a, b)
    if len(x) < 2:
        return float("nan")
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx * rx).sum()) * float((ry * ry).sum()))
    if denom == 0:
        return float("nan")
    return float((rx * ry).sum()) / denom


def fisher_interval(r: float, n: int, kind: str = "spearman", z: float = 1.959964) -> tuple[float, float]:
    """Approximate 95% interval of a correlation ``r`` from ``n`` pairs via Fisher's z.

    Standard errors: ``1/sqrt(n-3)`` (Pearson), ``sqrt(1.06/(n-3))`` (Spearman,
    Fieller et al. 1957), ``sqrt(0.437/(n-4))`` (Kendall). NaN bounds when ``n`` is too
    small or ``r`` is NaN.
    """
    se = {"pearson": lambda: 1 / math.sqrt(n - 3), "spearman": lambda: math.sqrt(1.06 / (n - 3)),
          "kendall": lambda: math.sqrt(0.437 / (n - 4))}
    if kind not in se:
        raise SwrError(f"correlation kind {kind!r} is not one of {', '.join(se)}")
    if not math.isfinite(r) or n <= (4 if kind == "kendall" else 3):
        return (float("nan"), float("nan"))
    r = min(max(r, -0.999999), 0.999999)
    centre, half = math.atanh(r), z * se[kind]()
    return (math.tanh(centre - half), math.tanh(centre + half))


#: Two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def paired_interval(differences: Sequence[float]) -> tuple[float, float, float]:
    """Mean of paired ``differences`` and its 95% t-interval: ``(mean, low, high)``.

    NaN bounds with fewer than two pairs (no spread to estimate).
    """
    d = np.asarray(differences, dtype=np.float64)
    if d.ndim != 1 or not len(d) or not np.isfinite(d).all():
        raise SwrError("a paired interval needs finite differences")
    mean = float(d.mean())
    if len(d) < 2:
        return mean, float("nan"), float("nan")
    t = _T975[len(d) - 2] if len(d) - 1 <= len(_T975) else 1.959964
    half = t * float(d.std(ddof=1)) / math.sqrt(len(d))
    return mean, mean - half, mean + half
