"""Read, check and write the four inputs of the official LUNA16 evaluation.

Layouts (as distributed with LUNA16 and read by ``noduleCADEvaluationLUNA16.py``):

- ``annotations.csv`` and ``annotations_excluded.csv``: header ``seriesuid,coordX,coordY,coordZ,diameter_mm``
  (world mm; excluded findings may have diameter ``-1``);
- ``seriesuids.csv``: one series UID per line, no header;
- results: header ``seriesuid,coordX,coordY,coordZ,probability``.

Columns are found by name, extra columns are ignored, ``.csv.gz`` works too. Numbers are parsed
with Python's ``float`` (as the script does), so results match it to the last bit.

Unlike the script, which crashes with a bare traceback or silently skips rows, every problem is one
:class:`FROCInputError` naming the file, the data row and file line, the column, the bad value and
the fix: a missing column, a value that is not a number, NaN or infinite coordinates or probability,
a result whose series UID is not in the series list, a duplicated series UID, an empty file.
Annotations of scans that are not in the series list are ignored, as in the script (that is how one
evaluates a single subset with the full annotation files), and an annotation outside its scan's volume
still counts as a nodule to find; both keep the official numbers, but each is warned about once, with the
count and the first rows, so a wrong series list or a mixed-up annotation file does not go unnoticed.
Annotations with no nodule in the listed scans (a header-only file) leave sensitivity undefined: a
warning, and ``null`` in the JSON output, never ``NaN``.

Writing (:func:`write_results_csv`, :func:`write_annotations_csv`, :func:`write_seriesuids`) lives here too,
beside the reader, so every package writes these files one way (atomically); callers choose the number
format, which keeps each package's files byte-identical to what it wrote before.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common import atomic
from common.datasets.tables import ANNOTATION_COLUMNS, WorldColumns, csv_line
from common.metrics.froc import (
    BOOTSTRAP_GRID,
    FP_RATES,
    MAX_MARKS_PER_SCAN,
    FROCResult,
    Reading,
    evaluate_froc,
)

log = logging.getLogger(__name__)

#: Header of a LUNA16 CAD result CSV (the submission format the official evaluation script reads).
RESULT_COLUMNS: tuple[str, ...] = (*WorldColumns().centre(), "probability")
#: The evaluation files of one folder by role, named as distributed with LUNA16.
EVALUATION_FILES = {
    "annotations": "annotations.csv",
    "excluded": "annotations_excluded.csv",
    "seriesuids": "seriesuids.csv",
    "results": "results.csv",
}
_MAX_LISTED = 5


class FROCInputError(ValueError):
    """A LUNA16 evaluation input is missing, malformed or inconsistent; the message says where."""


@dataclass(frozen=True)
class FROCInputs:
    """The evaluation inputs as arrays (scan indices refer to ``seriesuids``)."""

    seriesuids: list[str]
    cand_scan: np.ndarray
    cand_xyz: np.ndarray
    cand_prob: np.ndarray
    nod_scan: np.ndarray
    nod_xyz: np.ndarray
    nod_diameter: np.ndarray
    nod_included: np.ndarray
    annotations_outside_list: int

    def args(self) -> tuple[Any, ...]:
        """The positional arguments of ``common.metrics.froc.evaluate_froc`` / ``match_candidates``."""
        return (
            self.cand_scan, self.cand_xyz, self.cand_prob, self.nod_scan, self.nod_xyz, self.nod_diameter,
            self.nod_included, len(self.seriesuids),
        )  # fmt: skip


def _describe_rows(path: Path, rows: np.ndarray, column: str, values: pd.Series, problem: str) -> str:
    """Name the first offending rows; ``rows`` are index labels (0 = first line after the header)."""
    shown = [f"row {int(r) + 1} (line {int(r) + 2}): {column}={values.loc[r]!r}" for r in rows[:_MAX_LISTED]]
    more = f" and {rows.size - _MAX_LISTED} more" if rows.size > _MAX_LISTED else ""
    return f"{path}: {problem} in column '{column}' at " + "; ".join(shown) + more


def _read_text(path: Path, required: tuple[str, ...], what: str) -> pd.DataFrame:
    """Read a headed CSV as text, check the header; the index is the data row (0 = line 2)."""
    if not path.is_file():
        raise FROCInputError(f"{path}: {what} file not found; pass the path of the {what} CSV")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=False)
    except pd.errors.EmptyDataError as err:
        raise FROCInputError(
            f"{path}: the {what} file is empty; it needs a header line {','.join(required)}"
        ) from err
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise FROCInputError(f"{path}: cannot parse the {what} CSV ({err}); check its format") from err
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise FROCInputError(
            f"{path}: {what} file lacks column(s) {', '.join(missing)}; found {', '.join(frame.columns)}; "
            f"the header must name {','.join(required)}"
        )
    frame = frame[list(required)]
    blank = (frame == "").all(axis=1).to_numpy()
    return frame.loc[~blank]


def _numbers(path: Path, frame: pd.DataFrame, column: str) -> np.ndarray:
    """Parse one text column with Python's float; reject non-numbers, NaN and infinities."""
    text = frame[column]
    try:
        values = text.to_numpy(dtype=object).astype(np.float64)
    except ValueError:
        bad = []
        for label, value in text.items():
            try:
                float(value)
            except ValueError:
                bad.append(label)
        raise FROCInputError(
            _describe_rows(path, np.asarray(bad), column, text, "not a number")
            + "; write plain decimal numbers"
        ) from None
    finite = np.isfinite(values)
    if not finite.all():
        rows = frame.index.to_numpy()[~finite]
        raise FROCInputError(
            _describe_rows(path, rows, column, text, "NaN or infinite value")
            + "; every value must be a finite number"
        )
    return values


