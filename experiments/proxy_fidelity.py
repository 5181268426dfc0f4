"""Does the evaluator predict the final accuracy? Proxy scores against final training.

For one task, budget and seed: train the supernet (cached), build N distinct
budget-feasible selections (knapsack and greedy over stage-1 Taylor importance and
perturbed copies of both, the last-k and first-k candidate layers that fit, random
feasible ones), score each with every proxy, then give every selection the same final
training (stage 3 exactly as ``swr finetune`` runs it: from the supernet, same epochs,
learning rate and seed for all) and record its final validation and test accuracy.

Proxies: the supernet evaluator's validation accuracy (``acc``) and mean true-class
log-probability (``loglik``), both from one scoring, with BatchNorm statistics
recalibrated on training clips (the plain names), taken from every clip of each
validation batch (``valbn-``) or from 32 or 16 of them (``valbn32-``, ``valbn16-``), or
kept from the supernet (``snbn-``); with ``--budget-supernet`` the same
on a supernet trained on budget-feasible gate sets (``budget-...``); the summed
Taylor importance of the selection (``taylor``, what knapsack maximises, free); the number
of layers it trains (``layer count``, free: the floor a proxy should clear); and with
``--trained-proxy E`` the validation accuracy and log-likelihood after a short training
of E epochs of the selection's own deltas from the supernet the final trainings start
from (``trainedE-acc``, ``trainedE-loglik``: ``swr search --evaluator trained``; its data
order drawn from seed + 1001, shared with neither the final training nor the retest).

Reported per run: Kendall tau-b and Spearman rho (with Fisher-z 95% intervals) between
each proxy and the final *validation* accuracy, and the headroom: the final test
accuracy of the best selection by final validation accuracy minus the median
selection's, in points (over all N, and over the random ones alone); and the top of the
proxy: Kendall tau of the search's score within the third of the selections it ranks
highest (where a search picks), beside the retest's tau there and their test accuracies.

    python benchmarks/proxy_fidelity.py --checkpoint CKPT --task kws-synth:de --budget 1%
        [--selections 20] [--epochs 20] [--budget-supernet] [--out runs/proxy_fidelity]

Each run merges its results into ``OUT/results.json`` (``OUT/<run>/selections.csv``
per run) and rewrites the section between ``<!-- bench:proxy_fidelity -->`` markers of
experiments/SEARCH.md from every run stored there, plus one scatter plot per run in experiments/.
Final trainings already in ``OUT/<run>/sel-XX`` with the same settings are reused, so an
interrupted run continues where it stopped; so are the supernet scores of a stored run
of the same selections (a run made again to add ``--trained-proxy`` scores only that).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

#: where each scoring takes BatchNorm statistics from (SupernetEvaluator's bn_stats and
#: bn_clips), by label, and the prefix of its proxy names ("" for recalibration on
#: training clips, the first runs' default)
BN_VARIANTS = {"train": ("train", None, ""), "val": ("val", None, "valbn-"),
               "val, 32 clips": ("val", 32, "valbn32-"), "val, 16 clips": ("val", 16, "valbn16-"),
               "supernet": ("supernet", None, "snbn-")}
PROXIES = tuple(f"{sn}{tag}{m}" for sn in ("", "budget-") for *_, tag in BN_VARIANTS.values()
                for m in ("acc", "loglik")) + ("taylor",)


def trained_epochs(keys) -> list[int]:
    """The epochs E of the trained proxies (``trainedE-acc``, ``trainedE-loglik``) among
    ``keys``."""
    return sorted({int(m.group(1)) for k in keys
                   if (m := re.fullmatch(r"trained(\d+)-(acc|loglik)", k))})


def proxies_of(rows) -> list[str]:
    """:data:`PROXIES` and the trained proxies the rows hold."""
    return list(PROXIES) + [f"trained{e}-{m}" for e in trained_epochs(k for r in rows for k in r)
                            for m in ("acc", "loglik")]


def build_selections(names, costs, importance, budget, n, seed):
    """``n`` distinct non-empty feasible selections, each with the rule that made it."""
    from swr.policies.selectors import greedy_selection, knapsack_selection, random_selection

    costs = np.asarray(costs, dtype=np.int64)
    importance = np.asarray(importance, dtype=np.float64)
    rng = np.random.default_rng(seed)
    out: dict[tuple[str, ...], str] = {}

    def add(mask, rule):
        sel = tuple(nm for nm, m in zip(names, mask) if m)
        if sel and sel not in out and len(out) < n:
            assert int(costs[np.asarray(mask, bool)].sum()) <= budget
            out[sel] = rule

    def run_of(order, k=None):
        """Layers of ``order`` taken while they fit, skipping those that do not (at most
        ``k``): the last-k (first-k) candidate layers a budget allows."""
        mask = np.zeros(len(names), dtype=bool)
        left, taken = budget, 0
        for i in order:
            if k is not None and taken >= k:
                break
            if costs[i] <= left:
                mask[i], left, taken = True, left - costs[i], taken + 1
        return mask, taken

    add(knapsack_selection(importance, costs, budget), "knapsack")
    add(greedy_selection(importance, costs, budget), "greedy")
    last, k_last = run_of(range(len(names) - 1, -1, -1))
    first, k_first = run_of(range(len(names)))
    add(last, f"last-{k_last}")
    add(first, f"first-{k_first}")
    for k in (k_last // 2, k_first // 2):
        if k >= 1:
            add(run_of(range(len(names) - 1, -1, -1), k)[0], f"last-{k}")
            add(run_of(range(len(names)), k)[0], f"first-{k}")
    rules = ["knapsack-perturbed", "greedy-perturbed", "random"]
    for i in range(200 * n):
        if len(out) >= n:
            break
        rule = rules[i % 3]
        noisy = importance * rng.lognormal(0.0, 0.3 + 0.7 * rng.random(), size=len(names))
        if rule == "random":
            add(random_selection(costs, budget, rng), rule)
        elif rule == "knapsack-perturbed":
            add(knapsack_selection(noisy, costs, budget), rule)
        else:
            add(greedy_selection(noisy, costs, budget), rule)
    return list(out.items())


def headroom(rows, test_key="test_acc", val_key="val_acc"):
    """Test accuracy of the best row by final validation accuracy minus the median row's
    test accuracy, in points (ties on validation: the first such row)."""
    if len(rows) < 2:
        return None
    best = max(rows, key=lambda r: r[val_key])
    return 100.0 * (best[test_key] - statistics.median(r[test_key] for r in rows))


def headrooms(rows, test_key="test_acc") -> dict:
    """:func:`headroom` over all rows and over the random ones (None with fewer than 3)."""
    random_rows = [r for r in rows if r["rule"] == "random"]
    return {"headroom_points": headroom(rows, test_key),
            "headroom_random_points": headroom(random_rows, test_key)
            if len(random_rows) >= 3 else None}


def top_of_proxy(rows, key: str, share: float = 1 / 3) -> Optional[dict]:
    """How well ``key`` ranks the selections it puts on top, where a search picks: among
    the highest-scoring ``share`` of the rows (at least 6), Kendall tau of ``key`` with
    final validation accuracy, the same for a second final training where there is one
    (``retest_val_acc``: its tau with the first, the noise ceiling up there), and their
    final test accuracies (in %). None when the rows lack ``key`` or are too few."""
    from swr.stats import kendall_tau

    if len(rows) < 6 or any(key not in r for r in rows):
        return None
    top = sorted(rows, key=lambda r: -r[key])[:max(6, round(share * len(rows)))]
    test = [100 * r["test_acc"] for r in top]
    out = {"key": key, "n": len(top),
           "kendall": kendall_tau([r[key] for r in top], [r["val_acc"] for r in top]),
           "test_min": min(test), "test_max": max(test), "test_mean": statistics.mean(test),
           "median_all": 100 * statistics.median(r["test_acc"] for r in rows)}
    if all("retest_val_acc" in r for r in top):
        out["retest_kendall"] = kendall_tau([r["val_acc"] for r in top],
                                            [r["retest_val_acc"] for r in top])
    return out


def correlations(rows, proxies):
    from swr.stats import fisher_interval, kendall_tau, spearman

    final = [r["val_acc"] for r in rows]
    out = {}
    for p in proxies:
        xs = [r.get(p) for r in rows]
        if any(x is None for x in xs):
            continue
        tau, rho = kendall_tau(xs, final), spearman(xs, final)
        out[p] = {"kendall": tau, "kendall_ci": fisher_interval(tau, len(xs), "kendall"),
                  "spearman": rho, "spearman_ci": fisher_interval(rho, len(xs), "spearman")}
    return out


def retest_summary(rows, seed: int) -> dict:
    """The noise ceiling: Kendall tau between the final validation accuracies of the
    same selections trained twice, and each proxy against their mean."""
    from swr.stats import fisher_interval, kendall_tau

    a = [r["val_acc"] for r in rows]
    b = [r["retest_val_acc"] for r in rows]
    tau = kendall_tau(a, b)
    mean_rows = [{**r, "val_acc": (r["val_acc"] + r["retest_val_acc"]) / 2} for r in rows]
    # the first training picks, the second one scores: what choosing by one final
    # training is worth on another, free of the pick's own luck
    return {"seed": seed, "kendall": tau, **headrooms(rows, test_key="retest_test_acc"),
            "kendall_ci": fisher_interval(tau, len(rows), "kendall"),
            "test_kendall": kendall_tau([r["test_acc"] for r in rows],
                                        [r["retest_test_acc"] for r in rows]),
            "vs_mean": {p: c["kendall"]
                        for p, c in correlations(mean_rows, proxies_of(rows)).items()}}


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def run(args) -> dict:
    import torch
    from _common import command
    from tqdm.auto import tqdm

    from swr.budget import resolve_budget
    from swr.envs.evaluator import SupernetEvaluator, TrainedEvaluator
    from swr.app.finetune import finetune
    from swr.io import write_csv, write_json
    from swr.reparam import candidates
    from swr.selection import norm_split
    from swr.source import base_spec, load_base, load_task
    from swr.supernet import SupernetConfig, build_supernet, prepare_supernet

    torch.set_num_threads(args.threads)
    # the regime before norms were counted (free) keeps its old run names
    norms_tag = "" if args.norms == "free" else f"-norms-{args.norms}"
    spec = base_spec(args.checkpoint)
    base, meta = load_base(spec)
    task = load_task(args.task, meta)
    t0 = time.perf_counter()
    probe = build_supernet(base, task.num_classes)
    full_budget = resolve_budget(probe, args.budget)
    # the deltas' share (swr search --norms): every selection below is within it
    budget, norms_trained, _ = norm_split(probe, full_budget, args.norms)
    # as swr search: with the norms untrained, stage 1 keeps the base's norms too (runs
    # made before it did are stored under the names without "-s1base")
    # the base's backbone leads the name: one task on two backbones makes two runs (runs
    # made before it did are stored under names without it)
    name = f"{slug(meta['backbone'])}-{slug(args.task)}-{slug(args.budget)}-s{args.seed}" \
        f"{norms_tag}" + (
        "" if norms_trained else "-s1base") + (
        "-from-budget" if args.final_from == "budget" else "") + (
        # the final trainings start from the supernet: another stage 1, other trainings
        f"-sn{args.supernet_epochs}" if args.supernet_epochs != 10 else "") + (
        f"-e{args.epochs}" if args.epochs != 10 else "")
    folder = Path(args.out) / name
    folder.mkdir(parents=True, exist_ok=True)
    scfg = SupernetConfig(epochs=args.supernet_epochs, seed=args.seed, device="cpu",
                          progress=True, norms=norms_trained)
    supernet, smeta, sfolder = prepare_supernet(base, task, scfg, meta["backbone"])
    cands = candidates(supernet)
    names, costs = [c.name for c in cands], [c.params for c in cands]
    importance = [s["taylor"] for s in smeta["stats"]]
    sels = build_selections(names, costs, importance, budget, args.selections, args.seed)
    print(f"{name}: {len(sels)} selections, budget {budget} params, supernet "
          f"{time.perf_counter() - t0:.0f} s", flush=True)

    rows = [{"id": i, "rule": rule, "layers": len(sel),
             "cost": sum(costs[names.index(n)] for n in sel),
             "taylor": float(sum(importance[names.index(n)] for n in sel)),
             "selection": list(sel)} for i, (sel, rule) in enumerate(sels)]
    score_s = {}  # seconds per scoring, by BatchNorm statistics

    def score_all(net, prefix):
        for label, (bn, clips, tag) in BN_VARIANTS.items():
            # no prefix cache: every scoring does the whole work, so the times compare
            ev = SupernetEvaluator(net, task, device="cpu", seed=args.seed, bn_stats=bn,
                                   bn_clips=clips, prefix_cache_mb=0)
            t_score = time.perf_counter()
            for row in rows:
                s = ev.scores(row["selection"])
                row[f"{prefix}{tag}acc"], row[f"{prefix}{tag}loglik"] = s["accuracy"], s["loglik"]
            score_s.setdefault(label, (time.perf_counter() - t_score) / len(rows))

    stored = json.loads((Path(args.out) / "results.json").read_text()).get(name) \
        if (Path(args.out) / "results.json").is_file() else None
    # the supernet scores this run makes: on the budget-trained supernet only with
    # --budget-supernet (which does not change the run's name)
    wanted = [p for p in PROXIES if args.budget_supernet or not p.startswith("budget-")]
    if (stored and [r["selection"] for r in stored["rows"]] == [r["selection"] for r in rows]
            and all(p in old for old in stored["rows"] for p in wanted)):
        # the same selections were scored by a stored run: its supernet scores hold
        for row, old in zip(rows, stored["rows"]):
            row.update({p: old[p] for p in proxies_of([old]) if p in old})
        score_s.update(stored.get("score_s_by_bn_stats") or
                       {"train": stored["score_s_per_selection"]})
        print(f"{name}: supernet scores reused from {Path(args.out) / 'results.json'}",
              flush=True)
    else:
        stored = None
        score_all(supernet, "")
    final_net = supernet
    if args.budget_supernet:
        bcfg = SupernetConfig(epochs=args.supernet_epochs, seed=args.seed, device="cpu",
                              progress=True, gates="budget", gate_budget_params=budget,
                              norms=norms_trained)
        bnet, _, bfolder = prepare_supernet(base, task, bcfg, meta["backbone"])
        if stored is None:
            score_all(bnet, "budget-")
        if args.final_from == "budget":  # as swr search's default: stage 3 from that supernet
            sfolder, final_net = bfolder, bnet
    for epochs in args.trained_proxy:
        # swr search --evaluator trained, from where the final trainings start; seed + 1000
        # (its data order: seed + 1001) is neither the final training's seed nor the retest's
        ev = TrainedEvaluator(final_net, task, device="cpu", epochs=epochs,
                              seed=args.seed + 1000, norms=norms_trained)
        t_score = time.perf_counter()
        for row in tqdm(rows, desc=f"trained proxy, {epochs} epochs", unit="selection"):
            sc = ev.scores(row["selection"])
            row[f"trained{epochs}-acc"], row[f"trained{epochs}-loglik"] = (sc["accuracy"],
                                                                          sc["loglik"])
        score_s[f"trained, {epochs} epochs"] = (time.perf_counter() - t_score) / len(rows)

    settings = {"epochs": args.epochs, "seed": args.seed, "lr": 3e-3,
                "supernet": str(sfolder), "task": args.task}
    def final(row, seed: int, sub: Path) -> dict:
        """The selection's final training with ``seed`` in ``sub`` (reused when done)."""
        done = sub / "metrics.json"
        if done.is_file():
            m = json.loads(done.read_text())
            if (m.get("layers") == row["selection"] and m.get("epochs") == args.epochs
                    and m.get("seed") == seed and m.get("task") == args.task
                    and m.get("norms_trained", True) == norms_trained):
                return {**m, "reused": True}
        sel_file = folder / f"selection-{row['id']:02d}.json"
        write_json(sel_file, {"layers": row["selection"], "task": args.task,
                              "budget_params": full_budget, "norms": args.norms,
                              "norms_trained": norms_trained,
                              "checkpoint": str(Path(args.checkpoint).resolve()),
                              "base": spec.to_dict(), "supernet": str(sfolder),
                              "policy": row["rule"]})
        return {**finetune(sel_file, sub, epochs=args.epochs, lr=settings["lr"], seed=seed,
                           device="cpu", progress=False), "reused": False}

    for row in tqdm(rows, desc=f"final training {name}", unit="selection"):
        m = final(row, args.seed, folder / f"sel-{row['id']:02d}")
        row.update(val_acc=m["val_acc"], test_acc=m["test_acc"], train_s=m["seconds"],
                   reused=m["reused"])
    retest = None
    if args.retest_seed is not None:
        # the same selections trained again with another seed (data order): how well
        # one final training ranks the next is the most any proxy can rank them
        for row in tqdm(rows, desc=f"retest {name}", unit="selection"):
            m = final(row, args.retest_seed,
                      folder / f"sel-{row['id']:02d}-seed{args.retest_seed}")
            row.update(retest_val_acc=m["val_acc"], retest_test_acc=m["test_acc"])
        retest = retest_summary(rows, args.retest_seed)
    write_csv(folder / "selections.csv", rows,
              ["id", "rule", "layers", "cost", *[p for p in proxies_of(rows) if p in rows[0]],
               "val_acc", "test_acc", "train_s",
               *(["retest_val_acc", "retest_test_acc"] if retest else [])])
    return {
        "name": name, "task": args.task, "backbone": meta["backbone"], "budget": args.budget,
        "budget_params": budget,
        "seed": args.seed, "selections": len(rows), "epochs": args.epochs,
        "supernet_epochs": args.supernet_epochs, "budget_supernet": args.budget_supernet,
        "norms": args.norms, "norms_trained": norms_trained, "final_from": args.final_from,
        "supernet_val_acc_all_open": smeta["val_acc_all_open"],
        "score_s_per_selection": score_s["train"], "score_s_by_bn_stats": score_s,
        "train_s_median": statistics.median(r["train_s"] for r in rows),
        "correlations": correlations(rows, proxies_of(rows)),
        **headrooms(rows), "retest": retest,
        "random_selections": sum(r["rule"] == "random" for r in rows),
        "final_val": [min(r["val_acc"] for r in rows), max(r["val_acc"] for r in rows)],
        "final_test": [min(r["test_acc"] for r in rows), max(r["test_acc"] for r in rows)],
        # a run that reused a stored one's scores: the minutes of both
        "command": command(), "rows": rows,
        "minutes": (time.perf_counter() - t0) / 60 + (stored["minutes"] if stored else 0.0),
    }


