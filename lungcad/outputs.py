"""The files `lungcad analyze` writes for one scan, from an `Analysis` (see docs/analyze.md).

``OUT/<scan id>/`` receives, in this order:

- ``segmentation.nii.gz``: the nodule labels (0 background, k = nodule k) in the ORIGINAL scan geometry;
- ``nodules.csv``: one flat row per nodule (the same numbers as ``report.json``);
- ``results.csv``: every scored candidate in the LUNA16 results format, so `lungdata evaluate-froc` scores
  it as is;
- for DICOM input with at least one nodule: ``seg.dcm`` (DICOM SEG) and ``sr.dcm`` (DICOM SR, TID 1500);
- ``report.html`` (`lungcad.html_report`);
- ``report.json`` LAST, atomically, with the SHA-256 of every file above. A folder whose ``report.json``
  exists and whose listed files match their checksums is a finished scan (`finished_report`); anything
  else is a partial folder and is redone. That is what makes batch runs resumable.

``report.json`` follows ``lungcad/schemas/report.schema.json`` (``REPORT_SCHEMA_VERSION``). No patient
name, ID or birth date is written anywhere here: the scan is named by its series UID (the project's scan
key), a file stem, or with ``--anonymize`` a hash of the UID (`scan_id`); acquisition fields come from a
whitelist of technical DICOM attributes (`ACQUISITION_KEYWORDS`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common import atomic
from common.cache import sha256_file as sha256
from common.io import CTVolume, write_nifti
from common.metrics import froc_io

log = logging.getLogger(__name__)

#: Bumped on any change of report.json's layout (major: a field removed or changed; minor: a field added).
REPORT_SCHEMA_VERSION = "1.1"  # 1.1: measurements.voxel_volume_mm3; volume_mm3 partial-volume corrected
SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "report.schema.json"

REPORT_JSON = "report.json"
NODULES_CSV = "nodules.csv"
RESULTS_CSV = "results.csv"
SEGMENTATION_NIFTI = "segmentation.nii.gz"
REPORT_HTML = "report.html"
DICOM_SEG = "seg.dcm"
DICOM_SR = "sr.dcm"
#: Every name this module may write into a scan folder (cleared before a scan is redone).
OUTPUT_NAMES = (REPORT_JSON, NODULES_CSV, RESULTS_CSV, SEGMENTATION_NIFTI, REPORT_HTML, DICOM_SEG, DICOM_SR)

#: Technical DICOM attributes copied into report.json's ``scan.acquisition`` (nothing that names a person,
#: an institution or a date).
ACQUISITION_KEYWORDS = (
    "Modality",
    "Manufacturer",
    "ManufacturerModelName",
    "ConvolutionKernel",
    "KVP",
    "XRayTubeCurrent",
    "SliceThickness",
    "ContrastBolusAgent",
)

#: Flat columns of nodules.csv, in order (measurement columns come from `NoduleMeasurements.to_dict()`,
#: vectors split per axis; any measurement a later version adds is appended after them).
NODULE_COLUMNS = (
    "scan_id",
    "index",
    "label",
    "source",
    "segmentation",
    "detection_score",
    "malignancy_probability",
    "center_x_mm",
    "center_y_mm",
    "center_z_mm",
    "center_voxel_i",
    "center_voxel_j",
    "center_voxel_k",
    "volume_mm3",
    "long_axis_mm",
    "short_axis_mm",
    "mean_diameter_mm",
    "max_3d_diameter_mm",
    "axial_slice",
    "mean_hu",
    "max_hu",
    "type",
    "solid_component_mm",
    "solid_volume_mm3",
    "lungrads_category",
    "lungrads_descriptor",
    "lungrads_reason",
)
# measurement vectors → their flat column names
_VECTOR_COLUMNS = {
    "center_world_mm": ("center_x_mm", "center_y_mm", "center_z_mm"),
    "center_voxel_xyz": ("center_voxel_i", "center_voxel_j", "center_voxel_k"),
}
_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]")


# ------------------------------------------------------------------------------------------------ naming


def scan_format(path: str | Path) -> str:
    """``"dicom"`` (a folder), ``"mhd"`` or ``"nifti"``; anything else is a one-line error."""
    path = Path(path)
    if path.is_dir():
        return "dicom"
    name = path.name.lower()
    if name.endswith(".mhd"):
        return "mhd"
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    raise ValueError(
        f"{path}: unsupported input; pass a DICOM series folder, an .mhd, a .nii/.nii.gz or a folder of them"
    )


def file_stem(path: str | Path) -> str:
    """The name of an .mhd / .nii / .nii.gz file without its extension."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".mhd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def scan_id(volume: CTVolume, path: str | Path, anonymize: bool = False) -> str:
    """The scan's folder name and ``seriesuid`` in every output.

    The series UID for DICOM (the project's scan key, also LUNA16's ``seriesuid``), the file stem for MHD and
    NIfTI (LUNA16 names its files by series UID). With ``anonymize``: ``anon-`` + the first 20 hex digits of
    the SHA-256 of that key — stable across runs (resume works), linkable by whoever holds the UIDs, not
    readable from the outputs. Characters other than letters, digits, ``.``, ``_`` and ``-`` become ``_``.
    """
    fmt = scan_format(path)
    key = volume.series_uid if fmt == "dicom" and volume.series_uid else file_stem(path)
    if anonymize:
        return "anon-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:20]
    return _SAFE_ID.sub("_", key) or "scan"


