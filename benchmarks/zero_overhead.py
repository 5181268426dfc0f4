"""Zero inference overhead: the folded SWR task model against the base model and the
PETL methods that keep extra modules at inference.

For each backbone (random weights: timing does not depend on training) it builds

* ``base``: the backbone with a task head,
* ``swr (folded)``: a supernet with random nonzero deltas on a random selection that
  fills a 5% budget, folded with ``swr.fold`` (must cost exactly what ``base`` costs),
* ``swr (not folded)``: the same supernet before folding (``W + dW`` every call),
* ``lora (unmerged)``, ``adapter-par`` and, on the ViT, ``vpt-shallow`` / ``vpt-deep``,
  each sized to the same budget by ``swr.methods`` (VPT also at 10 prompt tokens),

and measures per-sample FLOPs (``swr.flops.count_flops``) and eval-mode latency at batch
1 and 64. Latencies are timed round-robin, one model after another in every round, and
each model's ratio to ``base`` is the median over rounds of the ratio measured in the
same round.

    python benchmarks/zero_overhead.py [--quick] [--threads N] [--no-doc]
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch

from _common import machine, md_table, median, print_table, spread, timed, write_section

BACKBONES = {
    "bcresnet-2": ((1, 40, 101), {}),
    "timm:resnet10t": ((3, 32, 32), {}),
    "timm:vit_tiny_patch16_224": ((3, 32, 32), {"img_size": 32}),
}
CLASSES = 12
BUDGET = "5%"


def example_task(shape: tuple[int, ...]):
    """A task object with the right input shape and class count (methods read both)."""
    from swr.tasks.base import Task, tensor_split

    g = torch.Generator().manual_seed(0)
    split = tensor_split(torch.randn(8, *shape, generator=g), torch.arange(8) % CLASSES)
    return Task(id="example", modality="image", class_names=[f"c{i}" for i in range(CLASSES)],
                train=split, val=split, test=split, input_shape=shape)


def swr_models(base: torch.nn.Module, seed: int = 0) -> tuple[dict, dict]:
    """(models, facts): the folded and the unfolded SWR model for a ~5% random selection."""
    from swr.budget import resolve_budget
    from swr.fold import fold, same_architecture
    from swr.reparam import candidates, reparam_layers, set_selection
    from swr.supernet import build_supernet

    supernet = build_supernet(base, CLASSES)
    budget = resolve_budget(supernet, BUDGET)
    rng = np.random.default_rng(seed)
    cands = candidates(supernet)
    chosen, left = [], budget
    for i in rng.permutation(len(cands)):  # random layers while they fit: fills the budget
        if cands[i].params <= left:
            chosen.append(cands[i].name)
            left -= cands[i].params
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, layer in reparam_layers(supernet).items():
            scale = layer.base_layer.weight.std() * 0.1 + 1e-3
            layer.delta.copy_(torch.randn(layer.delta.shape, generator=g) * scale)
    set_selection(supernet, chosen)
    supernet.eval()
    folded = fold(supernet).eval()
    plain = copy.deepcopy(base)
    plain.reset_classifier(CLASSES)
    facts = {"budget": budget, "selected_params": budget - left, "layers": len(chosen),
             "same_architecture": same_architecture(folded, plain)}
    return {"swr (folded)": folded, "swr (not folded)": supernet}, facts


def method_model(name: str, base: torch.nn.Module, task, budget: int, **knobs):
    """A method's inference model at ``budget`` (zero-initialised parts made nonzero)."""
    from swr.methods import get_method

    method = get_method(name, **knobs)
    torch.manual_seed(0)
    model = method.prepare(copy.deepcopy(base), task, budget).eval()
    with torch.no_grad():  # LoRA's B and the adapters' up-projections start at zero
        for pname, p in model.named_parameters():
            if p.abs().sum() == 0 and ("lora_B" in pname or ".up." in pname):
                p.normal_(0.0, 0.01)
    return model, method.settings()


