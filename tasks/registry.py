"""The registry of backbone families, each declared where it is defined.

A family (``bcresnet-<tau>``, ``dscnn-<size>``, ``timm:<model_name>``) registers its
builder with :func:`register_backbone`, as timm's ``@register_model`` does, and with it
the facts the rest of swr asks of a backbone by its name: the modality of its input,
the per-sample input shape, the classes of a model built without a count, the row of
:data:`swr.methods.base.DEFAULT_LR` it trains with, and (timm) its data config. Code
outside the family looks these up here instead of testing name prefixes.

``swr.tasks.backbones`` imports every family module, so reading the registry through it
(``check_backbone_name``, ``backbone_family``, ``BACKBONE_FORMS``) sees all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from swr.errors import SwrError

#: The modalities a backbone can read; a task of the other one does not fit it.
MODALITIES = ("audio", "image")


@dataclass(frozen=True)
class BackboneFamily:
    """One family of backbones: how to build its members and what they expect.

    ``names`` lists the members of a closed family; an open family (timm, whose
    members are timm's architectures) leaves it empty and accepts what ``check``
    accepts. ``forms`` are the names shown to users (``timm:<model_name>`` for timm).
    """

    prefix: str
    build: Callable
    description: str | Callable[[], str]
    modality: str
    input_shape: tuple[int, ...]
    num_classes: int
    lr_family: str
    names: tuple[str, ...] = ()
    forms: tuple[str, ...] = ()
    #: raises SwrError naming what is wrong with a name of the family; for a closed
    #: family it is asked only about names outside ``names`` (a family-specific error)
    check: Optional[Callable[[str], object]] = None
    #: the timm-style data config of a member, without building it (None: the family
    #: has no data config, e.g. the keyword spotters, which read log-mels)
    data_config: Optional[Callable[[str], Optional[dict]]] = None
    #: the members matching an fnmatch pattern on the part after ``prefix``, for an
    #: open family that cannot list ``names`` (``swr list backbones 'timm:resnet*'``)
    members: Optional[Callable[[str], list[str]]] = None

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise ValueError(f"backbone family {self.prefix!r}: modality {self.modality!r} "
                             f"is not one of {', '.join(MODALITIES)}")
        if not self.prefix:
            raise ValueError("a backbone family needs a name prefix")

    def describe(self) -> str:
        """The family's one line for ``swr list backbones``."""
        return self.description() if callable(self.description) else self.description


#: Families by name prefix, in registration order (the order users see them in).
BACKBONES: dict[str, BackboneFamily] = {}


def register_backbone(*, prefix: str, **cfg) -> Callable:
    """Decorator registering the builder it wraps as the family of names starting with
    ``prefix``; ``cfg`` holds the other fields of :class:`BackboneFamily`. The builder is
    called as ``build(name, num_classes=N, **kwargs)`` and returned unchanged."""
    def add(build: Callable) -> Callable:
        clash = [p for p in BACKBONES if p != prefix and (p.startswith(prefix)
                                                          or prefix.startswith(p))]
        if clash:
            # a name must lead to one family: prefixes may not contain one another
            raise ValueError(f"backbone prefix {prefix!r} overlaps {clash[0]!r}")
        BACKBONES[prefix] = BackboneFamily(prefix=prefix, build=build, **cfg)
        return build
    return add


def backbone_forms() -> list[str]:
    """The backbone names users can type (patterns for open families), family by family."""
    return [form for family in BACKBONES.values() for form in family.forms or family.names]


def find_family(name: object) -> Optional[BackboneFamily]:
    """The family whose prefix ``name`` starts with, or None (the name is not checked)."""
    if not isinstance(name, str):
        return None
    return next((f for p, f in BACKBONES.items() if name.startswith(p)), None)


def check_name(name: object) -> str:
    """``name`` if it names a member of a registered family, else :class:`SwrError`."""
    known = ", ".join(backbone_forms())
    if not isinstance(name, str) or not name:
        raise SwrError(f"backbone {name!r} is not a name; known: {known}")
    family = find_family(name)
    if family is not None:
        if name in family.names:
            return name
        if family.check is not None:
            family.check(name)  # the family's own one-line error
        if not family.names:  # an open family: what its check accepts is a member
            return name
    raise SwrError(f"unknown backbone {name!r}; known: {known}")
