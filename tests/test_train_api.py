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
