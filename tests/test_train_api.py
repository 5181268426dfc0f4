"""The training loop from Python: a Task or a plain pair of DataLoaders, reachable as swr.train."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import swr
from fixtures import tiny_audio_task


def test_train_takes_a_dataloader_pair_and_matches_the_task_path():
    task = tiny_audio_task()
    cfg = swr.TrainConfig(epochs=2, lr=2e-2, batch_size=16, seed=0, device="cpu", progress=False)

    def run(data):
        torch.manual_seed(0)
        model = swr.create_backbone("bcresnet-1", num_classes=task.num_classes)
        swr.reparametrize(model)
        swr.set_selection(model, [swr.candidates(model)[-1].name])
        params = swr.set_trainable(model, deltas=[swr.candidates(model)[-1].name])
        return model, swr.train(model, data, params, cfg)

    loaders = (DataLoader(task.train, batch_size=16, shuffle=False),
               DataLoader(task.val, batch_size=64))
    model, result = run(loaders)
    assert len(result.history) == 2 and 0.0 <= result.val_acc <= 1.0
    assert result.val_acc == swr.evaluate(model, loaders[1])  # best state kept, in eval mode
    assert not model.training
    # the deltas trained: the folded model differs from the base where the gate is open
    layer = swr.reparam_layers(model)[swr.candidates(model)[-1].name]
    assert float(layer.delta.detach().abs().sum()) > 0
    _, task_result = run(task)  # the same loop over the Task's own splits
    assert len(task_result.history) == 2


def test_train_refuses_a_pair_that_is_not_a_pair():
    ds = TensorDataset(torch.zeros(4, 1, 40, 101), torch.zeros(4, dtype=torch.long))
    model = swr.create_backbone("bcresnet-1", num_classes=2)
    with pytest.raises(swr.SwrError, match="pair"):
        swr.train(model, (ds, ds, ds), list(model.parameters()), swr.TrainConfig(epochs=1))


def test_select_from_import_swr_chooses_layers_within_the_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("SWR_CACHE", str(tmp_path / "cache"))
    task = tiny_audio_task()
    torch.manual_seed(0)
    model = swr.create_backbone("bcresnet-1", num_classes=6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = swr.select(model, task, "10%", policy="knapsack", evaluations=3, supernet_epochs=1,
                        device="cpu", out=tmp_path / "sel")
    budget = swr.resolve_budget(swr.reparametrize(swr.create_backbone("bcresnet-1")), "10%")
    assert result["budget_params"] == budget and 0 < result["cost"] <= budget
    names = {c.name for c in swr.candidates(swr.reparametrize(swr.create_backbone("bcresnet-1")))}
    assert result["layers"] and set(result["layers"]) <= names
    assert result["evaluations"] == 3 and (tmp_path / "sel" / "search.csv").is_file()
    # the base model is left as it was
    assert not swr.reparam_layers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(swr.SwrError, match="not one of"):
        swr.select(model, task, "10%", policy="magic")
    with pytest.raises(swr.SwrError, match="already reparametrized"):
        swr.select(swr.reparametrize(model), task, "10%")
