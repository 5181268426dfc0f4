"""``swr bench`` reports: mean ± std over seeds, the markdown tables, WiSE-FT curves and
ensembles (``results.md``)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Optional

from .config import ENSEMBLE_COLUMNS, budget_order

def _f(v) -> Optional[float]:
    if v in (None, "", "None"):
        return None
    return float(v)


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds per (task, method, budget)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["method"], str(r["budget"])), []).append(r)
    out = []
    for (task, method, budget), rs in groups.items():
        acc = [_f(r["test_acc"]) for r in rs]
        shift = [_f(r["shift_acc"]) for r in rs if _f(r["shift_acc"]) is not None]
        out.append({
            "task": task, "method": method, "budget": budget, "n": len(rs),
            "test_acc": statistics.mean(acc), "test_std": statistics.pstdev(acc) if len(acc) > 1 else 0.0,
            "shift_acc": statistics.mean(shift) if shift else None,
            "updated_params": statistics.mean(_f(r["updated_params"]) for r in rs),
            # auto may train norms at one seed's budget and not another's: list each way
            "norms": "/".join(sorted({str(r.get("norms") or "-") for r in rs})),
            "stored_bytes": statistics.mean(_f(r["stored_bytes"]) for r in rs),
            "extra_flops": statistics.mean(_f(r["extra_flops"]) for r in rs),
            "foldable": str(rs[0]["foldable"]) in ("True", "true", "1"),
            "train_seconds": statistics.mean(_f(r["train_seconds"]) for r in rs),
        })
    return out


def results_markdown(rows: list[dict]) -> str:
    summary = summarize(rows)
    tasks = sorted({s["task"] for s in summary})
    lines = ["| task | method | budget | test acc (mean ± std) | shift acc | "
             "trained params (excl. head) | norms | stored bytes | extra FLOPs | foldable | "
             "train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in sorted(summary, key=lambda s: (s["task"], budget_order(s["budget"]), -s["test_acc"])):
        shift = "" if s["shift_acc"] is None else f"{s['shift_acc']:.4f}"
        lines.append(f"| {s['task']} | {s['method']} | {s['budget']} | "
                     f"{s['test_acc']:.4f} ± {s['test_std']:.4f} (n={s['n']}) | {shift} | "
                     f"{s['updated_params']:,.0f} | {s['norms']} | {s['stored_bytes']:,.0f} | "
                     f"{s['extra_flops']:,.0f} | {'yes' if s['foldable'] else 'no'} | "
                     f"{s['train_seconds']:.1f} |")
    if len(tasks) > 1:
        lines += ["", "Average over tasks (test accuracy):", "",
                  "| method | budget | " + " | ".join(tasks) + " | average |",
                  "|---|---|" + "---|" * len(tasks) + "---|"]
        by = {(s["method"], s["budget"], s["task"]): s["test_acc"] for s in summary}
        for method, budget in sorted({(s["method"], s["budget"]) for s in summary},
                                     key=lambda mb: (mb[0], budget_order(mb[1]))):
            accs = [by.get((method, budget, t)) for t in tasks]
            known = [a for a in accs if a is not None]
            cells = " | ".join("" if a is None else f"{a:.4f}" for a in accs)
            avg = f"{statistics.mean(known):.4f}" if len(known) == len(tasks) else "(incomplete)"
            lines.append(f"| {method} | {budget} | {cells} | {avg} |")
    return "\n".join(lines) + "\n"


def _is_swr(method: str) -> bool:
    return method == "swr" or method.startswith("swr-")


#: Fewer (task, seed) pairs than this, and the per-test-clip interval is reported instead.
MIN_PAIRS = 6


def _clip_differences(a: dict, b: dict, pred_dir) -> Optional[list[float]]:
    """Per test clip, correct under run ``a`` minus correct under run ``b`` (the same
    clips, one bench cell each), or None when either cell kept no predictions."""
    from ...robustness import cell_name, load_predictions

    out = []
    for key in sorted(set(a) & set(b)):
        paths = [pred_dir / f"{cell_name(r['task'], r['method'], r['budget'], r['seed'])}"
                 f".safetensors" for r in (a[key], b[key])]
        if not all(p.is_file() for p in paths):
            return None
        (pa, la), (pb, lb) = (load_predictions(p)["test"] for p in paths)
        if not (la.shape == lb.shape and bool((la == lb).all())):
            return None
        out += ((pa.argmax(-1) == la).float() - (pb.argmax(-1) == lb).float()).tolist()
    return out or None


def _averages(method: str, runs: dict) -> dict:
    """A method's runs (by task and seed) as one entry: their count and mean test accuracy
    and trained parameters."""
    return {"method": method, "n": len(runs),
            "test_acc": statistics.mean(_f(r["test_acc"]) for r in runs.values()),
            "updated_params": statistics.mean(_f(r["updated_params"]) for r in runs.values())}


def budget_groups(rows: list[dict], pred_dir=None) -> list[dict]:
    """Methods side by side at equal trained parameters.

    For every budget of the bench (its ``budget_params``), the methods that fit it: the
    budgeted ones run at that budget, and every natural-size method (linear probe,
    BitFit, norm tuning, ...) whose trained parameters (excl. head) are at most the
    budget. Natural-size methods above every budget are references. Per group and
    method: mean test accuracy over tasks and seeds, and for the group's SWR method
    (``swr``, else the first ``swr-*``) its paired difference against each other
    method with its 95% interval: over the (task, seed) pairs both ran (``unit``
    "runs"), or, with fewer than :data:`MIN_PAIRS` pairs and the bench's predictions
    in ``pred_dir``, over the test clips they were scored on (``unit`` "test clips": the
    interval of the test sample, one training per task and seed).
    """
    from ...stats import paired_interval

    runs: dict[tuple[str, str], dict[tuple[str, int], dict]] = {}
    for r in rows:
        runs.setdefault((r["method"], str(r["budget"])), {})[(r["task"], int(r["seed"]))] = r
    budgets = sorted({(str(r["budget"]), int(float(r["budget_params"])))
                      for r in rows if str(r["budget"]) != "natural" and _f(r.get("budget_params"))},
                     key=lambda b: b[1])
    natural = {m: rs for (m, b), rs in runs.items() if b == "natural"}
    groups = []
    for label, limit in budgets:
        members = {m: rs for (m, b), rs in runs.items() if b == label}
        members.update({m: rs for m, rs in natural.items()
                        if max(_f(r["updated_params"]) for r in rs.values()) <= limit})
        swr = "swr" if "swr" in members else next((m for m in sorted(members) if _is_swr(m)),
                                                  None)
        entries = []
        for m, rs in members.items():
            entry = {**_averages(m, rs), "budget": label, "limit": limit}
            if swr is not None and m != swr:
                common = sorted(set(rs) & set(members[swr]))
                d, unit = None, "runs"
                if common and len(common) < MIN_PAIRS and pred_dir is not None:
                    d, unit = _clip_differences(members[swr], rs, Path(pred_dir)), "test clips"
                if d is None and common:
                    d, unit = [_f(members[swr][k]["test_acc"]) - _f(rs[k]["test_acc"])
                               for k in common], "runs"
                if d:
                    entry["swr_minus"], entry["low"], entry["high"] = paired_interval(d)
                    entry["pairs"], entry["unit"] = len(d), unit
            entries.append(entry)
        entries.sort(key=lambda e: -e["test_acc"])
        groups.append({"budget": label, "limit": limit, "swr": swr, "methods": entries,
                       "best": entries[0]["method"] if entries else None})
    refs = {m for m, rs in natural.items()} - {e["method"] for g in groups for e in g["methods"]}
    if groups or refs:
        entries = [{**_averages(m, natural[m]), "budget": "natural"} for m in sorted(refs)]
        groups.append({"budget": "references", "limit": None, "swr": None,
                       "methods": sorted(entries, key=lambda e: -e["test_acc"]), "best": None})
    return groups


def budget_markdown(rows: list[dict], pred_dir=None) -> str:
    """:func:`budget_groups` as markdown: one table per budget, then the references."""
    lines = []
    for g in budget_groups(rows, pred_dir):
        if g["limit"] is None:
            if g["methods"]:
                lines += ["", "References (train more than every budget):", "",
                          "| method | trained params (excl. head) | test acc | runs |",
                          "|---|---|---|---|"]
                lines += [f"| {e['method']} | {e['updated_params']:,.0f} | {e['test_acc']:.4f} | "
                          f"{e['n']} |" for e in g["methods"]]
            continue
        who = g["swr"] or "SWR"
        lines += ["", f"At {g['budget']} ({g['limit']:,} trained parameters): best at <= "
                  f"{g['limit']:,} trained parameters: **{g['best']}**", "",
                  f"| method | trained params (excl. head) | test acc | {who} minus it "
                  "[95% interval] (paired over) |", "|---|---|---|---|"]
        for e in g["methods"]:
            diff = ""
            if "swr_minus" in e:
                ci = ("" if math.isnan(e["low"]) else
                      f" [{100 * e['low']:+.1f}, {100 * e['high']:+.1f}]")
                diff = f"{100 * e['swr_minus']:+.1f} points{ci} ({e['pairs']} {e['unit']})"
            lines.append(f"| {e['method']} | {e['updated_params']:,.0f} | {e['test_acc']:.4f} "
                         f"| {diff} |")
    if not lines:
        return ""
    return ("\n## At equal trained parameters\n\nTest accuracy averaged over tasks and seeds; "
            "differences in points, paired by task and seed (runs: a t-interval over the "
            "runs) or, with few runs, by test clip (an interval over the clips, which leaves "
            "training-seed variance out).\n"
            + "\n".join(lines) + "\n")


def _mean(values) -> Optional[float]:
    known = [v for v in values if v is not None]
    return statistics.mean(known) if known else None


def _fmt(v: Optional[float]) -> str:
    return "" if v is None else f"{v:.4f}"


def summarize_ensembles(pairs: list[dict]) -> list[dict]:
    """Mean over seeds per (task, members, budget)."""
    groups: dict[tuple, list[dict]] = {}
    for p in pairs:
        groups.setdefault((p["task"], p["members"], p["budget"]), []).append(p)
    return [{"task": t, "members": m, "budget": b, "n": len(ps),
             **{k: _mean(_f(p[k]) for p in ps) for k in ENSEMBLE_COLUMNS[4:]}}
            for (t, m, b), ps in groups.items()]


def wise_curves(rows: list[dict]) -> dict[str, list[dict]]:
    """Per task, the WiSE-FT curve (accuracies per mixing weight, mean over seeds)."""
    points: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        if r["method"] != "wise-ft":
            continue
        settings = json.loads(r["settings"]) if isinstance(r["settings"], str) else r["settings"]
        for pt in settings.get("curve", []):
            points.setdefault((r["task"], float(pt["alpha"])), []).append(pt)
    curves: dict[str, list[dict]] = {}
    for (task, alpha), pts in sorted(points.items()):
        curves.setdefault(task, []).append(
            {"alpha": alpha, **{k: _mean(_f(p.get(k)) for p in pts)
                                for k in ("val_acc", "test_acc", "shift_acc")}})
    return curves


def robustness_markdown(rows: list[dict], pairs: list[dict], top: int = 12) -> str:
    """The WiSE-FT curve and the best pairwise ensembles, per task ('' when neither ran)."""
    lines: list[str] = []
    for task, curve in wise_curves(rows).items():
        lines += ["", f"WiSE-FT on `{task}`: weights (1 - alpha) x linear probe + alpha x "
                  "fully fine-tuned (from the probe); alpha chosen on validation.", "",
                  "| alpha | val acc | test acc | shift acc |", "|---|---|---|---|"]
        lines += [f"| {p['alpha']:g} | {_fmt(p['val_acc'])} | {_fmt(p['test_acc'])} | "
                  f"{_fmt(p['shift_acc'])} |" for p in curve]
    summary = summarize_ensembles(pairs)
    for task in sorted({s["task"] for s in summary}):
        mine = sorted((s for s in summary if s["task"] == task), key=lambda s: -s["test_acc"])
        shown = mine[:top]
        lines += ["", f"Prediction ensembles on `{task}` (softmax average of two runs with the "
                  f"same seed; {len(shown)} best of {len(mine)} pairs by test accuracy, all in "
                  "ensembles.csv):", "",
                  "| members | budget | test acc | shift acc | best member test | "
                  "best member shift | test gain | shift gain |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in shown:
            gain = [None if a is None or b is None else a - b for a, b in
                    ((s["test_acc"], s["best_member_test_acc"]),
                     (s["shift_acc"], s["best_member_shift_acc"]))]
            lines.append(f"| {s['members']} | {s['budget']} | {_fmt(s['test_acc'])} | "
                         f"{_fmt(s['shift_acc'])} | {_fmt(s['best_member_test_acc'])} | "
                         f"{_fmt(s['best_member_shift_acc'])} | "
                         + " | ".join("" if g is None else f"{g:+.4f}" for g in gain) + " |")
    if not lines:
        return ""
    return "\n## Ensembles and robustness\n" + "\n".join(lines) + "\n"


