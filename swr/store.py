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

import contextlib
import copy
import os
import re
import shutil
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from .delta import base_hash, read_task_delta, read_task_delta_header
from .errors import ForeignDeltaError, SwrError
from .io import atomic_path, out_lock, read_json, write_json
from .reparam import head_prefix, replace_module
from .tasks.backbones import backbone_family, check_backbone_name
from .tasks.base import image_preprocess_problem

FORMAT = "swr-task-store/1"
#: seconds a store change waits for another one to finish before it is refused
LOCK_WAIT = 600.0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")


def task_name(text: str) -> str:
    """A store task name from free text (a task id like ``glyphs:sketch`` -> ``glyphs-sketch``)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")
    return name[:100] or "task"


def store_path(root: Path, rel: object, what: str, index: Path) -> Path:
    """``root / rel`` for a path ``store.json`` names, refused unless it lies inside ``root``.

    A store file is untrusted input: an absolute path, ``..`` or a symlink that leads
    out of the store would make ``store remove`` delete, or ``store load`` read, a
    file elsewhere.
    """
    if not isinstance(rel, str) or not rel or "\x00" in rel or Path(rel).is_absolute():
        raise SwrError(f"{index}: {what} {rel!r} is not a relative path inside the store; "
                       "the store is damaged, recreate it")
    top = root.resolve()
    path = (root / rel).resolve()
    if top not in path.parents:
        raise SwrError(f"{index}: {what} {rel!r} leads outside the store {root}; the store is "
                       "damaged, recreate it")
    return root / rel


def _damaged(index: Path, key: str, why: str) -> SwrError:
    return SwrError(f"{index}: {key} {why}; the store is damaged, recreate it or remove the task")


def _check_preprocess(pre: object, index: Path, key: str) -> None:
    if pre is None:
        return
    if not isinstance(pre, dict) or pre.get("modality") not in ("audio", "image"):
        raise _damaged(index, key, "must be an object with modality 'audio' or 'image'")
    if pre["modality"] != "image":
        return
    problem = image_preprocess_problem(pre)
    if problem is not None:
        raise _damaged(index, f"{key}.{problem[0]}", problem[1])


def validate_index(data: object, root: Path, index: Path) -> dict:
    """The one check of a ``store.json``: its shape, its names and every path it holds.

    Returns ``data``; anything else raises :class:`SwrError` naming the file and key.
    """
    if not isinstance(data, dict) or data.get("format") != FORMAT \
            or not isinstance(data.get("tasks"), dict):
        raise SwrError(f"{index} is not a swr task store index (format {FORMAT}); "
                       "recreate the store")
    backbone = data.get("backbone")
    if not isinstance(backbone, str):
        raise _damaged(index, "backbone", "must be a backbone name")
    try:
        check_backbone_name(backbone)
    except SwrError as e:
        raise _damaged(index, "backbone", f"{backbone!r} is not a backbone swr knows ({e})")
    if not isinstance(data.get("base_hash"), str) or not data["base_hash"]:
        raise _damaged(index, "base_hash", "must be the base's hash")
    store_path(root, data.get("base_file"), "base_file", index)
    for name, entry in data["tasks"].items():
        key = f"tasks.{name}"
        if not _NAME.match(name):
            raise _damaged(index, key, "is not a valid task name")
        if not isinstance(entry, dict):
            raise _damaged(index, key, "must be an object")
        file = store_path(root, entry.get("file"), f"{key}.file", index)
        if file.parent.resolve() != (root / "tasks").resolve():
            raise _damaged(index, f"{key}.file", f"{entry.get('file')!r} must lie in tasks/")
        classes = entry.get("classes")
        if not (isinstance(classes, list) and len(classes) >= 2
                and all(isinstance(c, str) and c for c in classes)):
            raise _damaged(index, f"{key}.classes", "must list at least two class names")
        if len(set(classes)) != len(classes):
            raise _damaged(index, f"{key}.classes", "names a class twice")
        _check_preprocess(entry.get("preprocess"), index, f"{key}.preprocess")
    return data


def clean_temporary_files(root: Path) -> None:
    """Delete what interrupted writes left in a store (hidden ``*.tmp`` files).

    Called only while holding the store's lock, so no running write loses its file.
    """
    for folder in (root, root / "tasks"):
        if folder.is_dir() and not folder.is_symlink():
            for p in folder.iterdir():
                if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file() \
                        and not p.is_symlink():
                    p.unlink(missing_ok=True)


class TaskStore:
    """A store folder (see the module docstring); open one with ``TaskStore(root)``.

    Every change (:meth:`add`, :meth:`remove`, :meth:`create`) holds the store's lock
    (``.lock``) and reads ``store.json`` afresh under it, so two writers never lose
    each other's task; a second writer while one runs is refused with one line.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        index = self.root / "store.json"
        if not index.is_file():
            raise SwrError(f"{self.root} is not a task store (no store.json); create it with "
                           "swr store add --checkpoint DIR (or --backbone NAME --weights FILE)")
        self.index = self._read()
        # temporary files of a killed write are removed when no writer holds the store
        # (a store on read-only storage is read as it is)
        with contextlib.suppress(SwrError, OSError):
            with out_lock(self.root, "store", option="store"):
                clean_temporary_files(self.root)

    def _read(self) -> dict:
        path = self.root / "store.json"
        return validate_index(read_json(path, "task store index"), self.root, path)

    @contextlib.contextmanager
    def _editing(self) -> Iterator[dict]:
        """Hold the store's lock and yield ``store.json`` read afresh; saved on success."""
        with out_lock(self.root, "store", option="store", wait=LOCK_WAIT):
            self.index = self._read()
            clean_temporary_files(self.root)
            yield self.index
            self._save()

    # -- creating and editing -------------------------------------------------------
    @classmethod
    def create(cls, root: str | os.PathLike, base: nn.Module, backbone: str,
               data_config: Optional[dict] = None, source: Optional[dict] = None) -> "TaskStore":
        """A new, empty store at ``root`` holding a copy of ``base`` (a plain model)."""
        from .tasks.backbones import save_checkpoint

        root = Path(root)
        with out_lock(root, "store", option="store", wait=LOCK_WAIT):
            if (root / "store.json").exists():
                raise SwrError(f"{root} already holds a task store; add tasks to it, or pick "
                               "another folder")
            save_checkpoint(base, root / "base.safetensors", backbone=backbone)
            write_json(root / "store.json", {
                "format": FORMAT, "backbone": backbone, "base_hash": base_hash(base),
                "data_config": data_config, "base": source or {},
                "base_file": "base.safetensors", "tasks": {}})
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
        with self._editing():
            return self._add(delta, name, classes, replace)

    def _add(self, delta, name, classes, replace) -> dict:
        _, meta = read_task_delta_header(delta)
        if meta["base_hash"] != self.index["base_hash"]:
            raise ForeignDeltaError(
                f"task delta {delta} was made for base weights {meta['base_hash']}, but this "
                f"store's base hashes to {self.index['base_hash']}; add it to a store of the "
                "base it was trained from")
        # the check every reader makes, against this store's base, before it is copied in
        tensors, meta = read_task_delta(delta, self.load().model, backbone=self.backbone)
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
        if len(set(classes)) != len(classes):
            twice = next(c for c in classes if classes.count(c) > 1)
            raise SwrError(f"class name {twice!r} is given twice for task delta {delta}; "
                           "class names must differ")
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
        self.index["tasks"][name] = entry  # saved by _editing: named once its file is complete
        return entry

    def remove(self, name: str) -> None:
        """Remove task ``name`` (its index entry first, then its file)."""
        with self._editing():
            entry = self.index["tasks"].pop(name, None)
            if entry is None:
                raise SwrError(f"no task {name!r} in {self.root}; it holds: "
                               f"{', '.join(self.index['tasks']) or 'none'}")
            file = self.root / entry["file"]  # inside the store: validate_index checked it
        # the index no longer names it: a crash now leaves an unlisted file, never a lost task
        if file.is_file() and not file.is_symlink():
            file.unlink(missing_ok=True)

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

        # every path of the index lies inside the store: validate_index checked it on reading
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
            path = self.store.root / self.store.entry(name)["file"]  # validated on reading
            _, meta = read_task_delta_header(path)
            if meta["base_hash"] != self.store.index["base_hash"]:
                raise ForeignDeltaError(f"task {name!r} of {self.store.root} was made for other "
                                        "base weights; remove and re-add it")
            # checked as every reader checks a delta (the model's structure is the base's)
            tensors, _ = read_task_delta(path, self.model, backbone=self.store.backbone)
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
    if backbone_family(store.backbone).modality == "audio":
        return {"modality": "audio"}
    from .tasks.imagefolder import data_config_kwargs

    kw = data_config_kwargs(store.index.get("data_config"))
    return {"modality": "image", "image_size": kw.get("image_size", 224),
            "crop_pct": kw.get("crop_pct", 0.875), "interpolation": kw.get("interpolation"),
            "mean": list(kw.get("mean", (0.485, 0.456, 0.406))),
            "std": list(kw.get("std", (0.229, 0.224, 0.225)))}


