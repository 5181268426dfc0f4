"""The common interface of the PETL methods SWR is compared against, and their registry.

A :class:`Method` is one run's recipe: it adapts a copy of the base model for a task
(``prepare``), says which parameters train, trains them (``fit``), accounts for what
it changed (``updated_params``, ``stored_tensors``) and, when it can, folds the
result back into the base architecture (``fold``). :func:`swr.methods.runner.run_method`
drives any method the same way, so every method is measured alike.

Conventions shared by all methods:

* ``prepare`` resizes the head itself (``model.reset_classifier(task.num_classes)``);
  every method trains that fresh head, which is reported separately
  (``head_params``), never counted against the budget.
* ``updated_params`` counts every parameter the method trains outside the head: its
  mechanism (deltas, adapters, prompts, biases, norm affines, ...) and any task norms
  trained beside it. It is the one quantity every method's row reports, and the number
  a hard budget bounds (SWR with ``norms="free"`` is the exception that says so).
* ``norm_params`` is the part of ``updated_params`` that is norm affines trained
  *beside* the mechanism, as SWR and TAPS train their task norms; zero for most
  methods. ``norms_accounting`` says how they relate to the budget (``-`` for a
  method without such norms; see :data:`swr.budget.NORM_MODES`).
* BatchNorm running statistics follow the norm affines: a method that trains norms
  (``trains_norms``) runs its BatchNorms in training mode and stores their
  statistics; every other method keeps the base statistics (BatchNorms in eval
  mode while training), so its task model differs from the base only in what it
  declares.
"""

from __future__ import annotations

import copy
import dataclasses
from abc import ABC, abstractmethod
from typing import Callable, ClassVar, Iterable, Optional

import torch
from torch import nn

from ..errors import BudgetError, SwrError
from ..reparam import head_parameters, head_prefix, norm_modules
from ..tasks.backbones import find_family
from ..train import TrainConfig, TrainResult, freeze_batchnorm, train  # noqa: F401


