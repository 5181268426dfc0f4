import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import swr.tasks
from swr.envs.evaluator import BN_CLIPS, PROXY_EPOCHS
from swr.errors import SwrError
from swr.app.search import SearchConfig, run_search
from swr.policies.selectors import (greedy_selection, knapsack_selection, random_selection)
from swr.supernet import SupernetConfig

from fixtures import tiny_audio_task, tiny_checkpoint


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    task = tiny_audio_task()
    monkeypatch.setattr(swr.tasks, "get_task", lambda spec, **kw: task)
    return task, tiny_checkpoint(tmp_path / "ckpt")


def search_cfg(tmp_path, ckpt, policy, out="out", **kw):
    return SearchConfig(task="tiny", checkpoint=str(ckpt), budget=kw.pop("budget", "10%"),
                        out=str(tmp_path / out),
                        policy=policy, evaluations=kw.pop("evaluations", 12), workers=0,
                        progress=False, device="cpu",
                        supernet=SupernetConfig(epochs=1, progress=False), **kw)


@pytest.mark.parametrize("policy", ["pg", "ppo", "random", "greedy", "knapsack"])
def test_search_writes_outputs_within_budget(tiny, tmp_path, policy):
    _, ckpt = tiny
    r = run_search(search_cfg(tmp_path, ckpt, policy))
    out = tmp_path / "out"
    sel = json.loads((out / "selection.json").read_text())
    assert {"layers", "cost", "budget_params", "val_score", "policy", "seed", "evaluations"} <= sel.keys()
    assert sel["cost"] <= sel["budget_params"] and sel["layers"]
    assert sel["evaluations"] <= 12 + 1
    rows = (out / "search.csv").read_text().splitlines()
    assert rows[0].startswith("evaluation,reward,best_so_far")
    assert len(rows) - 1 == sel["evaluations"]
    assert (out / "search.png").stat().st_size > 1000
    assert r["val_score"] == max(float(x.split(",")[1]) for x in rows[1:])


def test_same_seed_same_selection_and_resume(tiny, tmp_path):
    _, ckpt = tiny
    a = run_search(search_cfg(tmp_path, ckpt, "pg", out="a", evaluations=16))
    b = run_search(search_cfg(tmp_path, ckpt, "pg", out="b", evaluations=16))
    assert a["layers"] == b["layers"] and a["val_score"] == b["val_score"]
    # interrupt: keep only the first half of the evaluation log, then resume
    log = (tmp_path / "b" / "evaluations.jsonl").read_text().splitlines()
    (tmp_path / "b" / "evaluations.jsonl").write_text("\n".join(log[:8]) + "\n{\"selec")
    c = run_search(search_cfg(tmp_path, ckpt, "pg", out="b", evaluations=16, resume=True))
    assert c["layers"] == a["layers"] and c["val_score"] == a["val_score"]
    assert c["replayed_evaluations"] == 8


def test_bad_policy_and_budget(tiny, tmp_path):
    _, ckpt = tiny
    with pytest.raises(SwrError, match="--policy"):
        run_search(search_cfg(tmp_path, ckpt, "magic"))
    cfg = search_cfg(tmp_path, ckpt, "random")
    cfg.budget = "3"
    with pytest.raises(SwrError, match="cheapest"):
        run_search(cfg)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 400), min_size=1, max_size=12), st.integers(1, 2000),
       st.integers(0, 2**16))
def test_selectors_never_exceed_budget_and_knapsack_is_optimal(costs, budget, seed):
    costs = np.array(costs)
    rng = np.random.default_rng(seed)
    values = rng.random(len(costs))
    for mask in (random_selection(costs, budget, rng), greedy_selection(values, costs, budget),
                 knapsack_selection(values, costs, budget)):
        assert costs[mask].sum() <= budget
    best = 0.0
    for bits in range(1 << len(costs)):
        m = np.array([(bits >> i) & 1 for i in range(len(costs))], dtype=bool)
        if costs[m].sum() <= budget:
            best = max(best, values[m].sum())
    assert values[knapsack_selection(values, costs, budget)].sum() == pytest.approx(best)


