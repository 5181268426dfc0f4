"""Outputs never destroy inputs, run folders are all new or all old, task deltas and
checkpoints are checked beyond their hash, and the README's Python example runs.

* An ``--out`` that is, lies inside or holds one of the command's inputs (symlinks
  resolved) is refused with one line and exit status 2 before any work.
* ``swr finetune`` / ``swr fold`` / ``swr pretrain`` write into a staged folder that
  replaces the old run folder only when every file is written: a full disk on the
  second file leaves the old run intact and no temporary folder behind.
* Every tensor of a task delta is checked against the base model (role by prefix,
  name, shape, dtype, finiteness) and its metadata against its tensors; checkpoints
  with NaN/inf or non-float weights are refused.
* ``swr fold --onnx`` runs the exported graphs with onnxruntime and reports the max
  abs difference to PyTorch, refusing an export beyond the stated tolerance.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import swr
import swr.delta
import swr.io
import swr.tasks
from swr.runlog import TRAINING_LOGS
import swr.tasks.backbones as backbones
from swr.app.cli import main
from swr.errors import SwrError
from swr.io import write_json
from swr.pretrain import load_pretrained
from swr.reparam import set_selection
from swr.supernet import build_supernet

from fixtures import tiny_audio_task, tiny_checkpoint
from test_reliability import one_line_error

README = Path(__file__).parent.parent / "README.md"
TINY = tiny_audio_task()
REAL_GET_TASK = swr.tasks.get_task


def get_task(spec: str, **kwargs):
    return TINY if spec == "tiny" else REAL_GET_TASK(spec, **kwargs)


@pytest.fixture(autouse=True)
def tiny_task(monkeypatch):
    monkeypatch.setattr(swr.tasks, "get_task", get_task)


def export_delta(ckpt: Path, path: Path, seed: int = 0) -> Path:
    """A task delta with two open layers (budget stated) made for the base weights of ``ckpt``."""
    base, meta = load_pretrained(ckpt)
    model = build_supernet(base, 4)
    names = [n for n, _ in model.named_modules() if n.endswith("f2.0")][:2]
    set_selection(model, names)
    torch.manual_seed(seed)
    with torch.no_grad():
        for n in names:
            model.get_submodule(n).delta.normal_(0, 0.01)
    budget = swr.selection_cost(model, names)
    swr.export_task_delta(model, path, backbone=meta["backbone"], task="tiny", budget_params=budget)
    return path


def crafted_delta(src: Path, dst: Path, tensors=None, meta=None) -> Path:
    """``src`` with its tensors and/or metadata edited by the given functions (hash kept)."""
    state = load_file(str(src))
    with safe_open(str(src), framework="pt") as f:
        raw = dict(f.metadata())
    if tensors is not None:
        state = tensors(state)
    if meta is not None:
        raw = meta(raw)
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst), metadata=raw)
    return dst


def with_entry(key, value_of):
    return lambda s: {**s, key: value_of(s)}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("integrity")
    w = SimpleNamespace(d=d)
    w.ckpt = tiny_checkpoint(d / "ckpt")
    w.ckpt_bytes = (w.ckpt / "model.safetensors").read_bytes()
    (d / "ckpt_link").symlink_to(w.ckpt, target_is_directory=True)
    w.deltas = d / "deltas"
    w.deltas.mkdir()
    w.delta = export_delta(w.ckpt, w.deltas / "delta.safetensors")
    w.delta2 = export_delta(w.ckpt, d / "delta2.safetensors", seed=1)
    w.run = d / "run"  # a selection's folder, as swr search leaves it
    w.run.mkdir()
    w.selection = w.run / "selection.json"
    write_json(w.selection, {"layers": ["stages.0.0.f2.0"], "task": "tiny",
                             "checkpoint": str(w.ckpt), "budget_params": 883})
    w.foreign = d / "foreign"
    w.foreign.mkdir()
    (w.foreign / "notes.txt").write_text("mine\n")
    w.img = d / "img"
    (w.img / "train").mkdir(parents=True)

    # task deltas that pass the hash but lie
    sd = load_file(str(w.delta))
    layer = next(k for k in sd if k.startswith("delta/")).removeprefix("delta/")  # x.weight
    w.bad = {}

    def craft(name, tensors=None, meta=None):
        w.bad[name] = crafted_delta(w.delta, d / f"bad_{name}.safetensors", tensors, meta)

    conv = load_file(str(w.ckpt / "model.safetensors"))["stem.0.weight"]
    craft("norm-overwrites-conv", with_entry("norm/stem.0.weight", lambda s: torch.zeros_like(conv)))
    craft("head-overwrites-conv", with_entry("head/stages.0.0.f2.0.weight",
                                             lambda s: torch.zeros_like(s[f"delta/{layer}"])))
    craft("delta-on-a-norm", with_entry("delta/stem.1.weight",
                                        lambda s: torch.zeros_like(s["norm/stem.1.weight"])))
    craft("delta-unknown-layer", with_entry("delta/no.such.weight",
                                            lambda s: torch.zeros(3)))
    craft("delta-nan", lambda s: {**s, f"delta/{layer}": torch.full_like(s[f"delta/{layer}"],
                                                                          float("nan"))})
    craft("norm-inf", lambda s: {**s, "norm/stem.1.bias": torch.full_like(s["norm/stem.1.bias"],
                                                                           float("inf"))})
    craft("delta-float64", lambda s: {**s, f"delta/{layer}": s[f"delta/{layer}"].double()})
    craft("delta-int8", lambda s: {**s, f"delta/{layer}": s[f"delta/{layer}"].to(torch.int8)})
    craft("norm-missing", lambda s: {k: v for k, v in s.items() if k != "norm/stem.1.weight"})
    # the delta holds two layers; its metadata claims only the first
    first_layer = layer.rpartition(".")[0]
    craft("selection-lies", meta=lambda m: {**m, "selection": json.dumps([first_layer])})
    craft("selection-not-list", meta=lambda m: {**m, "selection": "everything"})
    craft("budget-lies", meta=lambda m: {**m, "budget_params": "10"})
    craft("backbone-lies", meta=lambda m: {**m, "backbone": "bcresnet-2"})
    craft("head-lies", meta=lambda m: {**m, "head": "head_conv.1"})

    # checkpoints whose weights are not usable floats
    state = load_file(str(w.ckpt / "model.safetensors"))
    w.weights = {}
    for name, edit in {
        "nan": lambda t: t.clone().fill_(float("nan")),
        "inf": lambda t: t.clone().fill_(float("-inf")),
        "int8": lambda t: t.round().to(torch.int8),
    }.items():
        folder = d / f"ckpt_{name}"
        folder.mkdir()
        save_file({**state, "stem.0.weight": edit(state["stem.0.weight"])},
                  str(folder / "model.safetensors"))
        write_json(folder / "metrics.json", {"backbone": "bcresnet-1"})
        w.weights[name] = folder
    return w


def fold_args(w, out, delta=None, checkpoint=None):
    return ["fold", "--checkpoint", str(checkpoint or w.ckpt), "--delta", str(delta or w.delta),
            "--out", str(out)]


def finetune_args(w, out, *extra):
    return ["finetune", "--selection", str(w.selection), "--out", str(out), "--epochs", "1",
            "--device", "cpu", *extra]


# (id, arguments built from the world, words the one line must contain)
BAD_INPUT = [
    # outputs that are, lie inside or hold an input
    ("fold-out-is-checkpoint", lambda w: fold_args(w, w.ckpt), ["is the input --checkpoint"]),
    ("fold-out-is-checkpoint-via-symlink", lambda w: fold_args(w, w.d / "ckpt_link"),
     ["ckpt_link", "is the input --checkpoint"]),
    ("fold-out-inside-checkpoint", lambda w: fold_args(w, w.ckpt / "task"),
     ["lies inside the input --checkpoint"]),
    ("fold-out-holds-delta", lambda w: fold_args(w, w.deltas), ["holds the input --delta"]),
    ("fold-out-holds-other-files", lambda w: fold_args(w, w.foreign),
     ["notes.txt", "new or empty folder"]),
    ("finetune-out-is-checkpoint", lambda w: finetune_args(w, w.ckpt),
     ["is the input the selection's checkpoint"]),
    ("finetune-out-is-selection-folder", lambda w: finetune_args(w, w.run),
     ["holds the input --selection"]),
    ("pretrain-out-holds-weights", lambda w: ["pretrain", "--task", "tiny", "--backbone",
                                              "bcresnet-1", "--weights",
                                              str(w.ckpt / "model.safetensors"), "--out",
                                              str(w.ckpt), "--epochs", "1", "--device", "cpu"],
     ["holds the input --weights"]),
    ("pretrain-out-inside-dataset", lambda w: ["pretrain", "--task", f"imagefolder:{w.img}",
                                               "--backbone", "bcresnet-1", "--out",
                                               str(w.img / "train" / "ckpt"), "--epochs", "1"],
     ["lies inside the input --task"]),
    ("search-out-is-checkpoint", lambda w: ["search", "--task", "tiny", "--checkpoint",
                                            str(w.ckpt), "--budget", "10%", "--out", str(w.ckpt),
                                            "--workers", "0", "--policy", "random"],
     ["is the input --checkpoint"]),
    ("bench-out-is-checkpoint", lambda w: ["bench", "--task", "tiny", "--checkpoint", str(w.ckpt),
                                           "--methods", "linear", "--out", str(w.ckpt),
                                           "--workers", "1"], ["is the input --checkpoint"]),
    ("demo-out-inside-the-cache", lambda w: ["demo", "--quick", "--out",
                                             os.environ["SWR_CACHE"] + "/runs"],
     ["lies inside the input $SWR_CACHE"]),
    # task deltas whose hash fits but whose tensors or metadata do not
    ("delta-norm-entry-on-a-conv", lambda w: fold_args(w, w.d / "f", w.bad["norm-overwrites-conv"]),
     ["norm/stem.0.weight", "norm layer"]),
    ("delta-head-entry-on-a-conv", lambda w: fold_args(w, w.d / "f", w.bad["head-overwrites-conv"]),
     ["head/stages.0.0.f2.0.weight", "the head"]),
    ("delta-entry-on-a-norm", lambda w: fold_args(w, w.d / "f", w.bad["delta-on-a-norm"]),
     ["delta/stem.1.weight", "gated layer"]),
    ("delta-unknown-layer", lambda w: fold_args(w, w.d / "f", w.bad["delta-unknown-layer"]),
     ["delta/no.such.weight", "lacks it"]),
    ("delta-nan", lambda w: fold_args(w, w.d / "f", w.bad["delta-nan"]), ["NaN"]),
    ("delta-norm-inf", lambda w: fold_args(w, w.d / "f", w.bad["norm-inf"]),
     ["norm/stem.1.bias", "infinite"]),
    ("delta-float64", lambda w: fold_args(w, w.d / "f", w.bad["delta-float64"]),
     ["float64", "float32"]),
    ("delta-int8", lambda w: fold_args(w, w.d / "f", w.bad["delta-int8"]), ["int8", "float32"]),
    ("delta-lacks-a-norm", lambda w: fold_args(w, w.d / "f", w.bad["norm-missing"]),
     ["lacks norm/stem.1.weight"]),
    ("delta-selection-lies", lambda w: fold_args(w, w.d / "f", w.bad["selection-lies"]),
     ["selection", "delta/ entries"]),
    ("delta-selection-not-a-list", lambda w: fold_args(w, w.d / "f", w.bad["selection-not-list"]),
     ["no selection list"]),
    ("delta-budget-lies", lambda w: fold_args(w, w.d / "f", w.bad["budget-lies"]),
     ["over the budget of 10"]),
    ("delta-backbone-lies", lambda w: fold_args(w, w.d / "f", w.bad["backbone-lies"]),
     ["bcresnet-2", "bcresnet-1"]),
    ("delta-head-lies", lambda w: fold_args(w, w.d / "f", w.bad["head-lies"]),
     ["head_conv.1"]),
    # checkpoints and weights that are not finite floats
    ("checkpoint-nan", lambda w: fold_args(w, w.d / "f", checkpoint=w.weights["nan"]),
     ["stem.0.weight", "NaN"]),
    ("checkpoint-inf", lambda w: fold_args(w, w.d / "f", checkpoint=w.weights["inf"]),
     ["stem.0.weight", "infinite"]),
    ("weights-int8", lambda w: ["inspect", "--backbone", "bcresnet-1", "--weights",
                                str(w.weights["int8"] / "model.safetensors")],
     ["stem.0.weight", "int8", "float"]),
    ("pretrain-weights-nan", lambda w: ["pretrain", "--task", "tiny", "--backbone", "bcresnet-1",
                                        "--weights", str(w.weights["nan"] / "model.safetensors"),
                                        "--out", str(w.d / "pre"), "--epochs", "1", "--device",
                                        "cpu"], ["NaN"]),
]


def snapshot(folder: Path) -> dict[str, bytes]:
    """A folder's result files; the live training logs belong to the latest attempt."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).parts[0] not in TRAINING_LOGS}