class Method(ABC):
    """A parameter-efficient transfer method; one instance per run.

    Subclasses are dataclasses whose fields are the method's knobs (``rank``,
    ``width``, ...); a knob left at ``None`` is chosen by ``prepare`` (usually
    the largest size that fits the budget) and written back, so
    :meth:`settings` reports what was actually used.
    """

    #: The name users type (in ``--methods``).
    name: ClassVar[str] = ""
    #: Whether the trained model folds back into the base architecture.
    foldable: ClassVar[bool] = False
    #: Whether ``updated_params`` is kept within ``budget_params``; methods with a
    #: fixed natural size (linear probe, full fine-tuning, BitFit, norm tuning)
    #: ignore the budget and report their natural count.
    respects_budget: ClassVar[bool] = True
    #: The learning-rate family the application's default table is indexed by
    #: (``head``, ``norm``, ``full``, ``low-rank``, ``adapter``; ``default`` otherwise).
    lr_family: ClassVar[str] = "default"
    #: Knobs that are learning rates of another family, filled in when not given
    #: (``{"probe_lr": "head"}``: WiSE-FT's probe trains what the linear probe trains).
    lr_knobs: ClassVar[dict[str, str]] = {}
    #: The method's own knobs worth tuning, with the values tried (``swr bench --tune``).
    tunables: ClassVar[dict[str, list]] = {}
    #: Knobs the running application fills from the run when not given: any of
    #: ``seed``, ``device``, ``out`` (a folder for the method's files), ``evaluations``,
    #: ``supernet_epochs``.
    context_knobs: ClassVar[tuple[str, ...]] = ()

    # -- what the method applies to ---------------------------------------------------
    def unsupported_reason(self, model: nn.Module) -> Optional[str]:
        """Why this method cannot adapt ``model``, or None when it can."""
        return None

    def supports(self, model: nn.Module) -> bool:
        """True when the method can adapt ``model`` (see :meth:`unsupported_reason`)."""
        return self.unsupported_reason(model) is None

    def check_supported(self, model: nn.Module) -> None:
        """Raise :class:`SwrError` naming the reason when ``model`` is not supported."""
        reason = self.unsupported_reason(model)
        if reason is not None:
            raise SwrError(f"method {self.name!r} cannot adapt this backbone: {reason}")

    def search_settings(self) -> Optional[dict]:
        """For a method that is handed a layer-selection searcher (SWR): the searcher's
        name (``policy``) and settings, from which the application builds one; else None."""
        return None

    # -- adapting and training --------------------------------------------------------
    @abstractmethod
    def prepare(self, model: nn.Module, task, budget_params: Optional[int]) -> nn.Module:
        """Adapt ``model`` for ``task`` under ``budget_params`` and return the model to train.

        Resizes the head to ``task.num_classes``, adds the method's modules (in place,
        or by returning a wrapper) and leaves ``requires_grad`` set on exactly
        :meth:`trainable_parameters`. Raises :class:`~swr.errors.BudgetError` when
        the method cannot fit the budget at its smallest size.
        """

    @abstractmethod
    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters the method trains (including the head)."""

    @property
    def trains_norms(self) -> bool:
        """Whether norm layers are task state (BatchNorm statistics update in training)."""
        return False

    def regularizer(self, model: nn.Module) -> Optional[Callable[[], torch.Tensor]]:
        """An extra loss term added to every batch's loss, or None."""
        return None

    def fit(self, model: nn.Module, task, cfg: TrainConfig) -> TrainResult:
        """Train the prepared ``model`` on ``task``; multi-phase methods override this.

        The model ends in its final task state (best validation state, eval mode).
        """
        return train(model, task, self.trainable_parameters(model), cfg,
                     before_batch=self.before_batch(model),
                     regularizer=self.regularizer(model))

    def before_batch(self, model: nn.Module) -> Optional[Callable[[int], None]]:
        """The per-batch hook ``fit`` passes to :func:`swr.train.train`.

        Methods that do not train norms keep the base BatchNorm statistics: the loop
        calls ``model.train()`` every epoch, so the BatchNorms are put back into
        eval mode before every batch.
        """
        if self.trains_norms:
            return None
        return lambda step: freeze_batchnorm(model)

    # -- accounting ---------------------------------------------------------------------
    @abstractmethod
    def updated_params(self, model: nn.Module) -> int:
        """Parameters the method trains outside the head (task norms beside it included)."""

    def norm_params(self, model: nn.Module) -> int:
        """Of ``updated_params``, the norm affine parameters trained beside the mechanism."""
        return 0

    def norms_accounting(self) -> str:
        """How norms trained beside the mechanism meet the budget (after ``prepare``):
        ``auto``, ``auto:none`` (auto, but they did not fit: not trained), ``budget``,
        ``none``, ``free``; ``-`` for a method that trains none beside its mechanism."""
        return "-"

    def head_params(self, model: nn.Module) -> int:
        """Parameters of the task head (always trained, reported separately)."""
        return sum(p.numel() for p in head_parameters(model).values())

    @abstractmethod
    def stored_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Exactly what must be stored per task to rebuild the task model from the base."""

    def settings(self) -> dict:
        """The method's knobs as used in this run (sizes chosen by ``prepare`` included)."""
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}

    # -- folding --------------------------------------------------------------------------
    def fold(self, model: nn.Module) -> Optional[nn.Module]:
        """A base-architecture copy computing what ``model`` computes, or None if not foldable."""
        return None


#: Learning rates used when not tuned (``--tune``), by the backbone's learning-rate row
#: (the ``lr_family`` its family registers, :mod:`swr.tasks.registry`) and the method's
#: learning-rate family (:attr:`swr.methods.Method.lr_family`; ``default``: every other
#: method). timm backbones pre-trained on large data take small steps, a head- or
#: norm-only problem a larger one than a whole backbone. BC-ResNet (small, a BatchNorm
#: after every convolution, pre-trained here from scratch at 1e-2) wants steps about ten
#: times larger: these were chosen on kws-synth:de validation accuracy from 1e-3 / 5e-3,
#: 2e-2 and 5e-2 (see the bench's learning-rate notes).
DEFAULT_LR = {
    "timm": {"full": 1e-3, "low-rank": 3e-3, "adapter": 3e-3, "default": 5e-3},
    "bcresnet": {"head": 5e-2, "norm": 5e-2, "low-rank": 5e-2, "default": 2e-2},
}


def default_lr(family: str, backbone: str = "") -> float:
    """The learning rate of a method's learning-rate ``family`` on ``backbone`` when none
    is given (:data:`DEFAULT_LR`)."""
    known = find_family(backbone)
    # no backbone named (or none swr knows): the row of pre-trained image models
    table = DEFAULT_LR[known.lr_family if known is not None else "timm"]
    return table.get(family, table["default"])


