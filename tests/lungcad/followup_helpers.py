"""Analyze folders (report.json + segmentation.nii.gz, the contract's layout) made from a longitudinal
phantom's true nodule masks, so `lungcad followup` can be tested without trained models: measurements come
from `lungcad.measure.measure_nodule` on the truth masks, categories from `lungcad.lungrads`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from common.io import read_volume
from common.synth.followup import TRUTH_LABELS
from lungcad import DISCLAIMER, outputs
from lungcad.lungrads import baseline_category, scan_category
from lungcad.measure import measure_nodule


def write_truth_analysis(root: Path, uid: str, out: Path) -> tuple[Path, dict[int, int]]:
    """OUT/<uid>/ with report.json and segmentation.nii.gz; returns it and {report index: truth label}."""
    volume = read_volume(root / "detection_3d" / "mhd" / f"{uid}.mhd")
    truth = read_volume(root / TRUTH_LABELS / f"{uid}.nii.gz").array
    folder = out / uid
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.zeros(volume.shape, np.uint16)
    nodules, categories, index_to_truth = [], [], {}
    for k, value in enumerate(sorted(int(v) for v in np.unique(truth) if v), start=1):
        mask = truth == value
        labels[mask] = k
        m = measure_nodule(volume, mask)
        cat = baseline_category(m.type, m.mean_diameter_mm, m.solid_component_mm)
        categories.append(cat)
        index_to_truth[k] = value
        nodules.append(
            {
                "index": k,
                "label": k,
                "source": "given",
                "segmentation": None,
                "detection_score": None,
                "malignancy_probability": 0.5,
                "measurements": m.to_dict(),
                "category": cat.to_dict(),
            }
        )
    seg = outputs.write_segmentation(volume, labels, folder / outputs.SEGMENTATION_NIFTI)
    scan_cat = scan_category(categories).to_dict()
    report = {
        "schema_version": outputs.REPORT_SCHEMA_VERSION,
        "generator": {"name": "lungcad", "version": "0.1.0"},
        "created_utc": "2026-12-07T00:00:00Z",
        "disclaimer": DISCLAIMER,
        "scan": {
            "id": uid,
            "format": "mhd",
            "shape_zyx": list(volume.shape),
            "spacing_xyz": list(volume.spacing),
            "origin_xyz": list(volume.origin),
            "direction": [float(v) for v in volume.direction.ravel()],
            "acquisition": {},
        },
        "bundle": {"name": "truth"},
        "mode": "given-nodules",
        "parameters": {"nodules_csv": None, "series_uid_requested": None, "anonymize": False},
        "timings_s": {},
        "summary": {
            "n_nodules": len(nodules),
            "n_candidates": 0,
            "max_malignancy_probability": 0.5 if nodules else None,
            "scan_category": scan_cat["category"],
        },
        "scan_category": scan_cat,
        "nodules": nodules,
        "files": {seg.name: {"sha256": outputs.sha256(seg), "bytes": seg.stat().st_size}},
    }
    (folder / outputs.REPORT_JSON).write_text(json.dumps(report, indent=1))
    return folder, index_to_truth
