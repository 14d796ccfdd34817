"""A synthetic LNDb tree in the layout of the LNDb challenge release.

```
OUT/
  data0/LNDb-0001.mhd + .raw …           CTs (int16 HU), 60 per data<k> folder as in the download zips
  masks/LNDb-0001_rad<R>.mhd + .zraw …   reader R's segmentation of that CT; voxel value = R's FindingID
  trainNodules.csv      LNDbID,RadID,FindingID,x,y,z,Nodule,Volume,Text   (one row per reader finding)
  trainNodules_gt.csv   LNDbID,RadID,RadFindingID,FindingID,x,y,z,AgrLevel,Nodule,Volume,Text  (merged)
  trainFolds.csv        Fold0,Fold1,Fold2,Fold3 (LNDb ids per challenge fold)
  synth_manifest.json   ours: per finding its LIDC annotation ids, readers and merged values
```

The scans and findings are B2's phantoms (`common.synth.scan.generate_scan`): LIDC nodules ≥ 3 mm with
one real contour-derived mask per reader, nodules < 3 mm and non-nodules marked by their centre only —
which is exactly how LNDb annotates (segmentations only for nodules ≥ 3 mm). Each scan is read by as
many of LNDb's five radiologists (ids 1–5, drawn per scan) as its most-read finding needs. Per reader:
centre = centroid of that reader's mask (world mm), Volume = mask volume (mm³), Text = that reader's
LIDC texture rating. The merged table follows the challenge's merging rules: mean centre, AgrLevel =
readers calling it a nodule, mean volume and texture for nodules; non-nodules get AgrLevel 0, the volume
of a 3 mm sphere and texture 0.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common import atomic
from common.atomic import csv_text

log = logging.getLogger(__name__)

HELP = "LNDb tree: dataK/LNDb-XXXX.mhd, masks/LNDb-XXXX_radR.mhd, trainNodules(_gt).csv, trainFolds.csv"
DEFAULT_SCANS = 4
SCANS_PER_DATA_FOLDER = 60
N_RADIOLOGISTS = 5
N_FOLDS = 4
READER_COLUMNS = ("LNDbID", "RadID", "FindingID", "x", "y", "z", "Nodule", "Volume", "Text")
GT_COLUMNS = (
    "LNDbID",
    "RadID",
    "RadFindingID",
    "FindingID",
    "x",
    "y",
    "z",
    "AgrLevel",
    "Nodule",
    "Volume",
    "Text",
)
NON_NODULE_VOLUME = 4.0 * math.pi * 1.5**3 / 3.0


@dataclass
class LNDbTree:
    """What `make_lndb` wrote; `findings` holds the merged truth per scan uid (for tests and reports)."""

    root: Path
    uids: tuple[str, ...]
    n_reader_rows: int
    n_findings: int
    findings: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def describe(self) -> str:
        return (
            f"  {len(self.uids)} scans, {self.n_findings} findings, {self.n_reader_rows} reader annotations"
        )


def _f(value: float) -> str:
    return f"{value:.6f}"


def make_lndb(
    out: str | Path, n_scans: int = DEFAULT_SCANS, seed: int = 0, size: str = "small", bank=None
) -> LNDbTree:
    """Generate `n_scans` phantoms and write them as an LNDb tree under `out`."""
    from common.io import write_mhd
    from common.synth.luna16 import scan_volume
    from common.synth.manifest import manifest, scan_entry, start_tree, write_manifest
    from common.synth.scan import generate_scan

    root, bank = start_tree(out, n_scans, bank)
    reader_rows, gt_rows, entries, uids = [], [], [], []
    truth: dict[str, list[dict[str, Any]]] = {}
    for index in range(n_scans):
        lndb_id = index + 1
        uid = f"LNDb-{lndb_id:04d}"
        scan = generate_scan(seed, index, size, bank)
        image_path = root / f"data{index // SCANS_PER_DATA_FOLDER}" / f"{uid}.mhd"
        write_mhd(scan_volume(scan), image_path)
        voxel_mm3 = float(np.prod(scan.geometry.spacing))
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, index, 0x1D0B])))
        n_readers = int(np.clip(max((f.n_readers for f in scan.findings), default=1), 1, 4))
        readers = sorted(
            int(r) for r in rng.choice(np.arange(1, N_RADIOLOGISTS + 1), n_readers, replace=False)
        )
        masks = {r: np.zeros(scan.image.shape, dtype=np.uint8) for r in readers}
        next_id = dict.fromkeys(readers, 1)
        merged = []
        for k, finding in enumerate(scan.findings, start=1):
            count = min(finding.n_readers, n_readers)
            if finding.category == "nodule":
                count = min(count, len(finding.reader_masks))
            marked_by = sorted(int(r) for r in rng.choice(readers, count, replace=False))
            per_reader = []
            for j, reader in enumerate(marked_by):
                fid = next_id[reader]
                next_id[reader] += 1
                if finding.category == "nodule":
                    rm = finding.reader_masks[j]
                    box = tuple(slice(s, s + n) for s, n in zip(rm.start, rm.mask.shape))
                    masks[reader][box][rm.mask] = fid
                    centre = scan.storage_to_world(np.argwhere(rm.mask).mean(axis=0) + np.asarray(rm.start))
                    volume = float(rm.mask.sum()) * voxel_mm3
                    texture = float(finding.bank.reader_ratings[j]["texture"])  # type: ignore[union-attr]
                    nodule = 1
                elif finding.category == "small-nodule":
                    centre = np.asarray(finding.world_xyz) + rng.normal(scale=0.2, size=3)
                    volume = math.pi * finding.diameter_mm**3 / 6.0
                    texture, nodule = 5.0, 1
                else:
                    centre = np.asarray(finding.world_xyz) + rng.normal(scale=0.2, size=3)
                    volume, texture, nodule = 0.0, 0.0, 0
                per_reader.append(
                    (reader, fid, np.asarray(centre, dtype=np.float64), volume, texture, nodule)
                )
                reader_rows.append((lndb_id, reader, fid, *map(_f, centre), nodule, _f(volume), _f(texture)))
            is_nodule = finding.category != "non-nodule"
            centre = np.mean([p[2] for p in per_reader], axis=0)
            volume = float(np.mean([p[3] for p in per_reader])) if is_nodule else NON_NODULE_VOLUME
            texture = float(np.mean([p[4] for p in per_reader])) if is_nodule else 0.0
            agreement = len(per_reader) if is_nodule else 0
            gt_rows.append(
                (
                    lndb_id,
                    ",".join(str(p[0]) for p in per_reader),
                    ",".join(str(p[1]) for p in per_reader),
                    k,
                    *map(_f, centre),
                    agreement,
                    int(is_nodule),
                    _f(volume),
                    _f(texture),
                )
            )
            merged.append(
                {
                    "finding_id": k,
                    "category": finding.category,
                    "world_xyz": [float(v) for v in centre],
                    "readers": [p[0] for p in per_reader],
                    "reader_finding_ids": [p[1] for p in per_reader],
                    "agreement": agreement,
                    "volume_mm3": volume,
                    "segmented": finding.category == "nodule",
                    "source_finding": finding.finding_id,
                }
            )
        mask_files = {}
        for reader, labels in masks.items():
            mask_path = root / "masks" / f"{uid}_rad{reader}.mhd"
            write_mhd(scan_volume(scan, labels), mask_path, compress=True)
            mask_files[str(reader)] = mask_path.relative_to(root).as_posix()
        truth[uid] = merged
        entry = scan_entry(scan)
        entry.update(
            {
                "lndb_id": lndb_id,
                "readers": readers,
                "lndb_findings": merged,
                "files": {"image": image_path.relative_to(root).as_posix(), "reader_masks": mask_files},
            }
        )
        entries.append(entry)
        uids.append(uid)

    atomic.write_text(root / "trainNodules.csv", csv_text(READER_COLUMNS, reader_rows))
    atomic.write_text(root / "trainNodules_gt.csv", csv_text(GT_COLUMNS, gt_rows))
    folds = [[i + 1 for i in range(n_scans) if i % N_FOLDS == k] for k in range(N_FOLDS)]
    depth = max(len(f) for f in folds)
    fold_rows = [[f[r] if r < len(f) else "" for f in folds] for r in range(depth)]
    atomic.write_text(root / "trainFolds.csv", csv_text([f"Fold{k}" for k in range(N_FOLDS)], fold_rows))
    write_manifest(root, manifest("lndb", seed, size, entries, bank, {"radiologists": N_RADIOLOGISTS}))
    return LNDbTree(root, tuple(uids), len(reader_rows), len(gt_rows), truth)
