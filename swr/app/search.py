"""``swr search`` (application layer): names to objects, then stage 1 and stage 2.

:func:`run_search` loads the checkpoint and task a :class:`SearchConfig` names,
builds the searcher by name from the registry in ``swr.policies``, and runs
:func:`swr.selection.search_selection` (stage 1 with its cache, then the search).
Outputs in ``out``: ``selection.json`` and what the searcher writes
(``search.csv``, ``search.png``, ``evaluations.jsonl``, the policy weights), and
``fingerprint.json``: what the search was made with (base weights and task data by
content hash, budget, policy, seed, evaluations, supernet settings), checked by
``--resume`` so that logged scores are only ever replayed into the same search. While
a search runs it holds ``out/.lock``: a second process writing the same ``out`` is
refused.

A list of budgets (``budget="1%,2%,5%,10%"``) is one search: stage 1 once, then
``evaluations`` distinct scorings in total across the budgets (pg trains one
budget-conditioned policy on all of them; the other searchers search each budget with
an equal share). Instead of ``selection.json``, ``out`` then holds one folder per budget
(``budget-1%/selection.json``, each a valid ``swr finetune --selection``) and
``selections.json``, the best score, cost and layers of every budget.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

from .. import tasks
from ..envs.evaluator import BN_CLIPS, PROXY_EPOCHS
from ..errors import SwrError
from ..io import check_rerun, left_as_found_on_refusal, out_lock, write_json
# the searchers by name; with each, SWR under it as method swr-<searcher>
from ..policies import SearchSettings, build_searcher, searcher_names
from ..selection import (Searcher, budget_folder, budget_list, check_search_val, search_selection,
                        supernet_settings)
from ..source import DataOverride, base_spec, load_base, load_task
from ..supernet import SupernetConfig


@dataclass
class SearchConfig:
    task: str
    checkpoint: str
    budget: str
    out: str
    policy: str = "pg"
    seed: int = 0
    evaluations: int = 40
    # 0: score in this process; N: N Ray workers (at most the CPUs available, see
    # swr.policies.ray_setup.resolve_workers); None: one per available CPU
    workers: Optional[int] = 0
    resume: bool = False
    #: replace the search an existing ``out`` holds (refused without it or ``resume``)
    overwrite: bool = False
    device: str = "auto"
    ray_address: Optional[str] = None
    samples_per_iteration: int = 8
    #: stage 1 on budget-feasible gate sets, the kind of selection the search scores, so
    #: the supernet is trained where it is asked to rank (experiments/SEARCH.md). A
    #: SupernetConfig passed here keeps its own gates (its default: "bernoulli")
    supernet: SupernetConfig = field(default_factory=lambda: SupernetConfig(gates="budget"))
    bn_batches: int = 4
    #: where a scoring takes BatchNorm statistics from (swr.envs.evaluator.BN_STATS)
    bn_stats: str = "val"
    #: with bn_stats "val": the clips of each validation batch the statistics come from
    #: (None: all; see swr.envs.evaluator.SupernetEvaluator)
    bn_clips: Optional[int] = BN_CLIPS
    progress: bool = True
    #: what a selection scores on the supernet: "loglik" or "accuracy" (see
    #: swr.envs.evaluator.SupernetEvaluator); loglik ranked final accuracy better
    #: (experiments/SEARCH.md, "Does the evaluator predict the final accuracy?")
    #: None: the evaluator's own (swr.envs.evaluator.EVALUATORS), see ``metric``
    reward: Optional[str] = None
    #: what scores a selection: "supernet" (its shared deltas) or "trained" (a short
    #: training of the selection's own deltas, ``proxy_epochs`` epochs; see
    #: swr.envs.evaluator.TrainedEvaluator)
    evaluator: str = "supernet"
    proxy_epochs: int = PROXY_EPOCHS
    on_bad_file: str = "fail"  # real-data tasks: "skip" drops unreadable files
    # the base as a backbone + weights file instead of a swr pretrain checkpoint
    backbone: Optional[str] = None
    weights: Optional[str] = None
    # how the task norms meet the budget (swr.budget.NORM_MODES, split_budget)
    norms: str = "auto"
    #: a training-memory budget beside the parameter budget (swr.budget.MemoryBudget:
    #: "30%" of full fine-tuning's saved bytes, or a size); None: parameters only
    train_memory: Optional[str] = None
    #: a user's image size and normalisation over the base's (--image-size, --mean, --std)
    data_override: Optional[DataOverride] = None

    def validate(self) -> "SearchConfig":
        if self.policy not in searcher_names():
            raise SwrError(f"--policy {self.policy!r} is not one of {', '.join(searcher_names())}")
        from ..train import check_seed

        check_seed(self.seed)
        if self.evaluations < 1:
            raise SwrError(f"--evaluations {self.evaluations} must be at least 1")
        from ..budget import Budget

        budgets = budget_list(self.budget)
        for b in budgets:  # each readable, before any work
            Budget.parse(b)
        if self.train_memory is not None:
            from ..budget import MemoryBudget

            MemoryBudget.parse(self.train_memory)
        if self.evaluations < len(budgets):
            raise SwrError(f"--evaluations {self.evaluations} is fewer than the {len(budgets)} "
                           "budgets of --budget; give at least one per budget")
        if self.workers is not None and self.workers < 0:
            raise SwrError(f"--workers {self.workers} must be 0 (no Ray) or more")
        if self.ray_address is not None:
            from ..policies.ray_setup import check_ray_address

            if self.workers == 0:
                raise SwrError(f"--ray-address {self.ray_address} with --workers 0: workers 0 "
                               "scores in this process, without Ray; drop one of the two")
            check_ray_address(self.ray_address)
        from ..budget import NORM_MODES

        if self.norms not in NORM_MODES:
            raise SwrError(f"--norms {self.norms!r} is not one of {', '.join(NORM_MODES)}")
        from ..envs.evaluator import METRICS

        if self.reward is not None and self.reward not in METRICS:
            raise SwrError(f"--reward {self.reward!r} is not one of {', '.join(METRICS)}")
        from ..envs.evaluator import EVALUATORS

        if self.evaluator not in EVALUATORS:
            raise SwrError(f"--evaluator {self.evaluator!r} is not one of "
                           f"{', '.join(EVALUATORS)}")
        if self.proxy_epochs < 1:
            raise SwrError(f"--proxy-epochs {self.proxy_epochs} must be at least 1")
        from ..envs.evaluator import BN_STATS

        if self.bn_stats not in BN_STATS:
            raise SwrError(f"--bn-stats {self.bn_stats!r} is not one of {', '.join(BN_STATS)}")
        if self.bn_clips is not None and self.bn_clips < 2:
            raise SwrError(f"--bn-clips {self.bn_clips} must be at least 2 (0: every clip "
                           "of the batch)")
        supernet = self.supernet
        if supernet.gates == "budget" and supernet.gate_budget_params < 1:
            supernet = replace(supernet, gate_budget_params=1)  # the search sets it from --budget
        supernet.validate()
        return self

    @property
    def metric(self) -> str:
        """What a selection scores by: ``reward``, else the evaluator's default."""
        from ..envs.evaluator import evaluator_metric

        return evaluator_metric(self.evaluator, self.reward)

    def searcher(self) -> Searcher:
        """The searcher this configuration names, with its settings."""
        return build_searcher(self.policy, SearchSettings(
            evaluations=self.evaluations, workers=self.workers, seed=self.seed,
            device=self.device, ray_address=self.ray_address,
            samples_per_iteration=self.samples_per_iteration, bn_batches=self.bn_batches,
            bn_stats=self.bn_stats, bn_clips=self.bn_clips, resume=self.resume,
            progress=self.progress, reward=self.metric, evaluator=self.evaluator,
            proxy_epochs=self.proxy_epochs))