def _read_careful(path: Path, required: tuple[str, ...], what: str) -> pd.DataFrame:
    """The slow path: text parsing that names every problem precisely."""
    frame = _read_text(path, required, what)
    out = pd.DataFrame({"seriesuid": frame["seriesuid"].str.strip()}, index=frame.index)
    for column in required[1:]:
        out[column] = _numbers(path, frame, column)
    return out


def _read_checked(path: Path, required: tuple[str, ...], what: str) -> pd.DataFrame:
    """Read a headed CSV with float columns; fast when clean, precise errors when not.

    The fast path is pandas' C parser (which parses decimal numbers exactly as Python's ``float``,
    checked in the tests); anything unusual (a missing column, text in a number column, NaN,
    infinities) goes through :func:`_read_careful`, which raises the error naming the row.
    """
    if not path.is_file():
        raise FROCInputError(f"{path}: {what} file not found; pass the path of the {what} CSV")
    try:
        frame = pd.read_csv(path, dtype={"seriesuid": str}, keep_default_na=False, na_values=[""])
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, ValueError):
        return _read_careful(path, required, what)
    frame.columns = [str(c).strip() for c in frame.columns]
    if any(c not in frame.columns for c in required):
        return _read_careful(path, required, what)
    numeric = frame[list(required[1:])]
    clean = all(numeric[c].dtype.kind in "fi" for c in numeric.columns)
    if clean:
        values = numeric.to_numpy(dtype=np.float64)
        clean = bool(np.isfinite(values).all())
    if not clean or frame["seriesuid"].isna().any():
        return _read_careful(path, required, what)
    out = pd.DataFrame({"seriesuid": frame["seriesuid"].str.strip()})
    for i, column in enumerate(required[1:]):
        out[column] = values[:, i]
    return out


