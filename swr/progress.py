"""Progress bars that read well on a terminal and in a log file.

On a terminal every long loop shows a tqdm bar as usual. When stderr is not a terminal
(``swr demo 2> log``, a batch job), a bar writes a line of its own at its start, at most
one more every :data:`LOG_INTERVAL` seconds, and its last (100%) line: a log of a long
run stays a few hundred lines, not one line per batch.

A loop that runs inside a larger job (a bench run's training epochs, its search) has no
bar of its own there: it tells what it is doing with :func:`report_status`, and the job
that wants to show it (``swr bench`` on its bar of runs) listens with
:func:`status_reported_to`.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Callable, Iterator

#: Seconds between two progress lines of one bar in a log file.
LOG_INTERVAL = 30.0
_now = time.monotonic  # the clock log lines are spaced by


class _LogLines:
    """A file for one tqdm bar that turns its carriage-return refreshes into lines,
    keeping the first, the last (100%) and at most one per :data:`LOG_INTERVAL`."""

    def __init__(self, stream):
        self.stream = stream
        self.last = None

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if not line:
            return
        now = _now()
        if self.last is None or now - self.last >= LOG_INTERVAL or "100%" in line:
            self.stream.write(line + "\n")
            self.stream.flush()
            self.last = now

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total: int, desc: str, unit: str, leave: bool = True, **kwargs: Any):
    """A tqdm bar over ``total`` steps (see the module docstring for logs)."""
    from tqdm.auto import tqdm

    stream = kwargs.pop("file", None) or sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True,
                    file=stream, **kwargs)
    return tqdm(total=total, desc=desc, unit=unit, leave=True, file=_LogLines(stream),
                **{"ncols": 100, "mininterval": 1.0, **kwargs})


#: Who hears :func:`report_status` in this process (see :func:`status_reported_to`).
_listeners: list[Callable[[str], None]] = []


@contextlib.contextmanager
def status_reported_to(listener: Callable[[str], None]) -> Iterator[None]:
    """While the block runs, every :func:`report_status` of this process calls
    ``listener`` with its text (``"lora epoch 3/10"``)."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


def report_status(text: str) -> None:
    """Say what the work in progress is doing now, to whoever listens (nobody: nothing)."""
    for listener in list(_listeners):
        listener(text)
