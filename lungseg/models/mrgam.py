"""Multi-Receptive Grouped Atrous Mixer (MRGAM), the local stream of GLANCE (paper Eqs. 5–6, Algorithm 2).

An MRGAM block runs ``N`` parallel grouped 3×3 convolutions with dilations ``{d_i}`` (default {1, 3, 5}),
each followed by ReLU, and blends them back into its input:

    U_i = ReLU(BN(Conv_{d_i, g}(X)))          F_l = X + Σ_i α_i U_i

The branch weights ``α`` come from one of the six mechanisms compared in the paper's Table 6, chosen by the
``weighting`` option:

==================  ===============================================================================
``global_local``    (paper's choice) α = softmax(W2·ReLU(W1·[GAP(X) ‖ GAP(F_g)])), F_g = the GCT map of
                    the same stage; without a GCT partner it degrades to ``local_se``.
``uniform``         α_i = 1/N.
``local_se``        α = softmax(W2·ReLU(W1·GAP(X))) — squeeze-excitation on the local map only.
``static``          α = softmax(w) with a learned, input-independent w ∈ R^N.
``conv1x1``         no weights: F_mix = BN(Conv1×1([U_1 ‖ … ‖ U_N])).
``attention``       scaled dot-product attention: q = W_q·[GAP(X) ‖ GAP(F_g)], k_i = W_k·GAP(U_i),
                    α = softmax(q·k_i / √d).
==================  ===============================================================================

The BatchNorm inside each branch is our addition (Eq. 5 writes ``σ(C(X))``): without it the residual sum of
several un-normalised branches drifts in scale over stacked blocks.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import nn

from lungseg.models.blocks import conv_bn_relu

__all__ = ["MRGAM_WEIGHTINGS", "MRGAMBlock", "MRGAMStage", "build_branch_mixer"]

MRGAM_WEIGHTINGS: tuple[str, ...] = ("global_local", "uniform", "local_se", "static", "conv1x1", "attention")


def _gap(x: torch.Tensor) -> torch.Tensor:
    """Global average pooling ``B×C×H×W → B×C``."""
    return x.mean(dim=(2, 3))


class _AlphaMixer(nn.Module, ABC):
    """Base for mechanisms that produce explicit branch weights α (``B×N``, rows sum to 1)."""

    @abstractmethod
    def branch_weights(
        self, x: torch.Tensor, context: torch.Tensor | None, branches: list[torch.Tensor]
    ) -> torch.Tensor:
        """Return α for local map ``x``, GCT map ``context`` (or ``None``) and the branch responses."""

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None, branches: list[torch.Tensor]
    ) -> torch.Tensor:
        """Return ``Σ_i α_i U_i``."""
        alpha = self.branch_weights(x, context, branches)
        return sum(alpha[:, i, None, None, None] * u for i, u in enumerate(branches))


class UniformMixer(_AlphaMixer):
    """α_i = 1/N (Table 6, "Uniform")."""

    def __init__(self, num_branches: int) -> None:
        super().__init__()
        self.num_branches = num_branches

    def branch_weights(
        self, x: torch.Tensor, context: torch.Tensor | None, branches: list[torch.Tensor]
    ) -> torch.Tensor:
        return x.new_full((x.shape[0], self.num_branches), 1.0 / self.num_branches)


class StaticMixer(_AlphaMixer):
    """α = softmax(w), ``w`` learned and shared by all inputs (Table 6, "Static scalars")."""

    def __init__(self, num_branches: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_branches))

    def branch_weights(
        self, x: torch.Tensor, context: torch.Tensor | None, branches: list[torch.Tensor]
    ) -> torch.Tensor:
        return torch.softmax(self.logits, dim=0).expand(x.shape[0], -1)


class GatedMixer(_AlphaMixer):
    """Context gate α = softmax(MLP(GAP(X) [‖ GAP(F_g)])) (Eq. 6; "Local-SE only" without ``F_g``).

    Args:
        channels: Width of the local map.
        num_branches: ``N``.
        context_channels: Width of the global map, or ``None`` for the local-only gate.
        reduction: Bottleneck ratio of the MLP (``r = 16`` in the paper).
    """

    def __init__(
        self, channels: int, num_branches: int, context_channels: int | None, reduction: int = 16
    ) -> None:
        super().__init__()
        in_features = channels + (context_channels or 0)
        hidden = max(in_features // reduction, 8)
        self.uses_context = context_channels is not None
        self.mlp = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_branches)
        )

    def branch_weights(
        self, x: torch.Tensor, context: torch.Tensor | None, branches: list[torch.Tensor]
    ) -> torch.Tensor:
        squeezed = _gap(x)
        if self.uses_context:
            if context is None:
                raise ValueError("This MRGAM gate was built with a global context but received none.")
            squeezed = torch.cat([squeezed, _gap(context)], dim=1)
        return torch.softmax(self.mlp(squeezed), dim=1)


class AttentionMixer(_AlphaMixer):
    """Scaled dot-product attention over branch descriptors (Table 6, "Scaled dot-product attention").

    The query summarises the block input (and the GCT map when present); each branch contributes a key from
    its own pooled response, so the weights depend on what every receptive field actually found.
    """

    def __init__(
        self, channels: int, num_branches: int, context_channels: int | None, reduction: int = 16
    ) -> None:
        super().__init__()
        self.uses_context = context_channels is not None
        self.key_dim = max(channels // reduction, 8)
        self.query = nn.Linear(channels + (context_channels or 0), self.key_dim)
        self.key = nn.Linear(channels, self.key_dim)

    def branch_weights(
        self, x: torch.Tensor, context: torch.Tensor | None, branches: list[torch.Tensor]
    ) -> torch.Tensor:
        squeezed = _gap(x)
        if self.uses_context:
            if context is None:
                raise ValueError("This MRGAM attention mixer was built with a global context but got none.")
            squeezed = torch.cat([squeezed, _gap(context)], dim=1)
        q = self.query(squeezed)  # B×d
        k = self.key(torch.stack([_gap(u) for u in branches], dim=1))  # B×N×d
        scores = torch.einsum("bd,bnd->bn", q, k) / math.sqrt(self.key_dim)
        return torch.softmax(scores, dim=1)


class Conv1x1Mixer(nn.Module):
    """Learned 1×1 convolution over the concatenated branches, no gating (Table 6, "1×1-Conv mixing")."""

    def __init__(self, channels: int, num_branches: int) -> None:
        super().__init__()
        self.mix = conv_bn_relu(channels * num_branches, channels, kernel_size=1, apply_act=False)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None, branches: list[torch.Tensor]
    ) -> torch.Tensor:
        """Return the 1×1-conv mix of the concatenated branches (``x`` and ``context`` are unused)."""
        return self.mix(torch.cat(branches, dim=1))


def build_branch_mixer(
    weighting: str, channels: int, num_branches: int, context_channels: int | None, reduction: int = 16
) -> nn.Module:
    """Instantiate the branch-weighting mechanism named ``weighting`` (one of :data:`MRGAM_WEIGHTINGS`).

    ``global_local`` and ``attention`` use the GCT map when ``context_channels`` is given; with ``None`` the
    stream has no global partner and ``global_local`` is exactly ``local_se``.
    """
    if weighting == "global_local":
        return GatedMixer(channels, num_branches, context_channels, reduction)
    if weighting == "local_se":
        return GatedMixer(channels, num_branches, None, reduction)
    if weighting == "uniform":
        return UniformMixer(num_branches)
    if weighting == "static":
        return StaticMixer(num_branches)
    if weighting == "conv1x1":
        return Conv1x1Mixer(channels, num_branches)
    if weighting == "attention":
        return AttentionMixer(channels, num_branches, context_channels, reduction)
    raise ValueError(f"Unknown MRGAM weighting {weighting!r}; choose one of {', '.join(MRGAM_WEIGHTINGS)}.")


class MRGAMBlock(nn.Module):
    """One MRGAM mixer: parallel grouped atrous branches + branch weighting + residual blend.

    Args:
        channels: Width ``C`` (input = output).
        dilations: Dilation of each branch, ``{1, 3, 5}`` in the paper.
        groups: Number of convolution groups ``g``; ``channels`` must be divisible by it.
        weighting: Branch-weighting mechanism, see :data:`MRGAM_WEIGHTINGS`.
        context_channels: Width of the GCT map that conditions the gate, ``None`` without a GCT stream.
        reduction: Bottleneck ratio of the gate MLPs.
    """

    def __init__(
        self,
        channels: int,
        dilations: tuple[int, ...] = (1, 3, 5),
        groups: int = 4,
        weighting: str = "global_local",
        context_channels: int | None = None,
        reduction: int = 16,
    ) -> None:
        super().__init__()
        if channels % groups != 0:
            raise ValueError(f"MRGAM width {channels} is not divisible by groups={groups}.")
        if not dilations:
            raise ValueError("MRGAM needs at least one dilation rate.")
        self.branches = nn.ModuleList(
            conv_bn_relu(channels, channels, 3, dilation=d, groups=groups) for d in dilations
        )
        self.mixer = build_branch_mixer(weighting, channels, len(dilations), context_channels, reduction)

    def branch_weights(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor | None:
        """Return α (``B×N``) for inspection, or ``None`` for the weight-free 1×1-conv mixer."""
        if not isinstance(self.mixer, _AlphaMixer):
            return None
        return self.mixer.branch_weights(x, context, [branch(x) for branch in self.branches])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Return ``F_l = X + mix(U_1..U_N)`` for a local map ``x`` and optional GCT map ``context``."""
        branches = [branch(x) for branch in self.branches]
        return x + self.mixer(x, context, branches)


