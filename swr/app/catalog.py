"""The names users can type, read from the registries that resolve them (``swr list``).

Nothing here keeps its own copy of a list: backbones come from the backbone registry
``swr.tasks.registry`` (an open family such as timm lists its own members), tasks from
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


def backbones() -> list[tuple[str, str]]:
    """``(name, description)`` per backbone form, family by family as registered."""
    from ..tasks.backbones import BACKBONES

    return [(form, family.describe()) for family in BACKBONES.values()
            for form in family.forms or family.names]


def tasks() -> list[tuple[str, str]]:
    """``(name, description)`` per task form, every embedded task, and every suite."""
    from ..tasks import SUITE_FORMS, TASK_FORMS, get_suite
    from ..tasks.glyphs import SOURCE
    from ..tasks.kws_synth import SOURCE_LANG

    out = [(form, "task form") for form in TASK_FORMS]
    out.append((f"kws-synth:{SOURCE_LANG}", "embedded spoken words, source language"))
    out += [(t, "embedded spoken words, target language") for t in get_suite("kws-synth:all")]
    out.append((f"glyphs:{SOURCE}", "embedded glyph images, source task"))
    out += [(t, "embedded glyph images, target domain") for t in get_suite("glyphs:all")]
    out += [(form, "suite (swr bench)") for form in SUITE_FORMS]
    return out


def methods() -> list[tuple[str, str]]:
    """``(name, description)`` per registered method (SWR with each searcher included)."""
    from ..methods import METHODS
    from ..policies import SEARCHERS  # noqa: F401  (SWR's swr-<searcher> register with them)

    out = []
    for name in sorted(METHODS):
        cls = METHODS[name]
        traits = ["budgeted" if cls.respects_budget else "natural size",
                  "folds" if cls.foldable else "does not fold"]
        out.append((name, f"{_first_line(cls.__doc__)} ({', '.join(traits)})"))
    return out


def policies() -> list[tuple[str, str]]:
    """``(name, summary)`` per search policy ``swr search --policy`` accepts."""
    from ..policies import SEARCHERS

    return [(name, summary) for name, (_, summary) in SEARCHERS.items()]


def names(kind: str, pattern: str | None = None) -> list[tuple[str, str]]:
    """The entries of ``kind`` (one of :data:`KINDS`), filtered by fnmatch ``pattern``."""
    if kind == "backbones" and pattern:
        from ..tasks.backbones import find_family

        family = find_family(pattern)
        if family is not None and family.members is not None:
            # an open family (timm) lists its members matching the pattern instead
            return [(n, "") for n in family.members(pattern.removeprefix(family.prefix))]
    entries = {"backbones": backbones, "tasks": tasks, "methods": methods,
               "policies": policies}[kind]()
    if pattern:
        entries = [e for e in entries if fnmatch.fnmatch(e[0], pattern)]
    return entries
