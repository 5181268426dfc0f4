"""Folding: turning a reparametrized model back into the plain base architecture.

Guarantees (tested in ``tests/test_fold.py``):

* ``fold(model)`` has the same module types, parameter count and state_dict keys as
  the unwrapped backbone, and its folded weights are computed with exactly the
  arithmetic the reparametrized forward uses (``W + g*dW`` in the parameters'
  dtype). In fp32 its outputs equal the reparametrized model's within 1e-5 max abs
  (in practice they are identical: the same kernels see the same weights).
* In bf16 the folded weight is the bf16-rounded sum, which is also what the
  reparametrized bf16 forward computes with, so the two bf16 models agree as in
  fp32; against an fp32 model both differ by bf16 rounding (about 1e-2 relative).
* ``merge``/``unmerge`` are in place and ``unmerge`` restores the supernet bit-exactly.
* ``fold_batchnorm`` folds eval-mode BatchNorm into the conv that feeds it, within
  1e-5 max abs of the unfolded model in fp32 for unit-scale activations (it
  re-associates floating-point products, so it is exact up to rounding, not bitwise).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .reparam import reparam_layers, replace_module


def merge(model: nn.Module) -> nn.Module:
    """Write ``W + g*dW`` into every wrapped layer's base weights, in place."""
    for layer in reparam_layers(model).values():
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge` exactly, restoring the supernet."""
    for layer in reparam_layers(model).values():
        layer.unmerge()
    return model


def fold(model: nn.Module) -> nn.Module:
    """A new plain model with the deltas of open gates folded into the base weights.

    The input model is left untouched (it remains a supernet). The result holds no
    ReparamLayer, no delta and no gate: it is exactly the base architecture.
    """
    folded = copy.deepcopy(model)
    with torch.no_grad():
        for name, layer in reparam_layers(folded).items():
            base = layer.base_layer
            w, b = layer.effective_weight()  # a merged layer's base already holds W + g*dW
            base.weight.copy_(w)
            if b is not None:
                base.bias.copy_(b)
            replace_module(folded, name, base)
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded


def architecture(model: nn.Module) -> dict[str, Any]:
    """What must match between a folded model and its base: types, keys, counts."""
    return {
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "state_keys": list(model.state_dict().keys()),
        "params": sum(p.numel() for p in model.parameters()),
    }


def same_architecture(a: nn.Module, b: nn.Module) -> bool:
    """True when ``a`` and ``b`` have identical module types, state_dict keys and sizes."""
    if architecture(a) != architecture(b):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return all(sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype for k in sa)


# -- BatchNorm folding for deployment -------------------------------------------------
def _conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """(conv, bn) pairs where the BN's input is exactly the conv's output tensor.

    Found by running ``example`` with hooks instead of tracing the graph, so it works
    on models that symbolic tracing cannot follow. A BN fed by a reshaped conv
    output (SubSpectralNorm) is not a pair: its statistics are not per conv channel.
    """
    produced: dict[int, str] = {}
    alive: list[torch.Tensor] = []  # ids are only unique while the tensors live
    pairs: list[tuple[str, str]] = []
    handles = []
    names = {m: n for n, m in model.named_modules()}

    def conv_hook(mod, inp, out):
        produced[id(out)] = names[mod]
        alive.append(out)

    def bn_pre_hook(mod, inp):
        src = produced.get(id(inp[0]))
        if src is not None:
            pairs.append((src, names[mod]))

    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            handles.append(m.register_forward_hook(conv_hook))
        if _foldable_bn(m):
            handles.append(m.register_forward_pre_hook(bn_pre_hook))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    # A conv or BN that runs more than once (shared module) cannot be folded safely.
    seen: dict[str, int] = {}
    for c, b in pairs:
        seen[c] = seen.get(c, 0) + 1
        seen[b] = seen.get(b, 0) + 1
    return [(c, b) for c, b in pairs if seen[c] == 1 and seen[b] == 1]


def _foldable_bn(m: nn.Module) -> bool:
    """Plain BatchNorm1d/2d, or timm's BatchNormAct2d (BN followed by drop + activation)."""
    if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d):
        return True
    return isinstance(m, nn.BatchNorm2d) and hasattr(m, "act") and hasattr(m, "drop")


@torch.no_grad()
def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """A copy of ``model`` (eval mode) with BatchNorm folded into the preceding convs.

    Each folded BN becomes ``nn.Identity`` and its conv gains a bias. This changes the
    architecture on purpose (fewer ops at deployment); use :func:`fold` for the
    architecture-preserving task model.
    """
    out = copy.deepcopy(model).eval()
    pairs = _conv_bn_pairs(out, example)
    for conv_name, bn_name in pairs:
        conv = out.get_submodule(conv_name)
        bn = out.get_submodule(bn_name)
        if bn.running_mean is None or not bn.track_running_stats:
            continue
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else \
            1.0 / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale if bn.affine else -bn.running_mean * scale
        w = conv.weight * scale.reshape(-1, *([1] * (conv.weight.dim() - 1)))
        b = shift if conv.bias is None else conv.bias * scale + shift
        conv.weight.copy_(w)
        if conv.bias is None:
            conv.bias = nn.Parameter(b.clone())
        else:
            conv.bias.copy_(b)
        # what follows the normalisation inside a fused BN+act module stays in place
        rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None))
                if m is not None and not isinstance(m, nn.Identity)]
        replace_module(out, bn_name, nn.Sequential(*rest) if rest else nn.Identity())
    return out


#: Largest fold error accepted in fp32, relative to the outputs' scale (at least 1).
FOLD_TOLERANCE = 1e-5


def fold_tolerance(dtype: torch.dtype, scale: float) -> float:
    """Accepted fold error: :data:`FOLD_TOLERANCE` in fp32, ten rounding steps in lower
    precision, times the outputs' scale when it is above 1."""
    eps = FOLD_TOLERANCE if dtype == torch.float32 else 10 * torch.finfo(dtype).eps
    return eps * max(1.0, scale)


@torch.no_grad()
def fold_check(model: nn.Module, example: torch.Tensor, seed: int = 0,
               gate_p: float = 0.5, bias_delta: bool = True) -> dict[str, Any]:
    """Self-check on a plain model: random deltas behind random gates, fold, compare.

    Returns ``max_abs_diff`` between the reparametrized and folded outputs (eval
    mode), its ``tolerance`` (:func:`fold_tolerance`), ``same_architecture`` against the
    unwrapped model, the gates opened, and ``ok`` (within tolerance, same architecture).
    """
    from .reparam import reparametrize, sample_gates

    base = copy.deepcopy(model).eval()
    supernet = reparametrize(copy.deepcopy(base), bias_delta=bias_delta).eval()
    g = torch.Generator().manual_seed(seed)
    for layer in reparam_layers(supernet).values():
        scale = layer.base_layer.weight.float().std().nan_to_num(0.0) * 0.1 + 1e-3
        layer.delta.copy_(torch.randn(layer.delta.shape, generator=g) * scale)
        if layer.delta_bias is not None:
            layer.delta_bias.copy_(torch.randn(layer.delta_bias.shape, generator=g) * scale)
    opened = sample_gates(supernet, gate_p, generator=g)
    folded = fold(supernet)
    y_super = supernet(example)
    y_fold = folded(example)
    y_base = base(example)
    diff = float((y_super - y_fold).abs().max())
    tolerance = fold_tolerance(y_super.dtype, float(y_super.abs().max()))
    same = same_architecture(folded, base)
    return {
        "max_abs_diff": diff,
        "tolerance": tolerance,
        "ok": diff <= tolerance and same,
        "same_architecture": same,
        "gates_open": len(opened),
        "layers": len(reparam_layers(supernet)),
        # the deltas must actually change the output, or the check proves nothing
        "delta_effect": float((y_super - y_base).abs().max()),
    }
