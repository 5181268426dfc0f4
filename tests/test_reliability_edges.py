"""Reliability at the edges, second round: runaway resources, dataset walks, tracebacks
on odd values, and errors that used to surface only after training.

* Worker counts follow one rule (:func:`swr.policies.ray_setup.resolve_workers`): never more
  than the CPUs this process may use (or the joined cluster has); more is reduced
  with a one-line notice.
* Dataset walks never open a non-regular file (a FIFO named like an image or clip
  would block forever), follow symlinked folders only inside the class folder, merge
  MSWC words that differ only by case, and read tables that start with a BOM.
* Odd values (huge budgets and seeds, devices torch cannot train on, damaged bench
  state, unwritable output or cache folders) end in one line, exit 2, before any
  training.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import swr.policies.ray_setup
import swr.tasks
from swr.app.cli import main
from swr.errors import SwrError

from fixtures import tiny_checkpoint, write_clip
# the tiny task behind ``--task tiny`` and the module's set-up (tiny_world, autouse)
from test_reliability import (TESTS_DIR, get_task, make_imagefolder,  # noqa: F401
                              make_speechcommands, one_line_error, tiny_world)


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the suite) when the block runs longer than ``seconds``."""
    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: it hangs")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("edges")
    return SimpleNamespace(d=d, ckpt=tiny_checkpoint(d / "ckpt"))


def search_args(w, out, *extra, budget="10%"):
    return ["search", "--task", "tiny", "--checkpoint", str(w.ckpt), f"--budget={budget}",
            "--out", str(w.d / out), "--workers", "0", "--device", "cpu",
            "--supernet-epochs", "1", "--evaluations", "4", "--policy", "random", *extra]


def with_option(args: list[str], option: str, value=None) -> list[str]:
    """``args`` with ``option``'s value replaced by ``value`` (``None``: the option removed)."""
    i = args.index(option)
    if value is None:
        return args[:i] + args[i + 2:]
    return args[:i + 1] + [str(value)] + args[i + 2:]


def pretrain_args(w, task, *extra):
    return ["pretrain", "--task", task, "--backbone", "bcresnet-1", "--out", str(w.d / "pre"),
            "--epochs", "1", "--device", "cpu", *extra]


@pytest.fixture
def no_training(monkeypatch):
    """Any supernet or model training in this test fails it: errors must come first."""
    import swr.pretrain
    import swr.supernet

    def trained(*args, **kwargs):
        raise AssertionError("training started before the bad value was refused")

    monkeypatch.setattr(swr.supernet, "train_supernet", trained)
    monkeypatch.setattr(swr.pretrain, "train", trained)


# ------------------------------------------------------------------ runaway resources

def no_ray_running(monkeypatch) -> None:
    """As if no Ray instance ran (another test module's may still): the cap is then this
    process's CPUs."""
    monkeypatch.setattr(swr.policies.ray_setup.ray, "is_initialized", lambda: False)


def test_workers_are_capped_at_the_cpus_this_process_may_use(monkeypatch, capsys):
    """One rule for every command: None = one per CPU; above the CPUs: reduced, one notice."""
    no_ray_running(monkeypatch)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert swr.policies.ray_setup.local_cpus() == 1  # the affinity, not os.cpu_count()
    assert swr.policies.ray_setup.resolve_workers(None) == 1
    assert swr.policies.ray_setup.resolve_workers(1) == 1
    assert swr.policies.ray_setup.resolve_workers(0) == 0  # no Ray
    assert capsys.readouterr().err == ""
    assert swr.policies.ray_setup.resolve_workers(1000) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["swr: --workers 1000 is more than the 1 CPU(s) this process may use; "
                   "starting 1 worker(s)"]
    print(f"BAD-INPUT | search ... --workers 1000 (this process may use 1 CPU) | {err[0]}")