def run_search(cfg: SearchConfig) -> dict:
    """Load the base (checkpoint or backbone + weights) and task named in ``cfg``, search,
    write ``selection.json``."""
    cfg.validate()
    if cfg.ray_address is not None:  # an address that is no Ray head: refused before any work
        from ..policies.ray_setup import check_head

        check_head(cfg.ray_address)
    spec = base_spec(cfg.checkpoint, cfg.backbone, cfg.weights)
    # before any work: another search there is refused now; a refusal before the first
    # scoring leaves --out as it was found
    # (taken back while the lock is held: nothing of another process is touched)
    with out_lock(cfg.out, "search"), left_as_found_on_refusal(cfg.out, ("evaluations.jsonl",)):
        # another search there is refused before the base and task are loaded
        check_rerun(cfg.out, "search", SEARCH_MARKERS, resume=cfg.resume,
                    overwrite=cfg.overwrite, resumable=True)
        base_model, ckpt_meta = load_base(spec)
        task = load_task(cfg.task, ckpt_meta, on_bad_file=cfg.on_bad_file,
                         override=cfg.data_override)
        result, _ = search(base_model, task, cfg, backbone=ckpt_meta["backbone"])
        result["checkpoint"] = str(Path(cfg.checkpoint).resolve()) if cfg.checkpoint else None
        result["base"] = spec.to_dict()
        result["task"] = cfg.task  # the spec, so swr finetune can load the same task
        result["reward"] = cfg.metric  # what val_score is, and what scored it
        result["evaluator"] = cfg.evaluator
        if cfg.evaluator == "trained":
            result["proxy_epochs"] = cfg.proxy_epochs
        # and where its BatchNorm statistics came from (those the supernet fixed, if any;
        # none for the trained evaluator, whose BatchNorms train or keep the supernet's)
        result["bn_stats"] = (None if cfg.evaluator == "trained"
                              else result["bn_stats"] or cfg.bn_stats)
        # and, for val-batch statistics, from how many clips of each batch (None: all)
        result["bn_clips"] = cfg.bn_clips if result["bn_stats"] == "val" else None
        result["on_bad_file"] = cfg.on_bad_file
        # swr finetune prepares the task the same way
        result["data_override"] = cfg.data_override.as_dict() if cfg.data_override else None
        result["skipped_files"] = list(task.info.get("skipped", []))
        if "budgets" not in result:
            write_json(Path(cfg.out) / "selection.json", result)
            return result
        shared = {k: result[k] for k in ("checkpoint", "base", "task", "reward", "evaluator",
                                         "bn_stats",
                                         "bn_clips", "on_bad_file", "data_override",
                                         "skipped_files")}
        for entry in result["budgets"]:
            entry.update(shared)
            folder = Path(cfg.out) / budget_folder(entry["budget"])
            folder.mkdir(parents=True, exist_ok=True)
            entry["selection_file"] = str(Path(budget_folder(entry["budget"])) / "selection.json")
            write_json(folder / "selection.json", {k: v for k, v in entry.items()
                                                   if k != "selection_file"})
        summary = {k: v for k, v in result.items() if k != "budgets"}
        summary["budgets"] = [{k: e[k] for k in ("budget", "budget_params", "val_score", "cost",
                                                 "norms_trained", "updated_params", "layers",
                                                 "selection_file")}
                              for e in result["budgets"]]
        write_json(Path(cfg.out) / "selections.json", summary)
    return result


