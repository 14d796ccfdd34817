"""Reading annotation tables and scan folders with errors that name the file, the row and the fix.

Every adapter reads some CSV whose columns vary between releases and re-uploads of a dataset, and some
folder of MHD scans. The helpers here make the failure modes uniform (SPEC §9): a missing file, an empty
table or a missing column is always an error; a bad *row* (unknown scan, unparsable number, annotation
outside its volume) is an error in strict mode and a logged skip — file and line named — in lenient mode.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.datasets.base import Nodule
from common.datasets.geometry import ScanGeometry
from common.io import parse_mhd_header

log = logging.getLogger(__name__)


class AnnotationError(ValueError):
    """An annotation file or row that cannot be used as it is."""


#: How a user skips bad rows, in the words of the commands they type (SPEC §9: messages name CLI flags).
LENIENT_FIX = (
    "fix the row, or skip such rows with --lenient (lungdata prepare) / --data.init_args.lenient true "
    "(lungdet, lungseg, lungcls)"
)


def columns_hint(roles: Iterable[str]) -> str:
    """How a user maps their column names, in command-line terms."""
    role = next(iter(roles), "x")
    return (
        f"map them with --columns {role}=NAME … (lungdata prepare) or --data.init_args.columns "
        f"'{{{role}: NAME}}' (lungdet, lungseg)"
    )


def coerce_columns(value, cls):
    """An adapter's column names from a dataclass instance, a ``{role: name}`` dict (configs, CLI) or None."""
    if value is None:
        return cls()
    if isinstance(value, Mapping):
        roles = [f for f in cls.__dataclass_fields__]
        unknown = sorted(set(value) - set(roles))
        if unknown:
            raise ValueError(f"unknown column role(s) {unknown}; the roles are {roles}")
        return cls(**{k: str(v) for k, v in value.items()})
    return value


class RowPolicy:
    """Strict (raise) or lenient (log and skip) handling of bad rows; remembers what was skipped."""

    def __init__(self, strict: bool = True, logger: logging.Logger | None = None) -> None:
        self.strict = strict
        self.log = logger or log
        self.skipped: list[str] = []

    def bad_row(self, message: str, fix: str = LENIENT_FIX) -> None:
        """Report one unusable row (or scan): raise in strict mode, naming `fix`; else log and remember it."""
        if self.strict:
            raise AnnotationError(f"{message} ({fix})")
        self.log.warning("skipped: %s", message)
        self.skipped.append(message)


def csv_line(index: int) -> int:
    """1-based line number in the file of a pandas row index (header is line 1)."""
    return int(index) + 2


def read_table(path: str | Path, columns: Mapping[str, str], hint: str) -> pd.DataFrame:
    """Read a CSV and check that the configured columns are there.

    Args:
        path: the CSV file.
        columns: role → column name (only the names are checked; roles make the message readable).
        hint: how to rename columns, e.g. "LNDbDataset(columns=...)", appended to the error.

    Raises:
        FileNotFoundError: the file does not exist.
        AnnotationError: the file is empty or lacks a configured column.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise AnnotationError(
            f"{path} is empty; expected a header with {sorted(set(columns.values()))}"
        ) from None
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = {role: name for role, name in columns.items() if name not in frame.columns}
    if missing:
        wanted = ", ".join(f"{role}={name!r}" for role, name in missing.items())
        raise AnnotationError(
            f"{path} lacks column(s) {wanted}; it has {list(frame.columns)}. If your copy names them "
            f"differently, {columns_hint(missing)} (in Python: {hint})."
        )
    return frame


def cell_float(frame: pd.DataFrame, index: int, column: str, path: Path) -> float:
    """One numeric cell, or an AnnotationError naming file, line and column."""
    raw = frame.at[index, column]
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise AnnotationError(
            f"{path}, line {csv_line(index)}: column {column!r} is not a number: {raw!r}"
        ) from None
    if not np.isfinite(value):
        raise AnnotationError(f"{path}, line {csv_line(index)}: column {column!r} is {raw!r}")
    return value


def mhd_data_file(header: Path) -> Path | None:
    """The pixel file an .mhd header points to (None for LOCAL/LIST data or non-MHD files)."""
    if header.suffix.lower() != ".mhd":
        return None
    value = parse_mhd_header(header).get("ElementDataFile", "")
    if not value or value.upper() in ("LOCAL", "LIST") or value.upper().startswith("LIST") or "%" in value:
        return None
    return header.parent / value


def find_scans(
    root: Path,
    pattern: str = "*.mhd",
    name_regex: str | None = None,
    exclude_dirs: Iterable[str] = (),
    check_data_files: bool = True,
) -> dict[str, Path]:
    """Map scan uid (file stem) → image path for every matching file under `root`.

    Args:
        root: folder searched recursively.
        pattern: glob for image headers.
        name_regex: if given, only stems that fully match are scans (e.g. to skip reader masks).
        exclude_dirs: folder names whose contents are not scans (lung masks, segmentations).
        check_data_files: refuse an .mhd whose .raw/.zraw is missing (SPEC §9).

    Raises:
        AnnotationError: two files with the same uid, or a header whose pixel file is missing.
    """
    excluded = set(exclude_dirs)
    regex = re.compile(name_regex) if name_regex else None
    scans: dict[str, Path] = {}
    for path in sorted(root.rglob(pattern)):
        rel_parts = path.relative_to(root).parts[:-1]
        if excluded.intersection(rel_parts):
            continue
        uid = path.name[: -len(path.suffix)] if path.suffix else path.name
        if regex and not regex.fullmatch(uid):
            continue
        if uid in scans:
            raise AnnotationError(f"scan {uid!r} exists twice: {scans[uid]} and {path}; remove one copy")
        if check_data_files:
            data = mhd_data_file(path)
            if data is not None and not data.is_file():
                raise AnnotationError(
                    f"{path} points to pixel data {data.name} which is missing; re-extract it"
                )
        scans[uid] = path
    return scans


@dataclass(frozen=True)
class WorldColumns:
    """Column names of a LUNA16-style world-coordinate annotation CSV (Tianchi, spatio-temporal)."""

    seriesuid: str = "seriesuid"
    x: str = "coordX"
    y: str = "coordY"
    z: str = "coordZ"
    diameter: str = "diameter_mm"

    def as_dict(self) -> dict[str, str]:
        return {"seriesuid": self.seriesuid, "x": self.x, "y": self.y, "z": self.z, "diameter": self.diameter}

    def centre(self) -> tuple[str, str, str, str]:
        """The scan and world-centre columns in file order; every LUNA16-style table starts with them."""
        return (self.seriesuid, self.x, self.y, self.z)

    def header(self) -> tuple[str, ...]:
        """The header of an annotation CSV with these names, in LUNA16's order."""
        return (*self.centre(), self.diameter)


