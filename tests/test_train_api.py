"""The training loop from Python: a Task or a plain pair of DataLoaders, reachable as swr.train."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import swr
from swr.app import select
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


def test_select_chooses_layers_within_the_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("SWR_CACHE", str(tmp_path / "cache"))
    task = tiny_audio_task()
    torch.manual_seed(0)
    model = swr.create_backbone("bcresnet-1", num_classes=6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = select(model, task, "10%", policy="knapsack", evaluations=3, supernet_epochs=1,
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
        select(model, task, "10%", policy="magic")
    with pytest.raises(swr.SwrError, match="already reparametrized"):
        select(swr.reparametrize(model), task, "10%")


class _FileLike(torch.utils.data.Dataset):
    """A dataset read sample by sample (as image/audio files are), not a TensorDataset."""

    def __init__(self, ds):
        self.x, self.y = ds.tensors[0], ds.tensors[1]

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _train_tiny(task, n_classes=4, **cfg):
    torch.manual_seed(0)
    model = swr.create_backbone("bcresnet-1", num_classes=n_classes)
    params = [p for p in model.parameters()]
    config = swr.TrainConfig(epochs=1, lr=1e-2, batch_size=16, seed=0, device="cpu",
                             progress=False, **cfg)
    return model, swr.train(model, task, params, config)


def test_loader_workers_load_file_backed_data_in_the_same_order():
    task = tiny_audio_task()
    files = (_FileLike(task.train), _FileLike(task.val))
    a, ra = _train_tiny(files, loader_workers=0)
    b, rb = _train_tiny(files, loader_workers=2)
    assert ra.history[0]["train_loss"] == rb.history[0]["train_loss"]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(swr.SwrError, match="loader workers"):
        _train_tiny(files, loader_workers=-1)


def test_precision_auto_is_fp32_on_cpu_and_bf16_autocast_trains(monkeypatch):
    from swr.train import resolve_precision

    task = tiny_audio_task()
    _, fp32 = _train_tiny(task)
    assert fp32.precision == "fp32"
    model, bf16 = _train_tiny(task, precision="bf16")
    assert bf16.precision == "bf16" and all(p.dtype == torch.float32 for p in model.parameters())
    # half-precision matmuls: the same run, not the same bits
    assert bf16.history[0]["train_loss"] != fp32.history[0]["train_loss"]
    assert abs(bf16.history[0]["train_loss"] - fp32.history[0]["train_loss"]) < 0.1
    cpu = torch.device("cpu")
    with pytest.raises(swr.SwrError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", cpu)
    monkeypatch.setenv("SWR_PRECISION", "bf16")
    assert resolve_precision("auto", cpu) == "bf16" and resolve_precision("fp32", cpu) == "fp32"
    monkeypatch.setenv("SWR_PRECISION", "half")
    with pytest.raises(swr.SwrError, match="SWR_PRECISION"):
        resolve_precision("auto", cpu)
    with pytest.raises(swr.SwrError, match="precision"):
        swr.TrainConfig(precision="fp8").validate()
