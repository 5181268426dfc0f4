"""Sizes a spec may ask for are bounded before any work; odd values end in one line.

* Family 4: every ``?option=`` of a task spec declares its maximum, and an option that
  makes data an estimate of the memory the task would hold
  (:mod:`swr.tasks.options`); a spec past either is refused at once, in one line
  naming the limit, with nothing generated.
* Family 5: ``--ray-address`` of the wrong form, or answered by something that is not
  a Ray head, ends in seconds in one line; the numeric options share one set of
  argparse types; a refused bench leaves ``--out`` as it found it; no ``--out`` may be
  the cache; ``swr predict`` says what a path is and takes ``--on-bad-file``; a native
  library that fails to load is a broken install (exit 1), ``swr check`` included; a
  checkpoint's backbone name is checked like a typed one; a failed write names the
  file being written.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import swr.tasks
from swr.app.cli import main
from swr.errors import SwrError
from swr.io import atomic_path, cache_dir, write_text

from fixtures import tiny_audio_task, tiny_checkpoint, write_clip

TESTS_DIR = Path(__file__).parent
TINY = tiny_audio_task()


def one_line(capsys, args: list[str], code: int = 2) -> str:
    """Run ``swr args`` in this process: exit ``code``, one stderr line, no traceback."""
    try:
        got = main(args)
    except SystemExit as e:  # argparse's usage errors
        got = e.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert got == code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"swr {args[0]}: error: "), lines
    print(f"BAD-INPUT | swr {' '.join(map(str, args))} | {lines[0]}")
    return lines[0]


@pytest.fixture
def ckpt(tmp_path):
    return tiny_checkpoint(tmp_path / "ckpt")


@pytest.fixture
def tiny(monkeypatch):
    """``--task tiny`` is a small in-memory task; every other name goes to the loaders."""
    real = swr.tasks.get_task
    monkeypatch.setattr(swr.tasks, "get_task",
                        lambda spec, **kw: TINY if spec == "tiny" else real(spec, **kw))


def search_args(ckpt, out, *extra) -> list[str]:
    return ["search", "--task", "tiny", "--checkpoint", str(ckpt), "--budget", "10%", "--out",
            str(out), "--device", "cpu", "--supernet-epochs", "1", "--evaluations", "4",
            "--policy", "random", *map(str, extra)]


def generated() -> list[str]:
    """Every file in the cache but supernets (the session's cache: compare, not expect empty)."""
    root = cache_dir()
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and p.parts[-2:-1] != ("supernets",)) if root.exists() else []


# ------------------------------------------------------------------------ family 4

HUGE = [
    ("kws-synth:de?speakers=100000,1,1", "speakers 100000 is above the limit of 1000"),
    ("kws-synth:de?speakers=1,1,1,5000", "speakers 5000 is above the limit of 1000"),
    ("glyphs:sketch?images=1000000,1,1", "images 1000000 is above the limit of 5000"),
    ("glyphs:fine?images=1,1,1,99999999999999999999999", "is above the limit of 5000"),
    # each count within its maximum, the whole above the memory a task may hold
    ("kws-synth:en?speakers=1000,1000,1000", "above the limit of 2.0 GiB per task"),
    ("glyphs:sketch?images=5000,5000,5000", "above the limit of 2.0 GiB per task"),
    ("kws-synth:de?shots=10000000", "shots 10000000 is above the limit of 100000"),
    ("imagefolder:/nowhere?shots=1000001", "shots 1000001 is above the limit of 100000"),
    ("kws-synth:de?speakers=16,24", "speakers must be the speaker counts of train, val, test"),
    ("kws-synth:de?speakers=0,1,1", "as 3 or 4 comma-separated positive integers"),
    ("kws-synth:de?speakers=1,1,1?speakers=2,2,2", "gives ?speakers= twice"),
    ("glyphs:sketch?pixels=64", "unknown option '?pixels=64'"),
]


