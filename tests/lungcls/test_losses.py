"""M³Net loss terms against direct computations of the paper's formulas (eqs. 5–8, 10, 17)."""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lungcls.losses import (
    AlignmentLoss,
    M3NetLoss,
    attention_l2_penalty,
    covariance_alignment_loss,
    info_nce,
    nuclear_norm_loss,
    orthogonality_loss,
)
from lungcls.models import M3NetOutput


def _z(seed: int, batch: int = 5, dim: int = 3) -> torch.Tensor:
    return torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _info_nce_by_hand(zi: np.ndarray, zj: np.ndarray, tau: float) -> float:
    def cos(u, v):
        return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))

    total = 0.0
    for b in range(len(zi)):
        denominator = sum(math.exp(cos(zi[b], zj[k]) / tau) for k in range(len(zj)))
        total += -math.log(math.exp(cos(zi[b], zj[b]) / tau) / denominator)
    return total / len(zi)


@pytest.mark.parametrize("tau", [0.07, 0.5, 1.0])
def test_info_nce_matches_formula(tau):
    zi, zj = _z(0), _z(1)
    expected = _info_nce_by_hand(zi.numpy(), zj.numpy(), tau)
    assert info_nce(zi, zj, tau).item() == pytest.approx(expected, rel=1e-6)
    symmetric = 0.5 * (expected + _info_nce_by_hand(zj.numpy(), zi.numpy(), tau))
    assert info_nce(zi, zj, tau, symmetric=True).item() == pytest.approx(symmetric, rel=1e-6)


def test_info_nce_rewards_aligned_scales():
    z = _z(2, batch=8, dim=4)
    aligned = info_nce(z, 3.0 * z, 0.1)  # cosine ignores scale
    shuffled = info_nce(z, z[torch.randperm(8, generator=torch.Generator().manual_seed(0))], 0.1)
    assert aligned < shuffled
    with pytest.raises(ValueError, match="temperature"):
        info_nce(z, z, 0.0)
    with pytest.raises(ValueError, match="matching shapes"):
        info_nce(z, z[:4], 0.1)


def test_covariance_alignment_matches_hand_computation():
    zs = [_z(3), _z(4), _z(5)]
    covs = [np.cov(z.numpy(), rowvar=False) for z in zs]
    expected = sum(((a - b) ** 2).sum() for a, b in combinations(covs, 2))
    assert covariance_alignment_loss(zs).item() == pytest.approx(expected, rel=1e-6)
    # identical scales have nothing to align
    assert covariance_alignment_loss([zs[0], zs[0].clone()]).item() == pytest.approx(0.0, abs=1e-12)


def test_covariance_of_single_sample_batch_is_zero_and_differentiable():
    z = _z(6, batch=1).float().requires_grad_()
    loss = covariance_alignment_loss([z, z * 2])
    loss.backward()
    assert loss.item() == 0.0 and z.grad is not None


@pytest.mark.parametrize("normalize", [False, True])
def test_orthogonality_matches_hand_computation(normalize):
    zs = [_z(7, batch=6, dim=3), _z(8, batch=6, dim=3)]
    expected = 0.0
    for z in zs:
        gram = z.numpy().T @ z.numpy()
        if normalize:
            gram = gram / z.shape[0]
        expected += ((gram - np.eye(3)) ** 2).sum()
    assert orthogonality_loss(zs, normalize=normalize).item() == pytest.approx(expected, rel=1e-6)


def test_orthogonality_is_zero_for_orthonormal_columns():
    q, _ = torch.linalg.qr(_z(9, batch=6, dim=3))
    assert orthogonality_loss([q]).item() == pytest.approx(0.0, abs=1e-10)


def test_nuclear_norm_is_sum_of_singular_values_with_subgradient():
    zs = [_z(10, batch=5, dim=3), _z(11, batch=5, dim=3)]
    expected = sum(np.linalg.svd(z.numpy(), compute_uv=False).sum() for z in zs)
    assert nuclear_norm_loss(zs).item() == pytest.approx(expected, rel=1e-8)
    z = zs[0].clone().requires_grad_()
    nuclear_norm_loss([z]).backward()
    u, _, vh = np.linalg.svd(zs[0].numpy(), full_matrices=False)
    np.testing.assert_allclose(z.grad.numpy(), u @ vh, rtol=1e-6, atol=1e-8)


def test_nuclear_norm_backward_is_finite_for_rank_deficient_input():
    z = torch.ones(4, 3, requires_grad=True)  # rank 1, repeated zero singular values
    nuclear_norm_loss([z]).backward()
    assert torch.isfinite(z.grad).all()


