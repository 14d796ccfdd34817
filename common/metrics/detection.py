"""Detection metrics at an operating point, and COCO AP/AR for 2D boxes.

Operating point (GLANCE Table 3, CLAF "sensitivity at 0.55 FP/scan"): marks are matched to nodules
with the LUNA16 rules of :func:`common.metrics.froc.match_candidates` (hit = inside the nodule
sphere; marks on excluded findings and extra hits on a detected nodule are neither true nor false
positives). At a probability threshold t:

- TP = nodules whose best mark has probability >= t, FN = nodules - TP;
- FP = marks with probability >= t that hit no finding;
- precision = TP / (TP + FP), recall = TP / nodules, F1 = 2PR / (P + R);
- the "FP" column of GLANCE Table 3 = 100 - precision (%) (every row of that table satisfies
  FP = 100 - Pre, e.g. GLANCE 92.3 → 7.7), i.e. the false discovery rate in percent;
- with no mark kept, precision is 0 (scikit-learn's ``zero_division=0``), so FP is 100.

FROC read-offs in both directions: sensitivity at a given FP/scan (:func:`sensitivity_at_fp_rate`)
and FP/scan needed for a given sensitivity (:func:`fp_rate_at_sensitivity`).

COCO AP/AP50/AP75/APS/APM/AR1/AR10 (papers 003/004 tables) come from torchmetrics'
``MeanAveragePrecision`` with the ``pycocotools`` backend (the reference COCO implementation; it
installs from a wheel and runs offline).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from common.metrics.froc import FROCCurve, FROCEntries, Reading, read_sensitivities

COCO_KEYS = {
    "map": "AP",
    "map_50": "AP50",
    "map_75": "AP75",
    "map_small": "APS",
    "map_medium": "APM",
    "map_large": "APL",
    "mar_1": "AR1",
    "mar_10": "AR10",
    "mar_100": "AR100",
}


@dataclass(frozen=True)
class OperatingPoint:
    """Detection counts and rates at one probability threshold.

    precision, recall and f1 are fractions in [0, 1]; ``fp_column`` is in percent, as printed in
    GLANCE Table 3.
    """

    threshold: float
    true_positives: int
    false_positives: int
    false_negatives: int
    n_scans: int
    precision: float
    recall: float
    f1: float
    fp_column: float
    fps_per_scan: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _safe_div(a: float, b: float) -> float:
    return a / b if b > 0 else 0.0


def operating_point(entries: FROCEntries, threshold: float) -> OperatingPoint:
    """Precision, recall, F1, GLANCE "FP" column and FP/scan at probability ``threshold``.

    Args:
        entries: matched marks from :func:`common.metrics.froc.match_candidates`.
        threshold: marks with probability >= threshold are kept.
    """
    kept = entries.counted & (entries.scores >= threshold)
    tp = int((kept & entries.is_lesion).sum())
    fp = int((kept & ~entries.is_lesion).sum())
    n_lesions = entries.n_lesions
    precision = _safe_div(tp, tp + fp)
    recall = _safe_div(tp, n_lesions)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    return OperatingPoint(
        threshold=float(threshold),
        true_positives=tp,
        false_positives=fp,
        false_negatives=n_lesions - tp,
        n_scans=entries.n_scans,
        precision=precision,
        recall=recall,
        f1=f1,
        fp_column=100.0 * (1.0 - precision),
        fps_per_scan=_safe_div(fp, entries.n_scans),
    )


def operating_point_at_fp_rate(entries: FROCEntries, fp_rate: float) -> OperatingPoint:
    """The operating point with the lowest threshold whose FP/scan stays at or below ``fp_rate``.

    Thresholds are the distinct mark probabilities, so the point is one the detector can actually
    run at (no interpolation).
    """
    scores = entries.scores[entries.counted]
    lesion = entries.is_lesion[entries.counted]
    if scores.size == 0:
        return operating_point(entries, np.inf)
    order = np.argsort(-scores, kind="mergesort")
    s, fp_cum = scores[order], np.cumsum(~lesion[order])
    last_of_value = np.r_[s[1:] != s[:-1], True]
    allowed = last_of_value & (fp_cum <= fp_rate * entries.n_scans)
    if not allowed.any():
        return operating_point(entries, np.nextafter(s[0], np.inf))
    return operating_point(entries, float(s[np.flatnonzero(allowed)[-1]]))


def sensitivity_at_fp_rate(curve: FROCCurve, fp_rate: float, reading: Reading = "interp") -> float:
    """Sensitivity at ``fp_rate`` FP/scan (e.g. CLAF's 0.55), read as for the seven LUNA16 points."""
    return float(read_sensitivities(curve, (float(fp_rate),), reading)[0])


def fp_rate_at_sensitivity(curve: FROCCurve, sensitivity: float, reading: Reading = "interp") -> float:
    """Smallest FP/scan at which the FROC curve reaches ``sensitivity`` (inf if it never does).

    ``interp`` walks the piecewise-linear curve (the same curve the ``interp`` reading uses);
    ``nearest`` returns the FP rate of the first operating point reaching the sensitivity.
    """
    sens, fps = curve.sensitivity, curve.fps
    reached = np.flatnonzero(sens >= sensitivity)
    if reached.size == 0:
        return float("inf")
    i = int(reached[0])
    if reading == "nearest" or i == 0:
        return float(fps[i])
    if reading != "interp":
        raise ValueError(f"reading must be 'interp' or 'nearest', got {reading!r}")
    s0, s1, f0, f1 = sens[i - 1], sens[i], fps[i - 1], fps[i]
    return float(f0 + (sensitivity - s0) * (f1 - f0) / (s1 - s0))


def coco_map_metric(**kwargs: Any) -> Any:
    """torchmetrics ``MeanAveragePrecision`` for 2D boxes (xyxy pixels), pycocotools backend."""
    from torchmetrics.detection import MeanAveragePrecision

    options = {"box_format": "xyxy", "iou_type": "bbox", "backend": "pycocotools"}
    options.update(kwargs)
    return MeanAveragePrecision(**options)


def coco_detection_metrics(
    predictions: Sequence[dict[str, Any]], targets: Sequence[dict[str, Any]], **kwargs: Any
) -> dict[str, float]:
    """COCO AP, AP50, AP75, APS, APM, APL, AR1, AR10, AR100 for a set of images.

    Args:
        predictions: per image ``{"boxes": (n, 4) xyxy, "scores": (n,), "labels": (n,)}``.
        targets: per image ``{"boxes": (m, 4) xyxy, "labels": (m,)}``.
        kwargs: passed to ``MeanAveragePrecision`` (e.g. ``class_metrics=True``).

    Returns:
        The named values (COCO reports -1 where a size range has no ground truth).
    """
    if len(predictions) != len(targets):
        raise ValueError(
            f"got {len(predictions)} prediction sets for {len(targets)} images; pass one per image"
        )

    import torch

    def tensors(item: dict[str, Any], keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
        out = {}
        for key in keys:
            value = torch.as_tensor(np.asarray(item[key]))
            if key == "boxes":
                value = value.to(torch.float32).reshape(-1, 4)
            elif key == "labels":
                value = value.to(torch.int64).reshape(-1)
            else:
                value = value.to(torch.float32).reshape(-1)
            out[key] = value
        return out

    metric = coco_map_metric(**kwargs)
    metric.update(
        [tensors(p, ("boxes", "scores", "labels")) for p in predictions],
        [tensors(t, ("boxes", "labels")) for t in targets],
    )
    raw = metric.compute()
    return {name: float(raw[key]) for key, name in COCO_KEYS.items()}
