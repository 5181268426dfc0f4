"""The pg policy's knapsack prior, budget conditioning, and searches of a budget list."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

import swr.tasks
from swr.envs import SyntheticEvaluator, layer_features
from swr.policies.network import PolicyNetwork
from swr.policies.pg import PGConfig, PGSearcher, PGTrainer, decision_order, fill_masks
from swr.policies.pool import LocalPool
from swr.policies.registry import SearchSettings
from swr.policies.search import EvaluationLog, SearchRun
from swr.policies.selectors import knapsack_selection
from swr.app.search import SearchConfig, run_search
from swr.selection import SearchProblem
from swr.supernet import SupernetConfig

from fixtures import tiny_audio_task, tiny_checkpoint


def synthetic(n=24, seed=0):
    """Costs, Taylor importances and stage-1-like statistics of ``n`` layers."""
    rng = np.random.default_rng(seed)
    costs = rng.choice([64, 128, 256, 512, 1152, 2304], size=n)
    taylor = rng.gamma(1.0, 1.0, size=n) * np.log(costs)
    stats = [{"name": f"l{i}", "kind": "conv2d", "cost": int(c), "taylor": float(t),
              "shape": (8, 8, 3, 3)} for i, (c, t) in enumerate(zip(costs, taylor))]
    return costs, taylor, stats


def fractions(costs, *shares):
    return [int(costs.sum() * s) for s in shares]


@pytest.mark.parametrize("order", ["network", "importance"])
@pytest.mark.parametrize("shares", [(0.05,), (0.02, 0.05, 0.1, 0.2)])
def test_prior_makes_the_greedy_rollout_the_knapsack_selection(shares, order):
    costs, taylor, stats = synthetic()
    budgets = fractions(costs, *shares)
    trainer = PGTrainer(layer_features(stats), costs, budgets if len(budgets) > 1 else budgets[0],
                        PGConfig(seed=0, order=order), values=taylor)
    assert (trainer.order is None) == (order == "network")
    assert trainer.prior_info["prior_wrong_decisions"] == 0
    for b, mask in zip(budgets, trainer.greedy_masks()):
        assert np.array_equal(mask, knapsack_selection(taylor, costs, b)), b


def test_without_prior_the_policy_starts_elsewhere():
    costs, taylor, stats = synthetic()
    budgets = fractions(costs, 0.02, 0.05, 0.1, 0.2)
    trainer = PGTrainer(layer_features(stats), costs, budgets, PGConfig(seed=0, prior_steps=0),
                        values=taylor)
    assert trainer.prior is None and trainer.prior_info == {"prior_steps": 0}
    same = [np.array_equal(m, knapsack_selection(taylor, costs, b))
            for b, m in zip(budgets, trainer.greedy_masks())]
    assert not all(same)


def test_importance_order_decides_the_densest_layers_first():
    costs, taylor, _ = synthetic()
    order = decision_order(taylor, costs, "importance")
    density = taylor / costs
    assert sorted(order) == list(range(len(costs)))
    assert all(density[a] >= density[b] for a, b in zip(order, order[1:]))
    assert decision_order(taylor, costs, "network") is None
    assert decision_order(None, costs, "importance") is None
    with pytest.raises(ValueError, match="order"):
        decision_order(taylor, costs, "random")


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ordered", [False, True])
def test_budget_conditioned_rollouts_never_exceed_their_own_budget(seed, ordered):
    costs, _, stats = synthetic(seed=seed)
    g = torch.Generator().manual_seed(seed)
    policy = PolicyNetwork(layer_features(stats).shape[1])
    budgets = torch.randint(1, int(costs.sum()), (32,), generator=g).double()
    # decided in network order, or in a shuffled one (the teacher-forced logits must follow)
    order = torch.randperm(len(costs), generator=g).tolist() if ordered else None
    roll = policy.rollout(torch.as_tensor(layer_features(stats)),
                          torch.as_tensor(costs, dtype=torch.float64), budgets, 32, generator=g,
                          order=order)
    spent = (roll.masks.double() * torch.as_tensor(costs, dtype=torch.float64)).sum(1)
    assert bool((spent <= budgets).all())
    assert roll.masks.any()  # not trivially empty
    # the teacher-forced logits of the sampled selections agree with the rollout's log-prob
    logits, fits = policy.forced_logits(torch.as_tensor(layer_features(stats)),
                                        torch.as_tensor(costs, dtype=torch.float64), budgets,
                                        roll.masks, order)
    lp = torch.where(roll.masks, torch.nn.functional.logsigmoid(logits),
                     torch.nn.functional.logsigmoid(-logits))
    assert torch.allclose((lp * fits).sum(1), roll.log_prob, atol=1e-4)


def pg_on_synthetic(tmp_path, budgets, evaluations, seed=0, config=None):
    """PGSearcher.propose on a synthetic problem, scoring with a SyntheticEvaluator."""
    costs, taylor, stats = synthetic(seed=1)
    tmp_path.mkdir(parents=True, exist_ok=True)
    names = [s["name"] for s in stats]
    evaluator = SyntheticEvaluator(costs, seed=3, names=names)
    problem = SearchProblem(None, None, names, list(costs), max(budgets), stats, tmp_path,
                            budgets=budgets if len(budgets) > 1 else [],
                            budget_labels=[str(b) for b in budgets] if len(budgets) > 1 else [])
    log = EvaluationLog(tmp_path / "evaluations.jsonl", names, dict(zip(names, costs)), False)
    run = SearchRun(names, costs, max(budgets), LocalPool(evaluator), log, evaluations, False)
    PGSearcher(SearchSettings(evaluations=evaluations, seed=seed, progress=False),
               config).propose(problem, run)
    log.close()
    return costs, taylor, names, evaluator, log


def test_pg_scores_the_knapsack_first_and_exactly_its_evaluations(tmp_path):
    costs = synthetic(seed=1)[0]
    budgets = fractions(costs, 0.02, 0.05, 0.1, 0.2)
    costs, taylor, names, evaluator, log = pg_on_synthetic(tmp_path, budgets, 30)
    scored = list(log.seen)
    assert len(scored) == 30 == evaluator.calls
    first = [tuple(n for n, m in zip(names, knapsack_selection(taylor, costs, b)) if m)
             for b in budgets]
    assert set(scored[:len(budgets)]) == set(first)
    by_name = dict(zip(names, costs))
    assert max(sum(by_name[n] for n in s) for s in scored) <= max(budgets)
    # every budget was sampled: each has selections that fit it but not the budget below
    for lo, hi in zip([0] + budgets[:-1], budgets):
        assert any(lo < sum(by_name[n] for n in s) <= hi for s in scored), hi


def test_the_saved_policy_replays_its_last_greedy_selections(tmp_path):
    """policy.safetensors holds the weights, the decision order and whether pg fills:
    loaded into a fresh network, its greedy rollout, filled, gives the selections the
    search scored last."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    costs, taylor, stats = synthetic(seed=1)
    budgets = fractions(costs, 0.02, 0.1)
    _, _, names, _, log = pg_on_synthetic(tmp_path, budgets, 12)
    path = tmp_path / "policy.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    order = [int(i) for i in meta["order"].split(",")]
    assert order == decision_order(taylor, costs, "importance")
    assert meta["fill"] == "1"
    policy = PolicyNetwork(int(meta["n_features"]), int(meta["hidden"]))
    policy.load_state_dict(load_file(str(path)))
    with torch.no_grad():
        roll = policy.rollout(torch.as_tensor(layer_features(stats), dtype=torch.float32),
                              torch.as_tensor(costs, dtype=torch.float64), budgets,
                              len(budgets), greedy=True, order=order)
    masks = fill_masks(roll.masks, costs, budgets, order)
    greedy = {tuple(n for n, m in zip(names, mask) if m) for mask in masks.numpy()}
    assert greedy <= set(log.seen)


