"""Resumable state is only ever resumed into the same run; caches follow the data; a clean
cache reproduces the same selection.

* ``swr search --resume`` / ``swr bench --resume`` with other base weights, task data,
  budget, policy, seed, evaluations or training settings are refused with one line
  saying what differs (the run's ``fingerprint.json``), and nothing in ``--out`` changes.
* A second process writing the same ``--out`` is refused (``--out/.lock``).
* The supernet cache is keyed by the task's data: other data trains a new supernet, an
  added class does too (no traceback); a damaged cache entry is rebuilt with one line.
* Two fresh processes with the same seed and separate empty caches write the same
  ``selection.json`` (timings aside); ``swr finetune`` refuses a selection whose
  supernet is gone instead of silently starting from zero deltas and a new head.

Each refused input prints ``BAD-INPUT | input | line`` (for docs/RELIABILITY.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import swr.tasks
from swr.app.cli import main
from swr.pretrain import load_pretrained
from swr.supernet import SupernetConfig, new_supernet, prepare_supernet

from fixtures import in_memory_tasks, tiny_audio_task, tiny_checkpoint

TESTS_DIR = Path(__file__).parent
TASKS = {"tiny": tiny_audio_task()}
# ``--task NAME`` for the tasks of TASKS; one thread, the session cache
get_task, tiny_world = in_memory_tasks(TASKS)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    w = SimpleNamespace(d=d, ckpt=tiny_checkpoint(d / "ckpt"))
    torch.manual_seed(1)  # other base weights, same backbone
    from swr.io import write_json
    from swr.tasks.backbones import create_backbone, save_checkpoint

    save_checkpoint(create_backbone("bcresnet-1", num_classes=6),
                    d / "ckpt_b" / "model.safetensors", backbone="bcresnet-1")
    write_json(d / "ckpt_b" / "metrics.json", {"backbone": "bcresnet-1"})
    w.ckpt_b = d / "ckpt_b"
    return w


def search_args(out: Path, ckpt: Path, *extra: str, **options: str) -> list[str]:
    opts = {"--task": "tiny", "--budget": "10%", "--policy": "random", "--evaluations": "4",
            "--seed": "3", "--supernet-epochs": "1",
            **{f"--{k.replace('_', '-')}": v for k, v in options.items()}}
    return ["search", "--checkpoint", str(ckpt), "--out", str(out), "--workers", "0",
            "--device", "cpu", *[x for kv in opts.items() for x in kv], *extra]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def one_line(capsys, code: int, expected: int = 2) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == expected and len(lines) == 1 and "Traceback" not in err, (code, err)
    return lines[0]


SHOW_LINES = False  # set under ``pytest -s`` by the fixture below


@pytest.fixture(autouse=True)
def _show_lines_under_s(request):
    global SHOW_LINES
    SHOW_LINES = request.config.getoption("capture") == "no"


def report(capsys, text: str) -> None:
    """Under ``pytest -s``, print a ``BAD-INPUT`` line past the capture the test reads
    its stderr from (a plain run stays quiet)."""
    if SHOW_LINES:
        with capsys.disabled():
            print(f"BAD-INPUT | {text}")


def shown(args: list[str], world) -> str:
    return " ".join(args).replace(str(world.d), "…")


@pytest.fixture(scope="module")
def searched(world):
    """A finished search to resume (trains the cached supernet once)."""
    out = world.d / "searched"
    assert main(search_args(out, world.ckpt)) == 0
    assert json.loads((out / "fingerprint.json").read_text())["seed"] == 3
    return out


# -------------------------------------------------------------------- search --resume

MISMATCHES = [
    ("seed", dict(seed="4"), [], "--seed: 3 there, 4 now"),
    ("budget", dict(budget="5%"), [], "--budget (in parameters): 883 there, 441 now"),
    ("policy", dict(policy="greedy"), [], "--policy: random there, greedy now"),
    ("evaluations", dict(evaluations="6"), [], "--evaluations: 4 there, 6 now"),
    ("supernet-epochs", dict(supernet_epochs="2"), [], "--supernet-epochs: 1 there, 2 now"),
    ("samples", {}, ["--samples-per-iteration", "2"], "--samples-per-iteration: 8 there, 2 now"),
    ("bn-clips", {}, ["--bn-clips", "7"], "--bn-clips: 32 there, 7 now"),
]


@pytest.mark.parametrize("name,options,extra,needle", MISMATCHES, ids=[m[0] for m in MISMATCHES])
def test_search_resume_with_other_settings_is_refused(world, searched, capsys, name, options,
                                                      extra, needle):
    before = snapshot(searched)
    args = search_args(searched, world.ckpt, *extra, "--resume", **options)
    line = one_line(capsys, main(args))
    assert line.startswith("swr search: error: --resume: ") and needle in line, line
    assert "rerun without --resume" in line
    assert snapshot(searched) == before  # nothing replayed, nothing written
    report(capsys, f"{shown(args, world)} | {line.replace(str(world.d), '…')}")


def test_search_resume_with_other_base_weights_or_task_data_is_refused(world, searched, capsys,
                                                                       monkeypatch):
    before = snapshot(searched)
    args = search_args(searched, world.ckpt_b, "--resume")
    line = one_line(capsys, main(args))
    assert "base weights (--checkpoint / --weights, by content hash)" in line, line
    report(capsys, f"{shown(args, world)} (other base weights) | "
          f"{line.replace(str(world.d), '…')}")
    # the same task name over replaced data, then with an added class
    for what, task, needle in (("replaced data", tiny_audio_task(seed=1), "task data"),
                               ("an added class", tiny_audio_task(n_classes=5), "task classes")):
        monkeypatch.setitem(TASKS, "tiny", task)
        args = search_args(searched, world.ckpt, "--resume")
        line = one_line(capsys, main(args))
        assert line.startswith("swr search: error: --resume: ") and needle in line, line
        report(capsys, f"{shown(args, world)} (the task with {what}) | "
              f"{line.replace(str(world.d), '…')}")
    assert snapshot(searched) == before


def test_search_resume_with_the_same_settings_replays_everything(world, searched, capsys):
    first = json.loads((searched / "selection.json").read_text())
    assert main(search_args(searched, world.ckpt, "--resume")) == 0
    again = json.loads((searched / "selection.json").read_text())
    assert again["replayed_evaluations"] == first["evaluations"] == 4
    assert (again["layers"], again["val_score"]) == (first["layers"], first["val_score"])


@pytest.mark.parametrize("damage", ["missing", "not-json", "a-list"])
def test_search_resume_without_a_readable_fingerprint_is_refused(world, searched, capsys, damage):
    out = world.d / f"nofp_{damage}"
    shutil.copytree(searched, out)
    if damage == "missing":
        (out / "fingerprint.json").unlink()
    else:
        (out / "fingerprint.json").write_text("{'seed': 3" if damage == "not-json" else "[3]")
    before = snapshot(out)
    args = search_args(out, world.ckpt, "--resume")
    line = one_line(capsys, main(args))
    assert line.startswith("swr search: error: --resume: "), line
    assert ("no fingerprint.json" if damage == "missing" else "is damaged") in line, line
    assert snapshot(out) == before
    report(capsys, f"{shown(args, world)} (fingerprint.json {damage}) | "
          f"{line.replace(str(world.d), '…')}")


def test_fresh_search_drops_the_old_log_before_stage_1(world, searched, monkeypatch):
    """A new search over an old --out interrupted before its first scoring must not leave
    the old scores beside its own fingerprint (a later --resume would replay them)."""
    import swr.selection

    out = world.d / "fresh_over_old"
    shutil.copytree(searched, out)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(swr.selection, "prepare_supernet", interrupted)
    assert main(search_args(out, world.ckpt, seed="5")) == 2  # holds a search: refused
    assert (out / "evaluations.jsonl").exists()
    assert main([*search_args(out, world.ckpt, seed="5"), "--overwrite"]) == 130
    assert not (out / "evaluations.jsonl").exists()
    assert json.loads((out / "fingerprint.json").read_text())["seed"] == 5


# -------------------------------------------------------------------- one writer per --out

HOLD_LOCK = r"""
import fcntl, sys, time
f = open(sys.argv[1], "a+")
fcntl.flock(f.fileno(), fcntl.LOCK_EX)
f.write("4242\n"); f.flush()
print("locked", flush=True)
sys.stdin.read()  # until the test closes our stdin
"""


def test_a_second_writer_of_one_out_is_refused(world, capsys):
    out = world.d / "locked"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out / ".lock")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for args, command in ((search_args(out, world.ckpt), "search"),
                              (bench_args(world, out), "bench")):
            line = one_line(capsys, main(args))
            assert line.startswith(f"swr {command}: error: --out ") and \
                f"in use by another running swr {command}" in line, line
            assert "4242" in line and "choose another --out" in line, line
            report(capsys, f"{shown(args, world)} (while another process writes it) | "
                  f"{line.replace(str(world.d), '…')}")
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing else written
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # the other process is gone: its lock went with it
    assert main(search_args(out, world.ckpt)) == 0
    assert (out / "selection.json").is_file()
    assert not (out / ".lock").exists()  # removed when the search ended
    # a command refused before writing anything leaves no folder behind
    fresh = world.d / "never_made"
    assert main(search_args(fresh, world.ckpt, budget="150%")) == 2
    assert not fresh.exists()


def test_lock_is_released_after_an_error_and_reentrant_in_one_process(tmp_path):
    from swr.errors import SwrError
    from swr.io import out_lock

    with pytest.raises(ValueError):
        with out_lock(tmp_path, "search"):
            with out_lock(tmp_path, "search"):  # nested: the same process may
                raise ValueError
    with out_lock(tmp_path, "search"):  # released by the error above
        import fcntl

        with open(tmp_path / ".lock") as other:  # another open file: as another process
            with pytest.raises(OSError):
                fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert not (tmp_path / ".lock").exists()  # removed on release
    with open(tmp_path / ".lock", "a+") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SwrError, match="in use by another running swr bench"):
            with out_lock(tmp_path, "bench"):
                pass


# -------------------------------------------------------------------- bench --resume

def bench_args(w, out: Path, *extra: str, checkpoint: Path | None = None) -> list[str]:
    return ["bench", "--task", "tiny", "--checkpoint", str(checkpoint or w.ckpt), "--methods",
            "linear", "--seeds", "1", "--epochs", "1", "--workers", "1", "--device", "cpu",
            "--out", str(out), *extra]


@pytest.fixture(scope="module")
def benched(world):
    out = world.d / "benched"
    assert main(bench_args(world, out)) == 0
    return out


BENCH_MISMATCHES = [
    ("epochs", lambda w, o: [*bench_args(w, o), "--epochs", "2"], "--epochs: 1 there, 2 now"),
    ("lr", lambda w, o: [*bench_args(w, o), "--lr", "0.1"], "--lr: null there, 0.1 now"),
    ("seeds", lambda w, o: [*bench_args(w, o), "--seeds", "2"], "--seeds: 1 there, 2 now"),
    ("swr-evaluations", lambda w, o: [*bench_args(w, o), "--swr-evaluations", "7"],
     "--swr-evaluations: 40 there, 7 now"),
    ("checkpoint", lambda w, o: bench_args(w, o, checkpoint=w.ckpt_b),
     "base weights (--checkpoint / --weights, by content hash)"),
]


@pytest.mark.parametrize("name,make_args,needle", BENCH_MISMATCHES,
                         ids=[m[0] for m in BENCH_MISMATCHES])
def test_bench_resume_with_other_settings_is_refused(world, benched, capsys, name, make_args,
                                                     needle):
    before = snapshot(benched)
    args = [*make_args(world, benched), "--resume"]
    line = one_line(capsys, main(args))
    assert line.startswith("swr bench: error: --resume: ") and needle in line, line
    assert snapshot(benched) == before  # no row rerun, none kept under other settings
    report(capsys, f"{shown(args, world)} | {line.replace(str(world.d), '…')}")


def test_bench_resume_adds_cells_under_the_same_settings(world, benched, capsys):
    out = world.d / "bench_more"
    shutil.copytree(benched, out)
    assert main([*bench_args(world, out), "--methods", "linear,norm", "--resume"]) == 0
    assert "2 runs (1 done before)" in capsys.readouterr().out


def test_bench_resume_without_a_fingerprint_is_refused(world, benched, capsys):
    out = world.d / "bench_nofp"
    shutil.copytree(benched, out)
    (out / "fingerprint.json").unlink()
    args = [*bench_args(world, out), "--resume"]
    line = one_line(capsys, main(args))
    assert "holds results.csv but no fingerprint.json" in line, line
    report(capsys, f"{shown(args, world)} (fingerprint.json removed) | "
          f"{line.replace(str(world.d), '…')}")


# -------------------------------------------------------------------- the supernet cache

def supernet_cfg(**kw) -> SupernetConfig:
    return SupernetConfig(**{"epochs": 1, "device": "cpu", "progress": False, **kw})


@pytest.fixture(scope="module")
def base(world):
    return load_pretrained(world.ckpt)[0]


def test_supernet_cache_follows_the_task_data(base, tmp_path, monkeypatch):
    monkeypatch.setenv("SWR_CACHE", str(tmp_path / "cache"))
    _, _, folder = prepare_supernet(base, tiny_audio_task(), supernet_cfg(), "bcresnet-1")
    # the same name over other inputs: a new supernet, not the old one
    _, _, replaced = prepare_supernet(base, tiny_audio_task(seed=1), supernet_cfg(), "bcresnet-1")
    assert replaced != folder
    # an added class: a new supernet with a head of five classes, no traceback
    model, meta, added = prepare_supernet(base, tiny_audio_task(n_classes=5), supernet_cfg(),
                                          "bcresnet-1")
    assert added not in (folder, replaced)
    assert model(torch.zeros(2, 1, 40, 101)).shape == (2, 5)
    # the same data again: the cache
    _, _, again = prepare_supernet(base, tiny_audio_task(), supernet_cfg(), "bcresnet-1")
    assert again == folder


def test_file_dataset_hash_sees_replaced_and_added_images(tmp_path):
    from swr.tasks.imagefolder import load_imagefolder

    root = tmp_path / "img"
    for split in ("train", "test"):
        for ci, c in enumerate("ab"):
            for k in range(3):
                (root / split / c).mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.full((20, 20, 3), 40 * ci + 20 * k, np.uint8)).save(
                    root / split / c / f"{k}.png")
    first = load_imagefolder(root, image_size=16).data_hash()
    assert load_imagefolder(root, image_size=16).data_hash() == first
    Image.fromarray(np.full((20, 24, 3), 7, np.uint8)).save(root / "train" / "a" / "0.png")
    replaced = load_imagefolder(root, image_size=16).data_hash()
    assert replaced != first
    for split in ("train", "test"):
        for k in range(3):
            (root / split / "c").mkdir(exist_ok=True)
            Image.fromarray(np.full((20, 20, 3), 200, np.uint8)).save(
                root / split / "c" / f"{k}.png")
    assert load_imagefolder(root, image_size=16).data_hash() not in (first, replaced)


def _truncate(w: Path, m: Path) -> None:
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])


def _bad_json(w: Path, m: Path) -> None:
    m.write_text('{"stats": [')


def _empty_json(w: Path, m: Path) -> None:
    m.write_text("{}")


def _missing_key(w: Path, m: Path) -> None:
    state = load_file(str(w))
    state.pop(sorted(k for k in state if k.endswith(".delta"))[0])
    save_file(state, str(w))


def _wrong_shape(w: Path, m: Path) -> None:
    state = load_file(str(w))
    key = sorted(k for k in state if k.endswith(".delta"))[0]
    state[key] = torch.zeros(3, 3)
    save_file(state, str(w))


def _other_layers(w: Path, m: Path) -> None:
    meta = json.loads(m.read_text())
    meta["stats"] = meta["stats"][1:]
    m.write_text(json.dumps(meta))


def _weights_gone(w: Path, m: Path) -> None:
    w.unlink()


CORRUPTIONS = {"truncated-safetensors": (_truncate, "supernet.safetensors"),
               "bad-json": (_bad_json, "supernet.json"),
               "empty-json": (_empty_json, "lacks the layer statistics"),
               "missing-key": (_missing_key, "holds other tensors"),
               "wrong-shape": (_wrong_shape, "(3, 3)"),
               "stats-of-other-layers": (_other_layers, "lacks the layer statistics"),
               "weights-missing": (_weights_gone, "supernet.safetensors is missing")}


@pytest.fixture(scope="module")
def clean_supernet(base, tmp_path_factory):
    """A trained supernet's cache entry and weights, to damage copies of."""
    cache = tmp_path_factory.mktemp("supernet-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SWR_CACHE", str(cache))
        _, meta, folder = prepare_supernet(base, TASKS["tiny"], supernet_cfg(), "bcresnet-1")
    return cache, folder, (folder / "supernet.safetensors").read_bytes()


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_damaged_supernet_cache_is_rebuilt_with_one_line(base, clean_supernet, tmp_path,
                                                         monkeypatch, capsys, name):
    cache, folder, weights = clean_supernet
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    monkeypatch.setenv("SWR_CACHE", str(copy))
    damaged = copy / folder.relative_to(cache)
    damage, needle = CORRUPTIONS[name]
    damage(damaged / "supernet.safetensors", damaged / "supernet.json")
    capsys.readouterr()
    model, meta, again = prepare_supernet(base, TASKS["tiny"], supernet_cfg(), "bcresnet-1")
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert again == damaged
    assert len(err) == 1 and err[0].startswith("swr: the cached supernet in ") and \
        "is damaged" in err[0] and needle in err[0] and err[0].endswith("training it again"), err
    report(capsys, f"a cached supernet: {name} | {err[0].replace(str(copy), '$SWR_CACHE')}")
    # rebuilt from the seed: the same bytes as the clean entry, and trusted from now on
    assert (damaged / "supernet.safetensors").read_bytes() == weights
    assert len(meta["stats"]) == len(json.loads((damaged / "supernet.json").read_text())["stats"])
    prepare_supernet(base, TASKS["tiny"], supernet_cfg(), "bcresnet-1")
    assert capsys.readouterr().err == ""