@pytest.mark.parametrize("make_args,needles", [c[1:] for c in BAD_INPUT],
                         ids=[c[0] for c in BAD_INPUT])
def test_bad_input_fails_with_one_line(world, capsys, make_args, needles):
    before = {p: snapshot(p) for p in (world.ckpt, world.run, world.deltas, world.foreign)}
    line = one_line_error(capsys, make_args(world))
    for needle in needles:
        assert needle in line, line
    assert {p: snapshot(p) for p in before} == before  # no input was touched
    assert not (world.d / "f").exists() and not (world.d / "pre").exists()
    assert not list(world.d.glob(".*"))  # no staged folder left behind


# -------------------------------------------------------------------- all new or all old

def full_disk_on_file(monkeypatch, n: int, how: str) -> list[str]:
    """Make the ``n``-th file written through the atomic writers fail as on a full disk.

    ``how``: ``oserror`` raises ``OSError(ENOSPC)``, ``safetensors`` the text error
    safetensors raises for it. Half a file is written first, as a real disk fills.
    """
    written: list[str] = []
    real = swr.io.atomic_path

    class Full:
        def __init__(self, path):
            self.path, self.inner = path, real(path)

        def __enter__(self):
            tmp = self.inner.__enter__()
            if Path(self.path).name in TRAINING_LOGS:  # live logs written while training
                return tmp
            written.append(Path(self.path).name)
            if len(written) == n:
                tmp.write_bytes(b"\x10\x00\x00\x00half")
                exc = OSError(errno.ENOSPC, "No space left on device", str(tmp))
                self.inner.__exit__(type(exc), exc, None)  # the writer's clean-up runs
                raise exc
            return tmp

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

    if how == "safetensors":  # only the safetensors writers see their own error type
        def fail_in_save_file(module):
            real_save = module.save_file

            def save(tensors, filename, metadata=None):
                written.append(Path(filename).name)
                if len(written) == n:
                    Path(filename).write_bytes(b"\x10\x00\x00\x00half")
                    raise SafetensorError('Error while serializing: IoError(Os { code: 28, '
                                          'kind: StorageFull, message: "No space left on '
                                          'device" })')
                return real_save(tensors, filename, metadata=metadata)
            monkeypatch.setattr(module, "save_file", save)

        fail_in_save_file(swr.io)  # swr.io.save_safetensors: every safetensors file swr keeps
    else:
        monkeypatch.setattr(swr.io, "atomic_path", Full)
    return written


