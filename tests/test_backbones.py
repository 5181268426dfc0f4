import os
import pickle

import pytest
import torch

from swr.errors import SwrError
from swr.tasks.backbones import create_backbone, read_checkpoint, save_checkpoint


def test_safetensors_round_trip_sizes_head_from_checkpoint(tmp_path):
    model = create_backbone("bcresnet-1", num_classes=12)
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path, backbone="bcresnet-1")
    again = create_backbone("bcresnet-1", weights=path)
    assert again.get_classifier().out_features == 12
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])
    retargeted = create_backbone("bcresnet-1", num_classes=5, weights=path)
    assert retargeted.get_classifier().out_features == 5
    assert torch.equal(retargeted.stem[0].weight, model.stem[0].weight)


def test_torch_checkpoint_weights_only(tmp_path):
    model = create_backbone("timm:resnet18", num_classes=3)
    path = tmp_path / "m.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    again = create_backbone("timm:resnet18", weights=path)
    assert torch.equal(again.fc.weight, model.fc.weight)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/swr-should-not-exist",))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(SwrError, match="evil.pt"):
        read_checkpoint(path)
    assert not os.path.exists("/tmp/swr-should-not-exist")


def test_checkpoint_for_other_backbone_names_keys(tmp_path):
    path = tmp_path / "bc.safetensors"
    save_checkpoint(create_backbone("bcresnet-1"), path)
    with pytest.raises(SwrError, match="bcresnet-2.*shape mismatch"):
        create_backbone("bcresnet-2", weights=path)
    with pytest.raises(SwrError, match="missing keys"):
        create_backbone("timm:resnet18", weights=path)
