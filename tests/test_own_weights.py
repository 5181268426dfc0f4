"""Bring your own pre-trained backbone: --backbone NAME --weights FILE instead of a
swr pretrain folder, for search, finetune, fold and bench; image preprocessing from
the model's own timm data config."""

import csv
import json

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import swr.tasks
from swr.app.cli import main
from swr.delta import apply_task_delta, base_hash, read_task_delta
from swr.errors import SwrError
from swr.source import BaseSpec, base_spec, load_base, model_data_config, state_hash
from swr.tasks.backbones import create_backbone
from swr.tasks.glyphs import MEAN as GLYPH_MEAN
from swr.tasks.imagefolder import load_imagefolder

from fixtures import tiny_audio_task


def save_weights(model, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_bench_with_own_timm_weights_without_pretrain(tmp_path):
    """The acceptance test: swr bench on a timm resnet10t weights file, no swr pretrain."""
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10)
    weights = save_weights(model, tmp_path / "resnet10t.safetensors")
    out = tmp_path / "bench"
    code = main(["bench", "--backbone", "timm:resnet10t", "--weights", str(weights),
                 "--task", "glyphs:sketch", "--methods", "linear,norm,lora", "--budgets", "5%",
                 "--seeds", "1", "--epochs", "1", "--workers", "1", "--device", "cpu",
                 "--out", str(out)])
    assert code == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["method"] for r in rows) == ["linear", "lora", "norm"]
    assert all(0.0 <= float(r["test_acc"]) <= 1.0 for r in rows)
    # every run that folds kept its task delta, made for these base weights ...
    base = create_backbone("timm:resnet10t", weights=weights).eval()
    for method in ("linear", "norm"):
        delta = out / "runs" / f"glyphs_sketch-{method}-natural-s0" / "task_delta.safetensors"
        tensors, meta = read_task_delta(delta)
        assert meta["base_hash"] == base_hash(base) and meta["method"] == method
        assert meta["backbone"] == "timm:resnet10t" and len(meta["classes"]) == 26
        # ... and prepared with the model's data config (ImageNet statistics), not the
        # glyph suite's own
        assert meta["preprocess"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
        assert meta["preprocess"]["mean"] != pytest.approx(list(GLYPH_MEAN))
        task_model = apply_task_delta(create_backbone("timm:resnet10t", weights=weights), delta)
        assert task_model.get_classifier().out_features == 26
    # the norm run changed norms and head only; the linear probe the head only
    norm_delta, _ = read_task_delta(out / "runs" / "glyphs_sketch-norm-natural-s0"
                                    / "task_delta.safetensors")
    assert any(k.startswith("norm/") for k in norm_delta)
    assert not any(k.startswith("delta/") for k in norm_delta)
    # LoRA's deltas are dense W_task - W_base of the layers it adapted
    lora_delta, lora_meta = read_task_delta(out / "runs" / "glyphs_sketch-lora-5pct-s0"
                                            / "task_delta.safetensors")
    # (every delta carries the task's whole norm state besides)
    assert lora_meta["selection"] and all(k.startswith(("delta/", "norm/"))
                                          for k in lora_delta if "/fc." not in k)
    assert any(k.startswith("delta/") for k in lora_delta)


def test_load_base_forms_hashes_and_errors(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=5)
    st = save_weights(model, tmp_path / "a.safetensors")
    pth = tmp_path / "a.pth"
    torch.save({"state_dict": model.state_dict()}, pth)
    m1, d1 = load_base(base_spec(backbone="timm:resnet10t", weights=str(st)))
    m2, d2 = load_base(base_spec(backbone="timm:resnet10t", weights=str(pth)))
    assert state_hash(m1) == state_hash(m2) == state_hash(model)
    assert d1["backbone"] == "timm:resnet10t" and d1["base"]["weights"] == str(st.resolve())
    # the data config is the model's own
    assert d1["data_config"]["input_size"] == [3, 176, 176]
    assert d1["data_config"]["interpolation"] == "bicubic"
    assert d1["data_config"]["crop_pct"] == pytest.approx(0.875)
    assert d1["data_config"] == model_data_config(model)
    # the same bytes at another path hash the same; other weights do not
    (tmp_path / "b.safetensors").write_bytes(st.read_bytes())
    _, d3 = load_base(base_spec(backbone="timm:resnet10t", weights=str(tmp_path / "b.safetensors")))
    assert d3["weights_sha256"] == d1["weights_sha256"]
    with torch.no_grad():
        model.bn1.running_mean += 1.0  # only a BatchNorm statistic differs
    other = save_weights(model, tmp_path / "c.safetensors")
    m4, d4 = load_base(base_spec(backbone="timm:resnet10t", weights=str(other)))
    assert d4["weights_sha256"] != d1["weights_sha256"]
    assert state_hash(m4) != state_hash(m1)  # the supernet cache key sees it
    # one clear line for each wrong combination
    with pytest.raises(SwrError, match="needs --weights"):
        base_spec(backbone="timm:resnet10t")
    with pytest.raises(SwrError, match="needs --backbone"):
        base_spec(weights=str(st))
    with pytest.raises(SwrError, match="not both"):
        base_spec(checkpoint=str(tmp_path), backbone="timm:resnet10t", weights=str(st))
    with pytest.raises(SwrError, match="no base model"):
        base_spec()
    with pytest.raises(SwrError, match="do not fit backbone"):
        load_base(base_spec(backbone="timm:resnet18", weights=str(st)))
    # feature-extractor weights (no head, as timm's num_classes=0 saves them) load too
    headless = timm.create_model("resnet10t", num_classes=0)
    headless.load_state_dict({k: v for k, v in m1.state_dict().items() if not k.startswith("fc.")})
    m5, _ = load_base(base_spec(backbone="timm:resnet10t",
                                weights=str(save_weights(headless, tmp_path / "h.safetensors"))))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m5.forward_features(x), m1.forward_features(x))
    assert BaseSpec.from_dict(d1["base"]) == BaseSpec(backbone="timm:resnet10t",
                                                       weights=str(st.resolve()))


