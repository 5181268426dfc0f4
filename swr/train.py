"""Training and evaluation loops shared by pretraining, the supernet, final training
and every PETL method.

One readable loop: a config dataclass, the parameters to train passed in
explicitly, the best state on validation kept, every logged number named.
In-memory splits (``TensorDataset``) are batched by indexing the tensors directly,
which is many times faster than a DataLoader's per-sample path on small inputs.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .errors import SwrError
from .progress import report_status
from .runlog import RunLog


#: Seeds go to torch, numpy and Python's ``random`` alike; numpy's legacy seeding (and
#: so every RNG a run uses) takes 32 bits.
MAX_SEED = 2**32 - 1


def check_seed(seed: int, option: str = "--seed") -> int:
    """``seed`` if every RNG of a run accepts it (an integer in [0, 2**32 - 1]), else
    :class:`SwrError`."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise SwrError(f"{option} {seed} must be an integer from 0 to {MAX_SEED}")
    return seed


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; a device this machine cannot train on
    (``cuda`` without a GPU, ``cuda:N`` past the last GPU, ``meta``, ``mps`` off a Mac...)
    is an error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SwrError(f"--device {device}: no CUDA GPU is visible; use --device cpu or auto")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise SwrError(f"--device {device!r} is not a device (cpu, cuda, cuda:N, auto)") from None
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SwrError(f"--device {device}: only {torch.cuda.device_count()} CUDA GPU(s) are "
                       f"visible (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    mps = getattr(torch.backends, "mps", None)
    if dev.type == "cpu" or dev.type == "cuda" or (dev.type == "mps" and mps is not None
                                                    and mps.is_available()):
        return dev
    raise SwrError(f"--device {device!r} cannot run training on this machine; use cpu, "
                   f"cuda, cuda:N or auto")


def batches(ds: Dataset, batch_size: int, shuffle: bool = False,
            generator: Optional[torch.Generator] = None, workers: int = 0,
            pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` batches; tensors are sliced directly for in-memory splits.

    A :class:`~torch.utils.data.DataLoader` is iterated as it is (its own batch size,
    order and workers). Other datasets (files decoded per sample) are loaded by
    ``workers`` processes, into pinned memory with ``pin_memory`` (for a GPU); the
    order depends only on ``generator``, not on the number of workers."""
    if isinstance(ds, DataLoader):
        yield from ds
        return
    if isinstance(ds, TensorDataset):
        x, y = ds.tensors[0], ds.tensors[1]
        n = len(x)
        order = torch.randperm(n, generator=generator) if shuffle else None
        for i in range(0, n, batch_size):
            if order is None:
                yield x[i:i + batch_size], y[i:i + batch_size]
            else:
                idx = order[i:i + batch_size]
                yield x[idx], y[idx]
        return
    yield from DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=generator,
                          num_workers=workers, pin_memory=pin_memory)


#: ``precision`` values: ``auto`` is bf16 autocast on a CUDA GPU that supports it, fp16
#: (with loss scaling) on other CUDA GPUs, fp32 elsewhere; ``$SWR_PRECISION`` overrides
#: ``auto`` (e.g. ``SWR_PRECISION=fp32`` for a GPU run in full precision).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision a run trains in on ``device`` (``fp32``, ``bf16`` or ``fp16``)."""
    if precision == "auto":
        precision = os.environ.get("SWR_PRECISION", "auto")
    if precision not in PRECISIONS:
        raise SwrError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)} "
                       f"(check $SWR_PRECISION)")
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and device.type != "cuda":
        raise SwrError(f"precision fp16 needs a CUDA device, not {device}; use bf16 or fp32")
    return precision


def autocast(device: torch.device, precision: str):
    """The autocast context of a resolved ``precision`` (nothing for fp32): matmuls and
    convolutions in half precision, reductions, norms and the loss in fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def loader_workers(requested: Optional[int], ds, device: torch.device) -> int:
    """DataLoader processes for ``ds``: ``requested``, or by default up to 8 for a dataset
    decoded from files on a GPU run (in-memory splits and CPU runs: 0, the CPU cores
    are busy training)."""
    if requested is not None:
        if requested < 0:
            raise SwrError(f"loader workers {requested} must be 0 or more")
        return requested
    if device.type != "cuda" or isinstance(ds, (TensorDataset, DataLoader)):
        return 0
    return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else os.cpu_count() or 1)


@torch.inference_mode()
def evaluate(model: nn.Module, ds: Dataset, device: torch.device | str = "cpu",
             batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on ``ds``."""
    device = resolve_device(device)
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in batches(ds, batch_size):
        pred = model(x.to(device)).argmax(-1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    model.train(was_training)
    return correct / max(total, 1)


def batchnorm_snapshot(modules) -> list[tuple]:
    """The running statistics and momentum of every BatchNorm among ``modules`` that
    tracks them (copies), for :func:`restore_batchnorm`."""
    return [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(),
             m.momentum) for m in modules
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def freeze_batchnorm(model: nn.Module) -> None:
    """Put every BatchNorm into eval mode: normalise with, and keep, the base statistics."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


@torch.no_grad()
def restore_batchnorm(snapshot: list[tuple]) -> None:
    """Put back the statistics and momentum :func:`batchnorm_snapshot` took (in place)."""
    for m, mean, var, count, momentum in snapshot:
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        m.num_batches_tracked.copy_(count)
        m.momentum = momentum


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, ds: Dataset, n_batches: int = 4,
                          batch_size: int = 128, device: torch.device | str = "cpu",
                          seed: int = 0) -> None:
    """Recompute BatchNorm running statistics on a few training batches.

    A selection scored on the supernet changes the features every later BN sees, so
    the statistics accumulated under random gates are replaced by ones measured with
    this selection (cumulative average, ``momentum=None``).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats]
    if not bns:
        return
    device = resolve_device(device)
    saved = [(m.momentum, m.training) for m in bns]
    was_training = model.training
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    g = torch.Generator().manual_seed(seed)
    for i, (x, _) in enumerate(batches(ds, batch_size, shuffle=True, generator=g)):
        if i >= n_batches:
            break
        model(x.to(device))
    for m, (momentum, training) in zip(bns, saved):
        m.momentum = momentum
        m.train(training)
    model.train(was_training)


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run."""

    epochs: int = 10
    lr: float = 3e-3
    weight_decay: float = 0.0
    batch_size: int = 64
    label_smoothing: float = 0.0
    warmup_epochs: float = 0.0
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    desc: str = "train"
    #: ``auto`` (mixed precision on CUDA, fp32 elsewhere), ``fp32``, ``bf16`` or ``fp16``
    precision: str = "auto"
    #: DataLoader processes for file-backed datasets (None: see :func:`loader_workers`)
    loader_workers: Optional[int] = None
    #: folder for the per-epoch log (``epochs.csv`` and TensorBoard events, see
    #: :mod:`swr.runlog`); None writes nothing
    log_dir: Optional[str] = None

    def validate(self) -> "TrainConfig":
        if self.epochs < 1:
            raise SwrError(f"--epochs {self.epochs} must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise SwrError(f"learning rate {self.lr} must be positive")
        if self.batch_size < 1:
            raise SwrError(f"--batch-size {self.batch_size} must be at least 1")
        if self.precision not in PRECISIONS:
            raise SwrError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        return self


@dataclass
class TrainResult:
    val_acc: float
    best_epoch: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    #: what the run trained in (see :func:`resolve_precision`)
    precision: str = "fp32"

    def as_dict(self) -> dict:
        return asdict(self)


def _state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _as_task(task):
    """``task`` itself, or a ``(train, val)`` pair as the little of a Task training reads."""
    if isinstance(task, (tuple, list)):
        if len(task) != 2:
            raise SwrError(f"train takes a Task or a (train, val) pair of DataLoaders, got "
                           f"{len(task)} items")
        from types import SimpleNamespace

        return SimpleNamespace(train=task[0], val=task[1], train_transform=None)
    return task


def check_finite_weights(model: nn.Module, what: str, lr: float) -> None:
    """Raise :class:`SwrError` when a floating-point tensor of ``model`` (parameters and
    buffers) holds NaN or infinite values: a run that diverged, checked before anything
    of it is written. ``what`` names the run; ``lr`` is its learning rate."""
    bad = [k for k, t in model.state_dict().items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise SwrError(f"{what} diverged at learning rate {lr:g}: {len(bad)} tensor(s) of the "
                       f"trained model hold NaN or infinite values (e.g. {bad[0]}); nothing was "
                       "written: lower --lr")


def steps_in_an_epoch(train_split, batch_size: int) -> int:
    """Optimizer steps :func:`train` takes per epoch over ``train_split`` (the last batch
    may be short; a DataLoader keeps its own batches)."""
    return max(1, len(train_split) if isinstance(train_split, DataLoader)
               else math.ceil(len(train_split) / batch_size))


def train(model: nn.Module, task, params: Iterable[nn.Parameter], cfg: TrainConfig, *,
          before_batch: Optional[Callable[[int], None]] = None,
          regularizer: Optional[Callable[[], torch.Tensor]] = None,
          before_eval: Optional[Callable[[], None]] = None,
          on_epoch: Optional[Callable[[dict], None]] = None) -> TrainResult:
    """Train ``params`` of ``model`` on ``task.train`` and keep the best state on ``task.val``.

    Args:
        params: exactly the parameters to update (others keep ``requires_grad`` as set
            by the caller; they receive no optimizer step).
        before_batch: called with the global step before each batch (e.g. the
            supernet samples its open gates here).
        regularizer: an extra loss term (e.g. TAPS' sparsity penalty).
        before_eval: called before each validation (e.g. fix the gates to a selection).
        on_epoch: called with each epoch's record (for logging / checkpoints).

    ``task`` is a :class:`~swr.tasks.base.Task` or a plain ``(train, val)`` pair of
    DataLoaders (or Datasets) yielding ``(x, y)`` batches.

    The model ends in the best validation state, in eval mode.
    """
    task = _as_task(task)
    cfg.validate()
    device = resolve_device(cfg.device)
    model.to(device)
    precision = resolve_precision(cfg.precision, device)
    workers = loader_workers(cfg.loader_workers, task.train, device)
    pin = device.type == "cuda"
    # fp16 needs loss scaling against underflowing gradients; bf16 has fp32's range
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    params = [p for p in params if p.requires_grad]
    if not params:
        raise SwrError("nothing to train: no parameter requires a gradient")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = steps_in_an_epoch(task.train, cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    warm = int(cfg.warmup_epochs * steps_per_epoch)

    def lr_at(step: int) -> float:  # linear warm-up, then cosine to zero
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # dropout and gate sampling draws
    best_acc, best_epoch, best_state = -1.0, -1, None
    history: list[dict] = []
    start = time.perf_counter()
    bar = _progress(total, cfg.desc, cfg.progress)
    runlog = RunLog(cfg.log_dir, "epochs", tag=cfg.desc) if cfg.log_dir else None
    step = 0
    for epoch in range(cfg.epochs):
        report_status(f"{cfg.desc} epoch {epoch + 1}/{cfg.epochs}")
        model.train()
        loss_sum = correct = seen = 0
        for x, y in batches(task.train, cfg.batch_size, shuffle=True, generator=g,
                            workers=workers, pin_memory=pin):
            if before_batch is not None:
                before_batch(step)
            x, y = x.to(device, non_blocking=pin), y.to(device, non_blocking=pin)
            if task.train_transform is not None:
                x = task.train_transform(x)
            with autocast(device, precision):
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
                if regularizer is not None:
                    loss = loss + regularizer()
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            sched.step()
            step += 1
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(-1) == y).sum())
            seen += len(y)
            bar.update(1)
        if before_eval is not None:
            before_eval()
        val_acc = evaluate(model, task.val, device)
        record = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
                  "train_acc": correct / max(seen, 1), "val_acc": val_acc,
                  "seconds": time.perf_counter() - start}
        history.append(record)
        bar.set_postfix(loss=f"{record['train_loss']:.3f}", val=f"{val_acc:.3f}")
        if runlog is not None:
            runlog.record(epoch + 1, {"phase": cfg.desc, "lr": cfg.lr * lr_at(step - 1),
                                      **{k: v for k, v in record.items() if k != "epoch"}})
        if on_epoch is not None:
            on_epoch(record)
        if val_acc > best_acc:
            best_acc, best_epoch, best_state = val_acc, epoch + 1, _state_of(model)
    bar.close()
    if runlog is not None:
        runlog.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return TrainResult(val_acc=best_acc, best_epoch=best_epoch,
                       seconds=time.perf_counter() - start, history=history, precision=precision)


#: Passes over the cached features :func:`fit_head` takes: a linear problem on a few
#: thousand feature vectors, so many passes cost less than one epoch of the backbone.
HEAD_EPOCHS = 100


@torch.no_grad()
def head_inputs(model: nn.Module, ds: Dataset, device: torch.device,
                batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """What the head of ``model`` (in eval mode) receives for every sample of ``ds``, and
    the labels: the frozen features a linear probe is fitted on."""
    from .tasks.heads import head_module

    head = head_module(model)
    if head is None:
        raise SwrError(f"{type(model).__name__} has no classifier head (get_classifier())")
    seen: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().float()))
    try:
        model.eval()
        labels = []
        for x, y in batches(ds, batch_size):
            model(x.to(device))
            labels.append(y)
    finally:
        hook.remove()
    return torch.cat(seen), torch.cat(labels).to(device)


def fit_head(model: nn.Module, task, cfg: TrainConfig, epochs: int = HEAD_EPOCHS) -> TrainResult:
    """Fit the head of ``model`` alone on its frozen features (the linear probe).

    The backbone runs once over ``task.train`` and ``task.val`` in eval mode (base
    BatchNorm statistics, no dropout, no augmentation); the head then trains ``epochs``
    passes over those features with AdamW at ``cfg.lr`` and a cosine schedule, keeping
    the state of best validation accuracy. The model ends with that head, in eval mode.
    """
    from .tasks.heads import head_module

    task = _as_task(task)
    cfg.validate()
    device = resolve_device(cfg.device)
    model.to(device)
    start = time.perf_counter()
    train_x, train_y = head_inputs(model, task.train, device)
    val_x, val_y = head_inputs(model, task.val, device)
    head = head_module(model)
    params = [p for p in head.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = epochs * max(1, math.ceil(len(train_x) / cfg.batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    g = torch.Generator().manual_seed(cfg.seed)

    def val_acc() -> float:
        with torch.no_grad():
            return float((head(val_x).argmax(-1) == val_y).float().mean()) if len(val_y) else 0.0

    best_acc, best_epoch, best_state = val_acc(), 0, copy.deepcopy(head.state_dict())
    history = []
    for epoch in range(epochs):
        order = torch.randperm(len(train_x), generator=g).to(device)
        loss_sum = 0.0
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            loss = F.cross_entropy(head(train_x[idx]), train_y[idx],
                                   label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(idx)
        acc = val_acc()
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / max(1, len(train_x)),
                        "val_acc": acc})
        if acc > best_acc:
            best_acc, best_epoch, best_state = acc, epoch + 1, copy.deepcopy(head.state_dict())
    runlog = RunLog(cfg.log_dir, "epochs", tag=cfg.desc) if cfg.log_dir else None
    if runlog is not None:  # one record for the whole fit: its passes cost next to nothing
        runlog.record(1, {"phase": f"{cfg.desc} (head on frozen features, {epochs} passes)",
                          "lr": cfg.lr, "train_loss": history[-1]["train_loss"] if history
                          else None, "val_acc": best_acc,
                          "seconds": time.perf_counter() - start})
        runlog.close()
    head.load_state_dict(best_state)
    model.eval()
    return TrainResult(val_acc=best_acc, best_epoch=best_epoch,
                       seconds=time.perf_counter() - start, history=history)


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kw) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from .progress import progress_bar

    return progress_bar(total, desc, "batch", leave=False)

