"""``swr bench`` configuration: the cells to run, result columns, default learning rates.

:class:`BenchConfig` is what the CLI validates and passes down; :func:`expand_tasks`
turns suite names into tasks; :func:`method_lr` gives each method's learning rate
(:data:`swr.methods.base.DEFAULT_LR` when neither tuned nor given).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from ...budget import Budget
from ...methods.base import default_lr
from ...tasks.base import DataOverride

COLUMNS = ["task", "method", "budget", "seed", "test_acc", "val_acc", "shift_acc",
           "updated_params", "budget_params", "within_budget", "norm_params", "norms",
           "head_params",
           "stored_bytes", "extra_flops", "foldable", "fold_max_abs_diff", "train_seconds",
           "lr", "settings"]

ENSEMBLE_COLUMNS = ["task", "members", "budget", "seed", "test_acc", "shift_acc",
                    "best_member_test_acc", "best_member_shift_acc"]

#: Methods that ignore the budget: run once per seed at their natural size.
NATURAL = "natural"


def expand_tasks(specs: list[str]) -> list[str]:
    """Suites to their tasks (see :func:`swr.tasks.get_suite`)."""
    from ...tasks.suites import expand_tasks as expand

    return expand(specs)


@dataclass
class BenchConfig:
    tasks: list[str]
    checkpoint: str
    methods: list[str]
    budgets: list[str]
    out: str
    seeds: int = 3
    epochs: int = 10
    lr: Optional[float] = None
    batch_size: int = 64
    device: str = "auto"
    workers: Optional[int] = None
    resume: bool = False
    #: replace the bench an existing ``out`` holds (refused without it or ``resume``)
    overwrite: bool = False
    tune: bool = False
    tune_trials: int = 6
    swr_evaluations: int = 40
    supernet_epochs: int = 8
    progress: bool = True
    method_lr: dict = field(default_factory=dict)
    on_bad_file: str = "fail"
    # the base as a backbone + weights file instead of a swr pretrain checkpoint
    backbone: Optional[str] = None
    weights: Optional[str] = None
    #: a user's image size and normalisation over the base's (--image-size, --mean, --std)
    data_override: Optional[DataOverride] = None


def family_lr(family: str, cfg: BenchConfig, backbone: str = "") -> float:
    """The learning rate of a learning-rate family: ``--lr``, else the default table."""
    return cfg.lr if cfg.lr is not None else default_lr(family, backbone)


def method_lr(method: str, cfg: BenchConfig, backbone: str = "") -> float:
    """The learning rate of ``method``: ``cfg.method_lr``, else ``--lr``, else the default."""
    from ...methods import METHODS

    if method in cfg.method_lr:
        return cfg.method_lr[method]
    factory = METHODS.get(method)
    return family_lr(getattr(factory, "lr_family", "default"), cfg, backbone)


def budget_order(b: str) -> float:
    if b == NATURAL:
        return math.inf
    bud = Budget.parse(b)
    return bud.fraction if bud.fraction is not None else float(bud.params)


