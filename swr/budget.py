"""Budget accounting: how many parameters a task may update.

The budget bounds the parameters a task trains outside the head: for SWR the
deltas of the gated layers and, by default, the task norms it trains beside them
(:func:`split_budget` says how a budget is shared between the two). The head is
never counted: every method trains a new one, so counting it would only shift all
methods alike (``cost_report`` still reports it, and counts it when asked).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .errors import BudgetError, SwrError
from .layers import ReparamLayer
from .reparam import candidates, head_names, head_parameters, norm_parameters, reparam_layers


@dataclass(frozen=True)
class Budget:
    """A parameter budget: a ``fraction`` of the backbone's parameters or absolute ``params``."""

    fraction: float | None = None
    params: int | None = None

    def __post_init__(self):
        if (self.fraction is None) == (self.params is None):
            raise SwrError("a budget is either a fraction or a parameter count, not both")
        if self.fraction is not None:
            if not (math.isfinite(self.fraction) and 0 < self.fraction <= 1):
                raise BudgetError(f"budget fraction {self.fraction:g} must be in (0, 1] "
                                  "(e.g. 0.05 or 5%)")
        elif self.params <= 0:
            raise BudgetError(f"budget of {self.params} parameters must be positive")

    @classmethod
    def parse(cls, text: str | float | int) -> "Budget":
        """``"0.05"``, ``"5%"`` -> fractions; ``"20000"``, ``"20k"``, ``"1.5M"`` -> counts."""
        if isinstance(text, Budget):
            return text
        if isinstance(text, bool):
            raise BudgetError(f"budget {text!r} is not a number")
        if isinstance(text, int):
            return cls(params=text)
        if isinstance(text, float):
            return cls(fraction=text)
        s = str(text).strip().lower().replace("_", "")
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*(%|k|m)?", s)
        if not m:
            raise BudgetError(f"cannot read budget {text!r}: give a fraction (0.05), a "
                              "percentage (5%) or a parameter count (20000, 20k, 1.5M)")
        value, unit = float(m.group(1)), m.group(2)
        scaled = value * {"k": 1e3, "m": 1e6}.get(unit or "", 1.0)
        if not math.isfinite(scaled):  # 400 digits, or 1e309: no budget is that large
            shown = s if len(s) <= 24 else f"{s[:12]}...{s[-8:]} ({len(s)} characters)"
            raise BudgetError(f"budget {shown!r} is too large to be a number of parameters; "
                              "give a fraction (0.05), a percentage (5%) or a parameter count "
                              "(20000, 20k, 1.5M)")
        if unit == "%":
            if value > 100:
                raise BudgetError(f"budget {text!r} is above 100%")
            return cls(fraction=value / 100)
        if unit in ("k", "m"):
            return cls(params=int(round(value * (1e3 if unit == "k" else 1e6))))
        if "." in m.group(1) or "e" in m.group(1):
            if value > 1:
                raise BudgetError(f"budget fraction {text!r} is above 1 (100%); "
                                  "write a parameter count without a decimal point")
            return cls(fraction=value)
        return cls(params=int(value))

    def resolve(self, total_params: int) -> int:
        """The budget in parameters for a backbone of ``total_params`` parameters."""
        if self.params is not None:
            if self.params > total_params:
                raise BudgetError(f"budget of {self.params} parameters is above the "
                                  f"backbone's {total_params} (100%)")
            return self.params
        return int(math.floor(self.fraction * total_params))

    def __str__(self) -> str:
        return f"{self.fraction:.4g}" if self.fraction is not None else str(self.params)


#: Bytes per unit of a training-memory size (``500KB``, ``2MiB``): decimal and binary.
MEMORY_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9,
                "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclass(frozen=True)
