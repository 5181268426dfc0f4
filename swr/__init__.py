"""swr: budget-constrained parameter-efficient transfer by Scalable Weight Reparametrization.

The core, in the order a user meets it::

    model = swr.create_backbone("bcresnet-2", weights="model.safetensors")
    swr.reparametrize(model)                    # wrap candidate layers: W + g*dW
    swr.candidates(model)                       # names, kinds, shapes, costs
    budget = swr.resolve_budget(model, "5%")    # parameters
    swr.set_selection(model, ["stages.0.0.f2.conv", ...])
    swr.train(model, (train_loader, val_loader), swr.set_trainable(model, deltas=True),
              swr.TrainConfig(epochs=5))       # or a swr.tasks Task

    task_model = swr.fold(model)                # plain base architecture
    swr.export_task_delta(model, "task.safetensors", backbone="bcresnet-2")

Choosing the layers by a named searcher, as ``swr search`` does (the application
floor, ``swr.app``, which brings the searchers and Ray)::

    from swr.app import select
    result = select(model, task, "5%", policy="knapsack")      # stages 1 and 2
    swr.set_selection(supernet_or_model, result["layers"])

The whole method: ``swr.methods.run_method("swr", ...)`` with a searcher from
``swr.policies.build_searcher`` (``swr.methods.SWR``); stage 1 alone:
``swr.supernet.prepare_supernet``; stages 1 and 2: ``swr.selection.search_selection``.
The README's "Layout" says which module holds what.
"""

from ._version import __version__
from .budget import (Budget, backbone_params, check_selection, cost_report, resolve_budget,
                     selection_cost)
from .delta import apply_task_delta, base_hash, export_task_delta, read_task_delta
from .errors import BudgetError, ForeignDeltaError, SwrError
from .fold import fold, fold_batchnorm, fold_check, merge, same_architecture, unmerge
from .layers import ReparamLayer
from .reparam import (Candidate, candidates, get_selection, norm_parameters, reparam_layers,
                      reparametrize, sample_gates, set_selection, set_trainable, unwrap)
from .tasks.backbones import create_backbone, save_checkpoint
from .train import TrainConfig, evaluate, train

__all__ = [
    "__version__", "Budget", "BudgetError", "Candidate", "ForeignDeltaError", "ReparamLayer",
    "SwrError", "TrainConfig", "evaluate", "train", "apply_task_delta", "backbone_params", "base_hash", "candidates",
    "check_selection", "cost_report", "create_backbone", "export_task_delta", "fold",
    "fold_batchnorm", "fold_check", "get_selection", "merge", "norm_parameters",
    "read_task_delta", "reparam_layers", "reparametrize", "resolve_budget", "same_architecture",
    "sample_gates", "save_checkpoint", "selection_cost", "set_selection", "set_trainable",
    "unmerge", "unwrap",
]

