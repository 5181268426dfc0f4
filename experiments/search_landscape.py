"""A whole search space, scored and final-trained: what each searcher's choice is worth.

When a budget admits few selections (``glyphs:fine`` at 5% on resnet10t: 510), every
one of them can be scored on the supernet (the search's proxy), and the proxy's best
``--top`` plus a uniform sample of ``--sample`` final-trained (what the user gets). With
both tables, any searcher is replayed against them at no cost, for as many search seeds
as wanted: where its choice ranks by proxy and the final test accuracy it reaches, paired
by search seed. Beside that: the proxy's rank correlation with final accuracy over the
sample and within its best tenth, what each layer adds to final accuracy and to the
proxy, and, for two seeds of one space, the noise ceiling (how a second final training
ranks the same selections). Supernet and final-training seed are fixed (``--seed``), so
the replays' intervals cover the search's randomness only.

    python benchmarks/search_landscape.py --task 'glyphs:fine?images=30,60,100=CKPT_GLYPHS' \\
        --budget 5% --seed 0 --supernet-epochs 40 --epochs 8 --part 0 --parts 2 &
    python benchmarks/search_landscape.py ... --part 1 --parts 2   # the other half
    python benchmarks/search_landscape.py ...                       # report

The scoring (one process) comes first; final trainings go to ``OUT/finals-<part>.jsonl``
as they finish, so ``--parts N`` runs N processes side by side and an interrupted run
continues where it stopped. A run without ``--part`` trains what is left, replays the
searchers and writes ``OUT/results.json`` and experiments/SEARCH.md
between the ``bench:search_landscape`` markers (one section for all stored landscapes).
"""

from __future__ import annotations

import argparse
import glob
import json
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from _common import (folder_slug, md_table, mean_ci95, task_checkpoint,  # noqa: E402
                     write_section)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", required=True, metavar="SPEC=CHECKPOINT",
                   help="the task and the swr pretrain folder of its base")
    p.add_argument("--budget", default="5%")
    p.add_argument("--seed", type=int, default=0, help="supernet and final-training seed")
    p.add_argument("--supernet-epochs", type=int, default=40, help="stage-1 epochs")
    p.add_argument("--supernet-gates", default="budget", choices=["budget", "bernoulli"])
    p.add_argument("--epochs", type=int, default=8, help="final training epochs")
    p.add_argument("--max-selections", type=int, default=2000,
                   help="refuse a space larger than this")
    p.add_argument("--top", type=int, default=120,
                   help="final-train the proxy's best this many (the searchers' choices)")
    p.add_argument("--sample", type=int, default=150,
                   help="and a uniform sample of this many (the rank correlation)")
    p.add_argument("--evaluations", default="8,16,32",
                   help="distinct evaluations per replayed search (comma-separated)")
    p.add_argument("--search-seeds", type=int, default=50, help="replays per searcher")
    p.add_argument("--searchers", default="pg,knapsack,random",
                   help="replayed searchers, the first compared with the others (pg:K=V/K=V: pg "
                        "with those PGConfig fields, e.g. pg:order=network)")
    p.add_argument("--bn-stats", default="val", choices=["val", "supernet", "train"],
                   help="the proxy's BatchNorm statistics: 'val' is the search's own scoring; "
                        "another scores the stored space again with those (the final "
                        "trainings are shared)")
    p.add_argument("--score-only", action="store_true",
                   help="no final training: replay the searchers on the proxy table alone")
    p.add_argument("--part", type=int, default=None, help="final-train only this part ...")
    p.add_argument("--parts", type=int, default=1, help="... of this many")
    p.add_argument("--out", default=str(ROOT / "runs" / "search_landscape"))
    p.add_argument("--no-doc", action="store_true", help="do not rewrite experiments/SEARCH.md")
    args = p.parse_args(argv)
    args.spec, args.ckpt = task_checkpoint(p, args.task)
    args.searchers = [x.strip() for x in args.searchers.split(",") if x.strip()]
    args.eval_list = [int(x) for x in args.evaluations.split(",") if x.strip()]
    args.folder = (Path(args.out) / folder_slug(args.spec)
                   / f"b{args.budget.rstrip('%')}-s{args.seed}")
    return args