def search(base_model, task, cfg: SearchConfig, backbone: str) -> tuple[dict, object]:
    """Stage 1 + stage 2 on an in-memory model and task; returns (result, supernet)."""
    from ..policies.ray_setup import resolve_workers
    from ..runlog import reset as reset_runlog

    cfg.validate()
    check_search_val(task)  # before anything is written to --out or Ray is joined
    # at most the CPUs there are; joining a cluster here fails before stage 1
    cfg.workers = resolve_workers(cfg.workers, cfg.ray_address)
    searcher = cfg.searcher()
    supernet = replace(supernet_settings(cfg.supernet, cfg.seed, cfg.device, cfg.progress),
                       log_dir=str(cfg.out))
    with out_lock(cfg.out, "search"):
        # before stage 1: another search there is refused at once, unless resumed or replaced
        check_rerun(cfg.out, "search", SEARCH_MARKERS, resume=cfg.resume,
                    overwrite=cfg.overwrite, resumable=True)
        check_fingerprint(Path(cfg.out), search_fingerprint(base_model, task, cfg), cfg.resume)
        if not cfg.resume:  # a resumed search reuses the cached supernet and keeps its log
            reset_runlog(cfg.out, ("epochs",))
        return search_selection(base_model, task, cfg.budget, searcher, supernet, cfg.out,
                                backbone, norms=cfg.norms, train_memory=cfg.train_memory)


#: The files a search leaves in its ``--out``: a folder holding one holds a search.
SEARCH_MARKERS = ("fingerprint.json", "evaluations.jsonl", "selection.json", "selections.json")


#: How each fingerprint entry is named to the user, in the order differences are listed.
FINGERPRINT_LABELS = {
    "base": "base weights (--checkpoint / --weights, by content hash)",
    "task": "--task", "task_data": "task data (by content hash)", "classes": "task classes",
    "budget_params": "--budget (in parameters)", "policy": "--policy", "seed": "--seed",
    "evaluations": "--evaluations", "samples_per_iteration": "--samples-per-iteration",
    "bn_batches": "bn_batches", "supernet_epochs": "--supernet-epochs", "norms": "--norms",
    "reward": "--reward", "supernet_gates": "--supernet-gates", "bn_stats": "--bn-stats",
    "bn_clips": "--bn-clips", "evaluator": "--evaluator", "proxy_epochs": "--proxy-epochs",
    "data_override": "--image-size/--mean/--std",
    "train_memory_bytes": "--train-memory (in bytes saved for backward)",
}


