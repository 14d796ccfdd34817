"""`make learning-report` page assembly (common.experiments.learning_report): parts → docs/learning.md."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.experiments.learning_report import (
    GENERATED,
    assemble,
    detection_entries,
    interval_rows,
    write_part,
)
from common.metrics.froc import evaluate_froc
from common.metrics.intervals import Interval


def _part(docs, model, value=0.9):
    iv = {"CPM": Interval(value, value - 0.05, value + 0.03, 0.95, 1000, 52)}
    diff = {"CPM": Interval(0.02, -0.01, 0.05, 0.95, 1000, 52)}
    return write_part(
        docs,
        model,
        title=f"{model} title",
        recipe={"steps": 10},
        seeds={"data": 1},
        test_set={"patients": 52, "nodules": 90},
        metrics=interval_rows("stage 1", iv),
        comparisons=interval_rows("final − stage 1", diff),
        checks=[{"check": "CPM lower bound ≥ 0.8", "value": value - 0.05, "passed": value - 0.05 >= 0.8}],
        wall_time_s=600.0,
        timings_s={"fit": 500.0},
    )


def test_parts_are_dated_files_and_the_page_is_assembled_from_those_present(tmp_path):
    path = _part(tmp_path, "m3net", 0.8)
    part = json.loads(path.read_text())
    assert path == tmp_path / "learning" / "m3net.json"
    assert {"date", "machine", "wall_time_s", "recipe", "seeds"} <= set(part)
    assert part["machine"]["cpu"] and part["machine"]["logical_cores"]
    page = (tmp_path / "learning.md").read_text()
    assert page.startswith(GENERATED) and "do not edit" in page.splitlines()[0]
    assert "## m3net title" in page and "not yet run: claf, glance, pathology" in page
    assert "0.800 [0.750, 0.830]" in page and "0.020 [-0.010, 0.050]" in page and "FAIL" in page
    _part(tmp_path, "claf", 0.9)
    page = (tmp_path / "learning.md").read_text()
    # page order is the model order, whatever order the parts were run in
    assert page.index("## claf title") < page.index("## m3net title")
    assert "Total wall time of the parts: 20.0 min" in page
    (tmp_path / "learning" / "claf.json").unlink()
    assert "## claf title" not in assemble(tmp_path).read_text()


def test_unknown_part_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown learning-report part"):
        _part(tmp_path, "resnet")


def test_detection_entries_follow_the_official_rules():
    rng = np.random.default_rng(0)
    scans = []
    for _ in range(6):
        nodules = np.column_stack((rng.uniform(-50, 50, (2, 3)), [6.0, 8.0]))
        hits = np.column_stack((nodules[:, :3] + 0.5, [0.9, 0.4]))
        false = np.column_stack((rng.uniform(-200, 200, (5, 3)), rng.random(5)))
        scans.append((np.vstack((hits, false)), nodules, np.zeros((0, 4))))
    entries = detection_entries(scans)
    cand = np.vstack([c for c, _, _ in scans])
    cand_scan = np.repeat(np.arange(6), 7)
    nod = np.vstack([n for _, n, _ in scans])
    result = evaluate_froc(cand_scan, cand[:, :3], cand[:, 3], np.repeat(np.arange(6), 2), nod[:, :3], nod[:, 3],
                           np.ones(12, bool), n_scans=6)  # fmt: skip
    assert entries.n_lesions == 12 and entries.n_detected == result.counts.true_positives
    assert entries.n_false_positives == result.counts.false_positives


def test_check_lines_and_failed_checks_name_each_check():
    from common.experiments.learning_report import check_lines, failed_checks

    scored = {
        "checks": [
            {"check": "AUC lower bound ≥ 0.70", "value": 0.665, "passed": False},
            {"check": "test nodules ≥ 150", "value": 151.0, "passed": True},
        ],
        "wall_time_s": 90.0,
    }
    assert check_lines(scored) == [
        "FAIL  AUC lower bound ≥ 0.70: 0.665",
        "pass  test nodules ≥ 150: 151.000",
        "wall time 1.5 min",
    ]
    assert failed_checks(scored) == ["AUC lower bound ≥ 0.70 (got 0.665)"]
