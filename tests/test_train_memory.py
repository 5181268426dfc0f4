"""A training-memory budget beside the parameter budget (issue #33): the memory cost of a
selection against the exact count, the budget's parsing, the environment's mask and
observation, every searcher within both budgets, and ``swr search --train-memory``."""

import copy
import json

import numpy as np
import pytest
import timm
import torch
from gymnasium.utils.env_checker import check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import swr.tasks
from swr.budget import MemoryBudget
from swr.envs import SyntheticEvaluator, layer_features
from swr.envs.layer_select import LayerSelectEnv, chain_memory, make_synthetic_env
from swr.errors import BudgetError
from swr.memory import MemoryLimit, saved_bytes
from swr.policies import SearchSettings, build_searcher
from swr.policies.network import PolicyNetwork
from swr.policies.pool import LocalPool
from swr.policies.search import EvaluationLog, SearchRun
from swr.policies.selectors import (greedy_memory_selection, knapsack_selection,
                                    memory_knapsack_selection, repaired_knapsack_selection)
from swr.reparam import candidates, set_selection, set_trainable
from swr.app.search import SearchConfig, run_search
from swr.selection import SearchProblem, memory_cost, selection_memory
from swr.supernet import SupernetConfig, build_supernet
from swr.tasks.backbones import create_backbone
from swr.tasks.base import Task, tensor_split
from swr.train import batches

from fixtures import tiny_audio_task, tiny_checkpoint

#: The largest relative difference allowed between the memory cost a search queries and
#: the exact count of the same training step (measured: 0 on all three models).
TOLERANCE = 0.01


# -- parsing ---------------------------------------------------------------------------
@pytest.mark.parametrize("text,fraction,size", [
    ("30%", 0.3, None), ("100%", 1.0, None), ("2MiB", None, 2 * 2**20),
    ("500KB", None, 500_000), ("1.5GB", None, 1_500_000_000), ("123456", None, 123456),
    ("64 kib", None, 65536), ("1000B", None, 1000),
])
def test_memory_budget_parses_percentages_and_sizes(text, fraction, size):
    b = MemoryBudget.parse(text)
    assert (b.fraction, b.bytes) == (fraction, size)
    assert b.resolve(1000) == (int(1000 * fraction) if fraction else size)


@pytest.mark.parametrize("text", ["0%", "150%", "-5", "abc", "", "0", "12.5", "3 apples",
                                  "1e999GB"])
def test_memory_budget_refuses_with_one_line(text):
    with pytest.raises(BudgetError, match="--train-memory") as e:
        MemoryBudget.parse(text)
    assert "\n" not in str(e.value)


# -- the memory cost against the exact count ---------------------------------------------
def image_task(n=48):
    g = torch.Generator().manual_seed(0)

    def split(k):
        return tensor_split(torch.randn(k, 3, 32, 32, generator=g), torch.arange(k) % 4)

    return Task(id="img", modality="image", class_names=list("abcd"), train=split(n),
                val=split(12), test=split(12), input_shape=(3, 32, 32))


