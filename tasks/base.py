"""What defines a transfer problem: a :class:`Task` with train/val/test splits.

Every task resolves to tensors the backbone consumes directly: audio tasks yield
log-mel spectrograms ``(1, n_mels, frames)``, image tasks yield ``(3, H, W)`` float
images. Small tasks (the embedded suites) hold their splits in memory as tensors,
which makes evaluation a plain loop over pre-batched tensors.
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from swr.errors import SwrError


@dataclass
class Task:
    """A downstream (or source) classification task.

    ``train_transform`` is applied to a *batch* of training inputs on the fly
    (e.g. SpecAugment); evaluation splits are never augmented.
    ``shift_test`` is an optional distribution-shifted test split (unseen speakers,
    noisier audio, unseen fonts) used by the robustness reports.
    """

    id: str
    modality: str  # "audio" | "image"
    class_names: list[str]
    train: Dataset
    val: Dataset
    test: Dataset
    input_shape: tuple[int, ...]
    shift_test: Optional[Dataset] = None
    train_transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def data_hash(self) -> str:
        """SHA-256 (hex, first 16 chars) of what training reads: the class names, the
        train and validation splits (see :func:`dataset_hash`) and a user's
        :class:`DataOverride` of their preparation; computed once per task.

        Caches and resumable runs key on it, so replaced or added data never reuses
        results made from the old data.
        """
        cached = self.__dict__.get("_data_hash")
        if cached is None:
            h = hashlib.sha256(repr(list(self.class_names)).encode())
            # files are hashed by path, not pixels: a user's other size or normalisation
            # of the same files is other data (absent otherwise, so earlier hashes hold)
            if self.info.get("data_override"):
                h.update(repr(sorted(self.info["data_override"].items())).encode())
            for split in (self.train, self.val):
                dataset_hash(split, h)
            cached = self.__dict__["_data_hash"] = h.hexdigest()[:16]
        return cached

    def loader(self, split: str, batch_size: int = 64, shuffle: bool | None = None,
               seed: int = 0, num_workers: int = 0) -> DataLoader:
        """A DataLoader over ``split`` ("train", "val", "test", "shift_test")."""
        ds = getattr(self, split)
        if ds is None:
            raise ValueError(f"task {self.id} has no split {split!r}")
        if shuffle is None:
            shuffle = split == "train"
        g = torch.Generator().manual_seed(seed)
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g,
                          num_workers=num_workers, drop_last=False)


def tensor_split(x: torch.Tensor, y: torch.Tensor) -> TensorDataset:
    """An in-memory split; ``x`` float inputs, ``y`` int64 labels."""
    if len(x) != len(y):
        raise ValueError(f"inputs ({len(x)}) and labels ({len(y)}) differ in length")
    return TensorDataset(x.float().contiguous(), y.long())


def _hash_tensor(t: torch.Tensor, h) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def dataset_hash(ds: Dataset, h=None):
    """Feed the content of split ``ds`` into hash ``h`` (a new SHA-256 when None); return ``h``.

    In-memory splits hash their tensors' bytes. Splits of files decoded on access
    (``items`` of ``(path, label)``) hash each file's path, label, size and
    modification time instead of decoding them all, so a replaced file changes the
    hash without reading the dataset. Concatenations, subsets and wrappers hash what
    they are made of; generated items (the ``_silence_`` class) hash their count,
    label and the recordings they crop. Any other dataset is decoded item by item.
    """
    from torch.utils.data import ConcatDataset, Subset

    h = h if h is not None else hashlib.sha256()
    h.update(type(ds).__name__.encode())
    if isinstance(ds, TensorDataset):
        for t in ds.tensors:
            _hash_tensor(t, h)
    elif isinstance(ds, ConcatDataset):
        for part in ds.datasets:
            dataset_hash(part, h)
    elif isinstance(ds, Subset):
        h.update(repr(list(ds.indices)).encode())
        dataset_hash(ds.dataset, h)
    elif isinstance(getattr(ds, "items", None), list):
        for path, label in ds.items:
            try:
                st = os.stat(path)
                sig = f"{st.st_size}|{st.st_mtime_ns}"
            except OSError as e:  # reading it will fail (or skip it) the same way
                sig = type(e).__name__
            h.update(f"{path}|{label}|{sig}\n".encode())
    elif hasattr(ds, "make") and hasattr(ds, "label") and hasattr(ds, "n"):
        h.update(f"{ds.n}|{ds.label}|".encode())
        make = ds.make
        for t in getattr(make, "bank", []) or []:
            _hash_tensor(torch.as_tensor(t), h)
        settings = getattr(make, "__dict__", {})  # crops, gains, seeds: what it draws
        h.update(repr(sorted((k, v) for k, v in settings.items() if k != "bank")).encode())
    elif hasattr(ds, "base") and isinstance(ds.base, Dataset):
        dataset_hash(ds.base, h)
    else:
        for x, y in DataLoader(ds, batch_size=256, shuffle=False):
            _hash_tensor(torch.as_tensor(x), h)
            _hash_tensor(torch.as_tensor(y), h)
    return h


def materialize(ds: Dataset, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """All of a split as two tensors ``(x, y)``; cheap for TensorDataset."""
    if isinstance(ds, TensorDataset):
        return ds.tensors[0], ds.tensors[1]
    xs, ys = [], []
    for x, y in DataLoader(ds, batch_size=batch_size, shuffle=False):
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"))


def not_a_regular_file(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be read as a data file (``None`` when it is a regular file).

    Uses ``stat`` (following symlinks) and never opens the path: opening a FIFO named
    like a clip or image blocks until something writes to it, which would hang a load
    forever; a device could be read without end.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "file not found"
    except OSError as e:  # a symlink loop, a name too long, no permission...
        return e.strerror or type(e).__name__
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    return f"it is {kind}, not a regular file"


def split_labels(ds: Dataset) -> list[int]:
    """The label of every example of ``ds``, in order: from the tensors of an in-memory
    split, a ``labels`` attribute (file-backed splits, no decoding), else by reading."""
    if isinstance(ds, TensorDataset):
        return [int(y) for y in ds.tensors[1].tolist()]
    labels = getattr(ds, "labels", None)
    if labels is not None:
        return [int(y) for y in labels]
    return [int(ds[i][1]) for i in range(len(ds))]


def few_shot(task: Task, shots: int, seed: int = 0) -> Task:
    """``task`` with at most ``shots`` training examples per class, drawn with ``seed``.

    The other splits are kept whole, so the scores stay comparable with the full task;
    the id gets a ``?shots=N`` suffix and the data hash follows the subset. A class
    with fewer examples keeps all of them (``info["shots"]`` records the counts).
    """
    import dataclasses

    from torch.utils.data import Subset

    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise SwrError(f"task {task.id}: shots must be a positive integer, got {shots!r}")
    labels = split_labels(task.train)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=g).tolist()
    taken: dict[int, int] = {}
    keep = []
    for i in order:
        if taken.get(labels[i], 0) < shots:
            taken[labels[i]] = taken.get(labels[i], 0) + 1
            keep.append(i)
    keep.sort()  # the split's own order: training shuffles it anyway
    if isinstance(task.train, TensorDataset):
        idx = torch.tensor(keep, dtype=torch.long)
        train: Dataset = TensorDataset(*(t[idx] for t in task.train.tensors))
    else:
        train = Subset(task.train, keep)
        train.labels = [labels[i] for i in keep]  # type: ignore[attr-defined]
    info = {**task.info, "shots": {task.class_names[c]: n for c, n in sorted(taken.items())}}
    out = dataclasses.replace(task, id=f"{task.id}?shots={shots}", train=train, info=info)
    out.__dict__.pop("_data_hash", None)
    return out


def task_preprocess(task) -> dict:
    """How to turn one input file into a model input for ``task`` (stored with its delta).

    Audio: 1 s mono 16 kHz clip -> log-mel ``(1, 40, 101)``. Images: the evaluation
    transform the task used (size, crop, mean, std, interpolation).
    """
    info = getattr(task, "info", {}) or {}
    if task.modality == "audio":
        return {"modality": "audio", "input_shape": list(task.input_shape)}
    pre = info.get("preprocess")
    if isinstance(pre, dict):
        return {"modality": "image", **pre}
    size = int(task.input_shape[-1])
    return {"modality": "image", "image_size": size, "crop_pct": None,
            "interpolation": "bilinear", "mean": info.get("mean"), "std": info.get("std")}


#: The image sizes (pixels) an image preprocessing may ask for.
IMAGE_SIZES = (8, 4096)


def image_preprocess_problem(pre: dict) -> Optional[tuple[str, str]]:
    """The first of ``pre``'s ``image_size``, ``mean``, ``std`` and ``crop_pct`` (each
    optional) that is out of bounds, as ``(key, "VALUE must be ...")``; None when all
    are fine. The one check of an image preprocessing, whether a store recorded it or a
    user typed it (:class:`DataOverride`)."""
    low, high = IMAGE_SIZES
    size = pre.get("image_size")
    if size is not None and not (isinstance(size, int) and not isinstance(size, bool)
                                 and low <= size <= high):
        return "image_size", f"{size!r} must be a whole number of pixels from {low} to {high}"
    for name, positive in (("mean", False), ("std", True)):
        v = pre.get(name)
        if v is None:
            continue
        if not (isinstance(v, list) and len(v) == 3 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                and (x > 0 if positive else True) for x in v)):
            return name, f"{v!r} must be 3 finite numbers" + (", each above 0" if positive else "")
    crop = pre.get("crop_pct")
    if crop is not None and not (isinstance(crop, (int, float)) and not isinstance(crop, bool)
                                 and 0 < crop <= 1):
        return "crop_pct", f"{crop!r} must be in (0, 1]"
    return None


@dataclass(frozen=True)
class DataOverride:
    """A user's image size and normalisation (``--image-size``, ``--mean``, ``--std``),
    replacing those of the data config an image task would otherwise be prepared with
    (the base's own, see :func:`swr.source.load_base`).

    Unset fields keep the base's value. One ``mean`` or ``std`` value stands for all
    three channels. Checked when made (:func:`image_preprocess_problem`): a bad value
    raises :class:`SwrError` naming the option.
    """

    image_size: Optional[int] = None
    mean: Optional[Sequence[float]] = None
    std: Optional[Sequence[float]] = None

    def __post_init__(self) -> None:
        for name in ("mean", "std"):
            v = getattr(self, name)
            if v is not None:
                v = tuple(v)
                object.__setattr__(self, name, v * 3 if len(v) == 1 else v)
        problem = image_preprocess_problem(
            {"image_size": self.image_size,
             **{k: list(getattr(self, k)) for k in ("mean", "std")
                if getattr(self, k) is not None}})
        if problem is not None:
            key, why = problem
            hint = ("" if key == "image_size" else
                    f"; give one value for all channels or three (R,G,B), e.g. --{key} 0.5")
            raise SwrError(f"--{key.replace('_', '-')} {why}{hint}")

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.image_size, self.mean, self.std))

    def as_dict(self) -> dict:
        """The set fields (for ``metrics.json``, ``selection.json``, fingerprints)."""
        out: dict = {}
        if self.image_size is not None:
            out["image_size"] = self.image_size
        for key in ("mean", "std"):
            if getattr(self, key) is not None:
                out[key] = [float(x) for x in getattr(self, key)]
        return out

    @classmethod
    def from_dict(cls, d: object, where: str) -> Optional["DataOverride"]:
        """The inverse of :meth:`as_dict` (None for None or ``{}``), read from file ``where``."""
        if d is None or d == {}:
            return None
        if not isinstance(d, dict) or set(d) - {"image_size", "mean", "std"} or not all(
                isinstance(d.get(k), (list, type(None))) for k in ("mean", "std")):
            raise SwrError(f"{where}: 'data_override' must map image_size, mean and std to "
                           "values; write the file again with swr")
        try:
            return cls(d.get("image_size"), d.get("mean"), d.get("std"))
        except SwrError as e:
            raise SwrError(f"{where}: data_override {e}; write the file again with swr") from None

    def apply(self, data_config: Optional[dict]) -> dict:
        """``data_config`` (a timm data config, or None) with these values in place."""
        out = dict(data_config or {})
        if self.image_size is not None:
            out["input_size"] = [3, self.image_size, self.image_size]
        for key in ("mean", "std"):
            if getattr(self, key) is not None:
                out[key] = [float(x) for x in getattr(self, key)]
        return out

    def apply_to_preprocess(self, pre: dict) -> dict:
        """An image ``preprocess`` record (:func:`task_preprocess`) with these values in place."""
        return {**pre, **self.as_dict()}
