"""CLAF stage 2: the multi-scale progressive perception network (MPPN) for false-positive reduction.

Every candidate is seen through three concentric crops at the native 1 mm spacing — 32×48×48, 16×24×24
and 8×12×12 voxels (z, y, x), the paper's sizes. The small crops are *not* resampled to a common size:
the paper argues that uniform resampling distorts small nodules, so each scale keeps its own voxel grid
and its own branch. Because the crops are concentric at one spacing, the medium and small crops are the
central parts of the large one; ``MPPN.forward`` cuts them itself when only the large crop is given.

Each branch is three residual stages (3×3×3 conv-BN-ReLU ×2 with a shortcut), max-pooling between them,
and CBAM at its end. Top-down injection: before stages 2 and 3, the medium branch adds a 1×1×1
projection of the large branch's features *resampled onto the medium branch's field of view* (trilinear
``grid_sample`` of the central region, so feature cells stay anatomically aligned), and the small branch
does the same with the medium branch's (already injected) features — large-scale context flows
progressively down to the finest scale. The three final maps are globally average-pooled and
concatenated (equivalent to concatenation then pooling, which their different sizes forbid), recalibrated
by a squeeze-and-excitation gate, and a fully connected layer gives the logits.

The paper's wording "stratifies candidates into three-scale categories based on nodule diameter" reads
as if each candidate went to one branch; the architecture it then describes (parallel branches, top-down
injection, concatenation of all branches) needs all three scales of every candidate, which is what we
build.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lungdet.models.blocks import CBAM3d, ConvBNAct3d, ResidualBlock3d

__all__ = [
    "MPPN",
    "MPPN_CROP_SIZES",
    "MPPNEnsemble",
    "build_mppn",
    "centre_crop",
    "crop_candidates",
    "resample_centre",
]

#: (z, y, x) crop sizes of the large, medium and small scale (paper, "Multi-scale progressive inference").
MPPN_CROP_SIZES: tuple[tuple[int, int, int], ...] = ((32, 48, 48), (16, 24, 24), (8, 12, 12))
_STAGES = 3


def centre_crop(x: Tensor, size: Sequence[int]) -> Tensor:
    """Central ``size`` (D, H, W) region of a (..., D, H, W) tensor; margins must be even.

    Raises:
        ValueError: if ``size`` exceeds the input or cannot be centred on whole voxels.
    """
    starts = []
    for n, s in zip(x.shape[-3:], size):
        if s > n or (n - s) % 2:
            raise ValueError(f"cannot centre-crop {tuple(size)} out of {tuple(x.shape[-3:])} on whole voxels")
        starts.append((n - s) // 2)
    (z, y, w), (d, h, ww) = starts, size
    return x[..., z : z + d, y : y + h, w : w + ww]


def resample_centre(context: Tensor, target_shape: Sequence[int]) -> Tensor:
    """Trilinearly sample the central part of ``context`` onto a smaller grid of the same cell size.

    Both feature maps come from concentric crops pooled the same number of times, so the target's field
    of view is the central ``target/context`` fraction of the context's along each axis. Where that
    fraction lands on whole cells this equals ``centre_crop`` exactly; where it does not (e.g. 3 cells out
    of 6) the values are interpolated at the physically right positions instead of being shifted.

    Args:
        context: (B, C, d, h, w) features of the larger-scale branch.
        target_shape: (D, H, W) grid of the smaller-scale branch, each ≤ the context's.
    """
    b = context.shape[0]
    frac = [t / c for t, c in zip(target_shape, context.shape[-3:])]
    theta = torch.zeros(b, 3, 4, dtype=context.dtype, device=context.device)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 2, 2] = frac[2], frac[1], frac[0]  # grid is (x, y, z)
    grid = F.affine_grid(theta, [b, context.shape[1], *target_shape], align_corners=False)
    return F.grid_sample(context, grid, mode="bilinear", padding_mode="border", align_corners=False)


class _Branch(nn.Module):
    """One scale: three residual stages with max-pooling between, optional top-down injection, CBAM."""

    def __init__(self, in_channels: int, channels: Sequence[int], depth: int, inject: bool, reduction: int):
        super().__init__()
        cins = [in_channels, *channels[:-1]]
        self.stages = nn.ModuleList([ResidualBlock3d(ci, co, depth) for ci, co in zip(cins, channels)])
        # Injection before stages 2..N: project the resampled context to the stage's input width.
        self.inject = (
            nn.ModuleList([ConvBNAct3d(c, c, kernel_size=1, act=False) for c in channels[:-1]])
            if inject
            else None
        )
        self.attention = CBAM3d(channels[-1], reduction)

    def forward(self, x: Tensor, context: list[Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
        """Returns the final (attended) map and the inputs of stages 2..N for the next branch down."""
        stage_inputs: list[Tensor] = []
        x = self.stages[0](x)
        for i, stage in enumerate(self.stages[1:]):
            x = F.max_pool3d(x, 2)
            if self.inject is not None and context is not None:
                x = x + self.inject[i](resample_centre(context[i], x.shape[-3:]))
            stage_inputs.append(x)
            x = stage(x)
        return self.attention(x), stage_inputs


class MPPN(nn.Module):
    """Multi-scale progressive perception network: three concentric crops → candidate logits.

    Args:
        width: channels of the first stage; stages use ``width × (1, 2, 4)``.
        num_classes: 2 for the paper's softmax cross-entropy (logit 1 = nodule), 1 for a single BCE logit.
        in_channels: image channels.
        crop_sizes: (z, y, x) sizes of the large, medium and small crop, each side a multiple of 4.
        block_depth: 3×3×3 layers per residual stage.
        dropout: dropout before the classifier.
        cbam_reduction: CBAM channel-MLP reduction.
        attention_reduction: bottleneck ratio of the gate that recalibrates the pooled descriptor.
    """

    def __init__(
        self,
        width: int = 32,
        num_classes: int = 2,
        in_channels: int = 1,
        crop_sizes: Sequence[Sequence[int]] = MPPN_CROP_SIZES,
        block_depth: int = 2,
        dropout: float = 0.5,
        cbam_reduction: int = 8,
        attention_reduction: int = 4,
    ) -> None:
        super().__init__()
        self.crop_sizes = tuple(tuple(int(v) for v in s) for s in crop_sizes)
        if len(self.crop_sizes) != 3 or any(len(s) != 3 for s in self.crop_sizes):
            raise ValueError(f"MPPN needs three (z, y, x) crop sizes, got {crop_sizes}")
        large = self.crop_sizes[0]
        for s in self.crop_sizes:
            if any(v % 2 ** (_STAGES - 1) for v in s) or any(v > big for v, big in zip(s, large)):
                raise ValueError(
                    f"MPPN crop {s} must have sides divisible by {2 ** (_STAGES - 1)} and fit in the large crop {large}"
                )
        if num_classes < 1:
            raise ValueError(f"num_classes must be ≥ 1, got {num_classes}")
        self.num_classes = num_classes
        chans = [width * 2**i for i in range(_STAGES)]
        self.large = _Branch(in_channels, chans, block_depth, inject=False, reduction=cbam_reduction)
        self.medium = _Branch(in_channels, chans, block_depth, inject=True, reduction=cbam_reduction)
        self.small = _Branch(in_channels, chans, block_depth, inject=True, reduction=cbam_reduction)
        feat = 3 * chans[-1]
        hidden = max(feat // attention_reduction, 8)
        self.recalibrate = nn.Sequential(
            nn.Linear(feat, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, feat), nn.Sigmoid()
        )
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(feat, num_classes))

    def example_inputs(self, input_shape: Sequence[int]) -> tuple[Tensor, ...]:
        """Zero large-scale crops of a (B, C, D, H, W) shape (for ``common.complexity.count_flops``)."""
        return (torch.zeros(*input_shape),)

    def split_scales(self, large: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Cut the medium and small crops out of the large one (they are concentric at one spacing)."""
        return large, centre_crop(large, self.crop_sizes[1]), centre_crop(large, self.crop_sizes[2])

    def forward(self, large: Tensor, medium: Tensor | None = None, small: Tensor | None = None) -> Tensor:
        """Classify candidates.

        Args:
            large: (B, C, 32, 48, 48) crops centred on the candidates.
            medium: (B, C, 16, 24, 24) crops; cut from ``large`` when omitted.
            small: (B, C, 8, 12, 12) crops; cut from ``large`` when omitted.

        Returns:
            (B, num_classes) logits (softmax → P(nodule) = column 1 when ``num_classes == 2``).
        """
        if large.ndim != 5 or tuple(large.shape[-3:]) != self.crop_sizes[0]:
            raise ValueError(
                f"MPPN expects large crops (B, C, {self.crop_sizes[0]}), got {tuple(large.shape)}"
            )
        _, cut_medium, cut_small = self.split_scales(large)
        medium = cut_medium if medium is None else medium
        small = cut_small if small is None else small
        for name, crop, size in (
            ("medium", medium, self.crop_sizes[1]),
            ("small", small, self.crop_sizes[2]),
        ):
            if tuple(crop.shape[-3:]) != size or crop.shape[:2] != large.shape[:2]:
                raise ValueError(f"MPPN {name} crops must be (B, C, {size}), got {tuple(crop.shape)}")
        f_large, ctx_large = self.large(large)
        f_medium, ctx_medium = self.medium(medium, ctx_large)
        f_small, _ = self.small(small, ctx_medium)
        pooled = torch.cat([f.mean(dim=(2, 3, 4)) for f in (f_large, f_medium, f_small)], dim=1)
        return self.classifier(pooled * self.recalibrate(pooled))

    def nodule_probability(self, logits: Tensor) -> Tensor:
        """P(nodule) per candidate from this head's logits (softmax column 1, or sigmoid of one logit)."""
        if self.num_classes == 1:
            return torch.sigmoid(logits[:, 0])
        return torch.softmax(logits, dim=1)[:, 1]


