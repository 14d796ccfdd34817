"""A synthetic Tianchi tree: LUNA16-style MHD scans named by case id plus annotations.csv.

```
OUT/
  train_subset00/LKDS-00001.mhd + .raw …   training scans (LUNA16-style header, int16 HU)
  val_subset00/LKDS-000NN.mhd + .raw …     validation scans (the last quarter)
  csv/train/annotations.csv                seriesuid,coordX,coordY,coordZ,diameter_mm (world mm)
  csv/val/annotations.csv
  synth_manifest.json                      ours: the findings of every scan
```

The scans are B2's phantoms (`common.synth.scan.generate_scan`), so a Tianchi stand-in made with the same
seed as a LUNA16 stand-in has the same anatomy and nodules under other names. Tianchi annotates nodules
only (no excluded list, no masks, no ratings): the accepted nodules of each scan are written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from common import atomic
from common.atomic import csv_text

log = logging.getLogger(__name__)

HELP = "Tianchi tree: train_subsetNN/val_subsetNN LKDS-XXXXX.mhd, csv/{train,val}/annotations.csv"
DEFAULT_SCANS = 4
SCANS_PER_SUBSET = 100


@dataclass(frozen=True)
class TianchiTree:
    """What `make_tianchi` wrote."""

    root: Path
    case_ids: tuple[str, ...]
    n_train: int
    n_annotations: int

    def describe(self) -> str:
        return (
            f"  {len(self.case_ids)} scans ({self.n_train} train, {len(self.case_ids) - self.n_train} val), "
            f"{self.n_annotations} annotated nodules"
        )


def case_id(index: int) -> str:
    """Tianchi case id of scan `index` (0-based): LKDS-00001, …"""
    return f"LKDS-{index + 1:05d}"


def make_tianchi(
    out: str | Path, n_scans: int = DEFAULT_SCANS, seed: int = 0, size: str = "small", bank=None
) -> TianchiTree:
    """Generate `n_scans` phantoms and write them as a Tianchi tree under `out`."""
    from common.datasets.tables import ANNOTATION_COLUMNS
    from common.io import write_mhd
    from common.synth.luna16 import scan_volume
    from common.synth.manifest import manifest, scan_entry, start_tree, write_manifest
    from common.synth.scan import generate_scan

    root, bank = start_tree(out, n_scans, bank)
    n_train = n_scans - n_scans // 4
    rows: dict[str, list[tuple]] = {"train": [], "val": []}
    entries, ids = [], []
    for index in range(n_scans):
        part = "train" if index < n_train else "val"
        local = index if part == "train" else index - n_train
        scan = generate_scan(seed, index, size, bank)
        cid = case_id(index)
        image_path = root / f"{part}_subset{local // SCANS_PER_SUBSET:02d}" / f"{cid}.mhd"
        volume = scan_volume(scan)
        volume.series_uid = cid
        write_mhd(volume, image_path)
        for finding in scan.accepted:
            rows[part].append((cid, *(f"{v:.6f}" for v in finding.world_xyz), f"{finding.diameter_mm:.6f}"))
        entry = scan_entry(scan)
        entry.update(
            {"case_id": cid, "part": part, "files": {"image": image_path.relative_to(root).as_posix()}}
        )
        entries.append(entry)
        ids.append(cid)
    for part, part_rows in rows.items():
        if part == "val" and n_train == n_scans:
            continue
        atomic.write_text(root / "csv" / part / "annotations.csv", csv_text(ANNOTATION_COLUMNS, part_rows))
    write_manifest(root, manifest("tianchi", seed, size, entries, bank, {"n_train": n_train}))
    return TianchiTree(root, tuple(ids), n_train, sum(len(r) for r in rows.values()))
