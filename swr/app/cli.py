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

from ..budget import NORM_MODES
from ..envs.evaluator import BN_CLIPS, EVALUATORS, PROXY_EPOCHS
from ..errors import ClusterLostError, SwrError, handle_sigterm, was_terminated

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable, str]] = {}


def _device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N or auto (a GPU when there is one; default)")


# -- numeric options: the one set of argparse types every command's numbers go through.
# A bad value ends the command at parsing, in one line naming the option and the value.
def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None


def _int_at_least(minimum: int, bound: str, doc: str) -> Callable[[str], int]:
    """An argparse type: an integer of ``minimum`` or more, else "``text`` must be
    ``bound``"."""
    def check(text: str) -> int:
        n = _int(text)
        if n < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} must be {bound}")
        return n

    check.__doc__ = doc
    return check


positive_int = _int_at_least(1, "a positive integer (1 or more)",
                             "An integer of 1 or more (epochs, evaluations, samples, ...).")
non_negative_int = _int_at_least(0, "0 or more", "An integer of 0 or more (0: none or off).")
workers_count = _int_at_least(0, "0 (no Ray) or more",
                              "``--workers`` of search, bench and demo: 0 (no Ray) or more.")


def positive_finite_float(text: str) -> float:
    """A finite number above 0 (a learning rate)."""
    import math

    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not math.isfinite(x) or x <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number above 0, e.g. 0.003")
    return x


def _on_bad_file_arg(p: argparse.ArgumentParser, default: str | None = "fail") -> None:
    p.add_argument("--on-bad-file", choices=["fail", "skip"], default=default,
                   help="an unreadable audio/image file of a real dataset (imagefolder, "
                        "speechcommands, mswc): stop with its name (fail) or skip it and list "
                        "it in the results; default: "
                        + (default or "the policy the search ran with"))


#: Whether the advanced options are shown (``swr <command> --help-advanced``).
_SHOW_ADVANCED = False


class _Advanced:
    """Options a user rarely sets (research knobs, recovery): parsed always, listed only
    by ``--help-advanced``, so ``--help`` shows what a user chooses."""

    def __init__(self, p: argparse.ArgumentParser):
        self.group = p.add_argument_group("advanced options") if _SHOW_ADVANCED else p

    def add_argument(self, *args, **kwargs):
        if not _SHOW_ADVANCED:
            kwargs["help"] = argparse.SUPPRESS
        return self.group.add_argument(*args, **kwargs)


def _advanced(p: argparse.ArgumentParser) -> _Advanced:
    if not any(a.dest == "help_advanced" for a in p._actions):
        p.add_argument("--help-advanced", action="help",
                       help="show this help with the advanced options too")
    return _Advanced(p)


def _overwrite_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run an existing --out holds (refused without it)")


def _base_args(p: argparse.ArgumentParser) -> None:
    """The base model, in either form: a swr pretrain folder, or a backbone + weights file."""
    p.add_argument("--checkpoint", help="base model: folder written by swr pretrain")
    p.add_argument("--backbone", help="base model: a backbone name (swr list backbones), with "
                   "--weights (instead of --checkpoint)")
    p.add_argument("--weights", help="the backbone's pre-trained weights: a local safetensors "
                   "file or torch checkpoint (read with weights_only=True); image tasks then use "
                   "the model's timm data config (size, mean, std, interpolation, crop)")


def _base_spec(args: argparse.Namespace):
    from ..source import base_spec

    return base_spec(args.checkpoint, args.backbone, args.weights)


