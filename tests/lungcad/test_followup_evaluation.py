"""`lungcad.followup.evaluation`: the end-to-end follow-up score on a hand-built truth and document."""

from __future__ import annotations

import math

from lungcad.followup.evaluation import detections, score_followup, score_patient


def _at(x: float, d: float, v: float, present: bool = True) -> dict:
    return {"present": present, "world_xyz": [x, 0.0, 0.0], "diameter_mm": d, "volume_mm3": v}


TRUTH = {
    "patient_id": "P1",
    "scans": [{"uid": "T1"}, {"uid": "T2"}],
    "nodules": [
        {
            "nodule_id": "P1-N1",
            "kind": "growing",
            "vdt_days": 200.0,
            "per_time": [_at(0, 6, 100), _at(0, 8, 200)],
        },
        {
            "nodule_id": "P1-N2",
            "kind": "stable",
            "vdt_days": None,
            "per_time": [_at(50, 7, 150), _at(50, 7, 150)],
        },
        {
            "nodule_id": "P1-N3",
            "kind": "stable",
            "vdt_days": None,
            "per_time": [_at(90, 4, 30), _at(90, 4, 30)],
        },
        {
            "nodule_id": "P1-N4",
            "kind": "new",
            "vdt_days": None,
            "per_time": [_at(0, 0, 0, False), _at(-80, 6, 90)],
        },
    ],
}


def _report(*xs: float) -> dict:
    return {
        "nodules": [
            {"index": i, "measurements": {"center_world_mm": [x, 0.5, 0.0]}} for i, x in enumerate(xs)
        ]
    }


def _row(status: str, i: int | None, j: int | None, vdt: float | None = None, no_growth: bool = True) -> dict:
    growth = None if i is None or j is None else {"vdt_days": vdt, "includes_no_growth": no_growth}
    return {
        "status": status,
        "prior": None if i is None else {"index": i},
        "current": None if j is None else {"index": j},
        "growth": growth,
    }


def test_detections_use_the_radius_and_the_nearest_finding():
    found = detections(_report(0.0, 1.0, 51.0, 120.0), TRUTH["nodules"], 0)
    assert found == {0: 0, 1: 2}  # N3 (4 mm) has no finding within 2 mm; N4 absent at T1


def test_score_counts_swaps_and_vdt_errors():
    reports = {"T1": _report(0.0, 50.0, 90.0), "T2": _report(0.0, 50.0, 90.0, -80.0)}
    right = {"intervals": [{"prior": "T1", "current": "T2", "nodules": [
        _row("growing", 0, 0, vdt=220.0), _row("stable", 1, 1, no_growth=True),
        _row("stable", 2, 2), _row("new", None, 3)]}]}  # fmt: skip
    result = score_followup([score_patient(right, TRUTH, reports)])
    assert result["judged_nodule_intervals"] == 2  # N1 and N2; N3 < 5 mm; N4 new
    assert result["matching"]["f1"] == 1.0
    assert math.isclose(result["vdt_median_relative_error"], 0.1)
    assert (result["stable_nodules"], result["stable_including_no_growth"]) == (1, 1)

    swapped = {"intervals": [{"prior": "T1", "current": "T2", "nodules": [
        _row("growing", 0, 1, vdt=220.0), _row("stable", 1, 0, no_growth=False)]}]}  # fmt: skip
    result = score_followup([score_patient(swapped, TRUTH, reports)])
    assert result["matching"]["f1"] == 0.0
    assert result["vdt_nodules"] == 0 and result["stable_nodules"] == 0  # only true pairs are timed

    no_change = {"intervals": [{"prior": "T1", "current": "T2", "nodules": [
        _row("stable", 0, 0, vdt=None), _row("growing", 1, 1, vdt=300.0, no_growth=False)]}]}  # fmt: skip
    result = score_followup([score_patient(no_change, TRUTH, reports)])
    assert result["vdt_median_relative_error"] == math.inf
    assert result["vdt_relative_errors"] == [None]
    assert (result["stable_nodules"], result["stable_including_no_growth"]) == (1, 0)
