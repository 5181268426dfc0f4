"""A task store: one base model and N named task deltas, switched in place.

Layout of a store folder::

    store.json          backbone, base hash, data config, and one entry per task
    base.safetensors    the base weights (loaded once)
    tasks/<name>.safetensors   each task's delta (swr-task-delta/1, as exported)

:class:`TaskStore` adds, removes and lists tasks (``swr store add|remove|list``).
:meth:`TaskStore.load` loads the base once and returns a :class:`MultiTaskModel`,
whose :meth:`~MultiTaskModel.set_task` switches the active task *in place*, as
peft's ``set_adapter`` does: it restores the tensors the previous task changed
from saved copies (unmerge) and writes the next task's ``W + dW``, norms and head
into the loaded base (merge). No base weights are read again.

Guarantee (tested in fp32): after ``set_task(name)`` the model's outputs are
bit-identical to ``apply_task_delta(base, delta)``, the deployed task model that
``swr finetune`` and ``swr fold`` write, because merge computes ``W + dW`` with the
same operands, op and dtype as :func:`swr.delta.apply_task_delta` and unmerge restores
saved copies (it never subtracts); ``set_task(None)`` gives back the base bit-exactly.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from .delta import base_hash, read_task_delta
from .errors import ForeignDeltaError, SwrError
from .io import atomic_path, read_json, write_json
from .reparam import head_prefix, replace_module

FORMAT = "swr-task-store/1"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")


def task_name(text: str) -> str:
    """A store task name from free text (a task id like ``glyphs:sketch`` -> ``glyphs-sketch``)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")
    return name[:100] or "task"


