"""Detection at an operating point, FROC read-offs, GLANCE Table 3 identities, COCO AP/AR."""

from __future__ import annotations

import numpy as np
import pytest

from common.metrics.detection import (
    coco_detection_metrics,
    fp_rate_at_sensitivity,
    operating_point,
    operating_point_at_fp_rate,
    sensitivity_at_fp_rate,
)
from common.metrics.froc import FROCCurve, FROCEntries, froc_curve, match_candidates


def _entries():
    """2 scans; nodule A hit by 0.9 (+0.2 extra), nodule B hit by 0.4, nodule C missed; FPs 0.8, 0.3, 0.1."""
    cands = np.array(
        [
            (0, 0.0, 0.0, 0.0, 0.9),
            (0, 1.0, 0.0, 0.0, 0.2),
            (0, 50.0, 0.0, 0.0, 0.8),
            (1, 0.0, 0.0, 0.0, 0.4),
            (1, 80.0, 0.0, 0.0, 0.3),
            (1, 90.0, 0.0, 0.0, 0.1),
        ]
    )
    nods = np.array([(0, 0.0, 0.0, 0.0, 6.0), (1, 0.0, 0.0, 0.0, 6.0), (1, -60.0, 0.0, 0.0, 6.0)])
    entries, _ = match_candidates(
        cands[:, 0].astype(int), cands[:, 1:4], cands[:, 4], nods[:, 0].astype(int), nods[:, 1:4], nods[:, 4],
        np.ones(3, bool), 2,
    )  # fmt: skip
    return entries


def test_operating_point_counts_and_rates() -> None:
    op = operating_point(_entries(), 0.35)
    assert (op.true_positives, op.false_positives, op.false_negatives) == (2, 1, 1)
    assert op.precision == pytest.approx(2 / 3) and op.recall == pytest.approx(2 / 3)
    assert op.f1 == pytest.approx(2 / 3)
    assert op.fp_column == pytest.approx(100 / 3)
    assert op.fps_per_scan == pytest.approx(0.5)
    nothing = operating_point(_entries(), 0.95)
    assert (nothing.precision, nothing.recall, nothing.fp_column) == (0.0, 0.0, 100.0)


def test_operating_point_at_fp_rate_picks_lowest_allowed_threshold() -> None:
    op = operating_point_at_fp_rate(_entries(), 0.5)  # at most 1 FP over 2 scans
    assert op.threshold == pytest.approx(0.4) and op.false_positives == 1 and op.true_positives == 2
    op = operating_point_at_fp_rate(_entries(), 0.0)
    assert op.threshold == pytest.approx(0.9) and op.false_positives == 0


@pytest.mark.parametrize(
    ("pre", "rec", "f1", "fp"),
    [
        (92.3, 94.1, 93.2, 7.7),  # GLANCE LUNA16
        (95.0, 93.6, 94.3, 5.0),  # GLANCE Tianchi
        (90.5, 91.9, 91.2, 9.5),  # LN-DETR
        (75.3, 72.1, 73.7, 24.7),  # NHNN
        (88.3, 87.4, 87.8, 11.7),  # NoduleNet
    ],
)
def test_glance_table3_columns_follow_our_definitions(pre: float, rec: float, f1: float, fp: float) -> None:
    """GLANCE Table 3 rows: FP = 100 - Pre and F1 = 2PR/(P+R) (to the table's rounding)."""
    tp = 1000
    n_fp = round(tp * (100 - pre) / pre)
    n_nodules = round(tp * 100 / rec)
    scores = np.r_[np.full(tp, 0.9), np.full(n_nodules - tp, -1e9), np.full(n_fp, 0.8)]
    lesion = np.r_[np.ones(n_nodules, bool), np.zeros(n_fp, bool)]
    counted = np.r_[np.ones(tp, bool), np.zeros(n_nodules - tp, bool), np.ones(n_fp, bool)]
    entries = FROCEntries(scores, lesion, counted, np.zeros(scores.size, int), 10)
    op = operating_point(entries, 0.5)
    assert 100 * op.precision == pytest.approx(pre, abs=0.05)
    assert 100 * op.recall == pytest.approx(rec, abs=0.05)
    assert 100 * op.f1 == pytest.approx(f1, abs=0.1)
    assert op.fp_column == pytest.approx(fp, abs=0.05)


