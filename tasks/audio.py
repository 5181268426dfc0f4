"""Reading audio clips: soundfile for decoding, torchaudio for resampling.

Every clip comes out mono, 16 kHz, exactly ``length`` samples (zero-padded or
center-cropped), as float32 in [-1, 1].
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from swr.errors import SwrError

SAMPLE_RATE = 16000
CLIP_SAMPLES = 16000  # 1 s
# Rates a recording can plausibly have; a header claiming another is broken.
MIN_RATE, MAX_RATE = 1000, 768000


class BadAudioFile(SwrError):
    """A clip that cannot be decoded; carries its path."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        super().__init__(
            f"cannot read audio file {path}: {reason}; fix or delete it, or pass --on-bad-file skip")


def fix_length(wav: torch.Tensor, length: int = CLIP_SAMPLES) -> torch.Tensor:
    """Zero-pad (at the end) or center-crop a 1-D waveform to ``length`` samples."""
    n = wav.shape[-1]
    if n == length:
        return wav
    if n < length:
        return torch.nn.functional.pad(wav, (0, length - n))
    start = (n - length) // 2
    return wav[..., start:start + length]


def check_rate(path: str | os.PathLike, sr: int) -> None:
    """Raise :class:`BadAudioFile` if ``sr`` is no plausible sample rate."""
    if not MIN_RATE <= sr <= MAX_RATE:
        raise BadAudioFile(path, f"its header claims an implausible sample rate of {sr} Hz")


def resample_from(sr: int, target: int = SAMPLE_RATE) -> int:
    """The rate to resample from: ``sr``, or the nearest 100 Hz where the exact kernel is huge.

    torchaudio's sinc kernel is about (sr/g) x (target/g) taps (g = gcd): small for the
    usual rates (44.1 kHz -> 16 kHz: 441 x 160), gigabytes and a minute for a header
    claiming 44,101 Hz. Rounding changes such a clip's speed by under 0.7%.
    """
    g = math.gcd(sr, target)
    if (sr // g) * (target // g) <= 1_000_000:
        return sr
    return round(sr / 100) * 100


def read_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE,
               length: int | None = CLIP_SAMPLES) -> torch.Tensor:
    """Decode ``path`` to a mono float32 tensor at ``sample_rate``.

    Multi-channel audio is mixed down, other rates are resampled, and the clip is
    padded/cropped to ``length`` samples (``None`` keeps its length). A file that
    cannot be decoded raises :class:`BadAudioFile` naming it.
    """
    from .base import not_a_regular_file

    path = Path(path)
    reason = not_a_regular_file(path)
    if reason is not None:  # never opened: a FIFO would block forever
        raise BadAudioFile(path, reason)
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError, TypeError...
        raise BadAudioFile(path, str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    if data.size == 0:
        raise BadAudioFile(path, "it holds no samples")
    check_rate(path, sr)
    if not np.isfinite(data).all():
        raise BadAudioFile(path, "it holds NaN or infinite samples")
    wav = torch.from_numpy(data.mean(axis=1))
    if sr != sample_rate:
        wav = AF.resample(wav, resample_from(sr, sample_rate), sample_rate)
    if length is not None:
        wav = fix_length(wav, length)
    return wav.contiguous()


def write_wav(path: str | os.PathLike, wav: torch.Tensor | np.ndarray,
              sample_rate: int = SAMPLE_RATE) -> None:
    """Write a mono clip as 16-bit PCM WAV."""
    if isinstance(wav, torch.Tensor):
        wav = wav.detach().cpu().numpy()
    sf.write(str(path), np.clip(wav, -1.0, 1.0), sample_rate, subtype="PCM_16")
