"""The PETL baselines SWR is compared against, behind one interface.

``get_method(name, **knobs)`` builds a :class:`Method`; ``run_method`` prepares,
trains, evaluates, folds and measures any of them the same way. Built-in names:
``linear``, ``full``, ``bitfit``, ``norm``, ``ssf``, ``lora``, ``adapter-par``,
``adapter-seq``, ``taps``, ``two-stage``, ``vpt-shallow``, ``vpt-deep``, ``wise-ft``,
``swr`` itself (:class:`SWR`, handed a searcher by the application) and ``swr-deltas``
(SWR training its deltas only, ``norms="none"``: the deltas' own gain over norm
tuning); other packages add theirs with ``register_method``.

To add a method: a dataclass subclass of :class:`Method` in its own module here (its
fields are its knobs; ``lr_family`` and ``tunables`` say how the bench picks its
learning rate and what ``--tune`` tries), decorated with ``@register_method``, and the
module imported below. SWR under each other searcher (``swr-knapsack``, ...) is
registered with the searcher (``swr.policies.register_searcher``).
"""

from .base import METHODS, Method, get_method, register_method
# each module registers its methods where they are defined; imported in the order
# users see the methods listed (swr bench --help)
from .linear import LinearProbe
from .full import FullFineTune
from .bitfit import BitFit
from .norm import NormTuning
from .ssf import SSF
from .lora import LoRA
from .adapter import Adapter, SequentialAdapter
from .taps import TAPS
from .two_stage import TwoStage
from .vpt import VPTDeep, VPTShallow
from .wise import WiSEFT
from .swr import SWR, swr_variant
from .runner import run_method

__all__ = ["METHODS", "Adapter", "BitFit", "FullFineTune", "LinearProbe", "LoRA", "Method",
           "NormTuning", "SSF", "SWR", "SequentialAdapter", "TAPS", "TwoStage", "VPTDeep",
           "VPTShallow", "WiSEFT", "get_method", "register_method", "run_method", "swr_variant"]
