"""Classification metrics as M³Net §4.2 defines them, plus QWK, for binary and multiclass tasks.

With C classes, N_c test samples of class c and class weight w_c = N_c / N (M³Net (Li et al., preprint 2025), §4.2):

- ACC = correct / N. (The paper's eq. 19, Σ(TP_c+TN_c) / Σ(TP_c+TN_c+FP_c+FN_c), equals this for two
  classes; for C > 2 it would be the mean one-vs-rest accuracy, which nobody reports, so ACC is
  the plain accuracy.)
- BACC = (1/C) Σ_c TP_c / (TP_c + FN_c), the mean per-class recall (the paper's reference [25]; the
  stray w_c in eq. 20 would make it a different number and is a typo).
- Pre = Σ w_c TP_c/(TP_c+FP_c), Rec = Σ w_c TP_c/(TP_c+FN_c), Spec = Σ w_c TN_c/(TN_c+FP_c),
  F1 = Σ w_c F1_c; an undefined per-class ratio counts as 0 (scikit-learn's ``zero_division=0``).
  Weighted recall always equals ACC.
- ROC-AUC = Σ w_c AUC_c and PR-AUC = Σ w_c AP_c, one-vs-rest on the class probabilities; AP is
  the step-wise area under the precision-recall curve (scikit-learn's ``average_precision_score``;
  AUC, AP and QWK are computed here in numpy so that the bootstrap stays fast, and the tests check
  them against scikit-learn).
  In the binary case both classes enter with their weights, as the formula says (ROC-AUC then
  equals the usual binary AUC; PR-AUC does not equal the positive-class AP).
- QWK: Cohen's kappa with quadratic weights (LDFC (Sci. Data 2024) and STPD (Jian et al., preprint 2024)).

Predictions are the arg-max class. Mean ± std "across samples" (M³Net §4.3) is a bootstrap over
test samples: :func:`bootstrap_classification_scores`.

For validation and test loops, :class:`ClassificationScores` is the torchmetrics form of
:func:`classification_scores`: it keeps every sample's label and probabilities with its dataset index, so
under DDP the samples that ``DistributedSampler`` pads in are counted once
(:mod:`common.metrics.unique_samples`), and computes the numbers above on the whole set.
:func:`classification_metric_collection` gives the same numbers with torchmetrics' own classes (checked
against this module in the tests), but it cannot tell a padded copy from a new sample.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata

from common.metrics.unique_samples import UniqueSampleMetric

CLASSIFICATION_KEYS = ("acc", "bacc", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc", "qwk")


def _inputs(y_true: Any, probs: Any, num_classes: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    y = np.asarray(y_true).astype(np.int64).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1:
        p = np.column_stack((1.0 - p, p))
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(
            f"probabilities must be (N,) positive-class or (N, C); got {p.shape} for {y.shape[0]} labels"
        )
    c = num_classes if num_classes is not None else p.shape[1]
    if p.shape[1] != c:
        raise ValueError(f"probabilities have {p.shape[1]} columns for {c} classes")
    if y.size and (y.min() < 0 or y.max() >= c):
        raise ValueError(f"labels must lie in [0, {c}); got min {y.min()} max {y.max()}")
    if not np.isfinite(p).all():
        raise ValueError("probabilities contain NaN or infinite values")
    return y, p, c


def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int) -> np.ndarray:
    """(C, C) counts, rows = true class, columns = predicted class."""
    y = np.asarray(y_true, dtype=np.int64).reshape(-1)
    q = np.asarray(y_pred, dtype=np.int64).reshape(-1)
    return np.bincount(y * num_classes + q, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def _roc_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """Binary ROC-AUC by the rank-sum (Mann-Whitney) identity, ties counted half (= scikit-learn)."""
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _average_precision(positive: np.ndarray, score: np.ndarray) -> float:
    """Step-wise area under the precision-recall curve, Σ (R_k − R_k−1) P_k (= scikit-learn's AP)."""
    order = np.argsort(-score, kind="mergesort")
    s, y = score[order], positive[order]
    last = np.r_[s[1:] != s[:-1], True]  # one operating point per distinct score
    tp = np.cumsum(y)[last]
    seen = (np.flatnonzero(last) + 1).astype(np.float64)
    precision = tp / seen
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _quadratic_kappa(cm: np.ndarray) -> float:
    """Cohen's kappa with weights (i − j)² on a confusion matrix (= scikit-learn, textbook formula)."""
    c = cm.shape[0]
    i, j = np.indices((c, c))
    w = (i - j) ** 2
    expected = np.outer(cm.sum(axis=1), cm.sum(axis=0)) / cm.sum()
    den = (w * expected).sum()
    return float(1.0 - (w * cm).sum() / den) if den > 0 else float("nan")


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(num.shape, dtype=np.float64), where=den > 0)


