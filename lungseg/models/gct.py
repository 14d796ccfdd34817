"""Global Context Transformer (GCT) stream of GLANCE (paper Algorithm 1, Eqs. 3–4).

One GCT stage = convolutional patch embedding (k4 s4 from the image at stage 1, k3 s2 from the previous
consensus map afterwards) → learned positional embedding (stage 1 only) → ``depth`` pre-norm transformer
blocks (MHSA + two-layer GELU MLP, both residual) → LayerNorm → back to a ``B×C×h×w`` map.

Memory at 512×512: stage 1 has 16 384 tokens, so full attention there would need a 16 384² matrix per
head. The paper keeps full attention for mid/low resolutions and uses local windows or token
down-sampling early; we implement token down-sampling (spatial-reduction attention, as in PVT): keys and
values are computed from a ``sr×sr``-strided convolution of the tokens, so the attention matrix is
``n × n/sr²``. ``sr_ratio = 1`` is plain full attention. Attention itself runs through
``torch.nn.functional.scaled_dot_product_attention``, which picks a fused, memory-efficient kernel where one
exists.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import nn

__all__ = ["GCTBlock", "GCTStage", "PatchEmbed", "SpatialReductionAttention"]


class SpatialReductionAttention(nn.Module):
    """Multi-head self-attention whose keys/values may come from a spatially reduced token grid.

    Args:
        dim: Token width ``d``.
        num_heads: Attention heads; ``dim`` must be divisible by it.
        sr_ratio: Key/value reduction factor per axis; 1 means full global attention.
        qkv_bias: Whether the projections carry a bias.
        attn_drop: Dropout on the attention weights (training only).
        proj_drop: Dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        sr_ratio: int = 1,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"GCT width {dim} is not divisible by num_heads={num_heads}; pick a divisor.")
        if sr_ratio < 1:
            raise ValueError(f"sr_ratio must be >= 1, got {sr_ratio}.")
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.sr_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Attend over tokens ``x`` (``B×N×d``) laid out on an ``hw`` grid; returns ``B×N×d``."""
        b, n, c = x.shape
        head_dim = c // self.num_heads
        q = self.q(x).reshape(b, n, self.num_heads, head_dim).transpose(1, 2)
        if self.sr_ratio > 1:
            grid = x.transpose(1, 2).reshape(b, c, hw[0], hw[1])
            x = self.sr_norm(self.sr(grid).flatten(2).transpose(1, 2))
        kv = self.kv(x).reshape(b, -1, 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            q, kv[0], kv[1], dropout_p=self.attn_drop if self.training else 0.0
        )
        out = out.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out))


class GCTBlock(nn.Module):
    """Pre-norm transformer block: ``T += MHSA(LN(T)); T += MLP_GELU(LN(T))`` (Algorithm 1, lines 14–19).

    Args:
        dim: Token width.
        num_heads: Attention heads.
        sr_ratio: Spatial-reduction ratio of the attention (1 = full attention).
        mlp_ratio: Hidden width of the MLP relative to ``dim``.
        drop_path: Stochastic-depth probability of both residual branches.
    """

    def __init__(
        self, dim: int, num_heads: int, sr_ratio: int = 1, mlp_ratio: float = 4.0, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SpatialReductionAttention(dim, num_heads, sr_ratio=sr_ratio)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Apply the block to ``B×N×d`` tokens on an ``hw`` grid."""
        x = x + self.drop_path(self.attn(self.norm1(x), hw))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Convolutional patch embedding + LayerNorm: the tokenizer and the down-sampler of each GCT stage.

    Padding ``(kernel - stride + 1) // 2`` makes the output exactly ``input / stride`` for the kernels we
    use (k4 s4 at stage 1 as in the paper; k7 s4 gives PVT-style overlapping tokens; k3 s2 later).

    Args:
        in_channels: Channels of the incoming map.
        dim: Token width.
        kernel_size: Embedding kernel.
        stride: Embedding stride (the stage's down-sampling factor).
    """

    def __init__(self, in_channels: int, dim: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(
            in_channels, dim, kernel_size, stride=stride, padding=(kernel_size - stride + 1) // 2
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the embedded map ``B×d×h×w`` (normalised over channels)."""
        x = self.proj(x)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GCTStage(nn.Module):
    """One stage of the global stream: ``F_in → F_g^(k)`` (Algorithm 1).

    Args:
        in_channels: Channels of the stage input (image channels at stage 1, the previous consensus width
            afterwards).
        dim: Output width ``C_k`` (must equal the local stream's width at this stage for CSCF).
        depth: Number of transformer blocks.
        num_heads: Attention heads.
        sr_ratio: Key/value reduction; 1 = full attention (use at low resolution only).
        mlp_ratio: MLP expansion.
        patch_kernel: Patch-embedding kernel.
        patch_stride: Patch-embedding stride (4 at stage 1, 2 afterwards).
        pos_embed_size: Grid size ``(h, w)`` of a learned positional embedding added after the patch
            embedding (stage 1 only); it is bilinearly resized when the input grid differs, so any input
            size that is a multiple of 32 works. ``None`` disables it.
        drop_path: Per-block stochastic-depth probabilities (length ``depth``) or one value for all.
    """

    def __init__(
        self,
        in_channels: int,
        dim: int,
        depth: int,
        num_heads: int,
        sr_ratio: int = 1,
        mlp_ratio: float = 4.0,
        patch_kernel: int = 3,
        patch_stride: int = 2,
        pos_embed_size: tuple[int, int] | None = None,
        drop_path: float | list[float] = 0.0,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"A GCT stage needs depth >= 1, got {depth}.")
        rates = drop_path if isinstance(drop_path, list) else [drop_path] * depth
        self.embed = PatchEmbed(in_channels, dim, patch_kernel, patch_stride)
        self.pos_embed: nn.Parameter | None = None
        if pos_embed_size is not None:
            self.pos_embed = nn.Parameter(torch.zeros(1, dim, *pos_embed_size))
            trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(
            GCTBlock(dim, num_heads, sr_ratio=sr_ratio, mlp_ratio=mlp_ratio, drop_path=rates[i])
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.apply(_init_transformer_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map the stage input to the global feature map ``B×C_k×h×w``."""
        x = self.embed(x)
        if self.pos_embed is not None:
            pos = self.pos_embed
            if pos.shape[-2:] != x.shape[-2:]:
                pos = F.interpolate(pos, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = x + pos
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        for block in self.blocks:
            tokens = block(tokens, (h, w))
        return self.norm(tokens).transpose(1, 2).reshape(b, c, h, w)


def _init_transformer_weights(module: nn.Module) -> None:
    """ViT-style init: truncated-normal linear weights, zero biases, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
