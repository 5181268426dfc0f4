"""``swr evaluate``: accuracy, per-class accuracy and the confusion matrix of a task model.

The model is a task delta on its base (``--delta`` with ``--checkpoint`` or
``--backbone/--weights``), or a task of a store (``--store`` with ``--name``). It is
scored on a split of a task (by default the task and split the delta was made for and
``test``), prepared the way its base expects, or on a folder of files laid out
``<folder>/<class>/<file>`` and prepared as the delta records. The folder ``--out``
receives ``metrics.json`` (accuracy, per-class accuracy and counts),
``confusion.csv`` (rows: true class, columns: predicted) and ``confusion.png``.
A delta's model is the deployed one (base + delta): its accuracy on the bench's split
is the bench row's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from .errors import SwrError
from .io import run_folder, save_png, write_csv, write_json
from .robustness import predict
from .train import resolve_device

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
    from .store import load_input

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
    from .delta import apply_task_delta, read_task_delta_header
    from .source import load_base

    model, desc = load_base(base)
    _, meta = read_task_delta_header(delta)
    model = apply_task_delta(model, delta, backbone=desc["backbone"])
    return model, {"desc": desc, "task": meta.get("task"), "classes": meta.get("classes"),
                   "preprocess": meta.get("preprocess"), "source": str(delta)}


def _store_model(store: str, name: str) -> tuple[nn.Module, dict]:
    from .store import TaskStore, task_preprocess_of

    st = TaskStore(store)
    entry = st.entry(name)
    model = st.load().set_task(name)
    return model, {"desc": {"backbone": st.backbone, "data_config": st.index.get("data_config")},
                   "task": entry.get("task"), "classes": list(entry["classes"]),
                   "preprocess": task_preprocess_of(st, name), "source": f"{store}:{name}"}


def evaluate(out: str | Path, *, delta: Optional[str] = None, base=None,
             store: Optional[str] = None, name: Optional[str] = None,
             task: Optional[str] = None, split: str = "test", folder: Optional[str] = None,
             device: str = "auto", on_bad_file: str = "fail", overwrite: bool = False) -> dict:
    """Score a task model (see the module docstring) and write ``out``; returns the metrics."""
    from .plots import confusion_figure
    from .source import load_task

    if (delta is None) == (store is None):
        raise SwrError("give the model to evaluate: --delta FILE (with its base) or --store "
                       "DIR --name TASK")
    if delta is not None and base is None:
        raise SwrError("--delta needs its base: --checkpoint DIR or --backbone NAME --weights FILE")
    if store is not None and not name:
        raise SwrError("--store needs --name, the store's task to evaluate (swr store list)")
    if split not in SPLITS:
        raise SwrError(f"--split {split!r} is not one of {', '.join(SPLITS)}")
    if folder is not None and task is not None:
        raise SwrError("give --task (a task's split) or --folder (files), not both")
    with run_folder(out, "evaluate", OUTPUTS, overwrite=overwrite) as stage:
        model, info = _delta_model(delta, base) if delta is not None else _store_model(store, name)
        dev = resolve_device(device)
        model = model.to(dev)
        if folder is not None:
            classes = list(info["classes"] or [])
            if not classes or not isinstance(info["preprocess"], dict):
                raise SwrError(f"{info['source']} records no class names or preprocessing; "
                               "evaluate it on --task instead of --folder")
            labels, predicted, _ = predict_folder(model, Path(folder), classes,
                                                  info["preprocess"], dev)
            on = {"folder": str(folder)}
        else:
            spec = task or info["task"]
            if not spec:
                raise SwrError(f"{info['source']} records no task; give --task")
            data = load_task(spec, info["desc"], on_bad_file=on_bad_file)
            ds = getattr(data, split, None)
            if ds is None:
                raise SwrError(f"task {spec} has no {split} split")
            classes = list(data.class_names)
            probs, labels = predict(model, ds, dev)
            predicted = probs.argmax(-1)
            on = {"task": spec, "split": split}
        matrix = confusion(labels, predicted, len(classes))
        metrics = {"model": info["source"], **on, "classes": classes,
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