# -------------------------------------------------------------------- reproducible from scratch

def test_new_supernet_head_depends_only_on_the_seed(base):
    heads = []
    for noise in (0, 17):
        torch.manual_seed(noise)  # whatever ran before
        state = new_supernet(base, 4, supernet_cfg(seed=3)).state_dict()
        heads.append({k: v for k, v in state.items() if k.startswith("head")})
    assert heads[0] and all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])
    before = torch.get_rng_state()
    new_supernet(base, 4, supernet_cfg(seed=3))
    assert torch.equal(before, torch.get_rng_state())  # the caller's RNG is left alone


SEARCH_SCRIPT = r"""
import os, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, os.environ["SWR_TESTS_DIR"])
from fixtures import tiny_audio_task
import swr.tasks
task = tiny_audio_task()
swr.tasks.get_task = lambda spec, **kw: task
# whatever else a process draws first (other data, other libraries) differs between runs
torch.rand(int(os.environ["SWR_TEST_DRAWS"]))
from swr.app.cli import main
sys.exit(main(sys.argv[1:]))
"""

#: selection.json entries that depend on time or on where the cache is
TIMING = ("seconds",)


def comparable(out: Path, cache: Path) -> str:
    sel = json.loads((out / "selection.json").read_text())
    for key in TIMING:
        sel.pop(key)
    assert sel["supernet"].startswith(str(cache))
    sel["supernet"] = os.path.relpath(sel["supernet"], cache)
    # the policy's weights lie in each run's own --out (compared by content below)
    assert sel["policy_weights"].startswith(str(out))
    sel["policy_weights"] = os.path.relpath(sel["policy_weights"], out)
    return json.dumps(sel, sort_keys=True)


