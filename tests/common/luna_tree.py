"""A tiny LUNA16-style tree for adapter, cache and CLI tests, written with our own `write_mhd`.

Each scan is the chest phantom at 40×64×64 voxels of (1.5, 1.5, 2.5) mm with one bright "nodule" sphere in
the right lung at a known world position; the second scan uses the flipped `-1 0 0 0 -1 0 0 0 1`
direction some LUNA16 scans have, so anything that ignores the direction matrix misses its nodule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.io import CTVolume, write_mhd
from tests.common.chest_phantom import chest_phantom

UID_PREFIX = "1.3.6.1.4.1.14519.5.2.1.6279.6001."
SHAPE = (40, 64, 64)
SPACING = (1.5, 1.5, 2.5)
NODULE_DIAMETER = 8.0
NODULE_HU = 150


@dataclass
class TinyLuna:
    root: Path
    uids: list[str]
    nodules: dict[str, tuple[tuple[float, float, float], float]] = field(default_factory=dict)
    excluded: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    volumes: dict[str, CTVolume] = field(default_factory=dict)


def write_tiny_luna16(root: Path, n_scans: int = 3, n_subsets: int = 2, seed: int = 0) -> TinyLuna:
    """Write `n_scans` scans into subset0 … subset{n_subsets-1} plus masks and the four CSVs."""
    root = Path(root)
    tree = TinyLuna(root=root, uids=[])
    annotation_rows, excluded_rows, candidate_rows = [], [], []
    for i in range(n_scans):
        uid = f"{UID_PREFIX}{100000 + i}"
        phantom = chest_phantom(SHAPE, SPACING, noise_hu=15.0, seed=seed + i)
        hu = phantom.hu.copy()
        if i % 3 == 1:
            direction = np.diag([-1.0, -1.0, 1.0])
            origin = (48.0, 40.5, -120.0 + i)
        else:
            direction = np.eye(3)
            origin = (-48.0, -52.25, -120.0 + i)
        volume = CTVolume(hu, SPACING, origin, direction, series_uid=uid)
        # Nodule in the right lung (phantom x > centre), mid-height.
        centre_zyx = np.array([0.45 * SHAPE[0], 0.48 * SHAPE[1], 0.69 * SHAPE[2]])
        zz, yy, xx = np.indices(SHAPE, dtype=np.float64)
        dist2 = (
            ((zz - centre_zyx[0]) * SPACING[2]) ** 2
            + ((yy - centre_zyx[1]) * SPACING[1]) ** 2
            + ((xx - centre_zyx[2]) * SPACING[0]) ** 2
        )
        hu[dist2 <= (NODULE_DIAMETER / 2) ** 2] = NODULE_HU
        world = tuple(float(v) for v in volume.voxel_to_world(centre_zyx)[0])
        excluded_zyx = np.array([0.45 * SHAPE[0], 0.5 * SHAPE[1], 0.31 * SHAPE[2]])
        excluded_world = tuple(float(v) for v in volume.voxel_to_world(excluded_zyx)[0])
        subset = root / f"subset{i % n_subsets}"
        write_mhd(volume, subset / f"{uid}.mhd")
        labels = np.zeros(SHAPE, dtype=np.uint8)
        half = SHAPE[2] // 2
        labels[:, :, :half][phantom.lungs[:, :, :half]] = 3
        labels[:, :, half:][phantom.lungs[:, :, half:]] = 4
        labels[phantom.airway] = 5
        write_mhd(volume.with_array(labels), root / "seg-lungs-LUNA16" / f"{uid}.mhd", compress=True)
        tree.uids.append(uid)
        tree.nodules[uid] = (world, NODULE_DIAMETER)
        tree.excluded[uid] = excluded_world
        tree.volumes[uid] = volume
        annotation_rows.append(f"{uid},{world[0]:.6f},{world[1]:.6f},{world[2]:.6f},{NODULE_DIAMETER}")
        excluded_rows.append(
            f"{uid},{excluded_world[0]:.6f},{excluded_world[1]:.6f},{excluded_world[2]:.6f},-1"
        )
        candidate_rows.append(f"{uid},{world[0]:.6f},{world[1]:.6f},{world[2]:.6f},1")
        candidate_rows.append(
            f"{uid},{excluded_world[0]:.6f},{excluded_world[1]:.6f},{excluded_world[2]:.6f},0"
        )
    header = "seriesuid,coordX,coordY,coordZ,diameter_mm"
    (root / "annotations.csv").write_text("\n".join([header, *annotation_rows]) + "\n")
    (root / "annotations_excluded.csv").write_text("\n".join([header, *excluded_rows]) + "\n")
    (root / "candidates_V2.csv").write_text(
        "\n".join(["seriesuid,coordX,coordY,coordZ,class", *candidate_rows]) + "\n"
    )
    (root / "seriesuids.csv").write_text("\n".join(tree.uids) + "\n")
    return tree
