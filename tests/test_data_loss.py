"""Nothing a command does loses data: store paths stay inside the store, every writer of
a folder takes its lock, an interrupted or terminated rerun leaves the old run whole
(logs included), and a folder holding a run is replaced only on request.

Real subprocesses throughout: locks, signals and exit codes are properties of processes.
"""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from swr.export import delta_from_folded, write_task_delta
from swr.store import TaskStore, create_or_open
from swr.source import BaseSpec
from swr.tasks.backbones import create_backbone, save_checkpoint

BACKBONE = "bcresnet-1"
SOURCE = "glyphs:source?images=3,2,2"


def swr(*args, env=None, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "swr.app.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, **kw)


def one_line(p) -> str:
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def base_and_deltas(tmp_path_factory):
    """A bcresnet-1 base file and two task deltas made on it (no training: perturbed copies)."""
    tmp = tmp_path_factory.mktemp("deltas")
    torch.manual_seed(0)
    base = create_backbone(BACKBONE, num_classes=4).eval()
    weights = tmp / "base.safetensors"
    save_checkpoint(base, weights, backbone=BACKBONE)
    deltas = {}
    for i, name in enumerate(("one", "two", "three")):
        task = create_backbone(BACKBONE, num_classes=4).eval()
        task.load_state_dict(base.state_dict())
        with torch.no_grad():
            next(p for n, p in task.named_parameters() if n.endswith("weight")).add_(0.01 * (i + 1))
        path = tmp / f"{name}.safetensors"
        write_task_delta(delta_from_folded(base, task), path, base=base, backbone=BACKBONE,
                         task=name, extra={"classes": ["a", "b", "c", "d"]})
        deltas[name] = path
    return weights, deltas


@pytest.fixture()
def store(tmp_path, base_and_deltas):
    weights, deltas = base_and_deltas
    s = create_or_open(tmp_path / "st", BaseSpec(backbone=BACKBONE, weights=str(weights)))
    s.add(deltas["one"], name="sk")
    return tmp_path / "st"


def test_store_paths_outside_the_store_are_refused_and_nothing_is_deleted(tmp_path, store,
                                                                         base_and_deltas):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    index = json.loads((store / "store.json").read_text())
    for bad in ("../victim.txt", str(victim), "tasks/../../victim.txt", "tasks/../store.json"):
        index["tasks"]["evil"] = {**index["tasks"]["sk"], "file": bad}
        (store / "store.json").write_text(json.dumps(index))
        before = snapshot(store)
        p = swr("store", "remove", store, "--name", "evil")
        assert p.returncode == 2, p.stderr
        assert "store.json" in one_line(p) and "evil" in one_line(p)
        assert victim.read_text() == "keep me" and snapshot(store) == before
    # a symlink inside tasks/ that leads out is refused the same way
    (store / "tasks" / "link.safetensors").symlink_to(victim)
    index["tasks"]["evil"] = {**index["tasks"]["sk"], "file": "tasks/link.safetensors"}
    (store / "store.json").write_text(json.dumps(index))
    p = swr("store", "remove", store, "--name", "evil")
    assert p.returncode == 2 and victim.read_text() == "keep me", p.stderr


@pytest.mark.parametrize("damage, key", [
    (lambda ix: ix["tasks"].__setitem__("sk", "a string"), "tasks.sk"),
    (lambda ix: ix["tasks"]["sk"].__setitem__("classes", []), "classes"),
    (lambda ix: ix["tasks"]["sk"].__setitem__("classes", ["a", "a", "b", "c"]), "classes"),
    (lambda ix: ix["tasks"]["sk"].__setitem__(
        "preprocess", {"modality": "image", "image_size": 0}), "image_size"),
    (lambda ix: ix["tasks"]["sk"].__setitem__(
        "preprocess", {"modality": "image", "std": [0, 1, 1]}), "std"),
    (lambda ix: ix.__setitem__("backbone", "timm:../../x"), "backbone"),
    (lambda ix: ix.__setitem__("base_file", "/etc/passwd"), "base_file"),
])
def test_damaged_store_index_is_one_line_naming_the_key(store, damage, key):
    index = json.loads((store / "store.json").read_text())
    damage(index)
    (store / "store.json").write_text(json.dumps(index))
    for args in (("store", "list", store), ("predict", "--store", store, "--task", "sk",
                                             store / "store.json")):
        p = swr(*args)
        assert p.returncode == 2, p.stderr
        line = one_line(p)
        assert "store.json" in line and key in line, line


def test_concurrent_store_adds_keep_every_task(store, base_and_deltas):
    _, deltas = base_and_deltas
    procs = [subprocess.Popen([sys.executable, "-m", "swr.app.cli", "store", "add", str(store),
                               "--delta", str(deltas[n]), "--name", n],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in ("two", "three")]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    names = set(TaskStore(store).index["tasks"])
    assert names == {"sk", "two", "three"}
    assert sorted(p.name for p in (store / "tasks").iterdir()) == [
        "sk.safetensors", "three.safetensors", "two.safetensors"]


def test_a_store_add_waits_for_the_lock_holder_and_reads_the_index_afresh(store,
                                                                          base_and_deltas):
    _, deltas = base_and_deltas
    with open(store / ".lock", "a+") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        p = subprocess.Popen([sys.executable, "-m", "swr.app.cli", "store", "add", str(store),
                              "--delta", str(deltas["two"]), "--name", "two"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(8)  # it started and is waiting: meanwhile this process changes the index
        assert p.poll() is None
        index = json.loads((store / "store.json").read_text())
        index["tasks"]["other"] = {**index["tasks"]["sk"], "file": "tasks/sk.safetensors"}
        (store / "store.json").write_text(json.dumps(index))
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert set(TaskStore(store).index["tasks"]) == {"sk", "other", "two"}


def test_temporary_files_of_a_killed_add_are_removed_at_the_next_open(store):
    leftover = store / "tasks" / ".two.safetensors.abc123.tmp"
    leftover.write_bytes(b"\0" * 1000)
    p = swr("store", "list", store)
    assert p.returncode == 0, p.stderr
    assert not leftover.exists()


def _held(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    f = open(folder / ".lock", "a+")
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    f.write("4242\n")
    f.flush()
    return f


@pytest.mark.parametrize("command", ["pretrain", "fold", "store", "demo"])
def test_every_writer_of_an_out_takes_its_lock(tmp_path, base_and_deltas, command):
    weights, deltas = base_and_deltas
    out = tmp_path / "out"
    args = {
        "pretrain": ("pretrain", "--task", SOURCE, "--backbone", "timm:resnet10t", "--epochs", 1,
                     "--out", out, "--device", "cpu"),
        "fold": ("fold", "--backbone", BACKBONE, "--weights", weights, "--delta", deltas["one"],
                 "--out", out),
        "store": ("store", "add", out, "--backbone", BACKBONE, "--weights", weights,
                  "--delta", deltas["one"]),
        "demo": ("demo", "--quick", "--out", out),
    }[command]
    env = {**os.environ, "SWR_CACHE": str(tmp_path / "cache")}
    held = _held(out)
    try:
        if command == "store":  # a store change waits its turn: a short wait shows it waits
            p = subprocess.Popen([sys.executable, "-m", "swr.app.cli", *map(str, args)], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(8)
            assert p.poll() is None and not (out / "store.json").exists()
            p.kill()
            p.communicate()
            return
        p = swr(*args, env=env)
    finally:
        held.close()
    assert p.returncode == 2, p.stderr
    line = one_line(p)
    assert "in use by another running swr" in line and "4242" in line, line
    assert sorted(x.name for x in out.iterdir()) == [".lock"]


def test_rerun_into_a_finished_run_needs_overwrite(tmp_path, base_and_deltas):
    weights, deltas = base_and_deltas
    out = tmp_path / "model"
    args = ("fold", "--backbone", BACKBONE, "--weights", weights, "--delta", deltas["one"],
            "--out", out)
    assert swr(*args).returncode == 0
    before = snapshot(out)
    p = swr(*args)
    assert p.returncode == 2 and "--overwrite" in one_line(p), p.stderr
    assert snapshot(out) == before
    p = swr(*args, "--overwrite")
    assert p.returncode == 0, p.stderr
    assert set(snapshot(out)) == set(before)


def test_bench_refuses_an_out_holding_another_bench(tmp_path, base_and_deltas):
    weights, _ = base_and_deltas
    out = tmp_path / "bench"
    out.mkdir()
    (out / "results.csv").write_text("task,method\nx,y\n")
    (out / "pareto.png").write_bytes(b"png")
    before = snapshot(out)
    p = swr("bench", "--task", "glyphs:sketch", "--backbone", BACKBONE, "--weights", weights,
            "--methods", "linear", "--out", out)
    assert p.returncode == 2, p.stderr
    assert "--resume" in one_line(p) and "--overwrite" in one_line(p)
    assert snapshot(out) == before


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_terminated_rerun_leaves_the_old_run_whole_logs_included(tmp_path, sig, code):
    out = tmp_path / "ckpt"
    env = {**os.environ, "SWR_CACHE": str(tmp_path / "cache")}
    first = swr("pretrain", "--task", SOURCE, "--backbone", "timm:resnet10t", "--epochs", 1,
                "--out", out, "--device", "cpu", env=env)
    assert first.returncode == 0, first.stderr
    before = snapshot(out)
    assert "epochs.csv" in before and any(k.startswith("tensorboard") for k in before) \
        or os.environ.get("SWR_TENSORBOARD") == "0"
    p = subprocess.Popen([sys.executable, "-m", "swr.app.cli", "pretrain", "--task", SOURCE,
                          "--backbone", "timm:resnet10t", "--epochs", "500", "--out", str(out),
                          "--device", "cpu", "--overwrite"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    # wait until the rerun is training: its live log exists in its staged folder
    while not any(tmp_path.glob(".ckpt.*.new/epochs.csv")):
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.2)
    assert snapshot(out) == before  # live logs go to the stage, not to the finished run
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == code, err
    lines = [ln for ln in err.splitlines() if ln.strip() and "%|" not in ln]
    assert len(lines) == 1 and ("terminated" if sig == signal.SIGTERM else "interrupted") \
        in lines[0], err
    assert snapshot(out) == before
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".ckpt.")]


@pytest.mark.ray
def test_sigterm_during_a_ray_search_is_one_line_and_exit_143(tmp_path):
    """With Ray workers, SIGTERM still ends the search with one line and 143 (Ray installs
    a handler of its own, and turns the interrupt it catches into a plain one)."""
    env = {**os.environ, "SWR_CACHE": str(tmp_path / "cache")}
    ckpt = tmp_path / "ckpt"
    assert swr("pretrain", "--task", SOURCE, "--backbone", "timm:resnet10t", "--epochs", 1,
               "--out", ckpt, "--device", "cpu", env=env).returncode == 0
    p = subprocess.Popen([sys.executable, "-m", "swr.app.cli", "search", "--task",
                          "glyphs:sketch?images=12,4,4", "--checkpoint", str(ckpt), "--budget",
                          "5%", "--out", str(tmp_path / "s"), "--workers", "2", "--evaluations",
                          "400", "--device", "cpu", "--supernet-epochs", "1"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not (tmp_path / "s" / "evaluations.jsonl").exists():  # scoring on the workers
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    lines = [ln for ln in err.splitlines() if ln.strip() and "%|" not in ln
             and "rendered" not in ln]
    assert p.returncode == 143, err
    assert len(lines) == 1 and "terminated" in lines[0], err
