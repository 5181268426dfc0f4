"""One check of a task delta, made by every reader.

``swr fold``, ``swr store add``, the store's load (``swr predict``) and
``apply_task_delta`` all take a task delta in through :func:`swr.delta.read_task_delta`,
which checks the header against the file's real size and the declared tensors against
the base model before any data is read, then the values. Each bad delta below must end
every reader with one line naming the file (exit status 2 on the command line) and
leave nothing written. Also here: ``swr predict`` never prints NaN, a diverged final
training writes nothing, and a selection's budget cannot exceed the backbone.
"""

from __future__ import annotations

import copy
import json
import resource
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import swr.tasks
from swr.app.cli import main
from swr.delta import apply_task_delta, read_task_delta, save_task_delta
from swr.errors import SwrError
from swr.pretrain import load_pretrained
from swr.reparam import reparam_layers, set_selection
from swr.source import BaseSpec
from swr.store import TaskStore, create_or_open
from swr.supernet import build_supernet

from fixtures import in_memory_tasks, tiny_audio_task, tiny_checkpoint, write_clip

TINY = tiny_audio_task()
get_task, tiny_world = in_memory_tasks({"tiny": TINY})

#: what the lying header declares: a 3.1 GB tensor in a sparse file of a few KB on disk
HUGE = 3_100_000_000
#: the most a command under test may write to one file: a reader that copied or
#: loaded the sparse file would be stopped (SIGXFSZ) instead of filling the disk
FILE_LIMIT = 64 << 20


def export_good_delta(ckpt: Path, path: Path) -> tuple[Path, list[str]]:
    """A task delta with two open layers (4 classes) made for the base weights of ``ckpt``."""
    from swr.delta import export_task_delta

    base, meta = load_pretrained(ckpt)
    model = build_supernet(base, 4)
    names = list(reparam_layers(model))[:2]
    set_selection(model, names)
    with torch.no_grad():
        for n in names:
            model.get_submodule(n).delta.normal_(0, 0.01)
    export_task_delta(model, path, backbone=meta["backbone"], task="tiny",
                      extra={"classes": ["a", "b", "c", "d"],
                             "preprocess": {"modality": "audio", "input_shape": [1, 40, 101]}})
    return path, names


def _edited(good: Path, edit) -> tuple[dict, dict]:
    tensors, meta = read_task_delta(good)
    tensors = {k: v.clone() for k, v in tensors.items()}
    edit(tensors)
    return tensors, {k: v for k, v in meta.items() if k not in ("format", "swr_version")}