def test_workers_are_capped_at_the_cpus_of_a_joined_cluster(monkeypatch, capsys):
    """With --ray-address the cluster's CPUs are the cap (joined first, so an unreachable
    one fails before any training), not this machine's."""
    joined = []
    monkeypatch.setattr(swr.policies.ray_setup, "init_ray", lambda address=None, **k: joined.append(address))
    monkeypatch.setattr(swr.policies.ray_setup.ray, "is_initialized", lambda: True)
    monkeypatch.setattr(swr.policies.ray_setup.ray, "cluster_resources", lambda: {"CPU": 48.0})
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert swr.policies.ray_setup.resolve_workers(None, "10.0.0.1:6379") == 48
    assert swr.policies.ray_setup.resolve_workers(32, "10.0.0.1:6379") == 32
    assert capsys.readouterr().err == ""
    assert swr.policies.ray_setup.resolve_workers(1000, "10.0.0.1:6379") == 48
    assert capsys.readouterr().err.strip() == (
        "swr: --workers 1000 is more than the 48 CPU(s) of the Ray cluster; starting 48 worker(s)")
    assert joined == ["10.0.0.1:6379"] * 3
    assert swr.policies.ray_setup.resolve_workers(0, "10.0.0.1:6379") == 0 and len(joined) == 3  # no Ray


class RecordingPool:
    """Stands in for the Ray pool: records how many workers it was asked for, scores in-process."""

    asked: list[int] = []

    def __init__(self, factory, names, workers, **kwargs):
        from swr.policies.pool import LocalPool

        RecordingPool.asked.append(workers)
        self._local = LocalPool(factory())
        self.retries = 0

    def map(self, selections):
        return self._local.map(selections)

    def close(self):
        pass


def test_search_with_1000_workers_starts_no_more_than_the_cpus(world, monkeypatch, capsys):
    import swr.policies.pool

    monkeypatch.setattr(swr.policies.pool, "RayPool", RecordingPool)
    monkeypatch.setattr(swr.policies.ray_setup, "init_ray", lambda *a, **k: None)
    no_ray_running(monkeypatch)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    RecordingPool.asked.clear()
    assert main(with_option(search_args(world, "many_workers"), "--workers", 1000)) == 0
    err = capsys.readouterr().err
    assert "swr: --workers 1000 is more than the 2 CPU(s) this process may use; " \
           "starting 2 worker(s)" in err, err
    assert RecordingPool.asked == [2]
    selection = json.loads((world.d / "many_workers" / "selection.json").read_text())
    assert selection["workers"] == 2
    # the default (no --workers) is the same cap: one worker per CPU
    assert main(with_option(search_args(world, "default_workers"), "--workers")) == 0
    assert RecordingPool.asked == [2, 2] and "more than" not in capsys.readouterr().err


def test_bench_workers_are_capped_too(world, monkeypatch, capsys):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    no_ray_running(monkeypatch)
    started = []
    monkeypatch.setattr(swr.policies.ray_setup, "init_ray", lambda *a, **k: started.append(a))
    assert main(["bench", "--task", "tiny", "--checkpoint", str(world.ckpt), "--methods",
                 "linear", "--seeds", "2", "--epochs", "1", "--workers", "64", "--device", "cpu",
                 "--out", str(world.d / "bench_capped")]) == 0
    err = capsys.readouterr().err
    assert "swr: --workers 64 is more than the 1 CPU(s) this process may use; " \
           "starting 1 worker(s)" in err, err
    assert started == []  # one worker: the runs go one after another, no Ray
    assert len((world.d / "bench_capped" / "results.csv").read_text().splitlines()) == 3


