"""Classification metrics vs scikit-learn, hand-computed M³Net §4.2 formulas, textbook QWK, torchmetrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from common.metrics.classification import (
    CLASSIFICATION_KEYS,
    ClassificationScores,
    bootstrap_classification_scores,
    classification_metric_collection,
    classification_scores,
    confusion_matrix,
)


def _data(n: int, c: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.choice(c, size=n, p=np.linspace(1, 2, c) / np.linspace(1, 2, c).sum())
    logits = rng.normal(size=(n, c))
    logits[np.arange(n), y] += 1.2
    p = np.exp(logits)
    return y, p / p.sum(axis=1, keepdims=True)


def _qwk_textbook(y: np.ndarray, pred: np.ndarray, c: int) -> float:
    """κ = 1 − Σ w O / Σ w E, w_ij = (i − j)² / (C − 1)², E = outer(row sums, column sums) / N."""
    observed = np.zeros((c, c))
    for a, b in zip(y, pred):
        observed[a, b] += 1
    expected = np.outer(observed.sum(1), observed.sum(0)) / observed.sum()
    i, j = np.indices((c, c))
    w = (i - j) ** 2 / (c - 1) ** 2
    return 1.0 - (w * observed).sum() / (w * expected).sum()


@pytest.mark.parametrize(("c", "seed"), [(2, 0), (3, 1), (6, 2)])
def test_scores_equal_sklearn_and_paper_formulas(c: int, seed: int) -> None:
    y, p = _data(400, c, seed)
    s = classification_scores(y, p)
    pred = p.argmax(1)
    assert s["acc"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-12)
    assert s["bacc"] == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=1e-12)
    assert s["precision"] == pytest.approx(skm.precision_score(y, pred, average="weighted"), abs=1e-12)
    assert s["recall"] == pytest.approx(skm.recall_score(y, pred, average="weighted"), abs=1e-12)
    assert s["recall"] == pytest.approx(s["acc"], abs=1e-12)  # weighted recall is accuracy
    assert s["f1"] == pytest.approx(skm.f1_score(y, pred, average="weighted"), abs=1e-12)
    # Spec = Σ w_c TN_c / (TN_c + FP_c), by hand.
    cm = skm.confusion_matrix(y, pred, labels=range(c))
    spec = 0.0
    for k in range(c):
        tp, fp, fn = cm[k, k], cm[:, k].sum() - cm[k, k], cm[k, :].sum() - cm[k, k]
        tn = cm.sum() - tp - fp - fn
        spec += cm[k, :].sum() / cm.sum() * tn / (tn + fp)
    assert s["specificity"] == pytest.approx(spec, abs=1e-12)
    onehot = np.eye(c)[y]
    assert s["pr_auc"] == pytest.approx(skm.average_precision_score(onehot, p, average="weighted"), abs=1e-12)
    auc = (
        skm.roc_auc_score(y, p[:, 1])
        if c == 2
        else skm.roc_auc_score(y, p, multi_class="ovr", average="weighted")
    )
    assert s["roc_auc"] == pytest.approx(auc, abs=1e-12)
    assert s["qwk"] == pytest.approx(skm.cohen_kappa_score(y, pred, weights="quadratic"), abs=1e-12)
    assert s["qwk"] == pytest.approx(_qwk_textbook(y, pred, c), abs=1e-12)
    np.testing.assert_array_equal(confusion_matrix(y, pred, c), cm)


def test_binary_hand_computed_example() -> None:
    # 6 negatives, 4 positives; predictions: 5 TN, 1 FP, 3 TP, 1 FN.
    y = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    p1 = np.array([0.1, 0.2, 0.3, 0.4, 0.45, 0.7, 0.9, 0.8, 0.6, 0.35])
    s = classification_scores(y, p1)  # (N,) positive-class probabilities
    w0, w1 = 0.6, 0.4
    assert s["acc"] == pytest.approx(0.8)
    assert s["bacc"] == pytest.approx((5 / 6 + 3 / 4) / 2)
    assert s["precision"] == pytest.approx(w0 * 5 / 6 + w1 * 3 / 4)
    assert s["specificity"] == pytest.approx(w0 * 3 / 4 + w1 * 5 / 6)  # spec of class 0 = recall of class 1
    # AUC = share of (positive, negative) pairs ranked correctly: 0.9 and 0.8 beat all 6 negatives,
    # 0.6 beats 5 (not 0.7), 0.35 beats 3 → 20 / 24.
    assert s["roc_auc"] == pytest.approx(20 / 24)


def test_degenerate_inputs() -> None:
    s = classification_scores([1, 1, 1], [[0.2, 0.8], [0.3, 0.7], [0.6, 0.4]])
    assert math.isnan(s["roc_auc"]) and math.isnan(s["pr_auc"])
    with pytest.raises(ValueError, match="labels must lie"):
        classification_scores([0, 3], [[0.5, 0.5], [0.5, 0.5]])
    with pytest.raises(ValueError, match="NaN"):
        classification_scores([0, 1], [[np.nan, 0.5], [0.5, 0.5]])
    with pytest.raises(ValueError, match="no samples"):
        classification_scores([], np.zeros((0, 2)))


def test_bootstrap_mean_std_is_seeded_and_centred() -> None:
    y, p = _data(150, 3, 7)
    a = bootstrap_classification_scores(y, p, n_samples=40, seed=5)
    b = bootstrap_classification_scores(y, p, n_samples=40, seed=5)
    c = bootstrap_classification_scores(y, p, n_samples=40, seed=6)
    assert a == b and a["acc"]["mean"] != c["acc"]["mean"]
    for key in CLASSIFICATION_KEYS:
        stats = a[key]
        assert stats["samples"] == 40
        assert stats["lower"] <= stats["mean"] <= stats["upper"]
        assert 0 < stats["std"] < 0.2
        assert abs(stats["mean"] - stats["value"]) < 3 * stats["std"] + 1e-9
    # The standard deviation shrinks like 1/sqrt(N) with the test-set size.
    y4, p4 = np.tile(y, 4), np.tile(p, (4, 1))
    big = bootstrap_classification_scores(y4, p4, n_samples=40, seed=5)
    assert big["acc"]["std"] < 0.7 * a["acc"]["std"]


@pytest.mark.parametrize("c", [2, 4])
def test_torchmetrics_collection_matches(c: int) -> None:
    y, p = _data(300, c, 11)
    ours = classification_scores(y, p)
    collection = classification_metric_collection(c, prefix="val/")
    for start in range(0, 300, 64):
        collection.update(
            torch.tensor(p[start : start + 64], dtype=torch.float32), torch.tensor(y[start : start + 64])
        )
    got = {k.removeprefix("val/"): float(v) for k, v in collection.compute().items()}
    for key in CLASSIFICATION_KEYS:
        assert got[key] == pytest.approx(ours[key], abs=1e-5), key


def test_classification_scores_metric_counts_a_padded_sample_once() -> None:
    y, p = _data(50, 3, 2)
    ours = classification_scores(y, p)
    metric = ClassificationScores(3)
    order = np.random.default_rng(0).permutation(50)
    for part in (order[:20], order[20:], order[:3]):  # the last batch repeats samples (DDP padding)
        metric.update(torch.from_numpy(p[part]), torch.from_numpy(y[part]), torch.from_numpy(part))
    got = {k: float(v) for k, v in metric.compute().items()}
    assert got == pytest.approx(ours, rel=1e-6, nan_ok=True)
    keys, labels, probs = metric.compute_samples()
    assert keys.tolist() == list(range(50)) and (labels == y).all() and np.allclose(probs, p)
    metric.reset()
    assert all(math.isnan(float(v)) for v in metric.compute().values())
    with pytest.raises(ValueError, match="labels"):
        metric.update(torch.from_numpy(p[:2]), torch.tensor([0, 3]), torch.tensor([0, 1]))
