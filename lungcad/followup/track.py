"""A patient's time points → the follow-up document (followup.json's content).

Input per time point (`TimePoint`): the scan id, its date, its `lungcad analyze` report (report.json, the
contract's layout) and the CT itself (registration needs the images). Consecutive time points, in date
order, form intervals; per interval the current scan is registered to the prior
(`lungcad.followup.registration`), the nodules are matched (`matching`), and every matched nodule gets its
growth (`growth`; from one joint cut of both scans where both analyses used the HU fallback, `consistency`) and every current nodule its Lung-RADS v2022 follow-up category
(`lungcad.lungrads.followup_category`). Nodules are chained into tracks ("N1", "N2", …) across intervals.

Refusals and flags (never a silent match):
* fewer than two time points, two time points on the same date, or a current scan dated before its
  prior: ValueError naming the scans;
* registration that did not converge (`RegistrationResult.converged` False): the interval is *flagged*,
  no nodule is matched in it (every nodule gets status "unassessed") and the document's ``flags`` say why.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.io import CTVolume
from lungcad.followup import growth as growth_mod
from lungcad.followup.consistency import JointSegmentation, joint_fallback
from lungcad.followup.matching import GATE_RULE, match_nodules
from lungcad.followup.registration import RegistrationResult, register
from lungcad.lungrads import LungRADSCategory, followup_category, scan_category, stepped_category

log = logging.getLogger(__name__)

DAYS_PER_MONTH = 365.25 / 12.0


@dataclass
class TimePoint:
    """One scan of the patient with its analysis."""

    scan_id: str
    date: dt.date
    report: dict[str, Any]
    volume: CTVolume
    labels: np.ndarray | None = None  # the analysis' segmentation on the scan grid (for the HTML crops)
    source: str = ""  # where the analysis came from (for the log; never a path in the outputs)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def nodules(self) -> list[dict[str, Any]]:
        return list(self.report.get("nodules", []))


def order_time_points(points: list[TimePoint], *, keep_order: bool = False) -> list[TimePoint]:
    """Date order; with `keep_order` the given order must already be it (PRIOR, CURRENT on the command line).

    Raises:
        ValueError: fewer than two scans, equal dates, or (with `keep_order`) a current scan dated before
            its prior.
    """
    if len(points) < 2:
        raise ValueError(f"a follow-up needs at least two scans, got {len(points)}")
    if keep_order:
        for prior, current in zip(points, points[1:]):
            if current.date < prior.date:
                raise ValueError(
                    f"the current scan {current.scan_id} ({current.date}) is dated before the prior "
                    f"{prior.scan_id} ({prior.date}); swap PRIOR and CURRENT or fix the dates"
                )
        ordered = list(points)
    else:
        ordered = sorted(points, key=lambda p: p.date)
    for prior, current in zip(ordered, ordered[1:]):
        if current.date == prior.date:
            raise ValueError(
                f"scans {prior.scan_id} and {current.scan_id} have the same date {current.date}; a growth "
                "rate needs time between them (give the right dates)"
            )
    return ordered


def _nodule_view(nodule: dict[str, Any]) -> dict[str, Any]:
    m = nodule["measurements"]
    return {
        "index": int(nodule["index"]),
        "center_world_mm": [round(float(v), 3) for v in m["center_world_mm"]],
        "volume_mm3": round(float(m["volume_mm3"]), 3),
        "mean_diameter_mm": float(m["mean_diameter_mm"]),
        "max_3d_diameter_mm": round(float(m.get("max_3d_diameter_mm", m["mean_diameter_mm"])), 3),
        "type": str(m["type"]),
        "solid_component_mm": m.get("solid_component_mm"),
        "category": (nodule.get("category") or {}).get("category"),
    }


def _category(entry: dict[str, Any]) -> LungRADSCategory:
    return LungRADSCategory(entry["category"], entry["descriptor"], entry["management"], entry["reason"])


@dataclass
class IntervalResult:
    """One prior → current interval: the registration and the per-nodule rows."""

    prior: TimePoint
    current: TimePoint
    registration: RegistrationResult
    rows: list[dict[str, Any]]
    flags: list[str]
    scan_category: dict[str, Any]
    transform_file: str | None = None


def assess_interval(
    prior: TimePoint,
    current: TimePoint,
    registration: RegistrationResult,
    prior_categories: dict[int, str] | None = None,
) -> IntervalResult:
    """Match, measure growth and categorise the nodules of one interval.

    Args:
        prior_categories: the prior nodules' categories by index when the prior was itself a follow-up
            (chains of three scans); default the prior report's baseline categories.
    """
    days = float((current.date - prior.date).days)
    priors = [_nodule_view(n) for n in prior.nodules]
    currents = [_nodule_view(n) for n in current.nodules]
    if prior_categories:
        for view in priors:
            view["category"] = prior_categories.get(view["index"], view["category"])
    mapped = (
        registration.current_to_prior(np.array([c["center_world_mm"] for c in currents]))
        if currents
        else np.zeros((0, 3))
    )
    for view, point in zip(currents, mapped):
        view["center_in_prior_mm"] = [round(float(v), 3) for v in point]
    flags: list[str] = []
    rows: list[dict[str, Any]] = []
    categories: list[LungRADSCategory] = []
    if not registration.converged:
        flags.append(
            f"registration of {current.scan_id} to {prior.scan_id} did not converge "
            f"({'; '.join(registration.problems)}); nodules were not matched"
        )
        for view in priors:
            rows.append({"status": "unassessed", "prior": view, "current": None})
        for view in currents:
            rows.append({"status": "unassessed", "prior": None, "current": view})
            categories.append(_category(_by_index(current, view["index"])["category"]))
        return IntervalResult(prior, current, registration, rows, flags, _scan_cat(categories, flags))
    matches = match_nodules(
        np.array([p["center_world_mm"] for p in priors]).reshape(-1, 3),
        [p["mean_diameter_mm"] for p in priors],
        mapped,
        [c["mean_diameter_mm"] for c in currents],
    )
    for match in matches:
        p = priors[match.prior_index] if match.prior_index is not None else None
        c = currents[match.current_index] if match.current_index is not None else None
        row: dict[str, Any] = {
            "prior": p,
            "current": c,
            "distance_mm": match.distance_mm,
            "gate_mm": match.gate_mm,
        }
        if match.status == "resolved":
            row.update(status="resolved", growth=None, lungrads=None)
        elif match.status == "new":
            category = followup_category(
                c["type"], c["mean_diameter_mm"], c["solid_component_mm"], prior_mean_diameter_mm=None
            )
            row.update(status="new", growth=None, lungrads=category.to_dict())
            categories.append(category)
        else:
            sizes, joint = _growth_sizes(prior, current, registration, p, c)
            change = growth_mod.interval_growth(*sizes, days)
            category = followup_category(
                c["type"],
                c["mean_diameter_mm"],
                c["solid_component_mm"],
                prior_mean_diameter_mm=p["mean_diameter_mm"],
                prior_solid_component_mm=p["solid_component_mm"],
                interval_months=round(days / DAYS_PER_MONTH, 1),
            )
            if change.status == "stable":
                category = stepped_category(category, prior_category=p["category"], interval_days=days)
            growth = change.to_dict()
            growth["volume_source"] = "analyses" if joint is None else "joint-segmentation"
            if joint is not None:
                growth["joint_segmentation"] = {
                    "opening_radius_mm": round(joint.opening_radius_mm, 3),
                    "cut_mm3": round(joint.cut_mm3, 3),
                    "attached": joint.attached,
                }
            row.update(status=change.status, growth=growth, lungrads=category.to_dict())
            categories.append(category)
        rows.append(row)
    return IntervalResult(prior, current, registration, rows, flags, _scan_cat(categories, flags))


#: How the analysis made a mask that `_growth_sizes` re-segments jointly (the HU fallback's).
JOINT_SEGMENTATION = "hu-threshold"


def _growth_sizes(
    prior: TimePoint,
    current: TimePoint,
    registration: RegistrationResult,
    p: dict[str, Any],
    c: dict[str, Any],
) -> tuple[tuple[float, float, float, float], JointSegmentation | None]:
    """(prior volume, current volume, prior mean diameter, current mean diameter) for the growth.

    Where the analyses segmented the nodule at both times with the HU fallback, both are segmented again
    with one cut (`lungcad.followup.consistency.joint_fallback`, centred on the prior centre, the larger
    mean diameter) and measured by `lungcad.measure.measure_nodule`; otherwise (GLANCE masks, a sphere, or
    the joint segmentation finding nothing) the analyses' own measurements.
    """
    from lungcad.measure import measure_nodule

    own = (p["volume_mm3"], c["volume_mm3"], p["mean_diameter_mm"], c["mean_diameter_mm"])
    how = {
        _by_index(prior, p["index"]).get("segmentation"),
        _by_index(current, c["index"]).get("segmentation"),
    }
    if how != {JOINT_SEGMENTATION}:
        return own, None
    joint = joint_fallback(
        prior.volume,
        current.volume,
        np.asarray(p["center_world_mm"], dtype=np.float64),
        max(float(p["mean_diameter_mm"]), float(c["mean_diameter_mm"])),
        registration.prior_to_current,
        registration.current_to_prior,
    )
    if joint is None:
        return own, None
    a, b = measure_nodule(prior.volume, joint.prior_mask), measure_nodule(current.volume, joint.current_mask)
    return (a.volume_mm3, b.volume_mm3, a.mean_diameter_mm, b.mean_diameter_mm), joint


def _by_index(point: TimePoint, index: int) -> dict[str, Any]:
    return next(n for n in point.nodules if int(n["index"]) == index)


def _scan_cat(categories: list[LungRADSCategory], flags: list[str]) -> dict[str, Any]:
    out = scan_category(categories).to_dict()
    if flags:
        out["reason"] += " (baseline categories only: the interval is flagged)"
    return out


def follow_up(
    points: list[TimePoint], out: Path | None = None, *, keep_order: bool = False
) -> list[IntervalResult]:
    """Register, match and assess every consecutive interval of `points` (see the module docstring).

    With `out`, each interval's transform is saved there as ``registration_<prior>_to_<current>.tfm``.
    """
    ordered = order_time_points(points, keep_order=keep_order)
    results: list[IntervalResult] = []
    carried: dict[int, str] | None = None
    for prior, current in zip(ordered, ordered[1:]):
        log.info("registering %s to %s", current.scan_id, prior.scan_id)
        registration = register(prior.volume, current.volume)
        result = assess_interval(prior, current, registration, carried)
        if out is not None:
            name = f"registration_{prior.scan_id}_to_{current.scan_id}.tfm"
            registration.save(Path(out) / name)
            result.transform_file = name
        carried = {
            row["current"]["index"]: row["lungrads"]["category"]
            for row in result.rows
            if row["current"] is not None and row.get("lungrads")
        }
        results.append(result)
    return results


def assign_tracks(results: list[IntervalResult]) -> dict[tuple[str, int], str]:
    """Track ids ("N1", …) per (scan id, nodule index), chained through the matches of every interval."""
    tracks: dict[tuple[str, int], str] = {}
    counter = 0

    def new_track() -> str:
        nonlocal counter
        counter += 1
        return f"N{counter}"

    for result in results:
        for row in result.rows:
            p, c = row["prior"], row["current"]
            if p is not None and (result.prior.scan_id, p["index"]) not in tracks:
                tracks[(result.prior.scan_id, p["index"])] = new_track()
            if c is not None:
                if p is not None and row["status"] != "unassessed":
                    tracks[(result.current.scan_id, c["index"])] = tracks[(result.prior.scan_id, p["index"])]
                else:
                    tracks[(result.current.scan_id, c["index"])] = new_track()
    return tracks


__all__ = ["GATE_RULE", "IntervalResult", "TimePoint", "assess_interval", "assign_tracks", "follow_up"]
