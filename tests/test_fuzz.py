"""Fuzzing every loader path with random bytes and damaged real files.

Each loader must either load the input or raise :class:`SwrError` (one clear line for
the CLI); any other exception is a bug, and so is a hang: every example runs under a
SIGALRM time limit whose exception no loader can swallow.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import signal
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

from swr.delta import apply_task_delta, base_hash, export_task_delta, read_task_delta
from swr.errors import SwrError
from swr.io import read_json
from swr.reparam import set_selection
from swr.supernet import build_supernet
from swr.tasks import glyphs
from swr.tasks import kws_synth as ks
from swr.tasks.audio import read_audio
from swr.tasks.backbones import create_backbone, read_checkpoint, save_checkpoint
from swr.tasks.datasets import probe_audio
from swr.tasks.imagefolder import image_transforms, probe_image, read_image
from swr.tasks.mswc import load_mswc
from swr.tasks.speechcommands import KEYWORDS, load_speechcommands

# torch warns about the odd pickle protocols random bytes claim before refusing them
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
SECONDS_PER_EXAMPLE = 10.0
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Hang(BaseException):
    """Raised by the alarm: a BaseException, so no loader's ``except Exception`` hides it."""


@contextlib.contextmanager
def time_limit(seconds: float = SECONDS_PER_EXAMPLE):
    def alarm(signum, frame):
        raise Hang(f"a loader ran for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def load_or_refuse(fn, *args, **kwargs):
    """``fn(*args)``'s result, or None when it refused the input with :class:`SwrError`."""
    with time_limit():
        try:
            return fn(*args, **kwargs)
        except SwrError as e:
            assert str(e) and "\n" not in str(e).strip(), repr(str(e))
            return None


def damaged(seeds: dict[str, bytes], magic: tuple[bytes, ...] = ()) -> st.SearchStrategy:
    """Random bytes (optionally after a format's magic), or a real file cut short or with bytes
    overwritten (mostly in its header)."""
    names = sorted(seeds)

    def cut(name):
        data = seeds[name]
        return st.integers(0, len(data)).map(lambda n: data[:n])

    def overwrite(name):
        data = seeds[name]
        edits = st.lists(st.tuples(st.integers(0, min(len(data), 512) - 1), st.binary(min_size=1,
                                                                                      max_size=8)),
                         min_size=1, max_size=6)

        def apply(es):
            b = bytearray(data)
            for at, new in es:
                b[at:at + len(new)] = new
            return bytes(b)

        return edits.map(apply)

    choices = [st.binary(max_size=1024),
               st.sampled_from(names).flatmap(cut),
               st.sampled_from(names).flatmap(overwrite)]
    if magic:
        choices.append(st.tuples(st.sampled_from(magic), st.binary(max_size=512))
                       .map(lambda t: t[0] + t[1]))
    return st.one_of(choices)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# -------------------------------------------------------------------- audio

def audio_seeds() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    seeds = {}
    for name, sr, ch, fmt, subtype in [("a.wav", 16000, 1, "WAV", "PCM_16"),
                                       ("b.wav", 44100, 2, "WAV", "FLOAT"),
                                       ("c.flac", 8000, 1, "FLAC", "PCM_16"),
                                       ("d.ogg", 22050, 2, "OGG", "VORBIS")]:
        buf = io.BytesIO()
        sf.write(buf, (0.2 * rng.standard_normal((sr // 4, ch))).astype(np.float32), sr,
                 format=fmt, subtype=subtype)
        seeds[name] = buf.getvalue()
    return seeds


AUDIO = audio_seeds()


@FUZZ
@given(data=damaged(AUDIO, magic=(b"RIFF\x24\x08\x00\x00WAVEfmt ", b"fLaC", b"OggS")),
       suffix=st.sampled_from([".wav", ".flac", ".ogg", ".opus", ".mp3"]))
def test_read_audio(scratch, data, suffix):
    path = scratch / f"clip{suffix}"
    path.write_bytes(data)
    load_or_refuse(probe_audio, path)
    wav = load_or_refuse(read_audio, path)
    if wav is not None:
        assert wav.shape == (16000,) and wav.dtype == torch.float32
        assert bool(torch.isfinite(wav).all())


@FUZZ
@given(rate=st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([1, 999, 1000, 7919, 44101,
                                                                  768000, 768001])),
       channels=st.integers(1, 8), frames=st.integers(0, 3000))
def test_read_audio_with_any_header_rate(scratch, rate, channels, frames):
    """A WAV header may claim any rate: refused when implausible, else read in bounded time."""
    pcm = (np.random.default_rng(frames).standard_normal((frames, channels)) * 3000).astype("<i2")
    fmt = (b"fmt " + (16).to_bytes(4, "little") + (1).to_bytes(2, "little")
           + channels.to_bytes(2, "little") + rate.to_bytes(4, "little")
           + (rate * 2 * channels % 2**32).to_bytes(4, "little")
           + (2 * channels).to_bytes(2, "little")
           + (16).to_bytes(2, "little"))
    body = b"WAVE" + fmt + b"data" + len(pcm.tobytes()).to_bytes(4, "little") + pcm.tobytes()
    path = scratch / "rate.wav"
    path.write_bytes(b"RIFF" + len(body).to_bytes(4, "little") + body)
    load_or_refuse(probe_audio, path)
    wav = load_or_refuse(read_audio, path)
    if wav is not None:
        assert wav.shape == (16000,) and 1000 <= rate <= 768000 and frames > 0


# -------------------------------------------------------------------- images

def image_seeds() -> dict[str, bytes]:
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))
    seeds = {}
    for name, img, fmt in [("a.png", rgb, "PNG"), ("b.jpg", rgb, "JPEG"), ("c.bmp", rgb, "BMP"),
                           ("d.webp", rgb, "WEBP"), ("e.png", rgb.convert("P"), "PNG"),
                           ("f.png", rgb.convert("RGBA"), "PNG"), ("g.gif", rgb, "GIF")]:
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        seeds[name] = buf.getvalue()
    return seeds


IMAGES = image_seeds()
EVAL_TRANSFORM = image_transforms(16)[1]


@FUZZ
@given(data=damaged(IMAGES, magic=(b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"RIFF")),
       suffix=st.sampled_from([".png", ".jpg", ".jpeg", ".bmp", ".webp"]))
def test_read_image(scratch, data, suffix):
    path = scratch / f"img{suffix}"
    path.write_bytes(data)
    load_or_refuse(probe_image, path)
    img = load_or_refuse(read_image, path)
    if img is not None:
        with time_limit():
            x = EVAL_TRANSFORM(img)
        assert x.shape == (3, 16, 16) and img.mode == "RGB"


# -------------------------------------------------------------------- checkpoints, deltas

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A bcresnet-1 base, its checkpoint in three formats, and a task delta for it."""
    d = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    base = create_backbone("bcresnet-1", num_classes=3).eval()
    save_checkpoint(base, d / "m.safetensors", backbone="bcresnet-1")
    torch.save(base.state_dict(), d / "m.pt")
    torch.save({"state_dict": base.state_dict()}, d / "legacy.pt",
               _use_new_zipfile_serialization=False)
    model = build_supernet(base, 4)
    set_selection(model, ["stem.0", "stages.0.0.f2.0"])
    export_task_delta(model, d / "delta.safetensors", backbone="bcresnet-1", task="t")
    seeds = {p.name: p.read_bytes() for p in d.iterdir()}
    return base, seeds


CHECKPOINT_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x10\x00\x00\x00\x00\x00\x00\x00{",
                    b"\xff\xff\xff\xff\xff\xff\xff\x7f")


@FUZZ
@given(data=st.data(), suffix=st.sampled_from([".safetensors", ".pt", ".bin"]))
def test_read_checkpoint(models, scratch, data, suffix):
    _, seeds = models
    blob = data.draw(damaged(seeds, magic=CHECKPOINT_MAGIC))
    path = scratch / f"weights{suffix}"
    path.write_bytes(blob)
    state = load_or_refuse(read_checkpoint, path)
    if state is not None:
        assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state[0].items())
    load_or_refuse(create_backbone, "bcresnet-1", weights=path)


TORCH_VALUES = st.recursive(
    st.one_of(st.integers(), st.text(max_size=4), st.none(),
              st.lists(st.integers(0, 3), max_size=2).map(lambda s: torch.zeros(s))),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=8)


@FUZZ
@given(obj=st.one_of(
    TORCH_VALUES,
    st.dictionaries(st.one_of(st.text(max_size=12), st.integers()), TORCH_VALUES, max_size=4),
    st.dictionaries(st.sampled_from(["state_dict", "model", "module.stem.0.weight", "x"]),
                    TORCH_VALUES, max_size=3),
    st.dictionaries(st.one_of(st.text(max_size=12), st.integers(), st.none()),
                    st.lists(st.integers(0, 3), max_size=2).map(lambda s: torch.zeros(s)),
                    min_size=1, max_size=4)))
def test_read_crafted_torch_checkpoint(models, scratch, obj):
    """Weights-only torch files holding anything but a state dict of tensors are refused."""
    path = scratch / "crafted.pt"
    torch.save(obj, path)
    state = load_or_refuse(read_checkpoint, path)
    if state is not None:
        assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state[0].items())
    load_or_refuse(create_backbone, "bcresnet-1", weights=path)


@FUZZ
@given(data=st.data())
def test_read_and_apply_task_delta(models, scratch, data):
    base, seeds = models
    blob = data.draw(damaged(seeds, magic=CHECKPOINT_MAGIC))
    path = scratch / "task_delta.safetensors"
    path.write_bytes(blob)
    load_or_refuse(read_task_delta, path)
    load_or_refuse(apply_task_delta, copy.deepcopy(base), path, check_hash=False)


def crafted_delta(base) -> st.SearchStrategy:
    """Well-formed safetensors files with any mix of right and wrong names, shapes and metadata."""
    state = base.state_dict()
    keys = [f"delta/{k}" for k in state if k.endswith("weight")] + \
           [f"norm/{k}" for k in state if ".1." in k] + \
           [f"head/{k}" for k in state if "head" in k] + \
           ["delta/no.such.weight", "junk", "head/", "norm/stem.1.weight"]
    shapes = st.lists(st.integers(0, 5), max_size=3).map(tuple)

    def tensor(key):
        right = state.get(key.partition("/")[2])
        options = [shapes.map(lambda s: torch.zeros(s))]
        if right is not None:
            options.append(st.just(torch.zeros_like(right)))
            options.append(st.sampled_from([torch.int64, torch.float16, torch.bool]).map(
                lambda dt: torch.zeros(right.shape, dtype=dt)))
        return st.one_of(options)

    json_value = st.one_of(st.none(), st.integers(-3, 10**12), st.text(max_size=8),
                           st.lists(st.text(max_size=6), max_size=3))
    meta = st.fixed_dictionaries(
        {"format": st.sampled_from(["swr-task-delta/1", "swr-task-delta/1", "other"])},
        optional={"base_hash": st.sampled_from([base_hash(base), "0" * 16]),
                  "backbone": st.just("bcresnet-1"),
                  "head": st.one_of(st.just("head"), st.text(max_size=10)),
                  "num_classes": json_value, "selection": json_value}
    ).map(lambda m: {k: v if isinstance(v, str) else json.dumps(v) for k, v in m.items()})
    names = st.lists(st.sampled_from(keys), unique=True, max_size=6)
    return st.tuples(names.flatmap(lambda ks_: st.tuples(*[tensor(k) for k in ks_])
                                   .map(lambda ts: dict(zip(ks_, ts)))), meta)


@FUZZ
@given(data=st.data())
def test_apply_crafted_task_delta(models, scratch, data):
    base, _ = models
    tensors, meta = data.draw(crafted_delta(base))
    path = scratch / "crafted.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    load_or_refuse(apply_task_delta, copy.deepcopy(base), path)


# -------------------------------------------------------------------- JSON, manifests, lists

JSONISH = st.one_of(
    st.binary(max_size=512),
    st.text(max_size=256).map(str.encode),
    st.integers(1, 50_000).map(lambda n: b"[" * n),
    st.integers(4000, 6000).map(lambda n: b"1" * n),
    st.recursive(st.none() | st.booleans() | st.floats() | st.text(max_size=5),
                 lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c,
                                                                     max_size=3)
                 ).map(lambda v: json.dumps(v).encode()),
)


@FUZZ
@given(data=JSONISH)
def test_read_json(scratch, data):
    path = scratch / "x.json"
    path.write_bytes(data)
    load_or_refuse(read_json, path, "selection file")


def kws_cache(folder: Path, cfg: dict) -> dict:
    """A complete, valid kws-synth cache folder (tiny zero features); returns its manifest."""
    n = {"train": 3, "val": 2, "test": 2, "shift_test": 2}
    folder.mkdir(parents=True, exist_ok=True)
    for s, k in n.items():
        save_file({"x": torch.zeros(k, 1, 40, 101, dtype=torch.float16), "y": torch.zeros(k).long(),
                   "speaker": torch.zeros(k).long()}, str(folder / f"{s}.safetensors"))
    manifest = {"config_hash": ks._config_hash(cfg), "keep_wav": False,
                "class_names": cfg["keywords"] + [ks.UNKNOWN, ks.SILENCE], "counts": n,
                "input_shape": [1, 40, 101], "splits": {s: {"speakers": []} for s in n}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return manifest


ANY_JSON = st.recursive(st.none() | st.integers() | st.text(max_size=6),
                        lambda c: st.lists(c, max_size=3)
                        | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=6)


def manifest_edits(manifest: dict) -> st.SearchStrategy:
    """The manifest with one field replaced by any JSON value, any JSON, or damaged bytes."""
    text = json.dumps(manifest).encode()
    edited = st.tuples(st.sampled_from(sorted(manifest)), ANY_JSON).map(
        lambda fv: json.dumps({**manifest, fv[0]: fv[1]}).encode())
    return st.one_of(edited, ANY_JSON.map(lambda v: json.dumps(v).encode()),
                     damaged({"m": text}))


@FUZZ
@given(data=st.data())
def test_kws_synth_manifest(scratch, data):
    """Any manifest content: the loader regenerates (stubbed here) instead of failing."""
    cfg = ks._config("de", 0, (1, 1, 1, 1), 1)
    root = scratch / "kws"
    manifest = kws_cache(root / "de", cfg)
    (root / "de" / "manifest.json").write_bytes(data.draw(manifest_edits(manifest)))
    regenerated = []

    def regenerate(cfg, root, keep_wav, progress, workers):
        regenerated.append(True)
        kws_cache(root / cfg["lang"], cfg)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ks, "_generate_locked", regenerate)
        task = load_or_refuse(ks.load_kws_synth, "de", root=root, speakers=(1, 1, 1, 1), reps=1,
                              progress=False)
    assert task is not None and len(task.train) == 3 and len(regenerated) <= 1


@FUZZ
@given(data=st.data())
def test_glyph_manifest(scratch, data):
    config = glyphs._config(glyphs.SPECS["sketch"], "sketch", 0, 8)
    folder = scratch / "glyphs"
    folder.mkdir(exist_ok=True)
    for split in glyphs.SPLITS:
        save_file({"x": torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "y": torch.zeros(1).long()},
                  str(folder / f"{split}.safetensors"))
    manifest = {"config_hash": glyphs._config_hash(config), "class_names": ["a"],
                "counts": dict.fromkeys(glyphs.SPLITS, 1)}
    (folder / "manifest.json").write_bytes(data.draw(manifest_edits(manifest)))
    with time_limit():
        glyphs._load_cache(folder, config)  # a valid cache or None (regenerate); never raises


@pytest.fixture(scope="module")
def speechcommands(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sc")
    for i, w in enumerate([*KEYWORDS, "bed"]):
        for name in "abc":
            (root / w).mkdir(exist_ok=True)
            sf.write(str(root / w / f"{name}.wav"), np.full(800, 0.1 * (i + 1), np.float32), 16000)
    (root / "_background_noise_").mkdir()
    sf.write(str(root / "_background_noise_" / "n.wav"), np.zeros(20000, np.float32), 16000)
    (root / "testing_list.txt").write_text("".join(f"{w}/c.wav\n" for w in KEYWORDS))
    return root


LIST_LINES = st.lists(st.one_of(
    st.sampled_from([f"{w}/b.wav" for w in KEYWORDS] + ["../yes/a.wav", "/etc/passwd",
                                                         "C:\\x.wav", "yes/../../x", "yes/c.wav",
                                                         "bed/b.wav", "yes/none.wav", ""]),
    st.text(max_size=20)), max_size=8).map(lambda lines: "\n".join(lines).encode())


@FUZZ
@given(data=st.one_of(LIST_LINES, st.binary(max_size=256)))
def test_speechcommands_split_list(speechcommands, data):
    (speechcommands / "validation_list.txt").write_bytes(data)
    load_or_refuse(load_speechcommands, speechcommands)


@pytest.fixture(scope="module")
def mswc(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mswc")
    for w in ("eins", "zwei", "drei"):
        (root / "de" / "clips" / w).mkdir(parents=True)
        for i in range(2):
            sf.write(str(root / "de" / "clips" / w / f"{i}.wav"), np.full(800, 0.1, np.float32),
                     16000)
    return root


ROWS = st.lists(st.tuples(st.sampled_from(["TRAIN", "DEV", "TEST", "train", "", "X"]),
                          st.sampled_from(["eins/0.wav", "zwei/1.opus", "drei/0.wav",
                                           "../../etc/passwd", "/abs.wav", "eins/none.wav", ""]),
                          st.sampled_from(["eins", "zwei", "drei", "", " "])),
                max_size=12).map(
    lambda rows: ("SET,LINK,WORD,VALID,SPEAKER,GENDER\n"
                  + "".join(f"{s},{link},{w},1,x,m\n" for s, link, w in rows)).encode())


@FUZZ
@given(data=st.one_of(ROWS, st.binary(max_size=256), st.text(max_size=200).map(str.encode)))
def test_mswc_split_table(mswc, data):
    (mswc / "de" / "de_splits.csv").write_bytes(data)
    load_or_refuse(load_mswc, mswc, "de", n_keywords=2, min_count=1)