def scatter(result: dict, path: Path) -> None:
    """One panel per proxy: proxy score against final validation accuracy."""
    from matplotlib.figure import Figure

    from swr.io import save_png

    rows = result["rows"]
    proxies = [p for p in proxies_of(rows) if p in result["correlations"]
               and (p.endswith("loglik") or p == "taylor" or p.startswith("trained"))]
    fig = Figure(figsize=(3.2 * len(proxies), 3.2), layout="constrained")
    for ax, p in zip(fig.subplots(1, len(proxies), squeeze=False)[0], proxies):
        rules = sorted({r["rule"] for r in rows})
        for rule in rules:
            pts = [(r[p], 100 * r["val_acc"]) for r in rows if r["rule"] == rule]
            ax.scatter(*zip(*pts), s=18, label=rule)
        c = result["correlations"][p]
        ax.set_title(f"{p}: tau {c['kendall']:.2f}, rho {c['spearman']:.2f}", fontsize=9)
        ax.set_xlabel(f"proxy ({p})", fontsize=8)
        ax.set_ylabel("final val accuracy (%)", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.axes[0].legend(fontsize=6)
    fig.suptitle(f"{result['task']} at {result['budget']}, {result['selections']} selections, "
                 f"{result['epochs']} epochs", fontsize=9)
    save_png(fig, path)


#: what ``swr search`` scored with before budget gates became its default (Bernoulli
#: gates; 32 val-batch clips when the task norms train, the supernet's statistics when
#: only deltas do) and since (budget gates, 32 val-batch clips either way)
SEARCH_SCORING = {"before": ("valbn32-loglik", "snbn-loglik"), "now": "budget-valbn32-loglik"}


def search_scoring_table(results: dict) -> list[str]:
    """Kendall tau of the search's scoring before and since budget gates, per run that
    scored both, and their paired difference."""
    from _common import md_table, mean_ci95

    rows, diffs = [], []
    for r in sorted(results.values(), key=lambda r: r["name"]):
        corr = r["correlations"]
        old = SEARCH_SCORING["before"][0 if r.get("norms_trained", True) else 1]
        if old not in corr or SEARCH_SCORING["now"] not in corr:
            continue
        a, b = corr[old]["kendall"], corr[SEARCH_SCORING["now"]]["kendall"]
        diffs.append(b - a)
        rows.append([f"`{r['task']}` {r['budget']}"
                     + (", from budget" if r.get("final_from") == "budget" else "")
                     + (f", stage 1 {r['supernet_epochs']} epochs"
                        if r["supernet_epochs"] != 10 else "")
                     + (f", final {r['epochs']} epochs" if r["epochs"] != 10 else ""),
                     "norms trained" if r.get("norms_trained", True) else "deltas only",
                     f"{r['headroom_points']:+.2f}", f"{a:.2f}", f"**{b:.2f}**", f"{b - a:+.2f}"])
    if len(diffs) < 2:
        return []
    m, lo, hi = mean_ci95(diffs)
    big = [d for d, row in zip(diffs, rows) if float(row[2]) >= 3]
    return ["**The search's own scoring, before and since `--supernet-gates budget` became the "
            "default** (Kendall tau-b of its score against final validation accuracy; before: "
            "Bernoulli gates, 32 val-batch clips with task norms trained, the supernet's "
            "statistics with deltas only; now: budget gates, 32 val-batch clips either way):",
            "", md_table(["run", "trains", "headroom (points)", "tau before", "tau now",
                          "difference"], rows), "",
            f"Mean difference over the {len(diffs)} runs **{m:+.3f}** [{lo:+.3f}, {hi:+.3f}]"
            + (f"; over the {len(big)} with >= 3 points of headroom {np.mean(big):+.3f}"
               if big else "") + ".", ""]


def trained_label(key: str) -> str:
    """``"trained, 2 epochs"`` (a key of score_s_by_bn_stats) as prose."""
    e = int(re.search(r"\d+", key).group())
    return f"after a short training of {e} epoch{'s' * (e > 1)}"


def render(results: dict) -> str:
    from _common import md_table, mean_ci95

    def fmt(c, key):
        lo, hi = c[f"{key}_ci"]
        return f"{c[key]:.2f} [{lo:.2f}, {hi:.2f}]"

    lines = []
    scored = [r for r in results.values()
              if all(f"{tag}loglik" in r["correlations"] for *_, tag in BN_VARIANTS.values())]
    if scored:
        # mean rank agreement per source of statistics, over the runs that scored all of them
        table = []
        for sn, pre in (("bernoulli", ""), ("budget", "budget-")):
            for label, (*_, tag) in BN_VARIANTS.items():
                # (this source's tau, every clip's tau) per run that scored this source
                pairs = [(c[f"{pre}{tag}loglik"]["kendall"], c[f"{pre}valbn-loglik"]["kendall"])
                         for c in (r["correlations"] for r in scored) if f"{pre}{tag}loglik" in c]
                if not pairs:
                    continue
                taus = [t for t, _ in pairs]
                m, lo, hi = mean_ci95([t - v for t, v in pairs])
                table.append([sn, label, len(taus), f"{np.mean(taus):.3f}",
                              f"{min(taus):.2f} to {max(taus):.2f}",
                              f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]"])
        lines += [f"**Summary over the {len(scored)} runs scored with every source of "
                  "BatchNorm statistics**: Kendall tau-b between the log-likelihood proxy and "
                  "the final validation accuracy, mean over runs.", "",
                  md_table(["supernet gates", "BatchNorm statistics", "runs", "mean tau",
                            "range", "minus `val` (every clip), paired [95% t interval]"],
                           table), ""]
    lines += search_scoring_table(results)
    for r in sorted(results.values(), key=lambda r: r["name"]):
        norms = r.get("norms", "free")
        trained = "task norms trained" if r.get("norms_trained", True) else "deltas only"
        lines += [f"### {r['task']}" + (f" on {r['backbone']}" if "backbone" in r else "")
                  + f" at {r['budget']} ({r['budget_params']:,} delta parameters), "
                  f"seed {r['seed']}, --norms {norms} ({trained})"
                  + (", final trainings from the budget-trained supernet"
                     if r.get("final_from") == "budget" else "")
                  + (f", stage 1 {r['supernet_epochs']} epochs"
                     if r["supernet_epochs"] != 10 else "")
                  + (f", final trainings {r['epochs']} epochs" if r["epochs"] != 10 else ""),
                  "",
                  f"{r['selections']} selections ({', '.join(sorted({x['rule'].split('-')[0] if x['rule'][:4] in ('last', 'firs') else x['rule'] for x in r['rows']}))}), "
                  f"final training {r['epochs']} epochs each (median {r['train_s_median']:.0f} s), "
                  f"supernet {r['supernet_epochs']} epochs (all gates open: val "
                  f"{r['supernet_val_acc_all_open']:.4f}), one scoring "
                  + (", ".join(f"{s:.2f} s " + (trained_label(bn) if bn.startswith("trained")
                                                else f"with {bn} BatchNorm statistics")
                               for bn, s in r["score_s_by_bn_stats"].items())
                     if "score_s_by_bn_stats" in r else f"{r['score_s_per_selection']:.2f} s")
                  + ". Final validation accuracy "
                  f"{r['final_val'][0]:.4f}-{r['final_val'][1]:.4f}, final test accuracy "
                  f"{r['final_test'][0]:.4f}-{r['final_test'][1]:.4f}. "
                  f"{r['minutes']:.1f} min in all.", "",
                  f"Command: `{r['command']}`", ""]
        corr = r["correlations"]
        if any(k.startswith(tuple(v[2] for v in BN_VARIANTS.values() if v[2])) or "-valbn" in k
               for k in corr):
            # one row per supernet and source of BatchNorm statistics
            table = [[sn or "bernoulli", bn, fmt(corr[f"{pre}{tag}acc"], "kendall"),
                      fmt(corr[f"{pre}{tag}loglik"], "kendall"),
                      fmt(corr[f"{pre}{tag}loglik"], "spearman")]
                     for sn, pre in (("", ""), ("budget", "budget-"))
                     for bn, (*_, tag) in BN_VARIANTS.items() if f"{pre}{tag}loglik" in corr]
            if "taylor" in corr:
                table.append(["-", "taylor (summed importance)", "-",
                              fmt(corr["taylor"], "kendall"), fmt(corr["taylor"], "spearman")])
            # the floor any proxy should clear: how many layers a selection trains
            count = correlations(r["rows"], ["layers"])["layers"]
            table.append(["-", "layer count (free)", "-", fmt(count, "kendall"),
                          fmt(count, "spearman")])
            for e in trained_epochs(corr):
                table.append(["-", f"trained: short training, {e} epoch{'s' * (e > 1)}",
                              fmt(corr[f"trained{e}-acc"], "kendall"),
                              fmt(corr[f"trained{e}-loglik"], "kendall"),
                              fmt(corr[f"trained{e}-loglik"], "spearman")])
            lines += [md_table(["supernet gates", "BatchNorm statistics",
                                "Kendall tau-b, accuracy [95% CI]",
                                "Kendall tau-b, loglik [95% CI]",
                                "Spearman rho, loglik [95% CI]"], table), ""]
        else:
            table = [[p, fmt(c, "kendall"), fmt(c, "spearman")] for p, c in corr.items()]
            lines += [md_table(["proxy", "Kendall tau-b vs final val [95% CI]",
                                "Spearman rho vs final val [95% CI]"], table), ""]
        rt = r.get("retest")
        if rt:
            lo, hi = rt["kendall_ci"]
            best = max(rt["vs_mean"], key=rt["vs_mean"].get)
            lines += [f"**Noise ceiling.** The same {r['selections']} selections trained again "
                      f"with seed {rt['seed']}: Kendall tau between the two final validation "
                      f"accuracies **{rt['kendall']:.2f}** [{lo:.2f}, {hi:.2f}] (test accuracies "
                      f"{rt['test_kendall']:.2f}). No proxy can rank one final training much "
                      f"better than another final training does. Against the mean of the two "
                      f"final validation accuracies the best proxy is `{best}` with tau "
                      f"{rt['vs_mean'][best]:.2f}."]
            if "headroom_points" not in rt:  # stored before it was recorded
                rt = {**rt, **headrooms(r["rows"], test_key="retest_test_acc")}
            if rt["headroom_points"] is not None:
                rhr = rt["headroom_random_points"]
                lines += ["", f"Headroom free of the pick's luck (the best selection by the first "
                          f"final validation accuracy, scored by its test accuracy in the second "
                          f"training, minus the second training's median): "
                          f"**{rt['headroom_points']:+.2f} points** over all {r['selections']}"
                          + (f", {rhr:+.2f} over the random ones" if rhr is not None else "")
                          + "."]
            lines += [""]
        top = top_of_proxy(r["rows"], SEARCH_SCORING["now"])
        if top:
            lines += [f"**The top of the proxy.** Among the {top['n']} selections the search's "
                      f"score (`{top['key']}`) ranks highest, its Kendall tau with final "
                      f"validation accuracy is {top['kendall']:.2f}"
                      + (f" (two final trainings of them agree at {top['retest_kendall']:.2f})"
                         if "retest_kendall" in top else "")
                      + f"; their final test accuracy spans {top['test_min']:.2f}-"
                      f"{top['test_max']:.2f}% (mean {top['test_mean']:.2f}%, the median "
                      f"selection's {top['median_all']:.2f}%).", ""]
        hr = r["headroom_points"]
        hrr = r["headroom_random_points"]
        lines += [f"Headroom (final test accuracy of the best selection by final validation "
                  f"accuracy minus the median selection's): **{hr:+.2f} points** over all "
                  f"{r['selections']}"
                  + (f", {hrr:+.2f} points over the {r['random_selections']} random ones"
                     if hrr is not None else "") + ".", "",
                  f"![proxy vs final accuracy](proxy-fidelity-{r['name']}.png)", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--checkpoint", required=True, help="swr pretrain folder of the base")
    p.add_argument("--task", default="kws-synth:de")
    p.add_argument("--budget", default="1%")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--norms", default="free", choices=["auto", "budget", "none", "free"],
                   help="how the final trainings treat the task norms (swr search --norms); "
                        "free (train them outside the budget) is how the first runs were made")
    p.add_argument("--selections", type=int, default=20, help="distinct selections (N)")
    p.add_argument("--epochs", type=int, default=20,
                   help="final-training epochs per selection (swr finetune's default: 20)")
    p.add_argument("--supernet-epochs", type=int, default=10)
    p.add_argument("--retest-seed", type=int, default=None,
                   help="train every selection a second time with this seed and report how "
                        "well the two final trainings rank each other (the noise ceiling)")
    p.add_argument("--budget-supernet", action="store_true",
                   help="also score on a supernet trained on budget-feasible gate sets")
    p.add_argument("--final-from", default="bernoulli", choices=["bernoulli", "budget"],
                   help="the supernet the final trainings start from: the usual one, or (with "
                        "--budget-supernet) the one trained on budget-feasible gate sets, as "
                        "swr search's default does")
    p.add_argument("--trained-proxy", type=int, action="append", default=[], metavar="E",
                   help="also score every selection after a short training of E epochs "
                        "(swr search --evaluator trained --proxy-epochs E); repeat for several")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", default=str(ROOT / "runs" / "proxy_fidelity"))
    p.add_argument("--doc", default=str(ROOT / "experiments" / "SEARCH.md"))
    p.add_argument("--render-only", action="store_true",
                   help="rewrite the doc section from OUT/results.json without running")
    args = p.parse_args()
    if args.final_from == "budget" and not args.budget_supernet:
        p.error("--final-from budget needs --budget-supernet")

    from _common import write_section

    from swr.io import write_json

    out = Path(args.out)
    store = out / "results.json"
    r = None if args.render_only else run(args)
    # read after the run: another run into the same OUT may have finished meanwhile
    results = json.loads(store.read_text()) if store.is_file() else {}
    if r is not None:
        results[r["name"]] = r
        write_json(store, results)
        print(json.dumps({k: v for k, v in r.items() if k != "rows"}, indent=1), flush=True)
    for r in results.values():
        scatter(r, Path(args.doc).parent / f"proxy-fidelity-{r['name']}.png")
    write_section("proxy_fidelity", "Proxy fidelity: evaluator score against final accuracy",
                  render(results), doc=Path(args.doc))


if __name__ == "__main__":
    main()
