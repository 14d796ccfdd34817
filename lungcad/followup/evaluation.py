"""Score a `lungcad followup` document against the truth manifest of a longitudinal phantom patient.

Issue 22's end-to-end check with a trained bundle: the nodules are those the analyses found, not the true
lists, so the score is restricted to what matching can be judged on.

* A finding *detects* a true nodule when its centre lies within the nodule's radius at that time point (the
  LUNA16 hit rule); each true nodule takes its nearest such finding.
* The judged nodules of an interval: present at both times, diameter ≥ `min_diameter_mm` at either time,
  and detected at both. Their (prior finding, current finding) pairs are the truth; the predicted pairs are
  the document's matched rows that involve a finding of a judged nodule (a judged finding matched to a false
  positive counts against precision). Matching F1 over all intervals.
* VDT: judged growing nodules whose true volume changed by ≥ `min_volume_change` (fraction) and that were
  matched to each other; relative error |VDT − true VDT| / true VDT (a reported "no change" is an infinite
  error).
* Stable: judged stable nodules matched to each other; whether their VDT interval includes "no growth".
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lungcad.followup.matching import matching_f1

UNMATCHED = ("new", "resolved", "unassessed")


def _centres(report: dict[str, Any]) -> dict[int, np.ndarray]:
    return {
        int(n["index"]): np.asarray(n["measurements"]["center_world_mm"], dtype=float)
        for n in report.get("nodules", [])
    }


def detections(report: dict[str, Any], nodules: list[dict[str, Any]], time_index: int) -> dict[int, int]:
    """True nodule position in `nodules` → index of its nearest finding within the nodule's radius."""
    centres = _centres(report)
    found: dict[int, int] = {}
    for k, nodule in enumerate(nodules):
        at = nodule["per_time"][time_index]
        if not at.get("present"):
            continue
        xyz, radius = np.asarray(at["world_xyz"], dtype=float), 0.5 * float(at["diameter_mm"])
        near = [(float(np.linalg.norm(c - xyz)), i) for i, c in centres.items()]
        near = [(d, i) for d, i in near if d <= radius]
        if near:
            found[k] = min(near)[1]
    return found


def score_patient(
    document: dict[str, Any],
    truth: dict[str, Any],
    reports: dict[str, dict[str, Any]],
    *,
    min_diameter_mm: float = 5.0,
    min_volume_change: float = 0.25,
) -> dict[str, list]:
    """Per-interval pairs and errors of one patient (``score_followup`` pools them).

    Args:
        document: followup.json of the patient.
        truth: the patient's entry of the truth manifest (`common.synth.followup.read_truth`).
        reports: scan id → that scan's report.json.
    """
    time_of = {s["uid"]: k for k, s in enumerate(truth["scans"])}
    nodules = truth["nodules"]
    out: dict[str, list] = {"true": [], "predicted": [], "vdt": [], "stable": [], "judged": []}
    for interval in document["intervals"]:
        a, b = time_of[interval["prior"]], time_of[interval["current"]]
        tag = (truth["patient_id"], interval["prior"], interval["current"])
        found_a = detections(reports[interval["prior"]], nodules, a)
        found_b = detections(reports[interval["current"]], nodules, b)
        judged = {}
        for k, nodule in enumerate(nodules):
            pa, pb = nodule["per_time"][a], nodule["per_time"][b]
            if not (pa.get("present") and pb.get("present")) or k not in found_a or k not in found_b:
                continue
            if max(float(pa["diameter_mm"]), float(pb["diameter_mm"])) < min_diameter_mm:
                continue
            judged[k] = (found_a[k], found_b[k])
        out["judged"] += [(tag, nodules[k]["nodule_id"]) for k in judged]
        out["true"] += [(tag, i, j) for i, j in judged.values()]
        prior_judged = {i for i, _ in judged.values()}
        current_judged = {j for _, j in judged.values()}
        rows = {}
        for row in interval["nodules"]:
            if row["status"] in UNMATCHED or row["prior"] is None or row["current"] is None:
                continue
            i, j = int(row["prior"]["index"]), int(row["current"]["index"])
            rows[(i, j)] = row
            if i in prior_judged or j in current_judged:
                out["predicted"].append((tag, i, j))
        for k, pair in judged.items():
            row, nodule = rows.get(pair), nodules[k]
            if row is None or row.get("growth") is None:
                continue
            growth = row["growth"]
            pa, pb = nodule["per_time"][a], nodule["per_time"][b]
            if nodule["kind"] == "growing" and pb["volume_mm3"] / pa["volume_mm3"] >= 1.0 + min_volume_change:
                vdt, true_vdt = growth.get("vdt_days"), float(nodule["vdt_days"])
                error = float("inf") if vdt is None else abs(float(vdt) - true_vdt) / true_vdt
                out["vdt"].append((tag, nodule["nodule_id"], error))
            if nodule["kind"] == "stable":
                out["stable"].append((tag, nodule["nodule_id"], bool(growth["includes_no_growth"])))
    return out


def score_followup(per_patient: list[dict[str, list]]) -> dict[str, Any]:
    """Pool `score_patient` results: matching F1, VDT median relative error, stable intervals' coverage."""
    pooled: dict[str, list] = {"true": [], "predicted": [], "vdt": [], "stable": [], "judged": []}
    for part in per_patient:
        for key in pooled:
            pooled[key] += part[key]
    f1 = matching_f1(pooled["predicted"], pooled["true"])
    vdt = [e for *_, e in pooled["vdt"]]
    stable = [ok for *_, ok in pooled["stable"]]
    return {
        "judged_nodule_intervals": len(pooled["judged"]),
        "matching": f1,
        "vdt_nodules": len(vdt),
        "vdt_median_relative_error": float(np.median(vdt)) if vdt else None,
        "vdt_relative_errors": [None if not np.isfinite(e) else round(float(e), 4) for e in vdt],
        "stable_nodules": len(stable),
        "stable_including_no_growth": int(sum(stable)),
    }
