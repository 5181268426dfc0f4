import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from swr.budget import (Budget, backbone_params, check_selection, cost_report, resolve_budget,
                        selection_cost)
from swr.errors import BudgetError
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
