"""DS-CNN: a depthwise-separable CNN for keyword spotting.

Zhang, Suda, Lai, Chandra, "Hello Edge: Keyword Spotting on Microcontrollers", 2017.
Written from the paper's description (Sec. 3, the DS-CNN of Fig. 4 and the S/M/L
sizes of its model-size tables), not from a public implementation.

The network is a first regular convolution, then ``N`` depthwise-separable blocks
(a 3x3 depthwise conv + BN + ReLU, then a 1x1 pointwise conv + BN + ReLU), a global
average pool and a linear classifier. The sizes differ in width and depth:

=======  ========  =========
name     channels  DS blocks
=======  ========  =========
dscnn-s  64        4
dscnn-m  172       4
dscnn-l  276       5
=======  ========  =========

The paper's first layer has a 10 x 4 (time x frequency) kernel with stride 2 in both
axes. Here the input is the log-mel ``(B, 1, 40, T)`` of the other keyword spotters
(frequency first, ``T = 101`` for a 1 s clip), so the kernel is 4 x 10 and the stem
gives ``(20, 51)`` maps; every depthwise-separable block keeps that size.

As in BC-ResNet, everything is a plain ``nn.Conv2d`` / ``nn.BatchNorm2d`` /
``nn.Linear`` with no data-dependent control flow: each conv is followed directly by
its BatchNorm, so the generic machinery (candidate layers, conv+BN folding, FLOP
counting) works on it unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from swr.errors import SwrError

from .heads import PooledClassifier
from .registry import register_backbone

#: Name -> (channels, depthwise-separable blocks) of the paper's S, M and L models.
DSCNN_SIZES: dict[str, tuple[int, int]] = {
    "dscnn-s": (64, 4),
    "dscnn-m": (172, 4),
    "dscnn-l": (276, 5),
}
DSCNN_NAMES: tuple[str, ...] = tuple(DSCNN_SIZES)

# The first conv: 4 frequency bins x 10 frames, stride 2 on both axes, padded so that
# each axis halves rounding up (40 x 101 -> 20 x 51) and a clip of any length keeps
# at least one frame.
_STEM_KERNEL = (4, 10)
_STEM_STRIDE = (2, 2)
_STEM_PADDING = (1, 5)


def _conv_bn_relu(in_ch: int, out_ch: int, kernel, stride=1, padding=0,
                  groups: int = 1) -> nn.Sequential:
    # no conv bias: the BatchNorm's shift that follows replaces it
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, groups=groups,
                  bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class DSBlock(nn.Module):
    """One depthwise-separable block: 3x3 depthwise conv + BN + ReLU (one filter per
    channel, the spatial part), then 1x1 pointwise conv + BN + ReLU (the channel mix)."""

    def __init__(self, channels: int):
        super().__init__()
        self.depthwise = _conv_bn_relu(channels, channels, 3, padding=1, groups=channels)
        self.pointwise = _conv_bn_relu(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class DSCNN(PooledClassifier):
    """DS-CNN with ``channels`` everywhere and ``blocks`` depthwise-separable blocks, with
    a timm-style model interface (``forward_features`` gives the pooled features,
    ``head`` is the linear classifier)."""

    def __init__(self, channels: int = 64, blocks: int = 4, num_classes: int = 12,
                 in_chans: int = 1, n_mels: int = 40, name: str = "dscnn"):
        super().__init__()
        if channels < 1 or blocks < 0:
            raise SwrError(f"DS-CNN needs channels >= 1 and blocks >= 0, got channels="
                           f"{channels}, blocks={blocks}")
        if n_mels < _STEM_KERNEL[0] - 2 * _STEM_PADDING[0]:
            raise SwrError(f"DS-CNN needs n_mels >= "
                           f"{_STEM_KERNEL[0] - 2 * _STEM_PADDING[0]}, got {n_mels}")
        self.num_classes = num_classes
        self.num_features = channels
        self.stem = _conv_bn_relu(in_chans, channels, _STEM_KERNEL, _STEM_STRIDE, _STEM_PADDING)
        self.blocks = nn.Sequential(*(DSBlock(channels) for _ in range(blocks)))
        self._init_head(name, in_chans, n_mels, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Log-mel ``(B, in_chans, n_mels, T)`` -> pooled features ``(B, num_features)``."""
        return self.blocks(self.stem(x)).mean(dim=(2, 3))


def _check_dscnn_name(name: str) -> None:
    if name not in DSCNN_SIZES:
        raise SwrError(f"unknown DS-CNN model {name!r}; choose one of {', '.join(DSCNN_NAMES)}")


# No learning rates were tuned for DS-CNN: it takes BC-ResNet's row, a net of the same
# kind (small, a BatchNorm after every convolution, pre-trained here from scratch).
@register_backbone(prefix="dscnn-", names=DSCNN_NAMES, check=_check_dscnn_name,
                   description="DS-CNN keyword spotter (Hello Edge; size s, m or l after "
                               "the dash)",
                   modality="audio", input_shape=(1, 40, 101), num_classes=12,
                   lr_family="bcresnet")
def create_dscnn(name: str, num_classes: int = 12, **kwargs) -> DSCNN:
    """Build ``dscnn-s``, ``dscnn-m`` or ``dscnn-l``; extra keyword arguments
    (``in_chans``, ``n_mels``) go to :class:`DSCNN`. An unknown name raises
    :class:`SwrError` listing the valid ones."""
    _check_dscnn_name(name)
    channels, blocks = DSCNN_SIZES[name]
    return DSCNN(channels, blocks, num_classes=num_classes, name=name, **kwargs)
