"""Searchers for stage 2, behind one protocol and one registry, and their scoring pool.

* :mod:`.registry`: ``build_searcher(name, SearchSettings(...))`` and the names
  (``pg``, ``ppo``, ``random``, ``greedy``, ``knapsack`` and the training-memory
  references), each registered where it is defined;
* :mod:`.search`: the driver every searcher shares (evaluation log, scoring run,
  pool, ``search.csv``), :mod:`.pool`: scoring in this process or on Ray workers,
  :mod:`.ray_setup`: starting or joining Ray;
* :mod:`.pg` / :mod:`.network`: the policy network and its policy-gradient trainer;
  :mod:`.ppo_search` / :mod:`.ppo`: MaskablePPO;
  :mod:`.selectors`: random search, greedy, knapsack and the memory-aware references.

To add a searcher: subclass :class:`~swr.policies.search.PoolSearcher` in a module
here, implement ``propose(problem, run)`` (score through ``run.score``), call
``register_searcher`` at its end and import the module below.
"""

from swr.selection import Searcher

from .registry import SEARCHERS, SearchSettings, build_searcher, register_searcher, searcher_names
from . import pg, ppo_search, selectors  # noqa: E402,F401  (each registers its searchers)

__all__ = ["SEARCHERS", "SearchSettings", "Searcher", "build_searcher", "register_searcher",
           "searcher_names"]
