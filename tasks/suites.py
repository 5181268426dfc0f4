"""Suites: one name for a benchmark of several tasks, as the papers report them.

``get_suite(spec)`` returns the task specs a suite name stands for, or ``None``
when ``spec`` names a single task (for :func:`swr.tasks.get_task`). ``swr bench``
expands suites with :func:`expand_tasks`; commands that train one task refuse a
suite with a line naming its tasks.

* ``kws-synth:all``: the embedded spoken-words suite's target languages,
* ``glyphs:all``: the embedded image suite's targets,
* ``imagenet-to-sketch:<root>``: CUB-200-2011, Stanford Cars, Flowers-102, WikiArt and
  Sketch found under ``<root>`` (see :mod:`.imagenet_to_sketch`),
* ``mswc:<root>:<lang1>,<lang2>,...``: one MSWC keyword-spotting task per language.
"""

from __future__ import annotations

from swr.errors import SwrError

SUITE_FORMS = ["kws-synth:all", "glyphs:all", "imagenet-to-sketch:<root>",
               "mswc:<root>:<lang1>,<lang2>,..."]


def get_suite(spec: str) -> list[str] | None:
    """The task specs of suite ``spec``, in the papers' order; ``None`` for a single task.

    Checks that a suite's folders exist (an ``imagenet-to-sketch`` root must hold all
    five datasets); it loads no data.
    """
    if spec == "kws-synth:all":
        from .kws_synth import TARGET_LANGS

        return [f"kws-synth:{lang}" for lang in TARGET_LANGS]
    if spec == "glyphs:all":
        from .glyphs import TARGETS

        return [f"glyphs:{t}" for t in TARGETS]
    kind, sep, rest = spec.partition(":")
    if kind == "imagenet-to-sketch":
        if not rest:
            raise SwrError(f"suite {spec!r}: write imagenet-to-sketch:<root>, the folder "
                           f"holding the five datasets")
        from .imagenet_to_sketch import locate

        return [f"{k}:{folder}" for k, folder in locate(rest).items()]
    if kind == "mswc" and "," in rest:
        root, sep, langs = rest.rpartition(":")
        names = [lang.strip() for lang in langs.split(",")]
        if not sep or not root or not all(names):
            raise SwrError(f"suite {spec!r}: write mswc:<root>:<lang1>,<lang2>,..., "
                           f"e.g. mswc:/data/mswc:de,fr,pl")
        if len(set(names)) != len(names):
            raise SwrError(f"suite {spec!r} names a language twice; list each once")
        return [f"mswc:{root}:{lang}" for lang in names]
    return None


def expand_tasks(specs: list[str]) -> list[str]:
    """``specs`` with every suite replaced by its tasks (duplicates kept once, in order)."""
    out: list[str] = []
    for spec in specs:
        for task in get_suite(spec) or [spec]:
            if task not in out:
                out.append(task)
    return out


def check_single_task(spec: str) -> None:
    """:class:`SwrError` when ``spec`` is a suite: a command that trains one task needs one."""
    tasks = get_suite(spec)
    if tasks is not None:
        shown = ", ".join(tasks[:3]) + (", ..." if len(tasks) > 3 else "")
        raise SwrError(f"{spec!r} is a suite of {len(tasks)} tasks ({shown}); name one task, "
                       f"or run them all with swr bench --task {spec}")
