"""Stage 1: the supernet, which can score any selection of reparametrized layers.

All candidate layers get a delta; the deltas, the task norms and a new head train
together on the target task while every batch opens a random subset of gates
(each gate independently with a probability drawn per batch from
``[p_min, p_max]``), so each delta learns to help under many different subsets of
the others. Afterwards, per-layer statistics give the policy (and the greedy and
knapsack baselines) something to go on:

* ``cost``: delta parameters,
* ``delta_rel_norm``: ``||dW|| / ||W||``, how far training moved the layer,
* ``taylor``: first-order Taylor estimate of the validation-loss decrease from
  opening this gate alone: ``-dL/dg = -<dL/dW_eff, dW>`` averaged over batches
  with all gates closed except this one's, evaluated at ``g = 0``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .reparam import candidates, reparam_layers, reparametrize, set_selection, set_trainable
from .train import TrainConfig, TrainResult, batches, resolve_device, train


@dataclass
class SupernetConfig:
    """Stage-1 hyper-parameters."""

    epochs: int = 10
    lr: float = 3e-3
    batch_size: int = 64
    p_min: float = 0.05
    p_max: float = 0.5
    bias_delta: bool = False
    stats_batches: int = 8
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    #: folder for the per-epoch log (:mod:`swr.runlog`); None writes nothing
    log_dir: str | None = None


def build_supernet(base_model: nn.Module, num_classes: int, bias_delta: bool = False) -> nn.Module:
    """A reparametrized copy of ``base_model`` with a new ``num_classes`` head."""
    model = copy.deepcopy(base_model)
    model.reset_classifier(num_classes)
    return reparametrize(model, bias_delta=bias_delta)


def train_supernet(model: nn.Module, task, cfg: SupernetConfig) -> TrainResult:
    """Train all deltas + task norms + head with random gates per batch (in place)."""
    layers = list(reparam_layers(model).values())
    params = set_trainable(model, deltas=True, norms=True, head=True)
    g = torch.Generator().manual_seed(cfg.seed + 1)

    def open_random_gates(step: int) -> None:
        p = cfg.p_min + (cfg.p_max - cfg.p_min) * float(torch.rand((), generator=g))
        opened = torch.rand(len(layers), generator=g) < p
        for layer, o in zip(layers, opened.tolist()):
            layer.gate = 1.0 if o else 0.0

    def all_open() -> None:  # validate the supernet as a whole
        for layer in layers:
            layer.gate = 1.0

    tc = TrainConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed,
                     device=cfg.device, progress=cfg.progress, desc="supernet",
                     log_dir=cfg.log_dir)
    result = train(model, task, params, tc, before_batch=open_random_gates, before_eval=all_open)
    set_selection(model, [])
    return result


def layer_statistics(model: nn.Module, task, n_batches: int = 8, batch_size: int = 128,
                     device: str | torch.device = "cpu", seed: int = 0) -> list[dict]:
    """Per-layer features of a trained supernet, in network order (see module doc)."""
    device = resolve_device(device)
    layers = reparam_layers(model)
    costs = {c.name: c.params for c in candidates(model)}
    model.to(device).eval()
    set_selection(model, [])
    # d loss / d g at g = 0 equals <grad of the loss w.r.t. the effective weight, dW>;
    # with all gates at 0 the effective weight is W, so one backward pass gives all
    # layers' derivatives at once: hook the base weights' gradients.
    saved = {}
    for name, layer in layers.items():
        saved[name] = layer.base_layer.weight.requires_grad
        layer.base_layer.weight.requires_grad_(True)
        layer.base_layer.weight.grad = None
    g = torch.Generator().manual_seed(seed)
    n = 0
    for i, (x, y) in enumerate(batches(task.train, batch_size, shuffle=True, generator=g)):
        if i >= n_batches:
            break
        loss = F.cross_entropy(model(x.to(device)), y.to(device))
        loss.backward()
        n += 1
    stats = []
    for name, layer in layers.items():
        w = layer.base_layer.weight
        grad = w.grad if w.grad is not None else torch.zeros_like(w)
        dldg = float((grad * layer.delta.detach()).sum()) / max(n, 1)
        stats.append({
            "name": name, "kind": layer.kind, "cost": costs[name],
            "delta_rel_norm": float(layer.delta.detach().norm() / (w.detach().norm() + 1e-12)),
            "taylor": -dldg,
        })
        w.grad = None
        w.requires_grad_(saved[name])
    model.zero_grad(set_to_none=True)
    return stats

