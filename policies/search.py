"""``swr search``: supernet (stage 1), then a policy or reference selector (stage 2).

Outputs in ``out``: ``selection.json``, ``search.csv`` (one row per evaluation),
``search.png`` (reward over evaluations), the policy weights, and
``evaluations.jsonl``, an append-only log of every scoring that makes the search
resumable: ``--resume`` replays the search from its seed with the logged scores
served from that log, so it reaches exactly the result of an uninterrupted run
and only the scorings that were lost are made again.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from safetensors.torch import load_file, save_file

from swr.budget import backbone_params, resolve_budget, selection_cost
from swr.envs.evaluator import canonical
from swr.envs.features import layer_features
from swr.errors import ClusterLostError, SwrError
from swr.io import atomic_path, cache_dir, save_png, write_json, write_text
from swr.source import base_spec, load_base, load_task, state_hash
from swr.reparam import candidates
from swr.runlog import RunLog
from swr.runlog import reset as reset_runlog
from swr.supernet import SupernetConfig, build_supernet, layer_statistics, train_supernet

POLICIES = ("pg", "ppo", "random", "greedy", "knapsack")


@dataclass
class SearchConfig:
    task: str
    checkpoint: str
    budget: str
    out: str
    policy: str = "pg"
    seed: int = 0
    evaluations: int = 200
    # 0: score in this process; N: N Ray workers (at most the CPUs available, see
    # swr.parallel.resolve_workers); None: one per available CPU
    workers: Optional[int] = 0
    resume: bool = False
    device: str = "auto"
    ray_address: Optional[str] = None
    samples_per_iteration: int = 8
    supernet: SupernetConfig = field(default_factory=SupernetConfig)
    bn_batches: int = 4
    progress: bool = True
    on_bad_file: str = "fail"  # real-data tasks: "skip" drops unreadable files
    # the base as a backbone + weights file instead of a swr pretrain checkpoint
    backbone: Optional[str] = None
    weights: Optional[str] = None

    def validate(self) -> "SearchConfig":
        if self.policy not in POLICIES:
            raise SwrError(f"--policy {self.policy!r} is not one of {', '.join(POLICIES)}")
        from swr.train import check_seed

        check_seed(self.seed)
        if self.evaluations < 1:
            raise SwrError(f"--evaluations {self.evaluations} must be at least 1")
        if self.workers is not None and self.workers < 0:
            raise SwrError(f"--workers {self.workers} must be 0 (no Ray) or more")
        return self


class EvaluationLog:
    """Scores by selection, persisted line by line; the search's resumable state."""

    def __init__(self, path: Path, names: list[str], costs: dict[str, int], resume: bool):
        self.path = path
        self.names = names
        self.costs = costs
        self.saved: dict[tuple[str, ...], float] = {}
        if resume and path.is_file():
            text = path.read_text(errors="replace")
            if text and not text.endswith("\n"):  # cut short by a kill: new records start afresh
                with open(path, "a", encoding="utf-8") as f:
                    f.write("\n")
            for line in text.splitlines():
                try:
                    rec = json.loads(line)
                    self.saved[tuple(rec["selection"])] = float(rec["score"])
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a kill: that scoring is simply redone
        elif path.exists():
            path.unlink()
        self.rows: list[dict] = []
        self.seen: dict[tuple[str, ...], float] = {}
        self.best: tuple[float, tuple[str, ...]] = (-float("inf"), ())
        self.start = time.perf_counter()
        self.replayed = 0
        self._file = None

    def record(self, sel: tuple[str, ...], score: float, fresh: bool) -> None:
        if sel not in self.seen:
            self.seen[sel] = score
            if fresh:
                if self._file is None:
                    self._file = open(self.path, "a", encoding="utf-8")
                self._file.write(json.dumps({"selection": list(sel), "score": score}) + "\n")
                self._file.flush()
                os.fsync(self._file.fileno())
            else:
                self.replayed += 1
            if score > self.best[0]:
                self.best = (score, sel)
            self.rows.append({"evaluation": len(self.seen), "reward": score,
                              "best_so_far": self.best[0], "cost": sum(self.costs[n] for n in sel),
                              "layers": len(sel), "elapsed_s": round(time.perf_counter() - self.start, 3)})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class SearchRun:
    """Glue between a selector and the pool: masks in, rewards out, everything logged."""

    def __init__(self, names, costs, budget, pool, log: EvaluationLog, limit: int, progress: bool):
        self.names, self.costs, self.budget = names, np.asarray(costs), budget
        self.pool, self.log, self.limit = pool, log, limit
        self._bar = None
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=limit, desc="search", unit="eval", dynamic_ncols=True)

    def evaluations_left(self) -> int:
        return self.limit - len(self.log.seen)

    def score(self, masks: list[np.ndarray]) -> list[float]:
        sels = [canonical([n for n, m in zip(self.names, mask) if m], self.names) for mask in masks]
        for sel in sels:
            if sum(self.costs[self.names.index(n)] for n in sel) > self.budget:
                raise AssertionError(f"selector proposed {sel} over the budget")
        todo = [s for s in dict.fromkeys(sels) if s not in self.log.seen and s not in self.log.saved]
        fresh = dict(zip(todo, self.pool.map(todo))) if todo else {}
        out = []
        for sel in sels:
            if sel in self.log.seen:
                score = self.log.seen[sel]
            elif sel in fresh:
                score = fresh[sel]
                self.log.record(sel, score, fresh=True)
            else:
                score = self.log.saved[sel]
                self.log.record(sel, score, fresh=False)
            out.append(score)
        if self._bar is not None:
            self._bar.n = min(len(self.log.seen), self.limit)
            self._bar.set_postfix(best=f"{self.log.best[0]:.4f}")
            self._bar.refresh()
        return out

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# -- stage 1 with a cache ---------------------------------------------------------------
def _supernet_key(cfg: SearchConfig, task_id: str, base: str) -> str:
    settings = {k: v for k, v in asdict(cfg.supernet).items() if k not in ("progress", "log_dir")}
    blob = json.dumps({"task": task_id, "base": base, "supernet": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prepare_supernet(cfg: SearchConfig, task, base_model, backbone: str):
    """Train (or load the cached) supernet and its per-layer statistics."""
    model = build_supernet(base_model, task.num_classes, bias_delta=cfg.supernet.bias_delta)
    # keyed on all base tensors (norms too) and on how the task's inputs were prepared
    key = _supernet_key(cfg, json.dumps([task.id, task.info.get("preprocess")]),
                        state_hash(base_model))
    folder = cache_dir("supernets", key)
    weights, meta_path = folder / "supernet.safetensors", folder / "supernet.json"
    if weights.is_file() and meta_path.is_file():
        model.load_state_dict(load_file(str(weights)))
        meta = json.loads(meta_path.read_text())
        return model, meta, folder
    result = train_supernet(model, task, cfg.supernet)
    stats = layer_statistics(model, task, cfg.supernet.stats_batches, device=cfg.supernet.device,
                             seed=cfg.supernet.seed)
    model.cpu()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp))
    meta = {"task": task.id, "backbone": backbone, "val_acc_all_open": result.val_acc,
            "seconds": result.seconds,
            "config": asdict(cfg.supernet), "stats": stats}
    write_json(meta_path, meta)
    return model, meta, folder


