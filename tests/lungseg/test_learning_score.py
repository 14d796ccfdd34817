"""Scoring of the GLANCE learning-report part (lungseg.learning.score) on hand-made per-scan results."""

from __future__ import annotations

import numpy as np
import pytest

from lungseg.learning import checks, score


def _scans(seed: int, dice_shift: float = 0.0):
    rng = np.random.default_rng(seed)
    scans = []
    for i in range(10):
        nodules = np.column_stack((rng.uniform(-60, 60, (2, 3)), [6.0, 9.0]))
        hits = np.column_stack((nodules[:, :3] + 0.3, [0.9, 0.6]))
        false = np.column_stack((rng.uniform(-200, 200, (4, 3)), rng.uniform(0, 0.7, 4)))
        dice = list(np.clip(rng.uniform(0.5, 0.9, 2) + dice_shift, 0, 1))
        scans.append({"uid": f"u{i}", "candidates": np.vstack((hits, false)), "nodules": nodules,
                      "excluded": np.zeros((0, 4)), "dice": dice})  # fmt: skip
    return {"scans": scans, "fit_s": 1.0, "test_s": 1.0}


def test_paired_difference_of_dice_and_detection():
    patients = {f"u{i}": f"p{i // 2}" for i in range(10)}  # two scans per patient
    full, seg = _scans(0, 0.05), _scans(0)
    scored = score({"full": full, "segmentation_only": seg}, patients, n_bootstrap=100)
    assert scored["test_set"] == {"patients": 5, "scans": 10, "nodules": 20, "nodules with masks": 20}
    dice = [d for s in full["scans"] for d in s["dice"]]
    assert scored["intervals"]["full"]["dice"].value == pytest.approx(np.mean(dice))
    assert scored["paired"]["dice"].value > 0 and scored["paired"]["dice"].lower > 0
    # same candidates: the detection difference is exactly zero
    assert (scored["paired"]["CPM"].lower, scored["paired"]["CPM"].upper) == (0.0, 0.0)
    assert scored["intervals"]["full"]["sens@4"].value == 1.0
    by_name = {c["check"]: c for c in checks(scored)}
    assert by_name["full sens@4 lower bound ≥ 0.80"]["passed"]
    assert not by_name["test nodules ≥ 80"]["passed"]


def test_variants_on_different_scans_are_refused():
    other = _scans(1)
    other["scans"] = other["scans"][:-1]
    with pytest.raises(ValueError, match="different scans"):
        score({"full": _scans(0), "segmentation_only": other}, {}, n_bootstrap=10)
