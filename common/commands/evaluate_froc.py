"""`lungdata evaluate-froc`: the LUNA16 evaluation (FROC, CPM, bootstrap CI) of a results CSV.

Same inputs as the official ``noduleCADEvaluationLUNA16.py`` (annotations, excluded annotations, series
list, results ``seriesuid,coordX,coordY,coordZ,probability``) and the same numbers (see
``docs/metrics.md``), in seconds instead of minutes. Prints the seven sensitivities, the CPM, the
bootstrap intervals and the candidate counts; writes ``froc.json``, ``froc.png``, ``froc_curve.csv``
and, with bootstrapping, ``froc_bootstrap.csv`` (the script's 10000-point mean/CI curves).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from common import atomic
from common.metrics.froc import BOOTSTRAP_GRID, MAX_MARKS_PER_SCAN, FROCResult
from common.metrics.froc_io import evaluate_froc_files


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``evaluate-froc`` sub-command."""
    parser = subparsers.add_parser(
        "evaluate-froc",
        help="LUNA16 FROC/CPM of a detection results CSV (official rules)",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--annotations", required=True, type=Path, help="annotations.csv")
    parser.add_argument("--excluded", required=True, type=Path, help="annotations_excluded.csv")
    parser.add_argument("--seriesuids", required=True, type=Path, help="seriesuids.csv (no header)")
    parser.add_argument(
        "--results", required=True, type=Path, help="CSV seriesuid,coordX,coordY,coordZ,probability"
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <results>_froc/)")
    parser.add_argument(
        "--bootstrap", type=int, default=1000, metavar="N", help="bootstrap samples over scans (0: none)"
    )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (same draws as np.random.seed)")
    parser.add_argument(
        "--reading",
        choices=("interp", "nearest"),
        default="interp",
        help="read sensitivities by linear interpolation or at the nearest operating point at/above",
    )
    parser.add_argument(
        "--max-marks",
        type=int,
        default=MAX_MARKS_PER_SCAN,
        help="keep at most this many marks per scan (0: no cap)",
    )
    parser.add_argument(
        "--ignore-unlisted",
        action="store_true",
        help="drop marks of scans missing from the series list (the official script does) instead of failing",
    )
    parser.add_argument(
        "--scans",
        type=Path,
        default=None,
        help="folder of the scans' .mhd headers, to warn about annotations outside their volume "
        "(default: the annotations file's folder, where LUNA16 keeps subset0..9)",
    )
    parser.add_argument(
        "--name", default=None, help="system name for the figure (default: results file stem)"
    )
    parser.set_defaults(func=run)
    return parser


def _interval(mean: float, lower: float, upper: float) -> str:
    if not np.isfinite(mean):
        return "  undefined"
    return f"  {mean:.4f} [{lower:.4f}, {upper:.4f}]"


def format_report(result: FROCResult) -> str:
    """Human-readable summary: sensitivities, CPM, bootstrap CI, counts."""
    bs = result.bootstrap
    c = result.counts
    lines = [f"LUNA16 FROC ({result.reading} reading, {c.n_scans} scans)"]
    header = f"  {'FP/scan':>8}  {'sensitivity':>11}"
    if bs is not None:
        header += f"  bootstrap mean [{int(round(bs.confidence * 100))}% CI], {bs.n_samples} samples"
    lines.append(header)
    for i, (rate, sens) in enumerate(zip(result.fp_rates, result.sensitivities)):
        row = f"  {rate:>8g}  {sens:>11.4f}" if np.isfinite(sens) else f"  {rate:>8g}  {'undefined':>11}"
        if bs is not None:
            row += _interval(bs.mean[i], bs.lower[i], bs.upper[i])
        lines.append(row)
    row = (
        f"  {'CPM':>8}  {result.cpm:>11.4f}"
        if np.isfinite(result.cpm)
        else f"  {'CPM':>8}  {'undefined':>11}"
    )
    if bs is not None:
        row += _interval(bs.cpm_mean, bs.cpm_lower, bs.cpm_upper)
    lines.append(row)
    lines.append(
        f"candidates {c.n_candidates} ({c.removed_by_cap} removed by the per-scan cap, "
        f"{c.candidates_per_scan:.1f} per scan); nodules {c.n_nodules}: "
        f"TP {c.true_positives}, FP {c.false_positives}, FN {c.false_negatives} "
        f"(candidate sensitivity {c.sensitivity:.4f}); ignored marks: {c.ignored_on_excluded} on excluded "
        f"findings, {c.ignored_double_hits} extra hits on detected nodules"
    )
    return "\n".join(lines)


def _write_columns(path: Path, header: str, *columns: np.ndarray) -> None:
    """Equal-length columns as a CSV with `header`, 9 decimals, written atomically."""
    with atomic.atomic_path(path) as tmp:
        np.savetxt(tmp, np.column_stack(columns), delimiter=",", header=header, comments="", fmt="%.9f")


def write_outputs(result: FROCResult, out_dir: Path, name: str) -> dict[str, Path]:
    """Write the JSON summary, the curve CSV, the bootstrap CSV and the figure."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "froc.json",
        "curve": out_dir / "froc_curve.csv",
        "figure": out_dir / "froc.png",
    }
    atomic.write_json(paths["json"], result.to_dict(), indent=1, sort_keys=False)  # undefined values → null
    curve = result.curve
    _write_columns(
        paths["curve"], "fps_per_scan,sensitivity,threshold", curve.fps, curve.sensitivity, curve.thresholds
    )
    bs = result.bootstrap
    if bs is not None and bs.grid is not None:
        paths["bootstrap"] = out_dir / "froc_bootstrap.csv"
        _write_columns(
            paths["bootstrap"],
            "fps_per_scan,sensitivity_mean,sensitivity_lower,sensitivity_upper",
            bs.grid,
            bs.grid_mean,
            bs.grid_lower,
            bs.grid_upper,
        )
    from common.metrics.figures import plot_froc  # matplotlib only when a figure is written

    plot_froc(result, paths["figure"], label=name)
    return paths


def run(args: argparse.Namespace) -> int:
    """Evaluate, print, write; input problems raise ``FROCInputError`` (a ValueError) naming file and row."""
    result = evaluate_froc_files(
        args.annotations,
        args.excluded,
        args.seriesuids,
        args.results,
        reading=args.reading,
        n_bootstrap=max(0, args.bootstrap),
        seed=args.seed,
        bootstrap_grid=BOOTSTRAP_GRID,
        max_marks=args.max_marks if args.max_marks > 0 else None,
        ignore_unlisted=args.ignore_unlisted,
        scans=args.scans if args.scans is not None else Path(args.annotations).parent,
    )
    results_path = Path(args.results)
    stem = results_path.name.split(".")[0]
    out_dir = args.out if args.out is not None else results_path.parent / f"{stem}_froc"
    paths = write_outputs(result, Path(out_dir), args.name or stem)
    print(format_report(result))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
