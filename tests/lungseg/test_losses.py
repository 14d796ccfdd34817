"""GLANCE loss terms against hand computations (paper Eqs. 9–10, CenterNet focal)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lungseg.losses import GlanceLoss, center_focal_loss, dice_loss, gaussian_center_heatmap
from lungseg.models import get_variant

LOG_HALF = math.log(0.5)


def test_dice_matches_equation_10_by_hand() -> None:
    logits = torch.zeros(1, 1, 2, 2)  # p = 0.5 everywhere
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    # Σp·y = 1, Σp = 2, Σy = 2 → 1 − (2·1 + 1) / (2 + 2 + 1) = 0.4
    assert dice_loss(logits, target, smooth=1.0).item() == pytest.approx(0.4)
    # ε → 0: 1 − 2/4 = 0.5
    assert dice_loss(logits, target, smooth=1e-9).item() == pytest.approx(0.5)


def test_dice_batch_versus_per_slice() -> None:
    logits = torch.tensor([[[[10.0, -10.0]]], [[[-10.0, -10.0]]]])  # p ≈ [1, 0] and [0, 0]
    target = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 0.0]]]])
    p = torch.sigmoid(logits)
    tp, sp, st = (p * target).sum().item(), p.sum().item(), target.sum().item()
    assert dice_loss(logits, target, batch=True).item() == pytest.approx(
        1 - (2 * tp + 1) / (sp + st + 1), abs=1e-6
    )
    per_slice = []
    for b in range(2):
        tp_b, sp_b, st_b = (p[b] * target[b]).sum(), p[b].sum(), target[b].sum()
        per_slice.append(1 - (2 * tp_b + 1) / (sp_b + st_b + 1))
    assert dice_loss(logits, target, batch=False).item() == pytest.approx(float(sum(per_slice) / 2), abs=1e-6)


def test_focal_matches_hand_computation() -> None:
    logits = torch.zeros(1, 1, 1, 3)  # p = 0.5
    target = torch.tensor([[[[1.0, 0.5, 0.0]]]])
    pos = (0.5**2) * LOG_HALF  # (1−p)^α log p
    near = (0.5**4) * (0.5**2) * LOG_HALF  # (1−H)^β p^α log(1−p), H = 0.5
    far = 1.0 * (0.5**2) * LOG_HALF  # H = 0
    expected = -(pos + near + far) / 1
    assert center_focal_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_focal_normalises_by_centre_count_and_handles_empty_slices() -> None:
    logits = torch.tensor([[[[2.0, -1.0, 2.0, -3.0]]]])
    target = torch.tensor([[[[1.0, 0.0, 1.0, 0.0]]]])
    p = torch.sigmoid(logits)[0, 0, 0]
    pos = sum((1 - p[i]) ** 2 * torch.log(p[i]) for i in (0, 2))
    neg = sum(p[i] ** 2 * torch.log(1 - p[i]) for i in (1, 3))
    assert center_focal_loss(logits, target).item() == pytest.approx(float(-(pos + neg) / 2), rel=1e-5)
    empty = torch.zeros_like(target)
    neg_all = sum(p[i] ** 2 * torch.log(1 - p[i]) for i in range(4))
    assert center_focal_loss(logits, empty).item() == pytest.approx(float(-neg_all), rel=1e-5)


def test_focal_is_stable_for_extreme_logits() -> None:
    logits = torch.tensor([[[[80.0, -80.0]]]], requires_grad=True)
    loss = center_focal_loss(logits, torch.tensor([[[[0.0, 1.0]]]]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_gaussian_heatmap_peaks_and_radius() -> None:
    heat = gaussian_center_heatmap((32, 32), [(10.4, 20.6)], [12.0])
    assert heat.dtype == np.float32 and heat.shape == (32, 32)
    assert heat[10, 21] == 1.0 and (heat == 1.0).sum() == 1  # snapped to the nearest pixel
    sigma = 12.0 / 6
    assert heat[10, 21 + 2] == pytest.approx(math.exp(-(2**2) / (2 * sigma**2)), rel=1e-6)
    assert heat[10, 21 + 7] == 0.0  # beyond 3σ
    big = gaussian_center_heatmap((32, 32), [(16, 16)], [24.0])
    small = gaussian_center_heatmap((32, 32), [(16, 16)], [6.0])
    assert big[16, 20] > small[16, 20], "radius grows with the diameter"


def test_gaussian_heatmap_overlap_edges_and_errors() -> None:
    heat = gaussian_center_heatmap((16, 16), [(4, 4), (4, 7)], [6.0, 6.0])
    single = gaussian_center_heatmap((16, 16), [(4, 4)], [6.0])
    assert heat[4, 4] == 1.0 and heat[4, 7] == 1.0
    assert np.all(heat >= single) and heat.max() == 1.0  # element-wise max, never above 1
    outside = gaussian_center_heatmap((16, 16), [(-2, 8)], [12.0])
    assert 0 < outside.max() < 1.0, "a cropped-away centre leaves its tail but no positive pixel"
    assert gaussian_center_heatmap((8, 8), [], []).sum() == 0
    with pytest.raises(ValueError, match="one per nodule"):
        gaussian_center_heatmap((8, 8), [(1, 1)], [])
    with pytest.raises(ValueError, match="Invalid nodule"):
        gaussian_center_heatmap((8, 8), [(float("nan"), 1)], [3.0])


def _outputs_and_targets():
    gen = torch.Generator().manual_seed(0)
    outputs = {
        "seg": torch.randn(2, 1, 16, 16, generator=gen),
        "heatmap": torch.randn(2, 1, 16, 16, generator=gen),
        "aux": [torch.randn(2, 1, 8, 8, generator=gen), torch.randn(2, 1, 4, 4, generator=gen)],
    }
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, 5:9, 6:10] = 1
    heat = torch.from_numpy(gaussian_center_heatmap((16, 16), [(7, 8)], [4.0]))[None, None].repeat(2, 1, 1, 1)
    return outputs, {"mask": mask, "heatmap": heat}


def test_compound_loss_equals_equation_9_with_deep_supervision() -> None:
    outputs, targets = _outputs_and_targets()
    terms = GlanceLoss(lambda_seg=1.0, lambda_det=0.3, aux_weight=0.3)(outputs, targets)
    seg = dice_loss(outputs["seg"], targets["mask"]) + F.binary_cross_entropy_with_logits(
        outputs["seg"], targets["mask"]
    )
    aux = 0.0
    for logits in outputs["aux"]:
        small = F.avg_pool2d(targets["mask"], 16 // logits.shape[-1])  # area down-sampling
        aux = aux + dice_loss(logits, small) + F.binary_cross_entropy_with_logits(logits, small)
    focal = center_focal_loss(outputs["heatmap"], targets["heatmap"])
    assert terms["aux"].item() == pytest.approx(float(aux), rel=1e-6)
    assert terms["focal"].item() == pytest.approx(float(focal), rel=1e-6)
    assert terms["loss"].item() == pytest.approx(float(seg + 0.3 * aux + 0.3 * focal), rel=1e-6)
    # BCE by hand on one pixel family: logits 0 → log 2.
    zero = GlanceLoss()({"seg": torch.zeros(1, 1, 4, 4)}, {"mask": torch.zeros(1, 1, 4, 4)})
    assert zero["bce"].item() == pytest.approx(math.log(2))


def test_lambda_det_rows_change_only_the_detection_weight() -> None:
    outputs, targets = _outputs_and_targets()
    base = GlanceLoss(**get_variant("lambda_det_0.3").loss)(outputs, targets)
    other = GlanceLoss(**get_variant("lambda_det_0.5").loss)(outputs, targets)
    assert (other["loss"] - base["loss"]).item() == pytest.approx(0.2 * base["focal"].item(), rel=1e-5)


def test_missing_heads_and_bad_targets() -> None:
    outputs, targets = _outputs_and_targets()
    det_only = GlanceLoss()({"heatmap": outputs["heatmap"]}, {"heatmap": targets["heatmap"]})
    assert set(det_only) == {"focal", "loss"}
    seg_only = GlanceLoss()({"seg": outputs["seg"]}, {"mask": targets["mask"][:, 0]})  # B×H×W accepted
    assert set(seg_only) == {"dice", "bce", "loss"}
    with pytest.raises(KeyError, match="mask"):
        GlanceLoss()({"seg": outputs["seg"]}, {"heatmap": targets["heatmap"]})
    with pytest.raises(KeyError, match="heatmap"):
        GlanceLoss()({"heatmap": outputs["heatmap"]}, {"mask": targets["mask"]})
    with pytest.raises(ValueError, match="shape"):
        GlanceLoss()({"seg": outputs["seg"]}, {"mask": torch.zeros(2, 1, 8, 8)})
    with pytest.raises(ValueError, match="neither"):
        GlanceLoss()({}, targets)
    with pytest.raises(ValueError, match="lambda_det"):
        GlanceLoss(lambda_det=-1)