def search_fingerprint(base_model, task, cfg: SearchConfig) -> dict:
    """What a search's result depends on: the base weights and the task's data by content
    hash, the budget in parameters and how task norms count in it, the searcher and its
    settings, the supernet settings.
    Not the device, workers or Ray address: a resumed search may finish elsewhere."""
    from ..budget import Budget, backbone_params
    from ..source import state_hash

    # the gates' budget follows from budget_params; the default gates leave the
    # fingerprints of searches recorded before the option unchanged
    skip = ("seed", "device", "progress", "log_dir", "gate_budget_params")
    skip += ("gates",) if cfg.supernet.gates == "bernoulli" else ()
    supernet = {f"supernet_{k}": v for k, v in asdict(cfg.supernet).items() if k not in skip}
    # a list of budgets: the list in parameters (one budget: that number, as before)
    budget_params = [Budget.parse(b).resolve(backbone_params(base_model))
                     for b in budget_list(cfg.budget)]
    return {"base": state_hash(base_model), "task": task.id, "task_data": task.data_hash(),
            "classes": list(task.class_names),
            "budget_params": budget_params if len(budget_params) > 1 else budget_params[0],
            "norms": cfg.norms,
            "policy": cfg.policy, "seed": cfg.seed, "evaluations": cfg.evaluations,
            "samples_per_iteration": cfg.samples_per_iteration, "bn_batches": cfg.bn_batches,
            "reward": cfg.metric, "bn_stats": cfg.bn_stats, "bn_clips": cfg.bn_clips,
            # the default evaluator leaves the fingerprints of earlier searches unchanged
            **({} if cfg.evaluator == "supernet" else
               {"evaluator": cfg.evaluator, "proxy_epochs": cfg.proxy_epochs}),
            # likewise the base's own image size and normalisation
            **({"data_override": cfg.data_override.as_dict()} if cfg.data_override else {}),
            # and no memory budget
            **({} if cfg.train_memory is None else
               {"train_memory_bytes": train_memory_bytes(base_model, task, cfg)}),
            **supernet}


def train_memory_bytes(base_model, task, cfg: SearchConfig) -> int:
    """``cfg.train_memory`` in bytes: a percentage of full fine-tuning's saved bytes on the
    search's batch (:func:`swr.selection.full_finetune_saved_bytes`), or a size as given."""
    from ..budget import MemoryBudget
    from ..selection import full_finetune_saved_bytes
    from ..supernet import build_supernet

    wanted = MemoryBudget.parse(cfg.train_memory)
    if wanted.bytes is not None:
        return wanted.bytes
    probe = build_supernet(base_model, task.num_classes, bias_delta=cfg.supernet.bias_delta)
    return wanted.resolve(full_finetune_saved_bytes(probe, task, cfg.supernet.batch_size))


def check_fingerprint(out: Path, fingerprint: dict, resume: bool, command: str = "search",
                      state: str = "evaluations.jsonl",
                      labels: dict[str, str] = FINGERPRINT_LABELS) -> None:
    """Record ``fingerprint`` in ``out/fingerprint.json``, or on ``resume`` check it.

    A fresh run removes the resumable ``state`` file of an earlier run first, so that
    an interruption before its first record cannot leave old records under the new
    fingerprint. A resume refuses (:class:`SwrError`, one line saying what differs) a
    fingerprint that differs from the recorded one, and ``state`` without a readable
    fingerprint beside it.
    """
    path = out / "fingerprint.json"
    fix = "rerun without --resume to start afresh, or choose another --out"
    if resume and path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            old = None
        if not isinstance(old, dict):
            raise SwrError(f"--resume: {path} is damaged, so it cannot be checked that {out} "
                           f"holds this {command}; {fix}")
        differ = [k for k in fingerprint if old.get(k) != fingerprint[k]]
        differ += [k for k in old if k not in fingerprint]
        if differ:
            said = ", ".join(f"{labels.get(k, k.replace('_', ' '))}: {_shown(old.get(k))} there, "
                             f"{_shown(fingerprint.get(k))} now" for k in differ[:3])
            more = f" (and {len(differ) - 3} more)" if len(differ) > 3 else ""
            raise SwrError(f"--resume: {out} holds a {command} made with other settings ({said}"
                           f"{more}); {fix}")
        return
    if resume and (out / state).exists():
        raise SwrError(f"--resume: {out} holds {state} but no fingerprint.json (the settings "
                       f"it was made with), so it cannot be checked that it is this {command}; "
                       f"{fix}")
    if not resume and (out / state).exists():
        (out / state).unlink()
    write_json(path, fingerprint)


def _shown(value) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def attach_searcher(method, progress: bool = False) -> None:
    """Give ``method`` the searcher its :meth:`~swr.methods.Method.search_settings`
    name, when it asks for one."""
    wanted = method.search_settings()
    if wanted is None:
        return
    wanted = dict(wanted)
    policy = wanted.pop("policy")
    method.searcher = build_searcher(policy, SearchSettings(progress=progress, **wanted))