def evaluator_factory(cfg: SearchConfig, supernet, task):
    from swr.train import resolve_device

    from .pool import SupernetEvaluatorFactory

    return SupernetEvaluatorFactory(supernet, task, device=str(resolve_device(cfg.device)),
                                    bn_batches=cfg.bn_batches, seed=cfg.seed)


def make_pool(cfg: SearchConfig, factory, names):
    from .pool import LocalPool, RayPool

    device = factory.device
    if cfg.workers <= 0:
        return LocalPool(factory())
    from swr.parallel import available_cpus, init_ray, worker_threads

    init_ray(cfg.ray_address)
    gpus = 1.0 / cfg.workers if device.startswith("cuda") else 0.0
    return RayPool(factory, names, cfg.workers, threads_per_worker=worker_threads(cfg.workers),
                   cpus_per_worker=min(1.0, available_cpus() / cfg.workers),
                   gpus_per_worker=gpus)


def _cluster_lost(error: Exception, cfg: SearchConfig) -> bool:
    """Whether ``error`` ended the search because the Ray cluster went away (the pool
    says so itself; PPO's Ray environments surface it as any Ray error)."""
    if isinstance(error, ClusterLostError):
        return True
    if cfg.workers <= 0 or not type(error).__module__.startswith("ray"):
        return False
    from swr.parallel import cluster_alive

    return not cluster_alive()


# -- the search ---------------------------------------------------------------------------
def run_search(cfg: SearchConfig) -> dict:
    """Load the base (checkpoint or backbone + weights) and task named in ``cfg``, search,
    write ``selection.json``."""
    cfg.validate()
    spec = base_spec(cfg.checkpoint, cfg.backbone, cfg.weights)
    base_model, ckpt_meta = load_base(spec)
    task = load_task(cfg.task, ckpt_meta, on_bad_file=cfg.on_bad_file)
    result, _ = search(base_model, task, cfg, backbone=ckpt_meta["backbone"])
    result["checkpoint"] = str(Path(cfg.checkpoint).resolve()) if cfg.checkpoint else None
    result["base"] = spec.to_dict()
    result["task"] = cfg.task  # the spec, so swr finetune can load the same task
    result["on_bad_file"] = cfg.on_bad_file
    result["skipped_files"] = list(task.info.get("skipped", []))
    write_json(Path(cfg.out) / "selection.json", result)
    return result


