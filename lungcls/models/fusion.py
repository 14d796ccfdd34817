"""Hierarchical cross-attention fusion of M³Net (paper §3.3, eqs. 11–18).

Blocks, in the order the paper introduces them:

- `MultiHeadAttention` — eqs. (11)–(13): learned Q/K/V projections, scaled dot-product attention per head,
  optionally a learnable per-head temperature τ_h. It returns its attention weights, because eq. (17)
  penalises them (`lungcls.losses.attention_l2_penalty`).
- `CrossAttention` — eqs. (14)/(15): queries from one token set, keys/values from another. Inputs are layer-
  normalised (the projections Z_s arrive at arbitrary scales) and, by default, the query tokens are added
  back (residual). The residual is our addition: without it a single key token (pooled/logits token modes,
  or a 1×1 last map) makes the softmax constant and the output would ignore the queries.
- `ParallelTransformerLayer` — eq. (16) as written, H = LN(T + MHA(T) + FFN(T)): attention and FFN read
  the same input and are summed (the reference code instead stacks two post-norm
  `nn.TransformerEncoderLayer`s; both have one attention and one FFN per layer).
- `HierarchicalFusion` — the three stages: T1 = CrossAttn(Q: Z32, K/V: Z64) (peripheral reasoning),
  T2 = CrossAttn(Q: Z96, K/V: T1) (context assimilation), transformer over [T1; T2].

Ablations (paper Table 4, Table 5) switch stages off. A stage that is off passes its inputs through:
no LSF → the token list keeps Z32 and Z64 (and T2 attends to both); no HSF → Z96 enters unchanged; no
transformer → [T1; T2] goes straight to pooling. With two scales only the first stage exists; with one
scale the tokens go straight to the transformer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["CrossAttention", "HierarchicalFusion", "MultiHeadAttention", "ParallelTransformerLayer"]


class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product attention that also returns its weights.

    Args:
        dim: model width D (query, key and value tokens all have D channels).
        num_heads: heads; `dim` must divide evenly.
        dropout: dropout on the attention weights used for the output (the returned weights are
            the un-dropped softmax, which the L2 penalty reads).
        learnable_temperature: add a learnable τ_h per head (eq. 13), initialised to 1.
    """

    def __init__(
        self, dim: int, num_heads: int, dropout: float = 0.0, learnable_temperature: bool = False
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.log_temperature = nn.Parameter(torch.zeros(num_heads)) if learnable_temperature else None

    def _split(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query: Tensor, key_value: Tensor) -> tuple[Tensor, Tensor]:
        """Attend from `query` `(B, Lq, D)` to `key_value` `(B, Lk, D)`.

        Returns:
            `(output (B, Lq, D), weights (B, heads, Lq, Lk))`.
        """
        q = self._split(self.q_proj(query))
        k = self._split(self.k_proj(key_value))
        v = self._split(self.v_proj(key_value))
        logits = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        if self.log_temperature is not None:
            logits = logits / self.log_temperature.exp().view(1, -1, 1, 1)
        weights = logits.softmax(dim=-1)
        out = self.dropout(weights) @ v
        out = out.transpose(1, 2).reshape(query.shape[0], query.shape[1], -1)
        return self.out_proj(out), weights


class CrossAttention(nn.Module):
    """Cross-attention from a query token set to a key/value token set (eqs. 14, 15).

    Args:
        dim: token width D.
        num_heads: attention heads.
        dropout: attention-weight dropout.
        residual: add the (un-normalised) query tokens to the attention output.
        learnable_temperature: per-head τ_h (eq. 13).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        dropout: float = 0.0,
        residual: bool = True,
        learnable_temperature: bool = False,
    ) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, num_heads, dropout, learnable_temperature)
        self.residual = residual

    def forward(self, query: Tensor, key_value: Tensor) -> tuple[Tensor, Tensor]:
        """Returns `(tokens (B, Lq, D), attention weights (B, heads, Lq, Lk))`."""
        out, weights = self.attn(self.norm_q(query), self.norm_kv(key_value))
        return (query + out if self.residual else out), weights


class ParallelTransformerLayer(nn.Module):
    """One encoder layer in the paper's form H = LN(T + MHA(T) + FFN(T)) (eq. 16).

    Args:
        dim: token width D.
        num_heads: attention heads.
        ffn_ratio: FFN hidden width as a multiple of D (the reference code uses 2).
        attn_dropout: attention-weight dropout.
        dropout: dropout on the attention and FFN branch outputs.
        learnable_temperature: per-head τ_h.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_ratio: float = 2.0,
        attn_dropout: float = 0.0,
        dropout: float = 0.0,
        learnable_temperature: bool = False,
    ) -> None:
        super().__init__()
        hidden = int(round(dim * ffn_ratio))
        self.attn = MultiHeadAttention(dim, num_heads, attn_dropout, learnable_temperature)
        self.ffn = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Returns `(tokens (B, L, D), self-attention weights (B, heads, L, L))`."""
        attended, weights = self.attn(tokens, tokens)
        return self.norm(tokens + self.dropout(attended) + self.dropout(self.ffn(tokens))), weights


class HierarchicalFusion(nn.Module):
    """Progressive micro → meso → macro fusion of projected scale tokens.

    Args:
        dim: shared latent width D.
        num_scales: 1, 2 or 3 token sets, given smallest scale first.
        num_heads: heads of every attention.
        num_layers: transformer layers of stage III.
        ffn_ratio: transformer FFN width multiple.
        attn_dropout: dropout on attention weights.
        dropout: dropout inside the transformer layers.
        use_lsf: stage I (low-scale features, T1); off → Z32 and Z64 pass through.
        use_hsf: stage II (high-scale features, T2); off → Z96 passes through.
        use_transformer: stage III; off → the stage I/II tokens go straight to pooling.
        first_stage: "cross" — T1 = CrossAttn(Q: Z32, K/V: Z64) (paper eq. 14); "joint" — T1 is self-
            attention over [Z32; Z64] (what the released reference code does with its logit tokens).
        cross_residual: residual connection in the cross-attention stages.
        learnable_temperature: per-head τ_h in every attention.
    """

    def __init__(
        self,
        dim: int,
        num_scales: int = 3,
        *,
        num_heads: int = 4,
        num_layers: int = 2,
        ffn_ratio: float = 2.0,
        attn_dropout: float = 0.1,
        dropout: float = 0.2,
        use_lsf: bool = True,
        use_hsf: bool = True,
        use_transformer: bool = True,
        first_stage: Literal["cross", "joint"] = "cross",
        cross_residual: bool = True,
        learnable_temperature: bool = False,
    ) -> None:
        super().__init__()
        if num_scales not in (1, 2, 3):
            raise ValueError(f"M³Net fuses 1 to 3 scales, got {num_scales}")
        if first_stage not in ("cross", "joint"):
            raise ValueError(f"first_stage must be 'cross' or 'joint', got {first_stage!r}")
        if use_transformer and num_layers < 1:
            raise ValueError("use_transformer=True needs num_layers >= 1")
        self.num_scales = num_scales
        self.first_stage = first_stage
        kw = {
            "dropout": attn_dropout,
            "residual": cross_residual,
            "learnable_temperature": learnable_temperature,
        }
        self.lsf = CrossAttention(dim, num_heads, **kw) if use_lsf and num_scales >= 2 else None
        self.hsf = CrossAttention(dim, num_heads, **kw) if use_hsf and num_scales == 3 else None
        self.layers = nn.ModuleList(
            [
                ParallelTransformerLayer(
                    dim, num_heads, ffn_ratio, attn_dropout, dropout, learnable_temperature
                )
                for _ in range(num_layers if use_transformer else 0)
            ]
        )

    def forward(self, tokens: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Fuse per-scale token sets `(B, L_s, D)`, smallest scale first.

        Returns:
            `(H (B, L, D), attention weights of every attention, in order)`.
        """
        if len(tokens) != self.num_scales:
            raise ValueError(f"fusion built for {self.num_scales} scales got {len(tokens)} token sets")
        attention: list[Tensor] = []
        if self.num_scales == 1:
            sequence = tokens[0]
        else:
            z_micro, z_meso = tokens[0], tokens[1]
            if self.lsf is None:
                t1 = torch.cat([z_micro, z_meso], dim=1)
            elif self.first_stage == "joint":
                joint = torch.cat([z_micro, z_meso], dim=1)
                t1, weights = self.lsf(joint, joint)
                attention.append(weights)
            else:
                t1, weights = self.lsf(z_micro, z_meso)
                attention.append(weights)
            if self.num_scales == 2:
                sequence = t1
            else:
                z_macro = tokens[2]
                if self.hsf is None:
                    t2 = z_macro
                else:
                    t2, weights = self.hsf(z_macro, t1)
                    attention.append(weights)
                sequence = torch.cat([t1, t2], dim=1)
        for layer in self.layers:
            sequence, weights = layer(sequence)
            attention.append(weights)
        return sequence, attention