def test_two_fresh_processes_with_empty_caches_give_the_same_selection(world, tmp_path):
    results = []
    for run, draws in (("a", 0), ("b", 1000)):
        cache, out = tmp_path / f"cache_{run}", tmp_path / f"out_{run}"
        env = dict(os.environ, SWR_TESTS_DIR=str(TESTS_DIR), SWR_CACHE=str(cache),
                   SWR_TEST_DRAWS=str(draws))
        args = search_args(out, world.ckpt, policy="pg", evaluations="8",
                           samples_per_iteration="4")
        proc = subprocess.run([sys.executable, "-c", SEARCH_SCRIPT, *args], capture_output=True,
                              text=True, env=env, timeout=400)
        assert proc.returncode == 0, proc.stderr[-2000:]
        sel = json.loads((out / "selection.json").read_text())
        results.append((comparable(out, cache), (out / "evaluations.jsonl").read_bytes(),
                        (Path(sel["supernet"]) / "supernet.safetensors").read_bytes(),
                        Path(sel["policy_weights"]).read_bytes()))
    (sel_a, log_a, net_a, pol_a), (sel_b, log_b, net_b, pol_b) = results
    assert pol_a == pol_b  # the same trained policy
    assert net_a == net_b  # the same supernet, byte for byte
    assert log_a == log_b  # the same scores in the same order
    assert sel_a == sel_b


