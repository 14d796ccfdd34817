"""Segmentation metrics against SimpleITK / MONAI / an independent scipy HD95, anisotropic spacing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage
from sklearn.metrics import precision_score, recall_score

from common.metrics.segmentation import (
    SEGMENTATION_KEYS,
    SegmentationScores,
    aggregate_segmentation_scores,
    hd95,
    segmentation_scores,
)


def _blobs(shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two overlapping smooth random masks (like a prediction and its reference)."""
    rng = np.random.default_rng(seed)
    base = ndimage.gaussian_filter(rng.normal(size=shape), 2.0)
    noise = ndimage.gaussian_filter(rng.normal(size=shape), 2.0)
    return base > 0.05, (base + 0.5 * noise) > 0.05


def _scipy_hd(p: np.ndarray, t: np.ndarray, spacing_array_order: tuple[float, ...], q: float) -> float:
    """Surface-to-surface percentile Hausdorff distance written with scipy only."""

    def edges(m: np.ndarray) -> np.ndarray:
        return m & ~ndimage.binary_erosion(m)

    ep, et = edges(p), edges(t)
    d_to_t = ndimage.distance_transform_edt(~et, sampling=spacing_array_order)[ep]
    d_to_p = ndimage.distance_transform_edt(~ep, sampling=spacing_array_order)[et]
    return max(np.percentile(d_to_t, q), np.percentile(d_to_p, q))


@pytest.mark.parametrize(
    ("shape", "spacing_xyz", "seed"),
    [((48, 40), (0.7, 1.3), 0), ((12, 32, 28), (0.6, 0.8, 2.5), 1), ((10, 24, 30), (1.0, 0.5, 1.25), 2)],
)
def test_overlap_metrics_equal_simpleitk_and_monai(shape, spacing_xyz, seed) -> None:
    from monai.metrics import compute_dice, compute_iou

    p, t = _blobs(shape, seed)
    s = segmentation_scores(p, t, spacing_xyz)
    f = sitk.LabelOverlapMeasuresImageFilter()
    img_p, img_t = sitk.GetImageFromArray(p.astype(np.uint8)), sitk.GetImageFromArray(t.astype(np.uint8))
    img_p.SetSpacing(spacing_xyz)
    img_t.SetSpacing(spacing_xyz)
    f.Execute(img_p, img_t)  # source = prediction, target = reference
    assert s["dice"] == pytest.approx(f.GetDiceCoefficient(), abs=1e-12)
    assert s["iou"] == pytest.approx(f.GetJaccardCoefficient(), abs=1e-12)
    assert s["sensitivity"] == pytest.approx(1.0 - f.GetFalseNegativeError(), abs=1e-12)
    # (ITK's false positive error is FP / background, not 1 - precision; check against scikit-learn.)
    assert s["precision"] == pytest.approx(precision_score(t.ravel(), p.ravel()), abs=1e-12)
    assert s["sensitivity"] == pytest.approx(recall_score(t.ravel(), p.ravel()), abs=1e-12)
    tp = torch.from_numpy(p[None, None].astype(np.float32))
    tt = torch.from_numpy(t[None, None].astype(np.float32))
    assert s["dice"] == pytest.approx(float(compute_dice(tp, tt, include_background=True)), abs=1e-6)
    assert s["iou"] == pytest.approx(float(compute_iou(tp, tt, include_background=True)), abs=1e-6)


@pytest.mark.parametrize(
    ("shape", "spacing_xyz", "seed"),
    [((48, 40), (0.7, 1.3), 3), ((12, 32, 28), (0.6, 0.8, 2.5), 4)],
)
@pytest.mark.parametrize("q", [95.0, 100.0])
def test_hd_in_mm_equals_independent_scipy_computation(shape, spacing_xyz, seed, q) -> None:
    p, t = _blobs(shape, seed)
    ours = hd95(p, t, spacing_xyz, percentile=q)
    ref = _scipy_hd(p, t, tuple(spacing_xyz[::-1]), q)
    assert ours == pytest.approx(ref, rel=1e-5)
    if q == 100.0:
        # SimpleITK's Hausdorff uses every voxel, not only the surface; it is a lower bound of the surface one.
        f = sitk.HausdorffDistanceImageFilter()
        img_p, img_t = sitk.GetImageFromArray(p.astype(np.uint8)), sitk.GetImageFromArray(t.astype(np.uint8))
        img_p.SetSpacing(spacing_xyz)
        img_t.SetSpacing(spacing_xyz)
        f.Execute(img_t, img_p)
        assert f.GetHausdorffDistance() <= ours + 1e-6


