"""Transfer problems: datasets, feature front-ends and backbones.

``get_task(spec)`` resolves the task names users type:

* ``kws-synth:<lang>``: embedded multilingual spoken words (generated offline),
* ``glyphs:<target>``: embedded image suite (rendered offline from bundled fonts),
* ``imagefolder:<path>``: ``<path>/{train,test}/<class>/*`` (ImageNet-to-Sketch layout),
* ``speechcommands:<path>``: Google Speech Commands v2, 12-class protocol,
* ``mswc:<path>:<lang>``: Multilingual Spoken Words,
* ``cub:<path>``, ``stanford-cars:<path>``, ``flowers102:<path>``, ``wikiart:<path>``,
  ``sketch:<path>``: the ImageNet-to-Sketch datasets in their own layouts
  (:mod:`.imagenet_to_sketch`).

``kws-synth:<lang>?speakers=T,V,E`` draws T training, V validation and E test speakers
(and E shift-test speakers; default 16,6,8 for a target language): a larger validation
split ranks selections with less noise, a larger test split measures them better. It
is generated and cached apart from the default-size task. ``glyphs:<target>?images=T,V,E``
does the same for a glyph task, in images per class (default 30,10,20).

Any task takes a ``?shots=N`` suffix (``kws-synth:de?shots=8``): at most N training
examples per class, drawn with the seed (:func:`.base.few_shot`); validation and test
stay whole.

Every size an option asks for is bounded before any data is made or read: each option
declares its maximum and, where it generates data, an estimate of the memory the task
would hold (:mod:`.options`, :data:`.options.MAX_TASK_BYTES`).

Suites (``kws-synth:all``, ``glyphs:all``, ``imagenet-to-sketch:<root>``,
``mswc:<path>:<lang1>,<lang2>``) name several tasks: ``get_suite`` in :mod:`.suites`
expands them; ``get_task`` refuses them with a line naming their tasks.
"""

from __future__ import annotations

from typing import Any, Optional

from swr.errors import SwrError

from .base import DataOverride, Task

TASK_FORMS = ["kws-synth:<lang>", "glyphs:<target>", "imagefolder:<path>",
              "speechcommands:<path>", "mswc:<path>:<lang>", "cub:<path>",
              "stanford-cars:<path>", "flowers102:<path>", "wikiart:<path>", "sketch:<path>"]


def split_shots(spec: str) -> tuple[str, Optional[str]]:
    """``(task spec, N)`` of a ``SPEC?shots=N`` spec (N as written, unchecked), else
    ``(spec, None)``."""
    base_spec, sep, modifier = spec.rpartition("?")
    if sep and modifier.startswith("shots="):
        return base_spec, modifier[len("shots="):]
    return spec, None


#: Task kinds whose inputs are audio (log-mel spectrograms); every other kind is images.
AUDIO_KINDS = ("kws-synth", "speechcommands", "mswc")


def get_task(spec: str, seed: int = 0, on_bad_file: str = "fail",
             data_config: dict | None = None, override: Optional[DataOverride] = None,
             **kwargs: Any) -> Task:
    """Load the task named by ``spec`` (see the module docstring for the forms).

    ``on_bad_file`` ("fail" or "skip") is passed to the loaders of real data
    (imagefolder, speechcommands, mswc); the embedded suites generate their data
    and have no files a user could damage. Skipped files are listed in
    ``task.info["skipped"]``. ``data_config`` (a backbone's timm data config, see
    :func:`swr.source.load_base`) sets the image tasks' preprocessing; audio tasks
    ignore it. ``override`` (a user's ``--image-size``/``--mean``/``--std``) replaces
    those values of ``data_config`` (glyphs are then rendered at that size) and is
    recorded in ``task.info["data_override"]``; an audio task refuses it.
    """
    if on_bad_file not in ("fail", "skip"):
        raise SwrError(f"on_bad_file must be 'fail' or 'skip', got {on_bad_file!r}")
    from .suites import check_single_task

    check_single_task(spec)
    kind = spec.partition(":")[0]
    if override and kind in AUDIO_KINDS:
        raise SwrError(f"task {spec} is audio: --image-size, --mean and --std prepare image "
                       "tasks only; drop them")
    base_spec, value = split_shots(spec)
    if value is not None:
        from .base import few_shot
        from .options import SHOTS, parse_values

        (shots,) = parse_values(SHOTS, value, spec)  # bounded before any data is read
        return few_shot(get_task(base_spec, seed=seed, on_bad_file=on_bad_file,
                                 data_config=data_config, override=override, **kwargs),
                        shots, seed=seed)
    if override:
        if override.image_size and kind == "glyphs":  # rendered at that size, not resized
            kwargs = {**kwargs, "image_size": override.image_size}
        task = _load(spec, seed, on_bad_file, override.apply(data_config), kwargs)
        task.info["data_override"] = override.as_dict()
        return task
    return _load(spec, seed, on_bad_file, data_config, kwargs)


def _load(spec: str, seed: int, on_bad_file: str, data_config: dict | None,
          kwargs: dict) -> Task:
    """The task of a single spec without ``?shots=``, from its kind's loader."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise SwrError(f"task {spec!r} is not of a known form: {', '.join(TASK_FORMS)}")
    if kind == "kws-synth":
        from .kws_synth import load_kws_synth_spec

        return load_kws_synth_spec(rest, seed=seed, **kwargs)
    if kind == "glyphs":
        from .glyphs import load_glyphs_spec

        return load_glyphs_spec(rest, seed=seed, data_config=data_config, **kwargs)
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
    from .imagenet_to_sketch import LOADERS

    if kind in LOADERS:
        return LOADERS[kind](rest, seed=seed, on_bad_file=on_bad_file, data_config=data_config,
                             **kwargs)
    raise SwrError(f"unknown task kind {kind!r} in {spec!r}; known: {', '.join(TASK_FORMS)}")


def task_data_path(spec: str) -> Optional[str]:
    """The dataset folder a task spec reads (real data, suites included), else None.

    Used to keep outputs out of the data a run reads; the embedded suites live in the
    cache and have none.
    """
    spec = split_shots(spec)[0]  # a few-shot task reads its task's data
    kind, _, rest = spec.partition(":")
    if kind in ("kws-synth", "glyphs"):
        return None
    if kind == "mswc":
        return rest.rpartition(":")[0] or None
    return rest or None


from .suites import SUITE_FORMS, expand_tasks, get_suite  # noqa: E402

__all__ = ["AUDIO_KINDS", "DataOverride", "SUITE_FORMS", "Task", "TASK_FORMS", "expand_tasks",
           "get_suite", "get_task", "task_data_path"]
