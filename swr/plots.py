"""The figures swr writes, drawn alike: one colour per method in every figure.

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot, so
no backend is chosen or changed (a notebook keeps its inline backend; a server
needs no display). Show one in a notebook by evaluating it, or save it with
``fig.savefig(path)`` / :func:`swr.io.save_png`.

Conventions:

* :func:`method_colour` gives a method the same colour in the Pareto plot, the
  robustness plot and anywhere else; SWR variants are drawn as stars.
* Points of budgeted methods are labelled with their budget (``1%``).
* Error bars are one standard deviation over seeds, and the figure says so.
* A method that updates no backbone parameter (the linear probe) cannot sit on a
  log axis; it is drawn as a dashed horizontal line at its accuracy, labelled
  "0 updated", instead of at a made-up x of 1.
"""

from __future__ import annotations

import zlib
from typing import Iterable, Optional, Sequence

from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Patch

#: Colours of the built-in methods (matplotlib's tab10/tab20 and named greys). The
#: SWR variants share a red family so they read as one method with several selectors.
METHOD_COLOURS = {
    "swr": "#d62728", "swr-knapsack": "#ff7f0e", "swr-greedy": "#e377c2",
    "swr-random": "#8c564b", "swr-ppo": "#bcbd22",
    "full": "#000000", "linear": "#7f7f7f", "wise-ft": "#17becf",
    "norm": "#2ca02c", "bitfit": "#98df8a", "ssf": "#9467bd", "lora": "#1f77b4",
    "adapter-par": "#aec7e8", "adapter-seq": "#6b6ecf", "taps": "#c49c94",
    "two-stage": "#dbdb8d", "vpt-shallow": "#f7b6d2", "vpt-deep": "#c5b0d5",
}
_FALLBACK = ("#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d",
             "#31a354", "#756bb1", "#636363")


def method_colour(method: str) -> str:
    """The colour of ``method`` in every figure (a stable pick for methods added later)."""
    if method in METHOD_COLOURS:
        return METHOD_COLOURS[method]
    return _FALLBACK[zlib.crc32(method.encode()) % len(_FALLBACK)]


def method_marker(method: str) -> str:
    """Stars for SWR (with any searcher), circles for the baselines."""
    from .methods import METHODS, SWR

    factory = METHODS.get(method)
    return "*" if isinstance(factory, type) and issubclass(factory, SWR) else "o"