class TaskStore:
    """A store folder (see the module docstring); open one with ``TaskStore(root)``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        index = self.root / "store.json"
        if not index.is_file():
            raise SwrError(f"{self.root} is not a task store (no store.json); create it with "
                           "swr store add --checkpoint DIR (or --backbone NAME --weights FILE)")
        self.index = read_json(index, "task store index")
        if not isinstance(self.index, dict) or self.index.get("format") != FORMAT \
                or not isinstance(self.index.get("tasks"), dict):
            raise SwrError(f"{index} is not a swr task store index (format {FORMAT}); "
                           "recreate the store")

    # -- creating and editing -------------------------------------------------------
    @classmethod
    def create(cls, root: str | os.PathLike, base: nn.Module, backbone: str,
               data_config: Optional[dict] = None, source: Optional[dict] = None) -> "TaskStore":
        """A new, empty store at ``root`` holding a copy of ``base`` (a plain model)."""
        from .tasks.backbones import save_checkpoint

        root = Path(root)
        if (root / "store.json").exists():
            raise SwrError(f"{root} already holds a task store; add tasks to it, or pick "
                           "another folder")
        save_checkpoint(base, root / "base.safetensors", backbone=backbone)
        write_json(root / "store.json", {
            "format": FORMAT, "backbone": backbone, "base_hash": base_hash(base),
            "data_config": data_config, "base": source or {}, "base_file": "base.safetensors",
            "tasks": {}})
        return cls(root)

    @property
    def backbone(self) -> str:
        return str(self.index["backbone"])

    def _save(self) -> None:
        write_json(self.root / "store.json", self.index)

    def add(self, delta: str | os.PathLike, name: Optional[str] = None,
            classes: Optional[Sequence[str]] = None, replace: bool = False) -> dict:
        """Copy task delta file ``delta`` into the store as task ``name``; returns its entry.

        ``name`` defaults to the delta's task id made file-safe; ``classes`` to the
        class names in the delta's metadata (else ``class_0``, ``class_1``, ...). A delta
        made for other base weights raises :class:`~swr.errors.ForeignDeltaError`.
        """
        tensors, meta = read_task_delta(delta)
        if meta["base_hash"] != self.index["base_hash"]:
            raise ForeignDeltaError(
                f"task delta {delta} was made for base weights {meta['base_hash']}, but this "
                f"store's base hashes to {self.index['base_hash']}; add it to a store of the "
                "base it was trained from")
        name = name or task_name(str(meta.get("task") or Path(delta).stem))
        if not _NAME.match(name):
            raise SwrError(f"task name {name!r}: use letters, digits, '-', '_' and '.' "
                           "(at most 100, starting with a letter or digit)")
        if name in self.index["tasks"] and not replace:
            raise SwrError(f"task {name!r} is already in {self.root}; remove it first or pass "
                           "--replace")
        n = meta.get("num_classes")
        head = meta.get("head")
        if n is None and head:
            w = tensors.get(f"head/{head}.weight")
            n = None if w is None else int(w.shape[0])
        if classes is None:
            classes = meta.get("classes")
        if classes is None:
            classes = [f"class_{i}" for i in range(int(n or 0))]
        classes = [str(c) for c in classes]
        if n is not None and len(classes) != n:
            raise SwrError(f"{len(classes)} class names given for task delta {delta}, whose head "
                           f"has {n} classes")
        rel = f"tasks/{name}.safetensors"
        with atomic_path(self.root / rel) as tmp:
            shutil.copyfile(delta, tmp)
        entry = {"file": rel, "task": meta.get("task"), "method": meta.get("method"),
                 "classes": classes, "preprocess": meta.get("preprocess"),
                 "bytes": (self.root / rel).stat().st_size,
                 "layers": len(meta.get("selection") or [])}
        self.index["tasks"][name] = entry
        self._save()  # the index names the task only once its file is complete
        return entry

    def remove(self, name: str) -> None:
        """Remove task ``name`` (its index entry first, then its file)."""
        entry = self.index["tasks"].pop(name, None)
        if entry is None:
            raise SwrError(f"no task {name!r} in {self.root}; it holds: "
                           f"{', '.join(self.index['tasks']) or 'none'}")
        self._save()
        (self.root / entry["file"]).unlink(missing_ok=True)

    def list(self) -> list[dict]:
        """One dict per task: name, task id, method, classes, delta file size in bytes."""
        return [{"name": n, "task": e.get("task"), "method": e.get("method"),
                 "classes": len(e.get("classes") or []), "bytes": e.get("bytes"),
                 "layers": e.get("layers")}
                for n, e in sorted(self.index["tasks"].items())]

    def entry(self, name: str) -> dict:
        """The index entry of task ``name``; an unknown name raises :class:`SwrError`."""
        if name not in self.index["tasks"]:
            raise SwrError(f"no task {name!r} in {self.root}; it holds: "
                           f"{', '.join(sorted(self.index['tasks'])) or 'none'}")
        return self.index["tasks"][name]

    # -- using ------------------------------------------------------------------------
    def load(self, device: str | torch.device = "cpu") -> "MultiTaskModel":
        """Load the base once and return the switchable model (no task active)."""
        from .tasks.backbones import create_backbone

        model = create_backbone(self.backbone, weights=self.root / self.index["base_file"])
        have = base_hash(model)
        if have != self.index["base_hash"]:
            raise SwrError(f"{self.root / self.index['base_file']} hashes to {have}, not the "
                           f"store's {self.index['base_hash']}; the store is damaged, recreate it")
        return MultiTaskModel(model.to(device).eval(), self)


class MultiTaskModel(nn.Module):
    """A base model with one of a store's tasks merged in; :meth:`set_task` switches it."""

    def __init__(self, model: nn.Module, store: TaskStore):
        super().__init__()
        self.model = model
        self.store = store
        self.active_task: Optional[str] = None
        self._head = head_prefix(model)
        # a plain dict: the base head must not register as a submodule of this wrapper
        self._stash = {"head": model.get_submodule(self._head) if self._head else None}
        self._base_num_classes = getattr(model, "num_classes", None)
        self._saved: dict[str, torch.Tensor] = {}  # pristine copies of what the task changed
        self._deltas: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def tasks(self) -> list[str]:
        return sorted(self.store.index["tasks"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _delta(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self._deltas:  # read once, kept in memory: later switches read nothing
            tensors, meta = read_task_delta(self.store.root / self.store.entry(name)["file"])
            if meta["base_hash"] != self.store.index["base_hash"]:
                raise ForeignDeltaError(f"task {name!r} of {self.store.root} was made for other "
                                        "base weights; remove and re-add it")
            self._deltas[name] = tensors
        return self._deltas[name]

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base exactly: saved tensors back, the base head back in place."""
        state = self.model.state_dict()
        for key, t in self._saved.items():
            state[key].copy_(t)
        self._saved.clear()
        base_head = self._stash["head"]
        if self._head is not None and self.model.get_submodule(self._head) is not base_head:
            replace_module(self.model, self._head, base_head)
            if self._base_num_classes is not None:
                self.model.num_classes = self._base_num_classes
            self.model.train(self.model.training)  # the head back in the model's mode
        self.active_task = None

    @torch.no_grad()
    def set_task(self, name: Optional[str]) -> "MultiTaskModel":
        """Make ``name`` the active task in place (None: the plain base); returns self."""
        if name == self.active_task:
            return self
        tensors = self._delta(name) if name is not None else {}
        self.unmerge()
        if name is None:
            return self
        heads = {k: t for k, t in tensors.items() if k.startswith("head/")}
        if heads:
            weight = heads.get(f"head/{self._head}.weight")
            if self._head is None or weight is None:
                raise SwrError(f"task {name!r}: its head does not fit the store's base model")
            n = int(weight.shape[0])
            base_head = self._stash["head"]
            like = getattr(base_head, "weight", None)
            if like is not None and like.shape[0] == n:
                # as apply_task_delta keeps a head of the right size: same dtype, same results
                replace_module(self.model, self._head, copy.deepcopy(base_head))
            else:
                self.model.reset_classifier(n)
                if like is not None:
                    self.model.get_submodule(self._head).to(like.device)
            # new modules start in training mode (dropout on): give them the model's mode
            self.model.train(self.model.training)
        state = self.model.state_dict()
        for key, t in tensors.items():
            kind, _, target_key = key.partition("/")
            target = state.get(target_key)
            if target is None or target.shape != t.shape:
                self.unmerge()
                raise SwrError(f"task {name!r}: {target_key} does not fit the store's base model")
            if kind == "delta":
                self._saved[target_key] = target.clone()
                # the same operands and op as apply_task_delta: bit-identical results
                target.copy_(target + t.to(device=target.device, dtype=target.dtype))
            elif kind == "norm":
                self._saved[target_key] = target.clone()
                target.copy_(t)
            elif kind == "head":
                target.copy_(t)
            else:
                self.unmerge()
                raise SwrError(f"task {name!r} holds an unknown entry {key}; re-export it")
        self.active_task = name
        return self

    def classes(self, name: Optional[str] = None) -> list[str]:
        """Class names of task ``name`` (default: the active task)."""
        name = name or self.active_task
        if name is None:
            raise SwrError("no task is active; call set_task(name) first")
        return list(self.store.entry(name)["classes"])


# -- predicting on files ------------------------------------------------------------------
def _image_input(path: Path, pre: dict) -> torch.Tensor:
    from .tasks.imagefolder import IMAGENET_MEAN, IMAGENET_STD, image_transforms, read_image

    crop = pre.get("crop_pct")
    _, evaluate = image_transforms(
        int(pre.get("image_size") or 224), cropped=not crop,
        mean=tuple(pre.get("mean") or IMAGENET_MEAN), std=tuple(pre.get("std") or IMAGENET_STD),
        interpolation=pre.get("interpolation") or "bilinear", crop_pct=float(crop or 1.0))
    return evaluate(read_image(path))  # the task's own evaluation transform


def _audio_input(path: Path) -> torch.Tensor:
    from .tasks.audio import read_audio
    from .tasks.features import LogMel

    return LogMel()(read_audio(path))[0]


def task_preprocess_of(store: TaskStore, name: str) -> dict:
    """The preprocessing recorded with task ``name``, or the base's (older deltas)."""
    pre = store.entry(name).get("preprocess")
    if isinstance(pre, dict) and pre.get("modality") in ("audio", "image"):
        return pre
    if store.backbone.startswith("bcresnet-"):
        return {"modality": "audio"}
    from .tasks.imagefolder import data_config_kwargs

    kw = data_config_kwargs(store.index.get("data_config"))
    return {"modality": "image", "image_size": kw.get("image_size", 224),
            "crop_pct": kw.get("crop_pct", 0.875), "interpolation": kw.get("interpolation"),
            "mean": list(kw.get("mean", (0.485, 0.456, 0.406))),
            "std": list(kw.get("std", (0.229, 0.224, 0.225)))}


def load_input(path: str | os.PathLike, pre: dict) -> torch.Tensor:
    """One model input from a wav/flac/ogg or image file, prepared as ``pre`` says."""
    path = Path(path)
    if not path.is_file():
        raise SwrError(f"input file not found: {path}")
    audio = path.suffix.lower() in AUDIO_SUFFIXES
    if audio != (pre["modality"] == "audio"):
        raise SwrError(f"{path} is {'an audio' if audio else 'an image'} file, but the task "
                       f"takes {pre['modality']} input")
    return _audio_input(path) if audio else _image_input(path, pre)


@torch.no_grad()
def predict_files(model: MultiTaskModel, name: str, files: Sequence[str | os.PathLike],
                  top: int = 3) -> list[dict]:
    """Switch ``model`` to task ``name`` and classify ``files``; one dict per file.

    Each holds ``file``, ``label`` (the most probable class), ``probability`` and
    ``top``, the ``top`` most probable classes with their probabilities.
    """
    model.set_task(name)
    pre = task_preprocess_of(model.store, name)
    classes = model.classes(name)
    device = next(model.model.parameters()).device
    out = []
    for f in files:
        x = load_input(f, pre).unsqueeze(0).to(device)
        probs = torch.softmax(model(x).float(), dim=-1)[0].cpu()
        k = min(top, len(classes))
        p, idx = probs.topk(k)
        ranked = [{"label": classes[i], "probability": float(q)}
                  for q, i in zip(p.tolist(), idx.tolist())]
        out.append({"file": str(f), "label": ranked[0]["label"],
                    "probability": ranked[0]["probability"], "top": ranked})
    return out


def create_or_open(root: str | os.PathLike, base_spec=None) -> TaskStore:
    """Open the store at ``root``, or create it from ``base_spec`` (a :class:`BaseSpec`)."""
    from .source import load_base

    if (Path(root) / "store.json").is_file():
        store = TaskStore(root)
        if base_spec is not None:
            model, desc = load_base(base_spec)
            if base_hash(model) != store.index["base_hash"]:
                raise ForeignDeltaError(f"{base_spec} is not the base of the store {root}; "
                                        "drop --checkpoint/--weights or use another folder")
        return store
    if base_spec is None:
        raise SwrError(f"{root} holds no task store yet; the first add needs its base: "
                       "--checkpoint DIR or --backbone NAME --weights FILE")
    model, desc = load_base(base_spec)
    return TaskStore.create(root, model, desc["backbone"], desc.get("data_config"),
                            desc.get("base"))


__all__ = ["MultiTaskModel", "TaskStore", "create_or_open", "load_input", "predict_files",
           "task_name"]
