"""BC-ResNet: broadcasted residual learning for keyword spotting.

Kim, Chang, Lee, Sung, Lee, "Broadcasted Residual Learning for Efficient Keyword
Spotting", Interspeech 2021. Written from the paper's description (Sec. 2, Fig. 2,
Table 1), not from a public implementation.

The model reads a log-mel spectrogram ``(B, 1, 40, T)`` (40 bands, 10 ms hop, so
``T = 101`` for a 1 s clip) and follows Table 1 of the paper, with every channel
count scaled by the width factor ``tau``:

=========================  ===========  ==========================  ==========
layer                      channels     stride / dilation           output F
=========================  ===========  ==========================  ==========
Conv 5x5 + BN + ReLU       16           stride (2, 1)               20
2 x BC-ResBlock            8            dilation (1, 1)             20
2 x BC-ResBlock            12           stride (2, 1), dil. (1, 2)  10
4 x BC-ResBlock            16           stride (2, 1), dil. (1, 4)  5
4 x BC-ResBlock            20           dilation (1, 8)             5
DWConv 5x5 (no F padding)  20                                       1
Conv 1x1 + BN + ReLU       32                                       1
global average pool        32
classifier                 num_classes
=========================  ===========  ==========================  ==========

The stride applies to the first block of a stage only; the dilation to the
temporal depthwise convolution of every block of the stage.

Everything is a plain ``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.Linear`` and the
forward passes hold no data-dependent control flow, so the generic machinery
(``torch.fx`` tracing, conv+BN folding, FLOP counting, reparametrization by module
type) works on it unchanged. Sub-spectral normalization is the exception to folding:
its BatchNorm acts on a reshaped tensor, so it never directly follows a conv in the
traced graph and stays a separate op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from swr.errors import SwrError

from .heads import PooledClassifier
from .registry import register_backbone

#: Width factors of the models reported in the paper (Table 2).
BCRESNET_TAUS: tuple[float, ...] = (1, 1.5, 2, 3, 6, 8)

#: Registry names, one per width factor: ``bcresnet-1`` ... ``bcresnet-8``.
BCRESNET_NAMES: tuple[str, ...] = tuple(f"bcresnet-{t:g}" for t in BCRESNET_TAUS)

# Table 1, at tau = 1: stem width, then per stage (channels, blocks, frequency stride
# of the stage's first block, temporal dilation), then the width before pooling.
_STEM_CHANNELS = 16
_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (8, 2, 1, 1),
    (12, 2, 2, 2),
    (16, 4, 2, 4),
    (20, 4, 1, 8),
)
_HEAD_CHANNELS = 32
# Kernel of the last depthwise conv; it is applied without frequency padding so that
# the 5 remaining frequency bins collapse to one (Table 1).
_HEAD_KERNEL = 5


class SubSpectralNorm(nn.Module):
    """Sub-spectral normalization (Chang et al., Interspeech 2021; BC-ResNet Sec. 2.3).

    The frequency axis is cut into ``subbands`` contiguous bands and each
    (channel, band) pair gets its own batch statistics and affine parameters, so
    the normalization can treat low and high frequencies differently. That is
    exactly a ``BatchNorm2d(channels * subbands)`` applied to the tensor reshaped
    to ``(B, C * S, F / S, T)``; holding that BatchNorm as ``self.bn`` lets generic
    code find the affine parameters by module type.
    """

    def __init__(self, channels: int, subbands: int):
        super().__init__()
        self.channels = channels
        self.subbands = subbands
        self.bn = nn.BatchNorm2d(channels * subbands)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, F, T) -> (B, C, S, F/S, T) -> (B, C*S, F/S, T): channel c, band s
        # becomes BN channel c*S + s. Only constants go into the reshapes, so the
        # module traces symbolically for any input size.
        y = self.bn(x.unflatten(2, (self.subbands, -1)).flatten(1, 2))
        return y.unflatten(1, (self.channels, self.subbands)).flatten(2, 3)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, subbands={self.subbands}"


class BCResBlock(nn.Module):
    """One broadcasted residual block (paper Sec. 2.2, Fig. 2).

    ``f2`` is a 3x1 frequency-depthwise conv followed by sub-spectral norm; its
    output is averaged over frequency and passed through ``f1`` (1x3 temporal
    depthwise conv, BN, Swish, 1x1 conv, channel-wise dropout), whose
    frequency-free result is broadcast back over every frequency bin:

        y = ReLU(x + f2(x) + BC(f1(avgpool_F(f2(x)))))

    A transition block (Fig. 2b: channel change and/or frequency stride) first maps
    the input with a 1x1 conv + BN + ReLU and drops the identity shortcut, because
    the shapes of ``x`` and ``f2(x)`` no longer match.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 dilation: int = 1, subbands: int = 5, dropout: float = 0.1):
        super().__init__()
        self.transition = in_channels != out_channels or stride != 1
        self.expand = (
            nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            )
            if self.transition else nn.Identity())
        c = out_channels
        # Convs feeding a normalization carry no bias: the norm's shift replaces it.
        self.f2 = nn.Sequential(
            nn.Conv2d(c, c, (3, 1), stride=(stride, 1), padding=(1, 0), groups=c, bias=False),
            SubSpectralNorm(c, subbands),
        )
        self.f1 = nn.Sequential(
            nn.Conv2d(c, c, (1, 3), padding=(0, dilation), dilation=(1, dilation),
                      groups=c, bias=False),
            nn.BatchNorm2d(c),
            nn.SiLU(inplace=True),
            nn.Conv2d(c, c, 1, bias=False),
            nn.Dropout2d(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.expand(x)
        h = self.f2(x)
        # (B, C, 1, T) from f1 broadcasts over the frequency axis of h.
        y = h + self.f1(h.mean(dim=2, keepdim=True))
        if not self.transition:
            y = y + x
        return F.relu(y)


def _scaled(channels: int, tau: float) -> int:
    """Channel count of a width-``tau`` model (Sec. 3.1: all widths times tau)."""
    return max(1, int(round(channels * tau)))


def _check_frequency_layout(n_mels: int, subbands: int) -> None:
    """Fail early when ``n_mels`` cannot be cut into ``subbands`` at every stage."""
    if n_mels < 1 or subbands < 1:
        raise SwrError(f"BC-ResNet needs n_mels >= 1 and subbands >= 1, got n_mels={n_mels}, "
                       f"subbands={subbands}")
    freq = (n_mels + 1) // 2  # the stem halves frequency (ceil, with padding 2)
    for i, (_, _, stride, _) in enumerate(_STAGES, start=1):
        freq = (freq - 1) // stride + 1  # 3x1 conv, padding 1
        if freq % subbands:
            raise SwrError(
                f"n_mels={n_mels} leaves {freq} frequency bins in BC-ResNet stage {i}, which "
                f"is not divisible by subbands={subbands}; use n_mels=40 (the paper's "
                f"setting) or a subbands value that divides every stage's bins")
    if freq < _HEAD_KERNEL:
        raise SwrError(f"n_mels={n_mels} leaves {freq} frequency bins before the BC-ResNet "
                       f"head, fewer than its {_HEAD_KERNEL}x{_HEAD_KERNEL} kernel; use "
                       f"n_mels >= {8 * _HEAD_KERNEL}")


class BCResNet(PooledClassifier):
    """BC-ResNet-``tau`` (paper Table 1), with a timm-style model interface.

    ``forward_features`` returns the pooled ``num_features = 32 * tau`` vector and
    ``head`` is an ``nn.Linear`` on it: the paper's final 1x1 conv on a 1x1 map
    computes the same function.
    """

    def __init__(self, tau: float = 1, num_classes: int = 12, in_chans: int = 1,
                 n_mels: int = 40, dropout: float = 0.1, subbands: int = 5):
        super().__init__()
        if not tau > 0:
            raise SwrError(f"BC-ResNet width factor tau must be positive, got {tau}")
        _check_frequency_layout(n_mels, subbands)
        self.tau = tau
        self.num_classes = num_classes

        stem = _scaled(_STEM_CHANNELS, tau)
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, stem, 5, stride=(2, 1), padding=2, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU(inplace=True),
        )

        stages = []
        in_ch = stem
        for base, blocks, stride, dilation in _STAGES:
            out_ch = _scaled(base, tau)
            stage = [BCResBlock(in_ch, out_ch, stride, dilation, subbands, dropout)]
            stage += [BCResBlock(out_ch, out_ch, 1, dilation, subbands, dropout)
                      for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            in_ch = out_ch
        self.stages = nn.Sequential(*stages)

        self.num_features = _scaled(_HEAD_CHANNELS, tau)
        self.head_conv = nn.Sequential(
            nn.Conv2d(in_ch, in_ch, _HEAD_KERNEL, padding=(0, _HEAD_KERNEL // 2),
                      groups=in_ch, bias=False),
            nn.Conv2d(in_ch, self.num_features, 1, bias=False),
            nn.BatchNorm2d(self.num_features),
            nn.ReLU(inplace=True),
        )
        self._init_head(f"bcresnet-{tau:g}", in_chans, n_mels, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Log-mel ``(B, in_chans, n_mels, T)`` -> pooled features ``(B, num_features)``."""
        x = self.head_conv(self.stages(self.stem(x)))
        return x.mean(dim=(2, 3))


def bcresnet_tau(name: str) -> float:
    """The width factor ``tau`` that registry name ``name`` stands for (case and
    surrounding spaces ignored); an unknown name raises :class:`SwrError` listing the
    valid ones."""
    prefix = "bcresnet-"
    key = name.strip().lower()
    tau = None
    if key.startswith(prefix):
        try:
            tau = float(key[len(prefix):])
        except ValueError:
            tau = None
    if tau is None or tau not in BCRESNET_TAUS:
        raise SwrError(f"unknown BC-ResNet model {name!r}; choose one of "
                       f"{', '.join(BCRESNET_NAMES)}")
    return tau


# The learning-rate row "bcresnet": small, a BatchNorm after every convolution,
# pre-trained here from scratch (see swr.methods.base.DEFAULT_LR).
@register_backbone(prefix="bcresnet-", names=BCRESNET_NAMES, check=bcresnet_tau,
                   description="BC-ResNet keyword spotter (width multiplier after the dash)",
                   modality="audio", input_shape=(1, 40, 101), num_classes=12,
                   lr_family="bcresnet")
def create_bcresnet(name: str, num_classes: int = 12, **kwargs) -> BCResNet:
    """Build a registry model by name: ``bcresnet-1``, ``bcresnet-1.5``, ... ``bcresnet-8``.

    Extra keyword arguments go to :class:`BCResNet` (``in_chans``, ``n_mels``,
    ``dropout``, ``subbands``). An unknown name raises :class:`SwrError` listing
    the valid ones.
    """
    return BCResNet(tau=bcresnet_tau(name), num_classes=num_classes, **kwargs)