def build(backbone: str) -> tuple[dict, dict, tuple]:
    from swr.tasks.backbones import create_backbone

    shape, kw = BACKBONES[backbone]
    torch.manual_seed(0)
    base = create_backbone(backbone, num_classes=CLASSES, **kw).eval()
    models, facts = swr_models(base)
    task = example_task(shape)
    budget = facts["budget"]
    plans = [("lora (unmerged)", "lora", {}), ("adapter-par", "adapter-par", {})]
    if "vit" in backbone:
        plans += [("vpt-shallow", "vpt-shallow", {}), ("vpt-deep", "vpt-deep", {}),
                  ("vpt-shallow, 10 tokens", "vpt-shallow", {"length": 10})]
    settings = {}
    for label, method, knobs in plans:
        try:
            models[label], settings[label] = method_model(method, base, task, budget, **knobs)
        except Exception as e:  # a method that cannot adapt this backbone is reported, not fatal
            settings[label] = f"n/a: {str(e).splitlines()[0][:90]}"
    # an identical copy of base: its ratio is the measurement's own noise
    all_models = {"base": base, "base (copy)": copy.deepcopy(base), **models}
    return all_models, {**facts, "settings": settings}, shape


def latencies(models: dict, x: torch.Tensor, rounds: int, target_s: float,
              max_call_s: float = 2.0) -> dict[str, list]:
    """Per-call seconds of each model, ``rounds`` times, models interleaved per round.

    A model whose single call takes over ``max_call_s`` is timed once, not per round.
    """
    iters = {}
    out: dict[str, list] = {}
    with torch.inference_mode():
        for name, m in models.items():
            t = timed(lambda: m(x))  # warm-up (allocator, oneDNN primitive cache)
            if t > max_call_s:
                out[name] = [t]
                continue
            m(x)
            t = timed(lambda: m(x))
            iters[name] = max(1, int(target_s / max(t, 1e-6)))
            out[name] = []
        for r in range(rounds):
            order = list(iters) if r % 2 == 0 else list(iters)[::-1]
            for name in order:
                m, n = models[name], iters[name]
                out[name].append(timed(lambda: [m(x) for _ in range(n)]) / n)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds (about a minute)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: see docs/PERFORMANCE.md)")
    ap.add_argument("--backbones", default=",".join(BACKBONES))
    ap.add_argument("--no-doc", action="store_true", help="print only; leave the doc alone")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from swr.flops import count_flops

    rounds = 3 if args.quick else 11
    target = 0.03 if args.quick else 0.05
    info = machine()
    headers = ["backbone", "model", "FLOPs/sample", "FLOPs ratio", "latency b=1 (ms)",
               "ratio b=1", "latency b=64 (ms)", "ratio b=64", "ratio range b=64"]
    rows, notes = [], []
    for backbone in args.backbones.split(","):
        models, facts, shape = build(backbone)
        flops = {n: count_flops(m, torch.randn(1, *shape)) for n, m in models.items()}
        lat = {b: latencies(models, torch.randn(b, *shape), rounds, target * (1 if b == 1 else 3))
               for b in (1, 64)}
        for name in models:
            row = [backbone, name, f"{flops[name]:,}", round(flops[name] / flops["base"], 3)]
            for b in (1, 64):
                ts, base_ts = lat[b][name], lat[b]["base"]
                if len(ts) == 1 and rounds > 1:  # too slow to repeat: one call, against the median
                    row += [f"{ts[0] * 1e3:,.0f} (1 call)", round(ts[0] / median(base_ts), 1)]
                    row += ["-"] if b == 64 else []
                    continue
                ratio = [t / tb for t, tb in zip(ts, base_ts)]
                row += [round(median(ts) * 1e3, 3 if b == 1 else 2), round(median(ratio), 2)]
                row += [spread(ratio)] if b == 64 else []
            rows.append(row)
        print_table(headers, [r for r in rows if r[0] == backbone])
        sizes = "; ".join(f"{k}: {v}" for k, v in facts["settings"].items())
        notes.append(f"- `{backbone}`: budget {facts['budget']:,} parameters (5%); SWR opened "
                     f"{facts['layers']} layers, {facts['selected_params']:,} delta parameters; "
                     f"folded model has the base architecture: {facts['same_architecture']}. "
                     f"Method sizes at this budget: {sizes}.")
    if args.no_doc:
        return
    body = (f"Random-initialised models, {CLASSES} classes, eval mode, `torch.inference_mode`, "
            f"{args.threads} torch thread(s). Latency: median per call over {rounds} rounds "
            "(models interleaved in every round); ratios: median over rounds of the ratio to "
            "`base` timed in the same round; `ratio range` is its min-max over the rounds, "
            "the noise floor of this machine.\n\n"
            + md_table(headers, rows) + "\n\n" + "\n".join(notes))
    write_section("zero_overhead", "Zero inference overhead (`benchmarks/zero_overhead.py`)",
                  body, info)


if __name__ == "__main__":
    main()