def _axes_row(n: int, width: float, height: float) -> tuple[Figure, list]:
    fig = Figure(figsize=(width * n, height), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    return fig, list(axes)


def _caption(fig: Figure, text: str) -> None:
    """A line under the panels saying how to read them."""
    fig.supxlabel(text, fontsize=7, color="0.3", wrap=True)


def pareto_figure(summary: Sequence[dict], title: str = "",
                  best: Sequence[tuple[int, str]] = ()) -> Figure:
    """Test accuracy against updated backbone parameters (log), one panel per task.

    ``summary``: rows with ``task, method, budget, n, test_acc, test_std,
    updated_params`` (what :func:`swr.app.bench.summarize` returns). ``best``: per budget,
    ``(trained parameters, method)`` of the best method at or below it (over all
    tasks), drawn as a dotted line and named in the caption.
    """
    tasks = sorted({s["task"] for s in summary})
    fig, axes = _axes_row(max(1, len(tasks)), 6.2, 4.6)
    seeds = sorted({int(s["n"]) for s in summary}) or [1]
    for ax, task in zip(axes, tasks):
        mine = [s for s in summary if s["task"] == task]
        methods = sorted({s["method"] for s in mine})
        for method in methods:
            pts = sorted((s for s in mine if s["method"] == method),
                         key=lambda s: float(s["updated_params"]))
            colour, marker = method_colour(method), method_marker(method)
            zero = [s for s in pts if float(s["updated_params"]) <= 0]
            for s in zero:  # nothing updated in the backbone: no x on a log axis
                ax.axhline(s["test_acc"], color=colour, ls="--", lw=1.2)
                ax.axhspan(s["test_acc"] - s["test_std"], s["test_acc"] + s["test_std"],
                           color=colour, alpha=0.12, lw=0)
                ax.annotate(f"{method}: 0 updated", (0.01, s["test_acc"]),
                            xycoords=("axes fraction", "data"), fontsize=7, color=colour,
                            va="bottom")
            pts = [s for s in pts if float(s["updated_params"]) > 0]
            if zero and not pts:
                ax.plot([], [], color=colour, ls="--", label=f"{method} (0 updated)")
                continue
            xs = [float(s["updated_params"]) for s in pts]
            ys = [s["test_acc"] for s in pts]
            ax.errorbar(xs, ys, yerr=[s["test_std"] for s in pts], marker=marker,
                        ms=11 if marker == "*" else 5, capsize=2, color=colour, label=method,
                        lw=1.2)
            for s, x, y in zip(pts, xs, ys):
                if s["budget"] != "natural":
                    ax.annotate(str(s["budget"]), (x, y), textcoords="offset points",
                                xytext=(4, 4), fontsize=7, color=colour)
        for limit, _ in best:
            ax.axvline(limit, color="0.5", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("trained parameters, excl. head (log scale)")
        ax.set_ylabel("test accuracy")
        ax.set_title(title or task, fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="best")
    seeds_text = "/".join(str(n) for n in seeds)
    _caption(fig, f"Mean over seeds (n={seeds_text}); error bars and bands: ±1 standard "
                  "deviation over seeds. Labels: the budget of budgeted methods. Methods that "
                  "update no backbone parameter are dashed lines."
             + "".join(f" Best at <= {limit:,} trained parameters (dotted), over all tasks: "
                       f"{method}." for limit, method in best))
    return fig


def robustness_figure(summary: Sequence[dict], ensembles: Sequence[dict],
                      curves: dict[str, list[dict]]) -> Optional[Figure]:
    """Shifted-split against test accuracy: each method, the WiSE-FT line, the ensembles.

    ``summary`` as for :func:`pareto_figure` plus ``shift_acc``; ``ensembles``:
    rows with ``task, test_acc, shift_acc``; ``curves``: per task the WiSE-FT points
    (``alpha, test_acc, shift_acc``). None when no method has a shifted split.
    """
    summary = [s for s in summary if s.get("shift_acc") is not None]
    tasks = sorted({s["task"] for s in summary})
    if not tasks:
        return None
    fig, axes = _axes_row(len(tasks), 6.2, 4.8)
    for ax, task in zip(axes, tasks):
        for method in sorted({s["method"] for s in summary if s["task"] == task}):
            pts = [s for s in summary if s["task"] == task and s["method"] == method]
            marker = method_marker(method)
            ax.scatter([s["test_acc"] for s in pts], [s["shift_acc"] for s in pts],
                       marker=marker, s=90 if marker == "*" else 30, label=method,
                       color=method_colour(method), zorder=3)
            for s in pts:
                if s["budget"] != "natural":
                    ax.annotate(str(s["budget"]), (s["test_acc"], s["shift_acc"]),
                                textcoords="offset points", xytext=(4, 3), fontsize=6,
                                color=method_colour(method))
        curve = [p for p in curves.get(task, []) if p.get("shift_acc") is not None]
        if curve:
            ax.plot([p["test_acc"] for p in curve], [p["shift_acc"] for p in curve], "-",
                    color=method_colour("wise-ft"), lw=1, label="WiSE-FT, alpha 0 to 1",
                    zorder=2)
            for p in curve:
                ax.annotate(f"{p['alpha']:g}", (p["test_acc"], p["shift_acc"]), fontsize=6)
        mine = [e for e in ensembles if e["task"] == task and e.get("shift_acc") is not None]
        if mine:
            ax.scatter([e["test_acc"] for e in mine], [e["shift_acc"] for e in mine],
                       marker="x", s=16, color="black", alpha=0.35, label="ensembles of two",
                       zorder=1)
        ax.set_xlabel("test accuracy")
        ax.set_ylabel("shift_test accuracy")
        ax.set_title(task, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    _caption(fig, "Means over seeds. Labels: budgets; small numbers on the WiSE-FT line: its "
                  "mixing weight alpha.")
    return fig


def search_figure(rows: Sequence[dict], title: str) -> Figure:
    """Reward of every scored selection and the best so far, over evaluations."""
    fig = Figure(figsize=(6.2, 3.6), layout="constrained")
    ax = fig.subplots()
    if rows:
        x = [r["evaluation"] for r in rows]
        ax.scatter(x, [r["reward"] for r in rows], s=8, alpha=0.5, color="0.45",
                   label="reward of a selection")
        ax.plot(x, [r["best_so_far"] for r in rows], color=method_colour("swr"),
                label="best so far")
    ax.set_xlabel("evaluation")
    ax.set_ylabel("validation score")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def selection_map_figure(picks: dict[str, Iterable[str]], layer_names: Sequence[str],
                         costs: dict[str, int], title: str) -> Figure:
    """Which layers each task reparametrized, with every layer's parameter cost.

    Top: the cost of each layer (log bars); bottom: a task x layer grid, filled where
    the task's selection reparametrized the layer, with each row's total cost. Only
    layers some task chose are shown, in network order.
    """
    import numpy as np

    chosen = {task: set(sel) for task, sel in picks.items()}
    used = set().union(*chosen.values()) if chosen else set()
    layers = [n for n in layer_names if n in used]
    fig = Figure(figsize=(max(6.5, 0.24 * len(layers) + 2.5), 0.55 * len(chosen) + 3.6),
                 layout="constrained")
    top, grid_ax = fig.subplots(2, 1, sharex=True,
                                gridspec_kw={"height_ratios": [1, max(1, len(chosen)) * 0.5]})
    x = np.arange(len(layers))
    top.bar(x, [max(costs.get(n, 0), 1) for n in layers], color="0.55", width=0.8)
    top.set_yscale("log")
    top.set_ylabel("params\n(log)", fontsize=7)
    top.set_title(title, fontsize=9)
    top.grid(alpha=0.3, axis="y")
    grid = np.array([[1.0 if n in chosen[t] else 0.0 for n in layers] for t in chosen])
    cmap, vmax = colormaps["Greens"], 1.25  # a chosen cell: a mid green, not near-black
    grid_ax.imshow(grid if grid.size else np.zeros((1, 1)), aspect="auto", cmap=cmap,
                   vmin=0, vmax=vmax, interpolation="nearest")
    totals = [sum(costs.get(n, 0) for n in chosen[t]) for t in chosen]
    grid_ax.set_yticks(range(len(chosen)),
                       [f"{t}\n({c:,} params)" for t, c in zip(chosen, totals)], fontsize=7)
    grid_ax.set_xticks(x, layers, rotation=90, fontsize=6)
    grid_ax.set_xlabel("candidate layer (network order; only layers some task chose)",
                       fontsize=7)
    grid_ax.legend(handles=[Patch(color=cmap(1 / vmax), label="reparametrized (W + dW)"),
                            Patch(facecolor=cmap(0.0), edgecolor="0.6", label="frozen")],
                   loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    return fig


def confusion_figure(matrix: Sequence[Sequence[int]], classes: Sequence[str],
                     title: str = "") -> Figure:
    """A confusion matrix (rows: true class, columns: predicted), counts in the cells,
    each row shaded by its share so small classes read as clearly as large ones."""
    n = len(classes)
    size = min(12.0, 2.5 + 0.45 * n)
    fig = Figure(figsize=(size, size), layout="constrained")
    ax = fig.subplots()
    shares = [[c / max(1, sum(row)) for c in row] for row in matrix]
    ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), [str(c) for c in classes], rotation=90, fontsize=7)
    ax.set_yticks(range(n), [str(c) for c in classes], fontsize=7)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= 30:
        for i, row in enumerate(matrix):
            for j, c in enumerate(row):
                if c:
                    ax.text(j, i, str(c), ha="center", va="center", fontsize=6,
                            color="white" if shares[i][j] > 0.5 else "black")
    ax.set_title(title, fontsize=9)
    return fig
