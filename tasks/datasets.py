"""Shared pieces of the real-data loaders.

- :class:`FileDataset`: labelled files decoded lazily in ``__getitem__``, with an
  ``on_bad_file`` policy ("fail" raises naming the file, "skip" records it and moves on).
- :func:`probe_items`: a cheap header check of every file at load time, so most bad
  files surface before training starts instead of hours into it.
- :func:`resolve_inside`: paths read from a split list or CSV must stay inside the
  dataset folder.
- Deterministic splitting and subsampling keyed by strings (:func:`seeded_rng`), so
  one class's draw never depends on another's and runs repeat across processes.
- :class:`TransformedDataset` and :func:`cache_tensors` for callers that want a lazy
  split materialised as tensors.
"""

from __future__ import annotations

import logging
import random
import re
from collections import defaultdict
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Literal, Sequence

import torch
from torch.utils.data import Dataset, TensorDataset

from swr.errors import SwrError

from .audio import audio_header
from .base import materialize, tensor_split
from .features import LogMel

log = logging.getLogger(__name__)

OnBadFile = Literal["fail", "skip"]
Item = tuple[Path, int]

_DRIVE = re.compile(r"^[A-Za-z]:")  # "C:\x" or "C:x" in a manifest written on Windows
_SEPARATORS = re.compile(r"[\\/]")


def check_on_bad_file(value: str) -> OnBadFile:
    """``value`` if it is a valid bad-file policy, else :class:`SwrError`."""
    if value not in ("fail", "skip"):
        raise SwrError(f"on_bad_file must be 'fail' or 'skip', got {value!r}")
    return value  # type: ignore[return-value]


def check_fraction(name: str, value: float, low_open: bool = False) -> float:
    """``value`` if it lies in [0, 1) ((0, 1) with ``low_open``), else :class:`SwrError`."""
    ok = (0.0 < value < 1.0) if low_open else (0.0 <= value < 1.0)
    if not ok:
        bounds = "(0, 1)" if low_open else "[0, 1)"
        raise SwrError(f"{name} must lie in {bounds}, got {value!r}")
    return float(value)


def check_relative_path(rel: str, source: str, root: Path) -> str:
    """``rel`` stripped, if it names a path inside ``root``; else :class:`SwrError`.

    The error names ``source`` (e.g. ``"validation_list.txt:12"``) and the path. The
    check is lexical and string-only (cheap enough for millions of CSV rows):
    absolute paths, drive letters and any ``..`` component (with ``/`` or ``\\`` as
    separator) are refused. Symlinks inside the dataset are the user's own layout
    and are followed when the file is read.
    """
    text = rel.strip()
    if not text:
        raise SwrError(f"{source}: empty path; fix or delete the entry")
    if text.startswith(("/", "\\")) or _DRIVE.match(text):
        raise SwrError(f"{source}: path {text!r} is absolute; entries must be relative to {root}")
    if ".." in _SEPARATORS.split(text):
        raise SwrError(f"{source}: path {text!r} leaves the dataset folder {root} via '..'; "
                       f"fix or delete the entry")
    return text


def resolve_inside(root: Path, rel: str, source: str) -> Path:
    """``root / rel`` for a path read from a manifest (``source``, e.g. ``"list.txt:12"``).

    Refuses, with :class:`SwrError`, any path that could leave ``root``
    (see :func:`check_relative_path`).
    """
    return root / PurePosixPath(check_relative_path(rel, source, root).replace("\\", "/"))


def record_skip(skipped: list[str], path: Path, error: SwrError) -> None:
    """Add ``path`` to ``skipped`` (once) and log why it was skipped."""
    if str(path) not in skipped:
        skipped.append(str(path))
        log.warning("on_bad_file=skip: %s", error)


def probe_items(items: Sequence[Item], probe: Callable[[Path], None], on_bad_file: OnBadFile,
                skipped: list[str]) -> list[Item]:
    """The items whose file passes ``probe`` (which raises :class:`SwrError` naming a bad file).

    With "fail" the first bad file's error propagates; with "skip" bad files are
    appended to ``skipped`` and dropped.
    """
    kept = []
    for path, label in items:
        try:
            probe(path)
        except SwrError as e:
            if on_bad_file == "fail":
                raise
            record_skip(skipped, path, e)
            continue
        kept.append((path, label))
    return kept


def check_no_class_lost(before: Sequence[Item], after: Sequence[Item],
                        class_names: Sequence[str], split: str, where: object) -> None:
    """Raise :class:`SwrError` if a class with files in ``before`` has none in ``after``.

    ``after`` is what :func:`probe_items` kept of ``before`` with ``on_bad_file="skip"``:
    a class whose every training file was unreadable would be trained without a single
    example, never predicted, and scored as if absent. The error names the class, the
    split, ``where`` (the dataset) and one of its files.
    """
    left = {label for _, label in after}
    for path, label in before:
        if label not in left:
            n = sum(1 for _, y in before if y == label)
            raise SwrError(f"class {class_names[label]!r} has no readable {split} file left in "
                           f"{where}: its {n} file(s) were unreadable and skipped (e.g. {path}); "
                           f"fix or replace them, or remove the class")