def read_seriesuids(path: str | Path) -> list[str]:
    """The series list: first field of each non-blank line, no header (a literal header is skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FROCInputError(f"{path}: series list not found; pass the seriesuids CSV (one UID per line)")
    try:
        frame = pd.read_csv(path, header=None, dtype=str, keep_default_na=False, usecols=[0])
    except pd.errors.EmptyDataError as err:
        raise FROCInputError(f"{path}: the series list is empty; it must name every evaluated scan") from err
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise FROCInputError(
            f"{path}: cannot parse the series list ({err}); write one series UID per line"
        ) from err
    uids = [u.strip() for u in frame[0].tolist()]
    if uids and uids[0].lower() == "seriesuid":
        uids = uids[1:]
    uids = [u for u in uids if u]
    if not uids:
        raise FROCInputError(f"{path}: the series list is empty; it must name every evaluated scan")
    seen: dict[str, int] = {}
    for line, uid in enumerate(uids, start=1):
        if uid in seen:
            raise FROCInputError(
                f"{path}: series UID {uid!r} is listed twice (entries {seen[uid]} and {line}); list each scan once"
            )
        seen[uid] = line
    return uids


def read_annotations(path: str | Path, what: str = "annotations") -> pd.DataFrame:
    """Annotations or excluded findings, with float columns."""
    return _read_checked(Path(path), ANNOTATION_COLUMNS, what)


def read_results(path: str | Path) -> pd.DataFrame:
    """CAD results, with float columns."""
    path = Path(path)
    out = _read_checked(path, RESULT_COLUMNS, "results")
    if out.empty:
        log.warning("%s: no CAD marks; every nodule counts as missed", path)
    return out


def _rows_text(path: Path, frame: pd.DataFrame) -> str:
    shown = [f"line {csv_line(i)} ({frame.at[i, 'seriesuid']})" for i in frame.index[:_MAX_LISTED]]
    more = f" and {len(frame) - _MAX_LISTED} more" if len(frame) > _MAX_LISTED else ""
    return f"{path.name} " + ", ".join(shown) + more


def _warn_unlisted(path: Path, ann: pd.DataFrame, index: dict[str, int], seriesuids: Path) -> None:
    """One warning for annotations whose scan is not in the series list (left out, as the script does)."""
    unlisted = ann.loc[ann["seriesuid"].map(index).isna()]
    if not unlisted.empty:
        log.warning(
            "%s: %d annotation(s) of scans not in the series list %s are left out (official rule): %s",
            path,
            len(unlisted),
            seriesuids,
            _rows_text(path, unlisted),
        )


def find_scan_headers(folder: Path, uids) -> dict[str, Path]:
    """``<uid>.mhd`` headers of the given scans in a LUNA16-style tree (``folder``, ``subset*/``, one level up)."""
    found: dict[str, Path] = {}
    bases = [folder, folder.parent]
    for base in bases:
        for sub in [base, *sorted(base.glob("subset*"))]:
            for uid in uids:
                if uid not in found and (sub / f"{uid}.mhd").is_file():
                    found[uid] = sub / f"{uid}.mhd"
    return found


def _warn_outside(path: Path, ann: pd.DataFrame, scans: Path) -> None:
    """One warning for annotations outside their scan's volume (still counted as nodules, official rule)."""
    from common.datasets.geometry import ScanGeometry

    headers = find_scan_headers(scans, sorted(set(ann["seriesuid"])))
    outside = []
    for i, row in ann.iterrows():
        header = headers.get(row["seriesuid"])
        if header is None:
            continue
        try:
            geometry = ScanGeometry.from_header(header)
        except ValueError:
            continue
        xyz = row[["coordX", "coordY", "coordZ"]].to_numpy(dtype=np.float64)
        if not geometry.contains(geometry.world_to_voxel(xyz)):
            outside.append(i)
    if outside:
        log.warning(
            "%s: %d annotation(s) lie outside their scan's volume (headers under %s) and count as misses "
            "(official rule): %s",
            path,
            len(outside),
            scans,
            _rows_text(path, ann.loc[outside]),
        )


