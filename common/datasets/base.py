"""Dataset-independent records that every adapter produces.

An adapter reads one dataset's published on-disk layout and turns it into `ScanRecord`s. Everything
downstream (the preprocessing cache, the datamodules, the metrics) only sees these records, so adding a
dataset never touches the training code.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Nodule:
    """One finding in world coordinates.

    Attributes:
        world_xyz: centre in world mm, (x, y, z) as in the LUNA16 CSVs.
        diameter_mm: equivalent diameter in mm (-1 where the dataset gives none, as LUNA16's excluded list).
        nodule_id: dataset-specific identifier (LIDC annotation ids, LNDb finding id, ...), if any.
        label: class label where the dataset defines one (malignancy, cancer type, pathology class).
        extras: everything else the dataset carries (ratings, reader ids, agreement, ...).
    """

    world_xyz: tuple[float, float, float]
    diameter_mm: float
    nodule_id: str | None = None
    label: int | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def radius_mm(self) -> float:
        return self.diameter_mm / 2.0


@dataclass
class ScanRecord:
    """One CT scan of a dataset, located on disk but not loaded.

    Attributes:
        uid: the scan key (LUNA16/LIDC series instance UID, LNDb id, ...). Never a patient name.
        patient_id: used for patient-level splits; follow-up scans of one patient share it.
        image_path: `.mhd` / `.nii(.gz)` file or a DICOM series folder.
        nodules: annotated findings.
        excluded: findings that must be neither hits nor false positives (LUNA16 `annotations_excluded`).
        lung_mask_path: a provided lung segmentation (LUNA16 `seg-lungs-LUNA16`), if any.
        fold: the dataset's own fold (LUNA16 subset index), if any.
        series_uid: DICOM series UID to pick inside a folder holding several series.
        extras: dataset-specific fields (time point, reader masks, ...).
    """

    uid: str
    patient_id: str
    image_path: Path
    nodules: list[Nodule] = field(default_factory=list)
    excluded: list[Nodule] = field(default_factory=list)
    lung_mask_path: Path | None = None
    fold: int | None = None
    series_uid: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def nodule_array(self) -> np.ndarray:
        """Nodules as an (N, 4) float array of world x, y, z and diameter (mm)."""
        rows = [(*n.world_xyz, n.diameter_mm) for n in self.nodules]
        return np.asarray(rows, dtype=np.float64).reshape(-1, 4)


class ScanDataset(abc.ABC):
    """A dataset as a list of scans; subclasses parse one published layout."""

    name: str = "dataset"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.exists():
            raise FileNotFoundError(
                f"{self.name} root {self.root} does not exist. Point the config or the environment variable at "
                f"your copy, or make a synthetic stand-in with `lungdata synth {self.name} --out {self.root}`."
            )
        self._records: list[ScanRecord] | None = None

    @abc.abstractmethod
    def _load_records(self) -> list[ScanRecord]:
        """Parse the layout into records (called once, cached)."""

    @property
    def records(self) -> list[ScanRecord]:
        if self._records is None:
            self._records = self._load_records()
        return self._records

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    def __getitem__(self, uid: str) -> ScanRecord:
        for record in self.records:
            if record.uid == uid:
                return record
        raise KeyError(f"{self.name}: no scan with uid {uid!r} under {self.root}")

    @property
    def uids(self) -> list[str]:
        return [r.uid for r in self.records]
