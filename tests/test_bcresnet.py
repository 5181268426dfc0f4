"""BC-ResNet backbone: layout against the paper, timm-style interface, trainability."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from swr.errors import SwrError
from swr.tasks.bcresnet import (BCRESNET_NAMES, BCRESNET_TAUS, BCResBlock, BCResNet,
                                SubSpectralNorm, create_bcresnet)

# Parameter counts reported in the paper's Table 2.
PAPER_PARAMS = {1: 9.2e3, 2: 27.3e3, 3: 54.2e3, 6: 188e3, 8: 321e3}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("name", BCRESNET_NAMES)
def test_output_shape_every_width(name):
    model = create_bcresnet(name, num_classes=7)
    assert model(torch.randn(2, 1, 40, 101)).shape == (2, 7)
    assert model.forward_features(torch.randn(2, 1, 40, 101)).shape == (2, model.num_features)


def test_other_clip_lengths():
    model = create_bcresnet("bcresnet-1").eval()
    for frames in (1, 37, 151):
        assert model(torch.randn(1, 1, 40, frames)).shape == (1, 12)


def test_stage_shapes_follow_table_1():
    """Frequency 40 -> 20 (stem) -> 20, 10, 5, 5 (stages) -> 1 (head); time untouched."""
    model = create_bcresnet("bcresnet-2")
    x = model.stem(torch.randn(2, 1, 40, 101))
    assert x.shape == (2, 32, 20, 101)
    expected = [(16, 20), (24, 10), (32, 5), (40, 5)]
    for stage, (channels, freq) in zip(model.stages, expected):
        x = stage(x)
        assert x.shape == (2, channels, freq, 101)
    assert model.head_conv(x).shape == (2, 64, 1, 101)
    # Every stage opens with a transition block (the width changes at each stage).
    blocks = [[b.transition for b in stage] for stage in model.stages]
    assert blocks == [[True, False], [True, False], [True, False, False, False],
                      [True, False, False, False]]


def test_param_count_tau1_by_hand():
    """Table 1 at tau = 1, counted by hand (no conv biases; BN = 2 params/channel).

    stem 5*5*16 + 32 = 432; block C (normal) = 3C + 2*5C (SSN) + 3C + 2C + C*C;
    transition adds Cin*C + 2C; head 25*20 + 20*32 + 64; classifier 32*12 + 12.
    """
    def block(c):
        return 3 * c + 10 * c + 3 * c + 2 * c + c * c

    def trans(cin, c):
        return cin * c + 2 * c + block(c)

    expected = (432 + trans(16, 8) + block(8) + trans(8, 12) + block(12)
                + trans(12, 16) + 3 * block(16) + trans(16, 20) + 3 * block(20)
                + 500 + 640 + 64 + 32 * 12 + 12)
    assert n_params(create_bcresnet("bcresnet-1")) == expected == 9232


def test_param_counts_monotonic_and_close_to_paper():
    counts = {tau: n_params(BCResNet(tau=tau)) for tau in BCRESNET_TAUS}
    values = [counts[t] for t in BCRESNET_TAUS]
    assert values == sorted(values) and len(set(values)) == len(values)
    for tau, paper in PAPER_PARAMS.items():
        assert abs(counts[tau] - paper) / paper < 0.15, (tau, counts[tau], paper)


def test_subspectral_norm_normalises_each_band_separately():
    channels, bands = 3, 5
    ssn = SubSpectralNorm(channels, bands).train()
    assert isinstance(ssn.bn, nn.BatchNorm2d) and ssn.bn.num_features == channels * bands
    # Bands with very different offsets: a plain BN over the channel would not
    # centre each of them, SSN must.
    x = torch.randn(4, channels, 20, 7) + torch.arange(20.0)[:, None] * 3
    y = ssn(x)
    assert y.shape == x.shape
    band = y.unflatten(2, (bands, 4))  # (B, C, S, F/S, T)
    mean = band.mean(dim=(0, 3, 4))
    var = band.var(dim=(0, 3, 4), unbiased=False)
    torch.testing.assert_close(mean, torch.zeros(channels, bands), atol=1e-5, rtol=0)
    torch.testing.assert_close(var, torch.ones(channels, bands), atol=1e-3, rtol=0)
    # Per-(channel, band) affine parameters: channel c, band s is BN index c*S + s.
    with torch.no_grad():
        ssn.bn.bias.zero_()
        ssn.bn.bias[1 * bands + 2] = 10.0
        shifted = ssn(x).unflatten(2, (bands, 4)).mean(dim=(0, 3, 4))
    assert shifted[1, 2].item() == pytest.approx(10.0, abs=1e-4)
    assert shifted.abs().sum() - shifted[1, 2].abs() < 1e-3


def test_subspectral_norm_type_is_reported_by_name():
    model = create_bcresnet("bcresnet-1")
    ssns = [m for m in model.modules() if isinstance(m, SubSpectralNorm)]
    assert len(ssns) == 12  # one per BC-ResBlock (f2)


def test_all_convs_are_plain_conv2d():
    model = create_bcresnet("bcresnet-1.5")
    convs = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    assert convs and all(type(m) is nn.Conv2d for m in convs)
    depthwise = [m for m in convs if m.groups > 1]
    assert all(m.groups == m.in_channels == m.out_channels for m in depthwise)


def test_fx_symbolic_trace_matches_eager():
    model = create_bcresnet("bcresnet-1").eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 1, 40, 101)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))
    called = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    assert "stages.0.0.f2.1.bn" in called  # SSN's BatchNorm is a traced module call


def test_reset_classifier():
    model = create_bcresnet("bcresnet-2", num_classes=12)
    old = model.get_classifier()
    assert isinstance(old, nn.Linear) and old.in_features == model.num_features == 64
    model.reset_classifier(5)
    head = model.get_classifier()
    assert head is not old and head is model.head and head.out_features == 5
    assert model(torch.randn(2, 1, 40, 101)).shape == (2, 5)
    model.reset_classifier(0)
    feats = model(torch.randn(2, 1, 40, 101))
    assert feats.shape == (2, model.num_features)


def test_forward_head_pre_logits():
    model = create_bcresnet("bcresnet-1").eval()
    x = torch.randn(2, 1, 40, 101)
    feats = model.forward_features(x)
    assert model.forward_head(feats, pre_logits=True) is feats
    torch.testing.assert_close(model.forward_head(feats), model(x))


def test_eval_mode_is_deterministic():
    model = create_bcresnet("bcresnet-1").eval()
    x = torch.randn(3, 1, 40, 101)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
        # Batch composition must not matter in eval mode (running BN statistics).
        torch.testing.assert_close(model(x[:1]), model(x)[:1])


def test_gradient_reaches_every_parameter():
    model = create_bcresnet("bcresnet-1").train()
    model(torch.randn(4, 1, 40, 101)).logsumexp(dim=1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_a_few_steps_reduce_the_loss():
    # Two classes told apart by a bright band in low vs high mel bins.
    n, frames = 16, 24
    y = torch.arange(n) % 2
    x = torch.randn(n, 1, 40, frames)
    x[y == 0, :, :10] += 2.0
    x[y == 1, :, 30:] += 2.0
    model = create_bcresnet("bcresnet-1", num_classes=2, dropout=0.0).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_block_identity_shortcut_only_without_shape_change():
    assert not BCResBlock(8, 8).transition
    assert BCResBlock(8, 12).transition
    assert BCResBlock(8, 8, stride=2).transition
    assert isinstance(BCResBlock(8, 8).expand, nn.Identity)


@pytest.mark.parametrize("name", ["bcresnet-4", "bcresnet", "resnet-1", "bcresnet-x"])
def test_unknown_name_lists_valid_ones(name):
    with pytest.raises(SwrError, match="bcresnet-1, bcresnet-1.5, bcresnet-2"):
        create_bcresnet(name)


def test_name_forms_and_kwargs():
    model = create_bcresnet("BCResNet-1.5", num_classes=3, in_chans=2, dropout=0.2)
    assert model.tau == 1.5 and model.num_features == 48
    assert model(torch.randn(1, 2, 40, 50)).shape == (1, 3)
    assert model.pretrained_cfg["input_size"] == (2, 40, 101)


@pytest.mark.parametrize("n_mels,subbands", [(64, 5), (40, 3), (16, 1)])
def test_bad_frequency_layout_is_a_clear_error(n_mels, subbands):
    with pytest.raises(SwrError, match="n_mels"):
        BCResNet(n_mels=n_mels, subbands=subbands)


def test_other_valid_frequency_layout():
    model = BCResNet(n_mels=80, subbands=5)  # 40, 20, 10, 10 bins: head leaves 6
    assert model(torch.randn(2, 1, 80, 30)).shape == (2, 12)
