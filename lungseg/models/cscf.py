"""Cross-Scale Consensus Fusion (CSCF), paper Eq. 7.

At every encoder stage ``k`` the two stream outputs are fused into one consensus map

    Z   = BN([F_g ‖ F_l])
    F_c = γ ⊙ Conv1×1(Z) + (F_g + F_l),        γ = SE(Z) ∈ (0, 1)^C

and ``F_c`` is the input of *both* streams' next stage and the decoder skip of scale ``k``. The residual
sum keeps the un-fused evidence flowing; the gated 1×1 projection adds the learned cross-stream mixture.

The module accepts any number of streams. With one stream (ablation rows "w/o GCT" and "w/o MRGAM", which
keep CSCF while removing a branch) it degenerates to ``F_c = γ ⊙ Conv1×1(BN(F)) + F`` — the same gated
residual refinement with nothing to reconcile. Rows without CSCF use :class:`LateFusion` instead.
"""

from __future__ import annotations

import torch
from torch import nn

from lungseg.models.blocks import ChannelGate

__all__ = ["ConsensusFusion", "LateFusion"]


class ConsensusFusion(nn.Module):
    """CSCF for ``num_streams`` maps of width ``channels`` at one scale.

    Args:
        channels: Width ``C`` of every stream at this scale (and of the fused output).
        num_streams: Number of fused maps (2 in GLANCE).
        reduction: Squeeze-excitation bottleneck ratio for γ (16 in the paper).
    """

    def __init__(self, channels: int, num_streams: int = 2, reduction: int = 16) -> None:
        super().__init__()
        if num_streams < 1:
            raise ValueError(f"CSCF needs at least one stream, got {num_streams}.")
        self.num_streams = num_streams
        self.norm = nn.BatchNorm2d(channels * num_streams)
        self.proj = nn.Conv2d(channels * num_streams, channels, kernel_size=1, bias=False)
        self.gate = ChannelGate(channels * num_streams, channels, reduction=reduction)
        self.out_channels = channels

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Fuse the same-scale stream maps ``features`` into ``F_c`` (``B×C×h×w``)."""
        if len(features) != self.num_streams:
            raise ValueError(f"CSCF built for {self.num_streams} streams received {len(features)} maps.")
        z = self.norm(torch.cat(features, dim=1))
        return self.gate(z) * self.proj(z) + sum(features)


class LateFusion(nn.Module):
    """No cross-stream exchange in the encoder: the decoder skip is the concatenation of the stream maps.

    Used by the "w/o CSCF" and single-stream rows. Fusion is deferred to the decoder's refinement
    convolutions, which see every stream's channels side by side.

    Args:
        channels: Width of every stream at this scale.
        num_streams: Number of concatenated maps.
    """

    def __init__(self, channels: int, num_streams: int) -> None:
        super().__init__()
        self.num_streams = num_streams
        self.out_channels = channels * num_streams

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Concatenate the stream maps along channels."""
        if len(features) != self.num_streams:
            raise ValueError(f"LateFusion built for {self.num_streams} streams got {len(features)} maps.")
        return features[0] if len(features) == 1 else torch.cat(features, dim=1)