def test_imagefolder_transforms_follow_the_data_config(tmp_path):
    root = tmp_path / "imgs"
    colours = {"red": (200, 30, 30), "blue": (20, 40, 220)}
    for split, n in (("train", 4), ("test", 2)):
        for name, rgb in colours.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (50 + 9 * i, 40), rgb).save(root / split / name / f"{i}.png")
    cfg = {"input_size": [3, 48, 48], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
           "interpolation": "bicubic", "crop_pct": 0.9}
    task = load_imagefolder(root, data_config=cfg)
    assert task.input_shape == (3, 48, 48)
    x, y = task.test[0]
    assert x.shape == (3, 48, 48)
    expected = (torch.tensor(colours[task.class_names[y]]) / 255 - 0.5) / 0.25
    assert torch.allclose(x.mean(dim=(1, 2)), expected, atol=0.02)
    assert task.info["preprocess"]["crop_pct"] == pytest.approx(0.9)
    assert task.info["preprocess"]["interpolation"] == "bicubic"
    # without a data config: the old defaults (224 px asked for here as 32, ImageNet mean)
    plain = load_imagefolder(root, image_size=32)
    assert plain.test[0][0].shape == (3, 32, 32)
    assert plain.info["preprocess"]["mean"] == pytest.approx([0.485, 0.456, 0.406])


