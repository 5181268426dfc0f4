"""Google Speech Commands v2, 12-class keyword-spotting protocol.

Classes: the ten keywords ``yes no up down left right on off stop go``, ``_unknown_``
(every other word folder) and ``_silence_`` (1 s crops of the recordings in
``_background_noise_/``). Validation and test files are those named in
``validation_list.txt`` and ``testing_list.txt``; train is every other clip.

Balance follows the TensorFlow ``speech_commands`` recipe that BC-ResNet and most
KWS papers use: in each split, ``_unknown_`` is a seeded random sample of the
non-keyword clips and ``_silence_`` a seeded set of noise crops, each
``ceil(fraction * keyword clips in that split)`` items (10% by default, so each is
about the size of one keyword class). Note the separately released v2 test archive
(4,890 clips) is a different, fixed test set; this loader builds the list-based one.
"""

from __future__ import annotations

import math
import os
from pathlib import Path, PurePosixPath
from typing import Sequence

import torch
from torch.utils.data import ConcatDataset

from swr.errors import SwrError

from .audio import CLIP_SAMPLES, fix_length, read_audio
from .base import Task
from .datasets import (ClipLogMel, FileDataset, GeneratedDataset, Item, OnBadFile,
                       check_fraction, check_no_class_lost, check_on_bad_file,
                       check_relative_path, class_counts, deterministic_subset, probe_audio,
                       probe_items, record_skip, seeded_rng)
from .features import SpecAugment

KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
UNKNOWN = "_unknown_"
SILENCE = "_silence_"
CLASS_NAMES = [*KEYWORDS, UNKNOWN, SILENCE]
NOISE_FOLDER = "_background_noise_"
VALIDATION_LIST = "validation_list.txt"
TESTING_LIST = "testing_list.txt"


class BackgroundNoise:
    """Mix a random crop of a background recording into waveforms, at a random gain.

    Acts on one waveform ``(T,)`` or a batch ``(B, T)``: each waveform, with
    probability ``prob``, gets ``gain * crop`` added with ``gain ~ U(0, max_gain)``,
    then is clipped to [-1, 1]. The TensorFlow recipe uses ``prob=0.8, max_gain=0.1``.
    Draws come from ``generator`` (torch's global generator when ``None``, which
    DataLoader seeds per worker).
    """

    def __init__(self, bank: Sequence[torch.Tensor], prob: float = 0.8, max_gain: float = 0.1,
                 generator: torch.Generator | None = None):
        if not bank:
            raise SwrError("background noise augmentation needs at least one noise recording")
        self.bank = list(bank)
        self.prob = float(prob)
        self.max_gain = float(max_gain)
        self.generator = generator

    def _draw(self, high: int) -> int:
        return int(torch.randint(high, (), generator=self.generator))

    def __call__(self, wav: torch.Tensor) -> torch.Tensor:
        batch = wav.unsqueeze(0) if wav.dim() == 1 else wav
        out = batch.clone()
        length = batch.shape[-1]
        for b in range(len(batch)):
            if float(torch.rand((), generator=self.generator)) >= self.prob:
                continue
            noise = self.bank[self._draw(len(self.bank))]
            if len(noise) < length:
                noise = fix_length(noise, length)
            start = self._draw(len(noise) - length + 1)
            gain = float(torch.rand((), generator=self.generator)) * self.max_gain
            out[b] += gain * noise[start:start + length]
        out.clamp_(-1.0, 1.0)
        return out[0] if wav.dim() == 1 else out


class NoiseCrops:
    """Silence clip ``i``: a fixed crop of a background recording at a fixed gain."""

    def __init__(self, bank: Sequence[torch.Tensor], crops: Sequence[tuple[int, int, float]]):
        self.bank = list(bank)
        self.crops = list(crops)

    def __call__(self, index: int) -> torch.Tensor:
        f, start, gain = self.crops[index]
        return gain * fix_length(self.bank[f][start:start + CLIP_SAMPLES])


def _noise_crops(bank: Sequence[torch.Tensor], n: int, seed: int, split: str
                 ) -> list[tuple[int, int, float]]:
    """``n`` seeded ``(recording, start, gain)`` crops; gain ~ U(0, 1) as in the TF recipe."""
    rng = seeded_rng(seed, "silence", split)
    crops = []
    for _ in range(n):
        f = rng.randrange(len(bank))
        start = rng.randrange(max(1, len(bank[f]) - CLIP_SAMPLES + 1))
        crops.append((f, start, rng.random()))
    return crops


def _load_noise_bank(root: Path, on_bad_file: OnBadFile, skipped: list[str]) -> list[torch.Tensor]:
    """Every recording in ``_background_noise_/``, mono 16 kHz, full length."""
    folder = root / NOISE_FOLDER
    if not folder.is_dir():
        raise SwrError(f"Speech Commands folder {root} has no {NOISE_FOLDER}/ folder ({folder}); "
                       f"it is needed for the {SILENCE} class and noise augmentation")
    bank = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.suffix.lower() != ".wav":
            continue
        try:
            bank.append(read_audio(p, length=None))
        except SwrError as e:
            if on_bad_file == "fail":
                raise
            record_skip(skipped, p, e)
    if not bank:
        raise SwrError(f"{folder} holds no readable .wav recordings; restore the folder "
                       f"from the Speech Commands archive")
    return bank