def load_froc_inputs(
    annotations: str | Path,
    excluded: str | Path,
    seriesuids: str | Path,
    results: str | Path,
    ignore_unlisted: bool = False,
    scans: str | Path | None = None,
) -> FROCInputs:
    """Read, check and index the four official inputs.

    Args:
        annotations, excluded, seriesuids, results: the four files.
        ignore_unlisted: drop result rows of scans that are not in the series list (what the
            official script does silently) instead of raising; the number dropped is logged.
        scans: a folder with the scans' ``.mhd`` headers (LUNA16 tree); when given, annotations outside
            their scan's volume are warned about (numbers unchanged).
    """
    uids = read_seriesuids(seriesuids)
    index = {uid: i for i, uid in enumerate(uids)}
    ann = read_annotations(annotations, "annotations")
    exc = read_annotations(excluded, "excluded annotations")
    res = read_results(results)

    res_scan = res["seriesuid"].map(index)
    if ignore_unlisted and res_scan.isna().any():
        log.warning(
            "%s: ignoring %d marks of scans not in the series list", results, int(res_scan.isna().sum())
        )
        res = res.loc[res_scan.notna()]
        res_scan = res_scan.loc[res_scan.notna()]
    if res_scan.isna().any():
        # Re-read as text so that the rows are named by their place in the file.
        text = _read_careful(Path(results), RESULT_COLUMNS, "results")
        unknown = text["seriesuid"].map(index).isna().to_numpy()
        raise FROCInputError(
            _describe_rows(
                Path(results),
                text.index.to_numpy()[unknown],
                "seriesuid",
                text["seriesuid"],
                f"series UID not in the series list {seriesuids}",
            )
            + "; add the scan to the series list or drop its marks"
        )
    _warn_unlisted(Path(annotations), ann, index, Path(seriesuids))
    listed = ann.loc[ann["seriesuid"].map(index).notna()]
    if listed.empty:
        log.warning(
            "%s: no nodules in the %d scans of %s; sensitivities and CPM are undefined (null in froc.json)",
            annotations,
            len(uids),
            seriesuids,
        )
    elif scans is not None:
        _warn_outside(Path(annotations), listed, Path(scans))
    nodules = pd.concat([ann.assign(included=True), exc.assign(included=False)], ignore_index=True)
    nod_scan = nodules["seriesuid"].map(index)
    in_list = nod_scan.notna().to_numpy()
    nodules = nodules.loc[in_list]
    return FROCInputs(
        seriesuids=uids,
        cand_scan=res_scan.to_numpy(dtype=np.int64),
        cand_xyz=res[["coordX", "coordY", "coordZ"]].to_numpy(dtype=np.float64),
        cand_prob=res["probability"].to_numpy(dtype=np.float64),
        nod_scan=nod_scan[in_list].to_numpy(dtype=np.int64),
        nod_xyz=nodules[["coordX", "coordY", "coordZ"]].to_numpy(dtype=np.float64),
        nod_diameter=nodules["diameter_mm"].to_numpy(dtype=np.float64),
        nod_included=nodules["included"].to_numpy(dtype=bool),
        annotations_outside_list=int((~in_list).sum()),
    )