class MemoryBudget:
    """A training-memory budget (``swr search --train-memory``): a ``fraction`` of full
    fine-tuning's saved bytes, or a size in ``bytes``. What it bounds is the bytes one
    training step saves for backward (:func:`swr.memory.saved_bytes`); the trained
    parameters' own state is bounded by the parameter budget already."""

    fraction: float | None = None
    bytes: int | None = None

    def __post_init__(self):
        if (self.fraction is None) == (self.bytes is None):
            raise SwrError("a memory budget is either a fraction or a size, not both")
        if self.fraction is not None and not (math.isfinite(self.fraction)
                                              and 0 < self.fraction <= 1):
            raise BudgetError(f"--train-memory {self.fraction:.4g} of full fine-tuning must be "
                              "in (0%, 100%]")
        if self.bytes is not None and self.bytes <= 0:
            raise BudgetError(f"--train-memory of {self.bytes} bytes must be positive")

    @classmethod
    def parse(cls, text: "str | MemoryBudget") -> "MemoryBudget":
        """``"30%"`` -> a fraction of full fine-tuning; ``"2MiB"``, ``"500KB"``, ``"1.5GB"``,
        ``"123456"`` (bytes) -> a size."""
        if isinstance(text, MemoryBudget):
            return text
        s = str(text).strip().lower().replace("_", "")
        m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(%|b|kb|mb|gb|kib|mib|gib)?", s)
        if not m:
            raise BudgetError(f"cannot read --train-memory {text!r}: give a percentage of full "
                              "fine-tuning's saved bytes (30%) or a size (2MiB, 500KB, 123456)")
        value, unit = float(m.group(1)), m.group(2) or ""
        if unit == "%":
            if not 0 < value <= 100:
                raise BudgetError(f"--train-memory {text!r} must be in (0%, 100%]")
            return cls(fraction=value / 100)
        size = value * MEMORY_UNITS[unit]
        if not math.isfinite(size) or size > 2**63:
            raise BudgetError(f"--train-memory {text!r} is too large to be a size")
        if unit in ("", "b") and "." in m.group(1):
            raise BudgetError(f"--train-memory {text!r}: a number of bytes is whole; for a "
                              "share of full fine-tuning write a percentage (30%)")
        return cls(bytes=int(round(size)))

    def resolve(self, full_bytes: int) -> int:
        """The budget in bytes, against full fine-tuning's ``full_bytes``."""
        if self.bytes is not None:
            return self.bytes
        return int(math.floor(self.fraction * full_bytes))

    def __str__(self) -> str:
        return f"{100 * self.fraction:.4g}%" if self.fraction is not None else f"{self.bytes}B"


#: How SWR's task norms relate to the budget (``swr search --norms``, SWR's ``norms`` knob):
#: ``auto`` trains and counts them when they fit, else trains deltas only; ``budget``
#: trains and counts them or refuses; ``none`` trains deltas only; ``free`` trains them
#: without counting them (the accounting before norms were counted).
NORM_MODES = ("auto", "budget", "none", "free")


def split_budget(budget_params: int, norm_params: int, mode: str = "auto",
                 min_delta: int = 1) -> tuple[int, bool, bool]:
    """Share ``budget_params`` between task norms and deltas under norm ``mode``.

    Returns ``(delta_budget, norms_trained, norms_counted)``: the budget left to the
    deltas (what a searcher is handed) and whether the ``norm_params`` task norm
    parameters train and count against the budget. Norms "fit" when at least
    ``min_delta`` parameters (the cheapest layer's delta) remain for the deltas beside
    them. ``auto`` without such room trains deltas only; ``budget`` raises
    :class:`BudgetError` naming the budget and the norm count.
    """
    if mode not in NORM_MODES:
        raise SwrError(f"norms mode {mode!r} is not one of {', '.join(NORM_MODES)}")
    if mode == "none":
        return budget_params, False, False
    if mode == "free":
        return budget_params, True, False
    if budget_params - norm_params >= min_delta:
        return budget_params - norm_params, True, True
    if mode == "auto":
        return budget_params, False, False
    raise BudgetError(f"budget of {budget_params} parameters cannot hold the {norm_params} task "
                      f"norm parameters and a delta of at least {min_delta}; raise the budget, or "
                      "use norms=none (deltas only) or norms=free (norms not counted)")


def backbone_params(model: nn.Module) -> int:
    """Parameters of the base backbone: everything but the head and the deltas."""
    skip = head_names(model)
    total = 0
    for name, m in model.named_modules():
        if name in skip:
            continue
        for pname, p in m.named_parameters(recurse=False):
            if isinstance(m, ReparamLayer) and pname in ("delta", "delta_bias"):
                continue
            total += p.numel()
    return total


def selection_cost(model: nn.Module, selection: Iterable[str]) -> int:
    """Sum of delta sizes over the selected layers."""
    costs = {c.name: c.params for c in candidates(model)}
    chosen = list(selection)
    unknown = [n for n in chosen if n not in costs]
    if unknown:
        raise SwrError(f"selection names unknown layer(s) {unknown[:5]}")
    return sum(costs[n] for n in set(chosen))


def resolve_budget(model: nn.Module, budget: Budget | str | float | int) -> int:
    """Resolve ``budget`` against ``model``; refuse one no single layer fits in."""
    budget = Budget.parse(budget)
    params = budget.resolve(backbone_params(model))
    costs = [c.params for c in candidates(model)]
    if costs and params < min(costs):
        raise BudgetError(f"budget {budget} = {params} parameters is below the cheapest "
                          f"layer ({min(costs)} parameters); raise it")
    return params


def check_selection(model: nn.Module, selection: Iterable[str], budget_params: int) -> int:
    """Return the selection's cost; raise :class:`BudgetError` if it exceeds the budget."""
    cost = selection_cost(model, selection)
    if cost > budget_params:
        raise BudgetError(f"selection costs {cost} parameters, over the budget of "
                          f"{budget_params}; drop layers from the selection, or run swr "
                          "search again with a larger --budget")
    return cost


