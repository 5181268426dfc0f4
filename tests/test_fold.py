import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import swr
from swr.fold import fold, fold_batchnorm, fold_check, merge, same_architecture, unmerge
from swr.layers import ReparamLayer
from swr.reparam import candidates, reparam_layers, reparametrize, set_selection

from models import FAMILIES, make

FP32_TOL = 1e-5


def randomize_deltas(model, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in reparam_layers(model).values():
            s = layer.base_layer.weight.std().nan_to_num(0.0) * scale + 1e-3
            layer.delta.copy_(torch.randn(layer.delta.shape, generator=g) * s)
            if layer.delta_bias is not None:
                layer.delta_bias.copy_(torch.randn(layer.delta_bias.shape, generator=g) * s)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fold_check_every_family(family):
    model, x = make(family)
    report = fold_check(model, x, seed=3)
    assert report["same_architecture"]
    assert report["max_abs_diff"] <= FP32_TOL
    assert report["delta_effect"] > 0  # the deltas did change the output
    assert 0 < report["gates_open"] < report["layers"]


@pytest.mark.parametrize("family", ["resnet", "mobilenetv3", "convnext", "vit", "bcresnet"])
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fold_exact_for_random_gate_subsets(family, data):
    model, x = make(family)
    base = copy.deepcopy(model)
    supernet = reparametrize(model, bias_delta=data.draw(st.booleans()))
    names = list(reparam_layers(supernet))
    chosen = data.draw(st.sets(st.sampled_from(names)))
    randomize_deltas(supernet, seed=data.draw(st.integers(0, 2**16)))
    set_selection(supernet, chosen)
    folded = fold(supernet)
    assert not any(isinstance(m, ReparamLayer) for m in folded.modules())
    assert same_architecture(folded, base)
    with torch.no_grad():
        diff = (supernet(x) - folded(x)).abs().max().item()
        if not chosen:  # no open gate: the folded model is the base model, bitwise
            assert torch.equal(folded(x), base(x))
    assert diff <= FP32_TOL


def test_wrapped_model_starts_equal_to_base():
    model, x = make("resnet")
    with torch.no_grad():
        y0 = model(x)
        supernet = reparametrize(copy.deepcopy(model))
        set_selection(supernet, reparam_layers(supernet))  # all gates open, deltas zero
        assert torch.equal(supernet(x), y0)


def test_merge_unmerge_restores_exactly():
    model, x = make("convnext")
    supernet = reparametrize(model, bias_delta=True)
    randomize_deltas(supernet, 1)
    set_selection(supernet, list(reparam_layers(supernet))[::2])
    before = {k: v.clone() for k, v in supernet.state_dict().items()}
    with torch.no_grad():
        y = supernet(x)
        merge(supernet)
        assert (supernet(x) - y).abs().max() <= FP32_TOL
        unmerge(supernet)
        assert torch.equal(supernet(x), y)
    after = supernet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_candidates_exclude_head_and_cover_kinds():
    model, _ = make("mobilenetv3")
    cands = candidates(model)
    names = [c.name for c in cands]
    assert "classifier" not in names  # the head is not a candidate
    kinds = {c.kind for c in cands}
    assert {"conv2d", "dwconv2d"} <= kinds
    assert all(c.params == torch.Size(c.shape).numel() for c in cands)
    vit, _ = make("vit")
    vit_names = [c.name for c in candidates(vit)]
    assert "blocks.0.attn.qkv" in vit_names and "blocks.0.mlp.fc1" in vit_names
    assert "head" not in vit_names


def test_grouped_conv1d_and_linear():
    model = nn.Sequential(nn.Conv1d(4, 8, 3, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6, 3))
    x = torch.randn(2, 4, 8)
    kinds = [c.kind for c in candidates(model)]
    assert kinds == ["gconv1d", "linear"]
    supernet = reparametrize(copy.deepcopy(model))
    randomize_deltas(supernet, 0)
    set_selection(supernet, ["0", "3"])
    folded = fold(supernet)
    assert same_architecture(folded, model)
    with torch.no_grad():
        assert (folded(x) - supernet(x)).abs().max() <= FP32_TOL


def test_bf16_fold_matches_bf16_supernet():
    model, x = make("resnet")
    supernet = reparametrize(model)
    randomize_deltas(supernet, 2)
    set_selection(supernet, list(reparam_layers(supernet))[1::2])
    ref = fold(supernet)
    sb = copy.deepcopy(supernet).to(torch.bfloat16)
    fb = fold(sb)
    with torch.no_grad():
        xb = x.to(torch.bfloat16)
        assert (sb(xb).float() - fb(xb).float()).abs().max() <= 1e-5
        # against fp32, bf16 differs by its rounding (8 bits of mantissa)
        rel = (fb(xb).float() - ref(x)).abs().max() / ref(x).abs().max()
        assert rel < 0.1


@pytest.mark.parametrize("family", ["resnet", "bcresnet", "efficientnet"])
def test_fold_batchnorm(family):
    model, x = make(family)
    # non-trivial running statistics
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn_like(x) * 2 + 0.5)
    model.eval()
    deployed = fold_batchnorm(model, x)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    n_left = sum(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    assert n_left < n_bn
    with torch.no_grad():
        ref = model(x)
        err = (deployed(x) - ref).abs().max().item()
    assert err <= 1e-5 * max(1.0, ref.abs().max().item())


def test_public_api_names():
    for name in ["reparametrize", "fold", "merge", "unmerge", "set_selection", "candidates",
                 "Budget", "export_task_delta", "apply_task_delta", "create_backbone"]:
        assert hasattr(swr, name), name