def _float_list(text: str) -> tuple[float, ...]:
    """An argparse type: comma-separated numbers (``0.5`` or ``0.485,0.456,0.406``)."""
    try:
        return tuple(float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid list of numbers: {text!r}") from None


def _data_args(p) -> None:
    """``--image-size``, ``--mean``, ``--std``: image inputs prepared otherwise than the base's
    own data config says (checked by :class:`swr.tasks.base.DataOverride`)."""
    p.add_argument("--image-size", type=_int, metavar="PX",
                   help="image tasks: prepare inputs at PX x PX pixels (8 to 4096) instead of "
                        "the base's own size")
    for name, example in (("mean", "0.5"), ("std", "0.25")):
        p.add_argument(f"--{name}", type=_float_list, metavar="X[,X,X]",
                       help=f"image tasks: normalisation {name} per R,G,B channel (one value: "
                            f"all three; e.g. {example}) instead of the base's own")


def _data_override(args: argparse.Namespace):
    """The checked :class:`~swr.tasks.base.DataOverride` of the options, or None."""
    from ..tasks.base import DataOverride

    return DataOverride(args.image_size, args.mean, args.std) or None


def _report_skipped(command: str, skipped: list[str], where: str) -> None:
    """One stderr line summarising the files ``--on-bad-file skip`` left out."""
    if skipped:
        print(f"swr {command}: skipped {len(skipped)} unreadable file(s), e.g. {skipped[0]}; "
              f"all are listed in {where}", file=sys.stderr)


# -- swr inspect ----------------------------------------------------------------------
def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", required=True,
                   help="a backbone name: bcresnet-<tau>, dscnn-<s|m|l>, timm:<model_name> "
                        "(swr list backbones)")
    p.add_argument("--weights", help="local safetensors / torch checkpoint (optional)")
    p.add_argument("--bias-delta", action="store_true", help="count bias deltas in layer costs")
    p.add_argument("--seed", type=int, default=0, help="seed of the fold self-check")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run_inspect(args: argparse.Namespace) -> int:
    import torch

    from ..budget import backbone_params
    from ..fold import fold_check
    from ..reparam import candidates
    from ..tasks.backbones import create_backbone, input_shape

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
    ok = check["ok"]
    print(f"fold self-check: max |reparam - folded| = {check['max_abs_diff']:.3g} "
          f"(tolerance {check['tolerance']:.2g}) with "
          f"{check['gates_open']}/{check['layers']} gates open, same architecture: "
          f"{check['same_architecture']} -> {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


COMMANDS["inspect"] = (_inspect_args, run_inspect,
                       "list candidate layers and costs, and self-check folding")


# -- swr pretrain ---------------------------------------------------------------------
def _pretrain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="source task, e.g. kws-synth:en, glyphs:source")
    p.add_argument("--backbone", required=True,
                   help="a backbone name: bcresnet-<tau>, dscnn-<s|m|l>, timm:<model_name> "
                        "(swr list backbones)")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--epochs", type=positive_int, default=40)
    p.add_argument("--lr", type=positive_finite_float, default=1e-2)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", help="initialise from a local safetensors / torch checkpoint")
    _data_args(p)
    _on_bad_file_arg(p)
    _device_arg(p)
    _overwrite_arg(p)


def run_pretrain(args: argparse.Namespace) -> int:
    from ..pretrain import pretrain

    m = pretrain(args.task, args.backbone, args.out, epochs=args.epochs, lr=args.lr,
                 batch_size=args.batch_size, seed=args.seed, device=args.device,
                 weights=args.weights, on_bad_file=args.on_bad_file, overwrite=args.overwrite,
                 data_override=_data_override(args))
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
    _base_args(p)
    p.add_argument("--budget", required=True,
                   help="fraction (0.05), percentage (5%%) or parameter count (20000); a comma "
                        "list (1%%,2%%,5%%,10%%) is one search of all, writing "
                        "OUT/budget-1%%/selection.json ... and OUT/selections.json")
    p.add_argument("--out", required=True, help="output folder")
    # the list is shown, and checked by SearchConfig (one line naming the value, exit 2)
    p.add_argument("--policy", default="pg",
                   metavar=_registered(lambda: "{" + ",".join(_searchers()) + "}", "POLICY"),
                   help=_registered(lambda: "; ".join(
                       f"{name}: {summary}" for name, (_, summary) in _searchers().items())))
    p.add_argument("--evaluations", type=positive_int, default=40,
                   help="distinct selections to score, in total over a list of budgets (when "
                        "no more selections fit the budget, all of them are scored)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=workers_count, default=None,
                   help="Ray workers scoring in parallel (default: one per CPU this process may "
                        "use, or per CPU of the --ray-address cluster; more are reduced to that "
                        "with a notice; 0 = no Ray)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search in --out")
    _device_arg(p)
    adv = _advanced(p)
    adv.add_argument("--ray-address", help="join a Ray cluster (ray start --head) instead of a "
                     "local one; if its head goes away the search stops with exit status 75 and "
                     "continues with --resume")
    _overwrite_arg(adv)
    adv.add_argument("--train-memory", default=None, metavar="SIZE",
                     help="a training-memory budget beside --budget: what one training step "
                          "saves for backward, as a share of full fine-tuning's (30%%) or a size "
                          "(2MiB, 500KB, bytes); every selection fits both (default: none)")
    adv.add_argument("--norms", choices=list(NORM_MODES), default="auto",
                     help="the task norms SWR trains beside the deltas: auto (default) counts "
                          "them in --budget when they fit, leaving the rest to deltas, else "
                          "trains deltas only; budget counts them or stops; none trains deltas "
                          "only; free trains them outside the budget")
    _on_bad_file_arg(adv)
    adv.add_argument("--supernet-epochs", type=positive_int, default=10,
                     help="epochs of stage 1 (the supernet)")
    adv.add_argument("--supernet-gates", default="budget", help="how stage 1 opens gates per "
                     "batch: budget (a random selection within --budget, the kind the search "
                     "scores) or bernoulli (each gate independently)")
    adv.add_argument("--evaluator", default="supernet", choices=list(EVALUATORS),
                     help="what scores a selection: supernet (its shared deltas on the stage-1 "
                     "supernet) or trained (a short training of the selection's own deltas "
                     "and the head from the supernet, --proxy-epochs epochs)")
    adv.add_argument("--proxy-epochs", type=positive_int, default=PROXY_EPOCHS, metavar="N",
                     help="with --evaluator trained: epochs of each selection's short training "
                          "(default: %(default)s)")
    adv.add_argument("--reward", default=None, help="what a selection scores: loglik (mean "
                     "log-probability of the true class on validation; the supernet's "
                     "default) or accuracy (the trained evaluator's default)")
    adv.add_argument("--bn-stats", default="val", help="where a scoring takes BatchNorm "
                     "statistics from: val (each validation batch's own), train (recalibrate "
                     "on 4 x 128 training clips first) or supernet (keep stage 1's)")
    adv.add_argument("--bn-clips", type=non_negative_int, default=BN_CLIPS or 0, metavar="N",
                     help="with --bn-stats val: take each validation batch's statistics from N "
                     "of its clips (a random sample); 0 = every clip (default: %(default)s)")
    adv.add_argument("--samples-per-iteration", type=positive_int, default=8,
                     help="selections sampled per policy step")
    _data_args(adv)