@pytest.mark.parametrize("spec,needle", HUGE, ids=[s for s, _ in HUGE])
def test_spec_sizes_are_bounded_before_any_work(spec, needle):
    before = generated()
    start = time.perf_counter()
    with pytest.raises(SwrError) as e:
        swr.tasks.get_task(spec)
    assert needle in str(e.value) and spec in str(e.value), str(e.value)
    assert "\n" not in str(e.value)
    assert time.perf_counter() - start < 5 and generated() == before


def test_python_arguments_meet_the_same_bounds():
    """The loaders' own arguments go through the options' check: no way around it."""
    from swr.tasks.glyphs import load_glyphs
    from swr.tasks.kws_synth import load_kws_synth

    before = generated()
    with pytest.raises(SwrError, match="images 1000000 is above the limit of 5000"):
        load_glyphs("sketch", per_class=(1_000_000, 1, 1))
    # within the count limit, but 96 px images make it too big
    with pytest.raises(SwrError, match="above the limit of 2.0 GiB"):
        load_glyphs("sketch", per_class=(2000, 2000, 2000), image_size=96)
    with pytest.raises(SwrError, match="speakers 100000 is above the limit of 1000"):
        load_kws_synth("de", speakers=(100_000, 1, 1))
    assert generated() == before


def test_options_within_bounds_parse_to_counts():
    from swr.tasks.glyphs import IMAGES
    from swr.tasks.kws_synth import SPEAKERS
    from swr.tasks.options import parse_options

    assert parse_options("kws-synth:ru?speakers=16,24,24", "ru?speakers=16,24,24",
                         {"speakers": SPEAKERS}) == ("ru", {"speakers": (16, 24, 24)})
    assert parse_options("glyphs:fine", "fine", {"images": IMAGES}) == ("fine", {})


@pytest.mark.parametrize("command", ["search", "bench"])
def test_huge_spec_through_the_cli_is_one_line_and_writes_nothing(command, ckpt, tmp_path,
                                                                    capsys):
    out = tmp_path / "out"
    before = generated()
    args = (search_args(ckpt, out, "--workers", "0") if command == "search" else
            ["bench", "--task", "tiny", "--checkpoint", str(ckpt), "--methods", "linear",
             "--out", str(out), "--epochs", "1", "--workers", "1", "--device", "cpu"])
    args[args.index("tiny")] = "kws-synth:de?speakers=100000,1,1"
    line = one_line(capsys, args)
    assert "above the limit of 1000" in line
    assert not out.exists() and generated() == before


# ------------------------------------------------------------------------ family 5

@pytest.mark.parametrize("address,needle", [
    ("", "is not of the form host:port"),
    ("127.0.0.1:notaport", "is not of the form host:port"),
    ("127.0.0.1:70000", "is not of the form host:port"),
    ("http://127.0.0.1:18080", "http:// is not a Ray address"),
])
def test_ray_address_of_the_wrong_form_is_one_line(address, needle, ckpt, tmp_path, capsys,
                                                   tiny):
    line = one_line(capsys, search_args(ckpt, tmp_path / "o", "--workers", "1",
                                        "--ray-address", address))
    assert needle in line and repr(address) in line
    assert not (tmp_path / "o").exists()


