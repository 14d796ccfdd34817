"""LNDb (Lung Nodule Database, CHUSJ Porto) in its challenge layout.

Published layout (lndb.grand-challenge.org; found recursively under the root, so the ``data0/`` …
``data5/`` and ``masks/`` folders of the download can stay as extracted):

* ``LNDb-XXXX.mhd`` / ``.raw`` — one CT per patient (LNDb id XXXX, 4 digits).
* ``LNDb-XXXX_radR.mhd`` — the segmentation of reader R for that CT. Voxel value = the reader's
  ``FindingID``; nodules ≥ 3 mm are segmented, nodules < 3 mm and non-nodules are centroids only.
* ``trainNodules.csv`` — one row per reader finding: ``LNDbID, RadID, FindingID, x, y, z, Nodule,
  Volume, Text`` (world mm centre, nodule 1 / non-nodule 0, volume mm³, texture rating 1–5).
* ``trainNodules_gt.csv`` — findings merged across readers: ``LNDbID, RadID, RadFindingID, FindingID,
  x, y, z, AgrLevel, Nodule, Volume, Text`` with comma-separated reader and reader-finding lists,
  AgrLevel = number of readers who marked it a nodule, Volume/Text reader means.
* ``trainFolds.csv`` (optional) — the challenge's four folds as columns ``Fold0`` … ``Fold3`` of LNDb ids.

What the adapter exposes per scan (`ScanRecord`): ``uid`` = ``patient_id`` = ``"LNDb-XXXX"``; nodules
(``Nodule == 1``) in world mm with ``extras["voxel_zyx"]``, the equivalent-sphere diameter from the
volume, the texture rating, agreement level, readers and their finding ids; non-nodules in
``excluded``; ``extras["reader_masks"]`` = {reader id: mask path}; the challenge fold in ``fold``.
Masks per reader and per merged finding come from :meth:`LNDbDataset.reader_mask` and
:meth:`LNDbDataset.finding_mask` (consensus at an agreement level).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from common.datasets.base import Nodule, ScanDataset, ScanRecord
from common.datasets.geometry import ScanGeometry
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

SCAN_REGEX = r"LNDb-\d{4}"
MASK_REGEX = re.compile(r"(?P<scan>LNDb-\d{4})_rad(?P<reader>\d+)")
ENV_VAR = "LNDB_ROOT"


def equivalent_diameter(volume_mm3: float) -> float:
    """Diameter (mm) of the sphere with the given volume — how LNDb turns segmented volumes into sizes."""
    return 2.0 * (3.0 * max(volume_mm3, 0.0) / (4.0 * math.pi)) ** (1.0 / 3.0)


def lndb_uid(lndb_id: int | str) -> str:
    """``LNDbID`` column value (e.g. 1) → scan uid ``LNDb-0001``."""
    return f"LNDb-{int(float(lndb_id)):04d}"


@dataclass(frozen=True)
class LNDbColumns:
    """Column names of the LNDb nodule tables (the challenge release's by default)."""

    lndb_id: str = "LNDbID"
    reader: str = "RadID"
    reader_finding: str = "RadFindingID"
    finding: str = "FindingID"
    x: str = "x"
    y: str = "y"
    z: str = "z"
    agreement: str = "AgrLevel"
    nodule: str = "Nodule"
    volume: str = "Volume"
    texture: str = "Text"


class LNDbDataset(ScanDataset):
    """The LNDb challenge tree.

    Args:
        root: dataset root (env ``LNDB_ROOT``).
        annotations: ``"gt"`` — merged findings from ``trainNodules_gt.csv`` (default, one nodule per
            physical finding); ``"readers"`` — every reader's finding from ``trainNodules.csv``.
        nodules_csv / gt_csv / folds_csv: file names or paths (relative to root) if renamed.
        columns: column names if your copy differs.
        min_agreement: with ``"gt"``, nodules marked by fewer readers go to ``excluded``.
        strict: bad rows are errors (default) or logged skips.
    """

    name = "lndb"
    env_var = ENV_VAR

    def __init__(
        self,
        root: str | Path,
        annotations: str = "gt",
        nodules_csv: str | Path = "trainNodules.csv",
        gt_csv: str | Path = "trainNodules_gt.csv",
        folds_csv: str | Path = "trainFolds.csv",
        columns: LNDbColumns | None = None,
        min_agreement: int = 1,
        strict: bool = True,
    ) -> None:
        super().__init__(root)
        if annotations not in ("gt", "readers"):
            raise ValueError(f"annotations must be 'gt' or 'readers', got {annotations!r}")
        self.annotations = annotations
        self.nodules_csv = self._locate(nodules_csv)
        self.gt_csv = self._locate(gt_csv)
        self.folds_csv = self._locate(folds_csv)
        self.columns = coerce_columns(columns, LNDbColumns)
        self.min_agreement = min_agreement
        self.policy = RowPolicy(strict, log)

    def _locate(self, name: str | Path) -> Path:
        """A table at `root/name`, else the first match anywhere under root (downloads nest them)."""
        path = Path(name)
        if path.is_absolute() or (self.root / path).exists():
            return path if path.is_absolute() else self.root / path
        found = sorted(self.root.rglob(path.name))
        return found[0] if found else self.root / path

    # ----------------------------------------------------------------- parsing
    def _load_records(self) -> list[ScanRecord]:
        scans = find_scans(self.root, "LNDb-*.mhd", name_regex=SCAN_REGEX)
        if not scans:
            raise FileNotFoundError(
                f"no LNDb-XXXX.mhd scans under {self.root}; point {ENV_VAR} at the LNDb download or make a "
                f"stand-in with `lungdata synth lndb --out {self.root}`"
            )
        masks: dict[str, dict[int, Path]] = {}
        for path in sorted(self.root.rglob("LNDb-*_rad*.mhd")):
            match = MASK_REGEX.fullmatch(path.stem)
            if match:
                masks.setdefault(match["scan"], {})[int(match["reader"])] = path
        geometry = GeometryCache(scans)
        table = self.gt_csv if self.annotations == "gt" else self.nodules_csv
        findings = self._parse_findings(table, scans, geometry)
        folds = self._parse_folds(scans) if self.folds_csv.is_file() else {}
        records = []
        for uid, path in scans.items():
            nodules, excluded = findings.get(uid, ([], []))
            records.append(
                ScanRecord(
                    uid=uid,
                    patient_id=uid,
                    image_path=path,
                    nodules=nodules,
                    excluded=excluded,
                    fold=folds.get(uid),
                    extras={"reader_masks": masks.get(uid, {}), "annotation_table": table.name},
                )
            )
        return records

    def _parse_findings(
        self, path: Path, scans: dict[str, Path], geometry: GeometryCache
    ) -> dict[str, tuple[list[Nodule], list[Nodule]]]:
        c = self.columns
        gt = self.annotations == "gt"
        required = {
            "lndb_id": c.lndb_id,
            "reader": c.reader,
            "finding": c.finding,
            "x": c.x,
            "y": c.y,
            "z": c.z,
            "nodule": c.nodule,
            "volume": c.volume,
            "texture": c.texture,
        }
        if gt:
            required.update({"reader_finding": c.reader_finding, "agreement": c.agreement})
        frame = read_table(path, required, "LNDbDataset(columns=LNDbColumns(...))")
        known = set(required.values())
        out: dict[str, tuple[list[Nodule], list[Nodule]]] = {}
        for index in frame.index:
            line = csv_line(index)
            try:
                uid = lndb_uid(frame.at[index, c.lndb_id])
            except ValueError:
                self.policy.bad_row(
                    f"{path}, line {line}: {c.lndb_id} {frame.at[index, c.lndb_id]!r} is not a number"
                )
                continue
            if uid not in scans:
                self.policy.bad_row(
                    f"{path}, line {line}: {c.lndb_id} refers to {uid} which has no scan under {self.root}"
                )
                continue
            try:
                xyz = tuple(cell_float(frame, index, col, path) for col in (c.x, c.y, c.z))
                is_nodule = int(cell_float(frame, index, c.nodule, path)) == 1
                # Non-nodules carry no segmentation: their volume/texture may be blank.
                blank_ok = not is_nodule
                volume = _float_or_zero(frame, index, c.volume, path, blank_ok)
                texture = _float_or_zero(frame, index, c.texture, path, blank_ok)
                finding = int(cell_float(frame, index, c.finding, path))
                readers = _int_list(frame.at[index, c.reader], path, line, c.reader)
                reader_findings = (
                    _int_list(frame.at[index, c.reader_finding], path, line, c.reader_finding)
                    if gt
                    else [finding]
                )
                agreement = int(cell_float(frame, index, c.agreement, path)) if gt else int(is_nodule)
            except AnnotationError as err:
                self.policy.bad_row(str(err))
                continue
            if len(readers) != len(reader_findings):
                self.policy.bad_row(
                    f"{path}, line {line}: {len(readers)} readers but {len(reader_findings)} reader "
                    "finding ids"
                )
                continue
            zyx, problem = locate_in_scan(geometry(uid), xyz, f"{path}, line {line}", "finding", uid)
            if problem:
                self.policy.bad_row(problem)
                continue
            extras = {
                "voxel_zyx": tuple(float(v) for v in zyx),
                "volume_mm3": volume,
                "texture": texture,
                "agreement": agreement,
                "readers": readers,
                "reader_finding_ids": reader_findings,
                "source": f"{path.name}:{line}",
            }
            extras.update({k: frame.at[index, k] for k in frame.columns if k not in known})
            nodule = Nodule(
                world_xyz=xyz,  # type: ignore[arg-type]
                diameter_mm=equivalent_diameter(volume) if is_nodule else -1.0,
                nodule_id=f"{finding}" if gt else f"r{readers[0]}f{finding}",
                extras=extras,
            )
            nodules, excluded = out.setdefault(uid, ([], []))
            (nodules if is_nodule and agreement >= self.min_agreement else excluded).append(nodule)
        return out

    def _parse_folds(self, scans: dict[str, Path]) -> dict[str, int]:
        """The challenge fold table: columns Fold0…FoldK, each listing LNDb ids."""
        try:
            frame = pd.read_csv(self.folds_csv, dtype=str, keep_default_na=False)
        except pd.errors.EmptyDataError:
            raise AnnotationError(f"{self.folds_csv} is empty; expected columns Fold0, Fold1, …") from None
        fold_cols = [col for col in frame.columns if re.fullmatch(r"Fold\d+", str(col).strip())]
        if not fold_cols:
            raise AnnotationError(f"{self.folds_csv} has no Fold<k> columns (has {list(frame.columns)})")
        folds: dict[str, int] = {}
        for col in fold_cols:
            k = int(str(col).strip()[4:])
            for index, value in frame[col].items():
                if not str(value).strip():
                    continue
                uid = lndb_uid(value)
                if uid in folds and folds[uid] != k:
                    raise AnnotationError(
                        f"{self.folds_csv}, line {csv_line(index)}: {uid} is in Fold{folds[uid]} and {col}"
                    )
                folds[uid] = k
        return folds

    # ----------------------------------------------------------------- masks
    def reader_mask(self, uid: str, reader: int) -> np.ndarray:
        """Reader `reader`'s label mask of scan `uid`, (z, y, x) int; voxel value = that reader's FindingID.

        Raises:
            KeyError: the reader segmented nothing for this scan (no mask file).
        """
        paths = self[uid].extras["reader_masks"]
        if reader not in paths:
            raise KeyError(f"{uid}: no mask of reader {reader} (available: {sorted(paths)})")
        image = sitk.ReadImage(str(paths[reader]))
        return sitk.GetArrayFromImage(image)

    def finding_mask(self, uid: str, nodule: Nodule, agreement: float = 0.5) -> np.ndarray:
        """Consensus mask of one (merged) finding: voxels marked by ≥ `agreement` of its readers.

        Readers that marked the finding but have no segmentation of it (nodules < 3 mm) do not count.

        Returns:
            bool array (z, y, x); all False when no reader segmented the finding.
        """
        readers = nodule.extras.get("readers", [])
        finding_ids = nodule.extras.get("reader_finding_ids", [])
        votes = None
        count = 0
        for reader, finding in zip(readers, finding_ids):
            try:
                labels = self.reader_mask(uid, reader)
            except KeyError:
                continue
            marked = labels == finding
            if not marked.any():
                continue
            votes = marked.astype(np.int16) if votes is None else votes + marked
            count += 1
        if votes is None:
            return np.zeros(self._shape(uid), dtype=bool)
        return votes >= max(1, math.ceil(agreement * count - 1e-9))

    def _shape(self, uid: str) -> tuple[int, int, int]:
        return ScanGeometry.from_header(self[uid].image_path).shape_zyx


def _float_or_zero(frame: pd.DataFrame, index: int, column: str, path: Path, blank_ok: bool) -> float:
    if blank_ok and not str(frame.at[index, column]).strip():
        return 0.0
    return cell_float(frame, index, column, path)


def _int_list(value: object, path: Path, line: int, column: str) -> list[int]:
    """``"1,3"`` / ``"2"`` / ``2.0`` → [1, 3] / [2] / [2]."""
    text = str(value).strip().strip('"')
    try:
        return [int(float(v)) for v in re.split(r"[;,\s]+", text) if v]
    except ValueError:
        raise AnnotationError(
            f"{path}, line {line}: column {column!r} is not a list of ids: {value!r}"
        ) from None