def test_sensitivity_and_fp_rate_read_offs() -> None:
    curve = FROCCurve(
        fps=np.array([0.0, 0.0, 0.5, 0.5, 1.0, 2.0]),
        sensitivity=np.array([0.0, 0.4, 0.4, 0.8, 0.8, 0.95]),
        thresholds=np.zeros(6),
    )
    assert sensitivity_at_fp_rate(curve, 0.55) == pytest.approx(0.8)
    assert sensitivity_at_fp_rate(curve, 0.25) == pytest.approx(0.4)
    assert sensitivity_at_fp_rate(curve, 1.5) == pytest.approx(0.875)
    assert fp_rate_at_sensitivity(curve, 0.9) == pytest.approx(1.0 + (0.9 - 0.8) / 0.15)
    assert fp_rate_at_sensitivity(curve, 0.9, reading="nearest") == pytest.approx(2.0)
    assert fp_rate_at_sensitivity(curve, 0.6) == pytest.approx(0.5)
    assert fp_rate_at_sensitivity(curve, 0.99) == float("inf")
    real = froc_curve(_entries())
    assert fp_rate_at_sensitivity(real, sensitivity_at_fp_rate(real, 0.5)) <= 0.5


def _box(x: float, y: float, size: float) -> list[float]:
    return [x, y, x + size, y + size]


def test_coco_perfect_half_and_shifted() -> None:
    targets = [
        {"boxes": [_box(10, 10, 20), _box(100, 100, 60)], "labels": [0, 0]},
        {"boxes": [_box(30, 30, 20)], "labels": [0]},
    ]
    perfect = [
        {"boxes": t["boxes"], "scores": [0.9] * len(t["boxes"]), "labels": t["labels"]} for t in targets
    ]
    m = coco_detection_metrics(perfect, targets)
    for key in ("AP", "AP50", "AP75", "APS", "APM", "AR10"):
        assert m[key] == pytest.approx(1.0), key
    assert m["AR1"] == pytest.approx(2 / 3)  # one detection per image: 1 of 2 in image 1, 1 of 1 in image 2

    # Only the small box of image 1 and nothing in image 2: recall 1/3, precision 1 → 101-point AP = 34/101.
    half = [
        {"boxes": [_box(10, 10, 20)], "scores": [0.9], "labels": [0]},
        {"boxes": np.zeros((0, 4)), "scores": [], "labels": []},
    ]
    m = coco_detection_metrics(half, targets)
    assert m["AP50"] == pytest.approx(34 / 101, abs=1e-6)

    # Shift the medium box so its IoU is 0.62: a hit at IoU 0.5, a miss at 0.75.
    shift = 60 * (1 - 0.62) / (1 + 0.62)  # IoU of two 60-px squares offset along x by `shift`
    moved = [
        {"boxes": [_box(100 + shift, 100, 60)], "scores": [0.9], "labels": [0]},
    ]
    one = [{"boxes": [_box(100, 100, 60)], "labels": [0]}]
    m = coco_detection_metrics(moved, one)
    assert m["AP50"] == pytest.approx(1.0) and m["AP75"] == pytest.approx(0.0)
    assert m["AP"] == pytest.approx(0.3)  # hits at IoU 0.50, 0.55, 0.60 of the ten thresholds
    assert m["APM"] >= 0 and m["APS"] == -1.0  # no small ground truth → COCO's -1


def test_coco_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="one per image"):
        coco_detection_metrics([], [{"boxes": [], "labels": []}])
