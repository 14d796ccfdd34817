"""M³Net objectives (Li et al., preprint 2025 §3.2–3.3): cross-scale alignment, attention penalty, stage-2 total.

The terms, exactly as the paper writes them (Z_s ∈ R^{B×D} is the pooled latent of scale s):

- InfoNCE (eq. 5), for a pair of scales (i, j): the positive for sample b at scale i is the same sample at
  scale j; the other samples of the batch at scale j are the negatives; similarity is cosine, divided by a
  temperature τ; the loss is the batch mean of −log softmax at the positive. `symmetric=True` averages
  the i→j and j→i directions (a common variant, not the paper's).
- covariance alignment (eq. 6): Σ_{i<j} ‖Σ_i − Σ_j‖²_F with Σ_s the unbiased (B − 1) covariance of Z_s.
- orthogonality (eq. 7): Σ_s ‖Z_sᵀ Z_s − I_D‖²_F. `normalize=True` uses Z_sᵀ Z_s / B (the second-moment
  matrix), which keeps the term's size independent of the batch size; the paper's form is the default.
- nuclear norm (eq. 7): Σ_s ‖Z_s‖_* = Σ_s Σ_k σ_k(Z_s), through `torch.linalg.svdvals` (whose backward is
  stable even for repeated singular values).
- attention penalty (eq. 17): Σ_ℓ ‖Attn^(ℓ)‖²₂ over the fusion's attention maps; each map's squared entries
  are summed over queries and keys and averaged over batch and heads (so the value does not grow with the
  batch size).

`AlignmentLoss` weights them (eq. 8): L_align = Σ_{i<j} λ_NCE^(i,j) L_NCE^(i,j) + λ_cov L_cov
+ λ_orth L_orth + λ_nuc L_nuc. `M3NetLoss` is the stage-2 objective (eq. 10) on an `M3NetOutput`:
CE(fused) + Σ_s CE^(s) + β L_align + λ_attn L_attn-reg.

The paper gives no numeric values for τ, β or the λ's (and the released code has no alignment losses), so
the defaults here are ours: τ = 0.1, β = 0.1, λ_NCE = 1 per pair, λ_cov = 1, λ_orth = 1e-4, λ_nuc = 1e-2,
λ_attn = 1e-3. They were set from the terms' sizes on an untrained paper-configuration model (pooled Z_s
with D = 128): InfoNCE ≈ log B, covariance ≈ 0.01, nuclear norm ≈ 100, attention penalty ≈ 6–11, and the
orthogonality term in the paper's literal form ≈ 10⁷ at B = 8, growing with B² because Z_s is not centred.
`AlignmentLoss` therefore uses the batch-normalised orthogonality term (Z_sᵀ Z_s / B) by default
(`orth_normalize=False` restores eq. 7 literally). Terms with weight 0 are not computed, which is how the
Table 8 loss ablations switch them off. Alignment terms are computed in float32 with autocast off (SVD and
covariances are not reliable in half precision).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lungcls.models.m3net import M3NetOutput

__all__ = [
    "AlignmentLoss",
    "M3NetLoss",
    "attention_l2_penalty",
    "covariance_alignment_loss",
    "info_nce",
    "nuclear_norm_loss",
    "orthogonality_loss",
]


def _check_embedding(z: Tensor, name: str = "embedding") -> Tensor:
    if z.ndim != 2:
        raise ValueError(f"{name} must be a (batch, dim) matrix, got shape {tuple(z.shape)}")
    return z if z.dtype in (torch.float32, torch.float64) else z.float()


def _full_precision(reference: Tensor) -> torch.autocast:
    """A context that switches autocast off on the tensor's device, so the terms run in float32."""
    return torch.autocast(device_type=reference.device.type, enabled=False)


def info_nce(z_i: Tensor, z_j: Tensor, temperature: float = 0.1, symmetric: bool = False) -> Tensor:
    """InfoNCE between two scales' embeddings of the same batch (eq. 5).

    Args:
        z_i: `(B, D)` anchors.
        z_j: `(B, D)` candidates; row b is the positive of anchor b.
        temperature: τ.
        symmetric: also use z_j as anchors and average the two directions.

    Returns:
        Scalar loss.
    """
    if temperature <= 0:
        raise ValueError(f"InfoNCE temperature must be > 0, got {temperature}")
    if z_i.shape != z_j.shape:
        raise ValueError(f"InfoNCE needs matching shapes, got {tuple(z_i.shape)} and {tuple(z_j.shape)}")
    with _full_precision(z_i):
        z_i, z_j = _check_embedding(z_i, "z_i"), _check_embedding(z_j, "z_j")
        logits = F.normalize(z_i, dim=1) @ F.normalize(z_j, dim=1).T / temperature
        target = torch.arange(z_i.shape[0], device=z_i.device)
        loss = F.cross_entropy(logits, target)
        if symmetric:
            loss = 0.5 * (loss + F.cross_entropy(logits.T, target))
    return loss