# -- the registry ---------------------------------------------------------------------------
MethodFactory = Callable[..., Method]

#: Method factories by the name users type.
METHODS: dict[str, MethodFactory] = {}


def register_method(name: str | type[Method], factory: Optional[MethodFactory] = None):
    """Make ``factory(**knobs)`` available as method ``name`` (a later call replaces it);
    returns ``factory``.

    As a class decorator (``@register_method`` above a :class:`Method` subclass, as timm's
    ``@register_model``), it registers the class under its own ``name`` where it is
    defined.
    """
    if factory is None and isinstance(name, type):
        factory, name = name, name.name
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"method name {name!r} must be non-empty without surrounding spaces")
    if factory is None:
        raise ValueError(f"method {name!r}: give the factory to register")
    METHODS[name] = factory
    return factory


def get_method(name: str, **knobs) -> Method:
    """A new instance of method ``name`` with ``knobs``; unknown names or knobs raise SwrError."""
    factory = METHODS.get(name)
    if factory is None:
        raise SwrError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    if dataclasses.is_dataclass(factory):
        accepted = {f.name for f in dataclasses.fields(factory) if f.init}
        unknown = sorted(set(knobs) - accepted)
        if unknown:
            raise SwrError(f"method {name!r} has no option {', '.join(unknown)}; its options: "
                           f"{', '.join(sorted(accepted)) or 'none'}")
    return factory(**knobs)


# -- helpers shared by the methods ----------------------------------------------------------


def train_only(model: nn.Module, params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """Freeze every parameter of ``model`` except ``params``; return them as a list."""
    params = list(params)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return params


def new_head(model: nn.Module, task) -> list[nn.Parameter]:
    """Give ``model`` a fresh head for ``task``'s classes; return the head's parameters."""
    if not hasattr(model, "reset_classifier"):
        raise SwrError(f"{type(model).__name__} has no reset_classifier(); PETL methods need "
                       "a timm-style model with a resizable head")
    like = next(model.parameters())
    model.reset_classifier(task.num_classes)
    # timm builds the new head on the CPU in fp32; keep it with the backbone.
    model.get_classifier().to(device=like.device, dtype=like.dtype)
    return list(head_parameters(model).values())


def numel(params: Iterable[torch.Tensor]) -> int:
    """Total number of elements of ``params``."""
    return sum(p.numel() for p in params)


def head_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The head's state under ``head/<path>`` keys."""
    prefix = head_prefix(model)
    if prefix is None:
        return {}
    return {f"head/{prefix}.{k}": t for k, t in model.get_submodule(prefix).state_dict().items()}


def norm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every norm layer's affine parameters and running statistics under ``norm/<path>`` keys."""
    return {f"norm/{name}.{k}": t for name, m in norm_modules(model).items()
            for k, t in m.state_dict().items()}


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with nothing trainable (a deployable task model)."""
    out = copy.deepcopy(model).eval()
    for p in out.parameters():
        p.requires_grad_(False)
    return out


def fit_size(name: str, knob: str, unit_cost: int, fixed_cost: int,
             budget_params: Optional[int], given: Optional[int]) -> int:
    """The size (rank, width, length, ...) a method uses: ``given``, or the largest that fits.

    The method costs ``fixed_cost + size * unit_cost`` updated parameters. A given
    size must fit the budget when there is one; without either, the method cannot
    choose and asks for one.
    """
    if given is not None:
        if given < 1:
            raise SwrError(f"method {name!r}: {knob}={given} must be at least 1")
        cost = fixed_cost + given * unit_cost
        if budget_params is not None and cost > budget_params:
            raise BudgetError(f"method {name!r} with {knob}={given} updates {cost} parameters, "
                              f"over the budget of {budget_params}; lower {knob} or raise "
                              "the budget")
        return given
    if budget_params is None:
        raise SwrError(f"method {name!r} sizes itself to a budget: give budget_params or "
                       f"{knob}=N")
    size = (budget_params - fixed_cost) // unit_cost if unit_cost > 0 else 0
    if size < 1:
        raise BudgetError(f"method {name!r} needs {fixed_cost + unit_cost} parameters at "
                          f"{knob}=1, over the budget of {budget_params}; raise the budget")
    return int(size)