def test_ray_address_with_workers_0_is_a_contradiction(ckpt, tmp_path, capsys, tiny):
    line = one_line(capsys, search_args(ckpt, tmp_path / "o", "--workers", "0",
                                        "--ray-address", "127.0.0.1:6379"))
    assert "--ray-address 127.0.0.1:6379 with --workers 0" in line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_address_answered_by_an_http_server_ends_in_seconds(ckpt, tmp_path):
    """Used to hang over 300 s, deaf to SIGTERM: now one line naming what answered."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind",
                               "127.0.0.1"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 20
        while time.time() < deadline:  # until it listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        env = dict(os.environ, SWR_CACHE=str(tmp_path / "cache"))
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "swr.app.cli", *search_args(ckpt, tmp_path / "o"), "--task",
             "kws-synth:de", "--workers", "1", "--ray-address", f"127.0.0.1:{port}"],
            capture_output=True, text=True, env=env, timeout=60)
        seconds = time.perf_counter() - start
    finally:
        server.kill()
        server.wait()
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-2000:]
    assert seconds < 20, seconds
    assert f"127.0.0.1:{port}" in err[0] and "not a Ray head" in err[0]
    assert "an HTTP server answered" in err[0], err[0]
    # refused before any work: the task was not generated, nothing written
    assert not (tmp_path / "cache").exists() and not (tmp_path / "o").exists()
    print(f"BAD-INPUT | swr search ... --ray-address <python -m http.server> | {err[0]}")


@pytest.mark.parametrize("args,needle", [
    (["search", "--task", "t", "--checkpoint", "c", "--budget", "1%", "--out", "o",
      "--samples-per-iteration", "0"], "argument --samples-per-iteration: '0' must be a positive"),
    (["search", "--task", "t", "--checkpoint", "c", "--budget", "1%", "--out", "o",
      "--samples-per-iteration", "-5"], "'-5' must be a positive integer"),
    (["search", "--task", "t", "--checkpoint", "c", "--budget", "1%", "--out", "o",
      "--workers", "-1"], "argument --workers: '-1' must be 0 (no Ray) or more"),
    (["bench", "--task", "t", "--checkpoint", "c", "--methods", "linear", "--out", "o",
      "--workers", "-1"], "argument --workers: '-1' must be 0 (no Ray) or more"),
    (["demo", "--workers", "-1"], "argument --workers: '-1' must be 0 (no Ray) or more"),
    (["pretrain", "--task", "t", "--backbone", "b", "--out", "o", "--lr", "inf"],
     "argument --lr: 'inf' must be a finite number above 0"),
    (["finetune", "--selection", "s", "--out", "o", "--lr", "nan"],
     "argument --lr: 'nan' must be a finite number above 0"),
    (["bench", "--task", "t", "--checkpoint", "c", "--methods", "linear", "--out", "o",
      "--lr", "-0.1"], "argument --lr: '-0.1' must be a finite number above 0"),
    (["bench", "--task", "t", "--checkpoint", "c", "--methods", "linear", "--out", "o",
      "--seeds", "0"], "argument --seeds: '0' must be a positive integer"),
    (["pretrain", "--task", "t", "--backbone", "b", "--out", "o", "--batch-size", "0"],
     "argument --batch-size: '0' must be a positive integer"),
    (["predict", "x.wav", "--store", "s", "--task", "t", "--top", "0"],
     "argument --top: '0' must be a positive integer"),
    (["inspect", "--backbone", "bcresnet-1", "--seed", "-3"], "--seed -3 must be an integer from 0"),
    (["pretrain", "--task", "t", "--backbone", "b", "--out", "o", "--epochs", "many"],
     "invalid int value: 'many'"),
])
def test_numeric_options_share_one_set_of_types(capsys, args, needle):
    line = one_line(capsys, args)
    assert needle in line, line


def make_imagefolder(root: Path) -> None:
    from PIL import Image

    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8), (40, 80, 120)).save(root / split / c / "0.png")


@pytest.mark.parametrize("existing", [False, True])
def test_bench_of_a_missing_folder_is_refused_before_any_worker(ckpt, tmp_path, capsys,
                                                                existing):
    """With the default --seeds 3 the line used to come after 14 s, followed by Ray's
    "Unhandled error" traceback, and --out kept fingerprint.json and preds/."""
    out = tmp_path / "b"
    if existing:  # a folder the user made: left as it was found
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    start = time.perf_counter()
    line = one_line(capsys, ["bench", "--task", f"imagefolder:{tmp_path / 'missing'}",
                             "--checkpoint", str(ckpt), "--methods", "linear", "--out",
                             str(out), "--epochs", "1", "--device", "cpu"])
    assert "image folder dataset not found" in line
    assert time.perf_counter() - start < 10
    if existing:
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    else:
        assert not out.exists()


def test_bench_refused_after_its_lock_leaves_out_as_found(ckpt, tmp_path, capsys, monkeypatch):
    """A refusal after ``--out`` was locked, the fingerprint written and ``preds/`` made
    (here: by its first run) takes back what the bench made there."""
    import swr.app.bench.run

    def refuse(*a, **k):
        raise SwrError("refused for the test")

    monkeypatch.setattr(swr.app.bench.run, "run_job", refuse)
    real = swr.tasks.get_task
    monkeypatch.setattr(swr.tasks, "get_task",
                        lambda spec, **kw: TINY if spec == "tiny" else real(spec, **kw))
    out = tmp_path / "b"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["bench", "--task", "tiny", "--checkpoint", str(ckpt), "--methods", "linear",
                 "--out", str(out), "--epochs", "1", "--seeds", "1", "--workers", "1",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error" in ln]  # beside the progress bar
    assert lines == ["swr bench: error: refused for the test"] and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_search_refused_after_its_fingerprint_leaves_out_as_found(ckpt, tmp_path, capsys,
                                                                   tiny):
    """A budget below the cheapest layer is found once the model is loaded, after
    ``fingerprint.json`` used to be written (and then refused a rerun as an earlier run)."""
    out = tmp_path / "o"
    args = search_args(ckpt, out, "--workers", "0")
    args[args.index("10%")] = "3"
    for _ in range(2):  # the same line again: nothing of the first try is in the way
        line = one_line(capsys, args)
        assert "is below the cheapest layer" in line and not out.exists()


@pytest.mark.parametrize("command", ["search", "bench", "fold", "pretrain"])
def test_no_out_may_be_the_cache(command, ckpt, tmp_path, capsys):
    cache = cache_dir()
    args = {
        "search": search_args(ckpt, cache, "--workers", "0"),
        "bench": ["bench", "--task", "tiny", "--checkpoint", str(ckpt), "--methods", "linear",
                  "--out", str(cache / "runs"), "--workers", "1"],
        # replacing --out whole: a folder holding the cache is refused too
        "fold": ["fold", "--checkpoint", str(ckpt), "--delta", str(tmp_path / "d.safetensors"),
                 "--out", str(cache.parent)],
        "pretrain": ["pretrain", "--task", "tiny", "--backbone", "bcresnet-1", "--out",
                     str(cache), "--epochs", "1", "--device", "cpu"],
    }[command]
    line = one_line(capsys, args)
    assert "$SWR_CACHE" in line and "choose another output folder" in line


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A task store holding one audio task 'tiny' (norm tuning, one epoch)."""
    from swr.app.bench import finetune_method
    from swr.source import BaseSpec

    monkeypatch.setattr(swr.tasks, "get_task", lambda spec, **kw: TINY)
    ckpt = tiny_checkpoint(tmp_path / "base")
    run = tmp_path / "run"
    finetune_method("norm", "tiny", BaseSpec(checkpoint=str(ckpt)), run, epochs=1,
                    device="cpu", progress=False)
    assert main(["store", "add", str(tmp_path / "store"), "--checkpoint", str(ckpt), "--delta",
                 str(run / "task_delta.safetensors"), "--name", "tiny"]) == 0
    return tmp_path / "store", run / "task_delta.safetensors"


