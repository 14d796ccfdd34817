"""A synthetic cross spatio-temporal pathology tree (STPD, Jian et al., preprint 2024) in the layout of the release.

```
OUT/
  class_dataset/{train,validate}/{1..6}/<patient>_T<k>_<slice>_<n>.bmp   axial slice through nodule n
  class_dataset/READ_ME.txt                         images per class and part (the release has one too)
  detection_3d/mhd/<patient>_T<k>.mhd + .raw        one phantom CT per patient and time point
  detection_3d/lung_mask/<patient>_T<k>.mhd + .raw  the CT with non-lung voxels set to −1000 HU
  detection_3d/annotations.csv                      seriesuid,coordX,coordY,coordZ,diameter_mm (world mm)
  detection_2d/JPEGImages/<patient>_T<k>_<slice>.jpg, Annotations/*.xml, ImageSets/Main/{train,val}.txt
  synth_manifest.json                               ours: per nodule its class, LIDC ids and ratings
```

Patients ``P0001`` … have 1–3 scans (T1, T2, … in the pattern 2, 1, 2, 1, 3, …) until `n_scans` scans
are written; follow-ups share anatomy and nodule positions and the nodules grow 10% per time point.
Each patient has ``nodules_per_scan`` nodules (default 3) of the six pathology classes, assigned so that
both the training and the validation patients cover all six; the class follows from the LIDC ratings of
the real nodule (`common.synth.pathology.stpd_class`). Classification, 2D detection and 3D detection all
split 5:1 / 4:1 *by patient*, so a patient's time points never straddle parts. The 5 mm and 1.25 mm
variants of the release are not distinguished (the phantom draws 1.25–2.5 mm slices). Every fourth
patient from the second on is stored with the flipped LUNA16 direction (−1, −1, 1).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
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

HELP = "spatio-temporal pathology tree: class_dataset/{train,validate}/{1..6}, MHD + annotations.csv, VOC 2D"
DEFAULT_SCANS = 6
CLASSES = (1, 2, 3, 4, 5, 6)
VALIDATE_FRACTION = 1 / 6
TIME_POINT_PATTERN = (2, 1, 2, 1, 3)


@dataclass(frozen=True)
class SpatioTemporalTree:
    """What `make_spatiotemporal` wrote."""

    root: Path
    n_patients: int
    n_scans: int
    n_nodules: int
    n_class_images: dict[str, dict[str, int]]
    n_voc_images: dict[str, int]

    def describe(self) -> str:
        counts = ", ".join(f"{part}: {sum(c.values())}" for part, c in self.n_class_images.items())
        return (
            f"  {self.n_patients} patients, {self.n_scans} scans, {self.n_nodules} annotated nodules; "
            f"classification images {counts}; VOC images {self.n_voc_images} (see synth_manifest.json)"
        )


def time_points(n_scans: int) -> list[int]:
    """Scans per patient (pattern 2, 1, 2, 1, 3, …) adding up to `n_scans`."""
    out: list[int] = []
    while sum(out) < n_scans:
        out.append(min(TIME_POINT_PATTERN[len(out) % len(TIME_POINT_PATTERN)], n_scans - sum(out)))
    return out


def make_spatiotemporal(
    out: str | Path,
    n_scans: int = DEFAULT_SCANS,
    seed: int = 0,
    size: str = "small",
    nodules_per_scan: int = 3,
    growth: float = 0.1,
    bank=None,
) -> SpatioTemporalTree:
    """Generate a spatio-temporal stand-in with `n_scans` scans under `out`.

    Raises:
        ValueError: too few patients for a training and a validation part that both hold every class.
    """
    from common.datasets.spatiotemporal import CLASS_NAMES
    from common.datasets.tables import ANNOTATION_COLUMNS
    from common.io import write_mhd
    from common.synth.luna16 import scan_volume
    from common.synth.manifest import manifest, write_manifest
    from common.synth.pathology import balanced_labels, generate_patient, held_out_patients, stpd_class

    root, bank, decks = start_pathology_tree(out, n_scans, bank, stpd_class, CLASSES, size, seed)
    per_patient = time_points(n_scans)
    n_patients = len(per_patient)
    minimum = math.ceil(len(CLASSES) / nodules_per_scan)
    try:
        held = held_out_patients(n_patients, VALIDATE_FRACTION, minimum)
    except ValueError:
        needed = next(n for n in range(n_scans, 10 * n_scans + 100) if len(time_points(n)) >= 2 * minimum)
        raise ValueError(
            f"{n_scans} scans make {n_patients} patient(s), but the training and the validation part need "
            f"{minimum} patients each to hold all {len(CLASSES)} classes with {nodules_per_scan} nodules per "
            f"scan; use at least --scans {needed}"
        ) from None
    labels = balanced_labels(CLASSES, n_patients, nodules_per_scan, held, weights=per_patient)

    rows, entries = [], []
    class_counts = {part: {str(c): 0 for c in CLASSES} for part in ("train", "validate")}
    voc_lists: dict[str, list[str]] = {"train": [], "val": []}
    n_nodules = 0
    for p, m in enumerate(per_patient):
        patient = f"P{p + 1:04d}"
        validate = p in held
        scans = generate_patient(
            seed,
            p,
            labels[p],
            decks,
            lambda t, pid=patient: f"{pid}_T{t}",
            patient=patient,
            n_time_points=m,
            size=size,
            growth=growth,
            bank=bank,
            flip=p % 4 == 1,
        )
        for scan in scans:
            image_path = root / "detection_3d" / "mhd" / f"{scan.uid}.mhd"
            lung_path = root / "detection_3d" / "lung_mask" / f"{scan.uid}.mhd"
            write_mhd(scan_volume(scan), image_path)
            write_mhd(scan_volume(scan, scan.lung_segmented()), lung_path)
            for nodule in scan.nodules:
                rows.append((scan.uid, *(f"{v:.6f}" for v in nodule.world_xyz), f"{nodule.diameter_mm:.6f}"))
            n_nodules += len(scan.nodules)
            part = "validate" if validate else "train"
            slices = write_class_images(scan, root / "class_dataset" / part, class_counts[part])
            voc_names = write_voc_slices(scan, slices, root / "detection_2d", "JPEGImages", ".jpg")
            voc_lists["val" if validate else "train"] += voc_names
            entry = scan_entry(scan, scan.geometry)
            entry.update(
                {
                    "part": part,
                    "files": {
                        "image": image_path.relative_to(root).as_posix(),
                        "lung_segmented": lung_path.relative_to(root).as_posix(),
                    },
                }
            )
            entries.append(entry)
        log.debug("synthetic spatio-temporal patient %d/%d written", p + 1, n_patients)

    atomic.write_text(root / "detection_3d" / "annotations.csv", csv_text(ANNOTATION_COLUMNS, rows))
    for part, names in voc_lists.items():
        atomic.write_text(
            root / "detection_2d" / "ImageSets" / "Main" / f"{part}.txt", "\n".join(names) + "\n"
        )
    readme = ["Synthetic stand-in (lungdata synth spatiotemporal); images per class:"]
    for part, counts in class_counts.items():
        readme.append(f"{part}: " + ", ".join(f"{c} ({CLASS_NAMES[c]}): {n}" for c, n in counts.items()))
    atomic.write_text(root / "class_dataset" / "READ_ME.txt", "\n".join(readme) + "\n")
    extra = {
        "classes": dict(CLASS_NAMES),
        "class_rule": "stpd_class",
        "patients": n_patients,
        "time_points": dict(Counter(per_patient)),
        "growth_per_time_point": growth,
    }
    write_manifest(root, manifest("spatiotemporal", seed, size, entries, bank, extra))
    return SpatioTemporalTree(
        root, n_patients, n_scans, n_nodules, class_counts, {k: len(v) for k, v in voc_lists.items()}
    )
