"""Many tasks on one base: per-task delta file size and in-place switch time.

For each backbone (random weights: sizes and timings do not depend on training) it
builds one task delta per method, each with every trainable parameter of the method
moved away from its initial value (so every tensor the method can change is
stored):

* ``swr 5%``: a random selection filling a 5% budget (``swr.export_task_delta``),
* ``lora 5%``, ``bitfit``, ``norm``, ``linear``, ``full``: prepared by
  ``swr.methods`` at the same budget, folded, and exported as ``W_task - W_base``
  (``swr.export``),

adds them all to one task store (``swr.store``) and measures

* the delta file size, and its ratio to the base weights file,
* ``set_task`` time, in place: merging each task into the plain base and
  unmerging it again (restoring the saved tensors), medians over rounds; a switch
  from A to B is unmerge(A) + merge(B). The deltas are read from disk once, on the
  first merge,
* the time to get the same task model without a store: read the base weights and
  apply the delta (``create_backbone`` + ``apply_task_delta``),

and checks that every switched model's outputs equal the rebuilt model's exactly.

    python benchmarks/store.py [--quick] [--rounds N] [--threads N] [--no-doc]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch

from _common import machine, md_table, median, print_table, spread, timed, write_section

BACKBONES = {
    "bcresnet-2": (1, 40, 101),
    "timm:resnet10t": (3, 32, 32),
    "timm:resnet50": (3, 32, 32),
}
CLASSES = 12
BUDGET = "5%"
METHODS = ["lora", "bitfit", "norm", "linear", "full"]


class _Task:
    """What ``Method.prepare`` reads from a task: its class count."""

    num_classes = CLASSES
    class_names = [f"c{i}" for i in range(CLASSES)]


@torch.no_grad()
def _moved(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(torch.randn(p.shape, generator=g) * 0.01)


def make_deltas(backbone: str, base: torch.nn.Module, folder: Path) -> dict[str, Path]:
    """One task delta file per method for ``base`` (see the module docstring)."""
    from swr import budget as budget_mod
    from swr.delta import export_task_delta
    from swr.export import delta_from_folded, write_task_delta
    from swr.methods import get_method
    from swr.reparam import set_selection, set_trainable
    from swr.supernet import build_supernet

    from _common import random_selections

    files: dict[str, Path] = {}
    supernet = build_supernet(base, CLASSES)
    selection = random_selections(supernet, 1, seed=0, budget=BUDGET)[0]
    set_selection(supernet, list(selection))
    _moved(set_trainable(supernet, deltas=list(selection), norms=True, head=True), seed=1)
    files["swr 5%"] = folder / "swr.safetensors"
    export_task_delta(supernet, files["swr 5%"], backbone=backbone)
    budget_params = budget_mod.resolve_budget(base, BUDGET)
    for i, name in enumerate(METHODS):
        method = get_method(name)
        model = method.prepare(copy.deepcopy(base), _Task(), budget_params)
        _moved(method.trainable_parameters(model), seed=2 + i)
        folded = method.fold(model)
        label = f"{name} 5%" if method.respects_budget else name
        files[label] = folder / f"{name}.safetensors"
        write_task_delta(delta_from_folded(base, folded), files[label], base=base,
                         backbone=backbone, extra={"method": name})
    return files


def measure(backbone: str, shape: tuple[int, ...], rounds: int) -> tuple[list[list], str]:
    from swr.delta import apply_task_delta
    from swr.store import TaskStore
    from swr.tasks.backbones import create_backbone

    torch.manual_seed(0)
    base = create_backbone(backbone, num_classes=CLASSES).eval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = make_deltas(backbone, base, tmp)
        store = TaskStore.create(tmp / "store", base, backbone)
        names = {label: label.replace(" ", "-").replace("%", "pct") for label in files}
        for label, path in files.items():
            store.add(path, name=names[label])
        base_bytes = (tmp / "store" / "base.safetensors").stat().st_size
        model = store.load()
        x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
        first = {}
        for label in files:  # the first visit reads the delta file
            first[label] = timed(lambda: model.set_task(names[label]))
            model.set_task(None)
        merge: dict[str, list[float]] = {label: [] for label in files}
        unmerge: dict[str, list[float]] = {label: [] for label in files}
        for _ in range(rounds):
            for label in files:
                merge[label].append(timed(lambda: model.set_task(names[label])))
                unmerge[label].append(timed(lambda: model.set_task(None)))
        for label, path in files.items():
            reload = [timed(lambda: apply_task_delta(
                create_backbone(backbone, weights=tmp / "store" / "base.safetensors"), path))
                for _ in range(max(3, rounds // 3))]
            rebuilt = apply_task_delta(
                create_backbone(backbone, weights=tmp / "store" / "base.safetensors"), path).eval()
            with torch.no_grad():
                model.set_task(names[label])
                exact = torch.equal(model(x), rebuilt(x))
            nbytes = path.stat().st_size
            rows.append([backbone, label, nbytes, 100.0 * nbytes / base_bytes,
                         1e3 * first[label], 1e3 * median(merge[label]),
                         spread([1e3 * t for t in merge[label]]), 1e3 * median(unmerge[label]),
                         1e3 * median(reload), exact])
    return rows, f"`{backbone}`: base weights file {base_bytes:,} bytes"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="bcresnet-2 and resnet10t, 5 rounds")
    ap.add_argument("--rounds", type=int, default=None, help="switch rounds (default 15; 5 quick)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (5 if args.quick else 15)
    backbones = list(BACKBONES)[:2] if args.quick else list(BACKBONES)
    info = machine()
    rows, notes = [], []
    for backbone in backbones:
        r, note = measure(backbone, BACKBONES[backbone], rounds)
        rows += r
        notes.append(note)
    headers = ["backbone", "task delta", "file bytes", "% of base file", "first merge (ms)",
               "merge (ms)", "merge range (ms)", "unmerge (ms)", "reload + apply (ms)",
               "outputs identical"]
    print_table(headers, rows)
    if args.no_doc:
        return
    body = (f"Random-initialised models, {CLASSES}-class task heads, {args.threads} torch "
            f"thread(s). One task store per backbone holds one task delta per method, every "
            f"trainable parameter of the method moved (so each delta holds everything the "
            f"method can change). `merge`: `MultiTaskModel.set_task(task)` in place on the "
            f"plain base, `unmerge`: `set_task(None)` back to the base, medians over {rounds} "
            f"rounds (`first merge` also reads the delta file); switching from task A to B "
            f"costs unmerge(A) + merge(B). "
            f"`reload + apply`: reading the base weights and applying the delta "
            f"(`create_backbone` + `apply_task_delta`), what a switch costs without a store. "
            f"`outputs identical`: the switched model's outputs equal the rebuilt task "
            f"model's bit for bit (`torch.equal`).\n\n"
            + md_table(headers, rows) + "\n\n" + "\n".join(f"- {n}" for n in notes)
            + "\n- A method's delta is stored in folded form, `W_task - W_base` for every tensor "
            "it changed: LoRA at 5% adapts every convolution here, so its delta is as large as "
            "the base (its own factors, `stored_bytes` in `swr bench`, are smaller but need the "
            "LoRA modules at inference); SWR's, BitFit's, norm tuning's and the linear probe's "
            "hold only what they changed.\n- Merge and unmerge touch only the tensors in the "
            "delta, so their cost follows the delta's size; reloading costs the whole base "
            "every time. The machine was shared with other jobs (load average in the stamp): "
            "the ranges show the noise.")
    write_section("store", "Task store: delta size and switch time (`benchmarks/store.py`)",
                  body, info)


if __name__ == "__main__":
    main()
