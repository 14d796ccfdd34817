"""followup.json / followup.csv / followup.html from the assessed intervals (`lungcad.followup.track`).

``followup.json`` follows ``lungcad/schemas/followup.schema.json`` (`FOLLOWUP_SCHEMA_VERSION`). Like
report.json it names scans by their analyze scan id and holds no patient name, ID or birth date; scan
dates are there because growth rates need them. ``followup.html`` is one self-contained file built from
`lungcad.html_report`'s pieces (its Content-Security-Policy page, crops, views): per interval and nodule the
prior axial crop beside the current crop resampled onto the prior grid through the registration (contours
of each scan's own segmentation), a size-over-time plot per track, and the methods.
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import Any

from common import atomic
from common.atomic import csv_text
from lungcad import DISCLAIMER
from lungcad.followup import growth as growth_mod
from lungcad.followup import registration as registration_mod
from lungcad.followup.matching import GATE_RULE
from lungcad.followup.track import IntervalResult, TimePoint, assign_tracks

FOLLOWUP_SCHEMA_VERSION = "1.1"
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "followup.schema.json"
FOLLOWUP_JSON = "followup.json"
FOLLOWUP_CSV = "followup.csv"
FOLLOWUP_HTML = "followup.html"
CROP_MM = 40.0

CSV_COLUMNS = (
    "prior_scan",
    "current_scan",
    "interval_days",
    "registration_converged",
    "track",
    "status",
    "prior_index",
    "current_index",
    "distance_mm",
    "gate_mm",
    "prior_x_mm",
    "prior_y_mm",
    "prior_z_mm",
    "current_x_mm",
    "current_y_mm",
    "current_z_mm",
    "prior_volume_mm3",
    "current_volume_mm3",
    "prior_mean_diameter_mm",
    "current_mean_diameter_mm",
    "volume_change_percent",
    "diameter_change_mm",
    "vdt_days",
    "vdt_low_days",
    "vdt_high_days",
    "includes_no_growth",
    "type",
    "lungrads_category",
    "lungrads_reason",
    "volume_source",
    "growth_prior_volume_mm3",
    "growth_current_volume_mm3",
)


def _version() -> str:
    from lungcad.bundle import package_version

    return package_version()


def methods() -> dict[str, Any]:
    """How every number was made, with the sources (also in docs/followup.md)."""
    increase, months = growth_mod.growth_rule()
    return {
        "registration": (
            "SimpleITK: current registered to prior, lung-mask centroid initialisation, Euler3D then affine, "
            "mean squares on the lung window inside the prior lungs, multi-resolution; rigid kept when the "
            "affine stage is worse or implausible"
        ),
        "matching": f"optimal assignment (Hungarian) on registered centre distance, gate {GATE_RULE}",
        "volume_doubling_time": "VDT = interval_days * ln 2 / ln(V_current / V_prior)",
        "growth_volumes": (
            "nodules the analyses segmented with the HU fallback at both times are segmented again with one "
            "cut (the anatomy common to both scans beyond the opening removed from both; "
            "lungcad.followup.consistency); otherwise the analyses' partial-volume volumes"
        ),
        "vdt_interval": {
            "relative_limits_of_agreement": growth_mod.REPEATABILITY_RELATIVE_LOA,
            "log_ratio_limit": round(growth_mod.REPEATABILITY_LOG_LIMIT, 6),
            "source": growth_mod.REPEATABILITY_SOURCE,
        },
        "growth_rule": f"Lung-RADS v2022: mean diameter increase > {increase:g} mm within {months:g} months",
        "lungrads": "American College of Radiology, Lung-RADS v2022 (2022); follow-up rules in "
        "lungcad/data/lungrads_v2022.yaml",
    }


def build_document(
    results: list[IntervalResult], points: list[TimePoint], patient_check: dict[str, Any]
) -> dict[str, Any]:
    """The followup.json document."""
    tracks = assign_tracks(results)
    ordered = sorted(points, key=lambda p: p.date)
    flags = [flag for r in results for flag in r.flags]
    intervals = []
    for r in results:
        nodules = []
        for row in r.rows:
            p, c = row["prior"], row["current"]
            key = (r.current.scan_id, c["index"]) if c is not None else (r.prior.scan_id, p["index"])
            nodules.append(
                {
                    "track": tracks[key],
                    "status": row["status"],
                    "prior": p,
                    "current": c,
                    "distance_mm": _round(row.get("distance_mm")),
                    "gate_mm": _round(row.get("gate_mm")),
                    "growth": row.get("growth"),
                    "lungrads": row.get("lungrads"),
                }
            )
        intervals.append(
            {
                "prior": r.prior.scan_id,
                "current": r.current.scan_id,
                "interval_days": (r.current.date - r.prior.date).days,
                "registration": {**r.registration.to_dict(), "transform_file": r.transform_file},
                "flags": list(r.flags),
                "scan_category": r.scan_category,
                "nodules": nodules,
            }
        )
    track_rows: dict[str, list[dict[str, Any]]] = {}
    for point in ordered:
        for nodule in point.nodules:
            track = tracks.get((point.scan_id, int(nodule["index"])))
            if track is None:
                continue
            m = nodule["measurements"]
            track_rows.setdefault(track, []).append(
                {
                    "scan": point.scan_id,
                    "date": point.date.isoformat(),
                    "index": int(nodule["index"]),
                    "volume_mm3": float(m["volume_mm3"]),
                    "mean_diameter_mm": float(m["mean_diameter_mm"]),
                }
            )
    return {
        "schema_version": FOLLOWUP_SCHEMA_VERSION,
        "generator": {"name": "lungcad", "version": _version()},
        "created_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "disclaimer": DISCLAIMER,
        "patient_check": patient_check,
        "scans": [
            {
                "id": p.scan_id,
                "date": p.date.isoformat(),
                "n_nodules": len(p.nodules),
                "scan_category": (p.report.get("scan_category") or {}).get("category"),
            }
            for p in ordered
        ],
        "methods": methods(),
        "flags": flags,
        "intervals": intervals,
        "tracks": [
            {"track": t, "points": rows}
            for t, rows in sorted(track_rows.items(), key=lambda kv: int(kv[0][1:]))
        ],
    }


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(float(value), digits)


# ------------------------------------------------------------------------------------------------ CSV
def csv_rows(document: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    for interval in document["intervals"]:
        for n in interval["nodules"]:
            p, c, g, cat = n["prior"] or {}, n["current"] or {}, n["growth"] or {}, n["lungrads"] or {}
            lo, hi = (g.get("vdt_interval_days") or [None, None])[:2]
            values = (
                interval["prior"],
                interval["current"],
                interval["interval_days"],
                interval["registration"]["converged"],
                n["track"],
                n["status"],
                p.get("index"),
                c.get("index"),
                n["distance_mm"],
                n["gate_mm"],
                *(p.get("center_world_mm") or [None] * 3),
                *(c.get("center_world_mm") or [None] * 3),
                p.get("volume_mm3"),
                c.get("volume_mm3"),
                p.get("mean_diameter_mm"),
                c.get("mean_diameter_mm"),
                g.get("volume_change_percent"),
                g.get("diameter_change_mm"),
                g.get("vdt_days"),
                lo,
                hi,
                g.get("includes_no_growth"),
                c.get("type") or p.get("type"),
                cat.get("category"),
                cat.get("reason"),
                g.get("volume_source"),
                g.get("prior_volume_mm3"),
                g.get("current_volume_mm3"),
            )
            rows.append(tuple("" if v is None else str(v) for v in values))
    return rows


def write_csv(document: dict[str, Any], path: Path) -> Path:
    atomic.write_text(path, csv_text(CSV_COLUMNS, csv_rows(document)))
    return path


# ------------------------------------------------------------------------------------------------ HTML
def _size_plot(document: dict[str, Any]) -> str | None:
    """Volume (log) and mean diameter over time, one line per track, as a PNG data URI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lungcad.html_report import figure_data_uri

    tracks = [t for t in document["tracks"] if t["points"]]
    if not tracks:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.2))
    for track in tracks:
        dates = [dt.date.fromisoformat(p["date"]) for p in track["points"]]
        axes[0].plot(dates, [p["volume_mm3"] for p in track["points"]], marker="o", label=track["track"])
        axes[1].plot(
            dates, [p["mean_diameter_mm"] for p in track["points"]], marker="o", label=track["track"]
        )
    axes[0].set_yscale("log")
    axes[0].set_ylabel("volume (mm³, log)")
    axes[1].set_ylabel("mean diameter (mm)")
    axes[1].legend(fontsize=7, ncol=2)
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    uri = figure_data_uri(fig, dpi=80)
    plt.close(fig)
    return uri


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "∞" if math.isinf(value) else f"{value:.{digits}f}"
    return str(value)