def search(base_model, task, cfg: SearchConfig, backbone: str) -> tuple[dict, object]:
    """Stage 1 + stage 2 on an in-memory model and task; returns (result, supernet).

    Writes ``search.csv``, ``search.png``, ``evaluations.jsonl`` and the policy
    weights into ``cfg.out``.
    """
    cfg.validate()
    # Fail on a budget no layer fits in, or an unreachable cluster, before stage 1.
    resolve_budget(build_supernet(base_model, task.num_classes,
                                  bias_delta=cfg.supernet.bias_delta), cfg.budget)
    from swr.parallel import resolve_workers

    cfg.workers = resolve_workers(cfg.workers, cfg.ray_address)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.supernet.seed = cfg.seed
    cfg.supernet.device = cfg.device
    cfg.supernet.progress = cfg.progress
    cfg.supernet.log_dir = str(out)
    if not cfg.resume:  # a resumed search reuses the cached supernet and keeps its log
        reset_runlog(out, ("epochs",))
    t0 = time.perf_counter()
    supernet, meta, supernet_dir = prepare_supernet(cfg, task, base_model, backbone)
    t_supernet = time.perf_counter() - t0
    cands = candidates(supernet)
    names = [c.name for c in cands]
    costs = [c.params for c in cands]
    budget_params = resolve_budget(supernet, cfg.budget)
    stats = meta["stats"]
    features = layer_features(stats)
    importance = np.array([s["taylor"] for s in stats])

    log = EvaluationLog(out / "evaluations.jsonl", names, dict(zip(names, costs)), cfg.resume)
    factory = evaluator_factory(cfg, supernet, task)
    pool = make_pool(cfg, factory, names) if cfg.policy != "ppo" else None
    run = SearchRun(names, costs, budget_params, pool, log, cfg.evaluations,
                    cfg.progress and cfg.policy != "ppo")  # PPO shows its own progress
    t1 = time.perf_counter()
    policy_file = None
    retries = 0
    try:
        if cfg.policy == "pg":
            from .pg import PGConfig, greedy_mask, train_pg

            pgc = PGConfig(samples_per_iteration=cfg.samples_per_iteration, seed=cfg.seed)
            # a resumed search replays its iterations, so the log starts afresh either way
            reset_runlog(out, ("search_iterations",))
            iterations = RunLog(out, "search_iterations", tag="search")

            def on_iteration(rec: dict) -> None:
                values = {k: v for k, v in rec.items() if k != "iteration"}
                iterations.record(rec["iteration"], {**values, "best": log.best[0],
                                                     "evaluations": len(log.seen)})

            # one evaluation is kept for the trained policy's most likely selection
            policy = train_pg(features, np.asarray(costs), budget_params, run.score,
                              lambda: run.evaluations_left() - 1, pgc, on_iteration)
            iterations.close()
            run.score([greedy_mask(policy, features, np.asarray(costs), budget_params)])
            policy_file = out / "policy.safetensors"
            with atomic_path(policy_file) as tmp:
                save_file({k: v.contiguous() for k, v in policy.state_dict().items()}, str(tmp),
                          metadata={"n_features": str(features.shape[1]), "hidden": str(pgc.hidden)})
        elif cfg.policy == "ppo":
            from .ppo_search import run_ppo

            policy_file = run_ppo(cfg, features, costs, budget_params, names, factory, log, out)
        else:
            from .selectors import run_selector

            run_selector(cfg.policy, importance, costs, budget_params, cfg.evaluations, cfg.seed,
                         run.score, batch=max(cfg.samples_per_iteration, cfg.workers or 1))
    except Exception as e:
        if not _cluster_lost(e, cfg):
            raise
        raise ClusterLostError(
            f"{e if isinstance(e, ClusterLostError) else 'lost the Ray cluster'} after "
            f"{len(log.seen)} of {cfg.evaluations} evaluations; they are saved in "
            f"{log.path}: rerun the same command with --resume (on a restarted cluster, or "
            "without --ray-address to finish on this machine)") from None
    finally:
        run.close()
        log.close()
        if pool is not None:
            retries = pool.retries
            pool.close()
    t_search = time.perf_counter() - t1
    best_score, best_sel = log.best
    result = {
        "layers": list(best_sel), "cost": selection_cost(supernet, best_sel),
        "budget_params": budget_params, "budget": str(cfg.budget),
        "backbone_params": backbone_params(supernet), "val_score": best_score,
        "policy": cfg.policy, "seed": cfg.seed, "evaluations": len(log.seen),
        "replayed_evaluations": log.replayed, "worker_retries": retries,
        "task": task.id, "backbone": backbone,
        "supernet": str(supernet_dir), "supernet_val_acc_all_open": meta["val_acc_all_open"],
        "seconds": {"supernet": t_supernet, "search": t_search},
        "policy_weights": str(policy_file) if policy_file else None,
        "workers": cfg.workers,
    }
    write_csv(out / "search.csv", log.rows)
    plot_search(out / "search.png", log.rows, f"{cfg.policy} on {task.id}, budget {cfg.budget}")
    return result, supernet


def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    write_text(path, buf.getvalue())


def plot_search(path: Path, rows: list[dict], title: str) -> None:
    """``search.png``: every evaluation's reward and the best so far (see :mod:`swr.plots`)."""
    from swr.plots import search_figure

    save_png(search_figure(rows, title), path)