def test_a_sharp_policy_still_reaches_its_evaluations(tmp_path):
    """Started near-deterministic (confidence 0.999) at a small budget, pg samples the
    same few selections; its temperature rises until it finds new ones."""
    costs = synthetic(seed=1)[0]
    config = PGConfig(prior_confidence=0.999, prior_steps=400, max_iterations=300)
    log = pg_on_synthetic(tmp_path, fractions(costs, 0.03), 40, config=config)[4]
    assert len(log.seen) == 40


@pytest.mark.parametrize("fill", [True, False])
def test_pg_leaves_no_budget_a_left_out_layer_fits(tmp_path, fill):
    """With ``fill`` every selection pg scores is maximal: no layer it left out fits the
    budget it left. Without, a policy started from random weights leaves such room."""
    costs = synthetic(seed=1)[0]
    budget = fractions(costs, 0.05)[0]
    config = PGConfig(prior_steps=0, fill=fill)
    costs, _, names, _, log = pg_on_synthetic(tmp_path, [budget], 20, config=config)
    by_name = dict(zip(names, costs))

    def room(sel):
        left = budget - sum(by_name[n] for n in sel)
        return any(by_name[n] <= left for n in names if n not in sel)

    with_room = [s for s in log.seen if room(s)]
    assert len(log.seen) == 20
    assert (not with_room) if fill else with_room


