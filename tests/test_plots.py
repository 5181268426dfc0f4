"""Figures: one colour per method everywhere, labelled budgets, honest axes, no backend."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import matplotlib.colors as mcolors

from swr.plots import (method_colour, pareto_figure, robustness_figure, search_figure,
                       selection_map_figure)

ROOT = Path(__file__).resolve().parents[1]


def _row(method, budget, params, acc, std=0.01, shift=None, task="t"):
    return {"task": task, "method": method, "budget": budget, "n": 3, "test_acc": acc,
            "test_std": std, "updated_params": params, "shift_acc": shift}


SUMMARY = [_row("linear", "natural", 0, 0.70, shift=0.6), _row("full", "natural", 1e6, 0.90,
                                                                 shift=0.8),
           _row("lora", "5%", 5e4, 0.85, shift=0.7), _row("swr", "1%", 1e4, 0.88, shift=0.75),
           _row("swr", "5%", 5e4, 0.89, shift=0.77)]


def _same(a, b) -> bool:
    return mcolors.to_hex(a) == mcolors.to_hex(b)


def test_one_colour_per_method_across_figures():
    assert method_colour("swr") == method_colour("swr")
    assert len({method_colour(m) for m in ("swr", "full", "linear", "lora", "norm")}) == 5
    assert method_colour("my-new-method") == method_colour("my-new-method")
    pareto = pareto_figure(SUMMARY).axes[0]
    robust = robustness_figure(SUMMARY, [], {}).axes[0]
    handles, labels = pareto.get_legend_handles_labels()
    for handle, label in zip(handles, labels):
        method = label.split(" ")[0]
        colour = handle.lines[0].get_color() if hasattr(handle, "lines") else handle.get_color()
        assert _same(colour, method_colour(method)), label
    for coll in robust.collections:
        label = coll.get_label()
        if label in {"swr", "full", "lora", "linear"}:
            assert _same(coll.get_facecolor()[0], method_colour(label)), label


def test_pareto_labels_budgets_explains_error_bars_and_draws_linear_honestly():
    fig = pareto_figure(SUMMARY)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    texts = [t.get_text() for t in ax.texts]
    assert {"1%", "5%"} <= set(texts) and "linear: 0 updated" in texts
    assert "natural" not in texts
    assert "standard deviation" in fig.get_supxlabel()
    # the linear probe is a horizontal line at its accuracy, not a point at x = 1
    flat = [ln for ln in ax.lines if list(ln.get_ydata()) == [0.70, 0.70]]
    assert flat and _same(flat[0].get_color(), method_colour("linear"))
    xs = [x for ln in ax.lines if ln not in flat for x in ln.get_xdata()]
    assert xs and min(xs) >= 1e4


def test_selection_map_has_legend_and_layer_costs():
    costs = {"a": 100, "b": 20000, "c": 3}
    fig = selection_map_figure({"de": ["a", "c"], "fr": ["a"]}, ["c", "b", "a"], costs, "map")
    top, grid = fig.axes[:2]
    assert [round(p.get_height()) for p in top.patches] == [3, 100]  # network order, chosen only
    assert top.get_yscale() == "log"
    assert [t.get_text() for t in grid.get_xticklabels()] == ["c", "a"]
    assert [t.get_text() for t in grid.get_yticklabels()] == ["de\n(103 params)",
                                                              "fr\n(100 params)"]
    legend = [t.get_text() for t in grid.get_legend().get_texts()]
    assert legend == ["reparametrized (W + dW)", "frozen"]


def test_search_figure_and_saving(tmp_path):
    from swr.io import save_png

    rows = [{"evaluation": i, "reward": 0.5 + 0.01 * i, "best_so_far": 0.5 + 0.01 * i}
            for i in range(5)]
    save_png(search_figure(rows, "pg"), tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_library_never_sets_the_backend():
    offenders = [str(p.relative_to(ROOT)) for folder in ("swr", "tasks", "envs", "policies")
                 for p in (ROOT / folder).rglob("*.py")
                 if "matplotlib.use(" in p.read_text(encoding="utf-8")]
    assert offenders == []


def test_plots_keep_a_notebooks_backend(tmp_path):
    """A user's backend survives the bench's, demo's and search's plot functions."""
    code = f"""
import sys, matplotlib
matplotlib.use("svg")  # stands for a notebook's inline backend
from swr.app.bench import plot_pareto, plot_robustness
from swr.app.demo import plot_selection_map
from swr.policies.search import plot_search
rows = [dict(task="t", method=m, budget=b, seed=s, test_acc=a + 0.01 * s, shift_acc=a - 0.1,
             updated_params=p, stored_bytes=4 * p, extra_flops=0, foldable=True,
             train_seconds=1.0, settings='{{"selection": ["l1"]}}')
        for m, b, p, a in [("linear", "natural", 0, 0.7), ("swr", "1%", 100, 0.8)]
        for s in range(2)]
out = sys.argv[1]
plot_pareto(out + "/p.png", rows)
plot_robustness(out + "/r.png", rows, [])
assert plot_selection_map(out + "/m.png", rows, ["l0", "l1"], dict(l0=5, l1=7))
plot_search(out + "/s.png", [dict(evaluation=1, reward=0.5, best_so_far=0.5)], "t")
print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["svg", "False"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.png", "p.png", "r.png", "s.png"]
