"""Pyramid Refinement Decoder (PRD), paper Eq. 8 and Algorithm 3.

Starting from the bottleneck consensus map, each decoder stage up-samples by 2, concatenates the skip of
that scale and refines with a residual unit of two 3×3 conv-BN-ReLU layers:

    D^(k) = R(Up(D^(k+1)) ‖ S_k)

Options cover the two variants the paper mentions: ``upsample`` = ``"bilinear"`` or ``"transposed"``, and
``skip_gate=True`` passes every skip through an additive attention gate (Schlemper et al.) driven by the
up-sampled decoder map, as in the paper's Methods overview ("attention-gated skips"). ``residual=False``
drops the shortcut (plain double conv) for ablations. The refinement unit and the attention gate are
MONAI's ``UnetResBlock`` / ``UnetBasicBlock`` and ``AttentionBlock``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetBasicBlock, UnetResBlock
from monai.networks.nets.attentionunet import AttentionBlock
from torch import nn

__all__ = ["DecoderStage", "PyramidRefinementDecoder"]

UPSAMPLE_MODES = ("bilinear", "transposed")


class DecoderStage(nn.Module):
    """One PRD step: up-sample ×2, (optionally gate the skip), concatenate, refine.

    Args:
        in_channels: Width of the coarser decoder map.
        skip_channels: Width of the skip at the target scale.
        out_channels: Width of the refined map.
        upsample: ``"bilinear"`` (parameter-free) or ``"transposed"`` (learned 2×2 transposed conv).
        residual: Residual refinement unit (paper) or plain double conv.
        skip_gate: Attention-gate the skip with the up-sampled map.
    """

    def __init__(
        self,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        upsample: str = "bilinear",
        residual: bool = True,
        skip_gate: bool = False,
    ) -> None:
        super().__init__()
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"Unknown upsample mode {upsample!r}; choose one of {UPSAMPLE_MODES}.")
        self.up: nn.Module | None = None
        if upsample == "transposed":
            self.up = nn.ConvTranspose2d(in_channels, in_channels, kernel_size=2, stride=2)
        self.gate = (
            AttentionBlock(2, f_int=max(skip_channels // 2, 8), f_g=in_channels, f_l=skip_channels)
            if skip_gate
            else None
        )
        unit = UnetResBlock if residual else UnetBasicBlock
        self.refine = unit(
            2, in_channels + skip_channels, out_channels, kernel_size=3, stride=1, norm_name="batch",
            act_name="relu",
        )  # fmt: skip

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Up-sample ``x`` to the skip's grid and return the refined map."""
        if self.up is not None:
            x = self.up(x)
        if x.shape[-2:] != skip.shape[-2:]:
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        if self.gate is not None:
            skip = self.gate(x, skip)
        return self.refine(torch.cat([x, skip], dim=1))


class PyramidRefinementDecoder(nn.Module):
    """Decoder over a fine-to-coarse list of skips.

    Args:
        bottleneck_channels: Width of the coarsest encoder map ``D^(L)``.
        skip_channels: Skip widths ordered fine → coarse (one per decoder stage).
        decoder_channels: Output widths of the decoder stages, same order and length as ``skip_channels``.
        upsample: See :class:`DecoderStage`.
        residual: See :class:`DecoderStage`.
        skip_gate: See :class:`DecoderStage`.
    """

    def __init__(
        self,
        bottleneck_channels: int,
        skip_channels: Sequence[int],
        decoder_channels: Sequence[int],
        upsample: str = "bilinear",
        residual: bool = True,
        skip_gate: bool = False,
    ) -> None:
        super().__init__()
        if len(skip_channels) != len(decoder_channels):
            raise ValueError(
                f"decoder_channels has {len(decoder_channels)} entries but there are {len(skip_channels)} "
                "skips; give one width per decoder stage (fine → coarse)."
            )
        stages = []
        in_ch = bottleneck_channels
        # Built coarse → fine (execution order); stored fine → coarse to match the skip list.
        for skip_ch, out_ch in zip(reversed(skip_channels), reversed(decoder_channels)):
            stages.append(DecoderStage(in_ch, skip_ch, out_ch, upsample, residual, skip_gate))
            in_ch = out_ch
        self.stages = nn.ModuleList(reversed(stages))
        self.out_channels = tuple(decoder_channels)

    def forward(
        self,
        bottleneck: torch.Tensor,
        skips: Sequence[torch.Tensor],
        checkpoint_fn: Callable[..., torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Decode; returns every decoder stage output ordered fine → coarse (``[D_finest, …]``).

        Args:
            bottleneck: Coarsest encoder map.
            skips: Skip maps ordered fine → coarse.
            checkpoint_fn: Optional ``fn(module, *inputs)`` wrapper (gradient checkpointing).
        """
        if len(skips) != len(self.stages):
            raise ValueError(f"Decoder expects {len(self.stages)} skips, got {len(skips)}.")
        outputs: list[torch.Tensor] = []
        x = bottleneck
        for stage, skip in zip(reversed(self.stages), reversed(skips)):
            x = checkpoint_fn(stage, x, skip) if checkpoint_fn is not None else stage(x, skip)
            outputs.append(x)
        return outputs[::-1]
