"""Ensembles and weight-space interpolation, measured in and out of distribution.

Two findings of the empirical PETL literature, made measurable here:

* **Prediction ensembles** of two transfer methods (average of their softmax
  outputs) often beat either member, most of all under distribution shift.
  :func:`save_predictions` stores a run's class probabilities on ``test`` and
  ``shift_test``; :func:`ensemble_rows` combines stored runs pairwise.
* **WiSE-FT** (weight-space ensembling): the weights ``(1 - a) * w0 + a * w1``
  between the pre-trained model ``w0`` and the fully fine-tuned one ``w1`` trade
  in-distribution accuracy against robustness to shift. :func:`interpolate` builds
  one point of that line for any two models of the same architecture.

Nothing here trains; the ``wise-ft`` method (:mod:`swr.methods.wise`) and
``swr bench`` use these functions.
"""

from __future__ import annotations

import copy
import itertools
import os
import re
from pathlib import Path
from typing import Iterable, Optional

import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset

from .errors import SwrError
from .fold import same_architecture
from .io import save_safetensors
from .train import batches, resolve_device

#: The evaluation splits predictions are stored for.
SPLITS = ("test", "shift_test")


@torch.inference_mode()
def predict(model: nn.Module, ds: Dataset, device: torch.device | str = "cpu",
            batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities (softmax, float32, on the CPU) and labels of ``ds``."""
    device = resolve_device(device)
    was_training = model.training
    model.eval()
    probs, labels = [], []
    for x, y in batches(ds, batch_size):
        probs.append(torch.softmax(model(x.to(device)).float(), -1).cpu())
        labels.append(y.cpu())
    model.train(was_training)
    return torch.cat(probs), torch.cat(labels)


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of class probabilities (or logits)."""
    return float((probs.argmax(-1) == labels).float().mean()) if len(labels) else 0.0


def save_predictions(path: str | os.PathLike, model: nn.Module, task,
                     device: torch.device | str = "cpu") -> None:
    """Store ``model``'s probabilities and the labels on the task's evaluation splits.

    One safetensors file with ``<split>.probs`` and ``<split>.labels`` per split the
    task has (``test``, and ``shift_test`` when present); written atomically.
    """
    tensors = {}
    for split in SPLITS:
        ds = getattr(task, split, None)
        if ds is None:
            continue
        probs, labels = predict(model, ds, device)
        tensors[f"{split}.probs"] = probs.contiguous()
        tensors[f"{split}.labels"] = labels.to(torch.int64).contiguous()
    save_safetensors(tensors, path)


def load_predictions(path: str | os.PathLike) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{split: (probs, labels)}`` from a file written by :func:`save_predictions`."""
    try:
        t = load_file(str(path))
    except Exception as e:  # safetensors raises several types for a bad header
        raise SwrError(f"{path}: not a predictions file ({e}); delete it and rerun that "
                       "bench cell with --resume") from None
    return {s: (t[f"{s}.probs"], t[f"{s}.labels"]) for s in SPLITS if f"{s}.probs" in t}


def ensemble(members: Iterable[dict[str, tuple[torch.Tensor, torch.Tensor]]]) -> dict[str, float]:
    """Accuracy per split of the average of the members' probabilities.

    Members must hold the same splits with the same labels (same task, same data).
    """
    members = list(members)
    if len(members) < 2:
        raise ValueError("an ensemble needs at least two members")
    out = {}
    for split in members[0]:
        if not all(split in m for m in members):
            continue
        labels = members[0][split][1]
        if any(not torch.equal(m[split][1], labels) for m in members[1:]):
            raise SwrError(f"ensemble members disagree on the {split} labels: they were not "
                           "evaluated on the same data")
        mean = torch.stack([m[split][0] for m in members]).mean(0)
        out[split] = accuracy(mean, labels)
    return out


def ensemble_rows(runs: list[dict], pred_dir: str | os.PathLike) -> list[dict]:
    """Pairwise ensembles of finished bench runs, one row per (task, pair, seed).

    ``runs`` are bench result rows (``task``, ``method``, ``budget``, ``seed``); a
    run's predictions are ``pred_dir/<cell>.safetensors`` (see :func:`cell_name`).
    Two runs pair when they share task and seed and each either ignores the budget
    or was run at the same budget; runs without stored predictions are left out.
    Each row gives the ensemble's ``test_acc`` / ``shift_acc`` and the better
    member's, so the gain is plain to read.
    """
    pred_dir = Path(pred_dir)
    loaded: dict[tuple, dict] = {}
    for r in runs:
        path = pred_dir / f"{cell_name(r['task'], r['method'], r['budget'], r['seed'])}.safetensors"
        if path.is_file():
            loaded[(r["task"], r["method"], str(r["budget"]), int(r["seed"]))] = load_predictions(path)
    rows = []
    for (ka, a), (kb, b) in itertools.combinations(sorted(loaded.items()), 2):
        (task_a, m_a, bud_a, s_a), (task_b, m_b, bud_b, s_b) = ka, kb
        if task_a != task_b or s_a != s_b or m_a == m_b:
            continue
        natural = "natural"
        if bud_a != bud_b and natural not in (bud_a, bud_b):
            continue
        budget = bud_a if bud_a != natural else bud_b
        acc = ensemble([a, b])
        single = {s: max(accuracy(*a[s]), accuracy(*b[s])) for s in acc}
        rows.append({"task": task_a, "members": f"{m_a} + {m_b}", "budget": budget,
                     "seed": s_a, "test_acc": acc.get("test"), "shift_acc": acc.get("shift_test"),
                     "best_member_test_acc": single.get("test"),
                     "best_member_shift_acc": single.get("shift_test")})
    return rows


def cell_name(task: str, method: str, budget: str, seed) -> str:
    """A short, shell-safe name of one bench cell (letters, digits, '.', '_', '-').

    A task named by a path or with options (``imagefolder:/home/me/digits?shots=30``)
    is shortened to its kind and last path part plus a hash of the whole spec
    (``imagefolder_digits-3f2a1c``), so no folder name holds an absolute path or a
    glob character; the full spec is in each run's ``metrics.json``. ``%`` becomes
    ``pct``.
    """
    import hashlib

    kind, _, rest = task.partition(":")
    plain = re.fullmatch(r"[A-Za-z0-9._-]*", rest) is not None
    if plain:
        short = f"{kind}_{rest}" if rest else kind
    else:
        last = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(rest.split("?")[0].rstrip("/\\")).name)
        digest = hashlib.sha256(task.encode()).hexdigest()[:6]
        short = f"{kind}_{last[:40]}-{digest}" if last else f"{kind}-{digest}"
    safe = lambda text: re.sub(r"[^A-Za-z0-9._-]+", "_", text.replace("%", "pct"))  # noqa: E731
    return f"{safe(short)}-{safe(method)}-{safe(str(budget))}-s{int(seed)}"


@torch.no_grad()
def interpolate(model0: nn.Module, model1: nn.Module, alpha: float,
                out: Optional[nn.Module] = None) -> nn.Module:
    """The model with weights ``(1 - alpha) * model0 + alpha * model1`` (WiSE-FT).

    Every floating-point tensor of the state dict is interpolated, BatchNorm running
    statistics included; integer buffers (``num_batches_tracked``) come from
    ``model1``. ``alpha`` = 0 and 1 give the end points bit for bit, all of them. The result is
    written into ``out`` when given (a model of the same architecture), else into a
    deep copy of ``model1``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise SwrError(f"interpolation weight {alpha} must lie in [0, 1]")
    if not same_architecture(model0, model1):
        raise SwrError("weight interpolation needs two models of the same architecture")
    s0, s1 = model0.state_dict(), model1.state_dict()
    mixed = {}
    for k, t1 in s1.items():
        t0 = s0[k]
        if alpha == 0.0:
            mixed[k] = t0
        elif not t1.is_floating_point() or alpha == 1.0:
            mixed[k] = t1
        else:
            mixed[k] = torch.lerp(t0.to(t1.dtype), t1, alpha)
    target = out if out is not None else copy.deepcopy(model1)
    target.load_state_dict(mixed)
    return target
