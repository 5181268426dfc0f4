"""SB3's training statistics (PPO's losses, entropy, KL, clip fraction, fps) in swr's run log.

SB3's own ``tensorboard_log`` needs ``torch.utils.tensorboard``, which needs the
``tensorboard`` package; :class:`RunLogFormat` is an SB3 output format that hands
every dump to a :class:`swr.runlog.RunLog` instead, which writes ``ppo.csv`` and
TensorBoard event files with whichever writer is installed (see :mod:`swr.runlog`).
The tags are SB3's own (``train/entropy_loss``, ``train/loss``, ``time/fps``, ...).
"""

from __future__ import annotations

import os
from typing import Any

from stable_baselines3.common.logger import KVWriter, Logger

from swr.runlog import RunLog
from swr.runlog import reset as reset_runlog


class RunLogFormat(KVWriter):
    """An SB3 output format writing each dump as one :class:`RunLog` record."""

    def __init__(self, runlog: RunLog):
        self.runlog = runlog

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, tuple[str, ...]],
              step: int = 0) -> None:
        values = {k: v for k, v in key_values.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if values:
            self.runlog.record(step, values)

    def close(self) -> None:
        self.runlog.close()


def sb3_logger(folder: str | os.PathLike) -> Logger:
    """An SB3 logger writing ``<folder>/ppo.csv`` and ``<folder>/tensorboard/ppo/``, afresh."""
    reset_runlog(folder, ("ppo",))
    # tag "" keeps SB3's own "train/..." and "time/..." keys as the TensorBoard tags
    return Logger(str(folder), [RunLogFormat(RunLog(folder, "ppo", tag=""))])