def run_search_cmd(args: argparse.Namespace) -> int:
    from ..io import check_output
    from .search import SearchConfig, run_search
    from ..supernet import SupernetConfig
    from ..tasks import task_data_path

    # the search writes its own files into --out (kept for --resume), it never replaces it
    _base_spec(args)  # one of the two forms, before any work
    check_output(args.out, {"--checkpoint": args.checkpoint, "--weights": args.weights,
                            "--task": task_data_path(args.task)}, replaced=False)
    # workers=None: one per available CPU, decided by swr.policies.ray_setup.resolve_workers
    cfg = SearchConfig(task=args.task, checkpoint=args.checkpoint or "", budget=args.budget,
                       backbone=args.backbone, weights=args.weights,
                       out=args.out, policy=args.policy, seed=args.seed,
                       evaluations=args.evaluations, workers=args.workers, resume=args.resume,
                       overwrite=args.overwrite, device=args.device, ray_address=args.ray_address,
                       samples_per_iteration=args.samples_per_iteration,
                       supernet=SupernetConfig(epochs=args.supernet_epochs,
                                               gates=args.supernet_gates),
                       reward=args.reward, evaluator=args.evaluator,
                       proxy_epochs=args.proxy_epochs, bn_stats=args.bn_stats,
                       bn_clips=args.bn_clips or None, on_bad_file=args.on_bad_file,
                       norms=args.norms, data_override=_data_override(args),
                       train_memory=args.train_memory)
    r = run_search(cfg)
    first = r["budgets"][0] if "budgets" in r else r
    if first.get("evaluations_topped_up"):
        print(f"swr search: {r['policy']} stopped proposing new selections after "
              f"{r['evaluations'] - first['evaluations_topped_up']}; "
              f"{first['evaluations_topped_up']} random feasible selections made up the "
              f"{cfg.evaluations} evaluations (recorded in selection.json)", file=sys.stderr)
    if first.get("evaluations_short"):
        print(f"swr search: scored {r['evaluations']} of {cfg.evaluations} evaluations: "
              f"{first['evaluations_short']}", file=sys.stderr)
    if "budgets" in r:
        for e in r["budgets"]:
            norms = " + norms" if e["norms_trained"] else ""
            print(f"{r['policy']} at {e['budget']}: val {r['reward']} {e['val_score']:.4f} with "
                  f"{len(e['layers'])} layers, trained {e['cost']} delta{norms} = "
                  f"{e['updated_params']}/{e['budget_params']} params "
                  f"-> {args.out}/{e['selection_file']}")
        print(f"{r['evaluations']} evaluations in all -> {args.out}/selections.json")
        _report_skipped("search", r.get("skipped_files", []), f"{args.out}/selections.json")
        return 0
    norms = (f" + {r['norm_params']} norm" if r["norms_trained"] else " (norms not trained)")
    print(f"{r['policy']}: val {r['reward']} {r['val_score']:.4f} with {len(r['layers'])} layers, "
          f"trained {r['cost']} delta{norms} = {r['updated_params']}/{r['budget_params']} params "
          f"(--norms {r['norms']}), {r['evaluations']} evaluations"
          + ("" if r.get("feasible_selections") is None else
             f" of {r['feasible_selections']:,} feasible selections"
             + (" (all of them: the best there is)"
                if r["evaluations"] == r["feasible_selections"] else ""))
          + f" -> {args.out}/selection.json")
    _report_skipped("search", r.get("skipped_files", []), f"{args.out}/selection.json")
    return 0


COMMANDS["search"] = (_search_args, run_search_cmd,
                      "train the supernet and search a layer selection under a budget")


