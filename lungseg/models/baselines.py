"""Plain convolutional stream used by the ablation baselines (paper Tables 4 and 5).

GLANCE's ablations swap streams rather than whole networks, so every row shares the stem, the pyramid
refinement decoder and the heads; only the encoder's stream set and fusion change (see
:mod:`lungseg.models.variants`). The one block the baselines need that GLANCE itself lacks is a plain
U-Net-style encoder stage: a dense stride-2 3×3 conv-BN-ReLU followed by ``depth`` dense 3×3 conv-BN-ReLU
units. It stands in for

* the whole encoder of the **baseline U-Net** (one plain stream, no fusion),
* both streams of **dual plain encoders** (two plain streams fused by CSCF),
* the convolutional partner of the transformer in **conv + transformer** (GCT + plain stream + CSCF).
"""

from __future__ import annotations

import torch
from torch import nn

from lungseg.models.blocks import conv_bn_relu

__all__ = ["PlainConvStage"]


class PlainConvStage(nn.Module):
    """U-Net-style encoder stage: strided conv-BN-ReLU, then ``depth`` conv-BN-ReLU units.

    Args:
        in_channels: Width of the stage input.
        channels: Stage width ``C_k``.
        depth: Number of 3×3 conv-BN-ReLU units after the down-sampling one.
        stride: Down-sampling factor of the entry convolution.
    """

    def __init__(self, in_channels: int, channels: int, depth: int = 2, stride: int = 2) -> None:
        super().__init__()
        if depth < 0:
            raise ValueError(f"A plain conv stage needs depth >= 0, got {depth}.")
        self.down = conv_bn_relu(in_channels, channels, 3, stride=stride)
        self.blocks = nn.Sequential(*(conv_bn_relu(channels, channels) for _ in range(depth)))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Return the stage map; ``context`` is accepted for interface parity with MRGAM and ignored."""
        return self.blocks(self.down(x))
