"""Real-data loaders on tiny fixtures written in each dataset's on-disk format."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from swr.errors import SwrError
from swr.tasks.audio import BadAudioFile
from swr.tasks.datasets import (FileDataset, TransformedDataset, cache_tensors,
                                deterministic_subset, resolve_inside, stratified_holdout)
from swr.tasks.imagefolder import IMAGENET_MEAN, IMAGENET_STD, load_imagefolder
from swr.tasks.mswc import load_mswc
from swr.tasks.speechcommands import (CLASS_NAMES, KEYWORDS, BackgroundNoise,
                                      load_speechcommands)

from fixtures import write_clip

# Clip formats cycled through the fixtures so resampling and mixdown both run.
FORMATS = [(16000, 1, 1.0), (8000, 2, 0.5), (44100, 1, 1.5), (16000, 2, 1.2)]


def ids(ds) -> list[str]:
    """The file names behind a split (FileDataset part of a ConcatDataset)."""
    part = ds.datasets[0] if hasattr(ds, "datasets") else ds
    return [p.name for p, _ in part.items]


# ---------------------------------------------------------------- shared helpers

def test_resolve_inside_accepts_relative_and_refuses_escapes(tmp_path):
    assert resolve_inside(tmp_path, " yes/a.wav\n", "list:1") == tmp_path / "yes" / "a.wav"
    for bad in ["../x.wav", "yes/../../x.wav", "/etc/passwd", "C:\\x.wav", "..\\x.wav", "  "]:
        with pytest.raises(SwrError, match="list:7"):
            resolve_inside(tmp_path, bad, "list:7")


def test_stratified_holdout_is_seeded_per_class_and_keeps_one_in_train():
    items = [(Path(f"c{c}/{i}.jpg"), c) for c in range(3) for i in range(10 if c else 1)]
    kept, held = stratified_holdout(items, 0.2, seed=0)
    assert sorted(kept + held) == sorted(items)
    assert [sum(1 for _, y in held if y == c) for c in range(3)] == [0, 2, 2]
    assert stratified_holdout(list(reversed(items)), 0.2, seed=0) == (kept, held)
    assert any(stratified_holdout(items, 0.2, seed=s)[1] != held for s in range(1, 4))
    assert deterministic_subset(items, 4, 0, "k") == deterministic_subset(items[::-1], 4, 0, "k")


def test_file_dataset_skips_bad_file_found_on_access(tmp_path):
    def decode(p: Path) -> torch.Tensor:
        if p.name == "broken_clip.wav":
            raise BadAudioFile(p, "truncated")
        return torch.tensor([float(p.stem[-1])])

    items = [(tmp_path / "a1", 0), (tmp_path / "broken_clip.wav", 1), (tmp_path / "c3", 2)]
    with pytest.raises(SwrError, match="broken_clip.wav"):
        FileDataset(items, decode)[1]
    skipped: list[str] = []
    ds = FileDataset(items, decode, transform=lambda x: x * 10, on_bad_file="skip", skipped=skipped)
    x, y = ds[1]  # replaced by the next readable item
    assert (float(x), y) == (30.0, 2)
    assert skipped == [str(tmp_path / "broken_clip.wav")]
    ds[1]
    assert len(skipped) == 1


def test_transformed_dataset_and_cache_tensors():
    base = [(torch.full((2,), float(i)), i % 2) for i in range(5)]
    cached = cache_tensors(TransformedDataset(base, lambda x: x + 1), batch_size=2)
    x, y = cached.tensors
    assert x.shape == (5, 2) and torch.equal(x[:, 0], torch.arange(1.0, 6.0))
    assert y.dtype == torch.int64 and y.tolist() == [0, 1, 0, 1, 0]


# ---------------------------------------------------------------- image folders

COLORS = {"cat": (255, 0, 128), "dog": (0, 200, 50), "fish": (30, 30, 30)}


def make_imagefolder(root: Path, classes=("cat", "dog", "fish"), n_train=5, n_test=2) -> Path:
    for split, n in (("train", n_train), ("test", n_test)):
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                size = (40 + 7 * i, 30 + 5 * i)
                img = Image.new("RGB", size, COLORS.get(c, (9, 9, 9)))
                ext = [".jpg", ".png", ".JPEG", ".bmp"][i % 4]
                if i == 1:  # a grey and an RGBA file go through the RGB conversion
                    img = img.convert("L")
                elif i == 4:
                    img = img.convert("RGBA")
                    ext = ".png"
                img.save(folder / f"{c}_{i}{ext}")
            (folder / "notes.txt").write_text("not an image")
            (folder / ".cache").mkdir()
    return root


def test_imagefolder_splits_shapes_and_normalisation(tmp_path):
    root = make_imagefolder(tmp_path / "sketch")
    task = load_imagefolder(root, image_size=32, val_fraction=0.2, seed=0)
    assert task.class_names == ["cat", "dog", "fish"]
    assert task.modality == "image" and task.input_shape == (3, 32, 32)
    assert task.id == f"imagefolder:{root}"
    assert (len(task.train), len(task.val), len(task.test)) == (12, 3, 6)
    assert sorted(task.val.labels) == [0, 1, 2]
    assert task.info["skipped"] == []
    for split in ("train", "val", "test"):
        x, y = getattr(task, split)[0]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and type(x) is torch.Tensor
    x, y = task.test[0]  # a solid red-magenta cat: each channel is its normalised colour
    assert y == 0
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    expected = (torch.tensor(COLORS["cat"]) / 255 - mean) / std
    assert torch.allclose(x.mean(dim=(1, 2)), expected, atol=0.02)
    xb, yb = next(iter(task.loader("train", batch_size=4)))
    assert xb.shape == (4, 3, 32, 32) and yb.dtype == torch.int64

    again = load_imagefolder(root, image_size=32, val_fraction=0.2, seed=0)
    assert ids(again.val) == ids(task.val) and ids(again.train) == ids(task.train)
    others = [ids(load_imagefolder(root, image_size=32, val_fraction=0.2, seed=s).val)
              for s in (1, 2, 3)]
    assert any(o != ids(task.val) for o in others)

    cropped = load_imagefolder(root, image_size=24, val_fraction=0.2, cropped=True)
    assert cropped.train[0][0].shape == (3, 24, 24) and cropped.test[0][0].shape == (3, 24, 24)


def test_imagefolder_corrupt_image_fails_or_is_skipped(tmp_path):
    root = make_imagefolder(tmp_path / "sketch")
    (root / "test" / "dog" / "garbled_dog.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(SwrError, match="garbled_dog.png"):
        load_imagefolder(root, image_size=16)
    task = load_imagefolder(root, image_size=16, on_bad_file="skip")
    assert [Path(p).name for p in task.info["skipped"]] == ["garbled_dog.png"]
    assert len(task.test) == 6


def test_imagefolder_truncated_jpeg_found_on_access(tmp_path):
    root = make_imagefolder(tmp_path / "sketch", n_test=1)
    noisy = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    jpeg = root / "test" / "cat" / "cut_cat.jpg"
    Image.fromarray(noisy).save(jpeg, quality=95)
    jpeg.write_bytes(jpeg.read_bytes()[:2000])  # header intact, scan cut
    task = load_imagefolder(root, image_size=16)  # the header is fine: passes the load-time probe
    index = next(i for i, (p, _) in enumerate(task.test.items) if p.name == "cut_cat.jpg")
    with pytest.raises(SwrError, match="cut_cat.jpg"):
        task.test[index]
    task = load_imagefolder(root, image_size=16, on_bad_file="skip")
    x, _ = task.test[index]
    assert x.shape == (3, 16, 16)
    assert [Path(p).name for p in task.info["skipped"]] == ["cut_cat.jpg"]


def test_imagefolder_layout_errors_name_the_folder(tmp_path):
    root = make_imagefolder(tmp_path / "one", classes=("solo",))
    with pytest.raises(SwrError, match="single class"):
        load_imagefolder(root)

    root = make_imagefolder(tmp_path / "notest")
    for f in (root / "test").rglob("*"):
        if f.is_file():
            f.unlink()
    with pytest.raises(SwrError, match=re.escape(str(root / "test" / "cat"))):
        load_imagefolder(root)

    root = tmp_path / "lonely"
    (root / "train" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "train" / "a" / "x.png")
    (root / "train" / "b").mkdir()
    Image.new("RGB", (8, 8)).save(root / "train" / "b" / "x.png")
    with pytest.raises(SwrError, match=re.escape(str(root / "test"))):
        load_imagefolder(root)

    root = make_imagefolder(tmp_path / "mismatch")
    (root / "test" / "bird").mkdir()
    Image.new("RGB", (8, 8)).save(root / "test" / "bird" / "b.png")
    with pytest.raises(SwrError, match="'bird'"):
        load_imagefolder(root)

    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    with pytest.raises(SwrError, match=re.escape(str(empty / "train"))):
        load_imagefolder(empty)
    with pytest.raises(SwrError, match="val_fraction"):
        load_imagefolder(make_imagefolder(tmp_path / "vf"), val_fraction=1.0)


# ---------------------------------------------------------------- speech commands

UNKNOWN_WORDS = ("cat", "dog")


def make_speechcommands(root: Path) -> Path:
    """3 clips per keyword, 4 per unknown word; one of each word in val and in test."""
    val, test = [], []
    i = 0
    for word in (*KEYWORDS, *UNKNOWN_WORDS):
        n = 4 if word in UNKNOWN_WORDS else 3
        for k in range(n):
            name = f"{i:04x}abcd_nohash_{k}.wav"
            write_clip(root / word / name, i, *FORMATS[i % len(FORMATS)])
            i += 1
            if k == 0:
                val.append(f"{word}/{name}")
            elif k == 1:
                test.append(f"{word}/{name}")
    write_clip(root / "_background_noise_" / "white_noise.wav", 0, 16000, 1, 3.0)
    write_clip(root / "_background_noise_" / "running_tap.wav", 1, 44100, 2, 1.3)
    (root / "_background_noise_" / "README.md").write_text("noise")
    (root / "validation_list.txt").write_text("\n".join(val) + "\n")
    (root / "testing_list.txt").write_text("\n".join(test) + "\n")
    (root / "LICENSE").write_text("cc-by")
    return root


@pytest.fixture
def speech(tmp_path) -> Path:
    return make_speechcommands(tmp_path / "speech_commands_v0.02")


def test_speechcommands_classes_splits_and_items(speech):
    task = load_speechcommands(speech, silence_fraction=0.2, unknown_fraction=0.2)
    assert task.class_names == CLASS_NAMES and task.num_classes == 12
    assert task.modality == "audio" and task.input_shape == (1, 40, 101)
    # per split: 10 keyword clips, ceil(0.2*10)=2 unknown, 2 silence
    counts = task.info["class_counts"]
    assert counts["train"]["yes"] == 1 and counts["train"]["_unknown_"] == 2
    assert counts["val"]["_silence_"] == 2 and counts["test"]["_unknown_"] == 2
    assert (len(task.train), len(task.val), len(task.test)) == (14, 14, 14)
    val_names = set(ids(task.val))
    assert {n for n in val_names if n.endswith("_nohash_0.wav")} == val_names
    assert not val_names & set(ids(task.train)) and not val_names & set(ids(task.test))
    for split in ("train", "val", "test"):
        ds = getattr(task, split)
        for i in (0, len(ds) - 1):  # a word clip and a silence crop
            x, y = ds[i]
            assert x.shape == (1, 40, 101) and torch.isfinite(x).all()
        assert ds[len(ds) - 1][1] == CLASS_NAMES.index("_silence_")
    assert task.train_transform is None

    again = load_speechcommands(speech, silence_fraction=0.2, unknown_fraction=0.2)
    assert ids(again.train) == ids(task.train)
    assert torch.equal(again.val[len(again.val) - 1][0], task.val[len(task.val) - 1][0])


def test_speechcommands_augmentations(speech):
    task = load_speechcommands(speech, spec_augment=True, noise_prob=1.0, seed=3)
    batch = torch.stack([task.train[i][0] for i in range(4)])
    masked = task.train_transform(batch)
    assert masked.shape == batch.shape and not torch.equal(masked, batch)
    plain = load_speechcommands(speech, seed=3)
    assert not torch.equal(task.train[0][0], plain.train[0][0])  # noise mixed in
    assert torch.equal(task.val[0][0], plain.val[0][0])  # evaluation is never augmented

    noise = BackgroundNoise([torch.ones(20000)], prob=1.0, max_gain=0.1,
                            generator=torch.Generator().manual_seed(0))
    one, many = noise(torch.zeros(16000)), noise(torch.zeros(3, 16000))
    assert one.shape == (16000,) and many.shape == (3, 16000)
    assert 0 < float(one[0]) <= 0.1 and torch.all(many.std(dim=1) == 0)
    assert torch.equal(BackgroundNoise([torch.ones(10)], prob=0.0)(torch.zeros(5)), torch.zeros(5))


def test_speechcommands_missing_pieces_are_named(speech):
    (speech / "testing_list.txt").unlink()
    with pytest.raises(SwrError, match="testing_list.txt"):
        load_speechcommands(speech)


def test_speechcommands_missing_keyword_folder(speech):
    for f in (speech / "stop").iterdir():
        f.unlink()
    (speech / "stop").rmdir()
    with pytest.raises(SwrError, match="stop"):
        load_speechcommands(speech)


@pytest.mark.parametrize("entry", ["../outside/evil.wav", "/etc/passwd", "yes/../../x.wav"])
def test_speechcommands_refuses_list_entries_outside_root(speech, entry):
    with open(speech / "validation_list.txt", "a") as fh:
        fh.write(entry + "\n")
    with pytest.raises(SwrError, match="validation_list.txt:13"):
        load_speechcommands(speech)


def test_speechcommands_corrupt_clip_fails_or_is_skipped(speech):
    (speech / "yes" / "mangled_yes.wav").write_bytes(b"RIFF\x00\x00garbage" * 10)
    with pytest.raises(SwrError, match="mangled_yes.wav"):
        load_speechcommands(speech)
    task = load_speechcommands(speech, on_bad_file="skip", silence_fraction=0.0)
    assert [Path(p).name for p in task.info["skipped"]] == ["mangled_yes.wav"]
    assert task.info["class_counts"]["train"]["yes"] == 1
    assert task.info["class_counts"]["train"]["_silence_"] == 0


# ---------------------------------------------------------------- MSWC

# TRAIN clips per word: "alpha" 6, "beta" and "gamma" 5 (a tie), "delta" 3, "eta" 2.
MSWC_TRAIN = {"alpha": 6, "beta": 5, "gamma": 5, "delta": 3, "eta": 2}


def make_mswc(root: Path, lang: str = "xx", opus: bool = False) -> Path:
    lang_dir = root / lang
    rows = []
    i = 0
    for word, n_train in MSWC_TRAIN.items():
        for k, set_name in enumerate(["TRAIN"] * n_train + ["DEV", "TEST"]):
            stem = f"common_voice_{lang}_{i}"
            link = f"{word}/{stem}.opus"
            # converted corpora keep .opus links but hold .wav files
            write_clip(lang_dir / "clips" / word / f"{stem}.wav", i, *FORMATS[i % len(FORMATS)])
            rows.append({"SET": set_name, "LINK": link, "WORD": word, "VALID": "True",
                         "SPEAKER": f"spk{k % 3}", "GENDER": "NAN"})
            i += 1
    if opus:  # one real Opus clip, read by libsndfile
        link = "alpha/common_voice_real_opus.opus"
        sf.write(str(lang_dir / "clips" / link), 0.2 * np.random.default_rng(0).standard_normal(
            24000).astype(np.float32), 48000, format="OGG", subtype="OPUS")
        rows.append({"SET": "TRAIN", "LINK": link, "WORD": "alpha", "VALID": "True",
                     "SPEAKER": "spk9", "GENDER": "FEMALE"})
    write_splits(lang_dir / f"{lang}_splits.csv", rows)
    return root


def write_splits(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(
            fh, fieldnames=["SET", "LINK", "WORD", "VALID", "SPEAKER", "GENDER"])
        writer.writeheader()
        writer.writerows(rows)


def read_splits(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


OPUS_OK = "OPUS" in sf.available_subtypes("OGG")


def test_mswc_keywords_splits_and_items(tmp_path):
    root = make_mswc(tmp_path / "mswc", opus=OPUS_OK)
    task = load_mswc(root, "xx", n_keywords=2, min_count=2, unknown_fraction=0.5,
                     silence_fraction=0.5)
    # alpha has most TRAIN clips; beta beats gamma on the tie alphabetically
    assert task.class_names == ["alpha", "beta", "_unknown_", "_silence_"]
    assert task.id == f"mswc:{root}:xx" and task.input_shape == (1, 40, 101)
    n_alpha = 7 if OPUS_OK else 6
    assert task.info["keywords"] == {"alpha": n_alpha, "beta": 5}
    counts = task.info["class_counts"]
    n_known = n_alpha + 5
    assert counts["train"] == {"alpha": n_alpha, "beta": 5, "_unknown_": -(-n_known // 2),
                               "_silence_": -(-n_known // 2)}
    assert counts["val"] == {"alpha": 1, "beta": 1, "_unknown_": 1, "_silence_": 1}
    for split in ("train", "val", "test"):
        ds = getattr(task, split)
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (1, 40, 101) and torch.isfinite(x).all()
    silence = task.test[len(task.test) - 1][0]

    again = load_mswc(root / "xx", "xx", n_keywords=2, min_count=2, unknown_fraction=0.5,
                      silence_fraction=0.5)  # the language folder itself
    assert ids(again.train) == ids(task.train) and ids(again.test) == ids(task.test)
    assert torch.equal(again.test[len(again.test) - 1][0], silence)


@pytest.mark.skipif(not OPUS_OK, reason="libsndfile here has no Opus support")
def test_mswc_reads_opus(tmp_path):
    root = make_mswc(tmp_path / "mswc", opus=True)
    task = load_mswc(root, "xx", n_keywords=1, min_count=2, unknown_fraction=0.0)
    index = ids(task.train).index("common_voice_real_opus.opus")
    x, y = task.train[index]
    assert y == 0 and x.shape == (1, 40, 101) and x.std() > 0


def test_mswc_missing_csv_and_clips_are_named(tmp_path):
    root = make_mswc(tmp_path / "mswc")
    (root / "xx" / "xx_splits.csv").unlink()
    with pytest.raises(SwrError, match="xx_splits.csv"):
        load_mswc(root, "xx", n_keywords=2, min_count=2)
    with pytest.raises(SwrError, match=re.escape(str(root / "yy" / "clips"))):
        load_mswc(root, "yy")


def test_mswc_refuses_links_outside_clips(tmp_path):
    root = make_mswc(tmp_path / "mswc")
    table = root / "xx" / "xx_splits.csv"
    rows = read_splits(table)
    rows[20]["LINK"] = "../../../outside.wav"  # a non-keyword row: still refused
    write_splits(table, rows)
    with pytest.raises(SwrError, match=re.escape(f"{table}:22")):
        load_mswc(root, "xx", n_keywords=2, min_count=2)


def test_mswc_corrupt_clip_fails_or_is_skipped(tmp_path):
    root = make_mswc(tmp_path / "mswc")
    (root / "xx" / "clips" / "beta" / "common_voice_xx_8.wav").write_bytes(b"not audio at all")
    with pytest.raises(SwrError, match="common_voice_xx_8.wav"):
        load_mswc(root, "xx", n_keywords=2, min_count=2)
    task = load_mswc(root, "xx", n_keywords=2, min_count=2, on_bad_file="skip")
    assert [Path(p).name for p in task.info["skipped"]] == ["common_voice_xx_8.wav"]
    assert task.info["class_counts"]["train"]["beta"] == 4


def test_mswc_table_errors(tmp_path):
    root = make_mswc(tmp_path / "mswc")
    with pytest.raises(SwrError, match="an MSWC task needs 4 such keywords"):
        load_mswc(root, "xx", n_keywords=4, min_count=4)
    table = root / "xx" / "xx_splits.csv"
    rows = read_splits(table)
    rows[3]["SET"] = "HOLDOUT"
    write_splits(table, rows)
    with pytest.raises(SwrError, match=re.escape(f"{table}:5")):
        load_mswc(root, "xx", n_keywords=2, min_count=2)