# -- swr finetune ---------------------------------------------------------------------
def _finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--selection", help="selection.json written by swr search (SWR's final "
                   "training); or train another method with --method")
    p.add_argument("--method", help="train this method instead (lora, bitfit, norm, ssf, full, "
                   "linear, taps, two-stage, swr-knapsack, ...; any that folds) on --task from "
                   "--checkpoint or --backbone/--weights")
    p.add_argument("--task", help="with --method: the target task, e.g. glyphs:sketch")
    _base_args(p)
    p.add_argument("--budget", help="with --method: the budget of methods that size themselves "
                   "to one (lora, swr*, ...), e.g. 5%%")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--epochs", type=positive_int, default=20)
    p.add_argument("--lr", type=positive_finite_float, help="learning rate (default: the "
                   "backbone family's for the method; SWR's with --selection)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", choices=["probe", "supernet"], default="probe",
                   help="with --selection, where training starts: probe (the linear probe's "
                        "head, zero deltas, base norms: LP-FT; the default) or supernet (stage "
                        "1's deltas, norms and head)")
    p.add_argument("--from-scratch", action="store_true", help=argparse.SUPPRESS)  # = --init probe
    _data_args(p)
    _on_bad_file_arg(p, default=None)
    _device_arg(p)
    _overwrite_arg(p)


def run_finetune(args: argparse.Namespace) -> int:
    if args.method:
        return _finetune_method(args)
    if not args.selection:
        raise SwrError("give --selection FILE (from swr search) or --method NAME")
    if args.task or args.checkpoint or args.backbone or args.weights or args.budget:
        raise SwrError("--task, --checkpoint, --backbone, --weights and --budget go with "
                       "--method; a --selection file names its own")
    from .finetune import finetune

    m = finetune(args.selection, args.out, epochs=args.epochs, lr=args.lr, seed=args.seed,
                 device=args.device, init=args.init, from_scratch=args.from_scratch,
                 on_bad_file=args.on_bad_file, overwrite=args.overwrite,
                 data_override=_data_override(args))
    print(f"test acc {m['test_acc']:.4f} (val {m['val_acc']:.4f}), {m['updated_params']} trained "
          f"params (excl. head), task delta {m['delta_bytes']} bytes, fold error "
          f"{m['fold_max_abs_diff']:.2g} -> {args.out}")
    _suggest_more_steps(m["steps"], args.epochs)
    _report_skipped("finetune", m.get("skipped_files", []), f"{args.out}/metrics.json")
    return 0


