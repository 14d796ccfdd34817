"""The segmentation fallback (`lungcad.pipeline.fallback_mask`, used where GLANCE segments nothing) against
the phantoms' true masks and against spheres with an attached vessel."""

from __future__ import annotations

import numpy as np
import pytest

from lungcad.pipeline import _component_at, fallback_mask
from tests.lungcad.test_measure import LUNG_HU, _phantom_nodules, blurred_sphere


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def _isolated_phantom_nodules(seed: int, indices):
    def isolated(finding) -> bool:
        return finding.location == "isolated" and finding.diameter_mm >= 5

    for _, volume, finding, mask in _phantom_nodules(seed, indices, isolated):
        yield volume, finding, mask


def test_fallback_matches_the_true_mask_of_isolated_phantom_nodules():
    """Isolated nodules ≥ 5 mm of scans 0–5 of seed 0, at their true centre and generator diameter."""
    dices = []
    for volume, finding, truth in _isolated_phantom_nodules(0, range(6)):
        spacing = np.asarray(volume.spacing)[::-1]
        centre = np.asarray(finding.voxel_zyx)
        half = np.ceil((max(0.75 * finding.diameter_mm, 0.5 * finding.diameter_mm + 3.0) + 2.0) / spacing)
        lo = np.maximum(np.floor(centre - half).astype(int), 0)
        hi = np.minimum(np.ceil(centre + half).astype(int) + 1, volume.shape)
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        found = fallback_mask(volume.array[box].astype(np.float64), centre - lo, finding.diameter_mm, spacing)
        assert found is not None, finding.finding_id
        mask, info = found
        assert info["parenchyma_hu"] < info["threshold_hu"] < info["nodule_hu"]
        dices.append(_dice(mask, truth[box]))
    assert len(dices) >= 3
    assert np.median(dices) >= 0.85 and min(dices) >= 0.6, dices


@pytest.mark.parametrize("hu_nodule", [0.0, -400.0])
def test_fallback_detaches_a_vessel_and_keeps_a_ground_glass_nodule(hu_nodule):
    """An 8 mm nodule (solid or ground-glass) touched by a 2 mm vessel running to the edge of the search
    sphere: the mask is the nodule (a fixed −500 HU cut would also take the vessel)."""
    volume, truth = blurred_sphere(4.0, (0.7, 0.7, 0.7), (0.0, 0.0, 0.0), hu_nodule=hu_nodule)
    spacing = np.asarray(volume.spacing)[::-1]
    hu = np.asarray(volume.array, dtype=np.float64)
    centre = (np.asarray(hu.shape) - 1) / 2.0
    zz, yy, xx = np.meshgrid(*[np.arange(k) * s for k, s in zip(hu.shape, spacing)], indexing="ij")
    tube = ((zz - centre[0] * spacing[0]) ** 2 + (yy - centre[1] * spacing[1] - 3.5) ** 2 <= 1.0) & (
        xx > centre[2] * spacing[2]
    )
    hu = np.where(tube, 40.0, hu)
    mask, info = fallback_mask(hu, centre, 8.0, spacing)
    assert info["nodule_hu"] == pytest.approx(hu_nodule, abs=60)
    assert info["parenchyma_hu"] == pytest.approx(LUNG_HU, abs=10)
    assert _dice(mask, truth) >= 0.9
    assert (mask & tube & ~truth).sum() < 0.05 * truth.sum()  # at most a stub of the vessel
    # The previous rule (the connected >= -500 HU region at the centre) takes the whole vessel with it.
    previous = _component_at(hu >= -500.0, centre, np.full(3, 4.0) / spacing)
    assert (previous & tube).sum() == tube.sum()


def test_fallback_gives_up_where_there_is_no_nodule():
    rng = np.random.default_rng(0)
    lung = LUNG_HU + rng.normal(0.0, 20.0, (30, 40, 40))
    assert fallback_mask(lung, np.array([15.0, 20.0, 20.0]), 6.0, np.array([1.0, 0.7, 0.7])) is None
