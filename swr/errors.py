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