class Filling:
    """A selection filled layer by layer: what is left of its parameter budget and, under
    a training-memory limit (a :class:`swr.memory.MemoryLimit`), the segments it already
    saves (``covered``: from the limit's start unless given). The one bookkeeping of every
    fill within both budgets (random selections, greedy, pg's completions)."""

    def __init__(self, costs: Sequence, left, memory=None, covered=None):
        self.costs, self.left, self.memory = costs, left, memory
        self.covered = None if memory is None else (
            memory.cost.start() if covered is None else covered)

    def fits(self, i: int) -> bool:
        """Whether layer ``i`` still fits both budgets."""
        return self.costs[i] <= self.left and (self.memory is None
                                               or self.memory.fits_adding(self.covered, i))

    def add(self, i: int) -> None:
        """Count layer ``i`` in."""
        self.left -= self.costs[i]
        if self.memory is not None:
            self.covered = self.covered | self.memory.cost.member[i]


def random_feasible_gates(costs: Sequence[int], budget_params: int,
                          generator: torch.Generator, memory=None) -> list[bool]:
    """A random selection within ``budget_params``: layers in random order, each kept
    with a per-selection probability drawn from [0.2, 1) while it fits, so both sparse
    and budget-filling selections occur (the distribution random search draws from).
    Drawn from ``generator`` alone: the same generator state gives the same gates.
    ``memory`` (a :class:`swr.memory.MemoryLimit`): a layer must fit its budget too."""
    n = len(costs)
    keep = 0.2 + 0.8 * float(torch.rand((), generator=generator))
    order = torch.randperm(n, generator=generator).tolist()
    coins = torch.rand(n, generator=generator).tolist()
    opened = [False] * n
    fill = Filling(costs, budget_params, memory)
    for i, coin in zip(order, coins):
        if coin < keep and fill.fits(i):
            opened[i] = True
            fill.add(i)
    return opened


#: Largest budget (in units of the costs' common divisor) :func:`count_feasible` counts
#: for; one float64 per unit, so at most 256 MiB.
COUNT_FEASIBLE_LIMIT = 32_000_000


def count_feasible(costs: Sequence[int], budget_params: int) -> int | None:
    """How many subsets of layers with these delta ``costs`` fit ``budget_params`` (the
    empty one included): the size of the space a search draws its selections from. When
    it is not much larger than the evaluations, every searcher scores most of it and
    they all end up with the same selection. Counted exactly by dynamic programming over
    the cost in units of the costs' greatest common divisor; above 2**53 the count is
    rounded, and None when the budget exceeds :data:`COUNT_FEASIBLE_LIMIT` units."""
    if budget_params < 0:
        return 0
    fit = [int(c) for c in costs if 0 <= c <= budget_params]
    unit = math.gcd(*fit) or 1
    top = budget_params // unit
    if top > COUNT_FEASIBLE_LIMIT:
        return None
    ways = np.zeros(top + 1, dtype=np.float64)  # ways[s]: subsets costing s units
    ways[0] = 1.0
    for c in (c // unit for c in fit):
        ways[c:] = ways[c:] + ways[:top + 1 - c]
    return int(ways.sum())


def feasible_masks(costs: Sequence[int], budget_params: int) -> list[np.ndarray]:
    """Every subset of layers that fits ``budget_params``, as boolean masks (the empty one
    first; as many as :func:`count_feasible` counts): for spaces small enough to score
    whole."""
    out: list[np.ndarray] = []
    if budget_params < 0:  # not even the empty selection, as count_feasible says
        return out
    cur = np.zeros(len(costs), dtype=bool)

    def visit(i: int, left: int) -> None:
        if i == len(costs):
            out.append(cur.copy())
            return
        visit(i + 1, left)
        if costs[i] <= left:
            cur[i] = True
            visit(i + 1, left - costs[i])
            cur[i] = False

    visit(0, budget_params)
    return out


def cost_report(model: nn.Module, selection: Iterable[str] | None = None, *,
                count_norms: bool = False, count_head: bool = False) -> dict:
    """Updated parameters of a selection, with norms and head reported separately."""
    if selection is None:
        selection = [n for n, m in reparam_layers(model).items() if m.gate != 0.0]
    deltas = selection_cost(model, selection)
    norms = sum(p.numel() for p in norm_parameters(model).values())
    head = sum(p.numel() for p in head_parameters(model).values())
    updated = deltas + (norms if count_norms else 0) + (head if count_head else 0)
    return {"deltas": deltas, "norms": norms, "head": head, "updated": updated,
            "backbone_params": backbone_params(model),
            "count_norms": count_norms, "count_head": count_head}
