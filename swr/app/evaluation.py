"""``swr evaluate``: accuracy, per-class accuracy and the confusion matrix of a task model.

The model is a task delta on its base (``--delta`` with ``--checkpoint`` or
``--backbone/--weights``), a task of a store (``--store`` with ``--name``), or a
folded task model (``--model``, the folder ``swr fold`` writes). It is scored on a
split of a task (by default the task and split the model was made for and ``test``),
or on a folder of files laid out ``<folder>/<class>/<file>``; either is prepared as the
model records (image size and normalisation; the rest as its base expects), or with
the user's ``--image-size``/``--mean``/``--std``. The folder ``--out`` receives
``metrics.json`` (accuracy, per-class accuracy and counts), ``confusion.csv`` (rows:
true class, columns: predicted) and ``confusion.png``. A delta's model is the deployed
one (base + delta), as is a folded one: their accuracy on the bench's split is the
bench row's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from ..errors import SwrError
from ..io import run_folder, save_png, write_csv, write_json
from ..robustness import predict
from ..tasks.base import DataOverride
from ..train import resolve_device

#: Every file ``swr evaluate`` writes into its ``--out``.
OUTPUTS = {"metrics.json", "confusion.csv", "confusion.png"}

SPLITS = ("test", "val", "shift_test", "train")


def confusion(labels: torch.Tensor, predicted: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n x n`` confusion matrix: row = true class, column = predicted class."""
    m = torch.zeros(n, n, dtype=torch.int64)
    m.index_put_((labels.long(), predicted.long()), torch.ones_like(labels, dtype=torch.int64),
                 accumulate=True)
    return m


def scores(matrix: torch.Tensor, classes: Sequence[str]) -> dict:
    """Accuracy and per-class accuracy (recall) read off a confusion ``matrix``."""
    total = int(matrix.sum())
    per_class = {c: {"n": int(matrix[i].sum()),
                     "accuracy": (float(matrix[i, i] / matrix[i].sum())
                                  if int(matrix[i].sum()) else None)}
                 for i, c in enumerate(classes)}
    return {"accuracy": float(matrix.diag().sum()) / total if total else None,
            "n": total, "per_class": per_class}