def classification_scores(y_true: Any, probs: Any, num_classes: int | None = None) -> dict[str, float]:
    """ACC, BACC, weighted Pre/Rec/Spec/F1, weighted ROC-AUC and PR-AUC, QWK (fractions in [0, 1]).

    Args:
        y_true: (N,) integer labels.
        probs: (N, C) class probabilities, or (N,) positive-class probabilities for a binary task.
        num_classes: C (default: columns of ``probs``).

    Returns:
        The metrics named in ``CLASSIFICATION_KEYS``; AUCs are NaN when fewer than two classes occur.
    """
    y, p, c = _inputs(y_true, probs, num_classes)
    if y.size == 0:
        raise ValueError("no samples to score")
    pred = p.argmax(axis=1)
    cm = confusion_matrix(y, pred, c).astype(np.float64)
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    fp = cm.sum(axis=0) - tp
    fn = support - tp
    tn = cm.sum() - tp - fp - fn
    w = support / support.sum()
    prec_c = _ratio(tp, tp + fp)
    rec_c = _ratio(tp, tp + fn)
    spec_c = _ratio(tn, tn + fp)
    f1_c = _ratio(2 * prec_c * rec_c, prec_c + rec_c)
    present = support > 0
    scores = {
        "acc": float(tp.sum() / cm.sum()),
        "bacc": float(rec_c[present].mean()),
        "precision": float((w * prec_c).sum()),
        "recall": float((w * rec_c).sum()),
        "specificity": float((w * spec_c).sum()),
        "f1": float((w * f1_c).sum()),
        "qwk": _quadratic_kappa(cm),
    }
    if present.sum() < 2:
        scores["roc_auc"] = scores["pr_auc"] = float("nan")
    else:
        onehot = np.eye(c, dtype=bool)[y]
        auc = np.array([_roc_auc(onehot[:, k], p[:, k]) if present[k] else 0.0 for k in range(c)])
        ap = np.array([_average_precision(onehot[:, k], p[:, k]) if present[k] else 0.0 for k in range(c)])
        scores["roc_auc"] = float((w * auc).sum())
        scores["pr_auc"] = float((w * ap).sum())
    return {k: scores[k] for k in CLASSIFICATION_KEYS}


def bootstrap_classification_scores(
    y_true: Any, probs: Any, n_samples: int = 1000, seed: int = 0, num_classes: int | None = None
) -> dict[str, dict[str, float]]:
    """Mean ± std (and 95% percentile interval) of every metric over bootstrap resamples of the test set.

    Resamples test samples with replacement (``numpy.random.default_rng(seed)``); a resample in
    which a metric is undefined (e.g. one class only) is left out of that metric's statistics.

    Returns:
        ``{metric: {"value", "mean", "std", "lower", "upper", "samples"}}``, value = on the full set.
    """
    y, p, c = _inputs(y_true, probs, num_classes)
    full = classification_scores(y, p, c)
    rng = np.random.default_rng(seed)
    table = np.full((n_samples, len(CLASSIFICATION_KEYS)), np.nan)
    for b in range(n_samples):
        idx = rng.integers(0, y.shape[0], size=y.shape[0])
        s = classification_scores(y[idx], p[idx], c)
        table[b] = [s[k] for k in CLASSIFICATION_KEYS]
    out: dict[str, dict[str, float]] = {}
    for j, key in enumerate(CLASSIFICATION_KEYS):
        col = table[:, j][np.isfinite(table[:, j])]
        out[key] = {
            "value": full[key],
            "mean": float(col.mean()) if col.size else float("nan"),
            "std": float(col.std(ddof=1)) if col.size > 1 else float("nan"),
            "lower": float(np.percentile(col, 2.5)) if col.size else float("nan"),
            "upper": float(np.percentile(col, 97.5)) if col.size else float("nan"),
            "samples": float(col.size),
        }
    return out