def _covariance(z: Tensor) -> Tensor:
    centred = z - z.mean(dim=0, keepdim=True)
    return centred.T @ centred / (z.shape[0] - 1)


def covariance_alignment_loss(embeddings: Sequence[Tensor]) -> Tensor:
    """Σ_{i<j} ‖Cov(Z_i) − Cov(Z_j)‖²_F (eq. 6).

    A batch of one sample has no covariance; the term is then 0 (with a graph, so backward still works).
    """
    zs = [_check_embedding(z) for z in embeddings]
    if not zs:
        raise ValueError("covariance_alignment_loss needs at least one embedding")
    total = torch.stack([z.sum() for z in zs]).sum() * 0.0
    if zs[0].shape[0] < 2:
        return total
    with _full_precision(zs[0]):
        covs = [_covariance(z) for z in zs]
        for a, b in combinations(covs, 2):
            total = total + ((a - b) ** 2).sum()
    return total


def orthogonality_loss(embeddings: Sequence[Tensor], normalize: bool = False) -> Tensor:
    """Σ_s ‖Z_sᵀ Z_s − I‖²_F (eq. 7); `normalize` divides Z_sᵀ Z_s by the batch size first."""
    zs = [_check_embedding(z) for z in embeddings]
    if not zs:
        raise ValueError("orthogonality_loss needs at least one embedding")
    terms = []
    with _full_precision(zs[0]):
        for z in zs:
            gram = z.T @ z
            if normalize:
                gram = gram / z.shape[0]
            terms.append(((gram - torch.eye(z.shape[1], device=z.device, dtype=z.dtype)) ** 2).sum())
    return torch.stack(terms).sum()


def nuclear_norm_loss(embeddings: Sequence[Tensor]) -> Tensor:
    """Σ_s ‖Z_s‖_* — the sum of singular values of every scale's embedding matrix (eq. 7)."""
    zs = [_check_embedding(z) for z in embeddings]
    if not zs:
        raise ValueError("nuclear_norm_loss needs at least one embedding")
    with _full_precision(zs[0]):
        return torch.stack([torch.linalg.svdvals(z).sum() for z in zs]).sum()


def attention_l2_penalty(attention: Sequence[Tensor]) -> Tensor:
    """Σ_ℓ ‖Attn^(ℓ)‖²₂ (eq. 17): per map, squared weights summed over (query, key), mean over batch/heads.

    Args:
        attention: maps of shape `(B, heads, Lq, Lk)`.
    """
    if not attention:
        raise ValueError("attention_l2_penalty needs at least one attention map (is the fusion empty?)")
    terms = []
    for weights in attention:
        if weights.ndim != 4:
            raise ValueError(f"attention maps must be (B, heads, Lq, Lk), got {tuple(weights.shape)}")
        weights = weights if weights.dtype in (torch.float32, torch.float64) else weights.float()
        terms.append(weights.pow(2).sum(dim=(-2, -1)).mean())
    return torch.stack(terms).sum()