def crop_candidates(
    volume: Tensor | np.ndarray,
    centres_zyx: Tensor | np.ndarray | Sequence[Sequence[float]],
    size: Sequence[int] = MPPN_CROP_SIZES[0],
    pad_value: float = 0.0,
) -> Tensor:
    """Cut (N, 1, D, H, W) crops centred on candidate voxel positions, padding outside the scan.

    The crop around centre ``c`` spans ``round(c) - size // 2`` … ``+ size``, so the medium and small
    crops that ``MPPN`` cuts from its centre are centred on the same voxel.

    Args:
        volume: (Z, Y, X) windowed 1 mm scan (float tensor or array).
        centres_zyx: (N, 3) candidate centres in voxel coordinates of ``volume``.
        size: (D, H, W) crop size (the MPPN large crop by default).
        pad_value: fill value outside the scan (0 = air after CLAF's [−1200, 600] HU window).

    Raises:
        ValueError: on a non-3D volume or malformed centres.
    """
    vol = torch.as_tensor(volume)
    if vol.ndim != 3:
        raise ValueError(f"crop_candidates expects a (Z, Y, X) volume, got shape {tuple(vol.shape)}")
    centres = torch.as_tensor(centres_zyx, dtype=torch.float64).reshape(-1, 3)
    if not bool(torch.isfinite(centres).all()):
        raise ValueError("crop_candidates: candidate centres contain NaN or infinite values")
    dtype = vol.dtype if vol.is_floating_point() else torch.float32
    out = torch.full((centres.shape[0], 1, *size), pad_value, dtype=dtype)
    starts = torch.round(centres).long() - torch.as_tensor([s // 2 for s in size])
    for i, start in enumerate(starts.tolist()):
        src, dst = [], []
        for a in range(3):
            lo, hi = max(start[a], 0), min(start[a] + size[a], vol.shape[a])
            if lo >= hi:
                break
            src.append(slice(lo, hi))
            dst.append(slice(lo - start[a], hi - start[a]))
        else:
            out[i, 0][tuple(dst)] = vol[tuple(src)].to(dtype)
    return out


class MPPNEnsemble(nn.Module):
    """``members`` independently initialised MPPNs trained side by side; P(nodule) is their mean.

    Why: on a few dozen training nodules one MPPN memorises its true crops within a few hundred steps, and
    which false positives it then ranks above the nodules depends on its initialisation. Averaging
    independently initialised members (a deep ensemble) cancels much of that. Each member sees the same
    batches but its own dropout masks; the training loss is the mean of the members' losses, so each member
    gets exactly the gradient it would get alone (up to the 1/K scale, which Adam ignores). Not in the
    paper; ``members: 1`` (the default of ``build_mppn``) is the paper's single network.
    """

    def __init__(self, members: Sequence[MPPN]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an MPPN ensemble needs at least 2 members, got {len(members)}")
        self.members = nn.ModuleList(members)
        self.crop_sizes = members[0].crop_sizes
        self.num_classes = members[0].num_classes

    def example_inputs(self, input_shape: Sequence[int]) -> tuple[Tensor, ...]:
        """Zero large-scale crops of a (B, C, D, H, W) shape (for ``common.complexity.count_flops``)."""
        return self.members[0].example_inputs(input_shape)

    def forward(self, large: Tensor, medium: Tensor | None = None, small: Tensor | None = None) -> Tensor:
        """(B, K, num_classes) logits of the K members (same crops as ``MPPN.forward``)."""
        return torch.stack([member(large, medium, small) for member in self.members], dim=1)

    def nodule_probability(self, logits: Tensor) -> Tensor:
        """Mean over the members of each member's P(nodule), from (B, K, num_classes) logits."""
        first = self.members[0]
        return torch.stack([first.nodule_probability(logits[:, k]) for k in range(logits.shape[1])]).mean(0)


def build_mppn(width: int = 32, num_classes: int = 2, members: int = 1, **kwargs) -> MPPN | MPPNEnsemble:
    """Build the stage-2 false-positive reducer.

    Args:
        width: first-stage channels (32 → ≈2.7 M parameters; the paper only says stage 2 has more
            parameters than the 1.77 M stage 1).
        num_classes: 2 (softmax cross-entropy, the paper) or 1 (single logit).
        members: 1 for the paper's single network; K ≥ 2 for an ``MPPNEnsemble`` of K independently
            initialised MPPNs (K× the parameters and compute).
        **kwargs: any other ``MPPN`` argument.
    """
    if members < 1:
        raise ValueError(f"members must be ≥ 1, got {members}")
    if members == 1:
        return MPPN(width=width, num_classes=num_classes, **kwargs)
    return MPPNEnsemble([MPPN(width=width, num_classes=num_classes, **kwargs) for _ in range(members)])
