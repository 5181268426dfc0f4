"""Running any PETL method the same way: prepare, train, evaluate, fold, measure."""

from __future__ import annotations

import copy
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file
from torch import nn

from ..flops import count_flops
from ..fold import fold_tolerance, same_architecture
from ..robustness import save_predictions
from ..train import TrainConfig, batches, check_finite_weights, evaluate, resolve_device
from .base import Method, get_method

def stored_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Size of a safetensors file holding exactly ``tensors`` (written to a temp file)."""
    plain = {k: t.detach().cpu().contiguous().clone() for k, t in tensors.items()}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "task.safetensors")
        save_file(plain, path)
        return os.path.getsize(path)


def run_method(method_name: str | Method, base_model: nn.Module, task,
               budget_params: Optional[int], cfg: TrainConfig, predictions: Optional[str] = None,
               export: Optional[str] = None, export_model: bool = False, backbone: str = "",
               **knobs) -> dict:
    """Transfer ``base_model`` to ``task`` with one method and measure the result.

    ``base_model`` is left untouched (the method adapts a deep copy, with a new head
    for ``task``). Returns one result row:

    * ``method``, ``settings`` (knobs as used), ``budget_params``,
      ``respects_budget``, ``within_budget`` (None without a budget),
    * ``test_acc``, ``val_acc`` (best validation), ``shift_acc`` (None when the
      task has no ``shift_test``),
    * ``updated_params`` (every parameter the method trains outside the head, the
      quantity the budget bounds), ``norm_params`` (the part of it that is task norms
      trained beside the mechanism), ``norms`` (how those meet the budget:
      :meth:`~swr.methods.Method.norms_accounting`), ``head_params``,
    * ``stored_bytes``: safetensors size of what the method stores per task,
    * ``extra_flops``: per-sample inference FLOPs of the task model (the folded one
      when foldable) minus the base model's with the same head,
    * ``foldable``, ``fold_max_abs_diff`` (folded vs trained outputs on up to 8
      test inputs; None when not foldable), ``train_seconds`` (``prepare`` and
      ``fit``: for SWR the supernet and the search as well as the final training).

    With ``predictions`` (a path), the trained model's class probabilities on
    ``test`` and ``shift_test`` are stored there for ensembles
    (:func:`swr.robustness.save_predictions`).

    With ``export`` (a folder) and a foldable method, the run's task delta is written
    to ``export/task_delta.safetensors`` (:func:`swr.export.export_method_delta`; its
    metadata names ``backbone``, the method, the task's classes and preprocessing) and,
    with ``export_model``, the deployed task model (base + delta) to
    ``export/model.safetensors`` and the training history to ``history.json``; the row then also holds ``delta_file``,
    ``delta_bytes`` and ``rebuild_max_abs_diff``. A trained model that holds NaN or
    infinite values (the training diverged) raises :class:`~swr.errors.SwrError` instead,
    before anything is exported.

    A fold that does not give the base architecture raises; a fold whose outputs
    drift beyond :data:`swr.fold.FOLD_TOLERANCE` (relative to the output scale) warns.
    ``method_name`` may also be a ready :class:`Method` (``knobs`` must then be empty).
    """
    method = get_method(method_name, **knobs) if isinstance(method_name, str) else method_name
    method.check_supported(base_model)
    device = resolve_device(cfg.device)
    reference = copy.deepcopy(base_model)
    reference.reset_classifier(task.num_classes)
    reference.to(device).eval()
    # Heads, adapters and prompts are initialised from the global generator.
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()  # prepare included: SWR's supernet and search run there
    model = method.prepare(copy.deepcopy(base_model).to(device), task, budget_params)
    result = method.fit(model, task, cfg)
    train_seconds = time.perf_counter() - start
    model.eval()

    test_acc = evaluate(model, task.test, device)
    shift = getattr(task, "shift_test", None)
    shift_acc = evaluate(model, shift, device) if shift is not None else None
    if predictions is not None:
        save_predictions(predictions, model, task, device)

    x = next(batches(task.test, 8))[0].to(device)
    task_model, fold_diff = model, None
    if method.foldable:
        task_model = method.fold(model)
        if not same_architecture(task_model, reference):
            raise RuntimeError(f"method {method.name!r} folded into a model that is not the "
                               "base architecture")
        with torch.no_grad():
            y = model(x)
            fold_diff = float((y - task_model(x)).abs().max())
        tol = fold_tolerance(y.dtype, float(y.abs().max()))
        if fold_diff > tol:
            warnings.warn(f"method {method.name!r}: folded outputs differ by {fold_diff:.3g}, "
                          f"above the tolerance {tol:.3g}", RuntimeWarning, stacklevel=2)
    extra_flops = count_flops(task_model, x[:1]) - count_flops(reference, x[:1])
    exported: dict = {}
    if export is not None and method.foldable:
        # a run that diverged exports nothing: its delta would be refused by every reader
        check_finite_weights(model, f"the training of method {method.name!r}", cfg.lr)
        exported = _export(method, base_model, model, task_model, task, budget_params, backbone,
                           Path(export), export_model, x, result.history)

    updated = method.updated_params(model)
    return {
        "method": method.name,
        "settings": method.settings(),
        "budget_params": budget_params,
        "respects_budget": method.respects_budget,
        "within_budget": None if budget_params is None else updated <= budget_params,
        "test_acc": test_acc,
        "val_acc": result.val_acc,
        "best_epoch": result.best_epoch,
        "shift_acc": shift_acc,
        "updated_params": updated,
        "norm_params": method.norm_params(model),
        "norms": method.norms_accounting(),
        "head_params": method.head_params(model),
        "stored_bytes": stored_bytes(method.stored_tensors(model)),
        "extra_flops": extra_flops,
        "foldable": method.foldable,
        "fold_max_abs_diff": fold_diff,
        "train_seconds": train_seconds,
        **exported,
    }


def _export(method, base_model: nn.Module, model: nn.Module, task_model: nn.Module, task,
            budget_params: Optional[int], backbone: str, out: Path, export_model: bool,
            x: torch.Tensor, history: list) -> dict:
    """Write a run's task delta (and deployed model, training history); the row's export
    columns."""
    from ..export import export_method_delta
    from ..io import write_json
    from ..source import task_preprocess
    from ..tasks.backbones import save_checkpoint

    path = out / "task_delta.safetensors"
    extra = {"method": method.name, "classes": list(task.class_names),
             "preprocess": task_preprocess(task)}
    deployed, report = export_method_delta(base_model, model, task_model, path,
                                           backbone=backbone, task=task.id,
                                           budget_params=budget_params, extra=extra, example=x)
    if export_model:
        save_checkpoint(deployed, out / "model.safetensors", backbone=backbone, task=task.id,
                        classes=list(task.class_names))
        write_json(out / "history.json", history)
    return {"delta_file": str(path), **report}
