"""Reliability and security at the edges: bad input, interrupted work, files that carry code.

* Every bad input a user can type or point at ends ``swr ...`` with exit status 2 and
  one stderr line naming the value (``--debug`` raises instead, with the traceback).
* Nothing is half-written: an interrupted write keeps the previous file; an
  interrupted (or killed) search and an interrupted bench resume to the same result.
* Nothing runs from a file: pickles with a ``__reduce__`` payload are refused as
  weights, checkpoints and task deltas; manifest paths may not leave the dataset.
* Determinism on CPU: same seed, same selection, accuracies and task-delta bytes.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from safetensors.torch import save_file

import swr.tasks
from swr.app.cli import main
from swr.errors import SwrError
from swr.io import atomic_path, write_json
from swr.policies.pool import LocalPool
from swr.pretrain import load_pretrained
from swr.reparam import set_selection
from swr.supernet import build_supernet
from swr.tasks.audio import read_audio
from swr.tasks.speechcommands import KEYWORDS

from fixtures import in_memory_tasks, tiny_audio_task, tiny_checkpoint, write_clip

TESTS_DIR = Path(__file__).parent
TINY = tiny_audio_task()
# ``--task tiny`` is TINY; the module runs on one thread with the session cache
get_task, tiny_world = in_memory_tasks({"tiny": TINY})


# -------------------------------------------------------------------- on-disk fixtures

# rates, channel counts and lengths cycled through the clips: resampled, mixed down,
# padded and cropped on the way in
FORMATS = [(16000, 1, 1.0), (8000, 2, 0.5), (44100, 1, 1.5), (22050, 2, 0.8)]


def make_speechcommands(root: Path) -> Path:
    """10 keywords + one unknown word, 3 clips each (train a, val b, test c), one noise file."""
    words = [*KEYWORDS, "bed"]
    for i, w in enumerate(words):
        for j, name in enumerate("abc"):
            sr, ch, sec = FORMATS[(i + j) % len(FORMATS)]
            write_clip(root / w / f"{name}.wav", i, sr, ch, sec)
    noise = np.random.default_rng(0).normal(0, 0.1, 32000).astype(np.float32)
    (root / "_background_noise_").mkdir(parents=True)
    sf.write(str(root / "_background_noise_" / "noise.wav"), noise, 16000)
    (root / "validation_list.txt").write_text("".join(f"{w}/b.wav\n" for w in words))
    (root / "testing_list.txt").write_text("".join(f"{w}/c.wav\n" for w in words))
    return root


def make_imagefolder(root: Path, classes=("a", "b"), n_train: int = 3) -> Path:
    for split, n in (("train", n_train), ("test", 1)):
        for ci, c in enumerate(classes):
            for k in range(n):
                (root / split / c).mkdir(parents=True, exist_ok=True)
                img = np.full((40, 48, 3), 40 * ci + 20 * k, np.uint8)
                Image.fromarray(img).save(root / split / c / f"{k}.png")
    return root


def truncated_jpeg(path: Path) -> Path:
    """A JPEG whose header verifies but whose pixel data is cut: found only when decoded."""
    noise = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, format="JPEG", quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def make_mswc(root: Path, rows: list[str]) -> Path:
    (root / "de" / "clips" / "hallo").mkdir(parents=True)
    write_clip(root / "de" / "clips" / "hallo" / "x.wav", 0)
    (root / "de" / "de_splits.csv").write_text(
        "SET,LINK,WORD,VALID,SPEAKER,GENDER\n" + "".join(r + "\n" for r in rows))
    return root


class Payload:
    """Pickles to ``os.mkdir(marker)``: proof, if the folder appears, that unpickling ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def write_payloads(folder: Path, marker: Path) -> dict[str, Path]:
    """The same payload as a raw pickle, a torch zip checkpoint, and under a safetensors name."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {"stem.0.weight": Payload(marker)}
    raw = folder / "evil.pkl"
    raw.write_bytes(pickle.dumps(state, protocol=2))
    zipped = folder / "evil.pt"
    torch.save(state, zipped)
    named = folder / "evil.safetensors"
    named.write_bytes(zipped.read_bytes())
    return {"pickle": raw, "torch-zip": zipped, "safetensors-name": named}


def export_delta(ckpt: Path, path: Path) -> Path:
    """A task delta with two open layers, made for the base weights of ``ckpt``."""
    from swr.delta import export_task_delta

    base, meta = load_pretrained(ckpt)
    model = build_supernet(base, 4)
    names = [n for n, _ in model.named_modules() if n.endswith("f2.0")][:2]
    set_selection(model, names)
    with torch.no_grad():
        for n in names:
            model.get_submodule(n).delta.normal_(0, 0.01)
    export_task_delta(model, path, backbone=meta["backbone"], task="tiny")
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Every file the bad-input cases point at, made once."""
    d = tmp_path_factory.mktemp("world")
    w = SimpleNamespace(d=d)
    w.ckpt = tiny_checkpoint(d / "ckpt")
    torch.manual_seed(1)  # other base weights, same backbone
    from swr.tasks.backbones import create_backbone, save_checkpoint

    save_checkpoint(create_backbone("bcresnet-1", num_classes=6),
                    d / "ckpt_b" / "model.safetensors", backbone="bcresnet-1")
    write_json(d / "ckpt_b" / "metrics.json", {"backbone": "bcresnet-1"})
    w.ckpt_b = d / "ckpt_b"
    for name, backbone in (("ckpt_resnet", "timm:resnet18"), ("ckpt_bc2", "bcresnet-2")):
        (d / name).mkdir()
        (d / name / "model.safetensors").write_bytes((w.ckpt / "model.safetensors").read_bytes())
        write_json(d / name / "metrics.json", {"backbone": backbone})
    w.ckpt_resnet, w.ckpt_bc2 = d / "ckpt_resnet", d / "ckpt_bc2"
    (d / "ckpt_notjson").mkdir()
    (d / "ckpt_notjson" / "metrics.json").write_text("{'backbone': bcresnet-1,")
    w.delta = export_delta(w.ckpt, d / "delta.safetensors")

    sel = {"layers": ["stages.0.0.f2.0"], "task": "tiny", "checkpoint": str(w.ckpt),
           "budget_params": 883}
    w.sel = {}
    for name, content in {
        "notjson": "layers: [stem.0]\n",
        "list": json.dumps([sel]),
        "nokeys": json.dumps({"layers": []}),
        "badtypes": json.dumps({**sel, "layers": "stem.0", "budget_params": "883"}),
        "unknown_layer": json.dumps({**sel, "layers": ["no.such.layer"]}),
        "over_budget": json.dumps({**sel, "layers": ["stem.0"], "budget_params": 30}),
        "no_ckpt": json.dumps({**sel, "checkpoint": str(d / "missing_ckpt")}),
        "bad_task": json.dumps({**sel, "task": "kws-synth:xx"}),
    }.items():
        w.sel[name] = d / f"selection_{name}.json"
        w.sel[name].write_text(content)

    w.sc = make_speechcommands(d / "sc")
    w.sc_bad = make_speechcommands(d / "sc_bad")
    (w.sc_bad / "yes" / "broken.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage" * 3)
    w.sc_empty = d / "sc_empty"
    for k in KEYWORDS:
        (w.sc_empty / k).mkdir(parents=True)
    (w.sc_empty / "validation_list.txt").write_text("")
    (w.sc_empty / "testing_list.txt").write_text("")

    w.img = make_imagefolder(d / "img")
    w.img_bad = make_imagefolder(d / "img_bad")
    (w.img_bad / "train" / "a" / "broken.png").write_bytes(os.urandom(300))
    truncated_jpeg(w.img_bad / "test" / "a" / "cut.jpg")
    w.img_one = make_imagefolder(d / "img_one", classes=("only",))
    w.img_empty = d / "img_empty"
    (w.img_empty / "train").mkdir(parents=True)
    (w.img_empty / "test").mkdir()
    w.img_noimg = make_imagefolder(d / "img_noimg")
    for f in (w.img_noimg / "train" / "b").iterdir():
        f.unlink()

    w.mswc_escape = make_mswc(d / "mswc_escape", ["TRAIN,hallo/x.wav,hallo,1,s,m",
                                                  "TRAIN,../../../../etc/passwd,hallo,1,s,m"])
    w.mswc_empty = make_mswc(d / "mswc_empty", [])
    w.marker = d / "payload-ran"
    w.evil = write_payloads(d / "evil", w.marker)
    (d / "evil_ckpt").mkdir()
    (d / "evil_ckpt" / "model.safetensors").write_bytes(w.evil["torch-zip"].read_bytes())
    write_json(d / "evil_ckpt" / "metrics.json", {"backbone": "bcresnet-1"})
    w.evil_ckpt = d / "evil_ckpt"
    return w