MODELS = {
    "bcresnet-1": (lambda: create_backbone("bcresnet-1", num_classes=7), tiny_audio_task),
    # residual blocks whose downsampling shortcut is off the main branch's gradient path
    "timm:resnet10t": (lambda: timm.create_model("resnet10t", num_classes=7), image_task),
    # squeeze-excitation and hard-swish
    "timm:mobilenetv3_small_050": (lambda: timm.create_model("mobilenetv3_small_050",
                                                             num_classes=7), image_task),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_memory_cost_agrees_with_the_exact_count(name):
    torch.manual_seed(0)
    make, make_task = MODELS[name]
    task = make_task()
    supernet = build_supernet(make(), task.num_classes)
    batch = 12  # above the two small batches the cost is measured on, combined linearly
    cost = memory_cost(supernet, task, batch)
    names = list(cost.names)
    assert names == [c.name for c in candidates(supernet)] and cost.batch == batch
    rng = np.random.default_rng(0)
    picks = [[], [names[0]], [names[-1]], [names[len(names) // 2]]]
    picks += [[names[i] for i in sorted(rng.choice(len(names), k, replace=False))]
              for k in (2, 3, 5, 8)]
    worst = 0.0
    for norms in (False, True):
        for sel in picks if not norms else picks[:3]:
            exact = selection_memory(supernet, task, sel, norms, batch)["saved_bytes"]
            counted = cost.for_norms(norms).saved_bytes(np.isin(names, sel))
            worst = max(worst, abs(counted - exact) / exact)
    assert worst <= TOLERANCE, worst
    # the reference of percentages: full fine-tuning, every base parameter trained
    trial = copy.deepcopy(supernet)
    set_selection(trial, [])
    for pname, p in trial.named_parameters():
        p.requires_grad_(not pname.endswith(("delta", "delta_bias")))
    trial.train()
    full = saved_bytes(trial, next(batches(task.train, batch))[0].clone())
    assert abs(cost.full_bytes - full) <= TOLERANCE * full
    # an early layer keeps far more than a late one (the first about what full fine-tuning
    # keeps, plus its summed weight W + dW): the cost is not additive
    alone = cost.layer_bytes()
    assert alone[0] > 2 * alone[-1] and alone[0] > 0.9 * cost.full_bytes


def test_nothing_is_saved_below_the_earliest_selected_layer():
    """Item 2 of the issue: SWR's training saves no activation of the frozen prefix. The
    saved bytes of training one middle layer equal those of the same step with every
    layer below it run under torch.no_grad."""
    torch.manual_seed(0)
    supernet = build_supernet(create_backbone("bcresnet-1", num_classes=7), 4)
    names = [c.name for c in candidates(supernet)]
    chosen = names[len(names) // 2]
    set_selection(supernet, [chosen])
    set_trainable(supernet, deltas=[chosen], norms=False, head=True)
    supernet.train()
    x = torch.randn(4, 1, 40, 101)
    normal = saved_bytes(supernet, x)
    layer = dict(supernet.named_modules())[chosen]

    def gradients_from_here(module, args):
        torch.set_grad_enabled(True)  # stays on until the no_grad block below exits

    hook = layer.register_forward_pre_hook(gradients_from_here)

    class PrefixWithoutGrad(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            with torch.no_grad():  # the hook turns gradients on at the chosen layer
                return self.inner(x)

    try:
        without_prefix = saved_bytes(PrefixWithoutGrad(supernet), x)
    finally:
        hook.remove()
    assert without_prefix == normal > 0
    # while a selection whose earliest layer is lower keeps more
    set_selection(supernet, [names[0]])
    set_trainable(supernet, deltas=[names[0]], norms=False, head=True)
    assert saved_bytes(supernet, x) > normal


# -- a synthetic problem under both budgets ----------------------------------------------
def synthetic(n=24, seed=0):
    rng = np.random.default_rng(seed)
    costs = rng.choice([64, 128, 256, 512, 1152, 2304], size=n)
    taylor = rng.gamma(1.0, 1.0, size=n) * np.log(costs)
    # the earliest layers most important: the parameter knapsack wants them, memory does not
    taylor[:4] *= 8
    stats = [{"name": f"l{i}", "kind": "conv2d", "cost": int(c), "taylor": float(t),
              "shape": (8, 8, 3, 3)} for i, (c, t) in enumerate(zip(costs, taylor))]
    names = [s["name"] for s in stats]
    acts = (2 ** np.linspace(16, 9, n)).astype(np.int64)
    cost = chain_memory(acts, 4 * costs, names, head_bytes=256)
    return costs, taylor, stats, names, cost


def limit_of(cost, share):
    return MemoryLimit(cost, int(share * cost.full_bytes))


def test_the_rules_fit_both_budgets_and_differ_where_memory_binds():
    costs, taylor, _, _, cost = synthetic()
    budget = int(0.2 * costs.sum())
    memory = limit_of(cost, 0.3)
    plain = knapsack_selection(taylor, costs, budget)
    assert not memory.fits(plain)  # memory binds: the parameter knapsack breaks it
    for rule in (memory_knapsack_selection, repaired_knapsack_selection,
                 greedy_memory_selection):
        mask = rule(taylor, costs, budget, memory)
        assert costs[mask].sum() <= budget and memory.fits(mask) and mask.any(), rule
    repaired = repaired_knapsack_selection(taylor, costs, budget, memory)
    # repair only drops layers, the earliest first
    assert not (repaired & ~plain).any()
    dropped = np.flatnonzero(plain & ~repaired)
    assert dropped.max() < np.flatnonzero(repaired).min()
    # the knapsack over the layers that fit spends the budget the repair leaves unspent
    both = memory_knapsack_selection(taylor, costs, budget, memory)
    assert taylor[both].sum() >= taylor[repaired].sum()
    # no memory: the memory rules are the parameter ones
    assert np.array_equal(repaired_knapsack_selection(taylor, costs, budget, None), plain)


SEARCHERS = ["pg", "ppo", "random", "greedy", "knapsack", "knapsack-repaired", "greedy-memory",
             "evolution"]


@pytest.mark.parametrize("policy", SEARCHERS)
def test_every_searcher_keeps_both_budgets_at_equal_evaluations(tmp_path, policy):
    costs, taylor, stats, names, cost = synthetic(seed=1)
    budget = int(0.2 * costs.sum())
    memory = limit_of(cost, 0.3)
    assert not memory.fits(knapsack_selection(taylor, costs, budget))
    evaluations = 20
    evaluator = SyntheticEvaluator(costs, seed=3, names=names)
    problem = SearchProblem(None, None, names, list(costs), budget, stats, tmp_path,
                            memory=memory)
    log = EvaluationLog(tmp_path / "evaluations.jsonl", names, dict(zip(names, costs)), False)
    # the run refuses (AssertionError) any selection over either budget
    run = SearchRun(names, costs, budget, LocalPool(evaluator), log, evaluations, False,
                    memory=memory)
    searcher = build_searcher(policy, SearchSettings(evaluations=evaluations, seed=0,
                                                     progress=False))
    searcher.propose(problem, run)
    searcher._top_up(problem, run)
    log.close()
    assert len(log.seen) == evaluations
    for sel in log.seen:
        mask = np.isin(names, sel)
        assert costs[mask].sum() <= budget and memory.fits(mask), sel
    assert any(len(sel) for sel in log.seen)


def test_a_scoring_over_the_memory_budget_is_refused(tmp_path):
    costs, taylor, _, names, cost = synthetic()
    budget = int(0.2 * costs.sum())
    memory = limit_of(cost, 0.3)
    log = EvaluationLog(tmp_path / "e.jsonl", names, dict(zip(names, costs)), False)
    run = SearchRun(names, costs, budget, LocalPool(SyntheticEvaluator(costs, names=names)),
                    log, 5, False, memory=memory)
    with pytest.raises(AssertionError, match="memory budget"):
        run.score([knapsack_selection(taylor, costs, budget)])


@pytest.mark.parametrize("seed", range(3))
def test_policy_rollouts_keep_both_budgets_and_forced_logits_follow(seed):
    costs, _, stats, _, cost = synthetic(seed=seed)
    g = torch.Generator().manual_seed(seed)
    memory = limit_of(cost, 0.25)
    feats = torch.as_tensor(layer_features(stats))
    cost_t = torch.as_tensor(costs, dtype=torch.float64)
    policy = PolicyNetwork(feats.shape[1], memory=True)
    budgets = torch.randint(int(costs.min()), int(costs.sum()), (32,), generator=g).double()
    order = torch.randperm(len(costs), generator=g).tolist()
    roll = policy.rollout(feats, cost_t, budgets, 32, generator=g, order=order, memory=memory)
    masks = roll.masks.numpy()
    assert all(memory.fits(m) for m in masks)
    assert bool(((roll.masks.double() * cost_t).sum(1) <= budgets).all())
    assert roll.masks.any()
    logits, fits = policy.forced_logits(feats, cost_t, budgets, roll.masks, order, memory)
    lp = torch.where(roll.masks, torch.nn.functional.logsigmoid(logits),
                     torch.nn.functional.logsigmoid(-logits))
    assert torch.allclose((lp * fits).sum(1), roll.log_prob, atol=1e-4)
    with pytest.raises(ValueError, match="memory"):
        policy.rollout(feats, cost_t, budgets, 32)


# -- the environment -----------------------------------------------------------------------
def test_environment_with_a_memory_budget_passes_the_checkers():
    env = make_synthetic_env(n_layers=9, seed=3, memory_fraction=0.3)
    check_env(env)
    sb3_check_env(env)
    plain = make_synthetic_env(n_layers=9, seed=3)
    assert env.observation_space.shape[0] == plain.observation_space.shape[0] + 4


@pytest.mark.parametrize("seed", range(20))
def test_the_mask_excludes_what_breaks_either_budget(seed):
    env = make_synthetic_env(n_layers=12, budget_fraction=0.5, seed=seed, memory_fraction=0.2)
    rng = np.random.default_rng(seed)
    obs, info = env.reset(seed=seed)
    cost, limit = env.memory.cost, env.memory.budget
    assert info["memory_budget"] == limit
    mask_sel = np.zeros(12, dtype=bool)
    refused = 0
    for t in range(12):
        m = env.action_masks()
        with_t = mask_sel.copy()
        with_t[t] = True
        fits_params = env.costs[with_t].sum() <= env.budget
        assert m[1] == (fits_params and cost.saved_bytes(with_t) <= limit)
        refused += fits_params and not m[1]
        # the observation carries what the partial selection commits
        committed = cost.saved_bytes(mask_sel)
        assert env.committed_memory == committed
        n_f = env.features.shape[1]
        assert obs[n_f + 4] == pytest.approx(min(1.0, committed / limit), abs=1e-6)
        a = int(rng.integers(0, 2)) if t else 1
        obs, reward, terminated, _, info = env.step(a)
        if a == 1 and m[1]:
            mask_sel[t] = True
    assert terminated and info["memory"] == cost.saved_bytes(mask_sel) <= limit
    # the first layer keeps nearly every activation: memory, not parameters, refused it
    assert refused >= 1 or env.costs[0] > env.budget


def test_env_refuses_a_memory_cost_of_other_layers():
    costs, _, stats, names, cost = synthetic(n=6)
    with pytest.raises(ValueError, match="memory cost"):
        LayerSelectEnv(layer_features(stats[:5]), costs[:5], 500,
                       SyntheticEvaluator(costs[:5]), names[:5], memory=limit_of(cost, 0.3))


# -- swr search --train-memory --------------------------------------------------------------
@pytest.fixture
def tiny(monkeypatch, tmp_path):
    task = tiny_audio_task()
    monkeypatch.setattr(swr.tasks, "get_task", lambda spec, **kw: task)
    return task, tiny_checkpoint(tmp_path / "ckpt")


def search_cfg(tmp_path, ckpt, policy, out="out", **kw):
    return SearchConfig(task="tiny", checkpoint=str(ckpt), budget=kw.pop("budget", "10%"),
                        out=str(tmp_path / out), policy=policy,
                        evaluations=kw.pop("evaluations", 10), workers=0, progress=False,
                        device="cpu", supernet=SupernetConfig(epochs=1, progress=False), **kw)


@pytest.mark.parametrize("policy", ["pg", "evolution"])
def test_search_records_and_keeps_the_memory_budget(tiny, tmp_path, policy):
    _, ckpt = tiny
    r = run_search(search_cfg(tmp_path, ckpt, policy, train_memory="30%"))
    sel = json.loads((tmp_path / "out" / "selection.json").read_text())
    assert sel["train_memory"] == "30%" and sel["layers"]
    assert sel["train_memory_bytes"] == int(0.3 * sel["full_finetune_saved_bytes"])
    measured = sel["training_memory"]["saved_bytes"]
    # the measured step keeps the budget, and the search's count is the measured one
    assert measured <= sel["train_memory_bytes"]
    assert abs(sel["memory_model_saved_bytes"] - measured) <= TOLERANCE * measured
    # norms keep activations down to the first norm: at 30% auto trains deltas only
    assert sel["norms_trained"] is False
    assert sel["cost"] <= sel["budget_params"] and r["layers"] == sel["layers"]
    fp = json.loads((tmp_path / "out" / "fingerprint.json").read_text())
    assert fp["train_memory_bytes"] == sel["train_memory_bytes"]
    # a resume with another memory budget is another search
    with pytest.raises(swr.errors.SwrError, match="--train-memory"):
        run_search(search_cfg(tmp_path, ckpt, policy, train_memory="40%", resume=True))


def test_search_without_a_memory_budget_records_none_of_it(tiny, tmp_path):
    _, ckpt = tiny
    run_search(search_cfg(tmp_path, ckpt, "knapsack", evaluations=4))
    sel = json.loads((tmp_path / "out" / "selection.json").read_text())
    fp = json.loads((tmp_path / "out" / "fingerprint.json").read_text())
    assert "train_memory" not in sel and "train_memory_bytes" not in fp


def test_memory_budgets_that_cannot_hold_are_one_line(tiny, tmp_path, capsys):
    from swr.app.cli import main

    _, ckpt = tiny
    base = ["search", "--task", "tiny", "--checkpoint", str(ckpt), "--budget", "10%",
            "--evaluations", "4", "--workers", "0", "--device", "cpu", "--supernet-epochs", "1"]
    for i, (memory, said) in enumerate([("lots", "cannot read --train-memory"),
                                        ("100B", "below the"),
                                        ("30%", "that training the task norms saves")]):
        extra = ["--norms", "free"] if "norms" in said else []
        code = main(base + ["--out", str(tmp_path / f"o{i}"), "--train-memory", memory] + extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and said in err[-1], (memory, err)