#: Header of LUNA16's annotations.csv and annotations_excluded.csv (Tianchi and the spatio-temporal set copy
#: it); the readers, the FROC evaluation and the synthetic trees all take it from here.
ANNOTATION_COLUMNS: tuple[str, ...] = WorldColumns().header()


def locate_in_scan(geo: ScanGeometry, xyz, where: str, what: str, scan: str) -> tuple[np.ndarray, str | None]:
    """The continuous voxel (z, y, x) of a world centre, and the problem to report if it is outside the scan.

    Every adapter checks its annotation centres against the scan header the same way and words the
    problem the same way, so a bad row reads alike whichever dataset it comes from.

    Args:
        geo: the scan's header geometry.
        xyz: world centre (x, y, z) mm.
        where: the file and line of the row ("annotations.csv, line 5").
        what: what the row holds ("nodule", "finding", "annotation").
        scan: how the message names the scan ("scan 12", "LNDb-0001").

    Returns:
        The voxel centre and None, or the voxel centre and the message for `RowPolicy.bad_row`.
    """
    zyx = geo.world_to_voxel(xyz)
    if geo.contains(zyx):
        return zyx, None
    return zyx, (
        f"{where}: {what} at world {tuple(round(float(v), 2) for v in xyz)} lies outside {scan} "
        f"(voxel {tuple(round(float(v), 1) for v in zyx)}, shape {geo.shape_zyx})" + _permuted_hint(geo, xyz)
    )


def _permuted_hint(geo: ScanGeometry, xyz) -> str:
    """A hint when the centre would lie inside the scan with its header's DimSize in another order."""
    for size in sorted(set(itertools.permutations(geo.size_xyz))):
        if size == tuple(geo.size_xyz):
            continue
        other = ScanGeometry(size, geo.spacing, geo.origin, geo.direction)  # type: ignore[arg-type]
        if other.contains(other.world_to_voxel(xyz)):
            return (
                f"; or the scan header's DimSize {' '.join(map(str, geo.size_xyz))} is permuted (with "
                f"{' '.join(map(str, size))} the centre is inside): check the header"
            )
    return ""


class GeometryCache:
    """Header geometry per scan, read once."""

    def __init__(self, scans: Mapping[str, Path]) -> None:
        self.scans = scans
        self._cache: dict[str, ScanGeometry] = {}

    def __call__(self, uid: str) -> ScanGeometry:
        if uid not in self._cache:
            self._cache[uid] = ScanGeometry.from_header(self.scans[uid])
        return self._cache[uid]


def world_nodules_from_csv(
    path: Path,
    scans: Mapping[str, Path],
    columns: WorldColumns,
    policy: RowPolicy,
    geometry: GeometryCache,
    hint: str,
) -> dict[str, list[Nodule]]:
    """Parse a LUNA16-style CSV (seriesuid, world x/y/z mm, diameter mm) into nodules per scan.

    Each nodule carries ``extras["voxel_zyx"]`` (continuous voxel centre) and ``extras["source"]``
    (file and line). Rows naming an unknown scan, with bad numbers, or whose centre falls outside the
    volume are reported through `policy`.
    """
    frame = read_table(path, columns.as_dict(), hint)
    if frame.empty:
        raise AnnotationError(f"{path} has a header but no annotation rows")
    out: dict[str, list[Nodule]] = {}
    for index in frame.index:
        line = csv_line(index)
        uid = str(frame.at[index, columns.seriesuid]).strip()
        if uid not in scans:
            policy.bad_row(f"{path}, line {line}: seriesuid {uid!r} has no scan under the dataset root")
            continue
        try:
            xyz = tuple(cell_float(frame, index, c, path) for c in (columns.x, columns.y, columns.z))
            diameter = cell_float(frame, index, columns.diameter, path)
        except AnnotationError as err:
            policy.bad_row(str(err))
            continue
        zyx, problem = locate_in_scan(
            geometry(uid), xyz, f"{path}, line {line}", "annotation", f"scan {uid!r}"
        )
        if problem:
            policy.bad_row(problem)
            continue
        nodule = Nodule(
            world_xyz=xyz,  # type: ignore[arg-type]
            diameter_mm=diameter,
            extras={"voxel_zyx": tuple(float(v) for v in zyx), "source": f"{path.name}:{line}"},
        )
        out.setdefault(uid, []).append(nodule)
    return out
