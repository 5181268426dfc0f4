"""Python entry points of the application floor (``from swr.app import select``).

``select`` runs stages 1 and 2 (the supernet, then a search by a named searcher) on an
in-memory model and task: the notebook counterpart of ``swr search``. It lives here, not
in the core, because turning a searcher's *name* into an object needs ``swr.policies``;
``import swr`` stays free of Ray, Gymnasium and SB3.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional, Union

from torch import nn

from ..errors import SwrError
from ..reparam import reparam_layers
from ..selection import search_selection
from ..supernet import SupernetConfig


def select(model: nn.Module, task, budget: Union[str, float, int], policy: str = "knapsack",
           evaluations: int = 40, seed: int = 0, supernet_epochs: int = 10,
           device: str = "auto", workers: int = 0, out: Optional[Union[str, Path]] = None,
           progress: bool = False) -> dict:
    """Choose the layers to reparametrize in ``model`` for ``task`` under ``budget``.

    Args:
        model: the base model, not reparametrized (e.g. ``swr.create_backbone(...)``);
            it is left unchanged (stage 1 trains a reparametrized copy, cached).
        task: a :class:`swr.tasks.Task` (``swr.tasks.get_task("kws-synth:de")``).
        budget: ``"5%"``, a fraction, or a parameter count (:func:`swr.resolve_budget`).
        policy: a searcher name (``swr list policies``: ``knapsack``, ``pg``, ...).
        evaluations: distinct selections the searcher may score on the supernet.
        out: folder for the search's files (``search.csv``, the log); default a temp folder.

    Returns:
        The search result: ``layers`` (pass them to :func:`swr.set_selection`), ``cost``,
        ``budget_params``, ``val_score`` and how the search went, as ``swr search`` writes
        it into ``selection.json``.

    Raises:
        SwrError: an unknown policy, a budget no layer fits in, a reparametrized model.
    """
    from ..policies import SearchSettings, build_searcher

    if reparam_layers(model):
        raise SwrError("select takes the base model; this one is already reparametrized "
                       "(pass the model before swr.reparametrize)")
    searcher = build_searcher(policy, SearchSettings(
        evaluations=evaluations, workers=workers, seed=seed, device=device, progress=progress))
    cfg = SupernetConfig(epochs=supernet_epochs, seed=seed, device=device, progress=progress,
                         gates="budget")
    folder = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="swr-select-"))
    result, _ = search_selection(model, task, budget, searcher, cfg, folder,
                                 backbone=type(model).__name__)
    return result


__all__ = ["select"]