# -- the two tables -----------------------------------------------------------------------
def register_exhaustive() -> None:
    """Searcher ``exhaustive`` (this script's own): scores every feasible selection and
    keeps the problem (names, costs, stage-1 statistics) for the replays."""
    from swr.io import write_json
    from swr.policies.registry import register_searcher
    from swr.policies.search import PoolSearcher

    class Exhaustive(PoolSearcher):
        """The search driver scores every selection itself when they are no more than
        the evaluations (``--max-selections``); this keeps the problem first."""

        name = "exhaustive"

        def __call__(self, problem):
            write_json(problem.out / "problem.json",
                       {"names": problem.names, "costs": [int(c) for c in problem.costs],
                        "budget": int(problem.budget_params),
                        "stats": [{k: v if isinstance(v, str) else float(v) for k, v in s.items()}
                                  for s in problem.stats]})
            return super().__call__(problem)

        def propose(self, problem, run) -> None:  # only for a space over the evaluations
            sys.exit(f"more selections fit this budget than --max-selections "
                     f"{run.evaluations_left()}")

    register_searcher("exhaustive", Exhaustive, "every feasible selection (benchmark only)")


def score_all(args) -> None:
    from swr.app.search import SearchConfig, run_search
    from swr.supernet import SupernetConfig

    if (args.folder / "selection.json").is_file():
        return
    register_exhaustive()
    cfg = SearchConfig(task=args.spec, checkpoint=args.ckpt, budget=args.budget,
                       out=str(args.folder), policy="exhaustive", seed=args.seed,
                       evaluations=args.max_selections, device="cpu", progress=True,
                       norms="none", supernet=SupernetConfig(epochs=args.supernet_epochs,
                                                             gates=args.supernet_gates))
    sel = run_search(cfg)
    # every selection, once
    assert sel["evaluations"] == sel["feasible_selections"], sel["evaluations"]


def scores(folder: Path, bn_stats: str = "val") -> dict[tuple[str, ...], float]:
    """The proxy's score of every selection, in the order they were scored (``bn_stats``
    other than the search's own "val": the table :func:`rescore` wrote)."""
    name = "evaluations.jsonl" if bn_stats == "val" else f"evaluations-bn-{bn_stats}.jsonl"
    rows = map(json.loads, (folder / name).read_text().splitlines())
    return {tuple(r["selection"]): r["score"] for r in rows}


def rescore(args) -> None:
    """Score every selection of the space again on its supernet, with BatchNorm statistics
    from ``args.bn_stats`` (log-likelihood, as the search scores)."""
    from safetensors.torch import load_file

    from swr.envs.evaluator import SupernetEvaluator
    from swr.io import write_text
    from swr.source import BaseSpec, load_base, load_task
    from swr.supernet import SupernetConfig, new_supernet

    target = args.folder / f"evaluations-bn-{args.bn_stats}.jsonl"
    if args.bn_stats == "val" or target.is_file():
        return
    sel = json.loads((args.folder / "selection.json").read_text())
    base, meta = load_base(BaseSpec.from_dict(sel["base"], "selection.json"))
    task = load_task(sel["task"], meta)
    model = new_supernet(base, task.num_classes, SupernetConfig(seed=args.seed))
    model.load_state_dict(load_file(str(Path(sel["supernet"]) / "supernet.safetensors")))
    evaluator = SupernetEvaluator(model, task, metric="loglik", bn_stats=args.bn_stats)
    rows = [{"selection": list(k), "score": evaluator(k)} for k in scores(args.folder)]
    write_text(target, "".join(json.dumps(r) + "\n" for r in rows))


