"""The phantom's chest wall lets the computed (CLAF-style) lung mask find the true lungs.

`common.preprocess.lung_mask` drops the air connected to the in-plane border and keeps the two largest air
regions, so it finds a lung only where soft tissue separates it from the outside air in every slice, and it
drops the airway only when it can trace a trachea of real size. These tests pin both properties of the
generator: a chest wall of at least `MIN_WALL_MM` round the lungs in every slice (noise-free anatomy), and
computed vs true lung masks agreeing on generated scans, in memory and through the LUNA16 files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from common.io import read_volume
from common.preprocess import load_provided_lung_mask, lung_mask
from common.synth.luna16 import LUNG_MASK_DIR, make_luna16
from common.synth.phantom import (
    AIRWAY_LABEL,
    HU_FAT,
    LEFT_LUNG_LABEL,
    RIGHT_LUNG_LABEL,
    build_anatomy,
    draw_geometry,
)
from common.synth.scan import default_bank, generate_scan

#: Least chest wall (mm, in-plane, skin to lung) the generator must leave; it draws 7–20 mm.
MIN_WALL_MM = 5.0
#: Least Dice of the computed lung mask against the phantom's true lungs.
MIN_DICE = 0.95
#: Airway (label 5: trachea and main bronchi with their walls) allowed inside the computed mask, as a
#: fraction of the mask: the recipe's closing and hole filling may take in the bronchus ends in the hila.
MAX_AIRWAY_FRACTION = 0.01

# (seed, scan index): index 3 is stored flipped; the others cover in-plane spacings from 0.6 to 0.9 mm
# (fields of view 96-141 mm), slice spacings 1.25-2.5 mm, and scans with the −2000 HU field-of-view padding.
SCANS = [(0, 0), (1, 1), (1, 3), (2, 4), (4, 9), (6, 8)]


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(key))))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def _outside_air(slice_hu: np.ndarray) -> np.ndarray:
    """Air (< −400 HU, the lung-mask threshold) connected to the slice border: what the recipe removes."""
    labels, _ = ndimage.label(slice_hu < -400.0)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return np.isin(labels, border[border > 0])


def _assert_lungs_off_the_border(lungs: np.ndarray) -> None:
    for axis in range(3):
        for end in (0, -1):
            assert not np.take(lungs, end, axis=axis).any(), f"lung touches the scan border (axis {axis})"


@pytest.fixture(scope="module")
def bank():
    return default_bank()


@pytest.mark.parametrize("key", range(8))
def test_a_chest_wall_separates_every_lung_slice_from_the_outside_air(key):
    geometry = draw_geometry(_rng(key, 1), "small")
    anatomy = build_anatomy(_rng(key, 2), geometry)
    lungs = anatomy.lung_region
    _assert_lungs_off_the_border(lungs)
    sx, sy, _ = geometry.spacing
    lung_slices = np.flatnonzero(lungs.any(axis=(1, 2)))
    # The lungs start above the first slice (the diaphragm and abdomen lie below them).
    assert lung_slices.min() > 0
    for z in lung_slices:
        outside = _outside_air(anatomy.hu[z])
        assert outside.any(), f"slice {z}: no outside air"
        distance = ndimage.distance_transform_edt(~outside, sampling=(sy, sx))
        # Every lung voxel lies at least MIN_WALL_MM from the outside air, and the body's outer MIN_WALL_MM
        # is fat or muscle — no lung, no air — so the band of tissue is closed all round.
        assert distance[lungs[z]].min() >= MIN_WALL_MM, f"slice {z}: chest wall thinner than {MIN_WALL_MM} mm"
        rim = ~outside & (distance <= MIN_WALL_MM)
        assert (anatomy.hu[z][rim] >= HU_FAT).all(), f"slice {z}: air or lung in the chest wall"


@pytest.mark.parametrize(("seed", "index"), SCANS)
def test_computed_lung_mask_matches_the_true_lungs(bank, seed, index):
    scan = generate_scan(seed, index, "small", bank)
    truth = np.isin(scan.lung_labels, (LEFT_LUNG_LABEL, RIGHT_LUNG_LABEL))
    airway = scan.lung_labels == AIRWAY_LABEL
    _assert_lungs_off_the_border(truth)

    computed = lung_mask(scan.image, scan.geometry.spacing).astype(bool)

    assert _dice(computed, truth) >= MIN_DICE
    # Both lungs are found, each mostly.
    for label in (LEFT_LUNG_LABEL, RIGHT_LUNG_LABEL):
        lung = scan.lung_labels == label
        assert (computed & lung).sum() >= 0.9 * lung.sum(), f"lung label {label} largely missed"
    assert (computed & airway).sum() <= MAX_AIRWAY_FRACTION * computed.sum()
    # The trachea above the lungs is never taken for lung.
    above = np.flatnonzero(truth.any(axis=(1, 2))).max() + 1
    assert airway[above:].any() and not (computed[above:] & airway[above:]).any()


def test_computed_masks_match_the_provided_luna16_masks(tmp_path: Path, bank):
    """The preprocessing's own path: read the written scan and its `seg-lungs-LUNA16` mask from disk."""
    tree = make_luna16(tmp_path / "luna16", n_scans=4, seed=3, size="small", bank=bank)
    for uid in tree.series_uids:
        (image_path,) = (tmp_path / "luna16").glob(f"subset*/{uid}.mhd")
        volume = read_volume(image_path)
        provided = load_provided_lung_mask(tmp_path / "luna16" / LUNG_MASK_DIR / f"{uid}.mhd", volume)
        computed = lung_mask(volume).astype(bool)
        assert _dice(computed, provided.array.astype(bool)) >= MIN_DICE, uid
