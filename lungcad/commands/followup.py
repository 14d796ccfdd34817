"""`lungcad followup PRIOR CURRENT --out OUT`: which nodules are new, which grew and how fast, which resolved.

Two forms:

* ``lungcad followup PRIOR CURRENT --out OUT [--bundle B]`` — PRIOR and CURRENT are each a scan (DICOM
  series folder, ``.mhd``, ``.nii``/``.nii.gz``) or a `lungcad analyze` output folder (``report.json`` +
  ``segmentation.nii.gz``). A scan is analysed with the bundle (`lungcad.commands.analyze.Analyzer`, into
  ``OUT/analyses/<scan id>/``; a finished analysis there is reused). An analyze folder carries no image,
  and registration needs one: give the scan with ``--prior-scan`` / ``--current-scan``.
* ``lungcad followup --dataset spatiotemporal --root R --patient ID --out OUT [--bundle B] [--analyses A]``
  — all of the patient's time points in date order (dates from the patient table's ``scan_date`` column,
  default ``R/patients.csv``; `lungdata synth followup` writes one), each analysed as above unless
  ``A/<scan id>/report.json`` exists.

Dates: ``--prior-date`` / ``--current-date`` (YYYY-MM-DD), else the DICOM StudyDate (SeriesDate,
AcquisitionDate), else the patient table. Same patient: DICOM PatientID of both series, or
``--patient-table`` (seriesuid, patient_id) for the pair form; the identifiers are compared in memory and
never written. Different patients, a current scan dated before its prior, or equal dates are one-line
errors (exit 2). A registration that did not converge is a *flagged* result: its interval's nodules are
"unassessed", followup.json's ``flags`` say why, and the command exits with status 3.

Outputs in OUT: ``followup.json`` (schema ``lungcad/schemas/followup.schema.json``), ``followup.csv``,
``followup.html``, one ``registration_<prior>_to_<current>.tfm`` per interval. See docs/followup.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common import atomic
from common.io import read_volume
from lungcad import outputs
from lungcad.followup.track import TimePoint, follow_up

log = logging.getLogger(__name__)

EXIT_FLAGGED = 3
DICOM_DATE_KEYWORDS = ("StudyDate", "SeriesDate", "AcquisitionDate")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``followup`` sub-command."""
    parser = subparsers.add_parser(
        "followup",
        help="compare a patient's prior and current scans: new, resolved, growing nodules, VDT, Lung-RADS",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("prior", type=Path, nargs="?", help="prior scan or `lungcad analyze` output folder")
    parser.add_argument(
        "current", type=Path, nargs="?", help="current scan or `lungcad analyze` output folder"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--bundle", type=Path, default=None, help="model bundle, to analyze scans without an analysis"
    )
    parser.add_argument(
        "--prior-scan", type=Path, default=None, help="the prior CT when PRIOR is an analyze folder"
    )
    parser.add_argument(
        "--current-scan", type=Path, default=None, help="the current CT when CURRENT is an analyze folder"
    )
    parser.add_argument(
        "--prior-date", type=dt.date.fromisoformat, default=None, help="prior scan date YYYY-MM-DD"
    )
    parser.add_argument(
        "--current-date", type=dt.date.fromisoformat, default=None, help="current scan date YYYY-MM-DD"
    )
    parser.add_argument(
        "--patient-table", type=Path, default=None, help="CSV seriesuid,patient_id[,time_point,scan_date]"
    )
    parser.add_argument("--dataset", choices=("spatiotemporal",), default=None, help="dataset form")
    parser.add_argument("--root", type=Path, default=None, help="dataset root (dataset form)")
    parser.add_argument("--patient", default=None, help="patient id in the dataset (dataset form)")
    parser.add_argument("--analyses", type=Path, default=None, help="folder of finished analyses <scan id>/")
    parser.set_defaults(func=run)
    return parser


# ------------------------------------------------------------------------------------------------ inputs
def _is_analysis(path: Path) -> bool:
    return path.is_dir() and (path / outputs.REPORT_JSON).is_file()


def _read_report(folder: Path) -> dict[str, Any]:
    report = outputs.finished_report(folder)
    if report is None:
        raise ValueError(
            f"{folder}: report.json is missing, damaged, or its files do not match their checksums; rerun "
            "`lungcad analyze` into that folder"
        )
    return report


def _read_labels(folder: Path, volume) -> np.ndarray | None:
    path = folder / outputs.SEGMENTATION_NIFTI
    if not path.is_file():
        return None
    labels = read_volume(path)
    if labels.shape != volume.shape:
        raise ValueError(f"{path}: segmentation shape {labels.shape} differs from the scan's {volume.shape}")
    return labels.array


def _dicom_header(path: Path):
    """The first DICOM header of a series folder (no pixel data), or None for MHD / NIfTI."""
    if not path.is_dir():
        return None
    import pydicom

    for candidate in sorted(p for p in path.iterdir() if p.is_file()):
        try:
            return pydicom.dcmread(candidate, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not a DICOM file: try the next
            continue
    return None


def _dicom_date(header) -> dt.date | None:
    for keyword in DICOM_DATE_KEYWORDS:
        value = str(getattr(header, keyword, "") or "").strip()
        if len(value) >= 8 and value[:8].isdigit():
            return dt.date(int(value[:4]), int(value[4:6]), int(value[6:8]))
    return None


def _patient_key(header) -> str | None:
    """A one-way key of the DICOM PatientID (compared, never written)."""
    value = str(getattr(header, "PatientID", "") or "").strip()
    return hashlib.sha256(value.encode()).hexdigest() if value else None


def _analyzer(args: argparse.Namespace):
    from lungcad.commands.analyze import Analyzer

    if args.bundle is None:
        raise ValueError(
            "a scan without an analysis needs --bundle B to analyze it (or pass analyze folders)"
        )
    # analyze's own parser gives every option its default, whatever options analyze adds later.
    parser = argparse.ArgumentParser(add_help=False)
    from lungcad.commands import analyze as analyze_command

    analyze_command.register(parser.add_subparsers(dest="command"))
    namespace = parser.parse_args(
        ["analyze", str(args.out), "--bundle", str(args.bundle), "--out", str(args.out / "analyses")]
    )
    return Analyzer(namespace)


def _time_point(
    args: argparse.Namespace,
    given: Path,
    scan: Path | None,
    date: dt.date | None,
    label: str,
    analyzer_holder: list,
    analyses: Path | None = None,
) -> TimePoint:
    """One time point from an analyze folder (+ its scan) or a scan (analysed when needed)."""
    if not given.exists():
        raise FileNotFoundError(f"{given}: {label} does not exist")
    if _is_analysis(given):
        if scan is None:
            raise ValueError(
                f"{given}: {label} is a `lungcad analyze` folder, which holds no image; registration needs the "
                f"CT: pass --{label}-scan PATH"
            )
        folder, scan_path = given, scan
        report = _read_report(folder)
        volume = read_volume(scan_path)
    else:
        from lungcad.commands.analyze import read_scan

        scan_path = given
        volume, _ = read_scan(scan_path)
        scan_id = outputs.scan_id(volume, scan_path)
        folder = (analyses or args.out / "analyses") / scan_id
        report = outputs.finished_report(folder)
        if report is None:
            if not analyzer_holder:
                analyzer_holder.append(_analyzer(args))
            scan_id, report, _ = analyzer_holder[0].analyze(scan_path, label)
            folder = args.out / "analyses" / scan_id
    shape = tuple(report["scan"]["shape_zyx"])
    if shape != volume.shape:
        raise ValueError(
            f"{scan_path}: scan shape {volume.shape} differs from its analysis {folder / outputs.REPORT_JSON} "
            f"({shape}); the analysis belongs to another scan"
        )
    header = _dicom_header(scan_path)
    if date is None and header is not None:
        date = _dicom_date(header)
    del header  # the patient identifiers stay here: compared in `_same_patient_dicom`, never kept
    return TimePoint(
        scan_id=report["scan"]["id"],
        date=date,  # type: ignore[arg-type]  # checked by the caller
        report=report,
        volume=volume,
        labels=_read_labels(folder, volume),
        source=str(folder),
    )


def _read_patient_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: patient table not found (CSV with seriesuid,patient_id[,scan_date])"
        )
    frame = pd.read_csv(path, dtype=str)
    missing = {"seriesuid", "patient_id"} - set(frame.columns)
    if missing:
        raise ValueError(
            f"{path}: patient table lacks column(s) {sorted(missing)}; need seriesuid,patient_id"
        )
    return frame.set_index("seriesuid")


def _same_patient_dicom(args: argparse.Namespace) -> dict[str, Any] | None:
    """Compare the DICOM PatientIDs before anything is analysed; None when a scan is not DICOM."""
    paths = [
        scan if _is_analysis(given) else given
        for given, scan in ((args.prior, args.prior_scan), (args.current, args.current_scan))
    ]
    headers = [_dicom_header(p) if p is not None and p.exists() else None for p in paths]
    keys = [_patient_key(h) if h is not None else None for h in headers]
    if not all(keys):
        return None
    if keys[0] != keys[1]:
        raise ValueError(
            f"{paths[0]} and {paths[1]} belong to different patients (their DICOM PatientID differs); a "
            "follow-up compares one patient's scans"
        )
    return {"method": "dicom-patient-id", "same_patient": True}


def _pair(args: argparse.Namespace) -> tuple[list[TimePoint], dict[str, Any]]:
    check = _same_patient_dicom(args)
    holder: list = []
    prior = _time_point(args, args.prior, args.prior_scan, args.prior_date, "prior", holder)
    current = _time_point(args, args.current, args.current_scan, args.current_date, "current", holder)
    table = _read_patient_table(args.patient_table) if args.patient_table is not None else None
    for point in (prior, current):
        if (
            point.date is None
            and table is not None
            and "scan_date" in table.columns
            and point.scan_id in table.index
        ):
            point.date = dt.date.fromisoformat(str(table.at[point.scan_id, "scan_date"]))
        if point.date is None:
            raise ValueError(
                f"no date for scan {point.scan_id}: pass --prior-date / --current-date YYYY-MM-DD (MHD and NIfTI "
                "carry none) or a --patient-table with a scan_date column"
            )
    if table is not None:
        ids = []
        for point in (prior, current):
            if point.scan_id not in table.index:
                raise ValueError(f"{args.patient_table}: scan {point.scan_id} is not in the patient table")
            ids.append(str(table.at[point.scan_id, "patient_id"]))
        if ids[0] != ids[1]:
            raise ValueError(
                f"{args.patient_table}: scans {prior.scan_id} and {current.scan_id} belong to different patients; "
                "a follow-up compares one patient's scans"
            )
        check = check or {"method": "patient-table", "same_patient": True}
    if check is None:
        check = {
            "method": "none",
            "same_patient": None,
            "note": "not checked: MHD / NIfTI carry no patient ID; pass --patient-table to check",
        }
    return [prior, current], check


def _dataset(args: argparse.Namespace) -> tuple[list[TimePoint], dict[str, Any]]:
    from common.datasets.spatiotemporal import SpatioTemporalDataset

    if args.root is None or args.patient is None:
        raise ValueError("--dataset needs --root R and --patient ID")
    if args.prior is not None or args.current is not None:
        raise ValueError(
            "--dataset takes no PRIOR / CURRENT; the patient's time points come from the dataset"
        )
    table_path = args.patient_table or (args.root / "patients.csv")
    table = _read_patient_table(table_path) if table_path.is_file() else None
    dataset = SpatioTemporalDataset(args.root, patient_table=table_path if table is not None else None)
    records = [r for r in dataset.records if r.patient_id == args.patient]
    if not records:
        known = sorted({r.patient_id for r in dataset.records})
        raise ValueError(f"{args.root}: no scans of patient {args.patient!r}; known patients: {known[:10]}")
    if len(records) < 2:
        raise ValueError(f"{args.root}: patient {args.patient!r} has one scan only; a follow-up needs two")
    if table is None or "scan_date" not in table.columns:
        raise ValueError(
            f"{table_path}: no scan dates (a scan_date column) for patient {args.patient!r}; growth rates need "
            "them — give a --patient-table with seriesuid,patient_id,scan_date"
        )
    holder: list = []
    points = []
    for record in records:
        date = dt.date.fromisoformat(str(table.at[record.uid, "scan_date"]))
        analysis = args.analyses / record.uid if args.analyses is not None else None
        given = analysis if analysis is not None and _is_analysis(analysis) else record.image_path
        points.append(
            _time_point(args, given, record.image_path, date, "prior" if not points else "current", holder)
        )
    check = {
        "method": "dataset-table",
        "same_patient": True,
        "note": f"time points of one dataset patient ({table_path.name})",
    }
    return points, check


# ------------------------------------------------------------------------------------------------ run
def run(args: argparse.Namespace) -> int:
    from lungcad.followup.report import (
        FOLLOWUP_CSV,
        FOLLOWUP_HTML,
        FOLLOWUP_JSON,
        build_document,
        write_csv,
        write_html,
    )

    if args.dataset is not None:
        points, check = _dataset(args)
        keep_order = False
    else:
        if args.prior is None or args.current is None:
            raise ValueError("give PRIOR and CURRENT (scans or analyze folders), or --dataset with --patient")
        points, check = _pair(args)
        keep_order = True
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    results = follow_up(points, out, keep_order=keep_order)
    document = build_document(results, points, check)
    write_csv(document, out / FOLLOWUP_CSV)
    write_html(document, results, out / FOLLOWUP_HTML)
    atomic.write_text(out / FOLLOWUP_JSON, json.dumps(document, indent=1) + "\n")
    counts: dict[str, int] = {}
    for interval in document["intervals"]:
        for nodule in interval["nodules"]:
            counts[nodule["status"]] = counts.get(nodule["status"], 0) + 1
    print(
        f"lungcad followup: {len(points)} scans, {len(results)} interval(s): "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        + f"; wrote {out / FOLLOWUP_JSON}, {FOLLOWUP_CSV}, {FOLLOWUP_HTML}"
    )
    if document["flags"]:
        for flag in document["flags"]:
            log.warning("%s", flag)
        return EXIT_FLAGGED
    return 0