def _lying(good: Path, dest: Path, key: str, sparse: bool) -> None:
    """``good`` with entry ``key`` declared as a float32 tensor of :data:`HUGE` bytes at
    the end of the data; ``sparse``: the file is that long (holes), else it stops short."""
    raw = good.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    out = {"__metadata__": header.pop("__metadata__")}
    chunks, at = [], 0
    for k, v in header.items():
        if k == key:
            continue
        begin, end = v["data_offsets"]
        chunks.append(data[begin:end])
        out[k] = {**v, "data_offsets": [at, at + end - begin]}
        at += end - begin
    out[key] = {"dtype": "F32", "shape": [HUGE // 4], "data_offsets": [at, at + HUGE]}
    text = json.dumps(out).encode()
    text += b" " * (-len(text) % 8)
    with open(dest, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(chunks))
        if sparse:
            f.truncate(8 + len(text) + at + HUGE)


#: bad delta -> (what the one line must say beside the file's name)
BAD = {
    "nan": "NaN or infinite",
    "inf": "NaN or infinite",
    "float16": "float16",
    "wrong-shape": "has shape (3, 3)",
    "norm-over-conv": "a norm layer's entry",
    "negative-running-var": "running variance is never below zero",
    "lying-header-sparse": f"has shape ({HUGE // 4},)",
    "lying-header-short": "declares bytes",
}


def make_bad(w, kind: str, dest: Path) -> Path:
    """Write bad task delta ``kind`` (see :data:`BAD`) to ``dest``."""
    layer = f"delta/{w.layers[0]}.weight"
    if kind.startswith("lying-header"):
        _lying(w.good, dest, layer, sparse=kind.endswith("sparse"))
        return dest

    def edit(t):
        if kind == "nan":
            t[layer].view(-1)[0] = float("nan")
        elif kind == "inf":
            t[layer].view(-1)[-1] = float("-inf")
        elif kind == "float16":
            t[layer] = t[layer].half()
        elif kind == "wrong-shape":
            t[layer] = torch.zeros(3, 3)
        elif kind == "norm-over-conv":  # a norm/ entry that would overwrite a conv weight
            t[f"norm/{w.layers[0]}.weight"] = torch.full_like(t[layer], 100.0)
        elif kind == "negative-running-var":
            t["norm/stem.1.running_var"] = -t["norm/stem.1.running_var"].abs() - 1.0
        elif kind == "overflow":  # finite, valid, but the logits overflow to inf
            t["norm/head_conv.2.weight"] = torch.full_like(t["norm/head_conv.2.weight"], 3e38)
            t["head/head.weight"] = torch.full_like(t["head/head.weight"], 3e38)
        else:
            raise ValueError(kind)
    tensors, meta = _edited(w.good, edit)
    save_task_delta(tensors, dest, meta)
    return dest


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("delta-validation")
    w = SimpleNamespace(d=d)
    w.ckpt = tiny_checkpoint(d / "ckpt")
    w.good, w.layers = export_good_delta(w.ckpt, d / "good.safetensors")
    w.bad = {kind: make_bad(w, kind, d / f"bad-{kind}.safetensors") for kind in BAD}
    w.clip = write_clip(d / "clip.wav", 1)
    # a store holding the good delta as task 't' (copied per test before it is damaged)
    w.store = d / "store"
    create_or_open(w.store, BaseSpec(checkpoint=str(w.ckpt))).add(w.good, name="t")
    return w


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))


def swr_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "swr.app.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=_limit_file_size)


def assert_one_line(text: str, *wanted: str) -> str:
    # as a terminal shows it: a progress bar redraws itself with '\r' and is cleared; in a
    # log (not a terminal) its progress lines stand apart from the error's one line
    lines = [seg for line in text.split("\n") if (seg := line.rsplit("\r", 1)[-1].strip())
             and "%|" not in seg]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    for w in wanted:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.read_bytes() if p.stat().st_size
                                         < FILE_LIMIT else None)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_store(w, dest: Path) -> Path:
    for p in w.store.rglob("*"):
        if p.is_file():
            (dest / p.relative_to(w.store)).parent.mkdir(parents=True, exist_ok=True)
            (dest / p.relative_to(w.store)).write_bytes(p.read_bytes())
    return dest


# ------------------------------------------------------------------------ the readers