def test_finetune_folds_exactly_and_fold_cli_rebuilds(tiny, tmp_path, capsys):
    import torch

    from swr.app.cli import main
    from swr.app.finetune import finetune
    from swr.pretrain import load_pretrained
    from swr.tasks.backbones import create_backbone

    task, ckpt = tiny
    run_search(search_cfg(tmp_path, ckpt, "knapsack", evaluations=4))
    mem = json.loads((tmp_path / "out" / "selection.json").read_text())["training_memory"]
    assert mem["saved_bytes"] > 0 and mem["bytes"] == mem["saved_bytes"] + mem["state_bytes"]
    m = finetune(tmp_path / "out" / "selection.json", tmp_path / "final", epochs=1,
                 device="cpu", progress=False)
    assert m["fold_max_abs_diff"] <= 1e-5  # run_method refuses a fold to another architecture
    assert m["updated_params"] <= m["budget_params"]
    assert m["delta_bytes"] == (tmp_path / "final" / "task_delta.safetensors").stat().st_size
    assert 0.0 <= m["test_acc"] <= 1.0
    assert main(["fold", "--checkpoint", str(ckpt), "--delta",
                 str(tmp_path / "final" / "task_delta.safetensors"),
                 "--out", str(tmp_path / "rebuilt")]) == 0
    rebuilt = create_backbone("bcresnet-1", weights=tmp_path / "rebuilt" / "model.safetensors")
    folded = create_backbone("bcresnet-1", weights=tmp_path / "final" / "model.safetensors")
    for k, v in folded.state_dict().items():
        assert torch.equal(v, rebuilt.state_dict()[k]), k
    base, _ = load_pretrained(ckpt)
    assert sum(p.numel() for p in base.parameters()) - base.get_classifier().weight.numel() \
        - base.get_classifier().bias.numel() == sum(p.numel() for p in rebuilt.parameters()) \
        - rebuilt.get_classifier().weight.numel() - rebuilt.get_classifier().bias.numel()


@pytest.mark.parametrize("policy", ["pg", "ppo", "random", "greedy", "knapsack"])
def test_every_searcher_scores_exactly_its_evaluations_distinct_selections(tiny, tmp_path, policy):
    """--evaluations N: N distinct selections scored, whichever searcher (one count for all)."""
    _, ckpt = tiny
    r = run_search(search_cfg(tmp_path, ckpt, policy, evaluations=40))
    out = tmp_path / "out"
    rows = (out / "search.csv").read_text().splitlines()[1:]
    logged = [tuple(json.loads(line)["selection"])
              for line in (out / "evaluations.jsonl").read_text().splitlines()]
    assert r["evaluations"] == 40 == len(rows) == len(logged) == len(set(logged))
    assert r["val_score"] == max(float(x.split(",")[1]) for x in rows)


def test_searcher_stops_at_the_size_of_a_small_space(tiny, tmp_path):
    """A budget that only the cheapest layers fit: fewer selections exist than asked for."""
    from swr.pretrain import load_pretrained
    from swr.reparam import candidates
    from swr.supernet import build_supernet

    task, ckpt = tiny
    costs = [c.params for c in candidates(build_supernet(load_pretrained(ckpt)[0], task.num_classes))]
    cfg = search_cfg(tmp_path, ckpt, "random", evaluations=40)
    cfg.budget = str(min(costs))
    r = run_search(cfg)
    # the empty selection, or one layer at the cheapest cost (two never fit)
    space = 1 + sum(c == min(costs) for c in costs)
    assert space < 40
    assert r["evaluations"] == space


@pytest.mark.parametrize("rule", ["greedy", "knapsack"])
def test_perturbed_selectors_find_new_selections_when_no_importance_is_positive(rule):
    """Multiplicative noise keeps every importance at or below zero, so the rule alone
    gives the empty selection forever; the search must still reach its evaluations."""
    from swr.policies.selectors import run_selector

    class Run:  # scores the number of layers; counts distinct selections like SearchRun
        def __init__(self, limit):
            self.limit, self.seen = limit, set()

        def evaluations_left(self):
            return self.limit - len(self.seen)

        def is_new(self, mask):
            return tuple(mask) not in self.seen

        def score(self, masks):
            for m in masks:
                if self.evaluations_left() > 0:
                    self.seen.add(tuple(m))
            return [float(m.sum()) for m in masks]

    costs = np.array([10, 20, 30, 40, 50, 60])
    run = Run(limit=15)
    run_selector(rule, -np.linspace(0.1, 1.0, len(costs)), costs, 100, 15, 0, run)
    assert len(run.seen) == 15
    assert all(costs[np.array(m)].sum() <= 100 for m in run.seen)