def write_html(document: dict[str, Any], results: list[IntervalResult], path: Path) -> Path:
    """One self-contained page built from `lungcad.html_report`'s pieces (see the module docstring)."""
    from lungcad.html_report import crop_data_uri, esc, page_html, view_html

    parts = [
        "<h1>Follow-up</h1>",
        "<p>Scans: "
        + ", ".join(f"{esc(s['id'])} ({s['date']}, {s['n_nodules']} nodules)" for s in document["scans"])
        + "</p>",
    ]
    for flag in document["flags"]:
        parts.append(f"<p class='flag' style='color:#a00;font-weight:bold'>⚠ {esc(flag)}</p>")
    plot = _size_plot(document)
    if plot:
        parts.append(f"<h2>Size over time</h2><img alt='size over time' src='{plot}'>")
    for interval, result in zip(document["intervals"], results):
        reg = interval["registration"]
        parts.append(
            f"<h2>{esc(interval['prior'])} → {esc(interval['current'])} ({interval['interval_days']} days)</h2>"
            f"<p>Registration: {'converged' if reg['converged'] else '<b>NOT converged</b>'}, lung Dice "
            f"{reg['lung_dice_before']:.3f} → {reg['lung_dice_after']:.3f}, rotation "
            f"{reg['parameters']['rotation_deg']:.1f}°, {reg['seconds']:.1f} s. Scan category (follow-up): "
            f"<b>{esc(interval['scan_category']['category'])}</b> — {esc(interval['scan_category']['reason'])}</p>"
        )
        parts.append(
            "<table class='followup'><thead><tr><th>track</th><th>status</th><th>prior Ø / V</th>"
            "<th>current Ø / V</th><th>ΔV %</th><th>VDT (95 % interval), days</th><th>Lung-RADS</th></tr>"
            "</thead><tbody>"
        )
        for n in interval["nodules"]:
            p, c, g, cat = n["prior"] or {}, n["current"] or {}, n["growth"] or {}, n["lungrads"] or {}
            lo, hi = (g.get("vdt_interval_days") or [None, None])[:2]
            vdt = "–"
            if g:
                vdt = f"{_fmt(g.get('vdt_days'), 0)} ({_fmt(lo, 0)}, {'∞' if hi is None else _fmt(hi, 0)})"
            parts.append(
                f"<tr><td>{n['track']}</td><td>{esc(n['status'])}</td>"
                f"<td>{_fmt(p.get('mean_diameter_mm'))} mm / {_fmt(p.get('volume_mm3'), 0)} mm³</td>"
                f"<td>{_fmt(c.get('mean_diameter_mm'))} mm / {_fmt(c.get('volume_mm3'), 0)} mm³</td>"
                f"<td>{_fmt(g.get('volume_change_percent'))}</td><td>{vdt}</td>"
                f"<td>{esc(cat.get('category', '–'))}</td></tr>"
            )
        parts.append("</tbody></table>")
        prior, current = result.prior, result.current
        registered = prior.volume.with_array(
            registration_mod.resample_to_prior(current.volume, prior.volume, result.registration)
        )
        registered_labels = None
        if current.labels is not None:
            registered_labels = registration_mod.resample_labels_to_prior(
                current.labels, current.volume, prior.volume, result.registration
            )
        for n in interval["nodules"]:
            p, c = n["prior"] or {}, n["current"] or {}
            centre = p.get("center_world_mm") or c.get("center_in_prior_mm")
            if centre is None:
                continue
            size = max(
                CROP_MM, 1.5 * max(p.get("max_3d_diameter_mm") or 0.0, c.get("max_3d_diameter_mm") or 0.0)
            )
            left = crop_data_uri(prior.volume, prior.labels, centre, "axial", p.get("index"), size_mm=size)
            right = crop_data_uri(
                registered, registered_labels, centre, "axial", c.get("index"), size_mm=size
            )
            parts.append(
                f"<section class='pair'><h3>{n['track']} — {esc(n['status'])}</h3>"
                "<div style='display:flex;gap:16px;flex-wrap:wrap'>"
                + view_html(left, "axial", f"prior {prior.date}")
                + view_html(right, "axial", f"current {current.date}, registered to the prior")
                + "</div></section>"
            )
    parts.append(
        "<h2>Methods</h2><ul>"
        + "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in document["methods"].items())
        + "</ul>"
    )
    parts.append("<script>document.body.dataset.ready = '1';</script>")
    atomic.write_text(path, page_html("lungcad follow-up", "\n".join(parts)))
    return path
