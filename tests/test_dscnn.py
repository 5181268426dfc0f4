"""DS-CNN, the second keyword-spotting backbone: it comes in through the backbone registry
alone (tasks/dscnn.py), and every part of swr that works by backbone name takes it."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from swr.app.cli import main
from swr.errors import SwrError
from swr.fold import fold_check
from swr.methods.base import DEFAULT_LR, default_lr
from swr.reparam import candidates
from swr.tasks.backbones import (BACKBONE_FORMS, backbone_data_config, backbone_family,
                                 check_backbone_name, create_backbone, input_shape,
                                 read_checkpoint, save_checkpoint, similar_names)
from swr.tasks.dscnn import DSCNN_NAMES, create_dscnn
from swr.tasks.features import LogMel

# the fp32 tolerance of the fold tests (tests/test_fold.py)
FP32_TOL = 1e-5
# the smallest kws-synth task the tests use: 2 training speakers, 1 val, 1 test
TINY_KWS = "kws-synth:en?speakers=2,1,1"


def log_mel_batch(n: int = 3, seed: int = 0) -> torch.Tensor:
    """Log-mels of 1 s noise clips: the (1, 40, 101) input of every kws-synth task."""
    wav = torch.randn(n, 16000, generator=torch.Generator().manual_seed(seed))
    return LogMel()(wav)


@pytest.mark.parametrize("name", DSCNN_NAMES)
def test_every_size_builds_and_reads_a_log_mel_batch(name):
    torch.manual_seed(0)
    model = create_backbone(name, num_classes=7).eval()
    x = log_mel_batch()
    assert x.shape[1:] == (1, 40, 101) == input_shape(model, name)
    assert model(x).shape == (3, 7)
    assert model.forward_features(x).shape == (3, model.num_features)
    # the stem halves both axes; every depthwise-separable block keeps the map size
    assert model.stem(x).shape == (3, model.num_features, 20, 51)
    assert model(torch.randn(1, 1, 40, 1)).shape == (1, 7)  # a clip of one frame too


def test_sizes_follow_the_paper_and_small_counted_by_hand():
    """S/M/L: 64, 172, 276 channels with 4, 4, 5 blocks. dscnn-s, no conv biases, BN =
    2 params per channel: stem 4*10*64 + 128; block 9*64 + 128 + 64*64 + 128; head 64*12 + 12."""
    widths = {n: (m.num_features, len(m.blocks)) for n in DSCNN_NAMES
              for m in [create_dscnn(n)]}
    assert widths == {"dscnn-s": (64, 4), "dscnn-m": (172, 4), "dscnn-l": (276, 5)}
    block = 9 * 64 + 128 + 64 * 64 + 128
    expected = 4 * 10 * 64 + 128 + 4 * block + 64 * 12 + 12
    assert sum(p.numel() for p in create_backbone("dscnn-s").parameters()) == expected == 23180


def test_found_by_name_with_its_facts():
    for name in DSCNN_NAMES:
        assert check_backbone_name(name) == name and name in BACKBONE_FORMS
    assert set(similar_names("dscnn", BACKBONE_FORMS)) >= set(DSCNN_NAMES)
    assert similar_names("dscnn-xs", BACKBONE_FORMS)[0] == "dscnn-s"
    with pytest.raises(SwrError, match=r"unknown DS-CNN model 'dscnn-xl'; choose one of "
                                       r"dscnn-s, dscnn-m, dscnn-l$"):
        check_backbone_name("dscnn-xl")
    with pytest.raises(SwrError, match=r"unknown backbone 'DSCNN-S'; known: .*dscnn-s"):
        check_backbone_name("DSCNN-S")
    family = backbone_family("dscnn-m")
    assert family.modality == "audio" and family.build is create_dscnn
    assert input_shape(nn.Identity(), "dscnn-s") == (1, 40, 101)  # no cfg: the family's
    assert backbone_data_config("dscnn-s") is None  # log-mels, no timm data config
    # no rates tuned for it: it takes BC-ResNet's row, not the timm one
    assert default_lr("head", "dscnn-l") == DEFAULT_LR["bcresnet"]["head"] != \
        default_lr("head", "timm:resnet18")


def test_checkpoint_round_trip_sizes_the_head(tmp_path):
    model = create_backbone("dscnn-s", num_classes=5)
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path, backbone="dscnn-s")
    again = create_backbone("dscnn-s", weights=path)
    assert again.get_classifier().out_features == 5
    state, meta = read_checkpoint(path)
    assert meta["backbone"] == "dscnn-s"
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in state.items())
    with pytest.raises(SwrError, match="shape mismatch"):
        create_backbone("dscnn-m", weights=path)


def test_swr_candidates_are_its_convolutions():
    model = create_backbone("dscnn-s")
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    cands = {c.name: c.kind for c in candidates(model)}
    assert len(convs) == 1 + 2 * 4 and set(convs) == set(cands)  # the head is no candidate
    assert cands["stem.0"] == "conv2d"
    assert {cands[f"blocks.{i}.depthwise.0"] for i in range(4)} == {"dwconv2d"}
    assert {cands[f"blocks.{i}.pointwise.0"] for i in range(4)} == {"conv2d"}


def test_folding_random_deltas_is_exact():
    torch.manual_seed(0)
    model = create_backbone("dscnn-s", num_classes=7).train()
    with torch.no_grad():  # running statistics of its own, so the BatchNorms are not identity
        for seed in range(3):
            model(log_mel_batch(8, seed))
    report = fold_check(model.eval(), log_mel_batch(4, seed=9), seed=3)
    assert report["same_architecture"]
    assert report["max_abs_diff"] <= FP32_TOL
    assert report["delta_effect"] > 0  # the deltas did change the output
    assert 0 < report["gates_open"] < report["layers"] == 9


def test_swr_pretrain_trains_it(tmp_path):
    out = tmp_path / "ckpt"
    assert main(["pretrain", "--task", TINY_KWS, "--backbone", "dscnn-s", "--epochs", "1",
                 "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["backbone"] == "dscnn-s" and metrics["epochs"] == 1
    assert metrics["params"] == sum(p.numel() for p in create_backbone("dscnn-s").parameters())
    model = create_backbone("dscnn-s", weights=out / "model.safetensors")
    assert model.get_classifier().out_features == len(metrics["classes"]) == 12
