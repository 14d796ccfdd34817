"""CLAF stage 1: the anchor-based 3D U-Net candidate network and its Table 9 variants.

Layout for a 128³ crop at the default ``width=16`` (channels in brackets)::

    x (1×128³) ─ stem: 2 × conv3³ [16] ─────────────────────────────── 128³
      maxpool ─ E1 block([16 + 3 coord] → 32) ──────────────────────── 64³
      maxpool ─ E2 block([32 + 3] → 48) ────────────────────────────── 32³
      maxpool ─ E3 block([48 + 3] → 64) ────────────────────────────── 16³
      maxpool ─ E4 block([64 + 3] → 64) ────────────────────────────── 8³
      maxpool ─ E5 block([64 + 3] → 64) ────────────────────────────── 4³
    D4 = res([up(E5), E4, maxpool(E3)] → 48) ─────────────────────── 8³
    D3 = res([up(D4), E3, maxpool(E2)] → 48) ─────────────────────── 16³
    D2 = res([up(D3), E2, maxpool(E1), coords] → 48) ──────────────── 32³
    head: conv1³ [64] → dropout → conv1³ [3 anchors × 5] ──────────── 32³ × 3 × 5

``E1…E5`` are the five encoder blocks: ``ASCRMBlock3d`` for ``variant="ascrm"``, a plain
``ResidualBlock3d`` for ``"unet"`` and a ``ResidualBlock3d`` with CBAM for ``"unet_cbam"`` (the Table 9
rows; "+ASCRM+MPPN" is the ``ascrm`` net followed by the MPPN stage). The coordinate maps are
concatenated to the input of every encoder block (the paper adds them "during the downsampling stage")
and once more at the 32³ decoder stage that feeds the head. Each decoder stage fuses the upsampled deeper
features with the same-level encoder features *and* the max-pooled features of the next shallower level
— the "multi-level skips" that bring edges and texture from high resolution into the prediction.

The output is ``(B, D/4, H/4, W/4, A, 5)``: per cell and anchor the objectness logit and the regression
deltas ``(dz, dy, dx, dd)`` that ``lungdet.anchors.decode_boxes`` turns into boxes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lungdet.anchors import DEFAULT_ANCHOR_SIZES, OUTPUT_STRIDE
from lungdet.models.blocks import ASCRMBlock3d, ConvBNAct3d, ResidualBlock3d, coordinate_maps

__all__ = ["CANDIDATE_VARIANTS", "CandidateNet", "build_candidate_net"]

#: Table 9 rows that are distinct networks (``ascrm`` also serves the "+ASCRM+MPPN" row).
CANDIDATE_VARIANTS: tuple[str, ...] = ("unet", "unet_cbam", "ascrm")

#: Encoder channel multipliers of ``width`` for the stem and E1…E5, decoder ones for D4, D3, D2.
_ENCODER_MULT = (1, 2, 3, 4, 4, 4)
_DECODER_MULT = (3, 3, 3)
_NUM_LEVELS = 5  # five poolings: input side must be a multiple of 32


class CandidateNet(nn.Module):
    """Anchor-based 3D U-Net that predicts nodule candidates on a 4×-downsampled grid.

    Args:
        variant: encoder block type, one of ``CANDIDATE_VARIANTS``.
        width: base channel count; every layer scales with it (16 gives ≈1.77 M parameters for
            ``ascrm``, the paper's size).
        in_channels: image channels (1 for windowed CT).
        anchor_sizes: anchor diameters in voxels (= mm at 1 mm spacing); the head predicts 5 numbers each.
        use_coords: concatenate the 3 coordinate maps in the downsampling path (then ``forward`` needs
            ``coords``).
        block_depth: 3×3×3 layers per encoder block.
        decoder_depth: 3×3×3 layers per decoder block.
        head_channels: width of the 1×1×1 head layer.
        dropout: channel dropout before the last head layer.
        cbam_reduction: CBAM channel-MLP reduction.
        prior_prob: initial objectness probability; the logit bias starts at ``log(p / (1 - p))`` so the
            focal loss does not start with a flood of confident false positives (RetinaNet's trick).
    """

    def __init__(
        self,
        variant: str = "ascrm",
        width: int = 16,
        in_channels: int = 1,
        anchor_sizes: Sequence[float] = DEFAULT_ANCHOR_SIZES,
        use_coords: bool = True,
        block_depth: int = 2,
        decoder_depth: int = 2,
        head_channels: int = 64,
        dropout: float = 0.2,
        cbam_reduction: int = 8,
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        if variant not in CANDIDATE_VARIANTS:
            raise ValueError(f"unknown candidate-net variant {variant!r}; choose one of {CANDIDATE_VARIANTS}")
        if width < 1:
            raise ValueError(f"width must be a positive channel count, got {width}")
        if not 0.0 < prior_prob < 1.0:
            raise ValueError(f"prior_prob must lie in (0, 1), got {prior_prob}")
        self.variant = variant
        self.width = width
        self.use_coords = use_coords
        self.anchor_sizes = tuple(float(s) for s in anchor_sizes)
        self.num_anchors = len(self.anchor_sizes)
        self.stride = OUTPUT_STRIDE
        nc = 3 if use_coords else 0

        enc = [width * m for m in _ENCODER_MULT]
        dec = [width * m for m in _DECODER_MULT]
        self.stem = nn.Sequential(ConvBNAct3d(in_channels, enc[0]), ConvBNAct3d(enc[0], enc[0]))
        self.encoder = nn.ModuleList(
            [
                self._encoder_block(enc[i] + nc, enc[i + 1], block_depth, cbam_reduction)
                for i in range(_NUM_LEVELS)
            ]
        )
        # Decoder stage k sits at the resolution of encoder block E(5-k): up(deeper) + E(5-k) + pool(E(4-k)).
        self.up4 = _up(enc[5], dec[0])
        self.dec4 = ResidualBlock3d(dec[0] + enc[4] + enc[3], dec[0], decoder_depth)
        self.up3 = _up(dec[0], dec[1])
        self.dec3 = ResidualBlock3d(dec[1] + enc[3] + enc[2], dec[1], decoder_depth)
        self.up2 = _up(dec[1], dec[2])
        self.dec2 = ResidualBlock3d(dec[2] + enc[2] + enc[1] + nc, dec[2], decoder_depth)
        self.head = nn.Sequential(
            nn.Conv3d(dec[2], head_channels, 1),
            nn.ReLU(inplace=True),
            nn.Dropout3d(dropout),
            nn.Conv3d(head_channels, self.num_anchors * 5, 1),
        )
        self._init_head(prior_prob)

    def _encoder_block(self, cin: int, cout: int, depth: int, reduction: int) -> nn.Module:
        if self.variant == "ascrm":
            return ASCRMBlock3d(cin, cout, depth, cbam_reduction=reduction)
        return ResidualBlock3d(
            cin, cout, depth, use_cbam=self.variant == "unet_cbam", cbam_reduction=reduction
        )

    def _init_head(self, prior_prob: float) -> None:
        last = self.head[-1]
        assert isinstance(last, nn.Conv3d)
        nn.init.normal_(last.weight, std=0.01)
        bias = torch.zeros(self.num_anchors, 5)
        bias[:, 0] = math.log(prior_prob / (1.0 - prior_prob))
        with torch.no_grad():
            last.bias.copy_(bias.reshape(-1))

    def output_shape(self, input_shape: Sequence[int]) -> tuple[int, int, int]:
        """Spatial shape of the prediction grid for a (..., D, H, W) input shape."""
        d, h, w = (int(s) // self.stride for s in input_shape[-3:])
        return d, h, w

    def example_inputs(self, input_shape: Sequence[int]) -> tuple[Tensor, ...]:
        """Zero inputs of a (B, C, D, H, W) shape, with whole-scan coordinates when the net needs them.

        Used by FLOP counting (``common.complexity.count_flops``) and tracing tools, which only know the
        image shape.
        """
        x = torch.zeros(*input_shape)
        if not self.use_coords:
            return (x,)
        b, spatial = input_shape[0], tuple(input_shape[-3:])
        coords = coordinate_maps([[0, 0, 0]] * b, spatial, spatial)
        return x, coords

    def forward(self, x: Tensor, coords: Tensor | None = None) -> Tensor:
        """Predict anchors for a batch of crops.

        Args:
            x: (B, C, D, H, W) windowed CT crops, each side a multiple of 32 (128³ in the paper).
            coords: (B, 3, D, H, W) coordinate maps from ``coordinate_maps`` (crop position in the whole
                scan); required when the net was built with ``use_coords=True``.

        Returns:
            (B, D/4, H/4, W/4, A, 5) raw outputs: objectness logit and (dz, dy, dx, dd) deltas per anchor.

        Raises:
            ValueError: on a bad input shape or missing/mismatched coordinate maps.
        """
        self._check_inputs(x, coords)
        feats = []
        h = self.stem(x)
        c = coords
        for block in self.encoder:
            h = F.max_pool3d(h, 2)
            if c is not None:
                c = F.avg_pool3d(c, 2)  # exact for the linear coordinate maps
                h = torch.cat([h, c], dim=1)
            h = block(h)
            feats.append(h)
        e1, e2, e3, e4, e5 = feats
        d = self.dec4(torch.cat([self.up4(e5), e4, F.max_pool3d(e3, 2)], dim=1))
        d = self.dec3(torch.cat([self.up3(d), e3, F.max_pool3d(e2, 2)], dim=1))
        skips = [self.up2(d), e2, F.max_pool3d(e1, 2)]
        if coords is not None:
            skips.append(F.avg_pool3d(coords, self.stride))
        d = self.dec2(torch.cat(skips, dim=1))
        out = self.head(d)  # (B, A*5, d, h, w)
        b, _, od, oh, ow = out.shape
        return out.view(b, self.num_anchors, 5, od, oh, ow).permute(0, 3, 4, 5, 1, 2).contiguous()

    def _check_inputs(self, x: Tensor, coords: Tensor | None) -> None:
        if x.ndim != 5:
            raise ValueError(f"CandidateNet expects (B, C, D, H, W) input, got shape {tuple(x.shape)}")
        multiple = 2**_NUM_LEVELS
        if any(s % multiple for s in x.shape[-3:]):
            raise ValueError(
                f"CandidateNet input sides must be multiples of {multiple} (five poolings), got "
                f"{tuple(x.shape[-3:])}; pad or crop to e.g. 128³"
            )
        if self.use_coords:
            if coords is None:
                raise ValueError(
                    "this CandidateNet was built with use_coords=True: pass coords=(B, 3, D, H, W) maps from "
                    "lungdet.models.coordinate_maps(crop_start, crop_shape, scan_shape)"
                )
            if coords.shape != (x.shape[0], 3, *x.shape[-3:]):
                raise ValueError(
                    f"coords must have shape {(x.shape[0], 3, *x.shape[-3:])} to match the input, "
                    f"got {tuple(coords.shape)}"
                )
        elif coords is not None:
            raise ValueError("coords were given but this CandidateNet was built with use_coords=False")


def _up(cin: int, cout: int) -> nn.Sequential:
    """2× learned upsampling (transposed conv) with BN and ReLU."""
    return nn.Sequential(
        nn.ConvTranspose3d(cin, cout, 2, stride=2, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True)
    )


def build_candidate_net(variant: str = "ascrm", width: int = 16, **kwargs) -> CandidateNet:
    """Build a stage-1 candidate network by Table 9 variant name.

    Args:
        variant: ``"unet"`` (baseline), ``"unet_cbam"`` or ``"ascrm"`` (CLAF, also the "+MPPN" row).
        width: base channel count (16 ≈ the paper's 1.77 M parameters).
        **kwargs: any other ``CandidateNet`` argument.
    """
    return CandidateNet(variant=variant, width=width, **kwargs)
