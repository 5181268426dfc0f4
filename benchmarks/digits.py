"""Transfer to a real small data set nobody here wrote: scikit-learn's handwritten digits.

The digits (8x8 grey, 1,797 images, bundled with scikit-learn: nothing is downloaded)
are written as an image folder ``<tmp>/digits/{train,test}/<digit>/*.png`` at 32 px RGB
(per class the first 70% for training, the rest for test). From a ``glyphs:source``
resnet10t source model (``--checkpoint``, else one trained here with ``swr pretrain``
for ``--pretrain-epochs``), the script runs

    swr bench --task imagefolder:<root>?shots=30 --methods linear,full,norm,lora,swr
              --budgets 5% --epochs 5 --seeds 1

at the base's own size (what it records: 32 px), and times one epoch of full
fine-tuning on the same task at the base's own size and at 224 px (``--image-size 224``)
side by side, in this process, same threads. A whole bench at 224 px would take far too
long on a 2-core CPU; the per-epoch ratio is what it would cost more. Writes
``OUT/digits.json`` and ``OUT/digits.md`` (tables of the bench and of the timing).

    python benchmarks/digits.py --out runs/digits [--checkpoint DIR] [--pretrain-epochs 3]
                                [--shots 30] [--epochs 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import ROOT, command, machine, machine_line, md_table, print_table

METHODS = "linear,full,norm,lora,swr"
BUDGET = "5%"


def export_digits(root: Path, size: int = 32, train_fraction: float = 0.7) -> dict:
    """scikit-learn's digits as ``root/{train,test}/<digit>/NNNN.png`` (``size`` px RGB);
    per class the first ``train_fraction`` of its images train. Returns the counts."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    counts = {"train": 0, "test": 0}
    for label in range(10):
        idx = np.flatnonzero(digits.target == label)
        n_train = int(round(train_fraction * len(idx)))
        for k, i in enumerate(idx):
            split = "train" if k < n_train else "test"
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            grey = Image.fromarray((digits.images[i] * (255 / 16)).astype(np.uint8))
            grey.resize((size, size), Image.Resampling.BILINEAR).convert("RGB").save(
                folder / f"{i:04d}.png")
            counts[split] += 1
    return counts


