"""Tianchi (Alibaba Tianchi medical AI competition 2017) lung-nodule detection set.

Published layout: LUNA16-style MHD/RAW scans named by case id (``LKDS-00001.mhd``) in
``train_subset00`` … ``train_subsetNN`` / ``val_subsetNN`` / ``test_subsetNN`` folders, and an
``annotations.csv`` with the LUNA16 columns ``seriesuid, coordX, coordY, coordZ, diameter_mm`` (world mm)
— usually under ``csv/train/`` and ``csv/val/``. Detection only: no masks, no ratings.

What the adapter exposes: one `ScanRecord` per scan (``uid`` = ``patient_id`` = case id, one scan per
patient), nodules in world mm with ``extras["voxel_zyx"]``, the subset folder in
``extras["subset"]`` (``train_subset03``), its part in ``extras["part"]`` and its number in ``fold``.
Several annotation files (train + val) are merged.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

from common.datasets.base import ScanDataset, ScanRecord
from common.datasets.tables import (
    AnnotationError,
    GeometryCache,
    RowPolicy,
    WorldColumns,
    coerce_columns,
    find_scans,
    world_nodules_from_csv,
)

log = logging.getLogger(__name__)

ENV_VAR = "TIANCHI_ROOT"
SUBSET_REGEX = re.compile(r"(?:train|val|test)_subset(\d+)")


class TianchiDataset(ScanDataset):
    """The Tianchi tree.

    Args:
        root: dataset root (env ``TIANCHI_ROOT``).
        annotations: annotation CSV path(s) relative to root; default every ``annotations.csv`` found
            under the root (train and val are merged; a case annotated twice is an error).
        columns: CSV column names if your copy differs.
        strict: bad rows are errors (default) or logged skips.
    """

    name = "tianchi"
    env_var = ENV_VAR

    def __init__(
        self,
        root: str | Path,
        annotations: str | Path | Sequence[str | Path] | None = None,
        columns: WorldColumns | None = None,
        strict: bool = True,
    ) -> None:
        super().__init__(root)
        if annotations is None:
            self.annotation_files = sorted(self.root.rglob("annotations.csv"))
        else:
            names = [annotations] if isinstance(annotations, (str, Path)) else list(annotations)
            self.annotation_files = [p if Path(p).is_absolute() else self.root / p for p in map(Path, names)]
        self.columns = coerce_columns(columns, WorldColumns)
        self.policy = RowPolicy(strict, log)

    def _load_records(self) -> list[ScanRecord]:
        scans = find_scans(self.root, "*.mhd")
        if not scans:
            raise FileNotFoundError(
                f"no .mhd scans under {self.root}; point {ENV_VAR} at the Tianchi download or make a "
                f"stand-in with `lungdata synth tianchi --out {self.root}`"
            )
        if not self.annotation_files:
            raise FileNotFoundError(
                f"no annotations.csv under {self.root} (expected e.g. csv/train/annotations.csv)"
            )
        geometry = GeometryCache(scans)
        nodules: dict[str, list] = {}
        owner: dict[str, Path] = {}
        for path in self.annotation_files:
            parsed = world_nodules_from_csv(
                path, scans, self.columns, self.policy, geometry, "TianchiDataset(columns=WorldColumns(...))"
            )
            for uid, found in parsed.items():
                if uid in owner:
                    raise AnnotationError(f"case {uid!r} is annotated in both {owner[uid]} and {path}")
                owner[uid] = path
                nodules[uid] = found
        records = []
        for uid, image in scans.items():
            subset = next(
                (p for p in image.relative_to(self.root).parts[:-1] if SUBSET_REGEX.fullmatch(p)), None
            )
            records.append(
                ScanRecord(
                    uid=uid,
                    patient_id=uid,
                    image_path=image,
                    nodules=nodules.get(uid, []),
                    fold=int(SUBSET_REGEX.fullmatch(subset).group(1)) if subset else None,  # type: ignore[union-attr]
                    extras={"subset": subset, "part": subset.split("_")[0] if subset else None},
                )
            )
        return records