SEARCH_SCRIPT = r"""
import os, sys
sys.path.insert(0, os.environ["SWR_TESTS_DIR"])
import torch
torch.set_num_threads(1)
from fixtures import tiny_audio_task
import swr.tasks
task = tiny_audio_task()
swr.tasks.get_task = lambda spec, **kw: task
from swr.app.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.ray
@pytest.mark.slow
def test_search_with_default_workers_on_one_cpu_does_not_hang(world, tmp_path):
    """Under `taskset -c 0` the default used to be os.cpu_count() workers that each waited
    for a CPU Ray (started with the process's one CPU) could never give."""
    env = dict(os.environ, SWR_TESTS_DIR=str(TESTS_DIR), SWR_CACHE=str(tmp_path / "cache"))
    args = with_option(with_option(search_args(world, "x"), "--workers"), "--out", tmp_path / "out")
    proc = subprocess.run([sys.executable, "-c", SEARCH_SCRIPT, *args], capture_output=True,
                          text=True, env=env, timeout=300,
                          preexec_fn=lambda: os.sched_setaffinity(0, {0}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "selection.json").read_text())["workers"] == 1


# ------------------------------------------------------------------ dataset walks

def fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def test_fifo_named_like_an_image_is_never_opened(world, capsys):
    root = make_imagefolder(world.d / "img_fifo")
    fifo(root / "train" / "a" / "x.png")
    with deadline(120):
        line = one_line_error(capsys, pretrain_args(world, f"imagefolder:{root}"))
        assert "x.png" in line and "FIFO" in line and "--on-bad-file skip" in line, line
        task = swr.tasks.get_task(f"imagefolder:{root}", on_bad_file="skip")
    assert [Path(p).name for p in task.info["skipped"]] == ["x.png"]
    assert len(task.train) + len(task.val) == 6  # the three real images of each class


def test_fifo_named_like_a_clip_is_never_opened(world, capsys):
    sc = make_speechcommands(world.d / "sc_fifo")
    fifo(sc / "yes" / "x.wav")
    with deadline(120):
        line = one_line_error(capsys, pretrain_args(world, f"speechcommands:{sc}"))
        assert "x.wav" in line and "FIFO" in line, line
        task = swr.tasks.get_task(f"speechcommands:{sc}", on_bad_file="skip")
        assert [Path(p).name for p in task.info["skipped"]] == ["x.wav"]


def test_fifo_among_noise_recordings_or_mswc_clips_is_never_opened(world, capsys):
    noise = make_speechcommands(world.d / "sc_fifo_noise")
    fifo(noise / "_background_noise_" / "hum.wav")
    with deadline(120):
        line = one_line_error(capsys, pretrain_args(world, f"speechcommands:{noise}"))
        assert "hum.wav" in line and "FIFO" in line, line
        mswc = make_mswc_table(world.d / "mswc_fifo", {"hallo": 2, "welt": 2})
        fifo(mswc / "de" / "clips" / "welt" / "fifo.wav")
        with open(mswc / "de" / "de_splits.csv", "a") as f:
            f.write("TRAIN,welt/fifo.wav,welt,1,s,m\n")
        from swr.tasks.mswc import load_mswc

        with pytest.raises(SwrError, match="fifo.wav: it is a FIFO"):
            load_mswc(mswc, "de", n_keywords=2, min_count=1)


def test_symlinked_folders_do_not_multiply_or_leak_a_class(world):
    root = make_imagefolder(world.d / "img_links", classes=("a", "b", "c"), n_train=4)
    os.symlink("..", root / "train" / "a" / "loop")  # to train/: every class, again and again
    os.symlink(".", root / "train" / "b" / "self")  # to itself
    os.symlink(root / "test" / "c", root / "train" / "c" / "test_c")  # to another split
    (root / "train" / "b" / "sub").mkdir()
    os.symlink("..", root / "train" / "b" / "sub" / "up")  # inside the class, walked already
    with deadline(120):
        task = swr.tasks.get_task(f"imagefolder:{root}")
    counts = {name: task.info["class_counts"]["train"][name]
              + task.info["class_counts"]["val"][name] for name in task.class_names}
    assert counts == {"a": 4, "b": 4, "c": 4}
    files = [p for ds in (task.train, task.val) for p, _ in ds.items]
    assert all("test" not in p.relative_to(root).parts for p in files)


def test_a_class_folder_that_is_a_symlink_is_still_read(world):
    root = make_imagefolder(world.d / "img_classlink")
    elsewhere = make_imagefolder(world.d / "img_elsewhere", classes=("z",))
    os.symlink(elsewhere / "train" / "z", root / "train" / "z")
    os.symlink(elsewhere / "test" / "z", root / "test" / "z")
    task = swr.tasks.get_task(f"imagefolder:{root}")
    assert task.class_names == ["a", "b", "z"]
    assert task.info["class_counts"]["train"]["z"] + task.info["class_counts"]["val"]["z"] == 3


def make_mswc_table(root: Path, words: dict[str, int], bom: bool = False) -> Path:
    """An MSWC language folder with ``n`` TRAIN, one DEV and one TEST clip per word."""
    rows = []
    for i, (word, n) in enumerate(words.items()):
        for k in range(n + 2):
            split = "TRAIN" if k < n else ("DEV" if k == n else "TEST")
            write_clip(root / "de" / "clips" / word / f"{k}.wav", i)
            rows.append(f"{split},{word}/{k}.wav,{word},1,s{k},m")
    text = "SET,LINK,WORD,VALID,SPEAKER,GENDER\n" + "".join(r + "\n" for r in rows)
    (root / "de" / "de_splits.csv").write_text(("\ufeff" if bom else "") + text,
                                                encoding="utf-8")
    return root


def test_mswc_words_that_differ_only_by_case_are_one_class(world):
    from swr.tasks.mswc import load_mswc

    root = make_mswc_table(world.d / "mswc_case", {"Eins": 2, "eins": 3, "zwei": 4, "drei": 1})
    task = load_mswc(root, "de", n_keywords=2, min_count=2)
    assert task.class_names == ["eins", "zwei", "_unknown_", "_silence_"]
    assert task.info["keywords"] == {"eins": 5, "zwei": 4}  # both spellings' clips
    assert task.info["merged_spellings"] == {"eins": ["Eins", "eins"]}
    assert task.info["class_counts"]["train"]["eins"] == 5


def test_tables_that_start_with_a_bom_are_read(world):
    from swr.tasks.mswc import load_mswc

    root = make_mswc_table(world.d / "mswc_bom", {"eins": 2, "zwei": 2}, bom=True)
    task = load_mswc(root, "de", n_keywords=2, min_count=1)
    assert task.class_names[:2] == ["eins", "zwei"]
    sc = make_speechcommands(world.d / "sc_bom")
    for name in ("validation_list.txt", "testing_list.txt"):
        text = (sc / name).read_text()
        (sc / name).write_text("\ufeff" + text, encoding="utf-8")
    task = swr.tasks.get_task(f"speechcommands:{sc}")
    assert len(task.val) > 0 and len(task.test) > 0


# ------------------------------------------------------------------ tracebacks on odd values

def bench_args(w, out, *extra):
    return ["bench", "--task", "tiny", "--checkpoint", str(w.ckpt), "--methods", "linear",
            "--seeds", "1", "--epochs", "1", "--workers", "1", "--device", "cpu", "--out",
            str(w.d / out), *extra]


@pytest.fixture(scope="module")
def finished_bench(world):
    """A finished one-run bench whose results.csv the damage cases start from."""
    assert main(bench_args(world, "bench_ok")) == 0
    return world.d / "bench_ok"


def damaged_bench(world, finished, name: str, csv_text=None, skipped_text=None) -> str:
    out = world.d / name
    out.mkdir(exist_ok=True)
    text = (finished / "results.csv").read_text()
    (out / "results.csv").write_text(csv_text(text) if csv_text else text)
    if skipped_text is not None:
        (out / "skipped_files.json").write_text(skipped_text)
    return name


def bad_row(text: str) -> str:
    lines = text.splitlines()
    cells = next(csv.reader([lines[1]]))
    cells[3] = "zero"  # the seed
    return "\n".join([lines[0], ",".join(cells)]) + "\n"


ODD_VALUES = [
    ("budget-400-nines", lambda w, b: search_args(w, "o", budget="9" * 400),
     ["400 characters", "too large"]),
    ("budget-overflow", lambda w, b: search_args(w, "o", budget="1e309k"),
     ["1e309k", "too large"]),
    ("seed-negative", lambda w, b: search_args(w, "o", "--seed", "-1"),
     ["--seed -1", "4294967295"]),
    ("seed-huge", lambda w, b: search_args(w, "o", "--seed", "99999999999999999999999"),
     ["99999999999999999999999", "4294967295"]),
    ("seed-huge-finetune", lambda w, b: ["finetune", "--selection", str(w.d / "none.json"),
                                         "--out", str(w.d / "ft"), "--seed", "4294967296"],
     ["4294967296"]),
    ("device-meta", lambda w, b: search_args(w, "o", "--device", "meta"),
     ["'meta'", "cannot run training"]),
    ("device-mps", lambda w, b: pretrain_args(w, "tiny", "--device", "mps"), ["'mps'"]),
    ("bench-resume-bad-row", lambda w, b: bench_args(w, damaged_bench(
        w, b, "bench_bad_row", bad_row), "--resume"),
     ["results.csv:2", "not a finished run", "remove it", "new --out"]),
    ("bench-resume-wrong-header", lambda w, b: bench_args(w, damaged_bench(
        w, b, "bench_bad_header", lambda t: "a,b,c\n1,2,3\n"), "--resume"),
     ["results.csv", "not a results table", "remove it"]),
    ("bench-resume-short-row", lambda w, b: bench_args(w, damaged_bench(
        w, b, "bench_short_row", lambda t: t + "tiny,linear\n"), "--resume"),
     ["results.csv:3", "one value per column"]),
    ("bench-resume-skipped-not-json", lambda w, b: bench_args(w, damaged_bench(
        w, b, "bench_skipped_json", skipped_text="{'tiny': ["), "--resume"),
     ["skipped_files.json", "remove it or start a new --out"]),
    ("bench-resume-skipped-wrong-shape", lambda w, b: bench_args(w, damaged_bench(
        w, b, "bench_skipped_shape", skipped_text='{"tiny": "a.wav"}'), "--resume"),
     ["skipped_files.json", "remove it or start a new --out"]),
    ("finetune-over-budget-names-real-options", lambda w, b: ["finetune", "--selection",
                                                              str(over_budget(w)), "--out",
                                                              str(w.d / "ft")],
     ["over the budget of 30", "swr search again with a larger --budget"]),
    ("mswc-too-few-words", lambda w, b: pretrain_args(
        w, f"mswc:{make_mswc_table(w.d / 'mswc_few', {'eins': 3})}:de"),
     ["only 0 words have at least 10 TRAIN clips", "add TRAIN rows"]),
    ("out-is-a-file", lambda w, b: with_option(search_args(w, "o"), "--out", a_file(w) / "sub"),
     ["cannot write --out", "a_file is a file"]),
    ("out-is-a-file-bench", lambda w, b: with_option(bench_args(w, "x"), "--out",
                                                     a_file(w) / "b"),
     ["cannot write --out", "is a file"]),
]


def a_file(w) -> Path:
    f = w.d / "a_file"
    f.write_text("x")
    return f


def over_budget(w) -> Path:
    path = w.d / "selection_over_budget.json"
    path.write_text(json.dumps({"layers": ["stem.0"], "task": "tiny", "checkpoint": str(w.ckpt),
                                "budget_params": 30}))
    return path


@pytest.mark.parametrize("make_args,needles", [c[1:] for c in ODD_VALUES],
                         ids=[c[0] for c in ODD_VALUES])
def test_odd_values_fail_with_one_line_before_training(world, finished_bench, capsys,
                                                       no_training, make_args, needles):
    args = make_args(world, finished_bench)
    line = one_line_error(capsys, args)
    for needle in needles:
        assert needle in line, line
    assert "mswc_few" in " ".join(args) or not (world.d / "o").exists()  # nothing written


def test_damaged_bench_state_is_left_as_it_was(world, finished_bench, capsys):
    name = damaged_bench(world, finished_bench, "bench_kept", bad_row)
    before = (world.d / name / "results.csv").read_bytes()
    assert main(bench_args(world, name, "--resume")) == 2
    capsys.readouterr()
    assert (world.d / name / "results.csv").read_bytes() == before


def test_unwritable_cache_fails_before_training(world, capsys, monkeypatch, no_training):
    monkeypatch.setenv("SWR_CACHE", str(a_file(world) / "cache"))
    line = one_line_error(capsys, search_args(world, "o_cache"))
    assert "SWR_CACHE" in line and "a_file is a file" in line, line
    assert not (world.d / "o_cache").exists()


def test_seed_range_is_checked_from_python_too(world):
    from swr.app.search import SearchConfig

    with pytest.raises(SwrError, match="--seed -1 must be an integer from 0 to 4294967295"):
        SearchConfig(task="tiny", checkpoint=str(world.ckpt), budget="10%", out="x",
                     seed=-1).validate()


def test_devices_torch_cannot_use_are_refused(monkeypatch):
    from swr.train import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    for device in ("meta", "mps", "xpu", "cuda:99"):
        with pytest.raises(SwrError, match="--device"):
            resolve_device(device)


# ------------------------------------------------------------------ Ray failures, told right

AUTH_HEAD_SCRIPT = r"""
import sys
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 1, "include_dashboard": False, "object_store_memory": 80 * 1024**2})
print(cluster.address, flush=True)
sys.stdin.readline()  # the test says when to stop
cluster.shutdown()
"""


@pytest.mark.ray
@pytest.mark.slow
def test_cluster_with_token_authentication_is_told_apart(world, tmp_path):
    """A head under token authentication that this process has no token for: the line
    says to set RAY_AUTH_MODE=token, not that the cluster is unreachable."""
    token = "0123456789abcdef0123456789abcdef"
    head_env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    head = subprocess.Popen([sys.executable, "-c", AUTH_HEAD_SCRIPT], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=head_env)
    try:
        address = head.stdout.readline().strip()
        assert address, "the test cluster did not start"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        env.update(SWR_TESTS_DIR=str(TESTS_DIR), SWR_CACHE=str(tmp_path / "cache"),
                   RAY_AUTH_MODE="disabled")
        args = with_option(search_args(world, "x"), "--out", tmp_path / "out")
        proc = subprocess.run([sys.executable, "-c", SEARCH_SCRIPT, *with_option(
            args, "--workers", 1), "--ray-address", address], capture_output=True, text=True,
            env=env, timeout=300)
    finally:
        head.stdin.write("stop\n")
        head.stdin.flush()
        head.wait(timeout=60)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(err) == 1 and "RAY_AUTH_MODE=token" in err[0] and address in err[0], err
    assert "cannot reach" not in err[0]
    assert not (tmp_path / "cache" / "supernets").exists()  # refused before stage 1
    print(f"BAD-INPUT | swr search ... --ray-address <head under token auth> | {err[0]}")


@pytest.mark.ray
@pytest.mark.slow
def test_dead_local_ray_node_ends_the_search_with_the_resume_hint(world, tmp_path):
    """The Ray node this search started dies mid-search (raylet and workers killed):
    exit 75 and one line with --resume, the evaluations so far kept; not exit 1 and
    Ray's log lines."""
    import psutil

    from test_faults import SLOW_SEARCH_SCRIPT

    env = dict(os.environ, SWR_TESTS_DIR=str(TESTS_DIR), SWR_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "run"
    args = ["search", "--task", "tiny", "--checkpoint", str(world.ckpt), "--budget", "10%",
            "--out", str(out), "--policy", "random", "--evaluations", "12", "--seed", "3",
            "--workers", "2", "--device", "cpu", "--supernet-epochs", "1",
            "--samples-per-iteration", "2"]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SEARCH_SCRIPT, *args],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    log = out / "evaluations.jsonl"
    ray_processes = []
    try:
        with deadline(240):
            while proc.poll() is None and not (
                    log.is_file() and len(log.read_text().splitlines()) >= 2):
                subprocess.run(["sleep", "0.1"])
        assert proc.poll() is None, "the search ended before its Ray node could die"
        ray_processes = psutil.Process(proc.pid).children(recursive=True)
        for p in ray_processes:
            if p.name() == "raylet" or p.name().startswith("ray::EvaluatorWorker"):
                p.kill()
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in ray_processes:  # the rest of the instance this search started
            with contextlib.suppress(psutil.Error):
                p.kill()
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("swr search")]
    assert proc.returncode == 75, err[-3000:]
    assert len(lines) == 1 and "the Ray node on this machine died" in lines[0] \
        and "--resume" in lines[0], err
    assert "Traceback" not in err and "core_worker" not in err, err
    kept = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()]
    assert 2 <= len(kept) < 12 and not (out / "selection.json").exists()
