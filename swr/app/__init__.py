"""The application floor: the ``swr`` command line and what its commands run (the search
command with its fingerprint and resume, bench, tune, demo, evaluate, finetune, the
catalog of names) and the Python entry point :func:`select`. It imports every floor
below it (the core ``swr``, ``swr.tasks``, ``swr.envs``, ``swr.policies``); none of
them imports it."""

from .api import select

__all__ = ["select"]
