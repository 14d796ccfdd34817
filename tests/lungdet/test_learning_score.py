"""Scoring of the CLAF learning-report part (lungdet.learning.score) on a hand-made report folder."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lungdet.learning import FINAL, SYSTEMS, checks, score


def _folder(tmp_path, shift: float):
    """12 scans, 2 nodules each; stage 1 finds most of them; the 'final' score adds `shift` to every hit."""
    rng = np.random.default_rng(0)
    tree, report = tmp_path / "tree", tmp_path / "report"
    tree.mkdir()
    report.mkdir()
    uids = [f"1.2.{i}" for i in range(12)]
    ann, rows = [], []
    for uid in uids:
        for _ in range(2):
            xyz = rng.uniform(-80, 80, 3)
            ann.append((uid, *xyz, 8.0))
            if rng.random() < 0.85:
                rows.append((uid, *(xyz + 0.5), rng.uniform(0.4, 0.9), True))
        for _ in range(6):
            rows.append((uid, *rng.uniform(-200, 200, 3), rng.uniform(0.0, 0.7), False))
    cols = ["seriesuid", "coordX", "coordY", "coordZ"]
    pd.DataFrame(ann, columns=[*cols, "diameter_mm"]).to_csv(tree / "annotations.csv", index=False)
    pd.DataFrame(columns=[*cols, "diameter_mm"]).to_csv(tree / "annotations_excluded.csv", index=False)
    (report / "seriesuids_test.csv").write_text("".join(f"{u}\n" for u in uids))
    results = pd.DataFrame(rows, columns=[*cols, "probability", "hit"])
    for name, filename in SYSTEMS.items():
        frame = results.copy()
        if name.startswith("final"):
            frame.loc[frame["hit"], "probability"] += shift
        frame.drop(columns="hit").to_csv(report / filename, index=False)
    return report, tree


HARM = "final − stage-1 CPM (same candidates), paired upper bound > 0 (or [0, 0]: identical)"


def test_identical_final_score_gives_a_zero_paired_interval(tmp_path):
    scored = score(*_folder(tmp_path, 0.0), n_bootstrap=100)
    diff = scored["paired"][FINAL]["CPM"]
    assert (diff.value, diff.lower, diff.upper) == (0.0, 0.0, 0.0)
    assert scored["test_set"] == {"patients": 12, "scans": 12, "nodules": 24}
    by_name = {c["check"]: c for c in checks(scored)}
    assert by_name[HARM]["passed"]  # identical rankings (validation chose w = 1): no harm, exactly
    assert not by_name["test nodules ≥ 80"]["passed"]


def test_a_worse_final_score_fails_the_no_harm_check(tmp_path):
    scored = score(*_folder(tmp_path, -0.6), n_bootstrap=100)
    diff = scored["paired"][FINAL]["CPM"]
    assert diff.upper < 0
    assert not {c["check"]: c for c in checks(scored)}[HARM]["passed"]


def test_a_better_final_score_has_a_positive_paired_interval(tmp_path):
    scored = score(*_folder(tmp_path, 0.3), n_bootstrap=100)
    diff = scored["paired"][FINAL]["CPM"]
    assert diff.value > 0 and diff.upper > 0 and diff.lower >= 0
    stage1 = scored["intervals"]["stage 1 (100 candidates/scan)"]
    assert stage1["sens@8"].lower <= stage1["sens@8"].value <= stage1["sens@8"].upper
    assert stage1["CPM"].value == pytest.approx(
        scored["intervals"]["stage 1, stage-2 candidates"]["CPM"].value
    )
