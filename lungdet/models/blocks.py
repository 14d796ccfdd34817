"""3D building blocks of the CLAF networks: conv units, CBAM, residual and ASCRM blocks, coordinate maps.

The CLAF paper (Wang et al. 2025) describes its blocks in words; the equations did not survive in our copy, so
the concrete wiring below is our reading of the text, written down in docs/lungdet.md:

* ``CBAM3d`` — CBAM (Woo et al. 2018) lifted to 3D: channel attention from a shared MLP over global
  average- *and* max-pooled descriptors, then spatial attention from a 7×7×7 convolution over the
  channel-wise mean and max maps.
* ``ResidualBlock3d`` — the baseline unit: a stack of 3×3×3 conv-BN-ReLU layers with an identity (or 1×1×1
  projection) shortcut. ``use_cbam=True`` inserts CBAM before the addition (the "+CBAM" ablation row).
* ``ASCRMBlock3d`` — attention-guided spatial and channel residual module: stacked 3×3×3 layers whose
  every layer also receives the block input through a long skip, a cross-layer residual fusion (1×1×1
  conv over the concatenation of all layer outputs), CBAM on the fused features, and the block residual.
* ``coordinate_maps`` — the normalised position of every voxel of a crop in the whole scan, the spatial
  prior the candidate network concatenates in its downsampling path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ASCRMBlock3d",
    "CBAM3d",
    "ChannelAttention3d",
    "ConvBNAct3d",
    "ResidualBlock3d",
    "SpatialAttention3d",
    "coordinate_maps",
]


class ConvBNAct3d(nn.Sequential):
    """Conv3d (no bias, BN follows) → BatchNorm3d → optional ReLU; the unit every block stacks.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: cubic kernel size; padding keeps the spatial size ("same").
        act: append a ReLU (blocks that add a shortcut first leave it off).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, act: bool = True) -> None:
        layers: list[nn.Module] = [
            nn.Conv3d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm3d(out_channels),
        ]
        if act:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class ChannelAttention3d(nn.Module):
    """CBAM channel attention: ``sigmoid(MLP(avgpool(x)) + MLP(maxpool(x)))`` scales each channel.

    Both pooled descriptors go through one shared bottleneck MLP (1×1×1 convs), so average pooling
    contributes the overall response and max pooling the most salient one.

    Args:
        channels: feature channels.
        reduction: bottleneck ratio of the shared MLP.
        min_hidden: lower bound on the bottleneck width, so narrow layers keep a usable MLP.
    """

    def __init__(self, channels: int, reduction: int = 8, min_hidden: int = 4) -> None:
        super().__init__()
        hidden = max(channels // reduction, min_hidden)
        self.mlp = nn.Sequential(
            nn.Conv3d(channels, hidden, 1, bias=True),
            nn.ReLU(inplace=True),
            nn.Conv3d(hidden, channels, 1, bias=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        avg = self.mlp(F.adaptive_avg_pool3d(x, 1))
        mx = self.mlp(F.adaptive_max_pool3d(x, 1))
        return x * torch.sigmoid(avg + mx)


class SpatialAttention3d(nn.Module):
    """CBAM spatial attention: a k×k×k conv over the channel-wise mean and max maps gives a voxel gate.

    Args:
        kernel_size: odd cubic kernel of the gate convolution (CBAM uses 7).
    """

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"SpatialAttention3d needs an odd kernel_size, got {kernel_size}")
        self.conv = nn.Conv3d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm3d(1)

    def forward(self, x: Tensor) -> Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.bn(self.conv(pooled)))


class CBAM3d(nn.Module):
    """Convolutional block attention module in 3D: channel attention, then spatial attention.

    Args:
        channels: feature channels.
        reduction: bottleneck ratio of the channel MLP.
        spatial_kernel: kernel of the spatial gate.
    """

    def __init__(self, channels: int, reduction: int = 8, spatial_kernel: int = 7) -> None:
        super().__init__()
        self.channel = ChannelAttention3d(channels, reduction)
        self.spatial = SpatialAttention3d(spatial_kernel)

    def forward(self, x: Tensor) -> Tensor:
        return self.spatial(self.channel(x))


def _projection(in_channels: int, out_channels: int) -> nn.Module:
    """Identity when shapes agree, else a 1×1×1 conv + BN so the shortcut can be added."""
    if in_channels == out_channels:
        return nn.Identity()
    return ConvBNAct3d(in_channels, out_channels, kernel_size=1, act=False)


class ResidualBlock3d(nn.Module):
    """Residual block: ``relu(F(x) + P(x))`` with ``F`` = ``depth`` stacked 3×3×3 conv-BN(-ReLU) layers.

    This is the baseline U-Net unit (Table 9 "baseline"); with ``use_cbam=True`` CBAM refines ``F(x)``
    before the addition, which is the "+CBAM" row.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        depth: number of 3×3×3 conv layers on the residual path (≥ 1).
        use_cbam: apply CBAM to the residual path.
        cbam_reduction: CBAM channel-MLP reduction.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        depth: int = 2,
        use_cbam: bool = False,
        cbam_reduction: int = 8,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"ResidualBlock3d depth must be ≥ 1, got {depth}")
        layers: list[nn.Module] = []
        for i in range(depth):
            layers.append(
                ConvBNAct3d(in_channels if i == 0 else out_channels, out_channels, 3, act=i < depth - 1)
            )
        self.body = nn.Sequential(*layers)
        self.attention = CBAM3d(out_channels, cbam_reduction) if use_cbam else nn.Identity()
        self.shortcut = _projection(in_channels, out_channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.attention(self.body(x)) + self.shortcut(x))


class ASCRMBlock3d(nn.Module):
    """Attention-guided spatial and channel residual module (ASCRM), CLAF's encoder unit.

    With ``x0 = P(x)`` (the block input projected to ``out_channels``):

    * residual path with long skips — ``h_1 = relu(BN(W_1 * x0) + x0)``,
      ``h_l = relu(BN(W_l * h_{l-1}) + x0)``: every 3×3×3 layer re-receives the shallow block input, so
      fine structure reaches the deepest layer of the block unchanged;
    * cross-layer residual fusion — ``f = BN(W_f * [h_1, …, h_L])`` (1×1×1 conv over the concatenation),
      mixing the receptive fields of all depths;
    * CBAM on the fused features and the block residual — ``y = relu(CBAM(f) + x0)``.

    Args:
        in_channels: input channels (the candidate net adds 3 coordinate channels here).
        out_channels: output channels.
        depth: number of stacked 3×3×3 layers (≥ 2 so there is something to fuse).
        cbam_reduction: CBAM channel-MLP reduction.
    """

    def __init__(self, in_channels: int, out_channels: int, depth: int = 2, cbam_reduction: int = 8) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"ASCRMBlock3d needs depth ≥ 2 for cross-layer fusion, got {depth}")
        self.shortcut = _projection(in_channels, out_channels)
        self.layers = nn.ModuleList(
            [ConvBNAct3d(out_channels, out_channels, 3, act=False) for _ in range(depth)]
        )
        self.fuse = ConvBNAct3d(depth * out_channels, out_channels, kernel_size=1, act=False)
        self.attention = CBAM3d(out_channels, cbam_reduction)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x0 = self.shortcut(x)
        h = x0
        outputs = []
        for layer in self.layers:
            h = F.relu(layer(h) + x0)
            outputs.append(h)
        fused = self.fuse(torch.cat(outputs, dim=1))
        return self.act(self.attention(fused) + x0)


def coordinate_maps(
    crop_start: Sequence[float] | Tensor,
    crop_shape: Sequence[int],
    scan_shape: Sequence[float] | Tensor,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Normalised scan position of every voxel of a crop: the coordinate channels of the candidate net.

    Channel ``k`` (z, y, x) of voxel ``i`` is ``2 * (start_k + i + 0.5) / scan_k - 1``: −1 at the first
    voxel's outer face of the scan, +1 at the last one's, so the value says where in the lungs the crop
    sits whatever the crop size. Voxels of crops that stick out of the scan (padding) get values beyond
    ±1; they are not clamped, so the map stays an exact linear function and average pooling keeps it exact
    at every coarser level of the network.

    Args:
        crop_start: (z, y, x) voxel index of the crop's first voxel in the (1 mm) scan, or a (B, 3)
            tensor of starts for a batch; may be negative for padded crops.
        crop_shape: (D, H, W) of the crop.
        scan_shape: (z, y, x) size of the whole scan in voxels, or a (B, 3) tensor.
        dtype: output dtype.
        device: output device.

    Returns:
        (3, D, H, W) for one crop, (B, 3, D, H, W) for batched starts.

    Raises:
        ValueError: on a non-3D shape or a non-positive scan size.
    """
    start = torch.as_tensor(crop_start, dtype=torch.float64, device=device)
    size = torch.as_tensor(scan_shape, dtype=torch.float64, device=device)
    batched = start.ndim == 2
    start = start.reshape(-1, 3)
    size = size.reshape(-1, 3).expand_as(start)
    if len(crop_shape) != 3:
        raise ValueError(f"coordinate_maps: crop_shape must be (D, H, W), got {tuple(crop_shape)}")
    if bool((size <= 0).any()):
        raise ValueError(f"coordinate_maps: scan_shape must be positive, got {size.tolist()}")
    axes = []
    for k, n in enumerate(crop_shape):
        idx = torch.arange(n, dtype=torch.float64, device=device)
        axes.append(2.0 * (start[:, k : k + 1] + idx + 0.5) / size[:, k : k + 1] - 1.0)  # (B, n)
    d, h, w = (int(n) for n in crop_shape)
    b = start.shape[0]
    maps = torch.stack(
        [
            axes[0][:, :, None, None].expand(b, d, h, w),
            axes[1][:, None, :, None].expand(b, d, h, w),
            axes[2][:, None, None, :].expand(b, d, h, w),
        ],
        dim=1,
    ).to(dtype)
    return maps if batched else maps[0]