# -------------------------------------------------------------------- bad input

def search_args(w, out, *extra, task="tiny", budget="10%"):
    return ["search", "--task", task, "--checkpoint", str(w.ckpt), f"--budget={budget}",
            "--out", str(w.d / out), "--workers", "0", "--device", "cpu",
            "--supernet-epochs", "1", "--evaluations", "4", "--policy", "random",
            "--overwrite", *extra]


def pretrain_args(w, task, *extra, backbone="bcresnet-1"):
    return ["pretrain", "--task", task, "--backbone", backbone, "--out", str(w.d / "pre"),
            "--epochs", "1", "--device", "cpu", *extra]


# (id, arguments built from the world, words the one line must contain)
BAD_INPUT = [
    # unknown names
    ("backbone", lambda w: ["inspect", "--backbone", "vgg16"], ["vgg16", "known", "bcresnet-2"]),
    ("bcresnet-width", lambda w: ["inspect", "--backbone", "bcresnet-7"], ["bcresnet-7"]),
    ("timm-model", lambda w: ["inspect", "--backbone", "timm:resnet_nope"], ["resnet_nope"]),
    ("pretrain-backbone", lambda w: pretrain_args(w, "tiny", backbone="mobilenet"),
     ["mobilenet", "known"]),
    ("task-kind", lambda w: search_args(w, "o", task="cifar:10"), ["cifar", "known", "mswc:"]),
    ("task-form", lambda w: search_args(w, "o", task="imagenet"), ["imagenet", "known form"]),
    ("kws-language", lambda w: search_args(w, "o", task="kws-synth:xx"), ["'xx'", "known", "de"]),
    ("glyphs-target", lambda w: search_args(w, "o", task="glyphs:comic"), ["comic", "known"]),
    ("policy", lambda w: search_args(w, "o", "--policy", "magic"), ["magic", "pg", "knapsack"]),
    ("method", lambda w: ["bench", "--task", "tiny", "--checkpoint", str(w.ckpt), "--methods",
                          "linear,magic", "--out", str(w.d / "b"), "--workers", "1"],
     ["magic", "known", "lora"]),
    ("bench-suite", lambda w: ["bench", "--task", f"imagenet-to-sketch:{w.d / 'nosuite'}",
                               "--checkpoint", str(w.ckpt), "--methods", "linear", "--out",
                               str(w.d / "b"), "--workers", "1"],
     ["imagenet-to-sketch", "nosuite"]),
    ("device", lambda w: pretrain_args(w, "tiny", "--device", "tpu"), ["tpu", "cpu"]),
    ("cuda-without-gpu", lambda w: pretrain_args(w, "tiny", "--device", "cuda:3"), ["cuda:3"]),
    # missing paths
    ("checkpoint-folder", lambda w: search_args(w, "o") [:4] + [str(w.d / "nockpt")]
     + search_args(w, "o")[5:], ["nockpt", "metrics.json"]),
    ("checkpoint-is-file", lambda w: ["fold", "--checkpoint", str(w.delta), "--delta",
                                      str(w.delta), "--out", str(w.d / "f")], ["is a file"]),
    ("weights-file", lambda w: ["inspect", "--backbone", "bcresnet-1", "--weights",
                                str(w.d / "none.safetensors")], ["none.safetensors", "not found"]),
    ("selection-file", lambda w: ["finetune", "--selection", str(w.d / "nosel.json"), "--out",
                                  str(w.d / "ft")], ["nosel.json", "not found"]),
    ("delta-file", lambda w: ["fold", "--checkpoint", str(w.ckpt), "--delta",
                              str(w.d / "nodelta.safetensors"), "--out", str(w.d / "f")],
     ["nodelta.safetensors", "not found"]),
    ("imagefolder-folder", lambda w: pretrain_args(w, f"imagefolder:{w.d / 'noimg'}"),
     ["noimg", "not found"]),
    ("speechcommands-folder", lambda w: pretrain_args(w, f"speechcommands:{w.d / 'nosc'}"),
     ["nosc", "not found"]),
    ("mswc-folder", lambda w: pretrain_args(w, f"mswc:{w.d / 'nomswc'}:de"),
     ["nomswc", "not found"]),
    ("selection-checkpoint", lambda w: ["finetune", "--selection", str(w.sel["no_ckpt"]), "--out",
                                        str(w.d / "ft")], ["missing_ckpt"]),
    # empty or single-class datasets
    ("imagefolder-single-class", lambda w: pretrain_args(w, f"imagefolder:{w.img_one}"),
     ["single class", "only"]),
    ("imagefolder-no-classes", lambda w: pretrain_args(w, f"imagefolder:{w.img_empty}"),
     ["no class folders"]),
    ("imagefolder-empty-class", lambda w: pretrain_args(w, f"imagefolder:{w.img_noimg}"),
     ["holds no images"]),
    ("speechcommands-empty", lambda w: pretrain_args(w, f"speechcommands:{w.sc_empty}"),
     ["no keyword clips"]),
    ("mswc-empty-table", lambda w: pretrain_args(w, f"mswc:{w.mswc_empty}:de"),
     ["only 0 words", "needs 10 such keywords"]),
    # corrupt files
    ("corrupt-audio", lambda w: pretrain_args(w, f"speechcommands:{w.sc_bad}"),
     ["broken.wav", "--on-bad-file skip"]),
    ("corrupt-image", lambda w: pretrain_args(w, f"imagefolder:{w.img_bad}",
                                              "--on-bad-file", "fail"),
     ["broken.png", "--on-bad-file skip"]),
    # budgets
    ("budget-zero", lambda w: search_args(w, "o", budget="0"), ["0 parameters", "positive"]),
    ("budget-zero-percent", lambda w: search_args(w, "o", budget="0%"), ["(0, 1]"]),
    ("budget-negative", lambda w: search_args(w, "o", budget="-5%"), ["-5%", "percentage"]),
    ("budget-garbage", lambda w: search_args(w, "o", budget="lots"), ["lots"]),
    ("budget-below-cheapest", lambda w: search_args(w, "o", budget="3"), ["cheapest", "24"]),
    ("budget-above-100%", lambda w: search_args(w, "o", budget="150%"), ["150%", "above 100%"]),
    ("budget-fraction-above-1", lambda w: search_args(w, "o", budget="1.5"), ["1.5", "above 1"]),
    ("budget-above-backbone", lambda w: search_args(w, "o", budget="99999999"),
     ["99999999", "8836"]),
    ("bench-budget", lambda w: ["bench", "--task", "tiny", "--checkpoint", str(w.ckpt), "--methods",
                                "norm", "--budgets", "5%,0", "--out", str(w.d / "b"), "--workers",
                                "1"], ["0 parameters"]),
    # checkpoints and deltas that belong elsewhere
    ("weights-other-backbone", lambda w: ["inspect", "--backbone", "timm:resnet18", "--weights",
                                          str(w.ckpt / "model.safetensors")],
     ["missing keys", "unexpected keys", "timm:resnet18"]),
    ("checkpoint-other-backbone", lambda w: ["fold", "--checkpoint", str(w.ckpt_resnet), "--delta",
                                             str(w.delta), "--out", str(w.d / "f")],
     ["missing keys", "unexpected keys"]),
    ("checkpoint-other-width", lambda w: search_args(w, "o")[:4] + [str(w.ckpt_bc2)]
     + search_args(w, "o")[5:], ["shape mismatch", "bcresnet-2"]),
    ("delta-other-base", lambda w: ["fold", "--checkpoint", str(w.ckpt_b), "--delta",
                                    str(w.delta), "--out", str(w.d / "f")],
     ["made for base weights", "hash to"]),
    # malformed JSON inputs
    ("metrics-not-json", lambda w: ["fold", "--checkpoint", str(w.d / "ckpt_notjson"), "--delta",
                                    str(w.delta), "--out", str(w.d / "f")], ["not valid JSON"]),
    ("selection-not-json", lambda w: ["finetune", "--selection", str(w.sel["notjson"]), "--out",
                                      str(w.d / "ft")], ["not valid JSON"]),
    ("selection-list", lambda w: ["finetune", "--selection", str(w.sel["list"]), "--out",
                                  str(w.d / "ft")], ["not a JSON object"]),
    ("selection-missing-keys", lambda w: ["finetune", "--selection", str(w.sel["nokeys"]), "--out",
                                          str(w.d / "ft")], ["lacks 'task'"]),
    ("selection-bad-types", lambda w: ["finetune", "--selection", str(w.sel["badtypes"]), "--out",
                                       str(w.d / "ft")], ["malformed", "list of layer names"]),
    ("selection-unknown-layer", lambda w: ["finetune", "--selection", str(w.sel["unknown_layer"]),
                                           "--out", str(w.d / "ft")], ["no.such.layer"]),
    ("selection-over-budget", lambda w: ["finetune", "--selection", str(w.sel["over_budget"]),
                                         "--out", str(w.d / "ft")], ["over the budget of 30"]),
    ("selection-bad-task", lambda w: ["finetune", "--selection", str(w.sel["bad_task"]), "--out",
                                      str(w.d / "ft")], ["'xx'"]),
    # paths that leave the dataset, files that carry code
    ("list-escapes-root", lambda w: pretrain_args(w, f"speechcommands:{escaping_list(w)}"),
     ["validation_list.txt:1", "..", "leaves the dataset"]),
    ("csv-escapes-root", lambda w: pretrain_args(w, f"mswc:{w.mswc_escape}:de"),
     ["de_splits.csv:3", "leaves the dataset"]),
    ("mswc-language", lambda w: pretrain_args(w, f"mswc:{w.mswc_escape}:.."), ["language"]),
    ("pickle-as-weights", lambda w: ["inspect", "--backbone", "bcresnet-1", "--weights",
                                     str(w.evil["pickle"])],
     ["evil.pkl", "refused", "posix.mkdir"]),
    ("torch-pickle-as-weights", lambda w: ["inspect", "--backbone", "bcresnet-1", "--weights",
                                           str(w.evil["torch-zip"])],
     ["evil.pt", "refused", "posix.mkdir"]),
    ("pickle-as-checkpoint", lambda w: ["fold", "--checkpoint", str(w.evil_ckpt), "--delta",
                                        str(w.delta), "--out", str(w.d / "f")],
     ["model.safetensors", "cannot read safetensors"]),
    ("pickle-as-delta", lambda w: ["fold", "--checkpoint", str(w.ckpt), "--delta",
                                   str(w.evil["safetensors-name"]), "--out", str(w.d / "f")],
     ["evil.safetensors", "not a readable safetensors task delta"]),
]


