"""``swr bench`` plots: ``pareto.png`` and ``robustness.png`` (figures from :mod:`swr.plots`)."""

from __future__ import annotations

from pathlib import Path

from ...io import save_png
from ...plots import pareto_figure, robustness_figure
from .report import budget_groups, summarize, summarize_ensembles, wise_curves


def plot_pareto(path: Path, rows: list[dict], title: str = "") -> None:
    """``pareto.png``: test accuracy against updated parameters, with the best method at
    or below each budget (:func:`~swr.app.bench.report.budget_groups`)."""
    best = [(g["limit"], g["best"]) for g in budget_groups(rows) if g["limit"] is not None]
    save_png(pareto_figure(summarize(rows), title, best), path)


def plot_robustness(path: Path, rows: list[dict], pairs: list[dict]) -> None:
    """Shift accuracy against test accuracy: methods, the WiSE-FT line, ensembles."""
    fig = robustness_figure(summarize(rows), summarize_ensembles(pairs), wise_curves(rows))
    if fig is not None:
        save_png(fig, path)