@pytest.mark.slow
@pytest.mark.parametrize("how", ["oserror", "safetensors"])
def test_full_disk_during_finetune_keeps_the_old_run(world, capsys, monkeypatch, how):
    out = world.d / f"ft_{how}"
    assert main(finetune_args(world, out)) == 0
    old = snapshot(out)
    assert sorted(old) == ["history.json", "metrics.json", "model.safetensors",
                           "task_delta.safetensors"]
    written = full_disk_on_file(monkeypatch, 2, how)
    capsys.readouterr()
    code = main(finetune_args(world, out, "--seed", "1", "--lr", "0.05", "--overwrite"))
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if "error" in line]  # beside the progress bars
    assert code == 2 and len(err) == 1 and "Traceback" not in stderr, stderr
    assert err[0].startswith("swr finetune: error: "), err
    assert "No space left on device" in err[0] and str(out) in err[0], err
    print(f"BAD-INPUT | finetune … --out …/{out.name} (a full disk on its 2nd file) | {err[0]}")
    assert len(written) == 2  # the task delta was written, the folded model failed
    assert snapshot(out) == old  # nothing of the new run beside the old one
    assert not list(world.d.glob(f".{out.name}.*"))  # no staged folder left behind
    monkeypatch.undo()
    monkeypatch.setattr(swr.tasks, "get_task", get_task)
    assert main(finetune_args(world, out, "--seed", "1", "--lr", "0.05", "--overwrite")) == 0
    new = snapshot(out)
    assert new.keys() == old.keys()
    assert all(new[k] != old[k] for k in ("task_delta.safetensors", "model.safetensors",
                                          "metrics.json"))  # all replaced together
    assert json.loads(new["metrics.json"])["seed"] == 1


