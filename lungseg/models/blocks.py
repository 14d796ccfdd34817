"""Small building blocks shared by the GLANCE streams, fusion and decoder.

Kept separate so that every stream file (``gct.py``, ``mrgam.py``, ``baselines.py``) reads as the block the
paper describes and nothing else. Convolution + BatchNorm + ReLU comes from timm (``ConvNormAct``); only the
pieces timm and MONAI lack are written here.
"""

from __future__ import annotations

import torch
from timm.layers import ConvNormAct
from torch import nn

__all__ = ["ChannelGate", "ImageStem", "conv_bn_relu"]


def conv_bn_relu(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    stride: int = 1,
    dilation: int = 1,
    groups: int = 1,
    apply_act: bool = True,
) -> ConvNormAct:
    """Return a ``Conv2d → BatchNorm2d → ReLU`` unit with "same" padding.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Square kernel size.
        stride: Convolution stride (2 halves the resolution).
        dilation: Dilation rate; padding follows it so the spatial size only depends on ``stride``.
        groups: Number of convolution groups.
        apply_act: ``False`` drops the ReLU (used before residual sums).
    """
    return ConvNormAct(
        in_channels,
        out_channels,
        kernel_size=kernel_size,
        stride=stride,
        padding=dilation * (kernel_size - 1) // 2,
        dilation=dilation,
        groups=groups,
        apply_act=apply_act,
    )


class ChannelGate(nn.Module):
    """Squeeze-and-excitation gate that *returns* the per-channel weights instead of applying them.

    CSCF needs γ = SE(Z) with a different channel count than Z (γ weighs the projected map, Z is the
    concatenation of both streams), which timm's ``SEModule`` cannot express because it multiplies its input.

    Args:
        in_channels: Channels of the squeezed map.
        out_channels: Number of gate values.
        reduction: Bottleneck ratio ``r`` of the excitation MLP (the paper uses 16).
        min_hidden: Lower bound on the bottleneck width, so narrow test models still get a usable MLP.
    """

    def __init__(self, in_channels: int, out_channels: int, reduction: int = 16, min_hidden: int = 8) -> None:
        super().__init__()
        hidden = max(in_channels // reduction, min_hidden)
        self.fc1 = nn.Conv2d(in_channels, hidden, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``B×C_in×H×W`` to gate values ``B×C_out×1×1`` in (0, 1)."""
        squeezed = x.mean(dim=(2, 3), keepdim=True)
        return torch.sigmoid(self.fc2(self.act(self.fc1(squeezed))))


class ImageStem(nn.Module):
    """Two shallow convolutional levels at full and half resolution.

    GLANCE's pyramid starts at stride 4 (the GCT patch embedding), but the paper predicts nodule masks and
    centre heatmaps at the input resolution. The stem gives the convolutional streams their stride-2 entry
    and gives the decoder high-resolution skips so the last two upsampling steps recover boundaries instead
    of interpolating them.

    Args:
        in_channels: Image channels (1 for a lung-windowed slice, more for 2.5D stacks).
        channels: Output channels at stride 1 and stride 2.
    """

    def __init__(self, in_channels: int, channels: tuple[int, int]) -> None:
        super().__init__()
        c_full, c_half = channels
        self.full_res = nn.Sequential(conv_bn_relu(in_channels, c_full), conv_bn_relu(c_full, c_full))
        self.half_res = nn.Sequential(conv_bn_relu(c_full, c_half, stride=2), conv_bn_relu(c_half, c_half))
        self.out_channels = (c_full, c_half)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the stride-1 and stride-2 feature maps."""
        full = self.full_res(x)
        return full, self.half_res(full)