def finals(folder: Path) -> dict[tuple[str, ...], dict]:
    out = {}
    for f in sorted(glob.glob(str(folder / "finals-*.jsonl"))):
        for r in map(json.loads, Path(f).read_text().splitlines()):
            out[tuple(r["selection"])] = r
    return out


def shuffled(table: dict) -> list[tuple[str, ...]]:
    """The space in a fixed random order: any prefix is a uniform sample."""
    sels = list(table)
    return [sels[j] for j in np.random.default_rng(0).permutation(len(sels))]


def work_order(table: dict[tuple[str, ...], float], top: int, sample: int
               ) -> list[tuple[str, ...]]:
    """What is final-trained, in order: the proxy's ``top`` best (where the searchers'
    choices fall), then the first ``sample`` of :func:`shuffled` (the uniform sample the
    rank correlation is measured on)."""
    best = sorted(table, key=lambda k: -table[k])[:top]
    seen = set(best)
    return best + [k for k in shuffled(table)[:sample] if k not in seen]


def train_all(args, part: int, parts: int) -> None:
    """Final-train this part's share of :func:`work_order`, appending each result as it
    finishes (an interrupted run continues where it stopped)."""
    from swr.app.finetune import finetune

    done = finals(args.folder)
    table = scores(args.folder, args.bn_stats)
    todo = [k for k in work_order(table, args.top, args.sample)[part::parts]
            if k not in done]
    print(f"part {part}/{parts}: {len(todo)} selections to final-train")
    for i, sel in enumerate(todo):
        tmp = Path(tempfile.mkdtemp(dir=args.folder))
        try:
            m = finetune(args.folder / "selection.json", tmp / "final", layers=list(sel),
                         epochs=args.epochs, seed=args.seed, device="cpu", progress=False)
        finally:
            shutil.rmtree(tmp)
        with open(args.folder / f"finals-{part}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"selection": list(sel), "val_acc": m["val_acc"],
                                "test_acc": m["test_acc"]}) + "\n")
        print(f"  {i + 1}/{len(todo)} test {100 * m['test_acc']:.2f}%", flush=True)


# -- replaying searchers ------------------------------------------------------------------
class _Log:
    def __init__(self) -> None:
        self.seen: dict[tuple[str, ...], float] = {}
        self.best: tuple[float, tuple[str, ...]] = (-float("inf"), ())


class TableRun:
    """A search run whose scores come from the table: counts distinct evaluations and
    serves repeats as :class:`swr.policies.search.SearchRun` does."""

    def __init__(self, names, costs, budget: int, table: dict, limit: int):
        self.names, self.costs, self.budget = names, np.asarray(costs), budget
        self.table, self.limit, self.log = table, limit, _Log()

    def evaluations_left(self) -> int:
        return self.limit - len(self.log.seen)

    def _key(self, mask) -> tuple[str, ...]:
        return tuple(n for n, m in zip(self.names, mask) if m)

    def is_new(self, mask) -> bool:
        return self._key(mask) not in self.log.seen

    def score(self, masks) -> list[float]:
        out = []
        for mask in masks:
            key = self._key(mask)
            if key not in self.log.seen:
                if len(self.log.seen) >= self.limit:
                    out.append(float("nan"))
                    continue
                self.log.seen[key] = self.table[key]
                if self.table[key] > self.log.best[0]:
                    self.log.best = (self.table[key], key)
            out.append(self.log.seen[key])
        return out


