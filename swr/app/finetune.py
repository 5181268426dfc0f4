"""``swr finetune --selection``: train a selection written by ``swr search``, fold, export.

SWR's stage 3 itself is the method's (:class:`swr.methods.swr.SWR`: the linear probe
first, then the selected deltas, the task norms when the budget holds them and the
head from it, the better of the two on validation); this module reads and checks the
selection file and runs it as every bench row is run, so a fine-tuned selection and
a bench row are trained, folded, checked and exported by the same code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..budget import NORM_MODES, backbone_params
from ..errors import SwrError
from ..io import check_output, check_run_folder, read_json, run_folder, write_json
from ..methods import run_method
from ..methods.base import default_lr
from ..methods.swr import SWR
from ..runlog import TRAINING_LOGS
from ..source import BaseSpec, DataOverride, load_base, load_task
from ..tasks import task_data_path
from ..train import TrainConfig, steps_in_an_epoch

#: Optimizer steps below which ``swr finetune`` suggests more epochs: a final training
#: of a few dozen steps leaves small tasks clearly short of what the selection reaches.
SUGGESTED_STEPS = 240

#: Every file ``finetune`` writes: the run folder it replaces may hold only these.
OUTPUTS = {"task_delta.safetensors", "model.safetensors", "history.json", "metrics.json",
           *TRAINING_LOGS}


def finetune(selection_file: str | Path, out: str | Path, epochs: int = 20,
             lr: Optional[float] = None,
             batch_size: int = 64, seed: int = 0, device: str = "auto",
             init: str = "probe", from_scratch: bool = False, progress: bool = True,
             layers: Optional[list[str]] = None, on_bad_file: Optional[str] = None,
             overwrite: bool = False, probe_lr: Optional[float] = None,
             warmup: float = 0.1, data_override: Optional[DataOverride] = None) -> dict:
    """Final training of a selection written by ``swr search``; returns the metrics.

    The selection is trained by SWR's one stage 3 (:class:`swr.methods.swr.SWR`, run as
    every bench row is by :func:`swr.methods.run_method`): ``init="probe"`` (LP-FT,
    the default) or ``"supernet"`` (stage 1's deltas, norms and head, from the supernet
    the selection names); ``from_scratch`` is ``init="probe"``. ``on_bad_file``
    and ``data_override`` (image size and normalisation) default to those the search
    ran with. ``out`` is locked while the run goes on
    and replaced only once every file (live logs included) is written; one that holds
    an earlier run is refused unless ``overwrite``. The metrics are the bench row's
    keys plus the selection's.
    """

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
    if data_override is None:
        data_override = DataOverride.from_dict(sel.get("data_override"),
                                               f"selection file {selection_file}")
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
                         on_bad_file=on_bad_file or sel.get("on_bad_file") or "fail",
                         override=data_override)
        init = "probe" if from_scratch else init
        supernet_file = None
        if init == "supernet":
            # never a silent fallback to another start: that is --init probe
            named = sel.get("supernet")
            if not isinstance(named, str) or not named:
                raise SwrError(f"selection file {selection_file} names no supernet to start from; "
                               "re-run swr search or use --init probe")
            supernet_file = Path(named) / "supernet.safetensors"
            if not supernet_file.is_file():
                raise SwrError(f"the supernet {supernet_file} named in {selection_file} is gone "
                               "(a cleared or moved cache?); re-run swr search or use "
                               "--init probe")
        lr = default_lr(SWR.lr_family, meta["backbone"]) if lr is None else lr
        # the selection must fit the budget it was searched under: SWR checks it (norms
        # counted as the selection says) before anything trains
        method = SWR(selection=chosen, norms=norms_mode, norms_trained=norms_trained, init=init,
                     supernet_file=str(supernet_file) if supernet_file else None, seed=seed,
                     device=device, warmup=warmup,
                     probe_lr=default_lr("head", meta["backbone"]) if probe_lr is None else probe_lr)
        cfg = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, device=device,
                          progress=progress, desc="finetune", log_dir=str(stage))
        row = run_method(method, base, task, budget, cfg, export=str(stage), export_model=True,
                         backbone=meta["backbone"])
        metrics = {
            **row, "delta_params": row["updated_params"] - row["norm_params"], "norms_trained": norms_trained, "layers": chosen,
            "task": sel["task"], "backbone": meta["backbone"], "epochs": epochs, "seed": seed,
            "lr": lr, "steps": epochs * steps_in_an_epoch(task.train, batch_size), "init": init,
            "policy": sel.get("policy"), "skipped_files": list(task.info.get("skipped", [])),
            "data_override": data_override.as_dict() if data_override else None,
        }
        write_json(stage / "metrics.json", metrics)
        return metrics