def test_spacing_is_taken_in_xyz_order() -> None:
    """A square shifted 2 voxels along x: HD = 2 · x-spacing, whatever the y/z spacing."""
    t = np.zeros((30, 30), bool)
    t[10:20, 10:20] = True
    p = np.roll(t, 2, axis=1)  # axis 1 of (y, x) is x
    assert hd95(p, t, (0.5, 3.0), percentile=100) == pytest.approx(1.0)
    vol_t = np.zeros((8, 30, 30), bool)
    vol_t[2:6, 10:20, 10:20] = True
    vol_p = np.roll(vol_t, 1, axis=0)  # axis 0 of (z, y, x) is z
    assert hd95(vol_p, vol_t, (0.7, 0.7, 2.5), percentile=100) == pytest.approx(2.5)


def test_empty_mask_conventions() -> None:
    empty = np.zeros((10, 10), bool)
    full = np.zeros((10, 10), bool)
    full[3:6, 3:6] = True
    both = segmentation_scores(empty, empty, (1.0, 1.0))
    assert (both["dice"], both["iou"], both["hd95"]) == (1.0, 1.0, 0.0)
    assert math.isnan(both["sensitivity"]) and math.isnan(both["precision"])
    missed = segmentation_scores(empty, full)
    assert (missed["dice"], missed["iou"], missed["sensitivity"]) == (0.0, 0.0, 0.0)
    assert math.isnan(missed["precision"]) and math.isnan(missed["hd95"])
    spurious = segmentation_scores(full, empty)
    assert (spurious["dice"], spurious["iou"], spurious["precision"]) == (0.0, 0.0, 0.0)
    assert math.isnan(spurious["sensitivity"]) and math.isnan(spurious["hd95"])


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        segmentation_scores(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match=r"give \(x, y\) for 2D"):
        segmentation_scores(np.zeros((4, 4)), np.zeros((4, 4)), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        segmentation_scores(np.zeros((4, 4)), np.zeros((4, 4)), (1.0, 0.0))
    with pytest.raises(ValueError, match="2D"):
        segmentation_scores(np.zeros(4), np.zeros(4))


def test_aggregate_and_torchmetrics_form() -> None:
    cases = [_blobs((20, 24, 24), s) for s in range(3)]
    cases.append((np.zeros((20, 24, 24), bool), cases[0][1]))  # a missed nodule: HD95 undefined
    spacing = (0.8, 0.8, 1.5)
    rows = [segmentation_scores(p, t, spacing) for p, t in cases]
    agg = aggregate_segmentation_scores(rows)
    assert agg["cases"] == 4 and agg["hd95_undefined"] == 1 and agg["dice_undefined"] == 0
    assert agg["dice"] == pytest.approx(np.mean([r["dice"] for r in rows]))
    assert agg["hd95"] == pytest.approx(np.mean([r["hd95"] for r in rows[:3]]))
    metric = SegmentationScores()
    metric.update(
        torch.stack([torch.from_numpy(p.astype(np.float32)) for p, _ in cases[:2]]),
        torch.stack([torch.from_numpy(t) for _, t in cases[:2]]),
        [spacing, spacing],
    )
    metric.update([cases[2][0], cases[3][0]], [cases[2][1], cases[3][1]], [spacing, spacing])
    out = metric.compute()
    for key in ("dice", "iou", "sensitivity", "hd95"):
        assert float(out[key]) == pytest.approx(agg[key], rel=1e-6), key


def test_scores_keyed_cases_count_once_and_compute_reads_gathered_tensor_states() -> None:
    cases = [_blobs((12, 16, 16), s) for s in range(3)]
    spacing = (0.8, 0.8, 1.5)
    agg = aggregate_segmentation_scores(segmentation_scores(p, t, spacing) for p, t in cases)
    metric = SegmentationScores()
    for group in ([0, 1], [2, 0]):  # case 0 again, as DistributedSampler padding delivers it
        metric.update([cases[i][0] for i in group], [cases[i][1] for i in group], [spacing] * 2, keys=group)
    out = metric.compute()
    assert metric.n_cases == 3
    for key in SEGMENTATION_KEYS:
        assert float(out[key]) == pytest.approx(agg[key], rel=1e-6), key
    # After a DDP sync torchmetrics leaves each "cat" list state as one tensor; compute must read that.
    for name in ("sample_key", "sample_token", "sample_rows"):
        setattr(metric, name, torch.cat(getattr(metric, name)))
    metric._computed = None
    assert float(metric.compute()["dice"]) == pytest.approx(agg["dice"], rel=1e-6)
    with pytest.raises(ValueError, match="per case"):
        metric.update([cases[0][0]], [], [spacing])
