import copy

import pytest
import torch
from safetensors import safe_open

from swr.delta import apply_task_delta, base_hash, export_task_delta, read_task_delta
from swr.errors import ForeignDeltaError, SwrError
from swr.fold import fold
from swr.budget import selection_cost
from swr.reparam import (get_selection, norm_parameters, reparam_layers, reparametrize,
                         set_selection)

from models import make
from test_fold import randomize_deltas


def make_task_model(family, num_classes=5, seed=0):
    base, x = make(family)
    supernet = reparametrize(copy.deepcopy(base), bias_delta=True)
    supernet.reset_classifier(num_classes)
    randomize_deltas(supernet, seed)
    with torch.no_grad():  # "trained" task norms
        for p in norm_parameters(supernet).values():
            p.add_(torch.randn_like(p) * 0.1)
    names = list(reparam_layers(supernet))
    set_selection(supernet, names[1::3])
    return base, supernet, x


@pytest.mark.parametrize("family", ["bcresnet", "resnet", "vit"])
def test_export_apply_bit_exact(tmp_path, family):
    base, supernet, x = make_task_model(family)
    path = tmp_path / "task.safetensors"
    cost = selection_cost(supernet, get_selection(supernet))
    size = export_task_delta(supernet, path, backbone=family, budget_params=cost, task="t")
    assert size == path.stat().st_size > 0
    folded = fold(supernet)
    rebuilt = apply_task_delta(copy.deepcopy(base), path)
    a, b = folded.state_dict(), rebuilt.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with torch.no_grad():
        assert torch.equal(folded(x), rebuilt(x))
    _, meta = read_task_delta(path)
    assert meta["selection"] == list(reparam_layers(supernet))[1::3]
    assert meta["budget_params"] == cost and meta["backbone"] == family
    assert meta["base_hash"] == base_hash(base) == base_hash(supernet)


def test_delta_stores_only_gated_layers(tmp_path):
    _, supernet, _ = make_task_model("bcresnet")
    path = tmp_path / "d.safetensors"
    export_task_delta(supernet, path, backbone="bcresnet-1")
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    gated = {n for n, m in reparam_layers(supernet).items() if m.gate}
    delta_layers = {k[len("delta/"):].rsplit(".", 1)[0] for k in keys if k.startswith("delta/")}
    assert delta_layers == gated
    assert any(k.startswith("head/") for k in keys) and any(k.startswith("norm/") for k in keys)


def test_foreign_delta_refused_naming_both_hashes(tmp_path):
    base, supernet, _ = make_task_model("bcresnet")
    path = tmp_path / "d.safetensors"
    export_task_delta(supernet, path, backbone="bcresnet-1")
    other, _ = make("bcresnet", seed=7)  # other base weights
    with pytest.raises(ForeignDeltaError) as err:
        apply_task_delta(other, path)
    assert base_hash(base) in str(err.value) and base_hash(other) in str(err.value)


def test_corrupt_delta_file(tmp_path):
    base, _ = make("bcresnet")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(SwrError, match="bad.safetensors"):
        apply_task_delta(base, bad)
    with pytest.raises(SwrError, match="not found"):
        apply_task_delta(base, tmp_path / "missing.safetensors")
