"""Test and predict reports of the lungcls tasks: bootstrap metric table, predictions CSV, confusion matrix.

M³Net reports its metrics as mean ± std over the test samples (§4.3): the full set of
`common.metrics.classification` (ACC, BACC, class-weighted Pre / Rec / Spec / F1, weighted ROC-AUC and
PR-AUC, and QWK for the pathology sets) on the whole test set, with the bootstrap mean and standard
deviation beside it. A report is three files in the run folder:

- ``<stage>_metrics.json`` — per metric: value on the full set, bootstrap mean, std and 95% interval;
- ``<stage>_predictions.csv`` — one row per sample: the part's table columns (nodule key, scan uid,
  centre, … — never a patient id), label, predicted class and the class probabilities;
- ``<stage>_confusion_matrix.png``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common import atomic
from common.metrics.classification import (
    CLASSIFICATION_KEYS,
    bootstrap_classification_scores,
    confusion_matrix,
)
from common.metrics.figures import plot_confusion_matrix

__all__ = ["PRIVATE_COLUMNS", "format_scores", "prediction_table", "write_classification_report"]

#: columns never written to a report (patient identifiers stay out of every output).
PRIVATE_COLUMNS = ("patient_id", "patient")


def prediction_table(
    probs: np.ndarray, indices: np.ndarray, table: pd.DataFrame | None, labels: np.ndarray | None = None
) -> pd.DataFrame:
    """One row per sample, in dataset order: table columns, label, prediction and probabilities."""
    order = np.argsort(indices, kind="stable")
    probs, indices = probs[order], indices[order]
    out = pd.DataFrame({"index": indices.astype(int)})
    if table is not None and len(table):
        meta = table.drop(columns=[c for c in PRIVATE_COLUMNS if c in table.columns], errors="ignore")
        meta = meta.drop(columns=["label"], errors="ignore").iloc[indices].reset_index(drop=True)
        out = pd.concat([out, meta], axis=1)
    if labels is not None:
        out["label"] = labels[order].astype(int)
    out["prediction"] = probs.argmax(axis=1)
    for k in range(probs.shape[1]):
        out[f"prob_{k}"] = probs[:, k]
    return out


def format_scores(scores: dict[str, dict[str, float]], keys: Sequence[str] = CLASSIFICATION_KEYS) -> str:
    """`metric  value  mean ± std` lines, in percent (as the papers print them)."""
    lines = []
    for key in keys:
        s = scores[key]
        lines.append(f"{key:<12} {100 * s['value']:6.2f}   {100 * s['mean']:6.2f} ± {100 * s['std']:5.2f}")
    return "\n".join(lines)


def write_classification_report(
    out_dir: str | Path,
    stage: str,
    probs: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    table: pd.DataFrame | None = None,
    class_names: Sequence[str] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    extra: dict[str, Any] | None = None,
) -> dict[str, dict[str, float]]:
    """Score the predictions, write the three report files, return the bootstrap scores.

    Args:
        out_dir: the run folder.
        stage: file prefix ("test").
        probs: `(N, C)` class probabilities.
        labels: `(N,)` integer labels.
        indices: `(N,)` row of each sample in `table`.
        table: the part's sample table (nodule keys, scan uids, files …).
        class_names: names for the confusion-matrix axes.
        n_bootstrap: bootstrap resamples for mean ± std.
        seed: bootstrap seed.
        extra: more fields for the JSON (e.g. the run's configuration summary).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    indices = np.asarray(indices).astype(np.int64)
    num_classes = probs.shape[1]
    scores = bootstrap_classification_scores(
        labels, probs, n_samples=n_bootstrap, seed=seed, num_classes=num_classes
    )
    document = {
        "stage": stage,
        "n_samples": int(labels.size),
        "class_counts": np.bincount(labels, minlength=num_classes).tolist(),
        "n_bootstrap": n_bootstrap,
        "metrics": scores,
        **(extra or {}),
    }
    atomic.write_text(out / f"{stage}_metrics.json", json.dumps(document, indent=2))
    atomic.write_csv(out / f"{stage}_predictions.csv", prediction_table(probs, indices, table, labels))
    cm = confusion_matrix(labels, probs.argmax(axis=1), num_classes)
    plot_confusion_matrix(cm, out / f"{stage}_confusion_matrix.png", class_names)
    return scores