def classification_metric_collection(num_classes: int, prefix: str | None = None) -> Any:
    """torchmetrics ``MetricCollection`` computing the same metrics from (N, C) probabilities.

    Binary tasks use ``num_classes=2`` with two-column probabilities so that the class-weighted
    averages include both classes, as M³Net defines them.
    """
    from torchmetrics import MetricCollection
    from torchmetrics.classification import (
        MulticlassAccuracy,
        MulticlassAUROC,
        MulticlassAveragePrecision,
        MulticlassCohenKappa,
        MulticlassF1Score,
        MulticlassPrecision,
        MulticlassRecall,
        MulticlassSpecificity,
    )

    c = num_classes
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(c, average="micro"),
            "bacc": MulticlassRecall(c, average="macro"),
            "precision": MulticlassPrecision(c, average="weighted"),
            "recall": MulticlassRecall(c, average="weighted"),
            "specificity": MulticlassSpecificity(c, average="weighted"),
            "f1": MulticlassF1Score(c, average="weighted"),
            "roc_auc": MulticlassAUROC(c, average="weighted", thresholds=None),
            "pr_auc": MulticlassAveragePrecision(c, average="weighted", thresholds=None),
            "qwk": MulticlassCohenKappa(c, weights="quadratic"),
        },
        prefix=prefix,
    )


class ClassificationScores(UniqueSampleMetric):
    """:func:`classification_scores` over the distinct samples of all ranks (DDP padding counted once).

    Each sample is stored as its label, its class probabilities and its key (the dataset index in the
    batch), so ``compute()`` sees the whole evaluation set once, in key order, whatever the number of
    ranks. :meth:`compute_samples` returns those samples for reports (predictions tables, bootstrap).

    Args:
        num_classes: C; ``update`` takes (B, C) probabilities.
        kwargs: torchmetrics ``Metric`` options.
    """

    higher_is_better = True

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        super().__init__(width=num_classes + 1, **kwargs)
        self.num_classes = int(num_classes)
        self._last: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def update(self, probs: Any, labels: Any, keys: Any) -> None:
        """Add a batch: (B, C) probabilities, (B,) integer labels, (B,) sample keys (dataset indices)."""
        p = torch.as_tensor(probs).detach().to(torch.float64).cpu()
        y = torch.as_tensor(labels).detach().reshape(-1).cpu()
        if p.ndim != 2 or p.shape[1] != self.num_classes or p.shape[0] != y.shape[0]:
            raise ValueError(
                f"expected (B, {self.num_classes}) probabilities for {y.shape[0]} labels, got {tuple(p.shape)}"
            )
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}); got {y.min()}..{y.max()}")
        self._add(keys, torch.cat((y.to(torch.float64).reshape(-1, 1), p), 1))

    def compute(self) -> dict[str, torch.Tensor]:
        """The metrics of ``CLASSIFICATION_KEYS`` on the distinct samples (NaN when there are none)."""
        keys, rows = self.unique_samples()
        labels, probs = rows[:, 0].astype(np.int64), rows[:, 1:]
        self._last = (keys, labels, probs)
        if keys.size == 0:
            return {k: torch.tensor(float("nan")) for k in CLASSIFICATION_KEYS}
        scores = classification_scores(labels, probs, self.num_classes)
        return {k: torch.tensor(scores[k], dtype=torch.float32) for k in CLASSIFICATION_KEYS}

    def compute_samples(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(keys, labels, probabilities (m, C)) of the distinct samples of all ranks, in key order.

        Goes through :meth:`compute` so that the states are gathered across ranks first.
        """
        self.compute()
        assert self._last is not None
        return self._last
