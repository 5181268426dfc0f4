"""Transfer problems: datasets, feature front-ends and backbones.

``get_task(spec)`` resolves the task names users type:

* ``kws-synth:<lang>``: embedded multilingual spoken words (generated offline),
* ``glyphs:<target>``: embedded image suite (rendered offline from bundled fonts),
* ``imagefolder:<path>``: ``<path>/{train,test}/<class>/*`` (ImageNet-to-Sketch layout),
* ``speechcommands:<path>``: Google Speech Commands v2, 12-class protocol,
* ``mswc:<path>:<lang>``: Multilingual Spoken Words.
"""

from __future__ import annotations

from typing import Any

from swr.errors import SwrError

from .base import Task

TASK_FORMS = ["kws-synth:<lang>", "glyphs:<target>", "imagefolder:<path>",
              "speechcommands:<path>", "mswc:<path>:<lang>"]


def get_task(spec: str, seed: int = 0, on_bad_file: str = "fail",
             data_config: dict | None = None, **kwargs: Any) -> Task:
    """Load the task named by ``spec`` (see the module docstring for the forms).

    ``on_bad_file`` ("fail" or "skip") is passed to the loaders of real data
    (imagefolder, speechcommands, mswc); the embedded suites generate their data
    and have no files a user could damage. Skipped files are listed in
    ``task.info["skipped"]``. ``data_config`` (a backbone's timm data config, see
    :func:`swr.source.load_base`) sets the image tasks' preprocessing; audio tasks
    ignore it.
    """
    if on_bad_file not in ("fail", "skip"):
        raise SwrError(f"on_bad_file must be 'fail' or 'skip', got {on_bad_file!r}")
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise SwrError(f"task {spec!r} is not of a known form: {', '.join(TASK_FORMS)}")
    if kind == "kws-synth":
        from .kws_synth import load_kws_synth

        return load_kws_synth(rest, seed=seed, **kwargs)
    if kind == "glyphs":
        from .glyphs import load_glyphs

        return load_glyphs(rest, seed=seed, data_config=data_config, **kwargs)
    if kind == "imagefolder":
        from .imagefolder import load_imagefolder

        return load_imagefolder(rest, seed=seed, on_bad_file=on_bad_file,
                                data_config=data_config, **kwargs)
    if kind == "speechcommands":
        from .speechcommands import load_speechcommands

        return load_speechcommands(rest, seed=seed, on_bad_file=on_bad_file, **kwargs)
    if kind == "mswc":
        path, sep, lang = rest.rpartition(":")
        if not sep or not path or not lang:
            raise SwrError(f"task {spec!r}: write mswc:<path>:<lang>, e.g. mswc:/data/mswc:de")
        from .mswc import load_mswc

        return load_mswc(path, lang, seed=seed, on_bad_file=on_bad_file, **kwargs)
    raise SwrError(f"unknown task kind {kind!r} in {spec!r}; known: {', '.join(TASK_FORMS)}")


__all__ = ["Task", "TASK_FORMS", "get_task"]