def test_store_add_refuses_a_class_named_twice(store, capsys):
    folder, delta = store
    capsys.readouterr()
    line = one_line(capsys, ["store", "add", str(folder), "--delta", str(delta), "--name",
                             "again", "--classes", "c0,c0,c2,c3"])
    assert "'c0'" in line and "twice" in line


def test_predict_says_what_a_path_is_and_skips_on_request(store, tmp_path, capsys):
    folder, _ = store
    good = write_clip(tmp_path / "yes.wav", 1)
    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)
    (tmp_path / "adir.wav").mkdir()
    capsys.readouterr()
    base = ["predict", "--store", str(folder), "--task", "tiny"]
    line = one_line(capsys, [*base, str(fifo)])
    assert "a FIFO (named pipe), not a regular file" in line and "not found" not in line
    line = one_line(capsys, [*base, str(tmp_path / "adir.wav")])
    assert "it is a folder, not a regular file" in line
    assert "input file not found" in one_line(capsys, [*base, str(tmp_path / "none.wav")])
    # skip: the readable files are classified, the others listed
    capsys.readouterr()
    assert main([*base, str(good), str(fifo), str(tmp_path / "adir.wav"), "--json",
                 "--on-bad-file", "skip"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert [r["file"] for r in out["predictions"]] == [str(good)]
    assert [r["file"] for r in out["skipped"]] == [str(fifo), str(tmp_path / "adir.wav")]
    assert "skipped 2 unreadable file(s)" in captured.err
    assert len(captured.err.strip().splitlines()) == 1


FAKE_SOUNDFILE = ('raise OSError("cannot load library \'libsndfile.so\': libsndfile.so: cannot '
                  'open shared object file: No such file or directory")\n')


def test_missing_libsndfile_is_a_broken_install_everywhere(tmp_path, ckpt):
    """Was exit 2 (bad input) while swr check said ok."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "soundfile.py").write_text(FAKE_SOUNDFILE)
    env = dict(os.environ, PYTHONPATH=str(fake), SWR_CACHE=str(tmp_path / "cache"))
    for args in (["check"], ["search", "--task", "kws-synth:de", "--checkpoint", str(ckpt),
                             "--budget", "10%", "--out", str(tmp_path / "o"), "--workers", "0",
                             "--device", "cpu"]):
        proc = subprocess.run([sys.executable, "-m", "swr.app.cli", *args], capture_output=True,
                              text=True, env=env, timeout=120)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(err) == 1, proc.stderr[-2000:]
        assert "broken install" in err[0] and "soundfile" in err[0] and "libsndfile" in err[0]


def test_swr_check_loads_soundfile(capsys):
    assert main(["check"]) == 0
    assert "soundfile" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["timm:../../x", "timm:", "vgg16", ""])
def test_checkpoint_backbone_is_checked_like_a_typed_one(name, ckpt, tmp_path, capsys):
    metrics = json.loads((ckpt / "metrics.json").read_text())
    (ckpt / "metrics.json").write_text(json.dumps({**metrics, "backbone": name}))
    line = one_line(capsys, ["fold", "--checkpoint", str(ckpt), "--delta",
                             str(tmp_path / "d.safetensors"), "--out", str(tmp_path / "f")])
    assert str(ckpt / "metrics.json") in line and "backbone" in line
    assert "unknown timm model ''" not in line


def test_a_full_disk_names_the_file_being_written(tmp_path, monkeypatch):
    dest = tmp_path / "results.csv"
    # a copy (store add) names its source and the temporary file: the line names dest
    with pytest.raises(OSError) as e:
        with atomic_path(dest) as tmp:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "src"), None,
                          str(tmp))
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(dest)
    # a plain write names nothing
    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError) as e:
        write_text(dest, "x")
    assert e.value.filename == str(dest) and not dest.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left
    # an input that cannot be read keeps its own name
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError) as e:
        with atomic_path(dest):
            open(tmp_path / "no-such-input")
    assert e.value.filename == str(tmp_path / "no-such-input")


def test_full_disk_through_the_cli_names_the_file(ckpt, tmp_path, capsys, monkeypatch, tiny):
    """`swr search` on a full disk used to print the error with no file at all."""
    import swr.io

    real = swr.io.write_text

    def full(path, text):
        if Path(path).name == "fingerprint.json":
            with atomic_path(path):
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, text)

    monkeypatch.setattr(swr.io, "write_text", full)
    line = one_line(capsys, search_args(ckpt, tmp_path / "o", "--workers", "0"))
    assert "No space left on device" in line and str(tmp_path / "o" / "fingerprint.json") in line
