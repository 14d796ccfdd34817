"""Scoring of the M³Net / pathology learning-report parts (lungcls.learning.score_classification)."""

from __future__ import annotations

import numpy as np
import pytest

from common.metrics.classification import classification_scores
from lungcls.learning import score_classification


def test_m3net_against_each_scale_is_paired():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 80)
    good = np.clip(0.5 + 0.35 * (labels - 0.5) + rng.normal(0, 0.15, 80), 0, 1)
    weak = np.clip(0.5 + 0.1 * (labels - 0.5) + rng.normal(0, 0.25, 80), 0, 1)
    probs = {
        name: np.column_stack((1 - p, p))
        for name, p in (("M³Net", good), ("scale 32", weak), ("scale 64", good))
    }
    patients = np.repeat(np.arange(40), 2).astype(str)
    scored = score_classification(labels, patients, probs, ("roc_auc", "acc"), "M³Net", n_bootstrap=200)
    auc = scored["intervals"]["M³Net"]["roc_auc"]
    assert auc.value == pytest.approx(classification_scores(labels, probs["M³Net"])["roc_auc"])
    assert auc.patients == 40
    assert scored["paired"]["scale 32"]["roc_auc"].lower > 0
    same = scored["paired"]["scale 64"]["roc_auc"]
    assert (same.value, same.lower, same.upper) == (0.0, 0.0, 0.0)
    assert {r["system"] for r in scored["comparisons"]} == {"M³Net − scale 32", "M³Net − scale 64"}


def test_three_class_qwk_interval_without_reference():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 60)
    probs = np.eye(3)[np.where(rng.random(60) < 0.7, labels, rng.integers(0, 3, 60))] * 0.8 + 0.2 / 3
    scored = score_classification(labels, np.arange(60).astype(str), {"resnet": probs}, ("qwk", "acc"))
    qwk = scored["intervals"]["resnet"]["qwk"]
    assert qwk.lower > 0 and qwk.lower <= qwk.value <= qwk.upper and scored["comparisons"] == []