@torch.no_grad()
def predict_folder(model: nn.Module, folder: Path, classes: Sequence[str], pre: dict,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Labels and predictions for the files of ``folder/<class>/``; class folders must
    be among ``classes``. Returns the files too."""
    from ..store import load_input

    if not folder.is_dir():
        raise SwrError(f"--folder {folder} is not a folder of class folders")
    index = {c: i for i, c in enumerate(classes)}
    labels, predicted, files = [], [], []
    found = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in found if p.name not in index]
    if unknown:
        raise SwrError(f"--folder {folder} has class folder(s) {', '.join(unknown[:3])} that "
                       f"the task does not have; its classes: {', '.join(classes)}")
    model.eval()
    for sub in found:
        for f in sorted(p for p in sub.iterdir() if p.is_file() and not p.name.startswith(".")):
            x = load_input(f, pre).unsqueeze(0).to(device)
            predicted.append(int(model(x).argmax(-1)))
            labels.append(index[sub.name])
            files.append(str(f))
    if not files:
        raise SwrError(f"--folder {folder} holds no files in class folders "
                       "(<folder>/<class>/<file>)")
    return torch.tensor(labels), torch.tensor(predicted), files


def _delta_model(delta: str, base) -> tuple[nn.Module, dict]:
    from ..delta import apply_task_delta, read_task_delta_header
    from ..source import load_base

    model, desc = load_base(base)
    _, meta = read_task_delta_header(delta)
    model = apply_task_delta(model, delta, backbone=desc["backbone"])
    return model, {"desc": desc, "task": meta.get("task"), "classes": meta.get("classes"),
                   "preprocess": meta.get("preprocess"), "source": str(delta)}


def _store_model(store: str, name: str) -> tuple[nn.Module, dict]:
    from ..store import TaskStore, task_preprocess_of

    st = TaskStore(store)
    entry = st.entry(name)
    model = st.load().set_task(name)
    return model, {"desc": {"backbone": st.backbone, "data_config": st.index.get("data_config")},
                   "task": entry.get("task"), "classes": list(entry["classes"]),
                   "preprocess": task_preprocess_of(st, name), "source": f"{store}:{name}"}


def _folded_model(folder: str) -> tuple[nn.Module, dict]:
    """The task model of a ``swr fold`` folder (``model.safetensors`` and ``fold.json``)."""
    from ..io import read_json
    from ..tasks.backbones import check_backbone_name, create_backbone
    from ..tasks.base import image_preprocess_problem

    root = Path(folder)
    if not root.is_dir():
        raise SwrError(f"--model {folder} is not a folder; give the folder swr fold wrote")
    report_file = root / "fold.json"
    report = read_json(report_file, "fold report")
    redo = "fold the model again with swr fold"
    if not isinstance(report, dict) or not isinstance(report.get("backbone"), str):
        raise SwrError(f"{report_file} names no backbone; {redo}")
    try:  # a name read from a file passes the check a typed one does
        check_backbone_name(report["backbone"])
    except SwrError as e:
        raise SwrError(f"{report_file}: backbone {report['backbone']!r} is not one swr knows "
                       f"({e}); {redo}") from None
    if "data_config" not in report:
        raise SwrError(f"{report_file} does not record how its inputs are prepared (written "
                       f"by an older swr); {redo}")
    data_config, classes, pre = (report.get(k) for k in ("data_config", "classes", "preprocess"))
    if not (isinstance(data_config, (dict, type(None)))
            and (classes is None or (isinstance(classes, list)
                                     and all(isinstance(c, str) for c in classes)))
            and (pre is None or (isinstance(pre, dict)
                                 and pre.get("modality") in ("audio", "image")
                                 and (pre["modality"] == "audio"
                                      or image_preprocess_problem(pre) is None)))):
        raise SwrError(f"{report_file} is damaged ('data_config', 'classes' or 'preprocess' "
                       f"is not what swr fold writes); {redo}")
    model = create_backbone(report["backbone"], weights=root / "model.safetensors").eval()
    return model, {"desc": {"backbone": report["backbone"], "data_config": data_config},
                   "task": report.get("task") or None, "classes": classes, "preprocess": pre,
                   "source": str(root)}


def _recorded_override(info: dict, spec: str) -> Optional[DataOverride]:
    """The image size and normalisation the model of ``info`` records (its task's
    preprocessing), to prepare image task ``spec`` as the model was trained on it; None
    for audio or a model that records none."""
    from ..tasks import AUDIO_KINDS

    pre = info["preprocess"]
    if (not (isinstance(pre, dict) and pre.get("modality") == "image")
            or spec.partition(":")[0] in AUDIO_KINDS):
        return None
    try:
        return DataOverride(pre.get("image_size"), pre.get("mean"), pre.get("std")) or None
    except SwrError as e:
        raise SwrError(f"{info['source']} records an image preprocessing out of bounds ({e}); "
                       "give --image-size, --mean and --std") from None


def evaluate(out: str | Path, *, delta: Optional[str] = None, base=None,
             store: Optional[str] = None, name: Optional[str] = None,
             model: Optional[str] = None,
             task: Optional[str] = None, split: str = "test", folder: Optional[str] = None,
             device: str = "auto", on_bad_file: str = "fail", overwrite: bool = False,
             data_override: Optional[DataOverride] = None) -> dict:
    """Score a task model (see the module docstring) and write ``out``; returns the metrics.

    ``data_override`` replaces the image size and normalisation the model records."""
    from ..plots import confusion_figure
    from ..source import load_task

    if sum(x is not None for x in (delta, store, model)) != 1:
        raise SwrError("give one model to evaluate: --delta FILE (with its base), --store "
                       "DIR --name TASK, or --model DIR (from swr fold)")
    if model is not None and base is not None:
        raise SwrError("--model is a whole task model; --checkpoint, --backbone and --weights "
                       "go with --delta")
    if delta is not None and base is None:
        raise SwrError("--delta needs its base: --checkpoint DIR or --backbone NAME --weights FILE")
    if store is not None and not name:
        raise SwrError("--store needs --name, the store's task to evaluate (swr store list)")
    if split not in SPLITS:
        raise SwrError(f"--split {split!r} is not one of {', '.join(SPLITS)}")
    if folder is not None and task is not None:
        raise SwrError("give --task (a task's split) or --folder (files), not both")
    with run_folder(out, "evaluate", OUTPUTS, overwrite=overwrite) as stage:
        if model is not None:
            net, info = _folded_model(model)
        elif delta is not None:
            net, info = _delta_model(delta, base)
        else:
            net, info = _store_model(store, name)
        dev = resolve_device(device)
        net = net.to(dev)
        if folder is not None:
            classes = list(info["classes"] or [])
            pre = info["preprocess"]
            if not classes or not isinstance(pre, dict):
                raise SwrError(f"{info['source']} records no class names or preprocessing; "
                               "evaluate it on --task instead of --folder")
            if data_override:
                if pre.get("modality") != "image":
                    raise SwrError(f"{info['source']} takes audio: --image-size, --mean and "
                                   "--std prepare images only; drop them")
                pre = data_override.apply_to_preprocess(pre)
            labels, predicted, _ = predict_folder(net, Path(folder), classes, pre, dev)
            on = {"folder": str(folder)}
        else:
            spec = task or info["task"]
            if not spec:
                raise SwrError(f"{info['source']} records no task; give --task")
            # the user's values over those the model records
            recorded = _recorded_override(info, spec)
            prepared = (DataOverride(**{**recorded.as_dict(), **data_override.as_dict()})
                        if recorded and data_override else data_override or recorded)
            data = load_task(spec, info["desc"], on_bad_file=on_bad_file, override=prepared)
            ds = getattr(data, split, None)
            if ds is None:
                raise SwrError(f"task {spec} has no {split} split")
            classes = list(data.class_names)
            probs, labels = predict(net, ds, dev)
            predicted = probs.argmax(-1)
            on = {"task": spec, "split": split}
        matrix = confusion(labels, predicted, len(classes))
        metrics = {"model": info["source"], **on, "classes": classes,
                   "data_override": data_override.as_dict() if data_override else None,
                   **scores(matrix, classes)}
        write_json(stage / "metrics.json", metrics)
        write_csv(stage / "confusion.csv",
                  [{"true": c, **{p: int(matrix[i, j]) for j, p in enumerate(classes)}}
                   for i, c in enumerate(classes)], ["true", *classes])
        save_png(confusion_figure(matrix.tolist(), classes,
                                  f"{on.get('task', on.get('folder'))}: accuracy "
                                  f"{metrics['accuracy']:.4f} (n={metrics['n']})"),
                 stage / "confusion.png")
    return metrics


__all__ = ["confusion", "evaluate", "scores"]