def replay(problem: dict, table: dict, searcher: str, evaluations: int, seed: int
           ) -> tuple[str, ...]:
    """The selection ``searcher`` ends with (its best-scoring one); ``pg:K=V/K=V`` is pg
    with those :class:`PGConfig` fields changed."""
    from swr.policies.pg import PGConfig, PGSearcher
    from swr.policies.registry import SearchSettings
    from swr.policies.selectors import run_selector
    from swr.selection import SearchProblem

    run = TableRun(problem["names"], problem["costs"], problem["budget"], table, evaluations)
    if searcher.startswith("pg"):
        settings = SearchSettings(evaluations=evaluations, seed=seed, progress=False)
        cfg = PGConfig()
        for item in filter(None, searcher.partition(":")[2].split("/")):
            key, _, value = item.partition("=")
            cfg = replace(cfg, **{key: type(getattr(cfg, key))(value)})
        with tempfile.TemporaryDirectory() as tmp:
            sp = SearchProblem(None, None, problem["names"], problem["costs"], problem["budget"],
                               problem["stats"], Path(tmp))
            PGSearcher(settings, cfg).propose(sp, run)
    else:
        values = np.array([s["taylor"] for s in problem["stats"]])
        run_selector(searcher, values, problem["costs"], problem["budget"], evaluations, seed, run)
    return run.log.best[1]


