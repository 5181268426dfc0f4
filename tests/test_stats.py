"""Rank statistics (swr.stats) against hand-computed small cases."""

import math

import numpy as np
import pytest
import torch

from swr.budget import random_feasible_gates
from swr.errors import SwrError
from swr.stats import average_ranks, fisher_interval, kendall_tau, spearman


def test_kendall_tau_b_without_ties():
    # pairs of (1,2,3,4) vs (1,3,2,4): 5 concordant, 1 discordant -> (5-1)/6
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_kendall_tau_b_with_ties():
    # x = (1,1,2,3), y = (1,2,2,3): 6 pairs; x tied in 1 pair, y tied in 1 pair.
    # Pairs (i<j): (0,1) x tie; (0,2) +; (0,3) +; (1,2) y tie; (1,3) +; (2,3) + -> S = 4
    # tau_b = 4 / sqrt((6-1)*(6-1)) = 0.8
    assert kendall_tau([1, 1, 2, 3], [1, 2, 2, 3]) == pytest.approx(0.8)


def test_spearman_with_average_ranks():
    assert list(average_ranks([10, 20, 20, 5])) == [2.0, 3.5, 3.5, 1.0]
    # no ties: 1 - 6*sum(d^2)/(n(n^2-1)); (1,2,3,4) vs (1,3,2,4): d^2 sum 2 -> 1 - 12/60
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    # ties: ranks x (1.5,1.5,3,4), y (1,2.5,2.5,4); Pearson of the ranks by hand:
    # centred x (-1,-1,0.5,1.5), y (-1.5,0,0,1.5): sxy 3.75, sxx 4.5, syy 4.5 -> 0.8333
    assert spearman([1, 1, 2, 3], [1, 2, 2, 3]) == pytest.approx(3.75 / 4.5)


def test_constant_or_bad_input():
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman([1, 2, 3], [5, 5, 5]))
    with pytest.raises(SwrError):
        kendall_tau([1, 2], [1, 2, 3])
    with pytest.raises(SwrError):
        spearman([1, float("nan")], [1, 2])


def test_fisher_interval_contains_r_and_narrows_with_n():
    lo, hi = fisher_interval(0.5, 20, "kendall")
    lo2, hi2 = fisher_interval(0.5, 200, "kendall")
    assert lo < 0.5 < hi and lo2 < 0.5 < hi2 and hi2 - lo2 < hi - lo
    # Pearson by hand: atanh(0.5)=0.549306, se=1/sqrt(17); tanh(0.549306 -+ 0.475357)
    assert fisher_interval(0.5, 20, "pearson") == pytest.approx((0.0739, 0.7710), abs=1e-3)
    assert all(math.isnan(v) for v in fisher_interval(0.5, 3))


def test_random_feasible_gates_stay_within_budget_and_vary():
    costs = [5, 10, 20, 40, 80, 3]
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        opened = random_feasible_gates(costs, 60, g)
        assert sum(c for c, o in zip(costs, opened) if o) <= 60
        seen.add(tuple(opened))
    assert len(seen) > 10  # a distribution, not one selection
    assert not any(s[4] for s in seen)  # a layer over the budget never opens
    a = random_feasible_gates(costs, 60, torch.Generator().manual_seed(3))
    assert a == random_feasible_gates(costs, 60, torch.Generator().manual_seed(3))