def evaluate_froc_files(
    annotations: str | Path,
    excluded: str | Path,
    seriesuids: str | Path,
    results: str | Path,
    reading: Reading = "interp",
    n_bootstrap: int = 1000,
    seed: int = 0,
    bootstrap_grid: np.ndarray | None = BOOTSTRAP_GRID,
    max_marks: int | None = MAX_MARKS_PER_SCAN,
    fp_rates: tuple[float, ...] = FP_RATES,
    ignore_unlisted: bool = False,
    scans: str | Path | None = None,
) -> FROCResult:
    """The official LUNA16 evaluation of a results CSV (see :func:`common.metrics.froc.evaluate_froc`)."""
    inputs = load_froc_inputs(
        annotations, excluded, seriesuids, results, ignore_unlisted=ignore_unlisted, scans=scans
    )
    result = evaluate_froc(
        inputs.cand_scan,
        inputs.cand_xyz,
        inputs.cand_prob,
        inputs.nod_scan,
        inputs.nod_xyz,
        inputs.nod_diameter,
        inputs.nod_included,
        n_scans=len(inputs.seriesuids),
        reading=reading,
        n_bootstrap=n_bootstrap,
        seed=seed,
        bootstrap_grid=bootstrap_grid,
        max_marks=max_marks,
        fp_rates=fp_rates,
    )
    result.extra["annotations_outside_list"] = inputs.annotations_outside_list
    return result


# ------------------------------------------------------------------------------------------------ writing
#: how numbers are written: one printf format for every float column, a column → format mapping (other
#: columns as pandas writes them), or None (shortest round-trip form, which every reader parses exactly).
FloatFormat = str | Mapping[str, str] | None


def results_frame(rows: Iterable[Sequence[Any]], extra_columns: Sequence[str] = ()) -> pd.DataFrame:
    """A LUNA16 results table from (seriesuid, x, y, z, probability, *extra) rows, numbers as floats."""
    columns = [*RESULT_COLUMNS, *extra_columns]
    frame = pd.DataFrame(list(rows), columns=columns)
    return frame.astype(dict.fromkeys(columns[1:], float))


def _write_table(
    frame: pd.DataFrame,
    columns: Sequence[str],
    path: str | Path,
    float_format: FloatFormat,
    lineterminator: str,
    what: str,
) -> Path:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} need columns {tuple(columns)}; missing {missing}")
    frame = frame[list(columns)]
    if isinstance(float_format, Mapping):
        frame = frame.assign(**{c: [fmt % v for v in frame[c]] for c, fmt in float_format.items()})
        float_format = None
    return atomic.write_csv(path, frame, float_format=float_format, lineterminator=lineterminator)


def write_results_csv(
    results: pd.DataFrame | Iterable[Sequence[Any]],
    path: str | Path,
    *,
    extra_columns: Sequence[str] = (),
    float_format: FloatFormat = "%.6f",
    lineterminator: str = "\n",
) -> Path:
    """Write a LUNA16 results CSV atomically (folders are created).

    Args:
        results: a frame with ``seriesuid, coordX, coordY, coordZ, probability`` (+ ``extra_columns``), or
            rows in that order.
        path: output file.
        extra_columns: columns written after the five official ones (the evaluation ignores them).
        float_format: see :data:`FloatFormat`.
        lineterminator: ``"\n"``, or ``"\r\n"`` as Python's csv module writes by default.

    Returns:
        The written path.
    """
    frame = results if isinstance(results, pd.DataFrame) else results_frame(results, extra_columns)
    columns = [*RESULT_COLUMNS, *extra_columns]
    return _write_table(frame, columns, path, float_format, lineterminator, "results")


def write_annotations_csv(
    annotations: pd.DataFrame | Iterable[Sequence[Any]],
    path: str | Path,
    *,
    float_format: FloatFormat = None,
    lineterminator: str = "\n",
) -> Path:
    """Write ``annotations.csv`` / ``annotations_excluded.csv`` (seriesuid, coordX, coordY, coordZ, diameter_mm)."""
    frame = (
        annotations
        if isinstance(annotations, pd.DataFrame)
        else pd.DataFrame(list(annotations), columns=list(ANNOTATION_COLUMNS))
    )
    return _write_table(frame, ANNOTATION_COLUMNS, path, float_format, lineterminator, "annotations")


def write_seriesuids(uids: Iterable[str], path: str | Path) -> Path:
    """Write ``seriesuids.csv``: one series UID per line, no header (as distributed with LUNA16)."""
    return atomic.write_text(path, "".join(f"{uid}\n" for uid in uids))
