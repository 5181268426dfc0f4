import ast
import csv
import json

import pytest

import swr.app.bench  # noqa: F401  (loads the searchers, each registering SWR with it: swr-<searcher>)
import swr.tasks
from swr.app import demo as demo_mod
from swr.app.bench import COLUMNS, BenchConfig, run_bench
from swr.app.cli import main
from swr.errors import SwrError

from fixtures import tiny_audio_task, tiny_checkpoint


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    task = tiny_audio_task()
    monkeypatch.setattr(swr.tasks, "get_task", lambda spec, **kw: task)
    return tiny_checkpoint(tmp_path / "ckpt")


def bench_cfg(ckpt, out, **kw):
    return BenchConfig(tasks=["tiny"], checkpoint=str(ckpt), methods=["linear", "norm", "swr-knapsack"],
                       budgets=["5%", "10%"], out=str(out), seeds=2, epochs=1, workers=1,
                       device="cpu", swr_evaluations=4, supernet_epochs=1, progress=False, **kw)


def test_bench_outputs_and_resume(tiny, tmp_path):
    rows = run_bench(bench_cfg(tiny, tmp_path / "b"), log=lambda s: None)
    # linear and norm ignore the budget: one 'natural' run per seed; swr at both budgets
    assert len(rows) == 2 + 2 + 2 * 2
    with open(tmp_path / "b" / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == COLUMNS
    swr_rows = [r for r in table if r["method"] == "swr-knapsack"]
    assert all(int(r["updated_params"]) <= int(r["budget_params"]) for r in swr_rows)
    assert all(r["foldable"] == "True" for r in swr_rows)
    assert all(float(r["fold_max_abs_diff"]) <= 1e-5 for r in swr_rows)
    # at 5% and 10% the task norms (2416 parameters) do not fit: SWR trains deltas only
    assert {r["norms"] for r in swr_rows} == {"auto:none"}
    assert {r["norms"] for r in table if r["method"] != "swr-knapsack"} == {"-"}
    md = (tmp_path / "b" / "results.md").read_text()
    assert "± " in md and "swr-knapsack" in md
    assert "| trained params (excl. head) | norms |" in md and "| auto:none |" in md
    assert (tmp_path / "b" / "pareto.png").stat().st_size > 1000
    # resume: nothing left to do, the same rows come back
    before = (tmp_path / "b" / "results.csv").read_text()
    again = run_bench(bench_cfg(tiny, tmp_path / "b", resume=True), log=lambda s: None)
    assert len(again) == len(rows)
    assert (tmp_path / "b" / "results.csv").read_text() == before


def test_bench_rows_count_norms_alike_and_swr_deltas_trains_none(tiny, tmp_path):
    """norm, swr and swr-deltas at a budget the task norms fit in: the norm baseline and SWR
    report the same norm parameters among their trained ones; swr-deltas none of them."""
    cfg = bench_cfg(tiny, tmp_path / "d")
    cfg.methods, cfg.budgets, cfg.seeds = ["norm", "swr-knapsack", "swr-deltas"], ["40%"], 1
    rows = {r["method"]: r for r in run_bench(cfg, log=lambda s: None)}
    norms = int(rows["norm"]["updated_params"])
    swr, deltas = rows["swr-knapsack"], rows["swr-deltas"]
    assert swr["norms"] == "auto" and int(swr["norm_params"]) == norms
    assert norms < int(swr["updated_params"]) <= int(swr["budget_params"])
    assert deltas["norms"] == "none" and int(deltas["norm_params"]) == 0
    assert 0 < int(deltas["updated_params"]) <= int(deltas["budget_params"])
    assert rows["norm"]["norms"] == "-"


def test_bench_rejects_unknown_method_and_budget(tiny, tmp_path, capsys):
    cfg = bench_cfg(tiny, tmp_path / "x")
    cfg.methods = ["linear", "magic"]
    with pytest.raises(SwrError, match="magic.*known"):
        run_bench(cfg, log=lambda s: None)
    code = main(["bench", "--task", "tiny", "--checkpoint", str(tiny), "--methods", "linear",
                 "--budgets", "150%", "--out", str(tmp_path / "y")])
    assert code == 2 and "150%" in capsys.readouterr().err


def test_demo_writes_report_with_selection_map(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(demo_mod, "default_checkpoint", lambda suite, quick=False: tiny)
    monkeypatch.setitem(demo_mod.SUITES, "kws", (["tiny"], ["linear", "swr"]))
    monkeypatch.setattr(demo_mod, "QUICK_METHODS", ["linear", "swr"])
    summary = demo_mod.run_demo(tmp_path / "demo", quick=True, workers=1, device="cpu",
                                log=lambda s: None)
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "selection_map.png" in report and "| tiny | swr |" in report
    assert (tmp_path / "demo" / "selection_map.png").stat().st_size > 1000
    assert {r["method"] for r in summary["rows"]} == {"linear", "swr"}


def test_bench_skips_budgets_a_method_cannot_meet(tiny, tmp_path):
    cfg = bench_cfg(tiny, tmp_path / "s")
    cfg.methods, cfg.budgets, cfg.seeds = ["lora", "linear"], ["0.1%", "50%"], 1
    notes = []
    rows = run_bench(cfg, log=notes.append)
    assert {(r["method"], r["budget"]) for r in rows} == {("lora", "50%"), ("linear", "natural")}
    assert any("lora at 0.1%" in n and "not run" in n for n in notes)
    assert "cannot fit a budget" in (tmp_path / "s" / "results.md").read_text()


def _imagefolder(root, classes=("a", "b", "c"), n_train=6, n_test=2):
    """Solid-colour images per class: learnable in one epoch, loadable in any process."""
    import numpy as np
    from PIL import Image

    for split, n in (("train", n_train), ("test", n_test)):
        for ci, c in enumerate(classes):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for k in range(n):
                img = np.zeros((32, 32, 3), np.uint8)
                img[..., ci] = 120 + 10 * k
                Image.fromarray(img).save(root / split / c / f"{k}.png")
    return root


@pytest.mark.ray
def test_bench_tune_picks_lr_and_knob_on_validation_then_runs_seeds(tmp_path):
    """--tune: Ray Tune trials choose each method's lr (and LoRA's rank); the final runs use them."""
    import ray

    from swr.policies.ray_setup import shutdown_ray
    from swr.methods import METHODS

    data = _imagefolder(tmp_path / "img")
    ckpt = tiny_checkpoint(tmp_path / "ckpt", backbone="timm:resnet10t", n_classes=3)
    cfg = BenchConfig(tasks=[f"imagefolder:{data}"], checkpoint=str(ckpt),
                      methods=["linear", "lora"], budgets=["50%"], out=str(tmp_path / "t"),
                      seeds=1, epochs=1, workers=1, device="cpu", progress=False, tune=True,
                      tune_trials=2, batch_size=8)
    notes = []
    try:
        rows = run_bench(cfg, log=notes.append)
    finally:
        if ray.is_initialized():
            shutdown_ray()
    tuned = {}
    for n in notes:  # "tune lora @ 50% on imagefolder:...: lr 0.0031 {'rank': 2} -> val 0.5"
        if n.startswith("tune "):
            lr_part = n.split(": lr ")[1].split(" -> val")[0]
            lr, knobs = lr_part.split(" ", 1)
            tuned[n.split()[1]] = (float(lr), ast.literal_eval(knobs))
    assert set(tuned) == {"linear", "lora"}, notes
    for r in rows:
        lr = float(r["lr"])
        assert 3e-4 <= lr <= 1e-1
        assert f"{lr:.2g}" == f"{tuned[r['method']][0]:.2g}"  # the final run used the tuned lr
    lora = next(r for r in rows if r["method"] == "lora")
    knobs = tuned["lora"][1]
    assert set(knobs) <= set(METHODS["lora"].tunables)
    if knobs:  # a rank was tried and won; None (the largest rank that fits) leaves it out
        assert json.loads(lora["settings"])["rank"] == knobs["rank"]
    trials = list((tmp_path / "t" / "tune").glob("tune-*"))
    assert len(trials) == 2  # one Ray Tune experiment per (method, budget)


def test_default_learning_rates_follow_the_backbone_family_and_yield_to_the_user(tiny, tmp_path):
    from swr.app.bench import method_lr

    cfg = bench_cfg(tiny, tmp_path)
    assert method_lr("full", cfg, "timm:resnet18") == 1e-3
    assert method_lr("swr", cfg, "timm:resnet18") == 5e-3
    assert method_lr("full", cfg, "bcresnet-2") == 2e-2
    assert method_lr("norm", cfg, "bcresnet-2") == 5e-2
    cfg.lr = 1e-4  # --lr: every method
    assert method_lr("norm", cfg, "bcresnet-2") == 1e-4
    cfg.method_lr = {"norm": 3e-3}  # one method, from code
    assert method_lr("norm", cfg, "bcresnet-2") == 3e-3 and method_lr("full", cfg) == 1e-4
