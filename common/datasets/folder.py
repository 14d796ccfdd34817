"""Any folder of scans, for running trained models on new data (`lungdet predict`, `lungseg predict`).

Every `.mhd`, `.nii`/`.nii.gz` file and every folder holding DICOM files (one scan per series) becomes a
record without annotations. The uid is the file stem (LUNA16 files are named by series UID) or the DICOM
series UID, so results CSVs use the names a user recognises.
"""

from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

from common.datasets.base import ScanDataset, ScanRecord

SCAN_SUFFIXES = (".mhd", ".nii", ".nii.gz")


def _stem(path: Path) -> str:
    name = path.name
    for suffix in SCAN_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


class ScanFolderDataset(ScanDataset):
    """Scans found (recursively) under `root`; no annotations.

    Args:
        root: folder to search.
        strict: unused (no annotation tables to validate); accepted for a uniform adapter signature.
    """

    name = "folder"
    env_var = "SCAN_FOLDER"

    def __init__(self, root: str | Path, strict: bool = True) -> None:
        super().__init__(root)
        self.strict = strict

    def _load_records(self) -> list[ScanRecord]:
        records: list[ScanRecord] = []
        seen: set[str] = set()
        files = sorted(
            p for p in self.root.rglob("*") if p.is_file() and p.name.lower().endswith(SCAN_SUFFIXES)
        )
        for path in files:
            uid = _stem(path)
            records.append(ScanRecord(uid=uid, patient_id=uid, image_path=path))
            seen.add(uid)
        dicom_dirs = sorted({p.parent for p in self.root.rglob("*.dcm")})
        for folder in dicom_dirs:
            for series_uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or ():
                if series_uid in seen:
                    continue
                records.append(
                    ScanRecord(
                        uid=series_uid, patient_id=series_uid, image_path=folder, series_uid=series_uid
                    )
                )
                seen.add(series_uid)
        if not records:
            raise FileNotFoundError(
                f"no scans under {self.root}: expected .mhd, .nii(.gz) files or folders of DICOM (.dcm) files"
            )
        duplicates = len(files) - len({_stem(p) for p in files})
        if duplicates:
            raise ValueError(
                f"{self.root}: {duplicates} scan file names repeat in different folders; give each scan a "
                "unique file name so results can be traced back"
            )
        return records