def load_input(path: str | os.PathLike, pre: dict) -> torch.Tensor:
    """One model input from a wav/flac/ogg or image file, prepared as ``pre`` says."""
    from .tasks.base import not_a_regular_file

    path = Path(path)
    reason = not_a_regular_file(path)  # stat only: a FIFO is never opened (it would block)
    if reason == "file not found":
        raise SwrError(f"input file not found: {path}")
    if reason is not None:
        raise SwrError(f"input {path}: {reason}; give wav/flac/ogg or image files, or pass "
                       "--on-bad-file skip")
    audio = path.suffix.lower() in AUDIO_SUFFIXES
    if audio != (pre["modality"] == "audio"):
        raise SwrError(f"{path} is {'an audio' if audio else 'an image'} file, but the task "
                       f"takes {pre['modality']} input")
    return _audio_input(path) if audio else _image_input(path, pre)


@torch.no_grad()
def predict_files(model: MultiTaskModel, name: str, files: Sequence[str | os.PathLike],
                  top: int = 3, on_bad_file: str = "fail",
                  skipped: Optional[list[dict]] = None) -> list[dict]:
    """Switch ``model`` to task ``name`` and classify ``files``; one dict per file.

    Each holds ``file``, ``label`` (the most probable class), ``probability`` and
    ``top``, the ``top`` most probable classes with their probabilities. A file that
    cannot be read as the task's input raises :class:`SwrError` naming it, or with
    ``on_bad_file="skip"`` is left out and listed in ``skipped`` as
    ``{"file", "error"}``.
    """
    from .tasks.datasets import check_on_bad_file

    check_on_bad_file(on_bad_file)
    model.set_task(name)
    pre = task_preprocess_of(model.store, name)
    classes = model.classes(name)
    device = next(model.model.parameters()).device
    out = []
    for f in files:
        try:
            x = load_input(f, pre).unsqueeze(0).to(device)
        except SwrError as e:
            if on_bad_file == "fail":
                raise
            if skipped is not None:
                skipped.append({"file": str(f), "error": " ".join(str(e).split())})
            continue
        probs = torch.softmax(model(x).float(), dim=-1)[0].cpu()
        # a probability is a number: never print 'nan' or write NaN into the JSON
        if not bool(torch.isfinite(probs).all()):
            raise SwrError(f"task {name!r} of {model.store.root} gives NaN or infinite outputs "
                           f"for {f}; its delta or the store's base is damaged: remove the "
                           "task and add its delta again")
        k = min(top, len(classes))
        p, idx = probs.topk(k)
        ranked = [{"label": classes[i], "probability": float(q)}
                  for q, i in zip(p.tolist(), idx.tolist())]
        out.append({"file": str(f), "label": ranked[0]["label"],
                    "probability": ranked[0]["probability"], "top": ranked})
    return out


def create_or_open(root: str | os.PathLike, base_spec=None, delta=None) -> TaskStore:
    """Open the store at ``root``, or create it from ``base_spec`` (a :class:`BaseSpec`).

    A new store is created only if task delta file ``delta`` (when given: the one about
    to be added) passes :func:`~swr.delta.read_task_delta` against its base, so a refused
    first delta leaves no empty store behind.
    """
    from .source import load_base

    with out_lock(root, "store", option="store", wait=LOCK_WAIT):
        return _create_or_open(root, base_spec, load_base, delta)


def _create_or_open(root, base_spec, load_base, delta=None) -> TaskStore:
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
    if delta is not None:
        read_task_delta(delta, model, backbone=desc["backbone"], check_hash=True)
    return TaskStore.create(root, model, desc["backbone"], desc.get("data_config"),
                            desc.get("base"))


__all__ = ["MultiTaskModel", "TaskStore", "create_or_open", "load_input", "predict_files",
           "task_name"]