def _suggest_more_steps(steps: int, epochs: int) -> None:
    """One line when the final training took fewer optimizer steps than
    :data:`swr.app.finetune.SUGGESTED_STEPS`, with the ``--epochs`` that would reach them."""
    from .finetune import SUGGESTED_STEPS

    if steps >= SUGGESTED_STEPS:
        return
    per_epoch = max(1, steps // max(1, epochs))
    print(f"swr: the final training took {steps} optimizer steps ({epochs} "
          f"epoch{'s' * (epochs != 1)} of {per_epoch}); on small tasks {SUGGESTED_STEPS} or more "
          f"gave clearly more accurate models: --epochs "
          f"{-(-SUGGESTED_STEPS // per_epoch)}", file=sys.stderr)


def _finetune_method(args: argparse.Namespace) -> int:
    from .bench import finetune_method

    if args.selection or args.from_scratch:
        raise SwrError("--method trains from the base; --selection and --from-scratch belong "
                       "to SWR's final training")
    if not args.task:
        raise SwrError("--method needs --task, e.g. --task glyphs:sketch")
    m = finetune_method(args.method, args.task, _base_spec(args), args.out, budget=args.budget,
                        epochs=args.epochs, lr=args.lr, seed=args.seed, device=args.device,
                        on_bad_file=args.on_bad_file or "fail", overwrite=args.overwrite,
                        data_override=_data_override(args))
    print(f"{args.method}: test acc {m['test_acc']:.4f} (val {m['val_acc']:.4f}), "
          f"{m['updated_params']} trained params (excl. head), task delta {m['delta_bytes']} "
          f"bytes, fold error {m['fold_max_abs_diff']:.2g} -> {args.out}")
    _report_skipped("finetune", m.get("skipped_files", []), f"{args.out}/metrics.json")
    return 0


COMMANDS["finetune"] = (_finetune_args, run_finetune,
                        "train the selected deltas (or any method that folds), fold them and "
                        "export the task delta")


# -- swr fold -------------------------------------------------------------------------
def _fold_args(p: argparse.ArgumentParser) -> None:
    _base_args(p)
    p.add_argument("--delta", required=True, help="task_delta.safetensors (swr finetune)")
    p.add_argument("--out", required=True, help="output folder for the task model")
    p.add_argument("--onnx", action="store_true",
                   help="also export base and task models to ONNX, compare their graphs, and "
                        "check each against PyTorch with onnxruntime (max abs diff <= 1e-4)")
    _overwrite_arg(p)


def run_fold(args: argparse.Namespace) -> int:
    from ..deploy import fold_task

    report = fold_task(_base_spec(args), args.delta, args.out, onnx=args.onnx,
                       overwrite=args.overwrite)
    line = (f"task model {report['params']:,} params (base {report['base_params']:,}; "
            f"the head differs with the class count), delta {report['delta_bytes']:,} bytes")
    if args.onnx:
        line += (f"; ONNX nodes {report['onnx']['nodes']} vs base {report['onnx_base']['nodes']}, "
                 f"same op counts: {report['onnx_same_graph']}, onnxruntime vs PyTorch max abs "
                 f"diff {report['onnx']['max_abs_diff']:.2g} (tolerance "
                 f"{report['onnx']['tolerance']:g})")
    print(line + f" -> {args.out}")
    return 0


COMMANDS["fold"] = (_fold_args, run_fold,
                    "rebuild a task model from the base checkpoint and its task delta")


# -- swr bench ------------------------------------------------------------------------
def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _searchers() -> dict:
    from ..policies import SEARCHERS

    return SEARCHERS


def _method_names() -> list[str]:
    from ..methods import METHODS
    from ..policies import SEARCHERS  # noqa: F401  (SWR's swr-<searcher> register with them)

    return list(METHODS)


def _registered(names: Callable[[], str], fallback: str = "see the README") -> str:
    """Help text listing registered names; the parser must build even on a broken install
    (torch failing to load), so that ``swr check`` can report it in one line."""
    try:
        return names()
    except (ImportError, OSError):
        return fallback


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", action="append", required=True,
                   help="target task; repeat it, or name a suite: kws-synth:all, glyphs:all, "
                        "imagenet-to-sketch:<root>, mswc:<root>:<lang1>,<lang2> (all names: "
                        "swr list tasks)")
    _base_args(p)
    p.add_argument("--methods", required=True, type=_csv_list,
                   help="comma-separated method names, e.g. linear,full,norm,lora,swr; all: "
                        + _registered(lambda: ",".join(_method_names())))
    p.add_argument("--budgets", default="5%", type=_csv_list,
                   help="comma-separated budgets, e.g. 1%%,5%%,10%% (default 5%%)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seeds", type=positive_int, default=3, help="seeds 0..N-1 (default 3)")
    p.add_argument("--epochs", type=positive_int, default=10, help="epochs for every method")
    p.add_argument("--lr", type=positive_finite_float, help="one learning rate for all methods (default: per method)")
    p.add_argument("--tune", action="store_true",
                   help="first tune each method's lr and own knob on validation with Ray Tune")
    p.add_argument("--workers", type=workers_count, help="parallel runs as Ray tasks (default: one per CPU "
                   "this process may use; more are reduced to that with a notice)")
    p.add_argument("--swr-evaluations", type=positive_int, default=40, help="search evaluations for swr*")
    p.add_argument("--batch-size", type=positive_int, default=64, help="batch size of every run")
    p.add_argument("--supernet-epochs", type=positive_int, default=8,
                   help="stage 1 epochs of swr* runs")
    p.add_argument("--resume", action="store_true", help="skip runs already in OUT/results.csv")
    _data_args(p)
    _overwrite_arg(p)
    _on_bad_file_arg(p)
    _device_arg(p)


def run_bench_cmd(args: argparse.Namespace) -> int:
    from .bench import BenchConfig, run_bench
    from ..io import check_output
    from ..tasks import task_data_path

    def data(task: str) -> str | None:  # a suite (imagenet-to-sketch:<root>) names its root
        suite, _, root = task.partition(":")
        return root if suite == "imagenet-to-sketch" else task_data_path(task)

    _base_spec(args)  # one of the two forms, before any work
    check_output(args.out, {"--checkpoint": args.checkpoint, "--weights": args.weights,
                            **{f"--task {t}": data(t) for t in args.task}}, replaced=False)
    cfg = BenchConfig(tasks=args.task, checkpoint=args.checkpoint or "", methods=args.methods,
                      backbone=args.backbone, weights=args.weights,
                      budgets=args.budgets, out=args.out, seeds=args.seeds, epochs=args.epochs,
                      lr=args.lr, tune=args.tune, workers=args.workers, device=args.device,
                      swr_evaluations=args.swr_evaluations, resume=args.resume,
                      overwrite=args.overwrite, on_bad_file=args.on_bad_file,
                      batch_size=args.batch_size, supernet_epochs=args.supernet_epochs,
                      data_override=_data_override(args))
    run_bench(cfg)
    print((Path(args.out) / "results.md").read_text())
    listed = Path(args.out) / "skipped_files.json"
    if listed.is_file():
        bad = sorted({p for paths in json.loads(listed.read_text()).values() for p in paths})
        _report_skipped("bench", bad, str(listed))
    return 0


COMMANDS["bench"] = (_bench_args, run_bench_cmd,
                     "run SWR and the PETL baselines at the same budgets, seeds and epochs; "
                     "every run that folds keeps its task delta under OUT/runs/")


