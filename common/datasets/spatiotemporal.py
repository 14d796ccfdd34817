"""The cross spatio-temporal pathology-based lung nodule dataset (STPD (Jian et al., preprint 2024); "STPD" here).

Published layout (Zenodo 8354947 part A, 8357533 part B; see the paper's "Data Records"):

* ``class_dataset/{train,validate}/{1..6}/`` — 2D nodule images (BMP) of six pathology classes:
  1 invasive adenocarcinoma, 2 minimally invasive adenocarcinoma, 3 adenocarcinoma in situ,
  4 other malignant subtypes, 5 inflammation, 6 other benign subtypes; train:validate = 5:1.
* 3D detection: MHD/RAW scans (``*_3D_detection_mhd0/1`` archives), lung-segmented copies in a
  ``lung_mask`` folder, and ``annotations.csv`` with world-mm nodule centres and diameters in the
  LUNA16 columns (``seriesuid, coordX, coordY, coordZ, diameter_mm``).
* 2D detection (VOC): ``JPEGImages/``, ``Annotations/*.xml``, ``ImageSets/Main/{train,val}.txt``.
* Several CT scans per patient taken at different times T1 … Tm (328 scans of 109 patients). They must
  stay in one split part, so every scan needs its patient id.

Patient ids. The release does not document a file-name scheme. By default a scan name
``<patient>_T<k>`` (or ``<patient>-T<k>``) yields patient and time point — the scheme of the stand-in
``lungdata synth spatiotemporal`` writes; a real copy with other names passes a regex
(``patient_pattern`` with groups ``patient`` and optional ``time``) or a CSV (``patient_table`` with
columns ``seriesuid, patient_id[, time_point]``). A scan matched by neither is its own patient, and
the adapter logs how many such scans there are, since their follow-ups cannot be kept together.

What the adapter exposes: `ScanRecord` per 3D scan with ``patient_id``, ``extras["time_point"]``,
nodules in world mm with ``extras["voxel_zyx"]``, the lung-segmented copy as ``lung_mask_path`` (it is
the CT with non-lung voxels removed, not a binary mask; see ``extras["lung_segmented_ct"]``);
:meth:`SpatioTemporalDataset.classification` and :meth:`SpatioTemporalDataset.detection_2d`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

from common.datasets.base import ScanDataset, ScanRecord
from common.datasets.image_folders import ImageFolderIndex, VOCDetectionIndex
from common.datasets.tables import (
    AnnotationError,
    GeometryCache,
    RowPolicy,
    WorldColumns,
    coerce_columns,
    csv_line,
    find_scans,
    read_table,
    world_nodules_from_csv,
)

log = logging.getLogger(__name__)

ENV_VAR = "STPD_ROOT"
CLASS_FOLDERS = ("1", "2", "3", "4", "5", "6")
CLASS_NAMES = {
    "1": "invasive adenocarcinoma",
    "2": "minimally invasive adenocarcinoma",
    "3": "adenocarcinoma in situ",
    "4": "other malignant subtypes",
    "5": "inflammation",
    "6": "other benign subtypes",
}
DEFAULT_PATIENT_PATTERN = r"^(?P<patient>.+?)[_-]T(?P<time>\d+)$"
# 2D images of the stand-in are named "<patient>_T<k>_<slice>"; the patient group covers real copies
# named the same way and leaves others unassigned (None).
DEFAULT_IMAGE_PATIENT_PATTERN = r"^(?P<patient>.+?)[_-]T\d+(?:[_-]|$)"
LUNG_MASK_DIR = "lung_mask"
NON_SCAN_DIRS = ("class_dataset", "JPEGImages", "Annotations", "ImageSets")


class SpatioTemporalDataset(ScanDataset):
    """The spatio-temporal pathology tree.

    Args:
        root: dataset root (env ``STPD_ROOT``).
        scan_dir: folder holding the 3D MHD scans (searched recursively); default the root.
        annotations: annotation CSV path(s) relative to root; default every ``annotations.csv`` found.
        columns: CSV column names if your copy differs.
        patient_pattern: regex on the scan uid with groups ``patient`` (and optional ``time``).
        patient_table: CSV mapping ``seriesuid`` → ``patient_id`` (and ``time_point``); wins over the regex.
        lung_mask_dir: name of the folder(s) holding the lung-segmented copies (not scans of their own).
        class_dir / voc_dir: the classification and 2D detection folders (VOC found automatically).
        image_patient_pattern: regex with a ``patient`` group for 2D image names.
        strict: bad rows are errors (default) or logged skips.
    """

    name = "spatiotemporal"
    env_var = ENV_VAR
    class_names = CLASS_NAMES

    def __init__(
        self,
        root: str | Path,
        scan_dir: str | None = None,
        annotations: str | Sequence[str] | None = None,
        columns: WorldColumns | None = None,
        patient_pattern: str | None = DEFAULT_PATIENT_PATTERN,
        patient_table: str | Path | None = None,
        lung_mask_dir: str = LUNG_MASK_DIR,
        class_dir: str = "class_dataset",
        voc_dir: str | None = None,
        image_patient_pattern: str | None = DEFAULT_IMAGE_PATIENT_PATTERN,
        strict: bool = True,
    ) -> None:
        super().__init__(root)
        self.scan_dir = self.root / scan_dir if scan_dir else self.root
        if annotations is None:
            self.annotation_files = sorted(self.root.rglob("annotations.csv"))
        else:
            names = [annotations] if isinstance(annotations, str) else list(annotations)
            self.annotation_files = [self.root / n for n in names]
        self.columns = coerce_columns(columns, WorldColumns)
        self.patient_pattern = re.compile(patient_pattern) if patient_pattern else None
        self.patient_table = Path(patient_table) if patient_table else None
        if self.patient_table is not None and not self.patient_table.is_absolute():
            self.patient_table = self.root / self.patient_table
        self.lung_mask_dir = lung_mask_dir
        self.class_dir = class_dir
        self.voc_dir = voc_dir
        self.image_patient_pattern = image_patient_pattern
        self.strict = strict
        self.policy = RowPolicy(strict, log)

    # ----------------------------------------------------------------- 3D
    def _load_records(self) -> list[ScanRecord]:
        if not self.scan_dir.is_dir():
            raise FileNotFoundError(f"scan folder {self.scan_dir} does not exist")
        scans = find_scans(self.scan_dir, "*.mhd", exclude_dirs=(self.lung_mask_dir, *NON_SCAN_DIRS))
        if not scans:
            raise FileNotFoundError(
                f"no .mhd scans under {self.scan_dir}; point {ENV_VAR} at the extracted download or make a "
                f"stand-in with `lungdata synth spatiotemporal --out {self.root}`"
            )
        if not self.annotation_files:
            raise FileNotFoundError(f"no annotations.csv under {self.root} (the 3D detection annotations)")
        lung_copies = {
            p.stem: p
            for p in self.root.rglob("*.mhd")
            if self.lung_mask_dir in p.relative_to(self.root).parts[:-1]
        }
        geometry = GeometryCache(scans)
        nodules: dict[str, list] = {}
        for path in self.annotation_files:
            parsed = world_nodules_from_csv(
                path,
                scans,
                self.columns,
                self.policy,
                geometry,
                "SpatioTemporalDataset(columns=WorldColumns(...))",
            )
            for uid, found in parsed.items():
                nodules.setdefault(uid, []).extend(found)
        identities = self._identities(scans)
        records = []
        unassigned = 0
        for uid, image in scans.items():
            patient, time_point = identities.get(uid, (None, None))
            if patient is None:
                unassigned += 1
                patient = uid
            records.append(
                ScanRecord(
                    uid=uid,
                    patient_id=patient,
                    image_path=image,
                    nodules=nodules.get(uid, []),
                    lung_mask_path=lung_copies.get(uid),
                    extras={"time_point": time_point, "lung_segmented_ct": uid in lung_copies},
                )
            )
        if unassigned:
            log.warning(
                "%d of %d scans match neither the patient pattern nor a patient table; each is treated as "
                "its own patient, so its follow-ups cannot be kept in one split part",
                unassigned,
                len(scans),
            )
        records.sort(key=lambda r: (r.patient_id, r.extras["time_point"] or 0, r.uid))
        return records

    def _identities(self, scans: dict[str, Path]) -> dict[str, tuple[str | None, int | None]]:
        out: dict[str, tuple[str | None, int | None]] = {}
        if self.patient_pattern is not None:
            for uid in scans:
                match = self.patient_pattern.fullmatch(uid)
                if match:
                    time = match.groupdict().get("time")
                    out[uid] = (match.group("patient"), int(time) if time else None)
        if self.patient_table is not None:
            frame = read_table(
                self.patient_table,
                {"seriesuid": "seriesuid", "patient_id": "patient_id"},
                "a CSV with columns seriesuid, patient_id[, time_point]",
            )
            for index in frame.index:
                uid = str(frame.at[index, "seriesuid"]).strip()
                patient = str(frame.at[index, "patient_id"]).strip()
                if uid not in scans:
                    self.policy.bad_row(
                        f"{self.patient_table}, line {csv_line(index)}: scan {uid!r} does not exist"
                    )
                    continue
                if not patient:
                    raise AnnotationError(f"{self.patient_table}, line {csv_line(index)}: empty patient_id")
                time = str(frame.at[index, "time_point"]).strip() if "time_point" in frame.columns else ""
                out[uid] = (patient, int(float(time)) if time else None)
        return out

    # ----------------------------------------------------------------- 2D
    def classification(self, parts: Sequence[str] = ("train", "validate")) -> ImageFolderIndex:
        """The six-class pathology images (``class_dataset/{train,validate}/{1..6}``)."""
        return ImageFolderIndex(
            self.root / self.class_dir,
            classes=CLASS_FOLDERS,
            parts=parts,
            class_descriptions=CLASS_NAMES,
            patient_pattern=self.image_patient_pattern,
            strict=self.strict,
        )

    def detection_2d(self) -> VOCDetectionIndex:
        """The VOC-style 2D detection set (JPEGImages/, Annotations/, ImageSets/Main/{train,val}.txt)."""
        if self.voc_dir is not None:
            voc_root = self.root / self.voc_dir
        else:
            candidates = sorted(
                p.parent for p in self.root.rglob("Annotations") if (p.parent / "ImageSets").is_dir()
            )
            if not candidates:
                raise FileNotFoundError(f"no VOC tree (Annotations/ + ImageSets/) under {self.root}")
            voc_root = candidates[0]
        return VOCDetectionIndex(voc_root, patient_pattern=self.image_patient_pattern, strict=self.strict)