def _norm_count(ckpt):
    from swr.pretrain import load_pretrained
    from swr.reparam import norm_parameters

    base, _ = load_pretrained(ckpt)
    return base, sum(p.numel() for p in norm_parameters(base).values())


def test_search_counts_task_norms_in_the_budget_when_they_fit(tiny, tmp_path):
    """--norms auto: at 40% the BC-ResNet's 2416 norm parameters fit and are counted, the
    searcher gets the rest; at 10% (883) they do not, and the search trains deltas only."""
    _, ckpt = tiny
    _, norms = _norm_count(ckpt)
    big = run_search(search_cfg(tmp_path, ckpt, "knapsack", out="big", budget="40%",
                                evaluations=4))
    sel = json.loads((tmp_path / "big" / "selection.json").read_text())
    assert sel["norms"] == "auto" and sel["norms_trained"] is True
    assert sel["norm_params"] == norms == big["norm_params"]
    assert sel["delta_budget_params"] == sel["budget_params"] - norms
    assert sel["layers"] and sel["cost"] <= sel["delta_budget_params"]
    assert sel["updated_params"] == sel["cost"] + norms <= sel["budget_params"]
    small = run_search(search_cfg(tmp_path, ckpt, "knapsack", out="small", evaluations=4))
    assert small["norms_trained"] is False and small["budget_params"] < norms
    assert small["delta_budget_params"] == small["budget_params"]
    assert small["updated_params"] == small["cost"] <= small["budget_params"]
    # the mode is part of what a search is: a resume with another one is refused
    with pytest.raises(SwrError, match="--norms: auto there, free now"):
        run_search(search_cfg(tmp_path, ckpt, "knapsack", out="small", evaluations=4,
                              norms="free", resume=True))


def test_deltas_only_search_trains_stage_one_with_the_base_norms(tiny, tmp_path, monkeypatch):
    """When no budget trains the task norms, stage 1 does not either: the supernet keeps
    the base's norm affines and BatchNorm statistics (what the final model keeps), and
    the search scores with those statistics instead of the validation batch's."""
    import torch
    from safetensors.torch import load_file

    import swr.policies.search as search_mod
    from swr.reparam import norm_modules

    _, ckpt = tiny
    base, norms = _norm_count(ckpt)
    used = []
    make = search_mod.evaluator_factory
    monkeypatch.setattr(search_mod, "evaluator_factory",
                        lambda cfg, supernet, task, **kw: used.append(cfg.bn_stats) or make(
                            cfg, supernet, task, **kw))
    small = run_search(search_cfg(tmp_path, ckpt, "knapsack", out="small", evaluations=2))
    assert small["norms_trained"] is False and used == ["supernet"]
    assert small["bn_stats"] == "supernet"  # selection.json says what scored it
    assert small["bn_clips"] is None  # no val-batch statistics, no clips of them
    state = load_file(str(Path(small["supernet"]) / "supernet.safetensors"))
    for name, module in norm_modules(base).items():
        for key, t in module.state_dict().items():
            assert torch.equal(state[f"{name}.{key}"], t), f"{name}.{key}"
    # with the norms trained (40%: they fit), stage 1 trains them and scoring is as set
    big = run_search(search_cfg(tmp_path, ckpt, "knapsack", out="big", budget="40%",
                                evaluations=2))
    assert big["norms_trained"] is True and used[-1] == "val" == big["bn_stats"]
    assert big["bn_clips"] == BN_CLIPS
    state = load_file(str(Path(big["supernet"]) / "supernet.safetensors"))
    assert any(not torch.equal(state[f"{name}.{key}"], t)
               for name, module in norm_modules(base).items()
               for key, t in module.state_dict().items())