# ------------------------------------------------------------------------------------------------ report


def _jsonable(value: Any, where: str = "report", lenient: bool = False) -> Any:
    """numpy scalars/arrays and tuples → plain JSON types. JSON has no NaN/inf: one in the ``bundle`` block
    (an infinite operating threshold: no candidate qualifies) becomes null, anywhere else it is an error
    naming the field."""
    if isinstance(value, dict):
        return {
            str(k): _jsonable(v, f"{where}.{k}", lenient or where == "report.bundle")
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | np.ndarray):
        return [_jsonable(v, f"{where}[{i}]", lenient) for i, v in enumerate(value)]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        if lenient:
            return None
        raise ValueError(f"{where} is {value}, not a finite number; the pipeline produced an invalid value")
    return value


def acquisition(source_datasets: Sequence[Any] | None) -> dict[str, Any]:
    """The whitelisted technical attributes of the first source slice (empty without DICOM)."""
    if not source_datasets:
        return {}
    ds = source_datasets[0]
    out: dict[str, Any] = {}
    for keyword in ACQUISITION_KEYWORDS:
        value = getattr(ds, keyword, None)
        if value is None or value == "":
            continue
        if keyword in ("KVP", "XRayTubeCurrent", "SliceThickness"):
            try:
                out[keyword] = float(value)
            except (TypeError, ValueError):
                continue
        else:
            out[keyword] = str(value) if not isinstance(value, list | tuple) else "\\".join(map(str, value))
    return out