def test_attention_penalty_by_hand():
    a = torch.softmax(_z(12, batch=2 * 3 * 4, dim=5).reshape(2, 3, 4, 5), dim=-1)
    b = torch.softmax(_z(13, batch=2 * 3 * 2, dim=2).reshape(2, 3, 2, 2), dim=-1)
    expected = sum((m.numpy() ** 2).sum() / (m.shape[0] * m.shape[1]) for m in (a, b))
    assert attention_l2_penalty([a, b]).item() == pytest.approx(expected, rel=1e-6)
    uniform = torch.full((1, 1, 4, 4), 0.25)
    assert attention_l2_penalty([uniform]).item() == pytest.approx(1.0)  # 4 rows × 4 × 0.25²
    with pytest.raises(ValueError, match="at least one"):
        attention_l2_penalty([])


def test_alignment_loss_weights_terms_as_eq8():
    emb = {32: _z(14, 6, 4), 64: _z(15, 6, 4), 96: _z(16, 6, 4)}
    loss = AlignmentLoss(
        temperature=0.2,
        lambda_nce={(64, 32): 2.0, (64, 96): 0.5},
        lambda_cov=0.3,
        lambda_orth=0.01,
        lambda_nuc=0.1,
        orth_normalize=False,
    )
    terms = loss(emb)
    zs = [emb[32], emb[64], emb[96]]
    expected = (
        2.0 * info_nce(emb[32], emb[64], 0.2)
        + 0.5 * info_nce(emb[64], emb[96], 0.2)
        + 0.3 * covariance_alignment_loss(zs)
        + 0.01 * orthogonality_loss(zs)
        + 0.1 * nuclear_norm_loss(zs)
    )
    assert terms["align"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert "nce_32_96" not in terms  # unweighted pair skipped


def test_zero_weights_switch_terms_off():
    emb = {32: _z(17, 4, 3), 64: _z(18, 4, 3)}
    terms = AlignmentLoss(lambda_cov=0.0, lambda_orth=0.0, lambda_nuc=0.0)(emb)
    assert set(terms) == {"nce_32_64", "align"}
    assert terms["align"].item() == pytest.approx(terms["nce_32_64"].item())


def test_alignment_runs_in_float32_under_autocast():
    emb = {32: _z(19, 8, 4).float(), 64: _z(20, 8, 4).float()}
    reference = AlignmentLoss()(emb)["align"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = AlignmentLoss()({k: v.bfloat16() for k, v in emb.items()})["align"]
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(reference.item(), rel=2e-2)


def _fake_output(batch: int = 6, dim: int = 4) -> M3NetOutput:
    gen = torch.Generator().manual_seed(21)
    emb = {s: torch.randn(batch, dim, generator=gen, requires_grad=True) for s in (32, 64, 96)}
    attn = [torch.softmax(torch.randn(batch, 2, 3, 3, generator=gen), -1).requires_grad_()]
    return M3NetOutput(
        logits=torch.randn(batch, 2, generator=gen, requires_grad=True),
        scale_logits={s: torch.randn(batch, 2, generator=gen, requires_grad=True) for s in (32, 64, 96)},
        embeddings=emb,
        tokens={s: e.unsqueeze(1) for s, e in emb.items()},
        attention=attn,
    )


def test_m3net_loss_is_summed_ce_plus_weighted_terms():
    out, target = _fake_output(), torch.tensor([0, 1, 1, 0, 1, 0])
    alignment = AlignmentLoss()
    parts = M3NetLoss(beta=0.5, lambda_attn=0.2, scale_weight=0.7, alignment=alignment)(out, target)
    ce_scales = sum(F.cross_entropy(out.scale_logits[s], target) for s in (32, 64, 96))
    expected = (
        F.cross_entropy(out.logits, target)
        + 0.7 * ce_scales
        + 0.5 * alignment(out.embeddings)["align"]
        + 0.2 * attention_l2_penalty(out.attention)
    )
    assert parts["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert {"ce_fused", "ce_32", "ce_64", "ce_96", "align", "attn"} <= set(parts)
    parts["loss"].backward()
    assert all(e.grad is not None for e in out.embeddings.values())
    assert out.attention[0].grad is not None


def test_m3net_loss_without_alignment_is_plain_cross_entropy():
    out, target = _fake_output(), torch.tensor([0, 1, 1, 0, 1, 0])
    parts = M3NetLoss(beta=0.0, lambda_attn=0.0, scale_weight=0.0)(out, target)
    assert set(parts) == {"ce_fused", "ce_32", "ce_64", "ce_96", "loss"}
    assert parts["loss"].item() == pytest.approx(F.cross_entropy(out.logits, target).item())
