"""A synthetic LDFC tree (Sci. Data 2024) in the layout of the Zenodo release.

```
OUT/
  MHD_3D/<n>.mhd + .raw        n = 1 … N, one phantom CT per patient (int16 HU, common.io.write_mhd)
  all_anno_3D.csv              index,image,x_min,x_max,y_min,y_max,z_min,z_max,x_center,y_center,
                               z_center,diameter (stored voxel indices; centre = box centre; diameter =
                               x extent in voxels)
  anno_WorldCoord.csv          index,coordX,coordY,coordZ,diameter_mm,radius   (world mm of the box centre)
  BMP_classification/{train,test}/{0,1,2}/<n>_<slice>_<k>.bmp   axial slice through nodule k, [−1200, 600] HU
  BMP_2D/Image/<n>_<slice>.bmp, BMP_2D/Annotations/<n>_<slice>.xml, BMP_2D/ImageSets/{train,test}.txt
  synth_manifest.json          ours: per nodule its class, LIDC annotation ids and mean ratings
```

Each patient gets ``nodules_per_scan`` nodules (default 3, the release averages 3.5), classes 0 benign,
1 adenocarcinoma, 2 squamous, assigned so that the training and the test patients each cover every class;
the class follows from the LIDC ratings of the real nodule (see `common.synth.pathology`). The train:test
split of the 2D sets is 4:1 by patient, never by image. The release's BMP_3D and DICOM parts are not
generated (no adapter reads them). Images keep the phantom's matrix (160 × 160 at the small preset).
Every fourth patient from the second on is stored with the flipped LUNA16 direction (−1, −1, 1), so
world↔voxel code is exercised on both orientations even in a two-scan tree.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from common import atomic
from common.atomic import csv_text
from common.synth.pathology_tree import (
    scan_entry,
    start_pathology_tree,
    write_class_images,
    write_voc_slices,
)

log = logging.getLogger(__name__)

HELP = "LDFC tree: MHD_3D/<n>.mhd, all_anno_3D.csv, anno_WorldCoord.csv, BMP_classification, BMP_2D (VOC)"
DEFAULT_SCANS = 5
CLASSES = (0, 1, 2)
TEST_FRACTION = 0.2


@dataclass(frozen=True)
class LDFCTree:
    """What `make_ldfc` wrote."""

    root: Path
    n_scans: int
    n_nodules: int
    n_class_images: dict[str, dict[str, int]]
    n_voc_images: dict[str, int]

    def describe(self) -> str:
        counts = ", ".join(f"{part}: {sum(c.values())}" for part, c in self.n_class_images.items())
        return (
            f"  {self.n_scans} scans, {self.n_nodules} nodules; classification images {counts}; "
            f"VOC images {self.n_voc_images} (see synth_manifest.json)"
        )


def _fmt(value: float) -> str:
    return f"{value:.6f}"


def make_ldfc(
    out: str | Path,
    n_scans: int = DEFAULT_SCANS,
    seed: int = 0,
    size: str = "small",
    nodules_per_scan: int = 3,
    bank=None,
) -> LDFCTree:
    """Generate an LDFC stand-in with `n_scans` patients under `out`.

    Raises:
        ValueError: too few scans for a train and a test part that both hold every class.
    """
    from common.datasets.ldfc import CLASS_NAMES, LDFCColumns
    from common.io import write_mhd
    from common.synth.luna16 import scan_volume
    from common.synth.manifest import manifest, write_manifest
    from common.synth.pathology import balanced_labels, generate_patient, held_out_patients, ldfc_class

    root, bank, decks = start_pathology_tree(out, n_scans, bank, ldfc_class, CLASSES, size, seed)
    test = set(held_out_patients(n_scans, TEST_FRACTION, math.ceil(len(CLASSES) / nodules_per_scan)))
    labels = balanced_labels(CLASSES, n_scans, nodules_per_scan, sorted(test))

    voxel_rows, world_rows, entries = [], [], []
    class_counts = {part: {str(c): 0 for c in CLASSES} for part in ("train", "test")}
    voc_lists: dict[str, list[str]] = {"train": [], "test": []}
    n_nodules = 0
    for p in range(n_scans):
        number = str(p + 1)
        part = "test" if p in test else "train"
        (scan,) = generate_patient(
            seed,
            p,
            labels[p],
            decks,
            lambda _t, n=number: n,
            patient=number,
            size=size,
            bank=bank,
            flip=p % 4 == 1,
        )
        image_path = root / "MHD_3D" / f"{number}.mhd"
        write_mhd(scan_volume(scan), image_path)
        for nodule in scan.nodules:
            lo, hi = nodule.bbox_lo, nodule.bbox_hi
            centre_zyx = [(a + b) / 2.0 for a, b in zip(lo, hi)]
            world = scan_volume(scan).voxel_to_world(centre_zyx)[0]
            voxel_rows.append(
                (
                    number,
                    f"{number}.mhd",
                    lo[2],
                    hi[2],
                    lo[1],
                    hi[1],
                    lo[0],
                    hi[0],
                    *map(_fmt, centre_zyx[::-1]),
                    hi[2] - lo[2],
                )
            )
            world_rows.append(
                (number, *map(_fmt, world), _fmt(nodule.diameter_mm), _fmt(nodule.diameter_mm / 2))
            )
        n_nodules += len(scan.nodules)
        slices = write_class_images(scan, root / "BMP_classification" / part, class_counts[part])
        voc_lists[part] += write_voc_slices(scan, slices, root / "BMP_2D", "Image", ".bmp")
        entry = scan_entry(scan, scan.geometry)
        entry.update({"part": part, "files": {"image": image_path.relative_to(root).as_posix()}})
        entries.append(entry)
        log.debug("synthetic LDFC scan %d/%d written", p + 1, n_scans)

    # the headers the adapter reads by default; the voxel table also names its image file
    columns = LDFCColumns()
    voxel_header = [columns.scan, "image", *list(columns.voxel().values())[1:]]
    atomic.write_text(root / "all_anno_3D.csv", csv_text(voxel_header, voxel_rows))
    atomic.write_text(root / "anno_WorldCoord.csv", csv_text(list(columns.world().values()), world_rows))
    for part, names in voc_lists.items():
        atomic.write_text(root / "BMP_2D" / "ImageSets" / f"{part}.txt", "\n".join(names) + "\n")
    extra = {"classes": dict(CLASS_NAMES), "class_rule": "ldfc_class"}
    write_manifest(root, manifest("ldfc", seed, size, entries, bank, extra))
    return LDFCTree(root, n_scans, n_nodules, class_counts, {k: len(v) for k, v in voc_lists.items()})
