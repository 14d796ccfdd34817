"""LDFC: the lung-nodule dataset with histopathology-based cancer type annotation (LDFC, Sci. Data 2024).

Published layout (Zenodo 8422229, version 1; see the paper's "Data Records"):

* ``MHD_3D/<n>.mhd`` / ``.raw`` — one CT per patient, ``n`` = 1 … 95 (the folder may nest one level).
* ``all_anno_3D.csv`` — nodules in the image (voxel) frame: scan number, min/max and centre of x, y, z,
  and the diameter (voxels). Columns of the release: ``index`` (scan number), ``image``, ``x_min``,
  ``x_max``, ``y_min``, ``y_max``, ``z_min``, ``z_max``, then centre x/y/z and diameter.
* ``anno_WorldCoord.csv`` — the same nodules in world mm: scan number, centre x/y/z, diameter, radius.
* ``BMP_classification/{train,test}/{0,1,2}/`` — 2D nodule images per class: 0 benign,
  1 adenocarcinoma (AC), 2 squamous cell carcinoma (SCC); train:test = 4:1.
* ``BMP_2D/`` — VOC-style 2D detection: ``Image/`` (BMP), ``Annotations/`` (XML), ``ImageSets/``
  (``train.txt``, ``test.txt``).

The paper names the fields but not every header string; the defaults below follow the authors' code
(``index``, ``image``, ``x_min`` …) and the LUNA16 convention for the world file (``coordX`` …). Pass
:class:`LDFCColumns` when your copy differs — a missing column is an error that names both.

What the adapter exposes: `ScanRecord` per CT (``uid`` = ``patient_id`` = scan number as text), nodules
in world mm (from ``anno_WorldCoord.csv``) joined with their voxel boxes from ``all_anno_3D.csv``
(``extras["voxel_zyx"]``, ``extras["bbox_zyx"]`` = ((z0, y0, x0), (z1, y1, x1))); the cancer-type label
when a label column exists; :meth:`LDFCDataset.classification` (an :class:`ImageFolderIndex`) and
:meth:`LDFCDataset.detection_2d` (a :class:`VOCDetectionIndex`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.datasets.base import Nodule, ScanDataset, ScanRecord
from common.datasets.image_folders import ImageFolderIndex, VOCDetectionIndex
from common.datasets.tables import (
    AnnotationError,
    GeometryCache,
    RowPolicy,
    cell_float,
    coerce_columns,
    csv_line,
    find_scans,
    locate_in_scan,
    read_table,
)

log = logging.getLogger(__name__)

ENV_VAR = "LDFC_ROOT"
CLASS_FOLDERS = ("0", "1", "2")
CLASS_NAMES = {"0": "benign", "1": "adenocarcinoma", "2": "squamous cell carcinoma"}
# File names of the BMP sets carry no documented patient field; images we generate are named
# "<scan>_<slice>.bmp", and a real copy with the same habit gets patient ids for free.
DEFAULT_IMAGE_PATIENT_PATTERN = r"^(?P<patient>\d+)_"
# "<scan>_<slice>[_<k>]": the scan number, the axial slice and (our stand-in) the nodule's row in that scan.
IMAGE_NAME_PATTERN = re.compile(r"^(?P<scan>[^_]+)_(?P<slice>\d+)(?:_(?P<k>\d+))?$")


@dataclass(frozen=True)
class LDFCColumns:
    """Column names of the two LDFC annotation tables.

    Attributes:
        scan: scan number column, in both files.
        x_min … z_max, x_center … z_center, diameter_vox: the voxel table.
        world_x, world_y, world_z, diameter_mm, radius_mm: the world table.
        label: optional cancer-type column (0/1/2) in either table; used when present.
    """

    scan: str = "index"
    x_min: str = "x_min"
    x_max: str = "x_max"
    y_min: str = "y_min"
    y_max: str = "y_max"
    z_min: str = "z_min"
    z_max: str = "z_max"
    x_center: str = "x_center"
    y_center: str = "y_center"
    z_center: str = "z_center"
    diameter_vox: str = "diameter"
    world_x: str = "coordX"
    world_y: str = "coordY"
    world_z: str = "coordZ"
    diameter_mm: str = "diameter_mm"
    radius_mm: str = "radius"
    label: str = "label"

    def voxel(self) -> dict[str, str]:
        names = (
            "scan",
            "x_min",
            "x_max",
            "y_min",
            "y_max",
            "z_min",
            "z_max",
            "x_center",
            "y_center",
            "z_center",
        )
        return {n: getattr(self, n) for n in (*names, "diameter_vox")}

    def world(self) -> dict[str, str]:
        names = ("scan", "world_x", "world_y", "world_z", "diameter_mm", "radius_mm")
        return {n: getattr(self, n) for n in names}


def _scan_key(value: object) -> str:
    """Scan numbers appear as 1, "1", "0001" or "1.mhd"; the uid is the integer as text."""
    text = str(value).strip()
    if text.lower().endswith(".mhd"):
        text = text[:-4]
    return str(int(float(text)))


class LDFCDataset(ScanDataset):
    """The LDFC tree.

    Args:
        root: dataset root (env ``LDFC_ROOT``).
        mhd_dir: folder of the 3D scans.
        voxel_csv / world_csv: annotation tables; either may be None to use the other alone (world
            centres then come from voxel centres through the scan geometry, or the reverse).
        columns: column names if your copy differs.
        match_tolerance_mm: a voxel-table nodule and a world-table nodule are the same finding when their
            centres are within max(this, radius) mm.
        image_patient_pattern: regex with a ``patient`` group for the BMP file names.
        strict: bad rows are errors (default) or logged skips.
    """

    name = "ldfc"
    env_var = ENV_VAR
    class_names = CLASS_NAMES

    def __init__(
        self,
        root: str | Path,
        mhd_dir: str = "MHD_3D",
        voxel_csv: str | None = "all_anno_3D.csv",
        world_csv: str | None = "anno_WorldCoord.csv",
        columns: LDFCColumns | None = None,
        match_tolerance_mm: float = 3.0,
        image_patient_pattern: str | None = DEFAULT_IMAGE_PATIENT_PATTERN,
        strict: bool = True,
    ) -> None:
        super().__init__(root)
        if voxel_csv is None and world_csv is None:
            raise ValueError("LDFCDataset needs at least one of voxel_csv and world_csv")
        self.mhd_dir = self.root / mhd_dir
        self.voxel_csv = self._locate(voxel_csv)
        self.world_csv = self._locate(world_csv)
        self.columns = coerce_columns(columns, LDFCColumns)
        self.match_tolerance_mm = match_tolerance_mm
        self.image_patient_pattern = image_patient_pattern
        self.strict = strict
        self.policy = RowPolicy(strict, log)

    def _locate(self, name: str | None) -> Path | None:
        if name is None:
            return None
        direct = self.root / name
        if direct.exists():
            return direct
        found = sorted(self.root.rglob(Path(name).name))
        return found[0] if found else direct

    # ----------------------------------------------------------------- 3D
    def _load_records(self) -> list[ScanRecord]:
        if not self.mhd_dir.is_dir():
            raise FileNotFoundError(
                f"LDFC scan folder {self.mhd_dir} does not exist; point {ENV_VAR} at the extracted download "
                f"(MHD_3D.zip) or make a stand-in with `lungdata synth ldfc --out {self.root}`"
            )
        scans = find_scans(self.mhd_dir, "*.mhd")
        if not scans:
            raise FileNotFoundError(f"no .mhd scans in {self.mhd_dir}")
        scans = {_scan_key(uid): path for uid, path in scans.items()}
        geometry = GeometryCache(scans)
        voxel_rows = self._voxel_rows(scans, geometry) if self.voxel_csv is not None else None
        world_rows = self._world_rows(scans, geometry) if self.world_csv is not None else None
        records = []
        for uid in sorted(scans, key=int):
            nodules = self._join(uid, geometry, voxel_rows, world_rows)
            records.append(ScanRecord(uid=uid, patient_id=uid, image_path=scans[uid], nodules=nodules))
        return records

    def _table_rows(
        self,
        path: Path,
        columns: dict[str, str],
        scans: dict[str, Path],
        parse: Callable[[pd.DataFrame, int, Path, str], dict | str],
    ) -> dict[str, list[dict]]:
        """The rows of one annotation table, per scan uid, each with its file line and label.

        `parse(frame, index, path, uid)` reads one row that names a known scan: it returns the row's fields,
        or the problem with the row as text (unreadable cells may also raise `AnnotationError`); problems
        go to the row policy.
        """
        frame = read_table(path, columns, "LDFCDataset(columns=LDFCColumns(...))")
        if frame.empty:
            raise AnnotationError(f"{path} has a header but no annotation rows")
        out: dict[str, list[dict]] = {}
        for index in frame.index:
            uid = self._row_scan(frame, index, path, scans)
            if uid is None:
                continue
            try:
                row = parse(frame, index, path, uid)
            except AnnotationError as err:
                row = str(err)
            if isinstance(row, str):
                self.policy.bad_row(row)
                continue
            row["line"] = csv_line(index)
            row["label"] = self._label(frame, index, path)
            out.setdefault(uid, []).append(row)
        return out

    def _voxel_rows(self, scans: dict[str, Path], geometry: GeometryCache) -> dict[str, list[dict]]:
        c = self.columns

        def parse(frame: pd.DataFrame, index: int, path: Path, uid: str) -> dict | str:
            lo = [cell_float(frame, index, col, path) for col in (c.z_min, c.y_min, c.x_min)]
            hi = [cell_float(frame, index, col, path) for col in (c.z_max, c.y_max, c.x_max)]
            centre = [cell_float(frame, index, col, path) for col in (c.z_center, c.y_center, c.x_center)]
            diameter = cell_float(frame, index, c.diameter_vox, path)
            where = f"{path}, line {csv_line(index)}"
            if any(a > b for a, b in zip(lo, hi)) or not all(
                a - 1 <= m <= b + 1 for a, m, b in zip(lo, centre, hi)
            ):
                return f"{where}: box min {lo} / max {hi} / centre {centre} (z, y, x) disagree"
            geo = geometry(uid)
            if not (geo.contains(lo) and geo.contains(hi)):
                return (
                    f"{where}: box {lo}–{hi} (z, y, x voxels) lies outside scan {uid} "
                    f"of shape {geo.shape_zyx}"
                )
            return {"zyx": np.asarray(centre), "lo": lo, "hi": hi, "diameter_vox": diameter}

        assert self.voxel_csv is not None
        return self._table_rows(self.voxel_csv, c.voxel(), scans, parse)

    def _world_rows(self, scans: dict[str, Path], geometry: GeometryCache) -> dict[str, list[dict]]:
        c = self.columns

        def parse(frame: pd.DataFrame, index: int, path: Path, uid: str) -> dict | str:
            xyz = np.asarray(
                [cell_float(frame, index, col, path) for col in (c.world_x, c.world_y, c.world_z)]
            )
            diameter = cell_float(frame, index, c.diameter_mm, path)
            radius = cell_float(frame, index, c.radius_mm, path)
            where = f"{path}, line {csv_line(index)}"
            _, problem = locate_in_scan(geometry(uid), xyz, where, "nodule", f"scan {uid}")
            return problem or {"xyz": xyz, "diameter_mm": diameter, "radius_mm": radius}

        assert self.world_csv is not None
        return self._table_rows(self.world_csv, c.world(), scans, parse)

    def _row_scan(self, frame: pd.DataFrame, index: int, path: Path, scans: dict[str, Path]) -> str | None:
        raw = frame.at[index, self.columns.scan]
        try:
            uid = _scan_key(raw)
        except ValueError:
            self.policy.bad_row(f"{path}, line {csv_line(index)}: scan number {raw!r} is not a number")
            return None
        if uid not in scans:
            self.policy.bad_row(
                f"{path}, line {csv_line(index)}: scan {uid!r} has no {uid}.mhd in {self.mhd_dir}"
            )
            return None
        return uid

    def _label(self, frame: pd.DataFrame, index: int, path: Path) -> int | None:
        column = self.columns.label
        if column not in frame.columns or not str(frame.at[index, column]).strip():
            return None
        value = int(cell_float(frame, index, column, path))
        if str(value) not in CLASS_FOLDERS:
            raise AnnotationError(
                f"{path}, line {csv_line(index)}: label {value} is not one of {CLASS_FOLDERS}"
            )
        return value

    def _join(
        self,
        uid: str,
        geometry: GeometryCache,
        voxel_rows: dict[str, list[dict]] | None,
        world_rows: dict[str, list[dict]] | None,
    ) -> list[Nodule]:
        """Pair the two tables' nodules of one scan by nearest centre (greedy, within tolerance)."""
        geo = geometry(uid)
        vox = list((voxel_rows or {}).get(uid, []))
        wor = list((world_rows or {}).get(uid, []))
        nodules = []
        if world_rows is None:
            spacing_xy = float(np.mean(geo.spacing[:2]))
            for v in vox:
                xyz = geo.voxel_to_world(v["zyx"])
                d = v["diameter_vox"] * spacing_xy
                nodules.append(self._nodule(uid, xyz, d, v, None, geo))
            return nodules
        voxel_world = [geo.voxel_to_world(v["zyx"]) for v in vox]
        unmatched_vox = set(range(len(vox)))
        for w in wor:
            match = None
            if voxel_rows is not None:
                tolerance = max(self.match_tolerance_mm, w["radius_mm"])
                dists = {i: float(np.linalg.norm(voxel_world[i] - w["xyz"])) for i in unmatched_vox}
                best = min(dists, key=dists.get) if dists else None  # type: ignore[arg-type]
                if best is None or dists[best] > tolerance:
                    self.policy.bad_row(
                        f"{self.world_csv}, line {w['line']}: no nodule of scan {uid} in {self.voxel_csv} "
                        f"lies within {tolerance:.1f} mm of it"
                    )
                    continue
                unmatched_vox.discard(best)
                match = vox[best]
            nodules.append(self._nodule(uid, w["xyz"], w["diameter_mm"], match, w, geo))
        for i in sorted(unmatched_vox):
            self.policy.bad_row(
                f"{self.voxel_csv}, line {vox[i]['line']}: nodule of scan {uid} has no counterpart in "
                f"{self.world_csv}"
            )
        return nodules

    def _nodule(self, uid, xyz, diameter_mm, vox: dict | None, world: dict | None, geo) -> Nodule:
        zyx = vox["zyx"] if vox is not None else geo.world_to_voxel(xyz)
        labels = {r["label"] for r in (vox, world) if r is not None and r["label"] is not None}
        if len(labels) > 1:
            raise AnnotationError(
                f"scan {uid}: the two annotation tables give labels {sorted(labels)} to one nodule"
            )
        extras = {"voxel_zyx": tuple(float(v) for v in zyx)}
        sources = []
        if vox is not None:
            extras["bbox_zyx"] = (tuple(vox["lo"]), tuple(vox["hi"]))
            extras["diameter_vox"] = vox["diameter_vox"]
            sources.append(f"{self.voxel_csv.name}:{vox['line']}")  # type: ignore[union-attr]
        if world is not None:
            extras["radius_mm"] = world["radius_mm"]
            sources.append(f"{self.world_csv.name}:{world['line']}")  # type: ignore[union-attr]
        extras["source"] = ", ".join(sources)
        return Nodule(
            world_xyz=tuple(float(v) for v in xyz),  # type: ignore[arg-type]
            diameter_mm=float(diameter_mm),
            label=labels.pop() if labels else None,
            extras=extras,
        )

    # ----------------------------------------------------------------- 2D
    def classification(self, folder: str = "BMP_classification") -> ImageFolderIndex:
        """The cancer-type images: parts train/test, classes 0 benign, 1 AC, 2 SCC."""
        return ImageFolderIndex(
            self.root / folder,
            classes=CLASS_FOLDERS,
            parts=("train", "test"),
            class_descriptions=CLASS_NAMES,
            patient_pattern=self.image_patient_pattern,
            strict=self.strict,
        )

    def image_centres(self, paths: Sequence[Path]) -> list[tuple[float, float] | None]:
        """In-plane nodule centre (row, column pixels) of each classification image, None where unknown.

        Why: the nodule is a few pixels of a whole slice, so a classifier needs a crop around it. The image
        name ``<scan>_<slice>[_<k>]`` names the scan and slice; the nodule is the voxel-table row ``k`` of
        that scan when its box holds the slice, else the row whose box holds the slice with the nearest
        centre. Centres are in the stored voxel frame of the scan, the frame of the BMP slices.
        """
        by_uid = {r.uid: r for r in self.records}
        out: list[tuple[float, float] | None] = []
        for path in paths:
            match = IMAGE_NAME_PATTERN.match(Path(path).stem)
            record = by_uid.get(match["scan"]) if match else None
            if record is None:
                out.append(None)
                continue
            z = int(match["slice"])
            rows = [n for n in record.nodules if "bbox_zyx" in n.extras]
            holding = [n for n in rows if n.extras["bbox_zyx"][0][0] <= z <= n.extras["bbox_zyx"][1][0]]
            k = int(match["k"]) if match["k"] is not None else None
            if k is not None and k < len(rows) and rows[k] in holding:
                chosen = rows[k]
            elif holding:
                chosen = min(holding, key=lambda n: abs(n.extras["voxel_zyx"][0] - z))
            else:
                out.append(None)
                continue
            _, y, x = chosen.extras["voxel_zyx"]
            out.append((float(y), float(x)))
        return out

    def detection_2d(self, folder: str = "BMP_2D") -> VOCDetectionIndex:
        """The VOC-style 2D detection set (Image/, Annotations/, ImageSets/{train,test}.txt)."""
        return VOCDetectionIndex(
            self.root / folder, patient_pattern=self.image_patient_pattern, strict=self.strict
        )
