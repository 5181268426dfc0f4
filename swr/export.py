"""Task deltas for every method that folds, not only SWR.

SWR's trained model is reparametrized: its task delta is ``g * dW`` of the open
gates (:func:`swr.delta.task_delta_tensors`). Every other foldable method (LoRA,
BitFit, SSF, norm tuning, full fine-tuning, ...) folds into a plain model of the base
architecture; its task delta is the difference of that folded model from the base,
restricted to what changed:

* ``delta/<key>``: ``W_task - W_base`` for every changed backbone tensor,
* ``norm/<key>``: every norm tensor (parameters and running statistics; a task delta
  always carries the whole task norm state, as SWR's does),
* ``head/<key>``: the task's head.

Both kinds are the same file format (``swr-task-delta/1``) and are applied by
:func:`swr.delta.apply_task_delta`. The *deployed* task model is always
``apply_task_delta(base, delta)``: for SWR it is bit-identical to the folded model;
for the others ``W_base + (W_task - W_base)`` can differ from ``W_task`` by one
rounding step per weight, which :func:`export_method_delta` measures on the outputs.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Optional

import torch
from torch import nn

from .delta import (apply_task_delta, base_hash, frozen_base_state, save_task_delta,
                    task_delta_tensors, task_state_tensors)
from .errors import SwrError
from .reparam import head_prefix, reparam_layers


def delta_from_folded(base: nn.Module, folded: nn.Module) -> dict[str, torch.Tensor]:
    """Task-delta tensors turning plain ``base`` into plain ``folded`` (same architecture).

    Unchanged backbone tensors are left out; the norms and the head are always stored.
    """
    if reparam_layers(base) or reparam_layers(folded):
        raise SwrError("delta_from_folded expects two plain models; fold the trained model first")
    task_state = folded.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, w in frozen_base_state(base).items():
        t = task_state.get(key)
        if t is None or t.shape != w.shape:
            raise SwrError(f"the folded model's {key} does not match the base model's; "
                           "was it folded from another backbone?")
        t = t.detach().cpu()
        w = w.detach().cpu().to(t.dtype)
        if not torch.equal(t, w):
            out[f"delta/{key}"] = t - w
    out.update(task_state_tensors(folded))
    return {k: v.cpu().contiguous().clone() for k, v in out.items()}


def write_task_delta(tensors: dict[str, torch.Tensor], path: str | os.PathLike, *,
                     base: nn.Module, backbone: str, task: str = "",
                     budget_params: Optional[int] = None, extra: Optional[dict] = None) -> int:
    """Write task-delta ``tensors`` for plain model ``base`` (atomic); returns the size.

    The metadata is that of :func:`swr.delta.export_task_delta` (format, backbone,
    base hash, selection, budget, task, head, class count, version) plus ``extra``.
    """
    head = head_prefix(base)
    head_w = tensors.get(f"head/{head}.weight") if head else None
    layers = sorted({k.split("/", 1)[1].rsplit(".", 1)[0] for k in tensors
                     if k.startswith("delta/")})
    return save_task_delta(tensors, path, {
        "backbone": backbone, "base_hash": base_hash(base), "selection": layers,
        "budget_params": budget_params, "task": task,
        "num_classes": None if head_w is None else int(head_w.shape[0]), "head": head,
        **(extra or {})})


@torch.no_grad()
def export_method_delta(base: nn.Module, trained: nn.Module, folded: nn.Module,
                        path: str | os.PathLike, *, backbone: str, task: str = "",
                        budget_params: Optional[int] = None, extra: Optional[dict] = None,
                        example: Optional[torch.Tensor] = None) -> tuple[nn.Module, dict]:
    """Export the task delta of a method's run and rebuild the deployed model from it.

    ``base`` is the plain base model (left untouched), ``trained`` the method's trained
    model and ``folded`` its fold. Returns ``(deployed, report)``: the deployed model is
    ``apply_task_delta(base, path)`` (eval mode, on the CPU); the report holds
    ``delta_bytes`` and, given ``example`` inputs, ``rebuild_max_abs_diff`` between the
    deployed and the folded model's outputs (0 for SWR).
    """
    if reparam_layers(trained):
        if any(layer.merged for layer in reparam_layers(trained).values()):
            raise SwrError("unmerge the model before exporting its task delta")
        tensors = task_delta_tensors(trained)
    else:
        tensors = delta_from_folded(base, folded)
        # a folded method's dense W_task - W_base is not what its budget bounded (LoRA's
        # rank factors, for one): the budget is kept as the method's, not the delta's
        extra = {**(extra or {}), "method_budget_params": budget_params}
        budget_params = None
    nbytes = write_task_delta(tensors, path, base=base, backbone=backbone, task=task,
                              budget_params=budget_params, extra=extra)
    deployed = apply_task_delta(copy.deepcopy(base).cpu(), path).eval()
    report: dict[str, Any] = {"delta_bytes": nbytes, "rebuild_max_abs_diff": None}
    if example is not None:
        device = next(folded.parameters()).device
        y = folded.eval()(example.to(device)).cpu()
        report["rebuild_max_abs_diff"] = float((deployed(example.cpu()) - y).abs().max())
    return deployed, report