def escaping_list(w) -> Path:
    root = w.d / "sc_escape"
    if not root.exists():
        make_speechcommands(root)
        (root / "validation_list.txt").write_text("../sc/yes/a.wav\n")
    return root


def one_line_error(capsys, args: list[str]) -> str:
    """Run ``swr args``: exit 2, one stderr line, no traceback; ``--debug`` raises instead."""
    code = main(args)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith(f"swr {args[0]}: error: ")
    with pytest.raises((SwrError, OSError)):
        main([*args, "--debug"])
    capsys.readouterr()
    print(f"BAD-INPUT | {' '.join(args)} | {lines[0]}")
    return lines[0]


@pytest.mark.parametrize("make_args,needles", [c[1:] for c in BAD_INPUT],
                         ids=[c[0] for c in BAD_INPUT])
def test_bad_input_fails_with_one_line(world, capsys, make_args, needles):
    line = one_line_error(capsys, make_args(world))
    for needle in needles:
        assert needle in line, line
    assert not world.marker.exists()  # no payload ever ran


@pytest.mark.parametrize("args,needle", [
    (["demo", "--suite", "cartoons"], "choose from"),
    (["search", "--task", "tiny"], "required"),
    (["pretrain", "--task", "tiny", "--backbone", "bcresnet-1", "--out", "x", "--epochs", "many"],
     "invalid int value"),
    (["pretrain", "--task", "tiny", "--backbone", "bcresnet-1", "--out", "x", "--on-bad-file",
      "ignore"], "choose from 'fail', 'skip'"),
    (["frobnicate"], "invalid choice"),
])
def test_usage_errors_are_one_line_too(capsys, args, needle):
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and needle in err[0], err
    print(f"BAD-INPUT | {' '.join(args)} | {err[0]}")


