"""``swr bench``: every method at every budget it supports, same data, epochs and seeds.

* :mod:`.config`: :class:`BenchConfig`, suites, result columns, learning rates per method;
* :mod:`.run`: one job (:func:`run_job`), the plan, and :func:`run_bench` (in this
  process or as Ray tasks, resumable);
* :mod:`.report`: summaries and ``results.md``; :mod:`.plots`: ``pareto.png``,
  ``robustness.png``.
"""

from .config import (COLUMNS, ENSEMBLE_COLUMNS, NATURAL, BenchConfig, expand_tasks,
                     family_lr, method_lr)
from .plots import plot_pareto, plot_robustness
from .report import results_markdown, robustness_markdown, summarize, summarize_ensembles
from .run import configure_method, finetune_method, plan, run_bench, run_job

__all__ = ["COLUMNS", "ENSEMBLE_COLUMNS", "NATURAL", "BenchConfig", "expand_tasks",
           "configure_method", "family_lr", "finetune_method", "method_lr", "plan", "plot_pareto", "plot_robustness",
           "results_markdown", "robustness_markdown", "run_bench", "run_job", "summarize",
           "summarize_ensembles"]