def report(args) -> dict:
    """Replay the searchers; with ``--score-only`` on the proxy table alone."""
    from swr.stats import kendall_tau

    problem = json.loads((args.folder / "problem.json").read_text())
    table, fin = scores(args.folder, args.bn_stats), finals(args.folder)
    ordered = np.sort(np.array(list(table.values())))

    def rank(k) -> int:  # 0: the proxy's best
        return len(ordered) - int(np.searchsorted(ordered, table[k], side="right"))

    res = {"task": args.spec, "budget": args.budget, "seed": args.seed, "folder": str(args.folder),
           "supernet_epochs": args.supernet_epochs, "selections": len(table),
           "bn_stats": args.bn_stats,
           "searchers": list(args.searchers), "search_seeds": args.search_seeds,
           "finals": not args.score_only, "replays": []}
    if not args.score_only:
        sample = shuffled(table)[:args.sample]
        best = sorted(table, key=lambda k: -table[k])[:args.top]
        missing = [k for k in sample + best if k not in fin]
        if missing:
            sys.exit(f"{args.folder}: {len(missing)} selections not final-trained yet")
        proxy = [table[k] for k in sample]
        test = np.array([100 * fin[k]["test_acc"] for k in sample])
        tenth = best[:max(10, len(table) // 10)]
        layers = {}  # what including each layer does, on average over the sample
        for i, name in enumerate(problem["names"]):
            inside = [k for k in sample if name in k]
            outside = [k for k in sample if name not in k]
            if inside and outside:
                layers[name] = {
                    "cost": problem["costs"][i], "in_sample": len(inside),
                    "final": float(np.mean([100 * fin[k]["test_acc"] for k in inside])
                                   - np.mean([100 * fin[k]["test_acc"] for k in outside])),
                    "proxy": float(np.mean([table[k] for k in inside])
                                   - np.mean([table[k] for k in outside]))}
        res.update({"epochs": args.epochs, "sample": len(sample), "layers": layers,
                    "tau_layer_count": kendall_tau([len(k) for k in sample], test),
                    "test_best": float(test.max()), "test_median": float(np.median(test)),
                    "test_proxy_best": 100 * fin[best[0]]["test_acc"],
                    "tau_val": kendall_tau(proxy, [fin[k]["val_acc"] for k in sample]),
                    "tau_test": kendall_tau(proxy, test), "top": len(tenth),
                    "tau_top": kendall_tau([table[k] for k in tenth],
                                           [fin[k]["test_acc"] for k in tenth])})
    first = args.searchers[0]
    for e in args.eval_list:
        chosen = {s: [replay(problem, table, s, e, seed) for seed in range(args.search_seeds)]
                  for s in args.searchers}
        row: dict = {"evaluations": e}
        for s, sels in chosen.items():
            row[s] = {"proxy_rank_mean": float(np.mean([rank(k) for k in sels])),
                      "proxy_best_share": float(np.mean([rank(k) == 0 for k in sels]))}
        if not args.score_only:
            outside = {k for sels in chosen.values() for k in sels if k not in fin}
            if outside:
                sys.exit(f"{args.folder}: {len(outside)} chosen selections are beyond the "
                         f"proxy's best {args.top}: rerun with a larger --top")
            for s, sels in chosen.items():
                row[s]["test_mean"] = float(np.mean([100 * fin[k]["test_acc"] for k in sels]))
            for other in args.searchers[1:]:
                d = [100 * (fin[a]["test_acc"] - fin[b]["test_acc"])
                     for a, b in zip(chosen[first], chosen[other])]
                row[f"{first}-{other}"] = list(mean_ci95(d)) if len(set(d)) > 1 else [d[0]] * 3
        res["replays"].append(row)
        print(json.dumps(row))
    from swr.io import write_json

    prefix = "" if args.bn_stats == "val" else f"bn-{args.bn_stats}-"
    write_json(args.folder / (prefix + ("proxy-results.json" if args.score_only
                                        else "results.json")), res)
    return res


def retests(results: list[dict]) -> list[dict]:
    """Pairs of final-trained spaces of one task and budget (the same selections, other
    seeds): how a second final training ranks the selections of both uniform samples (the
    noise ceiling of any proxy), the per-training spread, and how the two supernets'
    proxies agree."""
    from swr.stats import kendall_tau

    out = []
    done = [r for r in results if r["finals"] and r.get("bn_stats", "val") == "val"]
    for i, a in enumerate(done):
        for b in done[i + 1:]:
            if (a["task"], a["budget"]) != (b["task"], b["budget"]):
                continue
            fa, fb = Path(a["folder"]), Path(b["folder"])
            ta, tb = scores(fa), scores(fb)
            if list(ta) != list(tb):
                continue
            common = [k for k in shuffled(ta)[:min(a["sample"], b["sample"])]]
            xa, xb = finals(fa), finals(fb)
            test_a = np.array([100 * xa[k]["test_acc"] for k in common])
            test_b = np.array([100 * xb[k]["test_acc"] for k in common])
            out.append({"task": a["task"], "budget": a["budget"], "seeds": (a["seed"], b["seed"]),
                        "selections": len(common),
                        "tau_val": kendall_tau([xa[k]["val_acc"] for k in common],
                                               [xb[k]["val_acc"] for k in common]),
                        "tau_test": kendall_tau(test_a, test_b),
                        "sd_training": float(np.std(test_a - test_b) / np.sqrt(2)),
                        "tau_proxies": kendall_tau([ta[k] for k in common],
                                                   [tb[k] for k in common])})
    return out


def space(r: dict) -> str:
    """A space's label: task, budget, seed, and the proxy's statistics unless the search's."""
    bn = r.get("bn_stats", "val")
    return (f"{r['task']} {r['budget']} (seed {r['seed']}"
            + ("" if bn == "val" else f", proxy with {bn} BN statistics") + ")")


def render(results: list[dict]) -> str:
    finals_done = [r for r in results if r["finals"]]
    lines = [
        "Every feasible selection of one budget scored on its supernet (the proxy, "
        "log-likelihood), then each searcher replayed against that table over many search "
        "seeds with the same number of distinct evaluations. Where the space was also "
        "final-trained (the proxy's best selections and a uniform sample), the replays "
        "report the final test accuracy of each searcher's choice. Supernet and final-training "
        "seed are fixed per space, so intervals are over search seeds only.", ""]
    if finals_done:
        rows = [[space(r), r["selections"], r["sample"],
                 f"{r['test_best']:.2f} / {r['test_median']:.2f}", f"{r['test_proxy_best']:.2f}",
                 f"{r['tau_val']:.2f} / {r['tau_test']:.2f}", f"{r['tau_top']:.2f} ({r['top']})",
                 f"{r['tau_layer_count']:.2f}"]
                for r in finals_done]
        lines += [md_table(["space", "selections", "uniform sample final-trained",
                            "sample's final test best / median (%)",
                            "final test of the proxy's best", "tau proxy vs final val / test",
                            "tau within the proxy's best tenth (how many)",
                            "tau layer count vs final test"], rows), ""]
        pairs = retests(results)
        if pairs:
            rows = [[f"{p['task']} {p['budget']}", f"{p['seeds'][0]} and {p['seeds'][1]}",
                     p["selections"], f"{p['tau_val']:.2f} / {p['tau_test']:.2f}",
                     f"{p['sd_training']:.2f}", f"{p['tau_proxies']:.2f}"] for p in pairs]
            lines += ["The noise ceiling: the same selections (the uniform sample both spaces "
                      "trained) final-trained with two seeds. No proxy can rank final accuracy "
                      "better than a second final training does.", "",
                      md_table(["space", "seeds", "selections",
                                "tau final seed A vs seed B, val / test",
                                "spread of one final training (test points, sd)",
                                "tau proxy of supernet A vs B"], rows), ""]
        for r in finals_done:
            rows = [[name, x["cost"], x["in_sample"], f"{x['final']:+.2f}", f"{x['proxy']:+.3f}"]
                    for name, x in r["layers"].items()]
            lines += [f"What each layer does in {space(r)}: mean "
                      "over the uniform sample of the selections with it minus those without it, "
                      "in final test points and in proxy score (log-likelihood).", "",
                      md_table(["layer", "delta parameters", "selections with it",
                                "final test with - without", "proxy with - without"], rows), ""]
    names = results[0]["searchers"]
    rows = []
    for r in finals_done:
        for x in r["replays"]:
            rows.append([space(r), x["evaluations"],
                         *(f"{x[s]['test_mean']:.2f}% (rank {x[s]['proxy_rank_mean']:.1f}, "
                           f"best {100 * x[s]['proxy_best_share']:.0f}%)" for s in names)])
    if rows:
        lines += ["Replayed searches on the final-trained spaces, per searcher: mean final test "
                  "accuracy of its choice over the search seeds; in brackets the mean proxy "
                  "rank of the choice (0: the best of the whole space) and how often it is "
                  "that best.", "", md_table(["space", "evaluations", *names], rows), ""]
    rows = [[space(r), r["selections"],
             " / ".join(str(x["evaluations"]) for x in r["replays"]), r["search_seeds"],
             *(" / ".join(f"{x[s]['proxy_rank_mean']:.1f}" for x in r["replays"]) for s in names)]
            for r in results]
    lines += ["Every space, on the proxy alone: the mean proxy rank of each searcher's choice "
              "(0: the space's best selection by proxy) at each evaluation count.", "",
              md_table(["space", "selections", "evaluations", "search seeds", *names], rows)]
    diffs = [[space(r), x["evaluations"],
              *(f"{x[k][0]:+.2f} [{x[k][1]:+.2f}, {x[k][2]:+.2f}]"
                for k in (f"{names[0]}-{o}" for o in names[1:]))]
             for r in finals_done for x in r["replays"]]
    if diffs:
        lines += ["", "Paired final test differences over search seeds (points, 95% t interval):",
                  "", md_table(["space", "evaluations",
                                *(f"{names[0]} - {o}" for o in names[1:])], diffs)]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    args.folder.mkdir(parents=True, exist_ok=True)
    score_all(args)
    rescore(args)
    if args.part is not None:
        train_all(args, args.part, args.parts)
        return
    if not args.score_only:
        train_all(args, 0, 1)
    report(args)
    found = {}
    for f in sorted(glob.glob(str(Path(args.out) / "*" / "*" / "*results.json"))):
        r = json.loads(Path(f).read_text())
        key = (r["task"], r["budget"], r["seed"], r.get("bn_stats", "val"))
        if r["finals"] or key not in found:  # a final-trained space over its proxy-only one
            found[key] = r
    if not args.no_doc:
        write_section("search_landscape", "A whole search space, scored and final-trained",
                      render(list(found.values())), doc=ROOT / "experiments" / "SEARCH.md")


if __name__ == "__main__":
    main()