def test_debug_prints_a_traceback(world):
    """The real console entry point: one line normally, the traceback with --debug."""
    args = ["inspect", "--backbone", "bcresnet-1", "--weights", str(world.evil["pickle"])]
    env = dict(os.environ, PYTHONPATH=str(TESTS_DIR))
    plain = subprocess.run([sys.executable, "-m", "swr.app.cli", *args], capture_output=True,
                           text=True, env=env, timeout=120)
    debug = subprocess.run([sys.executable, "-m", "swr.app.cli", *args, "--debug"],
                           capture_output=True, text=True, env=env, timeout=120)
    assert plain.returncode == 2 and len(plain.stderr.strip().splitlines()) == 1
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "SwrError" in debug.stderr
    assert not world.marker.exists()


def test_unwritable_output_is_one_line(world, capsys):
    blocker = world.d / "a_file"
    blocker.write_text("x")
    line = one_line_error(capsys, ["fold", "--checkpoint", str(world.ckpt), "--delta",
                                   str(world.delta), "--out", str(blocker / "sub")])
    assert "a_file" in line


# ------------------------------------------------- real loaders: skip, resample, mix down

def test_audio_is_resampled_mixed_down_and_fixed_in_length(tmp_path):
    stereo = np.stack([np.full(4000, 0.25), np.full(4000, -0.25)], axis=1).astype(np.float32)
    sf.write(str(tmp_path / "s.wav"), stereo, 8000)  # 0.5 s at 8 kHz, channels cancel
    wav = read_audio(tmp_path / "s.wav")
    assert wav.shape == (16000,) and wav.dtype == torch.float32
    assert float(wav.abs().max()) < 1e-4  # mixed down (L + R) / 2 = 0, padded with zeros
    write_clip(tmp_path / "long.wav", 0, sr=44100, channels=2, seconds=2.5)
    long = read_audio(tmp_path / "long.wav")
    assert long.shape == (16000,) and float(long.abs().max()) > 0.1  # resampled, center-cropped


