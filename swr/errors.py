"""User-facing errors.

Anything a user can get wrong (a name, a path, a budget, a file) raises
:class:`SwrError` with one line that names the value and says what to do. The CLI
prints that line and exits with status 2; Python callers can catch it.
"""

from __future__ import annotations


class SwrError(Exception):
    """Bad input: one clear line naming the offending value or file and the fix."""


class BudgetError(SwrError):
    """A budget that cannot be met, or a selection that exceeds it."""


class ForeignDeltaError(SwrError):
    """A task delta made for other base weights."""


class ClusterLostError(SwrError):
    """The Ray cluster a run had joined stopped answering (its head went away)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that it unwinds as for Ctrl-C: staged
    folders and temporary files are removed, locks released, one line printed."""


_SIGTERM_HANDLED = False
_TERMINATED = False


def was_terminated(error: BaseException) -> bool:
    """Whether ``error`` (a ``KeyboardInterrupt``) came from SIGTERM rather than Ctrl-C."""
    return isinstance(error, Terminated) or _TERMINATED


def handle_sigterm(again: bool = False) -> None:
    """Make SIGTERM raise :class:`Terminated` in the main thread (as Ctrl-C raises
    ``KeyboardInterrupt``). The CLI calls it at start; ``again=True`` (after
    ``ray.init``, which installs a handler that exits mid-write) re-installs it only
    where the CLI had, so a notebook's own handling is left alone."""
    import signal
    import threading

    global _SIGTERM_HANDLED
    if again and not _SIGTERM_HANDLED:
        return

    def _raise(signum, frame):
        global _TERMINATED
        _TERMINATED = True  # libraries (Ray) may catch it and raise a plain KeyboardInterrupt
        raise Terminated()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise)
        _SIGTERM_HANDLED = True