class AlignmentLoss(nn.Module):
    """Cross-scale alignment objective L_align (eq. 8).

    Args:
        temperature: InfoNCE τ.
        lambda_nce: weight of every InfoNCE pair, or a mapping (i, j) → weight for pairs of scales
            (missing pairs get 0; keys are ordered small scale first).
        lambda_cov: covariance alignment weight.
        lambda_orth: orthogonality weight.
        lambda_nuc: nuclear-norm weight.
        symmetric_nce: average both InfoNCE directions.
        orth_normalize: use Z_sᵀ Z_s / B in the orthogonality term (False: eq. 7 literally).
    """

    def __init__(
        self,
        temperature: float = 0.1,
        lambda_nce: float | Mapping[tuple[int, int], float] = 1.0,
        lambda_cov: float = 1.0,
        lambda_orth: float = 1e-4,
        lambda_nuc: float = 1e-2,
        symmetric_nce: bool = False,
        orth_normalize: bool = True,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.lambda_nce = (
            {tuple(sorted(map(int, k))): float(v) for k, v in lambda_nce.items()}
            if isinstance(lambda_nce, Mapping)
            else float(lambda_nce)
        )
        self.lambda_cov = lambda_cov
        self.lambda_orth = lambda_orth
        self.lambda_nuc = lambda_nuc
        self.symmetric_nce = symmetric_nce
        self.orth_normalize = orth_normalize

    def _pair_weight(self, i: int, j: int) -> float:
        if isinstance(self.lambda_nce, dict):
            return self.lambda_nce.get((i, j), 0.0)
        return self.lambda_nce

    def forward(self, embeddings: Mapping[int, Tensor]) -> dict[str, Tensor]:
        """Compute the weighted alignment terms.

        Args:
            embeddings: scale → `(B, D)` pooled latent Z_s.

        Returns:
            "align" (the weighted sum) and the unweighted terms that were computed: "nce_<i>_<j>" per pair,
            "cov", "orth", "nuc".
        """
        scales = sorted(embeddings)
        zs = [embeddings[s] for s in scales]
        anchor = zs[0]
        terms: dict[str, Tensor] = {}
        total = anchor.float().sum() * 0.0
        for i, j in combinations(scales, 2):
            weight = self._pair_weight(i, j)
            if weight:
                term = info_nce(embeddings[i], embeddings[j], self.temperature, self.symmetric_nce)
                terms[f"nce_{i}_{j}"] = term
                total = total + weight * term
        if self.lambda_cov and len(zs) > 1:
            terms["cov"] = covariance_alignment_loss(zs)
            total = total + self.lambda_cov * terms["cov"]
        if self.lambda_orth:
            terms["orth"] = orthogonality_loss(zs, normalize=self.orth_normalize)
            total = total + self.lambda_orth * terms["orth"]
        if self.lambda_nuc:
            terms["nuc"] = nuclear_norm_loss(zs)
            total = total + self.lambda_nuc * terms["nuc"]
        terms["align"] = total
        return terms


class M3NetLoss(nn.Module):
    """Stage-2 objective (eq. 10 plus the fused head and eq. 17) on an `M3NetOutput`.

    loss = w_fused·CE(fused logits) + w_scale·Σ_s CE(scale logits) + β·L_align + λ_attn·L_attn-reg.

    Args:
        beta: β, weight of the alignment objective (0 switches alignment off).
        lambda_attn: weight of the attention L2 penalty (0 switches it off).
        fused_weight: weight of the fused head's cross-entropy.
        scale_weight: weight of the summed per-scale cross-entropies.
        alignment: the `AlignmentLoss` (default: `AlignmentLoss()` with the defaults above).
        class_weights: optional per-class CE weights.
        label_smoothing: CE label smoothing.
    """

    def __init__(
        self,
        beta: float = 0.1,
        lambda_attn: float = 1e-3,
        fused_weight: float = 1.0,
        scale_weight: float = 1.0,
        alignment: AlignmentLoss | None = None,
        class_weights: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.beta = beta
        self.lambda_attn = lambda_attn
        self.fused_weight = fused_weight
        self.scale_weight = scale_weight
        self.alignment = alignment if alignment is not None else AlignmentLoss()
        self.label_smoothing = label_smoothing
        weight = torch.as_tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.register_buffer("class_weights", weight, persistent=False)

    def _ce(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(
            logits.float(), target, weight=self.class_weights, label_smoothing=self.label_smoothing
        )

    def forward(self, output: M3NetOutput, target: Tensor) -> dict[str, Tensor]:
        """Compute the total loss and its parts.

        Args:
            output: the model's output.
            target: `(B,)` integer class labels.

        Returns:
            "loss" (to backpropagate), "ce_fused", "ce_<scale>" per scale, and, when switched on, "align"
            with its terms and "attn".
        """
        parts: dict[str, Tensor] = {"ce_fused": self._ce(output.logits, target)}
        loss = self.fused_weight * parts["ce_fused"]
        for scale, logits in output.scale_logits.items():
            parts[f"ce_{scale}"] = self._ce(logits, target)
            loss = loss + self.scale_weight * parts[f"ce_{scale}"]
        if self.beta:
            align = self.alignment(output.embeddings)
            parts.update(align)
            loss = loss + self.beta * align["align"]
        if self.lambda_attn and output.attention:
            parts["attn"] = attention_l2_penalty(output.attention)
            loss = loss + self.lambda_attn * parts["attn"]
        parts["loss"] = loss
        return parts
