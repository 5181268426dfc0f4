"""Multilingual Spoken Words Corpus (MSWC): a keyword-spotting task per language.

On disk: ``<path>/<lang>/clips/<word>/<clip>.{opus,wav}`` and the split table
``<lang>_splits.csv`` (columns SET, LINK, WORD, VALID, SPEAKER, GENDER; SET in
TRAIN/DEV/TEST; LINK relative to ``clips/``, e.g. ``word/common_voice_xx_123.opus``).

Classes: the ``n_keywords`` words with the most TRAIN clips (ties broken
alphabetically; listed alphabetically; spellings that differ only by case are one
word, named in lower case), ``_unknown_`` (a seeded sample of the other
words' clips) and ``_silence_`` (generated low-level noise, since MSWC ships no
background recordings). As for Speech Commands, unknown and silence each hold
``ceil(fraction * keyword clips)`` items per split.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Iterator

import torch
from torch.utils.data import ConcatDataset

from swr.errors import SwrError

from .audio import CLIP_SAMPLES, read_audio
from .base import Task
from .datasets import (ClipLogMel, FileDataset, GeneratedDataset, Item, OnBadFile,
                       check_fraction, check_no_class_lost, check_on_bad_file,
                       check_relative_path, class_counts, probe_audio, probe_items, seeded_rng)
from .features import SpecAugment

log = logging.getLogger(__name__)

UNKNOWN = "_unknown_"
SILENCE = "_silence_"
SPLIT_OF_SET = {"TRAIN": "train", "DEV": "val", "TEST": "test"}
REQUIRED_COLUMNS = ("SET", "LINK", "WORD")
SILENCE_DBFS = (-80.0, -40.0)  # level range of the generated silence clips


def language_folder(root: Path, lang: str) -> Path:
    """The folder holding ``clips/`` for ``lang``: ``root/lang`` or, failing that, ``root``.

    ``root/<lang>/clips/`` is the corpus layout; a ``root`` that itself holds
    ``clips/`` is taken to be the language folder already.
    """
    if (root / lang / "clips").is_dir():
        return root / lang
    if (root / "clips").is_dir():
        return root
    raise SwrError(f"MSWC clips for language {lang!r} not found: neither {root / lang / 'clips'} "
                   f"nor {root / 'clips'} is a folder; point to the folder holding {lang}/clips/")


def splits_csv(root: Path, lang_dir: Path, lang: str) -> Path:
    """``<lang>_splits.csv`` in the language folder, or next to it in ``root``."""
    candidates = list(dict.fromkeys([lang_dir / f"{lang}_splits.csv", root / f"{lang}_splits.csv"]))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise SwrError(f"MSWC split table {candidates[0]} not found (also looked for "
                   f"{candidates[-1]}); extract {lang}_splits.csv from the corpus' splits archive")


def _rows(csv_path: Path, clips: Path) -> Iterator[tuple[str, str, str]]:
    """``(split, word, link)`` per row of the split table, each row checked."""
    try:
        yield from _parse_rows(csv_path, clips)
    except UnicodeDecodeError as e:
        raise SwrError(f"{csv_path} is not UTF-8 text ({e.reason} at byte {e.start}); restore "
                       f"it from the corpus' splits archive") from None
    except csv.Error as e:
        raise SwrError(f"{csv_path} is not a readable CSV table ({e}); restore it from the "
                       f"corpus' splits archive") from None


def _parse_rows(csv_path: Path, clips: Path) -> Iterator[tuple[str, str, str]]:
    # utf-8-sig: a table saved by a Windows editor starts with a BOM, which would
    # otherwise become part of the first column's name
    with open(csv_path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise SwrError(f"{csv_path} lacks column(s) {', '.join(missing)}; expected the MSWC "
                           f"header SET,LINK,WORD,VALID,SPEAKER,GENDER")
        for row in reader:
            source = f"{csv_path}:{reader.line_num}"
            set_name = (row["SET"] or "").strip()
            split = SPLIT_OF_SET.get(set_name.upper())
            if split is None:
                raise SwrError(f"{source}: SET is {set_name!r}, expected TRAIN, DEV or TEST")
            word = (row["WORD"] or "").strip()
            if not word:
                raise SwrError(f"{source}: the WORD column is empty; fix or delete the row")
            yield split, word, check_relative_path(row["LINK"] or "", source, clips)


def _clip_path(clips: Path, link: str) -> Path:
    """The file for ``link``, or the same clip with the other extension when only that exists.

    A corpus converted from Opus to WAV keeps the CSV's ``.opus`` links.
    """
    path = clips / PurePosixPath(link.replace("\\", "/"))
    if path.exists():
        return path
    other = {".opus": ".wav", ".wav": ".opus"}.get(path.suffix.lower())
    if other and path.with_suffix(other).exists():
        return path.with_suffix(other)
    return path  # missing: the probe reports it under the linked name


class NoiseClips:
    """Silence clip ``i``: white noise at a level drawn from ``SILENCE_DBFS``, seeded per clip."""

    def __init__(self, base_seed: int):
        self.base_seed = base_seed

    def __call__(self, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.base_seed + index)
        low, high = SILENCE_DBFS
        dbfs = low + (high - low) * float(torch.rand((), generator=g))
        return torch.randn(CLIP_SAMPLES, generator=g) * 10 ** (dbfs / 20)


def load_mswc(path: str | os.PathLike, lang: str, n_keywords: int = 10, min_count: int = 10,
              on_bad_file: OnBadFile = "fail", seed: int = 0, unknown_fraction: float = 0.1,
              silence_fraction: float = 0.1, spec_augment: bool = False) -> Task:
    """A keyword-spotting task for language ``lang`` of the MSWC corpus at ``path``.

    ``path`` is the corpus root (holding ``<lang>/clips/``) or the language folder
    itself (holding ``clips/``); ``<lang>_splits.csv`` is looked for in the language
    folder, then in ``path``. Keywords are the ``n_keywords`` most frequent TRAIN
    words, each needing at least ``min_count`` TRAIN clips. LINKs may point to
    ``.opus`` files that were converted to ``.wav`` (either is read). Items are
    log-mel ``(1, 40, 101)`` computed per clip on access; ``spec_augment`` sets
    ``task.train_transform``. Sampling (unknown subset, silence) is keyed by ``seed``.
    Every selected clip's header is checked at load; an unreadable or missing one
    raises :class:`SwrError` naming it, or with ``on_bad_file="skip"`` is dropped and
    listed in ``task.info["skipped"]``. Rows whose LINK leaves ``clips/`` are refused.
    """
    root = Path(path)
    policy = check_on_bad_file(on_bad_file)
    check_fraction("silence_fraction", silence_fraction)
    check_fraction("unknown_fraction", unknown_fraction)
    if not lang or "/" in lang or "\\" in lang or lang in (".", ".."):
        raise SwrError(f"MSWC language must be a language code such as 'en', got {lang!r}")
    if n_keywords < 1 or min_count < 1:
        raise SwrError(f"n_keywords and min_count must be at least 1, got {n_keywords} "
                       f"and {min_count}")
    if not root.is_dir():
        raise SwrError(f"MSWC folder not found: {root}")
    lang_dir = language_folder(root, lang)
    clips = lang_dir / "clips"
    table = splits_csv(root, lang_dir, lang)

    # Two streaming passes keep memory small for languages with millions of rows:
    # the first validates every row and counts clips, the second collects the
    # selected ones.
    # Words that differ only by case ("Eins", "eins") are one keyword: MSWC words are
    # lower-case, so a capitalised folder is a copy of the same word, and two classes
    # would split its clips between two labels for the same sound. They are merged
    # under the lower-case spelling and listed in task.info["merged_spellings"].
    spellings: dict[str, set[str]] = {}
    counts: Counter[tuple[str, str]] = Counter()
    for split, word, _ in _rows(table, clips):
        spellings.setdefault(word.lower(), set()).add(word)
        counts[(split, word.lower())] += 1
    merged = {w: sorted(v) for w, v in sorted(spellings.items()) if len(v) > 1}
    if merged:
        log.warning("MSWC %s: words differing only by case merged: %s", table,
                    "; ".join(f"{' + '.join(v)} -> {w}" for w, v in list(merged.items())[:5]))
    train_counts = {w: c for (s, w), c in counts.items() if s == "train"}
    ranked = sorted((w for w, c in train_counts.items() if c >= min_count),
                    key=lambda w: (-train_counts[w], w))
    if len(ranked) < n_keywords:
        raise SwrError(f"{table}: only {len(ranked)} words have at least {min_count} TRAIN clips; "
                       f"an MSWC task needs {n_keywords} such keywords: add TRAIN rows and clips "
                       f"for more words")
    keywords = ranked[:n_keywords]
    class_names = [*sorted(keywords), UNKNOWN, SILENCE]
    label_of = {w: i for i, w in enumerate(class_names[:n_keywords])}
    unknown_label, silence_label = n_keywords, n_keywords + 1

    n_known = {s: sum(counts[(s, w)] for w in keywords) for s in ("train", "val", "test")}
    for split, n in n_known.items():
        if n == 0:
            set_name = next(k for k, v in SPLIT_OF_SET.items() if v == split)
            raise SwrError(f"{table} has no {set_name} rows for the keywords "
                           f"{', '.join(keywords)}; check the table")
    n_unknown = {s: math.ceil(unknown_fraction * n) for s, n in n_known.items()}

    known: dict[str, list[Item]] = {s: [] for s in n_known}
    # Reservoir sampling draws the unknown subset in one pass without holding every
    # non-keyword row; it is deterministic for a given table and seed.
    reservoir: dict[str, list[str]] = {s: [] for s in n_known}
    seen = dict.fromkeys(n_known, 0)
    rngs = {s: seeded_rng(seed, "unknown", s) for s in n_known}
    for split, word, link in _rows(table, clips):
        word = word.lower()
        if word in label_of:
            known[split].append((_clip_path(clips, link), label_of[word]))
            continue
        seen[split] += 1
        if len(reservoir[split]) < n_unknown[split]:
            reservoir[split].append(link)
        else:
            j = rngs[split].randrange(seen[split])
            if j < n_unknown[split]:
                reservoir[split][j] = link

    skipped: list[str] = []
    splits = {}
    for split in n_known:
        unknown = [(_clip_path(clips, link), unknown_label) for link in sorted(reservoir[split])]
        split_items = probe_items(known[split] + unknown, probe_audio, policy, skipped)
        if split == "train":
            check_no_class_lost(known[split] + unknown, split_items, class_names, split, table)
        features = ClipLogMel()
        n_silence = math.ceil(silence_fraction * n_known[split])
        silence = NoiseClips(seeded_rng(seed, "silence", split).getrandbits(48))
        splits[split] = ConcatDataset([
            FileDataset(split_items, read_audio, features, policy, skipped),
            GeneratedDataset(n_silence, silence, silence_label, features)])
    return Task(
        id=f"mswc:{path}:{lang}", modality="audio", class_names=class_names,
        input_shape=(1, 40, 101), **splits,
        train_transform=SpecAugment() if spec_augment else None,
        info={"root": str(root), "language_folder": str(lang_dir), "splits_csv": str(table),
              "keywords": {w: train_counts[w] for w in keywords}, "skipped": skipped,
              "merged_spellings": merged,
              "seed": seed, "unknown_fraction": unknown_fraction,
              "silence_fraction": silence_fraction,
              "class_counts": {k: class_counts(ds.datasets[0].labels + ds.datasets[1].labels,
                                               class_names) for k, ds in splits.items()}},
    )