def build_report(
    analysis: Any,
    scan_id: str,
    fmt: str,
    *,
    source_datasets: Sequence[Any] | None = None,
    parameters: dict[str, Any] | None = None,
    timings_s: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The report.json document (without ``files``, which `write_outputs` adds last).

    Args:
        analysis: a `lungcad.pipeline.Analysis`.
        scan_id: `scan_id` of the scan.
        fmt: ``"dicom"``, ``"mhd"`` or ``"nifti"``.
        source_datasets: the DICOM slices (pixel data not needed), for ``scan.acquisition``.
        parameters: how the command was called (mode options, never paths that could name a patient).
        timings_s: per-step seconds; defaults to ``analysis.timings_s``.
    """
    from lungcad import DISCLAIMER
    from lungcad.bundle import package_version  # the one place that reads it (bundle.json has it too)

    volume: CTVolume = analysis.volume
    findings = list(analysis.findings)
    given = any(f.source == "given" for f in findings) or bool((parameters or {}).get("nodules_csv"))
    scores = [float(f.malignancy_probability) for f in findings]
    category = _scan_category([f.category for f in findings])
    nodules = []
    for f in findings:
        nodules.append(
            {
                "index": int(f.index),
                "label": int(f.index),
                "source": f.source,
                "segmentation": getattr(f, "segmentation", None),
                "detection_score": None if f.detection_score is None else float(f.detection_score),
                "malignancy_probability": float(f.malignancy_probability),
                "measurements": f.measurements.to_dict(),
                "category": f.category.to_dict(),
            }
        )
    candidates = analysis.candidates
    report = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "generator": {"name": "lungcad", "version": package_version()},
        "created_utc": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "disclaimer": DISCLAIMER,
        "scan": {
            "id": scan_id,
            "format": fmt,
            "shape_zyx": list(volume.shape),
            "spacing_xyz": list(volume.spacing),
            "origin_xyz": list(volume.origin),
            "direction": [float(v) for v in np.asarray(volume.direction).ravel()],
            "acquisition": acquisition(source_datasets),
        },
        "bundle": dict(analysis.bundle_info),
        "mode": "given-nodules" if given else "detection",
        "parameters": dict(parameters or {}),
        "timings_s": {k: round(float(v), 3) for k, v in (timings_s or analysis.timings_s).items()},
        "summary": {
            "n_nodules": len(findings),
            "n_candidates": 0 if candidates is None else int(len(candidates)),
            "max_malignancy_probability": max(scores) if scores else None,
            "scan_category": category.get("category"),
        },
        "scan_category": category,
        "nodules": nodules,
    }
    return _jsonable(report)


def _scan_category(categories: list[Any]) -> dict[str, Any]:
    """`lungrads.scan_category` (the highest; "1" when none) as a dict."""
    from lungcad.lungrads import scan_category

    return scan_category(categories).to_dict()


# --------------------------------------------------------------------------------------------- CSV files


def nodule_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """nodules.csv rows (dicts in `NODULE_COLUMNS` order, extras after) from a report.json document."""
    rows = []
    for nodule in report["nodules"]:
        row: dict[str, Any] = {
            "scan_id": report["scan"]["id"],
            "index": nodule["index"],
            "label": nodule["label"],
            "source": nodule["source"],
            "segmentation": nodule["segmentation"],
            "detection_score": nodule["detection_score"],
            "malignancy_probability": nodule["malignancy_probability"],
        }
        for key, value in nodule["measurements"].items():
            if key in _VECTOR_COLUMNS:
                row.update(zip(_VECTOR_COLUMNS[key], value))
            elif isinstance(value, list):
                row.update({f"{key}_{i}": v for i, v in enumerate(value)})
            else:
                row[key] = value
        category = nodule["category"]
        row["lungrads_category"] = category.get("category")
        row["lungrads_descriptor"] = category.get("descriptor")
        row["lungrads_reason"] = category.get("reason")
        rows.append(row)
    return rows


def nodules_frame(reports: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The nodules of one or more reports as one table with the `NODULE_COLUMNS` first."""
    rows = [row for report in reports for row in nodule_rows(report)]
    extra = sorted({k for row in rows for k in row} - set(NODULE_COLUMNS))
    return pd.DataFrame(rows, columns=[*NODULE_COLUMNS, *extra])


def write_nodules_csv(reports: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """nodules.csv: one row per nodule; a header only when there are none."""
    return atomic.write_csv(path, nodules_frame(reports), float_format="%.6g")


def results_frame(candidates: pd.DataFrame | None, scan_id: str) -> pd.DataFrame:
    """The scored candidates with ``seriesuid`` set to the scan id, best first."""
    if candidates is None or len(candidates) == 0:
        return pd.DataFrame(
            {c: pd.Series(dtype=object if c == "seriesuid" else float) for c in froc_io.RESULT_COLUMNS}
        )
    frame = candidates.copy()
    frame["seriesuid"] = scan_id
    frame = frame.sort_values("probability", ascending=False, kind="stable")
    return frame[list(froc_io.RESULT_COLUMNS)].reset_index(drop=True)


def write_results_csv(frame: pd.DataFrame, path: str | Path) -> Path:
    """A LUNA16 results CSV (``seriesuid,coordX,coordY,coordZ,probability``) scorable as is."""
    return Path(froc_io.write_results_csv(frame, path))


# ------------------------------------------------------------------------------------------------ images


def write_segmentation(volume: CTVolume, labels: np.ndarray, path: str | Path) -> Path:
    """The label volume as NIfTI on the scan's own grid (origin, spacing, direction of ``volume``)."""
    labels = np.asarray(labels)
    if labels.shape != volume.shape:
        raise ValueError(f"labels of shape {labels.shape} are not on the scan's grid {volume.shape}")
    dtype = np.uint8 if labels.size == 0 or labels.max() <= np.iinfo(np.uint8).max else np.uint16
    return write_nifti(volume.with_array(labels.astype(dtype, copy=False)), path)


# ------------------------------------------------------------------------------------------ report.json


def report_text(report: dict[str, Any]) -> str:
    """report.json's text: sorted keys, one-space indent, no NaN (stable bytes for the same report)."""
    return json.dumps(report, indent=1, sort_keys=True, allow_nan=False) + "\n"


def finished_report(folder: str | Path) -> dict[str, Any] | None:
    """The report of a finished scan folder, or None when the folder is absent, partial or damaged.

    Finished: report.json parses, has a ``schema_version`` and every file it lists is there with its SHA-256.
    """
    path = Path(folder) / REPORT_JSON
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or "schema_version" not in report:
        return None
    for name, entry in report.get("files", {}).items():
        target = Path(folder) / name
        if not target.is_file() or sha256(target) != entry.get("sha256"):
            return None
    return report


def clear_outputs(folder: str | Path) -> None:
    """Remove what a previous (partial) run left: our output names and atomic-write leftovers only."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    (folder / REPORT_JSON).unlink(missing_ok=True)  # first: the folder is unfinished from here on
    for name in OUTPUT_NAMES:
        (folder / name).unlink(missing_ok=True)
    for leftover in folder.glob(f".*{atomic.TMP_MARKER}*"):
        leftover.unlink(missing_ok=True)


def write_outputs(
    analysis: Any,
    folder: str | Path,
    scan_id: str,
    fmt: str,
    *,
    source_datasets: Sequence[Any] | None = None,
    anonymize: bool = False,
    parameters: dict[str, Any] | None = None,
    timings_s: dict[str, float] | None = None,
) -> dict[str, Path]:
    """Write every output of one scan into ``folder``, report.json last; returns name → path.

    Args:
        analysis: the `lungcad.pipeline.Analysis` of the scan.
        folder: ``OUT/<scan id>/`` (created; earlier outputs in it are replaced).
        scan_id, fmt: see `scan_id` and `scan_format`.
        source_datasets: the DICOM slices of the series (DICOM input only): SEG and SR are written from them.
        anonymize: strip the patient module from the DICOM SEG/SR too.
        parameters: recorded in report.json.
        timings_s: seconds per step so far, recorded in report.json; ``write`` (every file before report.json)
            is added to it and to the report.
    """
    started = time.perf_counter()
    folder = Path(folder)
    clear_outputs(folder)
    folder.mkdir(parents=True, exist_ok=True)
    report = build_report(
        analysis, scan_id, fmt, source_datasets=source_datasets, parameters=parameters, timings_s=timings_s
    )
    paths: dict[str, Path] = {}
    paths[SEGMENTATION_NIFTI] = write_segmentation(
        analysis.volume, analysis.labels, folder / SEGMENTATION_NIFTI
    )
    paths[NODULES_CSV] = write_nodules_csv([report], folder / NODULES_CSV)
    paths[RESULTS_CSV] = write_results_csv(results_frame(analysis.candidates, scan_id), folder / RESULTS_CSV)
    if fmt == "dicom" and source_datasets and not report["nodules"]:
        log.info("no nodules: no DICOM SEG/SR (a SEG needs at least one segment, the SR references it)")
    elif fmt == "dicom" and source_datasets:
        from lungcad.dicom_output import write_seg, write_sr

        paths[DICOM_SEG] = write_seg(
            source_datasets, analysis.labels, report, folder / DICOM_SEG, anonymize=anonymize
        )
        paths[DICOM_SR] = write_sr(
            source_datasets, paths[DICOM_SEG], report, folder / DICOM_SR, anonymize=anonymize
        )
    from lungcad.html_report import write_report_html

    paths[REPORT_HTML] = Path(
        write_report_html(report, analysis.volume, analysis.labels, folder / REPORT_HTML)
    )
    if timings_s is not None:
        timings_s["write"] = time.perf_counter() - started  # the files before report.json
    report["timings_s"]["write"] = round(time.perf_counter() - started, 3)
    report["files"] = {
        name: {"sha256": sha256(path), "bytes": path.stat().st_size} for name, path in sorted(paths.items())
    }
    paths[REPORT_JSON] = atomic.write_text(folder / REPORT_JSON, report_text(report), fsync=True)
    return paths


def load_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of report.json."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