def _read_list(root: Path, name: str, words: set[str]) -> list[str]:
    """The entries of a split list, each checked to be ``<word>/<file>`` inside ``root``."""
    file = root / name
    if not file.is_file():
        raise SwrError(f"Speech Commands split list {file} not found; the v0.02 archive "
                       f"ships {VALIDATION_LIST} and {TESTING_LIST} at its root")
    try:
        text = file.read_text(encoding="utf-8-sig")  # a BOM (Windows editors) is not a path
    except UnicodeDecodeError as e:
        raise SwrError(f"{file} is not UTF-8 text ({e.reason} at byte {e.start}); restore it "
                       f"from the Speech Commands archive") from None
    entries = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        source = f"{file}:{lineno}"
        rel = PurePosixPath(check_relative_path(line, source, root).replace("\\", "/"))
        if len(rel.parts) != 2 or rel.parts[0] not in words:
            raise SwrError(f"{source}: entry {line.strip()!r} is not <word>/<clip>.wav for a word "
                           f"folder of {root}; fix or delete the line")
        entries.append(rel.as_posix())
    return entries


def load_speechcommands(path: str | os.PathLike, on_bad_file: OnBadFile = "fail",
                        silence_fraction: float = 0.1, unknown_fraction: float = 0.1,
                        seed: int = 0, spec_augment: bool = False, noise_prob: float = 0.0,
                        noise_max_gain: float = 0.1) -> Task:
    """The 12-class Speech Commands v2 task from the extracted archive at ``path``.

    Items are log-mel ``(1, 40, 101)`` computed per clip on access. ``spec_augment``
    sets ``task.train_transform`` to :class:`SpecAugment` (a batch transform);
    ``noise_prob > 0`` mixes background noise into training waveforms before the
    log-mel (:class:`BackgroundNoise`; the TF recipe uses 0.8 and gain 0.1). All
    sampling (unknown subset, silence crops) is keyed by ``seed``. Every clip's header
    is checked at load: an unreadable file raises :class:`SwrError` naming it, or with
    ``on_bad_file="skip"`` is dropped and listed in ``task.info["skipped"]``.
    """
    root = Path(path)
    policy = check_on_bad_file(on_bad_file)
    check_fraction("silence_fraction", silence_fraction)
    check_fraction("unknown_fraction", unknown_fraction)
    if not 0.0 <= noise_prob <= 1.0:
        raise SwrError(f"noise_prob must lie in [0, 1], got {noise_prob!r}")
    if not root.is_dir():
        raise SwrError(f"Speech Commands folder not found: {root}")
    missing = [k for k in KEYWORDS if not (root / k).is_dir()]
    if missing:
        raise SwrError(f"Speech Commands folder {root} lacks keyword folder(s) "
                       f"{', '.join(missing)}; point to the extracted v0.02 archive")

    words = sorted(d.name for d in root.iterdir()
                   if d.is_dir() and not d.name.startswith(("_", ".")))
    listed = {"val": _read_list(root, VALIDATION_LIST, set(words)),
              "test": _read_list(root, TESTING_LIST, set(words))}
    overlap = set(listed["val"]) & set(listed["test"])
    if overlap:
        raise SwrError(f"{sorted(overlap)[0]} is listed in both {VALIDATION_LIST} and "
                       f"{TESTING_LIST} of {root}; a clip must belong to one split")
    held = set(listed["val"]) | set(listed["test"])
    on_disk = [f"{w}/{f.name}" for w in words for f in sorted((root / w).iterdir())
               if f.suffix.lower() == ".wav" and not f.name.startswith(".")]
    rel_paths = {"train": [r for r in on_disk if r not in held], **listed}

    label_of = {k: i for i, k in enumerate(KEYWORDS)}
    unknown_label = CLASS_NAMES.index(UNKNOWN)
    silence_label = CLASS_NAMES.index(SILENCE)
    skipped: list[str] = []
    items: dict[str, list[Item]] = {}
    n_silence: dict[str, int] = {}
    for split, rels in rel_paths.items():
        known = [(root / r, label_of[r.split("/")[0]]) for r in rels if r.split("/")[0] in label_of]
        unknown = [(root / r, unknown_label) for r in rels if r.split("/")[0] not in label_of]
        if not known:
            raise SwrError(f"the {split} split of {root} holds no keyword clips; check "
                           f"{VALIDATION_LIST}, {TESTING_LIST} and the keyword folders")
        unknown = deterministic_subset(unknown, math.ceil(unknown_fraction * len(known)),
                                       seed, "unknown", split)
        items[split] = probe_items(known + unknown, probe_audio, policy, skipped)
        if split == "train":
            check_no_class_lost(known + unknown, items[split], CLASS_NAMES, split, root)
        n_silence[split] = math.ceil(silence_fraction * len(known))

    bank = (_load_noise_bank(root, policy, skipped)
            if noise_prob > 0 or any(n_silence.values()) else [])
    augment = BackgroundNoise(bank, noise_prob, noise_max_gain) if noise_prob > 0 else None
    features = {"train": ClipLogMel(augment), "val": ClipLogMel(), "test": ClipLogMel()}
    splits = {}
    for split, split_items in items.items():
        words_ds = FileDataset(split_items, read_audio, features[split], policy, skipped)
        silence_ds = GeneratedDataset(
            n_silence[split], NoiseCrops(bank, _noise_crops(bank, n_silence[split], seed, split)),
            silence_label, features[split])
        splits[split] = ConcatDataset([words_ds, silence_ds])
    return Task(
        id=f"speechcommands:{path}", modality="audio", class_names=list(CLASS_NAMES),
        input_shape=(1, 40, 101), **splits,
        train_transform=SpecAugment() if spec_augment else None,
        info={"root": str(root), "skipped": skipped, "seed": seed,
              "unknown_fraction": unknown_fraction, "silence_fraction": silence_fraction,
              "noise_prob": noise_prob, "noise_max_gain": noise_max_gain,
              "class_counts": {k: class_counts(ds.datasets[0].labels + ds.datasets[1].labels,
                                               CLASS_NAMES) for k, ds in splits.items()}},
    )