# -- swr store ------------------------------------------------------------------------
def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["add", "remove", "list"],
                   help="add a task delta, remove a task, or list the tasks")
    p.add_argument("store", help="task store folder (created by the first add)")
    p.add_argument("--delta", help="add: task_delta.safetensors (swr finetune, or a swr bench run)")
    p.add_argument("--name", help="add/remove: the task's name in the store (add: default the "
                   "delta's task id, e.g. glyphs-sketch)")
    p.add_argument("--classes", type=_csv_list,
                   help="add: comma-separated class names (default: those in the delta)")
    p.add_argument("--replace", action="store_true", help="add: replace a task of the same name")
    _base_args(p)
    p.add_argument("--json", action="store_true", help="list: print JSON")


def run_store(args: argparse.Namespace) -> int:
    from ..store import TaskStore, create_or_open

    if args.action == "add":
        if not args.delta:
            raise SwrError("swr store add needs --delta FILE")
        given = args.checkpoint or args.backbone or args.weights
        store = create_or_open(args.store, _base_spec(args) if given else None, args.delta)
        entry = store.add(args.delta, name=args.name, classes=args.classes, replace=args.replace)
        name = next(n for n, e in store.index["tasks"].items() if e is entry)
        print(f"added task {name!r} ({len(entry['classes'])} classes, {entry['bytes']:,} bytes) "
              f"to {args.store}; it holds {len(store.index['tasks'])} task(s)")
        return 0
    store = TaskStore(args.store)
    if args.action == "remove":
        if not args.name:
            raise SwrError("swr store remove needs --name NAME")
        store.remove(args.name)
        print(f"removed task {args.name!r} from {args.store}; {len(store.index['tasks'])} left")
        return 0
    rows = store.list()
    if args.json:
        print(json.dumps({"backbone": store.backbone, "base_hash": store.index["base_hash"],
                          "tasks": rows}, indent=2))
        return 0
    print(f"{args.store}: base {store.backbone} ({store.index['base_hash']}), {len(rows)} task(s)")
    for r in rows:
        print(f"  {r['name']:<24} {str(r['method'] or ''):<14} {r['classes']:>4} classes "
              f"{r['bytes']:>12,} bytes  {r['task'] or ''}")
    return 0


COMMANDS["store"] = (_store_args, run_store,
                     "a task store: one base model and many task deltas (add, remove, list)")


# -- swr predict ----------------------------------------------------------------------
def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="wav/flac/ogg or image files")
    p.add_argument("--store", required=True, help="task store folder (swr store add)")
    p.add_argument("--task", required=True, help="the store's task to use (swr store list)")
    p.add_argument("--top", type=positive_int, default=3, help="classes listed per input (default 3)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--on-bad-file", choices=["fail", "skip"], default="fail",
                   help="an input that cannot be read (missing, a folder or FIFO, not decodable, "
                        "the other modality): stop with its name (fail) or skip it, list it and "
                        "classify the rest (skip)")
    _device_arg(p)


def run_predict(args: argparse.Namespace) -> int:
    from ..store import TaskStore, predict_files
    from ..train import resolve_device

    store = TaskStore(args.store)
    store.entry(args.task)  # an unknown task fails before the base is loaded
    model = store.load(resolve_device(args.device))
    skipped: list[dict] = []
    rows = predict_files(model, args.task, args.inputs, top=args.top,
                         on_bad_file=args.on_bad_file, skipped=skipped)
    if args.json:
        # strict JSON: predict_files refuses non-finite outputs, so no NaN can reach it
        print(json.dumps({"task": args.task, "predictions": rows, "skipped": skipped},
                         indent=2, allow_nan=False))
    else:
        for r in rows:
            others = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in r["top"][1:])
            print(f"{r['file']}: {r['label']} ({r['probability']:.3f})"
                  + (f"; then {others}" if others else ""))
        for r in skipped:
            print(f"{r['file']}: skipped ({r['error']})")
    _report_skipped("predict", [r["file"] for r in skipped],
                    "the JSON's 'skipped'" if args.json else "the lines marked skipped")
    return 0


COMMANDS["predict"] = (_predict_args, run_predict,
                       "classify wav or image files with one task of a task store")


# -- swr demo -------------------------------------------------------------------------
def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--suite", default="kws", choices=["kws", "glyphs"],
                   help="embedded suite: multilingual spoken words (default) or glyph images")
    p.add_argument("--quick", action="store_true", help="a few minutes on 2 CPU cores")
    p.add_argument("--seeds", type=positive_int, default=1)
    p.add_argument("--workers", type=workers_count, help="parallel runs as Ray tasks (default: one per CPU "
                   "this process may use; more are reduced to that with a notice)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo in --out")
    _overwrite_arg(p)
    _device_arg(p)


def run_demo_cmd(args: argparse.Namespace) -> int:
    from .demo import run_demo
    # its inputs, the cached suites and source models, are kept out of --out by
    # _check_common, as for every command
    run_demo(args.out, suite=args.suite, quick=args.quick, seeds=args.seeds,
             workers=args.workers, device=args.device, resume=args.resume,
             overwrite=args.overwrite)
    return 0