def test_pg_same_seed_same_scorings(tmp_path):
    costs = synthetic(seed=1)[0]
    budgets = fractions(costs, 0.02, 0.1)
    a = list(pg_on_synthetic(tmp_path / "a", budgets, 20)[4].seen.items())
    b = list(pg_on_synthetic(tmp_path / "b", budgets, 20)[4].seen.items())
    assert a == b


# -- swr search with a budget list, end to end on the tiny task -------------------------
@pytest.fixture
def tiny(monkeypatch, tmp_path):
    task = tiny_audio_task()
    monkeypatch.setattr(swr.tasks, "get_task", lambda spec, **kw: task)
    return task, tiny_checkpoint(tmp_path / "ckpt")


BUDGETS = "2%,5%,10%,20%"


def list_cfg(tmp_path, ckpt, policy, out="out", evaluations=14, budget=BUDGETS, **kw):
    return SearchConfig(task="tiny", checkpoint=str(ckpt), budget=budget,
                        out=str(tmp_path / out), policy=policy, evaluations=evaluations,
                        workers=0, progress=False, device="cpu",
                        supernet=SupernetConfig(epochs=1, progress=False, gates="budget"), **kw)


@pytest.mark.parametrize("policy", ["pg", "random"])
def test_budget_list_search_writes_a_selection_per_budget(tiny, tmp_path, policy):
    _, ckpt = tiny
    r = run_search(list_cfg(tmp_path, ckpt, policy))
    out = tmp_path / "out"
    assert not (out / "selection.json").exists()
    summary = json.loads((out / "selections.json").read_text())
    assert [e["budget"] for e in summary["budgets"]] == BUDGETS.split(",")
    logged = [tuple(json.loads(line)["selection"])
              for line in (out / "evaluations.jsonl").read_text().splitlines()]
    assert r["evaluations"] == 14 == len(logged) == len(set(logged))
    assert len((out / "search.csv").read_text().splitlines()) - 1 == 14
    params = [e["budget_params"] for e in summary["budgets"]]
    assert params == sorted(params) and len(set(params)) == 4
    for label, e in zip(BUDGETS.split(","), summary["budgets"]):
        sel = json.loads((out / f"budget-{label}" / "selection.json").read_text())
        assert sel["budget"] == label and sel["layers"] == e["layers"]
        assert sel["cost"] <= sel["budget_params"] == e["budget_params"]
        assert sel["val_score"] == e["val_score"]
        assert {"checkpoint", "base", "task", "supernet", "evaluations"} <= sel.keys()
        # each budget's file says what scored it, as the summary does
        assert sel["bn_stats"] == summary["bn_stats"] in ("val", "supernet")
    # each budget's best: the best-scoring logged selection that fits it
    from swr.pretrain import load_pretrained
    from swr.reparam import candidates
    from swr.supernet import build_supernet

    cost = {c.name: c.params for c in candidates(build_supernet(load_pretrained(ckpt)[0], 4))}
    scores = {tuple(json.loads(line)["selection"]): json.loads(line)["score"]
              for line in (out / "evaluations.jsonl").read_text().splitlines()}
    for e in summary["budgets"]:
        fit = [v for sel, v in scores.items() if sum(cost[n] for n in sel) <= e["budget_params"]]
        assert e["val_score"] == max(fit)
    fp = json.loads((out / "fingerprint.json").read_text())
    assert fp["budget_params"] == params


def test_budget_list_same_seed_same_selections_and_finetune_reads_them(tiny, tmp_path):
    from swr.app.finetune import finetune

    _, ckpt = tiny
    a = run_search(list_cfg(tmp_path, ckpt, "pg", out="a", evaluations=10, budget="5%,10%"))
    b = run_search(list_cfg(tmp_path, ckpt, "pg", out="b", evaluations=10, budget="5%,10%"))
    assert [e["layers"] for e in a["budgets"]] == [e["layers"] for e in b["budgets"]]
    assert [e["val_score"] for e in a["budgets"]] == [e["val_score"] for e in b["budgets"]]
    # interrupted after half its scorings, then resumed: the same selections
    log = (tmp_path / "b" / "evaluations.jsonl").read_text().splitlines()
    (tmp_path / "b" / "evaluations.jsonl").write_text("\n".join(log[:5]) + "\n")
    c = run_search(list_cfg(tmp_path, ckpt, "pg", out="b", evaluations=10, budget="5%,10%",
                            resume=True))
    assert [e["layers"] for e in c["budgets"]] == [e["layers"] for e in a["budgets"]]
    assert c["replayed_evaluations"] == 5
    m = finetune(tmp_path / "a" / "budget-5%" / "selection.json", tmp_path / "final", epochs=1,
                 device="cpu", progress=False)
    assert m["updated_params"] <= m["budget_params"] == a["budgets"][0]["budget_params"]