# -------------------------------------------------------------------- finetune without its supernet

def test_finetune_refuses_a_selection_whose_supernet_is_gone(world, searched, tmp_path, capsys):
    sel = json.loads((searched / "selection.json").read_text())
    moved = tmp_path / "sel.json"
    gone = {**sel, "supernet": str(tmp_path / "cleared-cache" / "supernets" / "abc")}
    moved.write_text(json.dumps(gone))
    args = ["finetune", "--selection", str(moved), "--out", str(tmp_path / "ft"), "--epochs", "1",
            "--device", "cpu", "--init", "supernet"]
    line = one_line(capsys, main(args))
    assert "is gone" in line and "re-run swr search or use --init probe" in line, line
    assert not (tmp_path / "ft").exists()
    report(capsys, f"swr finetune --selection …/selection.json --out …/ft (its supernet "
          f"deleted from the cache) | {line.replace(str(tmp_path), '…')}")
    unnamed = tmp_path / "unnamed.json"
    unnamed.write_text(json.dumps({k: v for k, v in sel.items() if k != "supernet"}))
    line = one_line(capsys, main([*args[:2], str(unnamed), *args[3:]]))
    assert "names no supernet" in line and "--init probe" in line, line
    report(capsys, f"swr finetune --selection …/selection.json --out …/ft (no 'supernet' "
          f"entry) | {line.replace(str(tmp_path), '…')}")


def test_finetune_from_the_probe_depends_only_on_the_seed(world, searched, tmp_path):
    selection = searched / "selection.json"
    for run, noise in (("s1", 0), ("s2", 99)):
        torch.manual_seed(noise)  # whatever ran before in this process
        assert main(["finetune", "--selection", str(selection), "--out", str(tmp_path / run),
                     "--epochs", "1", "--device", "cpu", "--init", "probe"]) == 0
    for name in ("task_delta.safetensors", "model.safetensors"):
        assert (tmp_path / "s1" / name).read_bytes() == (tmp_path / "s2" / name).read_bytes()
    assert json.loads((tmp_path / "s1" / "metrics.json").read_text())["init"] == "probe"