def test_on_bad_file_skip_through_the_cli(world, capsys):
    """--on-bad-file skip: unreadable clips/images are left out, listed, and summarised."""
    code = main(pretrain_args(world, f"speechcommands:{world.sc_bad}", "--on-bad-file", "skip",
                              "--batch-size", "16", "--out", str(world.d / "pre_sc")))
    err = capsys.readouterr().err
    assert code == 0, err
    assert "swr pretrain: skipped 1 unreadable file(s), e.g." in err and "broken.wav" in err
    metrics = json.loads((world.d / "pre_sc" / "metrics.json").read_text())
    assert [Path(p).name for p in metrics["skipped_files"]] == ["broken.wav"]
    # images: broken.png fails the header check at load, cut.jpg only when decoded
    code = main(pretrain_args(world, f"imagefolder:{world.img_bad}", "--on-bad-file", "skip",
                              "--batch-size", "4", "--out", str(world.d / "pre_img"),
                              backbone="timm:resnet10t"))
    err = capsys.readouterr().err
    assert code == 0, err
    assert "skipped 2 unreadable file(s)" in err
    metrics = json.loads((world.d / "pre_img" / "metrics.json").read_text())
    assert sorted(Path(p).name for p in metrics["skipped_files"]) == ["broken.png", "cut.jpg"]


