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
learning rate and what ``--tune`` tries), registered in the loop below.
"""

from .adapter import Adapter, SequentialAdapter
from .base import METHODS, Method, get_method, register_method
from .bitfit import BitFit
from .full import FullFineTune
from .linear import LinearProbe
from .lora import LoRA
from .norm import NormTuning
from .runner import run_method
from .ssf import SSF
from .swr import SWR, swr_variant
from .taps import TAPS
from .two_stage import TwoStage
from .vpt import VPTDeep, VPTShallow
from .wise import WiSEFT

# One place lists the built-in methods, by the names users type.
for _cls in (LinearProbe, FullFineTune, BitFit, NormTuning, SSF, LoRA, Adapter,
             SequentialAdapter, TAPS, TwoStage, VPTShallow, VPTDeep, WiSEFT, SWR):
    register_method(_cls.name, _cls)
del _cls
register_method("swr-deltas", swr_variant("swr-deltas", norms="none"))

__all__ = ["METHODS", "Adapter", "BitFit", "FullFineTune", "LinearProbe", "LoRA", "Method",
           "NormTuning", "SSF", "SWR", "SequentialAdapter", "TAPS", "TwoStage", "VPTDeep",
           "VPTShallow", "WiSEFT", "get_method", "register_method", "run_method", "swr_variant"]