def test_search_norms_budget_that_cannot_hold_the_norms_is_one_line(tiny, tmp_path, capsys):
    from swr.app.cli import main

    _, ckpt = tiny
    code = main(["search", "--task", "tiny", "--checkpoint", str(ckpt), "--budget", "10%",
                 "--norms", "budget", "--policy", "knapsack", "--out", str(tmp_path / "n"),
                 "--device", "cpu", "--workers", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "883" in err and "2416" in err and "norms=none" in err and "norms=free" in err
    with pytest.raises(SwrError, match="--norms 'some'"):
        run_search(search_cfg(tmp_path, ckpt, "knapsack", norms="some"))


def test_finetune_trains_norms_only_when_the_selection_says_so(tiny, tmp_path):
    import torch
    from safetensors.torch import load_file

    from swr.app.finetune import finetune
    from swr.reparam import norm_modules

    _, ckpt = tiny
    base, norms = _norm_count(ckpt)
    run_search(search_cfg(tmp_path, ckpt, "knapsack", evaluations=4))  # 10%: deltas only
    sel_file = tmp_path / "out" / "selection.json"
    m = finetune(sel_file, tmp_path / "deltas", epochs=1, device="cpu", progress=False)
    assert m["norms_trained"] is False and m["norm_params"] == 0
    assert m["updated_params"] == m["delta_params"] <= m["budget_params"]
    # the task delta carries the base's norms (affines and BatchNorm statistics) unchanged
    delta = load_file(str(tmp_path / "deltas" / "task_delta.safetensors"))
    for name, module in norm_modules(base).items():
        for key, t in module.state_dict().items():
            assert torch.equal(delta[f"norm/{name}.{key}"], t), f"{name}.{key}"
    # a selection file from before --norms: norms trained, as then (outside the budget)
    old = json.loads(sel_file.read_text())
    for key in ("norms", "norms_trained", "norm_params", "delta_budget_params",
                "updated_params"):
        del old[key]
    (tmp_path / "old.json").write_text(json.dumps(old))
    m = finetune(tmp_path / "old.json", tmp_path / "old", epochs=1, device="cpu",
                 progress=False)
    assert m["norms_trained"] is True and m["norms"] == "free" and m["norm_params"] == norms
    assert m["updated_params"] == m["delta_params"] + norms
    delta = load_file(str(tmp_path / "old" / "task_delta.safetensors"))
    assert any(not torch.equal(delta[f"norm/{name}.weight"], module.weight)
               for name, module in norm_modules(base).items() if module.weight is not None)


def test_loglik_reward_is_searched_on_and_both_metrics_are_logged(tiny, tmp_path):
    _, ckpt = tiny
    r = run_search(search_cfg(tmp_path, ckpt, "random", out="ll", evaluations=6, reward="loglik"))
    recs = [json.loads(line) for line in
            (tmp_path / "ll" / "evaluations.jsonl").read_text().splitlines()]
    assert len(recs) == r["evaluations"] and r["val_score"] < 0  # a mean log-probability
    for rec in recs:
        assert rec["score"] == rec["loglik"] and 0.0 <= rec["accuracy"] <= 1.0
    assert r["val_score"] == max(rec["loglik"] for rec in recs)
    fp = json.loads((tmp_path / "ll" / "fingerprint.json").read_text())
    assert fp["reward"] == "loglik"
    with pytest.raises(SwrError, match="--reward"):  # the same folder with another reward
        run_search(search_cfg(tmp_path, ckpt, "random", out="ll", evaluations=6, resume=True,
                              reward="accuracy"))
    with pytest.raises(SwrError, match="--reward 'f1'"):
        run_search(search_cfg(tmp_path, ckpt, "random", out="bad", reward="f1"))


def test_budget_gated_supernet_is_its_own_cache_entry(tiny, tmp_path):
    from swr.supernet import supernet_key

    _, ckpt = tiny
    cfg = search_cfg(tmp_path, ckpt, "knapsack", out="bg", evaluations=4)
    cfg.supernet = SupernetConfig(epochs=1, progress=False, gates="budget")
    r = run_search(cfg)
    plain = run_search(search_cfg(tmp_path, ckpt, "knapsack", out="bn", evaluations=4))
    assert r["supernet"] != plain["supernet"]  # another supernet, trained on budget gate sets
    assert json.loads((tmp_path / "bg" / "fingerprint.json").read_text())["supernet_gates"] == "budget"
    a = SupernetConfig(gates="budget", gate_budget_params=100)
    assert supernet_key(a, "t", "b") != supernet_key(SupernetConfig(gates="budget", gate_budget_params=200), "t", "b")
    # the default gates keep the key they had before the option existed
    import hashlib
    from dataclasses import asdict

    old = {k: v for k, v in asdict(SupernetConfig()).items()
           if k not in ("progress", "log_dir", "gates", "gate_budget_params", "norms")}
    blob = json.dumps({"task": "t", "base": "b", "supernet": old}, sort_keys=True)
    assert supernet_key(SupernetConfig(), "t", "b") == hashlib.sha256(blob.encode()).hexdigest()[:16]
    # (and trained norms too); a stage 1 with the base's norms is another supernet
    assert supernet_key(SupernetConfig(norms=False), "t", "b") != supernet_key(
        SupernetConfig(), "t", "b")
    with pytest.raises(SwrError, match="--supernet-gates"):
        SupernetConfig(gates="coin").validate()


def test_cli_reward_and_supernet_gates(tiny, tmp_path, capsys):
    from swr.app.cli import main

    _, ckpt = tiny
    common = ["search", "--task", "tiny", "--checkpoint", str(ckpt), "--budget", "10%",
              "--policy", "random", "--evaluations", "3", "--workers", "0",
              "--supernet-epochs", "1", "--device", "cpu"]
    assert main([*common, "--reward", "f1", "--out", str(tmp_path / "a")]) == 2
    assert "--reward 'f1'" in capsys.readouterr().err
    assert main([*common, "--supernet-gates", "coin", "--out", str(tmp_path / "b")]) == 2
    assert "--supernet-gates 'coin'" in capsys.readouterr().err
    assert main([*common, "--reward", "loglik", "--supernet-gates", "budget",
                 "--out", str(tmp_path / "c")]) == 0
    fp = json.loads((tmp_path / "c" / "fingerprint.json").read_text())
    assert fp["reward"] == "loglik" and fp["supernet_gates"] == "budget"
    assert fp["bn_clips"] == 32  # the default sample of each validation batch
    assert main([*common, "--bn-clips", "1", "--out", str(tmp_path / "d")]) == 2
    assert "--bn-clips 1 must be at least 2" in capsys.readouterr().err
    assert main([*common, "--bn-clips", "0", "--out", str(tmp_path / "e")]) == 0  # every clip
    assert json.loads((tmp_path / "e" / "fingerprint.json").read_text())["bn_clips"] is None


@pytest.mark.parametrize("norms", ["auto", "none"])
def test_trained_evaluator_scores_what_a_short_final_training_reaches(tiny, tmp_path, norms):
    """--evaluator trained: a selection's score is the validation accuracy a final
    training of --proxy-epochs epochs (seed + 1) reaches from the same supernet."""
    from swr.app.finetune import finetune

    _, ckpt = tiny
    r = run_search(search_cfg(tmp_path, ckpt, "random", out="tr", evaluations=4,
                              evaluator="trained", norms=norms))
    assert r["evaluator"] == "trained" and r["reward"] == "accuracy"
    assert r["bn_stats"] is None and r["bn_clips"] is None  # no scoring statistics to name
    assert r["proxy_epochs"] == PROXY_EPOCHS
    # the proxy is stage 3 started from the supernet, without warm-up, at its own rate
    m = finetune(tmp_path / "tr" / "selection.json", tmp_path / "ft", epochs=PROXY_EPOCHS, seed=1,
                 device="cpu", progress=False, init="supernet", warmup=0.0, lr=3e-3)
    assert m["norms_trained"] == r["norms_trained"]
    assert m["val_acc"] == r["val_score"]
    fp = json.loads((tmp_path / "tr" / "fingerprint.json").read_text())
    assert fp["evaluator"] == "trained" and fp["proxy_epochs"] == PROXY_EPOCHS
    with pytest.raises(SwrError, match="--evaluator"):  # the same folder, another evaluator
        run_search(search_cfg(tmp_path, ckpt, "random", out="tr", evaluations=4, resume=True,
                              norms=norms))


def test_trained_evaluator_leaves_the_supernet_and_random_state_as_they_were(tiny):
    import torch

    from swr.envs.evaluator import TrainedEvaluator
    from swr.reparam import reparam_layers
    from swr.supernet import build_supernet
    from swr.source import load_base, base_spec

    task, ckpt = tiny
    base, _ = load_base(base_spec(str(ckpt)))
    net = build_supernet(base, task.num_classes)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flags = [p.requires_grad for p in net.parameters()]
    names = list(reparam_layers(net))
    ev = TrainedEvaluator(net, task, epochs=1, seed=3, metric="loglik")
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    a = ev.scores(names[:2])
    assert torch.equal(torch.rand(3), expected)  # the global random state is untouched
    assert ev(names[:2]) == a["loglik"] < 0 and 0 <= a["accuracy"] <= 1  # same seed, same score
    assert ev(names[2:4]) != a["loglik"]
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in net.parameters()] == flags
    assert all(layer.gate == 0.0 for layer in reparam_layers(net).values())
