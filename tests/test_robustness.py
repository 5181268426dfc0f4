"""Ensembles of two runs and WiSE-FT weight interpolation, and their place in the bench."""

import copy
import csv
import json

import pytest
import torch
from safetensors.torch import save_file

import swr.tasks
from swr.app.bench import BenchConfig, run_bench
from swr.errors import SwrError
from swr.methods import get_method, run_method
from swr.robustness import (accuracy, cell_name, ensemble, ensemble_rows, interpolate,
                            load_predictions, predict, save_predictions)
from swr.tasks.backbones import create_backbone
from swr.train import TrainConfig, evaluate, recalibrate_batchnorm

from fixtures import tiny_audio_task, tiny_checkpoint

CFG = TrainConfig(epochs=2, lr=1e-2, batch_size=16, progress=False, device="cpu")


@pytest.fixture(scope="module")
def task():
    return tiny_audio_task(per_class=12)


@pytest.fixture(scope="module")
def two_models(task):
    """Two BC-ResNets with different weights and BatchNorm statistics."""
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = create_backbone("bcresnet-1", num_classes=task.num_classes)
        recalibrate_batchnorm(m, task.train, n_batches=1, batch_size=16)
        models.append(m.eval())
    return models


def test_interpolate_end_points_are_bit_exact_and_middle_is_the_mean(two_models, task):
    a, b = two_models
    a_before = {k: v.clone() for k, v in a.state_dict().items()}
    b.get_submodule(next(n for n, m in b.named_modules()
                         if hasattr(m, "num_batches_tracked"))).num_batches_tracked.fill_(7)
    for alpha, want in ((0.0, a), (1.0, b)):
        mixed = interpolate(a, b, alpha)
        for k, v in mixed.state_dict().items():
            assert torch.equal(v, want.state_dict()[k]), (alpha, k)
    half = interpolate(a, b, 0.5).state_dict()
    for k, v in half.items():
        if v.is_floating_point():
            assert torch.allclose(v, (a.state_dict()[k] + b.state_dict()[k]) / 2, atol=1e-6), k
        else:
            assert torch.equal(v, b.state_dict()[k]), k  # integer buffers from model1
    # the inputs are untouched, and the result is a working model of the same kind
    assert all(torch.equal(v, a_before[k]) for k, v in a.state_dict().items())
    x = next(iter(torch.utils.data.DataLoader(task.test, batch_size=4)))[0]
    assert interpolate(a, b, 0.5)(x).shape == (4, task.num_classes)


def test_interpolate_refuses_bad_weight_and_other_architectures(two_models):
    a, b = two_models
    with pytest.raises(SwrError, match=r"1.5.*\[0, 1\]"):
        interpolate(a, b, 1.5)
    other = create_backbone("bcresnet-2", num_classes=4)
    with pytest.raises(SwrError, match="same architecture"):
        interpolate(a, other, 0.5)


def test_predictions_round_trip_and_match_evaluate(two_models, task, tmp_path):
    model = two_models[0]
    path = tmp_path / "p.safetensors"
    save_predictions(path, model, task)
    preds = load_predictions(path)
    assert set(preds) == {"test", "shift_test"}
    probs, labels = preds["test"]
    assert probs.shape == (len(task.test), task.num_classes)
    assert torch.allclose(probs.sum(-1), torch.ones(len(probs)), atol=1e-5)
    assert accuracy(probs, labels) == evaluate(model, task.test)
    assert torch.equal(probs, predict(model, task.test)[0])
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(SwrError, match="bad.safetensors.*not a predictions file"):
        load_predictions(tmp_path / "bad.safetensors")


def test_ensemble_averages_probabilities():
    labels = torch.tensor([0, 1, 2, 0])
    # a is right on samples 0 and 1 only, confidently; b on 2 and 3 only, confidently;
    # where one is wrong it is unsure, so the average follows the confident member.
    a = torch.tensor([[.9, .05, .05], [.05, .9, .05], [.4, .35, .25], [.25, .4, .35]])
    b = torch.tensor([[.35, .4, .25], [.4, .25, .35], [.05, .05, .9], [.9, .05, .05]])
    assert accuracy(a, labels) == 0.5 and accuracy(b, labels) == 0.5
    acc = ensemble([{"test": (a, labels)}, {"test": (b, labels)}])
    assert acc == {"test": 1.0}
    with pytest.raises(SwrError, match="disagree on the test labels"):
        ensemble([{"test": (a, labels)}, {"test": (b, labels.flip(0))}])
    with pytest.raises(ValueError):
        ensemble([{"test": (a, labels)}])


