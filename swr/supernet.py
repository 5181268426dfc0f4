"""Stage 1: the supernet, which can score any selection of reparametrized layers.

All candidate layers get a delta; the deltas, the task norms and a new head train
together on the target task while every batch opens a random subset of gates
(each gate independently with a probability drawn per batch from
``[p_min, p_max]``), so each delta learns to help under many different subsets of
the others. With ``gates="budget"`` each batch instead opens a random *budget-feasible*
gate set (:func:`swr.budget.random_feasible_gates` under ``gate_budget_params``): the
supernet then trains on the kind of selection the search will ask it to score.
:func:`prepare_supernet` trains it once per (task, base weights,
settings) and keeps it in the cache. Afterwards, per-layer statistics give the policy (and the greedy and
knapsack baselines) something to go on:

* ``cost``: delta parameters,
* ``delta_rel_norm``: ``||dW|| / ||W||``, how far training moved the layer,
* ``taylor``: first-order Taylor estimate of the validation-loss decrease from
  opening this gate alone: ``-dL/dg = -<dL/dW_eff, dW>`` averaged over batches
  with all gates closed except this one's, evaluated at ``g = 0``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from .budget import random_feasible_gates
from .errors import SwrError
from .io import cache_dir, save_safetensors, write_json
from .reparam import candidates, reparam_layers, reparametrize, set_selection, set_trainable
from .source import state_hash
from .train import TrainConfig, TrainResult, batches, freeze_batchnorm, resolve_device, train


#: How stage 1 opens gates per batch (``SupernetConfig.gates``).
SUPERNET_GATES = ("bernoulli", "budget")


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
    #: how each batch opens gates: "bernoulli" (each gate independently with p drawn
    #: from [p_min, p_max]) or "budget" (a random selection within gate_budget_params)
    gates: str = "bernoulli"
    #: the budget, in delta parameters, of the gate sets ``gates="budget"`` draws
    gate_budget_params: int = 0
    #: train the task norms beside the deltas; False keeps the base's norm affines and
    #: BatchNorm statistics, as a final training that does not train norms does, so the
    #: deltas learn with the norms they will be deployed with
    norms: bool = True

    def validate(self) -> "SupernetConfig":
        """Raise :class:`SwrError` on settings stage 1 cannot run with."""
        if self.epochs < 1:
            raise SwrError(f"--supernet-epochs {self.epochs} must be at least 1")
        if self.gates not in SUPERNET_GATES:
            raise SwrError(f"--supernet-gates {self.gates!r} is not one of "
                           f"{', '.join(SUPERNET_GATES)}")
        if self.gates == "budget" and self.gate_budget_params < 1:
            raise SwrError(f"supernet gates 'budget' need a positive budget in parameters "
                           f"(got {self.gate_budget_params}); give the search a --budget")
        if not 0.0 <= self.p_min <= self.p_max <= 1.0:
            raise SwrError(f"supernet gate probabilities {self.p_min}..{self.p_max} must satisfy "
                           "0 <= p_min <= p_max <= 1")
        return self


def build_supernet(base_model: nn.Module, num_classes: int, bias_delta: bool = False) -> nn.Module:
    """A reparametrized copy of ``base_model`` with a new ``num_classes`` head."""
    model = copy.deepcopy(base_model)
    model.reset_classifier(num_classes)
    return reparametrize(model, bias_delta=bias_delta)


def train_supernet(model: nn.Module, task, cfg: SupernetConfig) -> TrainResult:
    """Train all deltas + task norms (unless ``cfg.norms`` is False) + head with random
    gates per batch (in place)."""
    layers = list(reparam_layers(model).values())
    params = set_trainable(model, deltas=True, norms=cfg.norms, head=True)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    costs = [c.params for c in candidates(model)]  # network order, as ``layers``

    def open_random_gates(step: int) -> None:
        if cfg.gates == "budget":
            opened = random_feasible_gates(costs, cfg.gate_budget_params, g)
        else:
            p = cfg.p_min + (cfg.p_max - cfg.p_min) * float(torch.rand((), generator=g))
            opened = (torch.rand(len(layers), generator=g) < p).tolist()
        for layer, o in zip(layers, opened):
            layer.gate = 1.0 if o else 0.0
        if not cfg.norms:
            freeze_batchnorm(model)

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


# -- stage 1 with a cache -------------------------------------------------------------------
def supernet_key(cfg: SupernetConfig, task_id: str, base: str) -> str:
    """The cache key of a trained supernet: task, base weights and every setting but
    progress and logging."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("progress", "log_dir")}
    if cfg.gates == "bernoulli":  # the default keeps the keys of supernets cached before it
        settings = {k: v for k, v in settings.items() if k not in ("gates", "gate_budget_params")}
    if cfg.norms:  # likewise
        settings.pop("norms")
    blob = json.dumps({"task": task_id, "base": base, "supernet": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prepare_supernet(base_model: nn.Module, task, cfg: SupernetConfig,
                     backbone: str) -> tuple[nn.Module, dict, Path]:
    """Train (or load the cached) supernet for ``task``; returns (supernet, meta, folder).

    ``meta`` holds the per-layer statistics (``meta["stats"]``, see
    :func:`layer_statistics`) and the all-gates-open validation accuracy. The cache
    folder is ``$SWR_CACHE/supernets/<key>`` (:func:`supernet_key`), keyed on the task's
    data (:meth:`swr.tasks.base.Task.data_hash`), not only its name. A cached supernet
    that does not load or does not fit (a truncated file, damaged JSON, other shapes)
    is trained again, with one line on stderr saying why.
    """
    model = new_supernet(base_model, task.num_classes, cfg)
    # keyed on all base tensors (norms too), how the task's inputs were prepared and
    # the task's data itself (replaced files or an added class train a new supernet)
    key = supernet_key(cfg, json.dumps([task.id, task.info.get("preprocess"),
                                        task.data_hash()]), state_hash(base_model))
    folder = cache_dir("supernets", key)
    weights, meta_path = folder / "supernet.safetensors", folder / "supernet.json"
    if weights.exists() or meta_path.exists():
        cached = _load_cached(model, weights, meta_path)
        if isinstance(cached, dict):
            return model, cached, folder
        print(f"swr: the cached supernet in {folder} is damaged ({cached}); training it again",
              file=sys.stderr)
        model = new_supernet(base_model, task.num_classes, cfg)  # a load may have half-filled it
    result = train_supernet(model, task, cfg)
    stats = layer_statistics(model, task, cfg.stats_batches, device=cfg.device, seed=cfg.seed)
    model.cpu()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_safetensors(state, weights)
    meta = {"task": task.id, "backbone": backbone, "val_acc_all_open": result.val_acc,
            "seconds": result.seconds, "config": asdict(cfg), "stats": stats}
    write_json(meta_path, meta)
    return model, meta, folder


def new_supernet(base_model: nn.Module, num_classes: int, cfg: SupernetConfig) -> nn.Module:
    """:func:`build_supernet` with its new head drawn from ``cfg.seed``, so that two
    processes with the same seed start (and train) the same supernet. The global RNG
    is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return build_supernet(base_model, num_classes, bias_delta=cfg.bias_delta)


_STAT_KEYS = {"name": str, "kind": str, "cost": int, "delta_rel_norm": float, "taylor": float}


def _load_cached(model: nn.Module, weights: Path, meta_path: Path) -> dict | str:
    """The cached supernet's metadata, its weights loaded into ``model``; or why they
    cannot be used (a string)."""
    if not weights.is_file() or not meta_path.is_file():
        return f"{(meta_path if weights.is_file() else weights).name} is missing"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        return f"{meta_path.name}: {' '.join(str(e).split())[:120] or type(e).__name__}"
    names = [c.name for c in candidates(model)]
    if not (isinstance(meta, dict) and isinstance(meta.get("stats"), list)
            and isinstance(meta.get("val_acc_all_open"), (int, float, type(None)))
            and [s.get("name") if isinstance(s, dict) else None for s in meta["stats"]] == names
            and all(isinstance(s.get(k), t if t is not float else (int, float))
                    for s in meta["stats"] for k, t in _STAT_KEYS.items())):
        return f"{meta_path.name} lacks the layer statistics of this model"
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for damaged files
        return f"{weights.name}: {' '.join(str(e).split())[:120] or type(e).__name__}"
    expected = model.state_dict()
    if set(state) != set(expected):
        differ = sorted(set(state) ^ set(expected))
        return f"{weights.name} holds other tensors (e.g. {differ[0]})"
    for k, v in expected.items():
        if state[k].shape != v.shape or state[k].dtype != v.dtype:
            return (f"{weights.name}: {k} is {state[k].dtype} {tuple(state[k].shape)}, the "
                    f"model's {v.dtype} {tuple(v.shape)}")
    model.load_state_dict(state)
    return meta
