"""Watching a run: per-epoch and per-iteration CSVs and TensorBoard event files."""

from __future__ import annotations

import csv
import struct
from pathlib import Path

import pytest

import swr.tasks
from swr.runlog import RunLog, reset, summary_writer_class
from swr.train import TrainConfig, train

from fixtures import tiny_audio_task, tiny_checkpoint

needs_writer = pytest.mark.skipif(summary_writer_class() is None,
                                  reason="neither tensorboard nor tensorboardX is installed")


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` from the TFRecord event files under ``folder``."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack_from("<Q", data, pos)
            event = Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4  # length, its crc, the record, its crc
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@needs_writer
def test_runlog_csv_and_events_and_reset(tmp_path):
    with RunLog(tmp_path, "epochs", tag="fit") as log:
        log.record(1, {"phase": "fit", "loss": 2.0, "val_acc": 0.5})
        assert len(rows(tmp_path / "epochs.csv")) == 1  # readable while the run goes on
        log.record(2, {"phase": "fit", "loss": 1.0, "val_acc": 0.75, "extra": float("nan")})
    table = rows(tmp_path / "epochs.csv")
    assert [r["step"] for r in table] == ["1", "2"] and table[1]["val_acc"] == "0.75"
    assert list(table[0]) == ["step", "phase", "loss", "val_acc", "extra"]
    got = scalars(tmp_path / "tensorboard" / "epochs")
    assert got["fit/val_acc"] == [(1, 0.5), (2, 0.75)] and "fit/phase" not in got
    assert "fit/extra" not in got  # non-finite values are left to the CSV
    # a second phase appends; reset forgets both
    RunLog(tmp_path, "epochs").record(1, {"loss": 0.5})
    assert len(rows(tmp_path / "epochs.csv")) == 3
    reset(tmp_path)
    assert not (tmp_path / "epochs.csv").exists()
    assert scalars(tmp_path) == {}


def test_tensorboard_can_be_switched_off(tmp_path, monkeypatch):
    monkeypatch.setenv("SWR_TENSORBOARD", "0")
    RunLog(tmp_path, "epochs").record(1, {"loss": 1.0})
    assert (tmp_path / "epochs.csv").is_file() and not (tmp_path / "tensorboard").exists()


@needs_writer
def test_train_logs_every_epoch(tmp_path):
    from swr.tasks.backbones import create_backbone

    task = tiny_audio_task(n_classes=3, per_class=6)
    model = create_backbone("bcresnet-1", num_classes=3)
    cfg = TrainConfig(epochs=3, lr=1e-2, batch_size=8, device="cpu", progress=False,
                      desc="probe", log_dir=str(tmp_path))
    result = train(model, task, [p for p in model.parameters()], cfg)
    table = rows(tmp_path / "epochs.csv")
    assert [int(r["step"]) for r in table] == [1, 2, 3]
    assert [float(r["val_acc"]) for r in table] == [h["val_acc"] for h in result.history]
    assert float(table[0]["lr"]) > float(table[-1]["lr"])  # the cosine schedule, logged
    got = scalars(tmp_path)
    assert [s for s, _ in got["probe/train_loss"]] == [1, 2, 3]
    assert {"probe/val_acc", "probe/train_acc", "probe/lr"} <= got.keys()


@needs_writer
@pytest.mark.parametrize("policy", ["pg", "ppo"])
def test_search_logs_iterations(policy, tmp_path, monkeypatch):
    from swr.app.search import SearchConfig, run_search
    from swr.supernet import SupernetConfig

    task = tiny_audio_task()
    monkeypatch.setattr(swr.tasks, "get_task", lambda spec, **kw: task)
    monkeypatch.setenv("SWR_CACHE", str(tmp_path / "cache"))  # train the supernet here
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "out"
    run_search(SearchConfig(task="tiny", checkpoint=str(ckpt), budget="10%", out=str(out),
                            policy=policy, evaluations=16, workers=0, progress=False,
                            device="cpu", supernet=SupernetConfig(epochs=1, progress=False)))
    got = scalars(out / "tensorboard")
    # stage 1 (the supernet) is watched like any training
    assert "supernet/val_acc" in got and rows(out / "epochs.csv")[0]["phase"] == "supernet"
    if policy == "pg":
        table = rows(out / "search_iterations.csv")
        assert len(table) >= 2
        assert [int(r["step"]) for r in table] == list(range(1, len(table) + 1))
        assert {"mean_reward", "max_reward", "best", "entropy", "loss"} <= table[0].keys()
        best = [float(r["best"]) for r in table]
        assert best == sorted(best)  # best so far never drops
        assert {"search/best", "search/entropy", "search/loss", "search/mean_reward"} <= got.keys()
    else:
        table = rows(out / "ppo.csv")  # SB3's keys, one row per PPO update
        assert len(table) >= 2 and table[-1]["train/entropy_loss"] not in ("", None)
        steps = [int(r["step"]) for r in table]
        assert steps == sorted(steps) and steps[0] > 0
        assert {"train/entropy_loss", "train/loss", "time/fps"} <= got.keys()
