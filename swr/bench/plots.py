"""``swr bench`` plots: ``pareto.png`` and ``robustness.png``.

Figures are drawn on :class:`matplotlib.figure.Figure` (no pyplot), so plotting
leaves the caller's matplotlib backend alone (notebook plots keep working).
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from ..io import save_png
from .report import summarize, summarize_ensembles, wise_curves

def _is_swr(method: str) -> bool:
    """Whether ``method`` is SWR (with any searcher): the plots highlight it."""
    from ..methods import METHODS, SWR

    factory = METHODS.get(method)
    return isinstance(factory, type) and issubclass(factory, SWR)


def plot_pareto(path: Path, rows: list[dict], title: str = "") -> None:
    summary = summarize(rows)
    tasks = sorted({s["task"] for s in summary})
    fig = Figure(figsize=(6 * len(tasks), 4.2))
    axes = fig.subplots(1, len(tasks), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        methods = sorted({s["method"] for s in summary if s["task"] == task})
        for i, method in enumerate(methods):
            pts = sorted((max(s["updated_params"], 1), s["test_acc"], s["test_std"])
                         for s in summary if s["task"] == task and s["method"] == method)
            xs, ys, es = zip(*pts)
            marker = "*" if _is_swr(method) else "o"
            ax.errorbar(xs, ys, yerr=es, marker=marker, ms=10 if marker == "*" else 5,
                        capsize=2, label=method, color=f"C{i % 10}")
        ax.set_xscale("log")
        ax.set_xlabel("updated backbone parameters (log)")
        ax.set_ylabel("test accuracy")
        ax.set_title(title or task, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_png(fig, path)


def plot_robustness(path: Path, rows: list[dict], pairs: list[dict]) -> None:
    """Shift accuracy against test accuracy: methods, the WiSE-FT line, ensembles."""
    summary = [s for s in summarize(rows) if s["shift_acc"] is not None]
    ens = [s for s in summarize_ensembles(pairs) if s["shift_acc"] is not None]
    curves = wise_curves(rows)
    tasks = sorted({s["task"] for s in summary})
    if not tasks:
        return
    fig = Figure(figsize=(6 * len(tasks), 4.6))
    axes = fig.subplots(1, len(tasks), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        methods = sorted({s["method"] for s in summary if s["task"] == task})
        for i, method in enumerate(methods):
            pts = [(s["test_acc"], s["shift_acc"]) for s in summary
                   if s["task"] == task and s["method"] == method]
            marker = "*" if _is_swr(method) else "o"
            ax.scatter(*zip(*pts), marker=marker, s=90 if marker == "*" else 30,
                       label=method, color=f"C{i % 10}", zorder=3)
        curve = [p for p in curves.get(task, []) if p["shift_acc"] is not None]
        if curve:
            ax.plot([p["test_acc"] for p in curve], [p["shift_acc"] for p in curve], "-",
                    color="0.4", lw=1, label="WiSE-FT (alpha 0 to 1)", zorder=2)
            for p in curve:
                ax.annotate(f"{p['alpha']:g}", (p["test_acc"], p["shift_acc"]), fontsize=6)
        mine = [s for s in ens if s["task"] == task]
        if mine:
            ax.scatter([s["test_acc"] for s in mine], [s["shift_acc"] for s in mine], marker="x",
                       s=16, color="black", alpha=0.35, label="ensembles of two", zorder=1)
        ax.set_xlabel("test accuracy")
        ax.set_ylabel("shift_test accuracy")
        ax.set_title(task, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_png(fig, path)