def swr_cli(args: list[str], env: dict) -> float:
    """Run ``swr ARGS`` in a fresh process (its output shown); returns its wall seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "swr.app.cli", *args], check=True, env=env, cwd=ROOT)
    return time.perf_counter() - start


def epoch_seconds(spec: str, checkpoint: str, image_size: int | None, threads: int) -> dict:
    """One epoch of full fine-tuning on ``spec`` (at the base's size, or ``image_size``):
    the seconds it took (training and its validation pass) and the test accuracy."""
    from swr.app.bench.config import BenchConfig, method_lr
    from swr.methods import run_method
    from swr.source import DataOverride, base_spec, load_base, load_task
    from swr.train import TrainConfig

    torch.set_num_threads(threads)
    base, desc = load_base(base_spec(checkpoint))
    override = DataOverride(image_size) if image_size else None
    task = load_task(spec, desc, override=override)
    lr = method_lr("full", BenchConfig(tasks=[spec], checkpoint=checkpoint, methods=["full"],
                                       budgets=[], out=""), desc["backbone"])
    cfg = TrainConfig(epochs=1, lr=lr, batch_size=64, seed=0, device="cpu", progress=False)
    row = run_method("full", copy.deepcopy(base), task, None, cfg)
    return {"input_shape": list(task.input_shape), "seconds": row["train_seconds"],
            "test_acc": row["test_acc"], "train_images": len(task.train)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for digits.json, digits.md and "
                        "the bench (OUT/bench) and source model (OUT/source)")
    parser.add_argument("--checkpoint", help="a glyphs:source swr pretrain folder (default: "
                        "train one into OUT/source, or reuse the one there)")
    parser.add_argument("--pretrain-epochs", type=int, default=3)
    parser.add_argument("--shots", type=int, default=30, help="training images per class")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of every bench method")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, everywhere")
    parser.add_argument("--workers", type=int, default=1, help="bench runs in parallel (Ray)")
    args = parser.parse_args(argv)

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    torch.set_num_threads(args.threads)
    info = machine()
    tmp = Path(tempfile.mkdtemp(prefix="swr-digits-"))
    counts = export_digits(tmp / "digits")
    spec = f"imagefolder:{tmp / 'digits'}?shots={args.shots}"
    print(f"digits: {counts['train']} train / {counts['test']} test images in {tmp / 'digits'}")

    source: dict = {}
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = str(out / "source")
        if (out / "source" / "metrics.json").is_file():
            source["reused"] = True
        else:
            source["seconds"] = swr_cli(
                ["pretrain", "--task", "glyphs:source", "--backbone", "timm:resnet10t",
                 "--epochs", str(args.pretrain_epochs), "--lr", "3e-3", "--device", "cpu",
                 "--out", checkpoint, "--overwrite"], env)
    metrics = json.loads((Path(checkpoint) / "metrics.json").read_text())
    source.update(checkpoint=checkpoint, task=metrics["task"], backbone=metrics["backbone"],
                  epochs=metrics["epochs"], test_acc=metrics["test_acc"],
                  data_config=metrics.get("data_config"))

    bench_out = out / "bench"
    bench_wall = swr_cli(["bench", "--task", spec, "--checkpoint", checkpoint,
                          "--methods", METHODS, "--budgets", BUDGET, "--epochs",
                          str(args.epochs), "--seeds", "1", "--workers", str(args.workers),
                          "--device", "cpu", "--out", str(bench_out), "--overwrite"], env)
    with open(bench_out / "results.csv", newline="") as f:
        rows = [{k: r[k] for k in ("method", "budget", "test_acc", "val_acc",
                                   "updated_params", "train_seconds")}
                for r in csv.DictReader(f)]

    # one epoch of full fine-tuning at each size, side by side in this process
    own = epoch_seconds(spec, checkpoint, None, args.threads)
    big = epoch_seconds(spec, checkpoint, 224, args.threads)
    timing = {"own": own, "224": big, "ratio": big["seconds"] / own["seconds"]}

    report = {"command": command(), "machine": info, "data": {**counts, "spec": spec},
              "source": source, "bench": {"wall_seconds": bench_wall, "epochs": args.epochs,
                                          "rows": rows},
              "full_epoch": timing}
    (out / "digits.json").write_text(json.dumps(report, indent=2))

    bench_table = md_table(
        ["method", "budget", "test acc", "val acc", "trained params", "train s"],
        [[r["method"], r["budget"], float(r["test_acc"]), float(r["val_acc"]),
          int(r["updated_params"]), float(r["train_seconds"])] for r in rows])
    timing_table = md_table(
        ["input", "train images", "s / epoch (full)", "test acc after 1 epoch"],
        [[f"{d['input_shape'][-1]} px ({name})", d["train_images"], d["seconds"],
          d["test_acc"]] for name, d in (("base's own", own), ("--image-size 224", big))])
    md = (f"# Digits transfer\n\nCommand: `{command()}`  \nMachine: {machine_line(info)}\n\n"
          f"Data: scikit-learn digits as an image folder ({counts['train']} train / "
          f"{counts['test']} test images, 32 px), task `{spec.replace(str(tmp), '<tmp>')}`; "
          f"chance 10%. Source: `{source['task']}` {source['backbone']}, "
          f"{source['epochs']} epochs, test acc {source['test_acc']:.3f}.\n\n"
          f"## swr bench at the base's own size ({args.epochs} epochs, 1 seed)\n\n"
          f"{bench_table}\n\nWhole bench: {bench_wall:.0f} s wall.\n\n"
          f"## One epoch of full fine-tuning, side by side\n\n{timing_table}\n\n"
          f"224 px / own size: {timing['ratio']:.1f}x the seconds per epoch.\n")
    (out / "digits.md").write_text(md)
    print()
    print_table(["method", "budget", "test acc", "train s"],
                [[r["method"], r["budget"], float(r["test_acc"]), float(r["train_seconds"])]
                 for r in rows])
    print(f"whole bench {bench_wall:.0f} s; full fine-tuning epoch {own['seconds']:.1f} s at "
          f"{own['input_shape'][-1]} px vs {big['seconds']:.1f} s at 224 px "
          f"({timing['ratio']:.1f}x) -> {out / 'digits.md'}")


if __name__ == "__main__":
    main()
