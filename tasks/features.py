"""Audio front-end: log-mel spectrograms and SpecAugment.

The keyword-spotting convention (BC-ResNet, Speech Commands): 40 mel bands at
16 kHz, 30 ms window, 10 ms hop, giving ``(1, 40, 101)`` for a 1 s clip.
"""

from __future__ import annotations

import torch
import torchaudio
from torch import nn

from .audio import SAMPLE_RATE


class LogMel(nn.Module):
    """Waveforms ``(B, T)`` or ``(T,)`` -> log-mel ``(B, 1, n_mels, frames)``."""

    def __init__(self, n_mels: int = 40, sample_rate: int = SAMPLE_RATE,
                 win_ms: float = 30.0, hop_ms: float = 10.0):
        super().__init__()
        win = int(round(sample_rate * win_ms / 1000))
        hop = int(round(sample_rate * hop_ms / 1000))
        n_fft = 1 << (win - 1).bit_length()  # next power of two >= window
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=n_fft, win_length=win, hop_length=hop,
            n_mels=n_mels, power=2.0)

    @torch.no_grad()
    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        if wav.dim() == 1:
            wav = wav.unsqueeze(0)
        return torch.log(self.mel(wav) + 1e-6).unsqueeze(1)


class SpecAugment(nn.Module):
    """Random frequency and time masks on a batch ``(B, 1, F, T)`` (train only)."""

    def __init__(self, freq_mask: int = 7, time_mask: int = 20, n_masks: int = 1):
        super().__init__()
        self.freq = torchaudio.transforms.FrequencyMasking(freq_mask, iid_masks=True)
        self.time = torchaudio.transforms.TimeMasking(time_mask, iid_masks=True)
        self.n_masks = n_masks

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.n_masks):
            x = self.time(self.freq(x))
        return x
