"""The names users can type, read from the registries that resolve them (``swr list``).

Nothing here keeps its own copy of a list: backbones come from
``swr.tasks.backbones.BACKBONE_FORMS`` (and timm's own registry), tasks from
``swr.tasks.TASK_FORMS`` / ``SUITE_FORMS`` and the embedded suites' target lists,
methods from ``swr.methods.METHODS`` (with SWR under every registered searcher),
policies from the searcher registry ``swr.policies.SEARCHERS``. Part of the
application layer: it names things of every layer.
"""

from __future__ import annotations

import fnmatch
import re

KINDS = ("backbones", "tasks", "methods", "policies")


def _first_line(text: str | None) -> str:
    """A docstring's first line as plain text (reST roles and literals unwrapped)."""
    line = (text or "").strip().splitlines()[0].rstrip(".") if (text or "").strip() else ""
    return re.sub(r":\w+:`([^`]*)`", r"\1", line).replace("``", "")


def backbones(timm_pattern: str | None = None) -> list[tuple[str, str]]:
    """``(name, description)`` per backbone form; with ``timm_pattern`` (fnmatch, e.g.
    ``resnet*``) every matching timm architecture as ``timm:<name>`` instead."""
    if timm_pattern is not None:
        import timm

        return [(f"timm:{n}", "") for n in timm.list_models(timm_pattern)]
    from .tasks.backbones import BACKBONE_FORMS

    out = []
    for form in BACKBONE_FORMS:
        if form.startswith("timm:"):
            import timm

            out.append((form, f"any of timm's {len(timm.list_models())} architectures "
                              f"(`swr list backbones 'timm:resnet*'` lists them)"))
        else:
            out.append((form, "BC-ResNet keyword spotter (width multiplier after the dash)"))
    return out


def tasks() -> list[tuple[str, str]]:
    """``(name, description)`` per task form, every embedded task, and every suite."""
    from .tasks import SUITE_FORMS, TASK_FORMS, get_suite
    from .tasks.glyphs import SOURCE
    from .tasks.kws_synth import SOURCE_LANG

    out = [(form, "task form") for form in TASK_FORMS]
    out.append((f"kws-synth:{SOURCE_LANG}", "embedded spoken words, source language"))
    out += [(t, "embedded spoken words, target language") for t in get_suite("kws-synth:all")]
    out.append((f"glyphs:{SOURCE}", "embedded glyph images, source task"))
    out += [(t, "embedded glyph images, target domain") for t in get_suite("glyphs:all")]
    out += [(form, "suite (swr bench)") for form in SUITE_FORMS]
    return out


def methods() -> list[tuple[str, str]]:
    """``(name, description)`` per registered method (SWR with each searcher included)."""
    from .methods import METHODS
    from .search import register_swr_methods

    register_swr_methods()
    out = []
    for name in sorted(METHODS):
        cls = METHODS[name]
        traits = ["budgeted" if cls.respects_budget else "natural size",
                  "folds" if cls.foldable else "does not fold"]
        out.append((name, f"{_first_line(cls.__doc__)} ({', '.join(traits)})"))
    return out


def policies() -> list[tuple[str, str]]:
    """``(name, summary)`` per search policy ``swr search --policy`` accepts."""
    from .policies import SEARCHERS

    return [(name, summary) for name, (_, summary) in SEARCHERS.items()]


def names(kind: str, pattern: str | None = None) -> list[tuple[str, str]]:
    """The entries of ``kind`` (one of :data:`KINDS`), filtered by fnmatch ``pattern``."""
    if kind == "backbones" and pattern and pattern.startswith("timm:"):
        return backbones(pattern.removeprefix("timm:"))
    entries = {"backbones": backbones, "tasks": tasks, "methods": methods,
               "policies": policies}[kind]()
    if pattern:
        entries = [e for e in entries if fnmatch.fnmatch(e[0], pattern)]
    return entries
