"""The ``swr`` command line: thin wrappers over the Python API.

Every command validates its input once here, prints progress on long work, writes
JSON/CSV results, and on bad input prints one line and exits with status 2
(``--debug`` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from .errors import ClusterLostError, SwrError

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable, str]] = {}


def _device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N or auto (a GPU when there is one; default)")


def _on_bad_file_arg(p: argparse.ArgumentParser, default: str | None = "fail") -> None:
    p.add_argument("--on-bad-file", choices=["fail", "skip"], default=default,
                   help="an unreadable audio/image file of a real dataset (imagefolder, "
                        "speechcommands, mswc): stop with its name (fail) or skip it and list "
                        "it in the results; default: "
                        + (default or "the policy the search ran with"))


def _report_skipped(command: str, skipped: list[str], where: str) -> None:
    """One stderr line summarising the files ``--on-bad-file skip`` left out."""
    if skipped:
        print(f"swr {command}: skipped {len(skipped)} unreadable file(s), e.g. {skipped[0]}; "
              f"all are listed in {where}", file=sys.stderr)


# -- swr inspect ----------------------------------------------------------------------
def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", required=True,
                   help="bcresnet-<tau> (tau in 1,1.5,2,3,6,8) or timm:<model_name>")
    p.add_argument("--weights", help="local safetensors / torch checkpoint (optional)")
    p.add_argument("--bias-delta", action="store_true", help="count bias deltas in layer costs")
    p.add_argument("--seed", type=int, default=0, help="seed of the fold self-check")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run_inspect(args: argparse.Namespace) -> int:
    import torch

    from .budget import backbone_params
    from .fold import fold_check
    from .reparam import candidates
    from .tasks.backbones import create_backbone, input_shape

    model = create_backbone(args.backbone, weights=args.weights).eval()
    layers = candidates(model, bias_delta=args.bias_delta)
    shape = input_shape(model, args.backbone)
    example = torch.randn((2, *shape), generator=torch.Generator().manual_seed(args.seed))
    check = fold_check(model, example, seed=args.seed)
    report = {
        "backbone": args.backbone,
        "layers": [c.as_dict() for c in layers],
        "total_params": sum(p.numel() for p in model.parameters()),
        "backbone_params": backbone_params(model),
        "candidate_params": sum(c.params for c in layers),
        "input_shape": list(shape),
        "fold_check": check,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    width = max((len(c.name) for c in layers), default=4)
    print(f"{'layer':<{width}}  {'kind':<9} {'shape':<22} {'params':>10}")
    for c in layers:
        print(f"{c.name:<{width}}  {c.kind:<9} {str(list(c.shape)):<22} {c.params:>10,}")
    print(f"\n{len(layers)} candidate layers, {report['candidate_params']:,} candidate params; "
          f"backbone {report['backbone_params']:,} params, total {report['total_params']:,}")
    ok = check["max_abs_diff"] <= 1e-5 and check["same_architecture"]
    print(f"fold self-check: max |reparam - folded| = {check['max_abs_diff']:.3g} with "
          f"{check['gates_open']}/{check['layers']} gates open, same architecture: "
          f"{check['same_architecture']} -> {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


COMMANDS["inspect"] = (_inspect_args, run_inspect,
                       "list candidate layers and costs, and self-check folding")


# -- swr pretrain ---------------------------------------------------------------------
def _pretrain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="source task, e.g. kws-synth:en, glyphs:source")
    p.add_argument("--backbone", required=True, help="bcresnet-<tau> or timm:<model_name>")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", help="initialise from a local safetensors / torch checkpoint")
    _on_bad_file_arg(p)
    _device_arg(p)


def run_pretrain(args: argparse.Namespace) -> int:
    from .pretrain import pretrain

    m = pretrain(args.task, args.backbone, args.out, epochs=args.epochs, lr=args.lr,
                 batch_size=args.batch_size, seed=args.seed, device=args.device,
                 weights=args.weights, on_bad_file=args.on_bad_file)
    print(f"{args.backbone} on {args.task}: test acc {m['test_acc']:.4f}, val acc "
          f"{m['val_acc']:.4f} (best epoch {m['best_epoch']}/{m['epochs']}), "
          f"{m['seconds'] / 60:.1f} min -> {args.out}")
    _report_skipped("pretrain", m.get("skipped_files", []), f"{args.out}/metrics.json")
    return 0


COMMANDS["pretrain"] = (_pretrain_args, run_pretrain,
                        "train the source model and write a checkpoint folder")


# -- swr search -----------------------------------------------------------------------
def _search_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="target task, e.g. kws-synth:de")
    p.add_argument("--checkpoint", required=True, help="folder written by swr pretrain")
    p.add_argument("--budget", required=True,
                   help="fraction (0.05), percentage (5%%) or parameter count (20000)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--policy", default="pg", help=_registered(
        lambda: "; ".join(f"{name}: {summary}" for name, (_, summary) in _searchers().items()))
        + " (default pg)")
    p.add_argument("--evaluations", type=int, default=200, help="distinct selections to score")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None,
                   help="Ray workers scoring in parallel (default: the machine's CPUs; 0 = no Ray)")
    p.add_argument("--ray-address", help="join a Ray cluster (ray start --head) instead of a "
                   "local one; if its head goes away the search stops with exit status 75 and "
                   "continues with --resume")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search in --out")
    p.add_argument("--supernet-epochs", type=int, default=10)
    p.add_argument("--samples-per-iteration", type=int, default=8, help="K selections per policy step")
    _on_bad_file_arg(p)
    _device_arg(p)


def run_search_cmd(args: argparse.Namespace) -> int:
    import os

    from .search import SearchConfig, run_search
    from .supernet import SupernetConfig

    workers = (os.cpu_count() or 1) if args.workers is None else args.workers
    cfg = SearchConfig(task=args.task, checkpoint=args.checkpoint, budget=args.budget,
                       out=args.out, policy=args.policy, seed=args.seed,
                       evaluations=args.evaluations, workers=workers, resume=args.resume,
                       device=args.device, ray_address=args.ray_address,
                       samples_per_iteration=args.samples_per_iteration,
                       supernet=SupernetConfig(epochs=args.supernet_epochs),
                       on_bad_file=args.on_bad_file)
    r = run_search(cfg)
    print(f"{r['policy']}: val score {r['val_score']:.4f} with {len(r['layers'])} layers, "
          f"cost {r['cost']}/{r['budget_params']} params, {r['evaluations']} evaluations "
          f"-> {args.out}/selection.json")
    _report_skipped("search", r.get("skipped_files", []), f"{args.out}/selection.json")
    return 0


COMMANDS["search"] = (_search_args, run_search_cmd,
                      "train the supernet and search a layer selection under a budget")


# -- swr finetune ---------------------------------------------------------------------
def _finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--selection", required=True, help="selection.json written by swr search")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--from-scratch", action="store_true",
                   help="start from zero deltas and a new head instead of the supernet's")
    _on_bad_file_arg(p, default=None)
    _device_arg(p)


def run_finetune(args: argparse.Namespace) -> int:
    from .finetune import finetune

    m = finetune(args.selection, args.out, epochs=args.epochs, lr=args.lr, seed=args.seed,
                 device=args.device, from_scratch=args.from_scratch, on_bad_file=args.on_bad_file)
    print(f"test acc {m['test_acc']:.4f} (val {m['val_acc']:.4f}), {m['updated_params']} updated "
          f"params, task delta {m['delta_bytes']} bytes, fold error {m['fold_max_abs_diff']:.2g} "
          f"-> {args.out}")
    _report_skipped("finetune", m.get("skipped_files", []), f"{args.out}/metrics.json")
    return 0


COMMANDS["finetune"] = (_finetune_args, run_finetune,
                        "train the selected deltas, fold them and export the task delta")


# -- swr fold -------------------------------------------------------------------------
def _fold_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="base checkpoint folder (swr pretrain)")
    p.add_argument("--delta", required=True, help="task_delta.safetensors (swr finetune)")
    p.add_argument("--out", required=True, help="output folder for the task model")
    p.add_argument("--onnx", action="store_true",
                   help="also export base and task models to ONNX and compare their graphs")


def run_fold(args: argparse.Namespace) -> int:
    import torch

    from .deploy import export_onnx, rebuild
    from .delta import read_task_delta
    from .io import write_json
    from .tasks.backbones import input_shape, save_checkpoint

    task_model, base, meta = rebuild(args.checkpoint, args.delta)
    _, delta_meta = read_task_delta(args.delta)
    out = Path(args.out)
    save_checkpoint(task_model, out / "model.safetensors", backbone=meta["backbone"],
                    task=str(delta_meta.get("task", "")))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    report = {"backbone": meta["backbone"], "task": delta_meta.get("task"),
              "delta_bytes": Path(args.delta).stat().st_size,
              "params": count(task_model), "base_params": count(base),
              "same_module_types": [type(m).__name__ for m in task_model.modules()]
              == [type(m).__name__ for m in base.modules()]}
    if args.onnx:
        x = torch.randn(1, *input_shape(base, meta["backbone"]))
        report["onnx"] = export_onnx(task_model, x, out / "model.onnx")
        report["onnx_base"] = export_onnx(base, x, out / "base.onnx")
        report["onnx_same_graph"] = report["onnx"]["ops"] == report["onnx_base"]["ops"]
    write_json(out / "fold.json", report)
    line = (f"task model {report['params']:,} params (base {report['base_params']:,}; "
            f"the head differs with the class count), delta {report['delta_bytes']:,} bytes")
    if args.onnx:
        line += (f"; ONNX nodes {report['onnx']['nodes']} vs base {report['onnx_base']['nodes']}, "
                 f"same op counts: {report['onnx_same_graph']}")
    print(line + f" -> {out}")
    return 0


COMMANDS["fold"] = (_fold_args, run_fold,
                    "rebuild a task model from the base checkpoint and its task delta")


# -- swr bench ------------------------------------------------------------------------
def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _searchers() -> dict:
    from .policies import SEARCHERS

    return SEARCHERS


def _method_names() -> list[str]:
    from .methods import METHODS
    from .search import register_swr_methods

    register_swr_methods()
    return list(METHODS)


def _registered(names: Callable[[], str]) -> str:
    """Help text listing registered names; the parser must build even on a broken install
    (torch failing to load), so that ``swr check`` can report it in one line."""
    try:
        return names()
    except (ImportError, OSError):
        return "see the README"


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", action="append", required=True,
                   help="target task; repeat it, or name a suite: kws-synth:all, glyphs:all, "
                        "imagenet-to-sketch:<root>")
    p.add_argument("--checkpoint", required=True, help="folder written by swr pretrain")
    p.add_argument("--methods", required=True, type=_csv_list,
                   help="comma-separated, of: " + _registered(lambda: ",".join(_method_names())))
    p.add_argument("--budgets", default="5%", type=_csv_list,
                   help="comma-separated budgets, e.g. 1%%,5%%,10%% (default 5%%)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    p.add_argument("--epochs", type=int, default=10, help="epochs for every method")
    p.add_argument("--lr", type=float, help="one learning rate for all methods (default: per method)")
    p.add_argument("--tune", action="store_true",
                   help="first tune each method's lr and own knob on validation with Ray Tune")
    p.add_argument("--workers", type=int, help="parallel runs as Ray tasks (default: CPUs)")
    p.add_argument("--swr-evaluations", type=int, default=100, help="search evaluations for swr*")
    p.add_argument("--resume", action="store_true", help="skip runs already in OUT/results.csv")
    _on_bad_file_arg(p)
    _device_arg(p)


def run_bench_cmd(args: argparse.Namespace) -> int:
    from .bench import BenchConfig, run_bench

    cfg = BenchConfig(tasks=args.task, checkpoint=args.checkpoint, methods=args.methods,
                      budgets=args.budgets, out=args.out, seeds=args.seeds, epochs=args.epochs,
                      lr=args.lr, tune=args.tune, workers=args.workers, device=args.device,
                      swr_evaluations=args.swr_evaluations, resume=args.resume,
                      on_bad_file=args.on_bad_file)
    if args.seeds < 1 or args.epochs < 1:
        raise SwrError("--seeds and --epochs must be at least 1")
    run_bench(cfg)
    print((Path(args.out) / "results.md").read_text())
    listed = Path(args.out) / "skipped_files.json"
    if listed.is_file():
        bad = sorted({p for paths in json.loads(listed.read_text()).values() for p in paths})
        _report_skipped("bench", bad, str(listed))
    return 0


COMMANDS["bench"] = (_bench_args, run_bench_cmd,
                     "run SWR and the PETL baselines at the same budgets, seeds and epochs")


# -- swr demo -------------------------------------------------------------------------
def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--suite", default="kws", choices=["kws", "glyphs"],
                   help="embedded suite: multilingual spoken words (default) or glyph images")
    p.add_argument("--quick", action="store_true", help="a few minutes on 2 CPU cores")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--workers", type=int, help="parallel runs as Ray tasks (default: CPUs)")
    _device_arg(p)


def run_demo_cmd(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, suite=args.suite, quick=args.quick, seeds=args.seeds,
             workers=args.workers, device=args.device)
    return 0


COMMANDS["demo"] = (_demo_args, run_demo_cmd,
                    "the main job: pretrain, then SWR vs baselines on several target tasks")


# -- swr check ------------------------------------------------------------------------
def _check_args(p: argparse.ArgumentParser) -> None:
    p.epilog = "example: swr check"


def run_check(args: argparse.Namespace) -> int:
    from .native import environment_error, installed_versions

    line = environment_error()
    if line is not None:
        print(f"swr check: error: {line}", file=sys.stderr)
        return 1
    versions = ", ".join(f"{n} {v}" for n, v in installed_versions().items())
    print(f"swr check: ok: native libraries load ({versions})")
    return 0


COMMANDS["check"] = (_check_args, run_check,
                     "self-check of the install: torch, torchvision and torchaudio load together")


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line (exit status 2), like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = _Parser(
        prog="swr", description="Budget-constrained transfer learning by Scalable Weight "
        "Reparametrization: choose which layers get a weight delta, train, fold.",
        epilog="Exit status: 0 done; 1 broken install (one line names the clashing packages "
        "and the reinstall command; `swr check` runs that test); 2 bad input (one line says which value or file); 75 the "
        "Ray cluster went away (rerun with --resume); 130 interrupted.")
    parser.add_argument("--version", action="version", version=f"swr {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (add_args, _, help) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        add_args(p)
        p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return parser


def _close_progress_bars() -> None:
    """End the progress bars an error cut short, so that its line starts a line of its own."""
    from tqdm.std import tqdm

    for bar in list(tqdm._instances):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _, run, _ = COMMANDS[args.command]
    try:
        return int(run(args) or 0)
    except (SwrError, OSError) as e:
        if getattr(args, "debug", False):
            raise
        if not isinstance(e, SwrError) and _report_broken_install(args.command):
            return 1
        # A Ray task's error carries the remote traceback; its cause is the one line.
        cause = getattr(e, "cause", None)
        if isinstance(cause, SwrError):
            e = cause
        _close_progress_bars()
        if isinstance(e, OSError) and not isinstance(e, SwrError) and e.filename:
            msg = f"{e.strerror or e}: {e.filename}"
        else:
            msg = " ".join(str(e).split()) or type(e).__name__
        print(f"swr {args.command}: error: {msg}", file=sys.stderr)
        # 75 (EX_TEMPFAIL): nothing was wrong with the input; retry with --resume
        return 75 if isinstance(e, ClusterLostError) else 2
    except KeyboardInterrupt:
        _close_progress_bars()
        print(f"swr {args.command}: interrupted; rerun with --resume where supported",
              file=sys.stderr)
        return 130
    except Exception:
        # A native library that fails to load is a broken install, not bad input.
        if not getattr(args, "debug", False) and _report_broken_install(args.command):
            return 1
        raise


def _report_broken_install(command: str) -> bool:
    """Print the one line naming a broken torch/torchvision/torchaudio install, if it is one."""
    from .native import environment_error

    line = environment_error()
    if line is None:
        return False
    _close_progress_bars()
    print(f"swr {command}: error: {line}", file=sys.stderr)
    return True


if __name__ == "__main__":
    sys.exit(main())
