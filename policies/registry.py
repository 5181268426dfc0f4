"""The one registry of searchers, by the names users type (``swr search --policy``).

Each searcher registers itself where it is defined (``pg.py``, ``ppo_search.py``,
``selectors.py``) with :func:`register_searcher`; the CLI's help, ``swr search`` and
``swr bench`` read the names from here. A factory takes :class:`SearchSettings` and
returns a :class:`~swr.selection.Searcher`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from swr.envs.evaluator import BN_CLIPS, PROXY_EPOCHS
from swr.errors import SwrError
from swr.methods import SWR, register_method, swr_variant
from swr.selection import Searcher


@dataclass(frozen=True)
class SearchSettings:
    """How a searcher runs: its evaluation count, where it scores, and its seed.

    ``evaluations``: distinct selections to score; ``workers``: 0 scores in this
    process, N on N Ray workers (``ray_address``: a cluster to join); ``resume``:
    serve the scores already in the output folder's log instead of recomputing them.
    ``reward``: what a selection scores by (``"loglik"`` or ``"accuracy"``); None takes
    the evaluator's own (:func:`~swr.envs.evaluator.evaluator_metric`): log-likelihood on
    the supernet, the proxy that ranked final accuracy better there in experiments/SEARCH.md.
    ``evaluator``: what scores a selection (:data:`~swr.envs.evaluator.EVALUATORS`):
    the supernet, or a short training of ``proxy_epochs`` epochs of its own
    (:class:`~swr.envs.evaluator.TrainedEvaluator`).
    """

    evaluations: int = 40
    workers: int = 0
    seed: int = 0
    device: str = "auto"
    ray_address: Optional[str] = None
    samples_per_iteration: int = 8
    bn_batches: int = 4
    bn_stats: str = "val"
    bn_clips: Optional[int] = BN_CLIPS
    resume: bool = False
    progress: bool = True
    reward: Optional[str] = None
    evaluator: str = "supernet"
    proxy_epochs: int = PROXY_EPOCHS


SearcherFactory = Callable[[SearchSettings], Searcher]

#: Searcher factories and their one-line descriptions, by name.
SEARCHERS: dict[str, tuple[SearcherFactory, str]] = {}


def register_searcher(name: str, factory: SearcherFactory, summary: str) -> None:
    """Make ``factory(settings)`` available as searcher ``name`` (a later call replaces it),
    and SWR with it as method ``swr-<name>`` (method ``swr`` itself runs SWR's default
    searcher): the one place the ``swr-<searcher>`` methods are registered."""
    if not name or name != name.strip():
        raise ValueError(f"searcher name {name!r} must be non-empty without surrounding spaces")
    SEARCHERS[name] = (factory, summary)
    if name != SWR.selector:
        register_method(f"swr-{name}", swr_variant(f"swr-{name}", name))


def searcher_names() -> list[str]:
    """Registered searcher names, in registration order."""
    return list(SEARCHERS)


def build_searcher(name: str, settings: Optional[SearchSettings] = None) -> Searcher:
    """A new searcher ``name`` with ``settings``; an unknown name raises SwrError."""
    if name not in SEARCHERS:
        raise SwrError(f"--policy {name!r} is not one of {', '.join(SEARCHERS)}")
    return SEARCHERS[name][0](settings or SearchSettings())