def test_bench_on_bad_file_skip_summarises_what_it_left_out(world, capsys):
    """swr bench --on-bad-file skip: every run's skipped files in one list and one line."""
    args = ["bench", "--task", f"speechcommands:{world.sc_bad}", "--checkpoint", str(world.ckpt),
            "--methods", "linear", "--seeds", "2", "--epochs", "1", "--workers", "1",
            "--device", "cpu", "--out", str(world.d / "bench_bad")]
    assert main(args) == 2 and "broken.wav" in capsys.readouterr().err  # default: fail
    assert main(args + ["--on-bad-file", "skip"]) == 0
    err = capsys.readouterr().err
    assert "swr bench: skipped 1 unreadable file(s), e.g." in err and "broken.wav" in err
    listed = json.loads((world.d / "bench_bad" / "skipped_files.json").read_text())
    assert [Path(p).name for paths in listed.values() for p in paths] == ["broken.wav"]
    assert "Unreadable data files left out" in (world.d / "bench_bad" / "results.md").read_text()


def test_truncated_image_found_on_access_fails_by_default(world):
    task = swr.tasks.get_task(f"imagefolder:{world.img}")
    assert task.info["skipped"] == []
    bad = swr.tasks.get_task(f"imagefolder:{world.img_bad}", on_bad_file="skip")
    assert [Path(p).name for p in bad.info["skipped"]] == ["broken.png"]
    cut = world.d / "img_cut"
    make_imagefolder(cut)
    truncated_jpeg(cut / "test" / "a" / "cut.jpg")
    task = swr.tasks.get_task(f"imagefolder:{cut}")  # the header verifies
    with pytest.raises(SwrError, match="cut.jpg.*--on-bad-file skip"):
        [task.test[i] for i in range(len(task.test))]


# -------------------------------------------------------------------- nothing half-written

def test_interrupted_writes_keep_the_previous_file(world, tmp_path, monkeypatch):
    import swr.delta
    import swr.tasks.backbones as backbones

    target = tmp_path / "result.json"
    write_json(target, {"v": 1})
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text('{"v": 2, "half')
            raise KeyboardInterrupt
    assert json.loads(target.read_text()) == {"v": 1}

    def half_then_crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"__meta")
        raise OSError("disk full")

    base, _ = load_pretrained(world.ckpt)
    ckpt_file = tmp_path / "model.safetensors"
    backbones.save_checkpoint(base, ckpt_file, backbone="bcresnet-1")
    delta_file = tmp_path / "task_delta.safetensors"
    delta_file.write_bytes(world.delta.read_bytes())
    before = {p: p.read_bytes() for p in (ckpt_file, delta_file)}
    monkeypatch.setattr(swr.io, "save_file", half_then_crash)  # the one safetensors writer
    with pytest.raises(OSError, match="disk full"):
        backbones.save_checkpoint(base, ckpt_file, backbone="bcresnet-1")
    model = build_supernet(base, 4)
    with pytest.raises(OSError, match="disk full"):
        swr.delta.export_task_delta(model, delta_file, backbone="bcresnet-1")
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model.safetensors", "result.json", "task_delta.safetensors"]  # no temp files left


def pg_args(out: Path, *extra: str) -> list[str]:
    return ["search", "--task", "tiny", "--checkpoint", str(out.parent / "ckpt"), "--budget", "10%",
            "--out", str(out), "--policy", "pg", "--evaluations", "10", "--samples-per-iteration",
            "4", "--workers", "0", "--device", "cpu", "--supernet-epochs", "1", "--seed", "3",
            *extra]


@pytest.fixture(scope="module")
def reference_search(world):
    """An uninterrupted policy-gradient search on the tiny task (trains the cached supernet)."""
    out = world.d / "search_ref"
    assert main(pg_args(out)) == 0
    return json.loads((out / "selection.json").read_text())


def interrupt_after(monkeypatch, n: int, how) -> list[int]:
    """Make the local pool call ``how()`` instead of scoring its ``n``-th selection."""
    scored = [0]
    original = LocalPool.map

    def map_(self, selections):
        out = []
        for s in selections:
            if scored[0] == n - 1:
                how()
            scored[0] += 1
            out += original(self, [s])
        return out

    monkeypatch.setattr(LocalPool, "map", map_)
    return scored


def same_result(a: dict, b: dict) -> bool:
    return a["layers"] == b["layers"] and a["val_score"] == b["val_score"] \
        and a["evaluations"] == b["evaluations"]


