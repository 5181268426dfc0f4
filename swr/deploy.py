"""The multi-task store: one base checkpoint plus N task deltas -> any task's model.

``rebuild`` applies a task delta to the base weights (bit-exact with the folded
model that was trained); ``fold_task`` writes the rebuilt model (and, on request,
its ONNX graph) to a folder; ``export_onnx`` writes an ONNX graph, counts its nodes
and parameters, and runs it with onnxruntime to show it computes what the PyTorch
model computes.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from .delta import apply_task_delta, read_task_delta_header
from .errors import SwrError
from .io import atomic_path, check_output, check_run_folder, run_folder, write_json
from .source import BaseSpec, load_base

#: Largest max-abs difference between onnxruntime's and PyTorch's fp32 outputs
#: accepted by :func:`export_onnx` (both run the same weights; only kernels differ).
ONNX_TOLERANCE = 1e-4

#: Every file ``fold_task`` writes: the folder it replaces may hold only these.
OUTPUTS = {"model.safetensors", "fold.json", "model.onnx", "base.onnx"}


def rebuild(checkpoint: "str | Path | BaseSpec", delta: str | Path
            ) -> tuple[nn.Module, nn.Module, dict]:
    """(task model, base model, base description) from a base and a task delta.

    ``checkpoint`` is a ``swr pretrain`` folder or a :class:`~swr.source.BaseSpec`
    (a backbone + weights file). The delta is checked against the base's backbone as
    well as its weights.
    """
    spec = checkpoint if isinstance(checkpoint, BaseSpec) else BaseSpec(checkpoint=str(checkpoint))
    base, meta = load_base(spec)
    task_model = copy.deepcopy(base)
    apply_task_delta(task_model, delta, backbone=meta["backbone"])
    return task_model.eval(), base.eval(), meta


@torch.no_grad()
def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path,
                tolerance: float = ONNX_TOLERANCE) -> dict:
    """Export ``model`` to ONNX at ``path`` and check it with onnxruntime on ``example``.

    Returns the node and parameter counts, the op counts, ``max_abs_diff`` between
    onnxruntime's and the model's outputs, the ``tolerance`` and whether it was met
    (``matches``). The model and ``example`` should be fp32 for the tolerance to hold.
    """
    import onnx
    import onnxruntime

    model = model.eval()
    program = torch.onnx.export(model, (example,), dynamo=True, verbose=False)
    with atomic_path(path) as tmp:
        program.save(str(tmp))
    graph = onnx.load(str(path)).graph
    params = sum(int(torch.Size(list(t.dims)).numel()) for t in graph.initializer)
    ops: dict[str, int] = {}
    for node in graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: example.detach().cpu().numpy()}
    got = torch.from_numpy(session.run(None, feed)[0])
    want = model(example).detach().cpu()
    diff = float((got.to(want.dtype) - want).abs().max()) if got.shape == want.shape \
        else float("inf")
    return {"nodes": len(graph.node), "params": params, "ops": ops, "max_abs_diff": diff,
            "tolerance": tolerance, "matches": diff <= tolerance}


def fold_task(checkpoint: "str | Path | BaseSpec", delta: str | Path, out: str | Path,
              onnx: bool = False, overwrite: bool = False) -> dict:
    """Rebuild a task model from a base checkpoint and its task delta into folder ``out``.

    Writes ``model.safetensors`` and ``fold.json`` (with ``--onnx`` also ``model.onnx``
    and ``base.onnx``, each checked with onnxruntime). ``fold.json`` records, besides the
    sizes, what ``swr evaluate --model`` needs: the task, its classes and preprocessing
    (from the delta) and the base's data config. ``out`` may be neither an input
    nor hold one; it is locked while written, replaced whole once every file is written,
    and refused when it holds an earlier run unless ``overwrite``. Returns the report.
    """
    from .tasks.backbones import input_shape, save_checkpoint

    spec = checkpoint if isinstance(checkpoint, BaseSpec) else BaseSpec(checkpoint=str(checkpoint))
    check_output(out, {"--checkpoint": spec.checkpoint, "--weights": spec.weights,
                       "--delta": delta})
    check_run_folder(out, OUTPUTS)
    task_model, base, meta = rebuild(spec, delta)
    _, delta_meta = read_task_delta_header(delta)  # checked in full by rebuild
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    report = {"backbone": meta["backbone"], "task": delta_meta.get("task"),
              "classes": delta_meta.get("classes"), "preprocess": delta_meta.get("preprocess"),
              "data_config": meta.get("data_config"),
              "delta_bytes": Path(delta).stat().st_size,
              "params": count(task_model), "base_params": count(base),
              "same_module_types": [type(m).__name__ for m in task_model.modules()]
              == [type(m).__name__ for m in base.modules()]}
    with run_folder(out, "fold", OUTPUTS, overwrite=overwrite) as stage:
        save_checkpoint(task_model, stage / "model.safetensors", backbone=meta["backbone"],
                        task=str(delta_meta.get("task", "")))
        if onnx:
            x = torch.randn(1, *input_shape(base, meta["backbone"]),
                            generator=torch.Generator().manual_seed(0))
            for key, model, name in (("onnx", task_model, "model.onnx"),
                                     ("onnx_base", base, "base.onnx")):
                report[key] = export_onnx(model, x, stage / name)
                if not report[key]["matches"]:
                    raise SwrError(f"the ONNX export {name} of {spec.checkpoint or spec.weights} with {delta} differs "
                                   f"from the PyTorch model by {report[key]['max_abs_diff']:.3g} "
                                   f"max abs (tolerance {ONNX_TOLERANCE:g}); {out} is left as "
                                   "it was")
            report["onnx_same_graph"] = report["onnx"]["ops"] == report["onnx_base"]["ops"]
        write_json(stage / "fold.json", report)
    return report
