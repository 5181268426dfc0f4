import csv

import pytest

import swr.policies  # noqa: F401  (registers swr* methods)
import swr.tasks
from swr import demo as demo_mod
from swr.bench import COLUMNS, BenchConfig, run_bench
from swr.cli import main
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
    md = (tmp_path / "b" / "results.md").read_text()
    assert "± " in md and "swr-knapsack" in md
    assert (tmp_path / "b" / "pareto.png").stat().st_size > 1000
    # resume: nothing left to do, the same rows come back
    before = (tmp_path / "b" / "results.csv").read_text()
    again = run_bench(bench_cfg(tiny, tmp_path / "b", resume=True), log=lambda s: None)
    assert len(again) == len(rows)
    assert (tmp_path / "b" / "results.csv").read_text() == before


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