class MRGAMStage(nn.Module):
    """One stage of the local stream: strided 3×3 conv-BN-ReLU (down-sampling, width change) + MRGAM blocks.

    Args:
        in_channels: Width of the stage input (stem or previous consensus map).
        channels: Stage width ``C_k``.
        depth: Number of MRGAM blocks.
        stride: Down-sampling factor of the entry convolution (2 everywhere in GLANCE).
        dilations: Branch dilations.
        groups: Convolution groups inside the blocks.
        weighting: Branch-weighting mechanism.
        context_channels: GCT width at this stage, or ``None``.
        reduction: Gate bottleneck ratio.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        depth: int,
        stride: int = 2,
        dilations: tuple[int, ...] = (1, 3, 5),
        groups: int = 4,
        weighting: str = "global_local",
        context_channels: int | None = None,
        reduction: int = 16,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"An MRGAM stage needs depth >= 1, got {depth}.")
        self.down = conv_bn_relu(in_channels, channels, 3, stride=stride)
        self.blocks = nn.ModuleList(
            MRGAMBlock(channels, dilations, groups, weighting, context_channels, reduction)
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Map the stage input to ``F_l^(k)``; ``context`` is the same-stage GCT map (or ``None``)."""
        x = self.down(x)
        for block in self.blocks:
            x = block(x, context)
        return x
