"""Reading audio clips: soundfile for decoding, torchaudio for resampling.

Every clip comes out mono, 16 kHz, exactly ``length`` samples (zero-padded or
center-cropped), as float32 in [-1, 1]. Every audio file is read through
:func:`read_audio`, whose header is checked first by :func:`audio_header` (the load-time
probe of the loaders is that check alone): a header that contradicts itself or the
file's size, or claims more than :data:`MAX_AUDIO_SECONDS`, is refused, and only the
frames the clip is cut from are decoded.
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from swr.errors import SwrError

from .base import not_a_regular_file

SAMPLE_RATE = 16000
CLIP_SAMPLES = 16000  # 1 s
# Rates a recording can plausibly have; a header claiming another is broken.
MIN_RATE, MAX_RATE = 1000, 768000
#: The longest audio file read (10 minutes). Keyword clips last about a second and
#: Speech Commands' background-noise recordings at most a minute and a half; a header
#: claiming more (a sparse file of 4 KB on disk can claim a GiB: 9 hours) is refused
#: rather than decoded.
MAX_AUDIO_SECONDS = 600
#: Bytes a sample takes in the libsndfile subtypes of fixed size: for these the
#: header's frame count fixes how large the file must be.
SAMPLE_BYTES = {"PCM_S8": 1, "PCM_U8": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4,
                "FLOAT": 4, "DOUBLE": 8, "ULAW": 1, "ALAW": 1}
# WAVE format tags whose frames are channels x whole bytes per sample (PCM, IEEE
# float, A-law, mu-law, extensible); ADPCM and other block codecs have other frames.
_PLAIN_WAVE_TAGS = (1, 3, 6, 7, 0xFFFE)
# data-chunk sizes a streaming writer leaves when it cannot seek back (length unknown)
_UNKNOWN_DATA_SIZES = (0, 0xFFFFFFFF)
_HEADER_BYTES = 1 << 16  # the RIFF chunks before "data" are read from this much of the file


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


def _reason(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def riff_header_lie(head: bytes, file_size: int) -> str | None:
    """Why a RIFF/WAVE header (``head``: the file's first bytes) contradicts itself or
    ``file_size``; ``None`` when it does not, or is no RIFF/WAVE header.

    libsndfile trusts the channel count over the frame size (8 channels claimed on mono
    data read as 8-channel audio) and quietly shortens a data chunk that runs past the
    end of the file, so both are checked here, on the header's own fields.
    """
    order = {b"RIFF": "<", b"RIFX": ">"}.get(head[:4])
    if order is None or head[8:12] != b"WAVE":
        return None
    pos = 12
    while pos + 8 <= len(head):
        chunk = head[pos:pos + 4]
        (n,) = struct.unpack(order + "I", head[pos + 4:pos + 8])
        body = pos + 8
        if chunk == b"fmt " and n >= 16 and body + 16 <= len(head):
            tag, channels, rate, byte_rate, align, bits = struct.unpack(
                order + "HHIIHH", head[body:body + 16])
            if tag in _PLAIN_WAVE_TAGS and channels and bits:
                frame = channels * ((bits + 7) // 8)
                if align != frame:
                    return (f"its header claims {channels} channel(s) of {bits}-bit samples "
                            f"({frame} bytes a frame) but frames of {align} bytes")
                if byte_rate != rate * align:
                    return (f"its header claims {byte_rate} bytes a second, not {rate} Hz x "
                            f"{align} bytes a frame")
        elif chunk == b"data":
            if n not in _UNKNOWN_DATA_SIZES and body + n > file_size:
                return (f"its header claims {n:,} bytes of samples but the file holds "
                        f"{max(0, file_size - body):,} after the header (truncated, or the "
                        f"header lies)")
            return None
        pos = body + n + (n & 1)  # chunks are padded to an even size
    return None


def audio_header(path: str | os.PathLike):
    """The ``soundfile.info`` of audio file ``path``, once its header is checked.

    Raises :class:`BadAudioFile` naming the file, without decoding a sample, when it
    is not a regular file (never opened: a FIFO would block), has no readable header
    or no samples, claims an implausible rate, claims more than
    :data:`MAX_AUDIO_SECONDS`, or contradicts itself or the file's size: a WAV header's
    channels x bytes a sample against its frame size and byte rate, and its data chunk
    against the bytes the file holds; for every format whose samples have a fixed size
    (:data:`SAMPLE_BYTES`), frames x channels x bytes a sample against the file size.
    """
    path = Path(path)
    reason = not_a_regular_file(path)
    if reason is not None:  # never opened: a FIFO would block forever
        raise BadAudioFile(path, reason)
    try:
        info = sf.info(str(path))
        size = path.stat().st_size
        head = b""
        if info.format in ("WAV", "WAVEX"):
            with open(path, "rb") as f:
                head = f.read(_HEADER_BYTES)
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError, TypeError...
        raise BadAudioFile(path, _reason(e)) from None
    if info.frames <= 0 or info.channels <= 0:
        raise BadAudioFile(path, "it holds no samples")
    check_rate(path, info.samplerate)
    lie = riff_header_lie(head, size)
    if lie is not None:
        raise BadAudioFile(path, lie)
    width = SAMPLE_BYTES.get(info.subtype)
    if width is not None and info.frames * info.channels * width > size:
        raise BadAudioFile(path, f"its header claims {info.frames:,} frames x {info.channels} "
                                 f"channel(s) x {width} bytes, more than the file's {size:,} "
                                 f"bytes (truncated, or the header lies)")
    seconds = info.frames / info.samplerate
    if seconds > MAX_AUDIO_SECONDS:
        raise BadAudioFile(path, f"its header claims {seconds:,.0f} s of audio, more than the "
                                 f"{MAX_AUDIO_SECONDS} s an input may last")
    return info


def read_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE,
               length: int | None = CLIP_SAMPLES) -> torch.Tensor:
    """Decode ``path`` to a mono float32 tensor at ``sample_rate``.

    Multi-channel audio is mixed down, other rates are resampled, and the clip is
    padded/cropped to ``length`` samples (``None`` keeps its length). The header is
    checked first (:func:`audio_header`), and of a longer file only the frames the
    centre ``length`` samples come from are decoded (with a 10 ms margin either side
    for the resampling filter). A file that cannot be decoded, or whose header is
    refused, raises :class:`BadAudioFile` naming it.
    """
    path = Path(path)
    info = audio_header(path)
    sr = info.samplerate
    start, frames = 0, -1  # -1: to the end (a compressed file's frame count may be estimated)
    if length is not None:
        need = math.ceil(length * sr / sample_rate) + 2 * (sr // 100)
        if info.frames > need:
            start, frames = (info.frames - need) // 2, need
    try:
        data, sr = sf.read(str(path), frames=frames, start=start, dtype="float32",
                           always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError, TypeError...
        raise BadAudioFile(path, _reason(e)) from None
    if data.size == 0:
        raise BadAudioFile(path, "it holds no samples")
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