class FileDataset(Dataset):
    """Labelled files decoded on access: item ``i`` is ``(transform(decode(path)), label)``.

    ``decode`` raises :class:`SwrError` naming the file when it cannot be read. With
    ``on_bad_file="fail"`` that error propagates. With ``"skip"`` the file is recorded
    in ``skipped`` (a list shared with the task's ``info``) and the next readable item
    of the split is returned in its place, so one bad file found mid-training does not
    end a long run. In DataLoader worker processes ``skipped`` is a per-worker copy:
    files skipped there are logged but not reported back to the parent.
    """

    def __init__(self, items: Sequence[tuple[Path | str, int]], decode: Callable[[Path], Any],
                 transform: Callable[[Any], torch.Tensor] | None = None,
                 on_bad_file: OnBadFile = "fail", skipped: list[str] | None = None):
        self.items: list[Item] = [(Path(p), int(y)) for p, y in items]
        self.decode = decode
        self.transform = transform
        self.on_bad_file = check_on_bad_file(on_bad_file)
        self.skipped = skipped if skipped is not None else []
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> list[int]:
        """The label of every item, in order (no decoding)."""
        return [y for _, y in self.items]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self.items)
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} items")
        for k in range(n):
            j = (index + k) % n
            if j in self._bad:
                continue
            path, label = self.items[j]
            try:
                x = self.decode(path)
            except SwrError as e:
                if self.on_bad_file == "fail":
                    raise
                self._bad.add(j)
                record_skip(self.skipped, path, e)
                continue
            return (self.transform(x) if self.transform is not None else x), label
        raise SwrError(f"every file of this split is unreadable (e.g. {self.items[index][0]}); "
                       f"check the dataset folder")


class GeneratedDataset(Dataset):
    """``n`` items of one ``label``: item ``i`` is ``transform(make(i))``, ``make`` deterministic.

    Used for the ``_silence_`` class: crops of background recordings or synthetic noise.
    """

    def __init__(self, n: int, make: Callable[[int], torch.Tensor], label: int,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.n = int(n)
        self.make = make
        self.label = int(label)
        self.transform = transform

    def __len__(self) -> int:
        return self.n

    @property
    def labels(self) -> list[int]:
        """The label of every item, in order."""
        return [self.label] * self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} items")
        x = self.make(index)
        return (self.transform(x) if self.transform is not None else x), self.label


class TransformedDataset(Dataset):
    """``(transform(x), y)`` for each item ``(x, y)`` of ``base``, computed on access.

    E.g. a frozen backbone's features over a lazy split, then :func:`cache_tensors`.
    """

    def __init__(self, base: Dataset, transform: Callable[[torch.Tensor], torch.Tensor]):
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        x, y = self.base[index]
        return self.transform(x), y


def cache_tensors(ds: Dataset, batch_size: int = 256) -> TensorDataset:
    """Decode every item of ``ds`` once and hold the split in memory as tensors.

    Random per-item augmentation (an image train split) is frozen at the draw made
    here, so cache evaluation splits, or a train split built without augmentation.
    """
    if len(ds) == 0:  # type: ignore[arg-type]
        raise SwrError("cannot cache an empty split")
    x, y = materialize(ds, batch_size=batch_size)
    return tensor_split(x, y)


def seeded_rng(seed: int, *keys: object) -> random.Random:
    """A ``random.Random`` seeded by ``seed`` and ``keys`` joined into one string.

    String seeds are hashed with SHA-512 (unlike ``hash()``, not salted per process),
    so draws repeat across runs, and keying by class/split keeps one draw independent
    of the others.
    """
    return random.Random(":".join(str(k) for k in (seed, *keys)))


def stratified_holdout(items: Sequence[Item], fraction: float, seed: int
                       ) -> tuple[list[Item], list[Item]]:
    """Split ``items`` into ``(kept, held_out)`` with ``fraction`` of each label held out.

    Per label: ``round(fraction * n)`` files, at least one, but always leaving one in
    ``kept`` (a label with a single file is never held out). The draw is keyed by seed
    and label and made on the sorted paths, so it ignores directory listing order.
    """
    by_label: dict[int, list[Item]] = defaultdict(list)
    for item in items:
        by_label[item[1]].append(item)
    kept: list[Item] = []
    held: list[Item] = []
    for label in sorted(by_label):
        group = sorted(by_label[label])
        n_held = min(len(group) - 1, max(1, round(fraction * len(group))))
        chosen = set(seeded_rng(seed, "holdout", label).sample(range(len(group)), n_held))
        for i, item in enumerate(group):
            (held if i in chosen else kept).append(item)
    return kept, held


def deterministic_subset(items: Sequence[Item], n: int, seed: int, *keys: object) -> list[Item]:
    """``n`` of ``items`` drawn without replacement (all if fewer), keyed by seed and ``keys``."""
    pool = sorted(items)
    if n >= len(pool):
        return pool
    return sorted(seeded_rng(seed, *keys).sample(pool, n))


# Audio clips, shared by the Speech Commands and MSWC loaders.

def probe_audio(path: Path) -> None:
    """Raise :class:`~.audio.BadAudioFile` unless ``path``'s header passes
    :func:`~.audio.audio_header`, the check :func:`~.audio.read_audio` makes first."""
    audio_header(path)


class ClipLogMel:
    """A 1 s waveform ``(T,)`` -> log-mel ``(1, 40, 101)``.

    ``augment`` (training only) acts on the waveform first, e.g. mixing in background
    noise, which must happen before the log.
    """

    def __init__(self, augment: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.logmel = LogMel()
        self.augment = augment

    def __call__(self, wav: torch.Tensor) -> torch.Tensor:
        if self.augment is not None:
            wav = self.augment(wav)
        return self.logmel(wav)[0]


def class_counts(labels: Sequence[int], class_names: Sequence[str]) -> dict[str, int]:
    """How many items of each class, by name (for ``task.info``)."""
    counts = [0] * len(class_names)
    for y in labels:
        counts[y] += 1
    return dict(zip(class_names, counts))