def test_interrupted_search_resumes_to_the_same_result(world, reference_search, capsys,
                                                       monkeypatch):
    out = world.d / "search_int"
    out.mkdir()
    (out / "selection.json").write_text('{"previous": true}\n')

    def ctrl_c():
        raise KeyboardInterrupt

    interrupt_after(monkeypatch, 7, ctrl_c)
    assert main([*pg_args(out), "--overwrite"]) == 130
    assert "--resume" in capsys.readouterr().err
    # the previous result is intact, the log holds the scorings of finished batches
    assert json.loads((out / "selection.json").read_text()) == {"previous": True}
    logged = (out / "evaluations.jsonl").read_text().splitlines()
    assert 1 <= len(logged) < 7 and all(json.loads(line)["selection"] for line in logged)
    monkeypatch.undo()
    assert main(pg_args(out, "--resume")) == 0
    resumed = json.loads((out / "selection.json").read_text())
    assert same_result(resumed, reference_search)
    assert resumed["replayed_evaluations"] == len(logged)


KILL_SCRIPT = r"""
import os, signal, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, os.environ["SWR_TESTS_DIR"])
from fixtures import tiny_audio_task
import swr.tasks
from swr.policies.pool import LocalPool
task = tiny_audio_task()
swr.tasks.get_task = lambda spec, **kw: task
kill_at = int(os.environ.get("SWR_KILL_AT", "0"))
original, scored = LocalPool.map, [0]
def map_(self, selections):
    out = []
    for s in selections:
        if scored[0] == kill_at - 1:
            os.kill(os.getpid(), signal.SIGKILL)
        scored[0] += 1
        out += original(self, [s])
    return out
LocalPool.map = map_
from swr.app.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_search_process(args: list[str], kill_at: int = 0) -> subprocess.CompletedProcess:
    """``swr`` in a fresh interpreter, on the tiny task, SIGKILLed before its kill_at-th scoring."""
    env = dict(os.environ, SWR_TESTS_DIR=str(TESTS_DIR), SWR_KILL_AT=str(kill_at))
    return subprocess.run([sys.executable, "-c", KILL_SCRIPT, *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_killed_search_resumes_to_the_same_result(world, reference_search):
    out = world.d / "search_kill"
    killed = run_search_process(pg_args(out), kill_at=7)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "selection.json").exists()
    logged = (out / "evaluations.jsonl").read_text().splitlines()
    assert 1 <= len(logged) < 7
    # a kill can also land inside a write: the last line is then cut short
    with open(out / "evaluations.jsonl", "a") as f:
        f.write('{"selection": ["stem.0", "stages.0.0.f')
    resumed = run_search_process(pg_args(out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    result = json.loads((out / "selection.json").read_text())
    assert same_result(result, reference_search)
    assert result["replayed_evaluations"] == len(logged)
    # the records written after the cut line are whole lines again
    lines = (out / "evaluations.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines[len(logged) + 1:])


def bench_args(w, out: Path, *extra: str) -> list[str]:
    return ["bench", "--task", "tiny", "--checkpoint", str(w.ckpt), "--methods", "linear,norm",
            "--seeds", "2", "--epochs", "1", "--workers", "1", "--device", "cpu", "--out",
            str(out), *extra]


def bench_rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r.pop("train_seconds")  # the only column that may differ between runs
    return rows


def test_interrupted_bench_resumes_skipping_done_runs(world, capsys, monkeypatch):
    import swr.app.bench.run

    ref = world.d / "bench_ref"
    assert main(bench_args(world, ref)) == 0
    out = world.d / "bench_int"
    real_run_job = swr.app.bench.run.run_job
    calls = []

    def run_job(*args, **kwargs):
        calls.append(args[:4])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_run_job(*args, **kwargs)

    monkeypatch.setattr(swr.app.bench.run, "run_job", run_job)
    assert main(bench_args(world, out)) == 130
    assert len(bench_rows(out)) == 2  # the finished runs are on disk
    calls.clear()
    assert main(bench_args(world, out, "--resume")) == 0
    assert "4 runs (2 done before)" in capsys.readouterr().out
    assert len(calls) == 2  # only the runs not done before
    assert bench_rows(out) == bench_rows(ref)  # CPU determinism: same numbers as one go


# -------------------------------------------------------------------- nothing runs from a file

def test_pickle_payloads_are_refused_everywhere(world):
    from swr.delta import apply_task_delta, read_task_delta
    from swr.tasks.backbones import create_backbone, read_checkpoint

    for path in world.evil.values():
        with pytest.raises(SwrError):
            read_checkpoint(path)
        with pytest.raises(SwrError):
            create_backbone("bcresnet-1", weights=path)
        with pytest.raises(SwrError):
            read_task_delta(path)
        with pytest.raises(SwrError):
            apply_task_delta(create_backbone("bcresnet-1", num_classes=4), path)
    with pytest.raises(SwrError, match="cannot read safetensors"):
        load_pretrained(world.evil_ckpt)
    assert not world.marker.exists()
    # the control: unpickling the same file really would have run the payload
    with open(world.evil["pickle"], "rb") as f:
        pickle.load(f)  # noqa: S301 - on purpose, to prove the payload is live
    assert world.marker.is_dir()
    world.marker.rmdir()


def test_kws_synth_cache_is_never_trusted_beyond_its_fixed_files(tmp_path, monkeypatch):
    """A tampered kws-synth cache: listed paths are never followed, damaged parts regenerate."""
    from swr.tasks import kws_synth as ks

    n = {"train": 6, "val": 3, "test": 3, "shift_test": 3}

    def fabricate(cfg, root, keep_wav, progress, workers):
        folder = root / cfg["lang"]
        folder.mkdir(parents=True, exist_ok=True)
        for s, k in n.items():
            save_file({"x": torch.zeros(k, 1, 40, 101, dtype=torch.float16),
                       "y": torch.arange(k) % 12, "speaker": torch.zeros(k, dtype=torch.int64)},
                      str(folder / f"{s}.safetensors"))
        write_json(folder / "manifest.json", {
            "config_hash": ks._config_hash(cfg), "keep_wav": False,
            "class_names": cfg["keywords"] + [ks.UNKNOWN, ks.SILENCE], "counts": n,
            "input_shape": [1, 40, 101],
            "splits": {s: {"file": f"{s}.safetensors", "speakers": [],
                           "clips": [{"file": "../../../../etc/passwd"}]} for s in n}})
        generated.append(folder)
        return folder

    generated: list[Path] = []
    monkeypatch.setattr(ks, "_generate_locked", fabricate)
    load = lambda: ks.load_kws_synth("de", root=tmp_path, speakers=(2, 1, 1, 1), reps=1,  # noqa: E731
                                     progress=False)
    task = load()
    assert len(generated) == 1 and len(task.train) == 6
    # manifest entries pointing outside the cache are metadata only: nothing follows them
    manifest = json.loads((tmp_path / "de" / "manifest.json").read_text())
    manifest["splits"]["train"]["file"] = "../../outside.safetensors"
    write_json(tmp_path / "de" / "manifest.json", manifest)
    assert len(load().train) == 6 and len(generated) == 1
    marker = tmp_path / "payload-ran"
    for damage in (
        lambda: (tmp_path / "de" / "train.safetensors").write_bytes(
            pickle.dumps({"x": Payload(marker)})),
        lambda: write_json(tmp_path / "de" / "manifest.json",
                           {**manifest, "class_names": {"not": "a list"}}),
        lambda: (tmp_path / "de" / "manifest.json").write_text("[1, 2"),
        lambda: write_json(tmp_path / "de" / "manifest.json", [manifest]),
    ):
        damage()
        before = len(generated)
        assert len(load().train) == 6
        assert len(generated) == before + 1  # regenerated, not trusted
    assert not marker.exists()


def test_glyph_cache_with_damaged_manifest_is_regenerated(tmp_path):
    from swr.tasks import glyphs

    config = glyphs._config(glyphs.SPECS["sketch"], "sketch", 0, 16)
    folder = tmp_path / "sketch-seed0-16px"
    folder.mkdir()
    for split in glyphs.SPLITS:
        save_file({"x": torch.zeros(2, 3, 16, 16, dtype=torch.uint8), "y": torch.zeros(2).long()},
                  str(folder / f"{split}.safetensors"))
    good = {"config_hash": glyphs._config_hash(config), "counts": dict.fromkeys(glyphs.SPLITS, 2),
            "class_names": ["a"]}
    for manifest, ok in ((good, True), ({**good, "counts": []}, False),
                         ({**good, "class_names": 3}, False), ([good], False),
                         ({**good, "counts": {"train": 2}}, False)):
        (folder / "manifest.json").write_text(json.dumps(manifest))
        assert (glyphs._load_cache(folder, config) is not None) == ok


# -------------------------------------------------------------------- determinism

def test_same_seed_same_selection(world, reference_search):
    out = world.d / "search_again"
    assert main(pg_args(out)) == 0
    again = json.loads((out / "selection.json").read_text())
    assert same_result(again, reference_search)
    rows = lambda p: [r.split(",")[:5] for r in (p / "search.csv").read_text().splitlines()]  # noqa: E731
    assert rows(out) == rows(world.d / "search_ref")  # same scores, in the same order


def test_finetune_twice_gives_the_same_bytes(world, reference_search):
    selection = world.d / "search_ref" / "selection.json"
    metrics = []
    for run in ("ft1", "ft2"):
        assert main(["finetune", "--selection", str(selection), "--out", str(world.d / run),
                     "--epochs", "2", "--device", "cpu"]) == 0
        metrics.append(json.loads((world.d / run / "metrics.json").read_text()))
    a, b = metrics
    assert (a["test_acc"], a["val_acc"], a["shift_acc"]) == \
        (b["test_acc"], b["val_acc"], b["shift_acc"])
    for name in ("task_delta.safetensors", "model.safetensors"):
        assert (world.d / "ft1" / name).read_bytes() == (world.d / "ft2" / name).read_bytes()
    assert a["skipped_files"] == []