def test_single_budget_keeps_its_layout(tiny, tmp_path):
    _, ckpt = tiny
    run_search(list_cfg(tmp_path, ckpt, "pg", evaluations=6, budget="10%"))
    out = tmp_path / "out"
    assert (out / "selection.json").exists() and not (out / "selections.json").exists()
    assert isinstance(json.loads((out / "fingerprint.json").read_text())["budget_params"], int)


@pytest.mark.parametrize("gates, scored_with", [("budget", "val"), ("bernoulli", "supernet")])
def test_deltas_only_search_scores_with_the_statistics_that_rank_best(tiny, tmp_path, gates,
                                                                       scored_with):
    """By default stage 1 trains on budget-feasible gate sets and a deltas-only search
    scores with val-batch statistics; a supernet of independent gates keeps its own."""
    _, ckpt = tiny
    assert SearchConfig(task="t", checkpoint="c", budget="1%", out="o").supernet.gates == "budget"
    cfg = list_cfg(tmp_path, ckpt, "random", evaluations=4, budget="10%", norms="none")
    r = run_search(replace(cfg, supernet=replace(cfg.supernet, gates=gates)))
    assert r["bn_stats"] == scored_with and not r["norms_trained"]


@pytest.mark.parametrize("policy", ["pg", "random"])
def test_a_space_no_larger_than_the_evaluations_is_scored_whole(tiny, tmp_path, policy):
    """Few selections of the tiny model fit under 60 parameters: with evaluations to
    spare, every one of them is scored once and any searcher returns the best of them."""
    _, ckpt = tiny
    sel = run_search(list_cfg(tmp_path, ckpt, policy, budget="60", evaluations=500))
    n = sel["feasible_selections"]
    assert 2 < n <= 500 and sel["evaluations"] == n
    rows = [json.loads(line) for line in
            (tmp_path / "out" / "evaluations.jsonl").read_text().splitlines()]
    assert len(rows) == n == len({tuple(r["selection"]) for r in rows})
    assert rows[0]["selection"] == []  # enumerated by the driver (the searcher starts elsewhere)
    best = max(rows, key=lambda r: r["score"])
    assert sel["layers"] == best["selection"] and sel["val_score"] == best["score"]


def test_budget_list_errors(tiny, tmp_path):
    from swr.errors import SwrError

    _, ckpt = tiny
    with pytest.raises(SwrError, match="both"):
        run_search(list_cfg(tmp_path, ckpt, "random", budget="5%,0.05"))
    with pytest.raises(SwrError, match="budget"):
        run_search(list_cfg(tmp_path, ckpt, "random", budget="5%,,10%"))
    with pytest.raises(SwrError, match="one per budget"):
        run_search(list_cfg(tmp_path, ckpt, "random", evaluations=3))


def test_a_searcher_that_stops_short_is_topped_up_to_its_evaluations(tmp_path, monkeypatch):
    """pg capped at two iterations proposes far fewer distinct selections than asked: the
    driver makes up the rest with random feasible ones, says how many, and a space smaller
    than the count ends at its size with the reason recorded."""
    import swr.policies.search as driver
    from swr.policies.pg import PGConfig

    costs, _, stats = synthetic(seed=1)
    names = [s["name"] for s in stats]
    evaluator = SyntheticEvaluator(costs, seed=3, names=names)
    monkeypatch.setattr(driver, "evaluator_factory", lambda *a, **k: None)
    monkeypatch.setattr(driver, "make_pool", lambda *a, **k: LocalPool(evaluator))
    monkeypatch.setattr(driver, "plot_search", lambda *a, **k: None)
    budget = fractions(costs, 0.1)[0]
    problem = SearchProblem(None, None, names, list(costs), budget, stats, tmp_path)
    settings = SearchSettings(evaluations=40, seed=0, progress=False, samples_per_iteration=4)
    found = PGSearcher(settings, PGConfig(max_iterations=2))(problem)
    assert found.evaluations == 40 == evaluator.calls
    assert 0 < found.topped_up <= 40 - 4 and found.short is None
    # a space of 3 selections (empty, a, b): every one scored, and the reason given
    tiny = SearchProblem(None, None, names[:2], [costs[0], costs[1]], max(costs[:2]),
                         stats[:2], tmp_path / "tiny")
    (tmp_path / "tiny").mkdir()
    found = PGSearcher(replace(settings, evaluations=40),
                       PGConfig(max_iterations=2))(tiny)
    assert found.evaluations == tiny.feasible_selections < 40
    assert "every one of the" in found.short