def test_search_finetune_fold_from_own_weights(tmp_path, monkeypatch, capsys):
    task = tiny_audio_task()
    monkeypatch.setattr(swr.tasks, "get_task", lambda spec, **kw: task)
    torch.manual_seed(0)
    weights = save_weights(create_backbone("bcresnet-1", num_classes=6),
                           tmp_path / "kws.safetensors")
    base = ["--backbone", "bcresnet-1", "--weights", str(weights)]
    search_out, final, folded = tmp_path / "s", tmp_path / "f", tmp_path / "m"
    assert main(["search", "--task", "tiny", *base, "--budget", "5%", "--policy", "knapsack",
                 "--evaluations", "3", "--workers", "0", "--supernet-epochs", "1",
                 "--device", "cpu", "--out", str(search_out)]) == 0
    sel = json.loads((search_out / "selection.json").read_text())
    assert sel["base"] == {"backbone": "bcresnet-1", "weights": str(weights.resolve())}
    # one epoch of stage 1 on a tiny task: the steps it took are recorded
    from swr.train import steps_in_an_epoch

    per_epoch = steps_in_an_epoch(task.train, 64)
    assert sel["supernet_steps"] == per_epoch
    assert sel["feasible_selections"] >= 2  # the empty selection and at least one layer
    assert sel["checkpoint"] is None
    capsys.readouterr()
    assert main(["finetune", "--selection", str(search_out / "selection.json"), "--epochs", "1",
                 "--device", "cpu", "--out", str(final)]) == 0
    # one epoch: the steps it took, and one line suggesting enough epochs for 240
    from swr.app.finetune import SUGGESTED_STEPS

    assert json.loads((final / "metrics.json").read_text())["steps"] == per_epoch
    notice = [line for line in capsys.readouterr().err.splitlines() if "optimizer steps" in line]
    assert notice == [f"swr: the final training took {per_epoch} optimizer steps (1 epoch of "
                      f"{per_epoch}); on small tasks {SUGGESTED_STEPS} or more gave clearly more "
                      f"accurate models: --epochs "
                      f"{-(-SUGGESTED_STEPS // per_epoch)}"]
    assert main(["fold", *base, "--delta", str(final / "task_delta.safetensors"),
                 "--out", str(folded)]) == 0
    trained = create_backbone("bcresnet-1", weights=final / "model.safetensors")
    rebuilt = create_backbone("bcresnet-1", weights=folded / "model.safetensors")
    for (k, a), (_, b) in zip(trained.state_dict().items(), rebuilt.state_dict().items()):
        assert torch.equal(a, b), k
    # a checkpoint and weights together are refused in one line
    assert main(["search", "--task", "tiny", *base, "--checkpoint", str(tmp_path),
                 "--budget", "5%", "--out", str(tmp_path / "x")]) == 2


def test_pretrain_from_weights_records_the_data_config(tmp_path, monkeypatch):
    from swr.pretrain import pretrain
    from swr.tasks.base import Task, tensor_split

    seen = {}

    def fake_task(spec, **kw):
        seen["data_config"] = kw.get("data_config")
        g = torch.Generator().manual_seed(0)
        split = tensor_split(torch.randn(4, 3, 16, 16, generator=g), torch.tensor([0, 1, 0, 1]))
        return Task(id=spec, modality="image", class_names=["x", "y"], train=split, val=split,
                    test=split, input_shape=(3, 16, 16))

    monkeypatch.setattr(swr.tasks, "get_task", fake_task)
    torch.manual_seed(0)
    weights = save_weights(timm.create_model("resnet10t", num_classes=2),
                           tmp_path / "w.safetensors")
    pretrain("images", "timm:resnet10t", tmp_path / "ckpt", epochs=1, weights=str(weights),
             device="cpu", progress=False)
    assert seen["data_config"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    _, desc = load_base(BaseSpec(checkpoint=str(tmp_path / "ckpt")))
    assert desc["data_config"] == seen["data_config"]  # the checkpoint's users prepare alike
    # from scratch: the suite's own preprocessing, recorded as the checkpoint's data config
    # (its size), so the tasks that use the checkpoint are prepared at that size
    pretrain("images", "timm:resnet10t", tmp_path / "scratch", epochs=1, device="cpu",
             progress=False)
    assert seen["data_config"] is None
    recorded = load_base(BaseSpec(checkpoint=str(tmp_path / "scratch")))[1]["data_config"]
    assert recorded["input_size"] == [3, 16, 16]
