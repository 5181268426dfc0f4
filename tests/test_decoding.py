"""Inputs that used to decode silently wrong: each built in its real format, each read
through the one image reader or the one audio reader (as the loaders and the predict
path read them), each either decoded the way an image viewer or player shows it or
refused with one line naming the file."""

from __future__ import annotations

import os
import struct
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image, ImageDraw

from swr.app.cli import main
from swr.errors import SwrError
from swr.selection import MIN_VAL_EXAMPLES
from swr.store import load_input
from swr.tasks.audio import MAX_AUDIO_SECONDS, BadAudioFile, read_audio
from swr.tasks.datasets import probe_audio
from swr.tasks.imagefolder import (MAX_IMAGE_PIXELS, BadImageFile, load_imagefolder,
                                   probe_image, read_image)
from swr.tasks.speechcommands import load_speechcommands

from fixtures import tiny_checkpoint
from test_loaders import make_speechcommands

# ---------------------------------------------------------------------------- images

GREY_16 = 23130  # of 65535: 90 of 255


def test_16_bit_grey_png_is_scaled_by_its_bit_depth(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((12, 16), GREY_16, np.uint16)).save(path)
    with Image.open(path) as im:
        assert im.mode == "I;16"  # a real 16-bit PNG
    image = read_image(path)
    assert image.mode == "RGB"
    assert image.getpixel((3, 3)) == pytest.approx((GREY_16 / 65535 * 255,) * 3, abs=0.5)
    # the predict path reads it the same way (it used to come out white)
    pre = {"modality": "image", "image_size": 8, "crop_pct": None,
           "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    x = load_input(path, pre)
    assert x.shape == (3, 8, 8)
    assert torch.allclose(x, torch.full_like(x, GREY_16 / 65535), atol=1 / 255)


def test_rgba_drawn_in_alpha_is_composited_on_white(tmp_path):
    path = tmp_path / "alpha.png"
    im = Image.new("RGBA", (40, 30), (0, 0, 0, 0))  # black everywhere, drawn in alpha alone
    ImageDraw.Draw(im).ellipse((10, 5, 30, 25), fill=(0, 0, 0, 255))
    im.save(path)
    image = read_image(path)
    assert image.getpixel((1, 1)) == (255, 255, 255)  # transparent: the white below
    assert image.getpixel((20, 15)) == (0, 0, 0)  # the drawing
    # a palette image with a transparent colour, the same way
    pal = tmp_path / "pal.png"
    im.convert("P").save(pal, transparency=0)
    with Image.open(pal) as opened:
        assert opened.mode == "P" and "transparency" in opened.info
    image = read_image(pal)
    assert image.getpixel((1, 1)) == (255, 255, 255) and image.getpixel((20, 15)) == (0, 0, 0)


def test_exif_orientation_is_applied(tmp_path):
    """Orientation 6: the camera was turned a quarter; viewers show the picture upright."""
    path = tmp_path / "turned.jpg"
    im = Image.new("RGB", (40, 30), (220, 20, 20))
    ImageDraw.Draw(im).rectangle((20, 0, 39, 29), fill=(20, 20, 220))  # left red, right blue
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(path, exif=exif, quality=95)
    image = read_image(path)
    assert image.size == (30, 40)
    top, bottom = image.getpixel((15, 5)), image.getpixel((15, 34))
    assert top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0]  # left side now on top


def _bomb(path: Path, width: int, height: int) -> Path:
    Image.new("1", (width, height)).save(path)  # one bit a pixel: a small file
    return path


@pytest.mark.parametrize("width,height", [(12000, 12000), (9000, 9000)])
def test_decompression_bomb_is_one_line_and_no_warning(tmp_path, width, height):
    """12000 x 12000 is past twice PIL's cap (where PIL raises), 9000 x 9000 between the
    cap and twice it (where PIL warns and decodes): both one line, before any decoding."""
    path = _bomb(tmp_path / "bomb.png", width, height)
    assert path.stat().st_size < 100_000 and width * height > MAX_IMAGE_PIXELS
    tracemalloc.start()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for read in (probe_image, read_image):
                with pytest.raises(BadImageFile) as info:
                    read(path)
                line = str(info.value)
                assert "\n" not in line and str(path) in line
                assert f"{width * height:,} pixels" in line and f"{MAX_IMAGE_PIXELS:,}" in line
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert peak < 20 * 2**20


