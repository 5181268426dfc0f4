"""Stage 3: train only the selected deltas (+ task norms + head), fold, export.

Starts from the supernet's trained deltas, norms and head (they already fit the
task; ``from_scratch=True`` starts from zero deltas and a fresh head instead),
keeps the best state on validation, reports test accuracy, folds, checks the fold
against the trained model, and writes the task delta and the folded model.

The task norms train when the selection says so (``norms_trained``, decided by
``swr search --norms``; selection files written before it train them). When they do
not, the model keeps the base's norms and BatchNorm statistics, not the supernet's.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .budget import NORM_MODES, backbone_params, check_selection, cost_report
from .delta import export_task_delta
from .errors import BudgetError, SwrError
from .fold import fold, same_architecture
from .io import check_output, check_run_folder, read_json, run_folder, write_json
from .source import BaseSpec, load_base, load_task, task_preprocess
from .reparam import reparam_layers, restore_norms, set_selection, set_trainable, unwrap
from .runlog import TRAINING_LOGS
from .supernet import SupernetConfig, build_supernet, new_supernet
from .tasks import task_data_path
from .train import (TrainConfig, check_finite_weights, evaluate, freeze_batchnorm,
                    resolve_device, steps_in_an_epoch, train)

#: Optimizer steps below which ``swr finetune`` suggests more epochs. On
#: glyphs:fine?images=30,60,100 (360 training images, 6 batches an epoch; 1%, deltas
#: only, 20 selections) 240 steps in place of 60 raised the median final test accuracy
#: from 72.3% to 88.1% (docs/SEARCH.md).
SUGGESTED_STEPS = 240

#: Every file ``finetune`` writes: the run folder it replaces may hold only these.
OUTPUTS = {"task_delta.safetensors", "model.safetensors", "history.json", "metrics.json",
           *TRAINING_LOGS}


def finetune(selection_file: str | Path, out: str | Path, epochs: int = 20, lr: float = 3e-3,
             batch_size: int = 64, seed: int = 0, device: str = "auto",
             from_scratch: bool = False, progress: bool = True,
             layers: Optional[list[str]] = None, on_bad_file: Optional[str] = None,
             overwrite: bool = False) -> dict:
    """Final training of a selection written by ``swr search``; returns the metrics.

    ``on_bad_file`` defaults to the policy the search ran with. ``out`` is locked while
    the run goes on and replaced only once every file (live logs included) is
    written; one that holds an earlier run is refused unless ``overwrite``.
    """
    from .tasks.backbones import save_checkpoint

    sel = read_json(selection_file, "selection file")
    if not isinstance(sel, dict):
        raise SwrError(f"selection file {selection_file} is not a JSON object; write it with "
                       "swr search")
    for key in ("layers", "task", "budget_params"):
        if key not in sel:
            raise SwrError(f"selection file {selection_file} lacks {key!r}; write it with swr search")
    budget = sel["budget_params"]
    if not (isinstance(sel["layers"], list) and all(isinstance(n, str) for n in sel["layers"])
            and isinstance(sel["task"], str) and isinstance(sel.get("checkpoint") or "", str)
            and isinstance(budget, int) and not isinstance(budget, bool)):
        raise SwrError(f"selection file {selection_file} is malformed: 'layers' must be a list of "
                       "layer names, 'task' and 'checkpoint' strings, 'budget_params' an integer; "
                       "write it with swr search")
    if budget < 1:
        raise SwrError(f"selection file {selection_file} states budget_params {budget}: a budget "
                       "is a positive number of parameters; write it with swr search")
    # the base: a swr pretrain folder ('checkpoint') or a backbone + weights file ('base')
    if sel.get("base") is not None:
        spec = BaseSpec.from_dict(sel["base"], f"selection file {selection_file}")
    elif sel.get("checkpoint"):
        spec = BaseSpec(checkpoint=sel["checkpoint"])
    else:
        raise SwrError(f"selection file {selection_file} lacks 'checkpoint'; write it with "
                       "swr search")
    # files from before norms were counted lack these keys: norms trained, outside the budget
    norms_mode = sel.get("norms", "free")
    norms_trained = sel.get("norms_trained", True)
    if not isinstance(norms_trained, bool) or norms_mode not in NORM_MODES:
        raise SwrError(f"selection file {selection_file} is malformed: 'norms_trained' must be "
                       f"true or false and 'norms' one of {', '.join(NORM_MODES)}; write it with "
                       "swr search")
    chosen = list(sel["layers"]) if layers is None else layers
    # before any work: the run may not overwrite what it reads, nor a folder of other files
    check_output(out, {"--selection": selection_file,
                       "the selection's checkpoint": spec.checkpoint,
                       "the selection's weights": spec.weights,
                       "the selection's supernet": sel.get("supernet")
                       if isinstance(sel.get("supernet"), str) else None,
                       "the selection's task data": task_data_path(sel["task"])})
    check_run_folder(out, OUTPUTS)
    with run_folder(out, "finetune", OUTPUTS, overwrite=overwrite) as stage:
        base, meta = load_base(spec)
        total = backbone_params(base)
        if budget > total:  # a budget no search could state (swr search refuses it)
            raise SwrError(f"selection file {selection_file} states budget_params {budget}, above "
                           f"the backbone's {total} parameters (100%); write it with swr search")
        task = load_task(sel["task"], meta,
                         on_bad_file=on_bad_file or sel.get("on_bad_file") or "fail")
        # the new head is drawn from the seed: --from-scratch runs are reproducible too
        model = new_supernet(base, task.num_classes, SupernetConfig(seed=seed))
        report = cost_report(model, chosen)
        counted = report["norms"] if norms_trained and norms_mode in ("auto", "budget") else 0
        try:
            cost = check_selection(model, chosen, int(sel["budget_params"]) - counted)
        except BudgetError as e:
            if not counted:
                raise
            raise BudgetError(f"{e} (the budget of {sel['budget_params']} less the {counted} task "
                              "norm parameters it counts)") from None
        if not from_scratch:
            # never a silent fallback to zero deltas and a new head: that is --from-scratch
            named = sel.get("supernet")
            if not isinstance(named, str) or not named:
                raise SwrError(f"selection file {selection_file} names no supernet to start from; "
                               "re-run swr search or pass --from-scratch")
            supernet_weights = Path(named) / "supernet.safetensors"
            if not supernet_weights.is_file():
                raise SwrError(f"the supernet {supernet_weights} named in {selection_file} is gone "
                               "(a cleared or moved cache?); re-run swr search or pass "
                               "--from-scratch")
            try:
                model.load_state_dict(load_file(str(supernet_weights)))
            except (SafetensorError, OSError, RuntimeError) as e:
                raise SwrError(f"supernet {supernet_weights} named in {selection_file} does not load "
                               f"({str(e).splitlines()[0][:200]}); re-run swr search or pass "
                               "--from-scratch") from None
        if not norms_trained:  # the supernet's norms were trained in stage 1: keep the base's
            restore_norms(model, base)
        set_selection(model, chosen)
        if from_scratch:
            with torch.no_grad():
                for layer in reparam_layers(model).values():
                    layer.delta.zero_()
        # deltas of unselected layers stay in the model with closed gates: they are
        # neither trained nor exported
        params = set_trainable(model, deltas=chosen, norms=norms_trained, head=True)
        cfg = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, device=device,
                          progress=progress, desc="finetune", log_dir=str(stage))
        start = time.perf_counter()
        # untrained norms keep the base's BatchNorm statistics too, as every method's do
        result = train(model, task, params, cfg,
                       before_batch=None if norms_trained else lambda step: freeze_batchnorm(model))
        check_finite_weights(model, "the final training", lr)  # before anything is written
        dev = resolve_device(device)
        test_acc = evaluate(model, task.test, dev)
        model.cpu()
        folded = fold(model)
        plain = unwrap(build_supernet(base, task.num_classes))
        x = next(iter(torch.utils.data.DataLoader(task.val, batch_size=16)))[0]
        with torch.no_grad():
            fold_diff = float((model(x) - folded(x)).abs().max())
        shift_test_acc = evaluate(folded, task.shift_test) if task.shift_test is not None else None
        delta_bytes = export_task_delta(model, stage / "task_delta.safetensors",
                                        backbone=meta["backbone"],
                                        budget_params=int(sel["budget_params"]), task=sel["task"],
                                        extra={"method": "swr", "classes": list(task.class_names),
                                               "preprocess": task_preprocess(task)})
        save_checkpoint(folded, stage / "model.safetensors", backbone=meta["backbone"],
                        task=sel["task"], classes=task.class_names)
        trained = cost + (report["norms"] if norms_trained else 0)
        metrics = {
            "test_acc": test_acc, "val_acc": result.val_acc, "shift_test_acc": shift_test_acc,
            # one quantity with the bench: every parameter trained outside the head
            "updated_params": trained, "trained_params": trained, "delta_params": cost,
            "budget_params": int(sel["budget_params"]),
            "norm_params": report["norms"] if norms_trained else 0, "norms": norms_mode,
            "norms_trained": norms_trained, "head_params": report["head"],
            "delta_bytes": delta_bytes, "seconds": time.perf_counter() - start,
            "fold_max_abs_diff": fold_diff, "same_architecture": same_architecture(folded, plain),
            "layers": chosen, "task": sel["task"], "backbone": meta["backbone"],
            "epochs": epochs, "best_epoch": result.best_epoch, "seed": seed,
            "steps": epochs * steps_in_an_epoch(task.train, batch_size),
            "from_scratch": from_scratch, "policy": sel.get("policy"),
            "skipped_files": list(task.info.get("skipped", [])),
        }
        write_json(stage / "history.json", result.history)
        write_json(stage / "metrics.json", metrics)
        return metrics