def test_the_good_delta_passes_every_reader(world, tmp_path):
    """The control: what the checks below refuse is the damage, not the delta."""
    r = swr_cli("fold", "--checkpoint", world.ckpt, "--delta", world.good,
                "--out", tmp_path / "f")
    assert r.returncode == 0, r.stderr
    r = swr_cli("store", "add", tmp_path / "s", "--checkpoint", world.ckpt,
                "--delta", world.good, "--name", "t")
    assert r.returncode == 0, r.stderr
    r = swr_cli("predict", "--store", tmp_path / "s", "--task", "t", world.clip, "--json")
    assert r.returncode == 0, r.stderr
    # strict JSON: a bare NaN would raise here
    rows = json.loads(r.stdout, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
    assert 0 < rows["predictions"][0]["probability"] <= 1


@pytest.mark.parametrize("kind", list(BAD))
def test_fold_refuses(world, tmp_path, kind):
    out = tmp_path / "folded"
    r = swr_cli("fold", "--checkpoint", world.ckpt, "--delta", world.bad[kind], "--out", out)
    assert r.returncode == 2, r.stderr
    assert_one_line(r.stderr, "swr fold: error:", world.bad[kind].name, BAD[kind])
    assert not out.exists()


@pytest.mark.parametrize("kind", list(BAD))
def test_store_add_refuses_and_creates_no_store(world, tmp_path, kind):
    store = tmp_path / "new-store"
    r = swr_cli("store", "add", store, "--checkpoint", world.ckpt, "--delta", world.bad[kind],
                "--name", "t")
    assert r.returncode == 2, r.stderr
    assert_one_line(r.stderr, "swr store: error:", world.bad[kind].name, BAD[kind])
    assert not store.exists() or not any(store.iterdir())


@pytest.mark.parametrize("kind", list(BAD))
def test_store_add_to_an_existing_store_refuses_and_changes_nothing(world, tmp_path, kind):
    store = copy_store(world, tmp_path / "store")
    before = snapshot(store)
    with pytest.raises(SwrError) as e:
        TaskStore(store).add(world.bad[kind], name="u")
    assert_one_line(str(e.value), world.bad[kind].name, BAD[kind])
    after = snapshot(store)
    after.pop(".lock", None)
    before.pop(".lock", None)
    assert after == before


@pytest.mark.parametrize("kind", list(BAD))
def test_store_load_and_predict_refuse_a_damaged_task(world, tmp_path, kind):
    """A store's task file replaced after it was added: predict refuses it, prints no
    prediction (no NaN) and exits 2."""
    store = copy_store(world, tmp_path / "store")
    task_file = store / "tasks" / "t.safetensors"
    make_bad(world, kind, task_file)
    # the text form once (it printed 'nan'); the JSON form for each (it wrote a bare NaN)
    for extra in (((), ("--json",)) if kind == "nan" else (("--json",),)):
        r = swr_cli("predict", "--store", store, "--task", "t", world.clip, *extra)
        assert r.returncode == 2, (extra, r.stderr)
        assert_one_line(r.stderr, "swr predict: error:", "t.safetensors", BAD[kind])
        assert r.stdout == ""
    model = TaskStore(store).load()
    with pytest.raises(SwrError):
        model.set_task("t")
    assert model.active_task is None


@pytest.mark.parametrize("kind", list(BAD))
def test_apply_task_delta_refuses_and_leaves_the_model_as_it_came(world, kind):
    base, _ = load_pretrained(world.ckpt)
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(SwrError) as e:
        apply_task_delta(base, world.bad[kind], backbone="bcresnet-1")
    assert_one_line(str(e.value), world.bad[kind].name, BAD[kind])
    after = base.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("kind", ["nan", "inf", "negative-running-var", "lying-header-short"])
def test_reading_without_a_base_checks_what_needs_none(world, kind):
    """Values and the header's byte ranges need no model: ``read_task_delta(path)`` alone
    refuses them."""
    with pytest.raises(SwrError) as e:
        read_task_delta(world.bad[kind])
    assert_one_line(str(e.value), world.bad[kind].name, BAD[kind])


def test_the_lying_header_is_sparse_and_never_read(world):
    """The sparse delta really declares 3.1 GB in a few KB of disk; the refusals above ran
    under a 64 MiB file-size limit, so nothing copied it."""
    path = world.bad["lying-header-sparse"]
    st = path.stat()
    assert st.st_size > HUGE
    assert st.st_blocks * 512 < 1 << 20


# ------------------------------------------------------------------ predict never says NaN

def test_predict_refuses_non_finite_outputs(world, tmp_path):
    """A delta every check passes (finite, fitting) whose logits overflow: one line and
    exit 2, never 'nan' in the text or a bare NaN in the JSON."""
    store = copy_store(world, tmp_path / "store")
    make_bad(world, "overflow", store / "tasks" / "t.safetensors")
    for extra in ((), ("--json",)):
        r = swr_cli("predict", "--store", store, "--task", "t", world.clip, *extra)
        assert r.returncode == 2, (extra, r.stdout, r.stderr)
        assert_one_line(r.stderr, "swr predict: error:", "NaN or infinite outputs",
                        str(world.clip))
        assert r.stdout == ""


# ------------------------------------------------------------ training that diverges

def selection_file(w, path: Path, **changes) -> Path:
    sel = {"layers": [w.layers[0]], "task": "tiny", "checkpoint": str(w.ckpt),
           "budget_params": 2000, **changes}
    path.write_text(json.dumps(sel))
    return path


def test_finetune_that_diverges_writes_nothing(world, tmp_path, capsys):
    sel = selection_file(world, tmp_path / "selection.json")
    out = tmp_path / "ft"
    args = ["finetune", "--selection", str(sel), "--out", str(out), "--from-scratch",
            "--epochs", "1", "--lr", "1e30", "--device", "cpu"]
    assert main(args) == 2
    assert_one_line(capsys.readouterr().err, "swr finetune: error:", "diverged",
                    "NaN or infinite", "lower --lr")
    assert not out.exists()


def test_finetune_method_that_diverges_writes_nothing(world, tmp_path, capsys):
    out = tmp_path / "ft"
    args = ["finetune", "--method", "full", "--task", "tiny", "--checkpoint", str(world.ckpt),
            "--out", str(out), "--epochs", "1", "--lr", "1e30", "--device", "cpu"]
    assert main(args) == 2
    assert_one_line(capsys.readouterr().err, "swr finetune: error:", "diverged", "lower --lr")
    assert not out.exists()


def test_finetune_refuses_a_base_with_non_finite_weights(world, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "ckpt_nan"
    ckpt.mkdir()
    state = load_file(str(world.ckpt / "model.safetensors"))
    state["stem.0.weight"] = torch.full_like(state["stem.0.weight"], float("nan"))
    save_file(state, str(ckpt / "model.safetensors"))
    (ckpt / "metrics.json").write_text((world.ckpt / "metrics.json").read_text())
    sel = selection_file(world, tmp_path / "selection.json", checkpoint=str(ckpt))
    out = tmp_path / "ft"
    assert main(["finetune", "--selection", str(sel), "--out", str(out), "--from-scratch",
                 "--epochs", "1", "--device", "cpu"]) == 2
    assert_one_line(capsys.readouterr().err, "swr finetune: error:",
                    str(ckpt / "model.safetensors"), "stem.0.weight", "NaN")
    assert not out.exists()


def test_a_base_with_a_negative_running_variance_is_refused(world, tmp_path, capsys):
    """The rule of task deltas holds for base weights too: refused on load, file named."""
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "ckpt_negvar"
    ckpt.mkdir()
    state = load_file(str(world.ckpt / "model.safetensors"))
    state["stem.1.running_var"] = -state["stem.1.running_var"].abs() - 1.0
    save_file(state, str(ckpt / "model.safetensors"))
    (ckpt / "metrics.json").write_text((world.ckpt / "metrics.json").read_text())
    out = tmp_path / "f"
    assert main(["fold", "--checkpoint", str(ckpt), "--delta", str(world.good),
                 "--out", str(out)]) == 2
    assert_one_line(capsys.readouterr().err, "swr fold: error:", str(ckpt / "model.safetensors"),
                    "stem.1.running_var", "never below zero")
    assert not out.exists()


# ------------------------------------------------------------------ selection budget

@pytest.mark.parametrize("budget, wanted", [(99_999_999, "above the backbone's"),
                                            (0, "positive"), (-5, "positive")])
def test_finetune_refuses_a_budget_no_search_could_state(world, tmp_path, capsys, budget,
                                                         wanted):
    sel = selection_file(world, tmp_path / "selection.json", budget_params=budget)
    out = tmp_path / "ft"
    assert main(["finetune", "--selection", str(sel), "--out", str(out), "--from-scratch",
                 "--epochs", "1", "--device", "cpu"]) == 2
    assert_one_line(capsys.readouterr().err, "swr finetune: error:", str(sel), str(budget),
                    wanted)
    assert not out.exists()