def test_pixel_cap_holds_when_pil_cap_is_lifted(tmp_path, monkeypatch):
    """Another library lifting PIL's global cap does not lift the readers'."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    path = _bomb(tmp_path / "bomb.png", 12000, 12000)
    with pytest.raises(BadImageFile, match="144,000,000 pixels"):
        read_image(path)


# ----------------------------------------------------------------------------- audio

def _mono_wav(path: Path, frames: int = 16000, rate: int = 16000) -> Path:
    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(frames) / rate)
    sf.write(str(path), tone.astype(np.float32), rate, subtype="PCM_16")
    return path


def _refused_in_one_line(path: Path, needle: str) -> str:
    """Both the load-time probe and the reader refuse ``path`` fast, in bounded memory."""
    t0 = time.perf_counter()
    tracemalloc.start()
    try:
        for read in (probe_audio, read_audio):
            with pytest.raises(BadAudioFile) as info:
                read(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    line = str(info.value)
    assert "\n" not in line and str(path) in line and needle in line, line
    assert time.perf_counter() - t0 < 5 and peak < 5 * 2**20
    return line


def test_channel_count_that_contradicts_the_frame_size_is_refused(tmp_path):
    """A mono clip whose header was made to claim 8 channels (block align still 2 bytes)."""
    path = _mono_wav(tmp_path / "eight.wav")
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"fmt " and struct.unpack("<H", data[22:24]) == (1,)
    data[22:24] = struct.pack("<H", 8)
    path.write_bytes(bytes(data))
    assert sf.info(str(path)).channels == 8  # what libsndfile believes
    _refused_in_one_line(path, "8 channel(s)")


def _lying_header(path: Path, claimed: int) -> bytes:
    """A valid 16 kHz mono header whose data chunk claims ``claimed`` bytes, + 4 KB of it."""
    real = _mono_wav(path).read_bytes()
    head = bytearray(real[:44])
    assert head[36:40] == b"data"
    head[4:8] = struct.pack("<I", claimed + 36)
    head[40:44] = struct.pack("<I", claimed)
    return bytes(head) + real[44:4096]


def test_data_size_past_the_end_of_the_file_is_refused(tmp_path):
    path = tmp_path / "lies.wav"
    path.write_bytes(_lying_header(path, 1 << 30))
    assert path.stat().st_size == 4096
    _refused_in_one_line(path, "1,073,741,824 bytes")


def test_sparse_wav_claiming_a_gib_is_refused_fast(tmp_path):
    """4 KB on disk, 1 GiB long: 9 hours of audio by its header (it took 3 GB and 19 s)."""
    path = tmp_path / "sparse.wav"
    with open(path, "wb") as f:
        f.write(_lying_header(path, 1 << 30))
        f.truncate(44 + (1 << 30))  # the hole reads as zeros: the header no longer lies
    assert sf.info(str(path)).frames == 1 << 29
    line = _refused_in_one_line(path, f"more than the {MAX_AUDIO_SECONDS} s")
    assert "33,554 s" in line


def test_a_long_clip_is_read_only_where_the_clip_is_cut(tmp_path):
    """Two minutes at 16 kHz: the centre second, decoded from the frames around it alone."""
    path = tmp_path / "long.wav"
    rate, frames = 16000, 120 * 16000
    ramp = ((np.arange(frames) % 30000) - 15000) / 32768
    sf.write(str(path), ramp.astype(np.float32), rate, subtype="PCM_16")
    whole, _ = sf.read(str(path), dtype="float32")
    tracemalloc.start()
    try:
        clip = read_audio(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    start = (frames - 16000) // 2
    assert torch.equal(clip, torch.from_numpy(whole[start:start + 16000]))
    assert peak < frames * 4 // 8  # not the whole file (7.7 MB as float32)
    # resampled from another rate, the centre second still comes out
    path48 = _mono_wav(tmp_path / "long48.wav", frames=48000 * 30, rate=48000)
    assert read_audio(path48).shape == (16000,)


# ------------------------------------------------------------- classes and splits

def _image_folder(root: Path, train: dict[str, int]) -> Path:
    for split, counts in (("train", train), ("test", dict.fromkeys(train, 1))):
        for ci, (name, n) in enumerate(counts.items()):
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(n):
                Image.new("RGB", (24, 20), (60 * ci, 30 * k, 90)).save(folder / f"{k}.png")
    return root


def test_skip_that_empties_a_class_of_training_images_is_an_error(tmp_path):
    root = _image_folder(tmp_path / "img", {"a": 4, "b": 1})
    (root / "train" / "b" / "0.png").write_bytes(os.urandom(300))  # b's only train image
    with pytest.raises(BadImageFile, match="0.png"):
        load_imagefolder(root, image_size=16)
    with pytest.raises(SwrError) as info:
        load_imagefolder(root, image_size=16, on_bad_file="skip")
    line = str(info.value)
    assert "\n" not in line and "class 'b'" in line and "train" in line and "0.png" in line


def test_skip_that_empties_a_keyword_of_training_clips_is_an_error(tmp_path):
    root = make_speechcommands(tmp_path / "sc")
    train_clip = next(p for p in sorted((root / "yes").iterdir()) if p.stem.endswith("_2"))
    train_clip.write_bytes(os.urandom(300))  # "yes" has one training clip
    with pytest.raises(SwrError, match="class 'yes' has no readable train file"):
        load_speechcommands(root, on_bad_file="skip")


def test_search_on_a_validation_split_of_one_is_refused(tmp_path, capsys, monkeypatch):
    """Two images of a and one of b: one is held out for validation, and every selection
    would score 0 or 1 on it."""
    monkeypatch.setenv("SWR_CACHE", str(tmp_path / "cache"))
    root = _image_folder(tmp_path / "img", {"a": 2, "b": 1})
    ckpt = tiny_checkpoint(tmp_path / "ckpt", backbone="timm:resnet10t", n_classes=2)
    args = ["search", "--task", f"imagefolder:{root}", "--checkpoint", str(ckpt),
            "--budget=10%", "--out", str(tmp_path / "out"), "--workers", "0", "--device",
            "cpu", "--supernet-epochs", "1", "--evaluations", "2", "--policy", "random"]
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert "1 validation example(s)" in lines[0] and f"at least {MIN_VAL_EXAMPLES}" in lines[0]
    assert not (tmp_path / "cache").exists()  # refused before the supernet trained
    assert not (tmp_path / "out" / "fingerprint.json").exists()  # and before any record