def test_ensemble_rows_pair_same_seed_and_compatible_budgets(tmp_path):
    labels = torch.tensor([0, 1])
    runs = [("linear", "natural", 0), ("swr", "5%", 0), ("swr", "10%", 0), ("lora", "5%", 0),
            ("swr", "5%", 1)]
    for i, (m, b, s) in enumerate(runs):
        p = torch.full((2, 2), 0.5)
        p[i % 2, 0] = 0.6
        save_file({"test.probs": p, "test.labels": labels},
                  str(tmp_path / f"{cell_name('kws-synth:de', m, b, s)}.safetensors"))
    rows = [{"task": "kws-synth:de", "method": m, "budget": b, "seed": s} for m, b, s in runs]
    rows.append({"task": "kws-synth:de", "method": "full", "budget": "natural", "seed": 0})  # no file
    pairs = {(r["members"], r["budget"], r["seed"]) for r in ensemble_rows(rows, tmp_path)}
    assert pairs == {("linear + swr", "5%", 0), ("linear + swr", "10%", 0),
                     ("linear + lora", "5%", 0), ("lora + swr", "5%", 0)}


def test_wise_ft_curve_end_points_and_choice(task):
    torch.manual_seed(0)
    base = create_backbone("bcresnet-1", num_classes=6)
    method = get_method("wise-ft", alphas=[1.0, 0.0, 0.5])
    torch.manual_seed(0)
    model = method.prepare(copy.deepcopy(base), task, None)
    method.fit(model, task, CFG)
    assert [p["alpha"] for p in method.curve] == [0.0, 0.5, 1.0]
    best = max(method.curve, key=lambda p: p["val_acc"])
    assert method.alpha == best["alpha"]
    assert all(p["shift_acc"] is not None for p in method.curve)
    # the chosen point's accuracy is what the returned model scores
    assert evaluate(model, task.test) == best["test_acc"]
    # alpha = 0 is the linear probe: the backbone is the base's, BatchNorm statistics included
    probe = get_method("wise-ft", alphas=[0.0])
    torch.manual_seed(0)
    m0 = probe.prepare(copy.deepcopy(base), task, None)
    probe.fit(m0, task, CFG)
    head = "head."
    base_state = base.state_dict()
    for k, v in m0.state_dict().items():
        if not k.startswith(head) and k in base_state:
            assert torch.equal(v, base_state[k]), k
    with pytest.raises(SwrError, match="alphas"):
        get_method("wise-ft", alphas=[2.0]).prepare(copy.deepcopy(base), task, None)


def test_run_method_stores_predictions(task, tmp_path):
    torch.manual_seed(0)
    base = create_backbone("bcresnet-1", num_classes=6)
    row = run_method("linear", base, task, None, CFG, predictions=str(tmp_path / "p.safetensors"))
    preds = load_predictions(tmp_path / "p.safetensors")
    assert accuracy(*preds["test"]) == row["test_acc"]
    assert accuracy(*preds["shift_test"]) == row["shift_acc"]


def test_bench_writes_ensembles_and_wise_curve(monkeypatch, tmp_path, task):
    monkeypatch.setattr(swr.tasks, "get_task", lambda spec, **kw: task)
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    cfg = BenchConfig(tasks=["tiny"], checkpoint=str(ckpt), methods=["linear", "norm", "wise-ft"],
                      budgets=["5%"], out=str(tmp_path / "b"), seeds=1, epochs=2, workers=1,
                      device="cpu", progress=False)
    rows = run_bench(cfg, log=lambda s: None)
    out = tmp_path / "b"
    with open(out / "ensembles.csv") as f:
        pairs = list(csv.DictReader(f))
    assert {p["members"] for p in pairs} == {"linear + norm", "linear + wise-ft", "norm + wise-ft"}
    assert all(0 <= float(p["shift_acc"]) <= 1 for p in pairs)
    md = (out / "results.md").read_text()
    assert "Ensembles and robustness" in md and "WiSE-FT on `tiny`" in md
    wise = next(r for r in rows if r["method"] == "wise-ft")
    curve = json.loads(wise["settings"])["curve"]
    assert [p["alpha"] for p in curve] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert (out / "robustness.png").stat().st_size > 1000