COMMANDS["demo"] = (_demo_args, run_demo_cmd,
                    "the main job: pretrain, then SWR vs baselines on several target tasks")


# -- swr evaluate ---------------------------------------------------------------------
def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--delta", help="task_delta.safetensors to evaluate on its base (give the "
                   "base with --checkpoint or --backbone/--weights)")
    _base_args(p)
    p.add_argument("--store", help="task store folder: evaluate its task --name instead")
    p.add_argument("--name", help="with --store: the task's name (swr store list)")
    p.add_argument("--model", help="a task model folder written by swr fold: evaluate it instead")
    p.add_argument("--task", help="the task whose split to score (default: the task the "
                   "model was made for)")
    p.add_argument("--split", default="test", choices=["test", "val", "shift_test", "train"])
    p.add_argument("--folder", help="score the files of FOLDER/<class>/ instead of a task split")
    _data_args(p)
    p.add_argument("--out", required=True, help="folder for metrics.json, confusion.csv and "
                   "confusion.png")
    _on_bad_file_arg(p)
    _device_arg(p)
    _overwrite_arg(p)


def run_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate

    given = args.checkpoint or args.backbone or args.weights
    m = evaluate(args.out, delta=args.delta, base=_base_spec(args) if given else None,
                 store=args.store, name=args.name, model=args.model, task=args.task,
                 split=args.split, folder=args.folder, device=args.device,
                 on_bad_file=args.on_bad_file, overwrite=args.overwrite,
                 data_override=_data_override(args))
    worst = sorted(((v["accuracy"], c) for c, v in m["per_class"].items()
                    if v["accuracy"] is not None))[:3]
    print(f"accuracy {m['accuracy']:.4f} on {m['n']} inputs ({m.get('task') or m.get('folder')}"
          f"{', ' + m['split'] if 'split' in m else ''}); weakest classes: "
          + ", ".join(f"{c} {a:.2f}" for a, c in worst) + f" -> {args.out}")
    return 0


COMMANDS["evaluate"] = (_evaluate_args, run_evaluate,
                        "score a task model (a task delta on its base, a store's task, or a "
                        "folded model from swr fold): "
                        "accuracy, per-class accuracy, confusion matrix")


# -- swr list -------------------------------------------------------------------------
def _list_args(p: argparse.ArgumentParser) -> None:
    from .catalog import KINDS

    p.add_argument("kind", choices=list(KINDS), help="what to list")
    p.add_argument("pattern", nargs="?",
                   help="only names matching this shell pattern, e.g. 'mswc*'; for backbones "
                        "'timm:resnet*' lists timm's architectures (default: all)")


def run_list(args: argparse.Namespace) -> int:
    from .catalog import names

    entries = names(args.kind, args.pattern)
    if not entries:
        raise SwrError(f"no {args.kind} match {args.pattern!r}; run swr list {args.kind}")
    width = max(len(n) for n, _ in entries)
    for name, what in entries:
        print(f"{name:<{width}}  {what}".rstrip())
    return 0


COMMANDS["list"] = (_list_args, run_list,
                    "print the backbones, tasks, methods or search policies you can name")


# -- swr check ------------------------------------------------------------------------
def _check_args(p: argparse.ArgumentParser) -> None:
    """No options: the check needs none."""


def run_check(args: argparse.Namespace) -> int:
    from importlib import metadata

    from ..native import OTHER_CHECKS, environment_error, installed_versions

    line = environment_error()
    if line is not None:
        print(f"swr check: error: {line}", file=sys.stderr)
        return 1
    versions = ", ".join(f"{n} {v}" for n, v in installed_versions().items())
    versions += ", " + ", ".join(f"{n} {metadata.version(n)}" for n in OTHER_CHECKS)
    print(f"swr check: ok: native libraries load ({versions})")
    return 0


COMMANDS["check"] = (_check_args, run_check,
                     "self-check of the install: torch, torchvision and torchaudio load "
                     "together, and soundfile (libsndfile), Pillow and safetensors load")


