"""A real small data set nobody here wrote: scikit-learn's handwritten digits as an
image folder, transferred from a source model trained at 32 px. The task is prepared
at the base's own size and normalisation (or the user's --image-size), and a bench of
linear probe and full fine-tuning runs on it end to end; a folded run's accuracy under
swr evaluate is the bench's."""

import csv
import json

import pytest

from swr.app.cli import main
from swr.pretrain import pretrain
from swr.source import BaseSpec, DataOverride, load_base, load_task

from fixtures import digits_imagefolder

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """(digits image folder, a resnet10t source checkpoint trained at 32 px)."""
    tmp = tmp_path_factory.mktemp("digits")
    root = digits_imagefolder(tmp / "digits", train_per_class=30, test_per_class=10)
    with pytest.MonkeyPatch.context() as mp:  # module-scoped: the per-test cache is not set
        mp.setenv("SWR_CACHE", str(tmp_path_factory.getbasetemp() / "swr-cache"))
        pretrain("glyphs:source?images=3,2,2", "timm:resnet10t", tmp / "ckpt", epochs=1,
                 device="cpu", progress=False)
    return root, tmp / "ckpt"


def test_digits_are_prepared_at_the_base_size_unless_the_user_says(digits):
    root, ckpt = digits
    _, desc = load_base(BaseSpec(checkpoint=str(ckpt)))
    cfg = desc["data_config"]
    task = load_task(f"imagefolder:{root}", desc)
    assert task.num_classes == 10 and len(task.test) == 100
    assert task.input_shape == (3, 32, 32)
    pre = task.info["preprocess"]
    assert pre["mean"] == cfg["mean"] and pre["std"] == cfg["std"]
    assert tuple(task.train[0][0].shape) == (3, 32, 32)
    # --image-size 48 (and a mean for all three channels) over the base's own
    bigger = load_task(f"imagefolder:{root}", desc, override=DataOverride(48, mean=[0.5]))
    assert bigger.input_shape == (3, 48, 48) and tuple(bigger.test[0][0].shape) == (3, 48, 48)
    assert bigger.info["preprocess"]["mean"] == [0.5] * 3
    assert bigger.info["preprocess"]["std"] == cfg["std"]
    assert bigger.data_hash() != task.data_hash()  # caches never mix the two


def test_a_bench_on_digits_runs_end_to_end_and_evaluate_agrees(digits, tmp_path, capsys):
    root, ckpt = digits
    out = tmp_path / "bench"
    args = ["bench", "--task", f"imagefolder:{root}", "--checkpoint", str(ckpt),
            "--methods", "linear,full", "--epochs", "2", "--seeds", "1", "--workers", "1",
            "--device", "cpu", "--out", str(out)]
    assert main(args) == 0
    rows = {r["method"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert set(rows) == {"linear", "full"}
    # well above chance (10 classes): the probe of source features already separates digits
    assert float(rows["linear"]["test_acc"]) > 0.3, rows["linear"]["test_acc"]
    assert float(rows["full"]["fold_max_abs_diff"]) <= 1e-4
    capsys.readouterr()
    # a resumed bench with another image size is refused, naming the option
    assert main([*args, "--resume", "--image-size", "48"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--image-size/--mean/--std" in err, err
    # the full run folded, then evaluated as a whole model: the bench's accuracy
    run = next(p for p in (out / "runs").iterdir() if "-full-" in p.name)
    assert main(["fold", "--checkpoint", str(ckpt), "--delta",
                 str(run / "task_delta.safetensors"), "--out", str(tmp_path / "model")]) == 0
    assert main(["evaluate", "--model", str(tmp_path / "model"), "--device", "cpu",
                 "--out", str(tmp_path / "eval")]) == 0
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["n"] == 100 and m["task"] == f"imagefolder:{root}"
    assert m["accuracy"] == pytest.approx(float(rows["full"]["test_acc"]), abs=1e-9)
    # an image option on an audio task is one line
    assert main(["evaluate", "--model", str(tmp_path / "model"), "--task", "kws-synth:de",
                 "--image-size", "48", "--out", str(tmp_path / "e2")]) == 2
    assert "is audio" in capsys.readouterr().err


def test_a_search_records_the_image_size_and_finetune_uses_it(digits, tmp_path, capsys):
    """swr search --image-size: selection.json and the fingerprint record it, the final
    training prepares the task the same way, and a resume without it is refused."""
    root, ckpt = digits
    out = tmp_path / "search"
    args = ["search", "--task", f"imagefolder:{root}", "--checkpoint", str(ckpt),
            "--budget", "5%", "--policy", "knapsack", "--evaluations", "2",
            "--supernet-epochs", "1", "--workers", "0", "--device", "cpu", "--out", str(out)]
    assert main([*args, "--image-size", "40", "--std", "0.3"]) == 0
    sel = json.loads((out / "selection.json").read_text())
    assert sel["data_override"] == {"image_size": 40, "std": [0.3] * 3}
    assert json.loads((out / "fingerprint.json").read_text())["data_override"] == \
        sel["data_override"]
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--image-size/--mean/--std" in err, err
    assert main(["finetune", "--selection", str(out / "selection.json"), "--epochs", "1",
                 "--device", "cpu", "--out", str(tmp_path / "final")]) == 0
    m = json.loads((tmp_path / "final" / "metrics.json").read_text())
    assert m["data_override"] == sel["data_override"]


def test_a_mistyped_backbone_is_refused_first_with_the_name_meant(tmp_path, capsys):
    """swr pretrain --backbone timm:resnet10: one line suggesting resnet10t, before any
    source task is made."""
    assert main(["pretrain", "--task", "glyphs:source", "--backbone", "timm:resnet10",
                 "--out", str(tmp_path / "ckpt")]) == 2
    captured = capsys.readouterr()
    line = captured.err.strip()
    assert "\n" not in line and "unknown timm model 'resnet10'" in line
    suggested = line.split("similar: ", 1)[1].rstrip(")").split(", ")
    assert "resnet10t" in suggested[:3], suggested
    assert "rendering" not in captured.err + captured.out  # no glyph was drawn first


def test_pretrain_records_the_users_image_size(tmp_path):
    """pretrain --image-size 16 on glyphs: the suite is rendered at 16 px, and the
    checkpoint records that size for the tasks that use it, and the option itself."""
    m = pretrain("glyphs:source?images=3,2,2", "timm:resnet10t", tmp_path / "ckpt", epochs=1,
                 device="cpu", progress=False, data_override=DataOverride(16))
    assert m["data_config"]["input_size"] == [3, 16, 16]
    assert m["data_override"] == {"image_size": 16}
