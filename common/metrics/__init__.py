"""Metrics shared by the three packages (definitions and conventions: docs/metrics.md).

- :mod:`common.metrics.froc` — LUNA16 FROC / CPM with the official script's rules and numbers;
  :mod:`common.metrics.froc_io` reads the official CSV inputs; :mod:`common.metrics.froc_torch` is
  the DDP-correct torchmetrics form for validation loops; :mod:`common.metrics.unique_samples` counts each
  evaluation sample once under DDP (samplers pad sets so that every rank gets the same number).
- :mod:`common.metrics.detection` — precision / recall / F1 / GLANCE "FP" at an operating point,
  FROC read-offs, COCO AP/AR for 2D boxes.
- :mod:`common.metrics.segmentation` — Dice, IoU, sensitivity, HD95 (mm) for 2D/3D masks.
- :mod:`common.metrics.classification` — M³Net §4.2 metrics, QWK, bootstrap mean ± std.
- :mod:`common.metrics.figures` — FROC curve and confusion-matrix PNGs.
- :mod:`common.metrics.intervals` — 95 % bootstrap intervals over patients and paired intervals of a
  difference between two systems (the learning report's statistics).

Names are exported lazily: heavy imports (torch, torchmetrics, MONAI, matplotlib) happen only when a
name from a submodule that needs them is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "classification": (
        "CLASSIFICATION_KEYS",
        "ClassificationScores",
        "bootstrap_classification_scores",
        "classification_metric_collection",
        "classification_scores",
        "confusion_matrix",
    ),
    "detection": (
        "OperatingPoint",
        "coco_detection_metrics",
        "coco_map_metric",
        "fp_rate_at_sensitivity",
        "operating_point",
        "operating_point_at_fp_rate",
        "sensitivity_at_fp_rate",
    ),
    "figures": ("plot_confusion_matrix", "plot_froc"),
    "froc": (
        "BOOTSTRAP_GRID",
        "FP_RATES",
        "MAX_MARKS_PER_SCAN",
        "BootstrapResult",
        "FROCCurve",
        "FROCEntries",
        "FROCResult",
        "MatchCounts",
        "bootstrap_froc",
        "cpm",
        "evaluate_froc",
        "froc_curve",
        "match_candidates",
        "read_sensitivities",
    ),
    "intervals": (
        "Interval",
        "bootstrap_patients",
        "classification_statistic",
        "froc_statistic",
        "mean_statistic",
        "paired_bootstrap_patients",
        "patient_draws",
    ),
    "froc_io": (
        "FROCInputError",
        "evaluate_froc_files",
        "load_froc_inputs",
        "write_annotations_csv",
        "write_results_csv",
        "write_seriesuids",
    ),
    "froc_torch": ("LUNA16FROC", "scan_key_from_uid"),
    "unique_samples": ("UniqueSampleMean", "UniqueSampleMetric", "first_per_key", "sample_key"),
    "segmentation": (
        "SegmentationScores",
        "aggregate_segmentation_scores",
        "hd95",
        "segmentation_scores",
    ),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    """Import the defining submodule on first use (PEP 562), so ``import common.metrics`` stays cheap."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'common.metrics' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"common.metrics.{module}"), name)
    globals()[name] = value
    return value