def test_full_disk_during_fold_keeps_the_old_folder(world, capsys, monkeypatch):
    out = world.d / "folded"
    assert main(fold_args(world, out)) == 0
    old = snapshot(out)
    assert sorted(old) == ["fold.json", "model.safetensors"]
    written = full_disk_on_file(monkeypatch, 2, "oserror")
    capsys.readouterr()
    assert main([*fold_args(world, out, delta=world.delta2), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0], err
    print(f"BAD-INPUT | fold … --out …/{out.name} (a full disk on its 2nd file) | {err[0]}")
    assert written == ["model.safetensors", "fold.json"]
    assert snapshot(out) == old
    assert not list(world.d.glob(".folded.*"))
    monkeypatch.undo()
    monkeypatch.setattr(swr.tasks, "get_task", get_task)
    assert main([*fold_args(world, out, delta=world.delta2), "--overwrite"]) == 0
    assert snapshot(out)["model.safetensors"] != old["model.safetensors"]


@pytest.mark.slow
def test_full_disk_during_pretrain_keeps_the_old_checkpoint(world, capsys, monkeypatch):
    out = world.d / "pre_run"
    args = ["pretrain", "--task", "tiny", "--backbone", "bcresnet-1", "--out", str(out),
            "--epochs", "1", "--device", "cpu"]
    assert main(args) == 0
    old = snapshot(out)
    written = full_disk_on_file(monkeypatch, 2, "oserror")
    assert main([*args, "--seed", "1", "--overwrite"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert written == ["model.safetensors", "history.json"]
    assert snapshot(out) == old and not list(world.d.glob(".pre_run.*"))


def test_output_may_hold_an_input_only_where_it_is_not_replaced(world):
    # swr search and swr bench add their own files to --out; pretrain, finetune and fold
    # replace it whole
    assert swr.io.check_output(world.d, {"--checkpoint": world.ckpt}, replaced=False) == \
        world.d.resolve()
    with pytest.raises(SwrError, match="holds the input --checkpoint"):
        swr.io.check_output(world.d, {"--checkpoint": world.ckpt})
    with pytest.raises(SwrError, match="lies inside the input --checkpoint"):
        swr.io.check_output(world.ckpt / "x", {"--checkpoint": world.ckpt}, replaced=False)


def test_staged_folder_keeps_the_old_folder_on_ctrl_c(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "a.json").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with swr.io.staged_folder(out, {"a.json", "b.json"}) as stage:
            (stage / "a.json").write_text("new")
            raise KeyboardInterrupt
    assert snapshot(out) == {"a.json": b"old"}
    with swr.io.staged_folder(out, {"a.json", "b.json"}) as stage:
        (stage / "b.json").write_text("new")
    assert snapshot(out) == {"b.json": b"new"}  # no stale file of the old run survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -------------------------------------------------------------------- Python API, ONNX

def readme_python_example() -> str:
    """The indented code block under the README's "Python first" heading."""
    section = README.read_text(encoding="utf-8").split("## Python first\n", 1)[1]
    lines = []
    for line in section.splitlines()[1:]:
        if line and not line.startswith("    "):
            break
        lines.append(line[4:])
    return "\n".join(lines).strip() + "\n"


def test_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    code = readme_python_example()
    assert "apply_task_delta" in code and "assert torch.equal" in code
    monkeypatch.chdir(tmp_path)
    names: dict = {}
    exec(compile(code, str(README), "exec"), names)
    rebuilt, task_model = names["rebuilt"], names["task_model"]
    assert not rebuilt.training  # apply_task_delta returns an eval-mode model
    assert swr.same_architecture(rebuilt, task_model)
    assert names["nbytes"] == (tmp_path / "task.safetensors").stat().st_size
    _, meta = swr.read_task_delta(tmp_path / "task.safetensors")
    assert meta["selection"] == names["layers"] and meta["budget_params"] == names["budget"]


def test_apply_task_delta_returns_eval_mode(world):
    base, _ = load_pretrained(world.ckpt)
    base.train()
    assert not swr.apply_task_delta(base, world.delta, backbone="bcresnet-1").training


def test_refused_delta_leaves_the_model_as_it_came(world):
    base, _ = load_pretrained(world.ckpt)  # 6 classes; the deltas are for 4
    before = {k: v.clone() for k, v in base.state_dict().items()}
    for bad in ("norm-overwrites-conv", "delta-nan", "selection-lies"):
        with pytest.raises(SwrError):
            swr.apply_task_delta(base, world.bad[bad])
        after = base.state_dict()
        assert after.keys() == before.keys() and base.num_classes == 6
        assert all(torch.equal(after[k], v) for k, v in before.items()), bad


@pytest.mark.slow
def test_fold_onnx_compares_outputs_with_onnxruntime(world, capsys, monkeypatch):
    out = world.d / "onnx"
    assert main([*fold_args(world, out), "--onnx"]) == 0
    report = json.loads((out / "fold.json").read_text())
    for key in ("onnx", "onnx_base"):
        assert report[key]["tolerance"] == 1e-4
        assert 0.0 <= report[key]["max_abs_diff"] <= 1e-4 and report[key]["matches"]
    assert "onnxruntime vs PyTorch max abs diff" in capsys.readouterr().out
    old = snapshot(out)

    import onnxruntime

    real_run = onnxruntime.InferenceSession.run
    monkeypatch.setattr(onnxruntime.InferenceSession, "run",
                        lambda self, *a, **k: [y + 1e-3 for y in real_run(self, *a, **k)])
    args = [*fold_args(world, out, delta=world.delta2), "--onnx", "--overwrite"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("swr fold: error: the ONNX export model.onnx"), err
    assert "differs from the PyTorch model by 0.001" in err[0] and "tolerance 0.0001" in err[0]
    print(f"BAD-INPUT | {' '.join(args)} (onnxruntime made to differ by 1e-3) | {err[0]}")
    assert snapshot(out) == old
