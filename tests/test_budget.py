import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from swr.budget import (NORM_MODES, Budget, backbone_params, check_selection, cost_report,
                        count_feasible, feasible_masks, resolve_budget, selection_cost, split_budget)
from swr.errors import BudgetError, SwrError
from swr.reparam import candidates, reparametrize

from models import make


@pytest.mark.parametrize("text,fraction,params", [
    ("0.05", 0.05, None), ("5%", 0.05, None), ("100%", 1.0, None), ("1.0", 1.0, None),
    ("20000", None, 20000), ("20k", None, 20000), ("1.5M", None, 1_500_000), (0.1, 0.1, None),
    (300, None, 300),
])
def test_parse(text, fraction, params):
    b = Budget.parse(text)
    assert b.fraction == fraction and b.params == params


@pytest.mark.parametrize("text", ["0", "-0.1", "0%", "150%", "1.5", "abc", "", "-5", "nan"])
def test_parse_rejects(text):
    with pytest.raises(BudgetError, match="budget"):
        Budget.parse(text)


def test_resolve_and_costs():
    model, _ = make("bcresnet")
    reparametrize(model)
    total = backbone_params(model)
    head = sum(p.numel() for p in model.get_classifier().parameters())
    assert total == sum(p.numel() for n, p in model.named_parameters()
                        if not n.endswith(("delta", "delta_bias"))) - head
    assert resolve_budget(model, "5%") == int(0.05 * total)
    cands = candidates(model)
    cheapest = min(c.params for c in cands)
    with pytest.raises(BudgetError, match="cheapest"):
        resolve_budget(model, cheapest - 1)
    with pytest.raises(BudgetError, match="above"):
        resolve_budget(model, total + 1)
    report = cost_report(model, [cands[0].name], count_head=True)
    assert report["deltas"] == cands[0].params
    assert report["updated"] == cands[0].params + report["head"]
    assert report["norms"] > 0


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_selection_cost_is_sum_and_over_budget_rejected(data):
    model, _ = make("bcresnet")
    reparametrize(model)
    cands = {c.name: c.params for c in candidates(model)}
    chosen = data.draw(st.lists(st.sampled_from(sorted(cands)), unique=True))
    cost = selection_cost(model, chosen)
    assert cost == sum(cands[n] for n in chosen)
    budget = data.draw(st.integers(1, sum(cands.values())))
    if cost <= budget:
        assert check_selection(model, chosen, budget) == cost
    else:
        with pytest.raises(BudgetError, match="over the budget"):
            check_selection(model, chosen, budget)


def test_bias_delta_counts_bias():
    model, _ = make("resnet")
    plain = {c.name: c.params for c in candidates(model)}
    with_bias = {c.name: c.params for c in candidates(model, bias_delta=True)}
    # resnet convs have no bias; the stem conv's cost is unchanged either way
    assert plain["conv1"] == with_bias["conv1"] == torch.Size([64, 3, 7, 7]).numel()


@pytest.mark.parametrize("mode,budget,norms,expected", [
    # norms fit with room for the cheapest delta (10): trained and counted, unless told not
    ("auto", 1000, 400, (600, True, True)),
    ("budget", 1000, 400, (600, True, True)),
    ("none", 1000, 400, (1000, False, False)),
    ("free", 1000, 400, (1000, True, False)),
    # norms larger than the budget: auto falls back to deltas only; none and free do not care
    ("auto", 300, 400, (300, False, False)),
    ("none", 300, 400, (300, False, False)),
    ("free", 300, 400, (300, True, False)),
    # norms that fit but leave less than the cheapest delta do not fit
    ("auto", 405, 400, (405, False, False)),
    ("auto", 410, 400, (10, True, True)),
])
def test_split_budget_shares_the_budget_between_norms_and_deltas(mode, budget, norms, expected):
    assert split_budget(budget, norms, mode, min_delta=10) == expected


def test_split_budget_refuses_norms_that_do_not_fit_in_budget_mode():
    with pytest.raises(BudgetError) as e:
        split_budget(300, 400, "budget", min_delta=10)
    line = str(e.value)
    assert "\n" not in line and "300" in line and "400" in line
    assert "norms=none" in line and "norms=free" in line
    with pytest.raises(SwrError, match="sometimes"):
        split_budget(1000, 400, "sometimes")
    assert NORM_MODES == ("auto", "budget", "none", "free")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 12), max_size=9), st.integers(-1, 40))
def test_count_feasible_counts_every_subset_that_fits(costs, budget):
    import itertools

    brute = sum(1 for k in range(len(costs) + 1) for sub in itertools.combinations(costs, k)
                if sum(sub) <= budget)
    assert count_feasible(costs, budget) == brute
    masks = feasible_masks(costs, budget)  # the same subsets, each once
    assert len(masks) == brute == len({m.tobytes() for m in masks})
    assert all(sum(c for c, m in zip(costs, mask) if m) <= budget for mask in masks)
    scaled = [7 * c for c in costs]  # counted in units of the common divisor, same answer
    assert count_feasible(scaled, 7 * budget + 3) == brute


def test_count_feasible_declines_budgets_too_large_to_count(monkeypatch):
    import swr.budget

    monkeypatch.setattr(swr.budget, "COUNT_FEASIBLE_LIMIT", 100)
    assert count_feasible([3, 5], 100) == 4
    assert count_feasible([3, 5], 101) is None
    assert count_feasible([30, 50], 1000) == 4  # 100 units of 10
