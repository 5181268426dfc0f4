"""The multi-task store: one base checkpoint plus N task deltas -> any task's model.

``rebuild`` applies a task delta to the base weights (bit-exact with the folded
model that was trained); ``export_onnx`` writes an ONNX graph and counts its nodes
and parameters, so a rebuilt task model can be shown to be the base model's twin.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from .delta import apply_task_delta
from .io import atomic_path
from .source import BaseSpec, load_base


def rebuild(checkpoint: "str | Path | BaseSpec", delta: str | Path
            ) -> tuple[nn.Module, nn.Module, dict]:
    """(task model, base model, base description) from a base and a task delta.

    ``checkpoint`` is a ``swr pretrain`` folder or a :class:`~swr.source.BaseSpec`
    (a backbone + weights file).
    """
    spec = checkpoint if isinstance(checkpoint, BaseSpec) else BaseSpec(checkpoint=str(checkpoint))
    base, meta = load_base(spec)
    task_model = copy.deepcopy(base)
    apply_task_delta(task_model, delta)
    return task_model.eval(), base.eval(), meta


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path) -> dict:
    """Export ``model`` to ONNX at ``path``; return its node and parameter counts."""
    import onnx

    program = torch.onnx.export(model.eval(), (example,), dynamo=True, verbose=False)
    with atomic_path(path) as tmp:
        program.save(str(tmp))
    graph = onnx.load(str(path)).graph
    params = sum(int(torch.Size(list(t.dims)).numel()) for t in graph.initializer)
    ops: dict[str, int] = {}
    for node in graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"nodes": len(graph.node), "params": params, "ops": ops}