#: One example per command, shown at the end of its --help.
EXAMPLES = {
    "inspect": "swr inspect --backbone timm:resnet18",
    "pretrain": "swr pretrain --task kws-synth:en --backbone bcresnet-2 --out ckpt/en",
    "search": "swr search --task kws-synth:de --checkpoint ckpt/en --budget 5% --out runs/de",
    "finetune": "swr finetune --selection runs/de/selection.json --out runs/de/final",
    "fold": "swr fold --checkpoint ckpt/en --delta runs/de/final/task_delta.safetensors "
            "--out runs/de/model",
    "bench": "swr bench --task kws-synth:all --checkpoint ckpt/en --methods linear,norm,swr "
             "--budgets 1%,5% --out runs/bench",
    "demo": "swr demo --quick --out runs/demo",
    "list": "swr list methods",
    "check": "swr check",
    "store": "swr store add tasks --checkpoint ckpt/en --delta runs/de/final/task_delta.safetensors "
             "--name de",
    "predict": "swr predict --store tasks --task de clip1.wav clip2.wav --json",
    "evaluate": "swr evaluate --checkpoint ckpt/en --delta runs/de/final/task_delta.safetensors --out runs/de/eval",
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help that shows every option's default and keeps the example's line as written.

    Unlike ``ArgumentDefaultsHelpFormatter`` it does not repeat a default the help
    already states, says "none" for an option that is off unless given, and leaves
    flags (``store_true``) alone.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.required or action.default is argparse.SUPPRESS
                or isinstance(action, (argparse._StoreTrueAction, argparse._HelpAction,
                                       argparse._VersionAction))
                or "default" in text.lower()):
            return text
        if action.default is None:
            return f"{text} (default: none)"
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line (exit status 2), like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(advanced: bool = False) -> argparse.ArgumentParser:
    """The ``swr`` parser; ``advanced`` lists the advanced options in the help too."""
    from .._version import __version__

    global _SHOW_ADVANCED
    _SHOW_ADVANCED = advanced

    parser = _Parser(
        prog="swr", description="Budget-constrained transfer learning by Scalable Weight "
        "Reparametrization: choose which layers get a weight delta, train, fold.",
        epilog="Exit status: 0 done; 1 broken install (one line names the clashing packages "
        "and the reinstall command; `swr check` runs that test); 2 bad input (one line says which value or file); 75 the "
        "Ray cluster went away (rerun with --resume); 130 interrupted (Ctrl-C); 143 terminated (SIGTERM).")
    parser.add_argument("--version", action="version", version=f"swr {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (add_args, _, help) in COMMANDS.items():
        example = EXAMPLES.get(name)
        p = sub.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter,
                           epilog=f"example:\n  {example}" if example else None)
        add_args(p)
        _advanced(p).add_argument("--debug", action="store_true",
                                  help="show tracebacks on errors")
        for action in p._actions:  # argparse prints nothing, not even the default, without help
            if action.help is None and action.option_strings and not action.required:
                action.help = "(default: %(default)s)"
    return parser


def _close_progress_bars() -> None:
    """End the progress bars an error cut short, so that its line starts a line of its own."""
    from tqdm.std import tqdm

    for bar in list(tqdm._instances):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(advanced="--help-advanced" in (sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    _, run, _ = COMMANDS[args.command]
    handle_sigterm()
    if getattr(args, "debug", False):  # Ray's own notices too (swr.policies.ray_setup.init_ray)
        import logging

        logging.getLogger("swr").setLevel(logging.DEBUG)
    try:
        _check_common(args)
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
    except KeyboardInterrupt as e:
        _close_progress_bars()
        term = was_terminated(e)
        how = "terminated (SIGTERM)" if term else "interrupted"
        print(f"swr {args.command}: {how}; nothing half-written was kept; rerun with --resume "
              "where supported", file=sys.stderr)
        return 143 if term else 130
    except Exception:
        # A native library that fails to load is a broken install, not bad input.
        if not getattr(args, "debug", False) and _report_broken_install(args.command):
            return 1
        raise


#: Commands whose --out is replaced whole by the new run (a staged folder).
OUT_REPLACED = ("pretrain", "finetune", "fold")

#: Commands that may write the cache (supernets, generated datasets, source models).
CACHE_WRITERS = ("pretrain", "search", "bench", "demo")


def _check_common(args: argparse.Namespace) -> None:
    """Options many commands share, checked before any work: the seed every RNG must
    accept, the device torch must be able to train on, an output folder and the cache
    that can be written, so that a bad value ends the command now instead of after
    training a model."""
    from ..io import cache_dir, check_output, unwritable_reason
    from ..train import check_seed, resolve_device

    if getattr(args, "seed", None) is not None:
        check_seed(args.seed)
    if getattr(args, "device", None) is not None:
        resolve_device(args.device)
    if getattr(args, "out", None) is not None:
        reason = unwritable_reason(args.out)
        if reason is not None:
            raise SwrError(f"cannot write --out {args.out}: {reason}; choose another folder")
        # no command writes its results into the cache (or, replacing --out whole, over it)
        check_output(args.out, {"$SWR_CACHE": cache_dir()},
                     replaced=args.command in OUT_REPLACED)
    if args.command in CACHE_WRITERS:
        reason = unwritable_reason(cache_dir())
        if reason is not None:
            raise SwrError(f"cannot write the cache folder {cache_dir()} (SWR_CACHE): {reason}; "
                           f"swr {args.command} stores supernets and generated datasets there: "
                           f"set SWR_CACHE to a writable folder")


def _report_broken_install(command: str) -> bool:
    """Print the one line naming a broken torch/torchvision/torchaudio install, if it is one."""
    from ..native import environment_error

    line = environment_error()
    if line is None:
        return False
    _close_progress_bars()
    print(f"swr {command}: error: {line}", file=sys.stderr)
    return True


if __name__ == "__main__":
    sys.exit(main())
