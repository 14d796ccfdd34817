"""Regenerate the FROC reference fixtures from the official LUNA16 evaluation script.

Usage (from the repository root)::

    LUNA16_EVAL_SCRIPT=/path/to/py3/noduleCADEvaluationLUNA16.py \\
        .venv/bin/python tests/data/froc/make_fixtures.py

For every case below this generates a LUNA16-style result set (``common.metrics.froc_synthetic``),
runs the official script on it (``bench.luna16_official.run_official``: 100-mark cap, 1000
bootstrap samples after ``np.random.seed(seed)``) and stores, in ``tests/data/froc/<case>/``, the four
inputs (gzipped) and ``expected.json`` with the script's numbers. The script itself is never copied
into the repository; only its outputs are kept.
"""

from __future__ import annotations

import gzip
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from bench.luna16_official import official_script_path, run_official  # noqa: E402
from common.metrics.froc_synthetic import SyntheticFROCSpec, generate_froc_case  # noqa: E402

HERE = Path(__file__).resolve().parent
GRID_STRIDE = 37  # keep every 37th point of the 10000-point bootstrap curves (and the last one)

CASES: dict[str, tuple[SyntheticFROCSpec, int, int]] = {
    # name: (spec, data seed, bootstrap seed)
    "basic": (SyntheticFROCSpec(n_scans=30), 101, 0),
    "excluded_unknown_size": (
        SyntheticFROCSpec(
            n_scans=30, excluded_per_scan=3.0, unknown_size_fraction=0.6, excluded_hit_rate=0.9
        ),
        102,
        0,
    ),
    "double_hits": (
        SyntheticFROCSpec(n_scans=30, nodules_per_scan=1.8, extra_hit_rate=0.7, touching_pairs=6),
        103,
        0,
    ),
    "empty_scans": (
        SyntheticFROCSpec(
            n_scans=40, empty_scan_fraction=0.3, detect_rate=0.75, candidates_per_scan=(10, 40)
        ),
        104,
        7,
    ),
    "cap_over_100": (
        SyntheticFROCSpec(
            n_scans=16, overfull_scans=10, probability_decimals=3, candidates_per_scan=(20, 60)
        ),
        105,
        0,
    ),
    "tied_probabilities": (
        SyntheticFROCSpec(n_scans=30, probability_decimals=1, extra_hit_rate=0.4),
        106,
        0,
    ),
    "luna_like": (
        SyntheticFROCSpec(n_scans=30, nodules_per_scan=1.4, marks_per_scan=100, touching_pairs=2),
        107,
        12345,
    ),
}


def _gzip(src: Path, dst: Path) -> None:
    with open(src, "rb") as fin, gzip.GzipFile(dst, "wb", mtime=0) as fout:
        shutil.copyfileobj(fin, fout)


def _parse_analysis(text: str) -> dict[str, int]:
    keys = {
        "True positives": "true_positives",
        "False positives": "false_positives",
        "False negatives": "false_negatives",
        "Total number of candidates": "candidates",
        "Total number of nodules": "nodules",
        "Ignored candidates on excluded nodules": "ignored_on_excluded",
        "Ignored candidates which were double detections on a nodule": "ignored_double_hits",
    }
    out = {}
    for line in text.splitlines():
        name, _, value = line.strip().partition(":")
        if name in keys:
            out[keys[name]] = int(value)
    return out


def make_case(script: Path, name: str, spec: SyntheticFROCSpec, data_seed: int, bs_seed: int) -> dict:
    case = generate_froc_case(spec, seed=data_seed, case_id=data_seed)
    folder = HERE / name
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        paths = case.write(Path(tmp) / "in")
        ref = run_official(
            script,
            paths["annotations"],
            paths["excluded"],
            paths["seriesuids"],
            paths["results"],
            Path(tmp) / "out",
            n_bootstrap=1000,
            seed=bs_seed,
        )
        for path in paths.values():
            _gzip(path, folder / f"{path.name}.gz")
    grid_idx = np.unique(np.concatenate((np.arange(0, 10000, GRID_STRIDE), [9999])))
    expected = {
        "case": name,
        "data_seed": data_seed,
        "bootstrap_seed": bs_seed,
        "bootstrap_samples": 1000,
        "counts": _parse_analysis(ref["analysis"]),
        "curve_fps": ref["fps"].tolist(),
        "curve_sensitivity": ref["sens"].tolist(),
        "sensitivity_interp": ref["sens_interp"].tolist(),
        "sensitivity_nearest": ref["sens_nearest"].tolist(),
        "cpm_interp": float(np.mean(ref["sens_interp"])),
        "cpm_nearest": float(np.mean(ref["sens_nearest"])),
        "bootstrap_points_mean": ref["bootstrap_points_mean"].astype(float).tolist(),
        "bootstrap_points_lower": ref["bootstrap_points_lower"].astype(float).tolist(),
        "bootstrap_points_upper": ref["bootstrap_points_upper"].astype(float).tolist(),
        "bootstrap_cpm_mean": ref["bootstrap_cpm_mean"],
        "bootstrap_cpm_lower": ref["bootstrap_cpm_lower"],
        "bootstrap_cpm_upper": ref["bootstrap_cpm_upper"],
        "bootstrap_grid_index": grid_idx.tolist(),
        "bootstrap_grid_mean": ref["bootstrap_mean"][grid_idx].astype(float).tolist(),
        "bootstrap_grid_lower": ref["bootstrap_lower"][grid_idx].astype(float).tolist(),
        "bootstrap_grid_upper": ref["bootstrap_upper"][grid_idx].astype(float).tolist(),
        "official_seconds": ref["seconds"],
    }
    (folder / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    return expected


def main() -> int:
    script = official_script_path()
    if script is None:
        print("set LUNA16_EVAL_SCRIPT to a Python-3 copy of noduleCADEvaluationLUNA16.py", file=sys.stderr)
        return 2
    names = sys.argv[1:] or list(CASES)
    for name in names:
        spec, data_seed, bs_seed = CASES[name]
        exp = make_case(script, name, spec, data_seed, bs_seed)
        print(
            f"{name}: counts {exp['counts']} CPM interp {exp['cpm_interp']:.6f} nearest {exp['cpm_nearest']:.6f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
