"""Watching a run: scalars per epoch or per search iteration, as CSV and TensorBoard files.

A :class:`RunLog` writes one *stream* (``epochs``, ``search_iterations``, ``ppo``) of a
run folder:

* ``<folder>/<stream>.csv``: one row per record, rewritten atomically after each
  record, so it can be read (or plotted) while the run goes on;
* ``<folder>/tensorboard/<stream>/``: TensorBoard event files with every numeric
  value as a scalar, flushed after each record; ``tensorboard --logdir <folder>``
  shows each stream as a run (``--logdir`` of a bench's ``runs/`` shows every cell).

The event files are written with ``torch.utils.tensorboard`` when the
``tensorboard`` package is installed, otherwise with ``tensorboardX`` (installed
with Ray), and are skipped when neither imports or when ``SWR_TENSORBOARD=0``;
the CSV is always written. A record costs one small file write and one flush:
nothing compared with an epoch or a scored selection.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Optional

from .io import write_text

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"


def summary_writer_class() -> Optional[Callable[..., Any]]:
    """The TensorBoard ``SummaryWriter`` class available here, or None.

    ``torch.utils.tensorboard`` needs the ``tensorboard`` package; ``tensorboardX``
    writes the same event files without it.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter
    except ImportError:
        pass
    try:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    except ImportError:
        return None


def tensorboard_enabled() -> bool:
    """Whether event files are written: a writer imports and ``SWR_TENSORBOARD`` is not 0."""
    if os.environ.get("SWR_TENSORBOARD", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return summary_writer_class() is not None


#: the streams swr writes: training epochs, policy-gradient iterations, SB3 PPO updates
STREAMS = ("epochs", "search_iterations", "ppo")

#: what a training run logs live into its folder (a staged run folder carries them over)
TRAINING_LOGS = ("epochs.csv", TENSORBOARD_DIR)


def reset(folder: str | os.PathLike, streams: tuple[str, ...] = STREAMS) -> None:
    """Forget the logs of an earlier run in ``folder``: the streams' CSVs and event files.

    Called when a run starts afresh in a folder, so TensorBoard and the CSVs show this
    run only. Removes only files these logs write.
    """
    folder = Path(folder)
    for stream in streams:
        (folder / f"{stream}.csv").unlink(missing_ok=True)
        board = folder / TENSORBOARD_DIR / stream
        if board.is_dir():
            for f in board.glob("events.out.tfevents.*"):
                f.unlink()


class RunLog:
    """Records of one stream of a run folder (see the module docstring).

    ``tag`` prefixes the TensorBoard tags (``<tag>/<key>``; default: the stream; ``""``
    uses the keys as they are).
    Rows already in ``<stream>.csv`` are kept and appended to, so several phases of
    one run (a probe, then a fine-tune) share the file; :func:`reset` starts afresh.
    """

    def __init__(self, folder: str | os.PathLike, stream: str, tag: Optional[str] = None,
                 tensorboard: Optional[bool] = None):
        self.folder = Path(folder)
        self.stream = stream
        self.tag = stream if tag is None else tag
        self.path = self.folder / f"{stream}.csv"
        self.rows: list[dict] = []
        if self.path.is_file():
            with open(self.path, newline="", encoding="utf-8") as fh:
                self.rows = list(csv.DictReader(fh))
        self._writer = None
        self._tensorboard = tensorboard_enabled() if tensorboard is None else tensorboard

    def record(self, step: int, values: dict) -> None:
        """Add one record at ``step`` (epoch, iteration or timestep)."""
        self.rows.append({"step": step, **values})
        columns: list[str] = []
        for row in self.rows:
            columns += [k for k in row if k not in columns]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.rows)
        write_text(self.path, buf.getvalue())
        board = self._board()
        if board is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) \
                        and math.isfinite(value):
                    board.add_scalar(f"{self.tag}/{key}" if self.tag else key, value, step)
            board.flush()

    def _board(self):
        if self._writer is None and self._tensorboard:
            cls = summary_writer_class()
            if cls is None:
                self._tensorboard = False
                return None
            self._writer = cls(str(self.folder / TENSORBOARD_DIR / self.stream))
        return self._writer

    def close(self) -> None:
        """Flush and close the event file (the CSV is complete after every record)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
