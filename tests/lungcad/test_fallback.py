"""The segmentation fallback (`lungcad.pipeline.fallback_mask`, used where GLANCE segments nothing) against
the phantoms' true masks and against spheres with an attached vessel."""

from __future__ import annotations

import numpy as np
import pytest

from lungcad.pipeline import _component_at, fallback_mask, fallback_segment
from tests.lungcad.test_measure import LUNG_HU, _phantom_nodules, blurred_sphere


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def _isolated_phantom_nodules(seed: int, indices):
    def isolated(finding) -> bool:
        return finding.location == "isolated" and finding.diameter_mm >= 5

    for _, volume, finding, mask in _phantom_nodules(seed, indices, isolated):
        yield volume, finding, mask


def _fallback_at_truth(volume, finding):
    """`fallback_mask` at a phantom nodule's true centre and generator diameter, on a block around it."""
    spacing = np.asarray(volume.spacing)[::-1]
    centre = np.asarray(finding.voxel_zyx)
    half = np.ceil((max(0.75 * finding.diameter_mm, 0.5 * finding.diameter_mm + 3.0) + 2.0) / spacing)
    lo = np.maximum(np.floor(centre - half).astype(int), 0)
    hi = np.minimum(np.ceil(centre + half).astype(int) + 1, volume.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    return box, fallback_mask(volume.array[box].astype(np.float64), centre - lo, finding.diameter_mm, spacing)


def test_fallback_matches_the_true_mask_of_isolated_phantom_nodules():
    """Isolated nodules ≥ 5 mm of scans 0–5 of seed 0, at their true centre and generator diameter."""
    dices = []
    for volume, finding, truth in _isolated_phantom_nodules(0, range(6)):
        box, found = _fallback_at_truth(volume, finding)
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


def test_fallback_keeps_the_chest_wall_out_of_a_juxta_pleural_nodule():
    """A 7 mm solid nodule sitting on the chest wall (a soft-tissue half-space it dips 1 mm into, contact
    ≈ 5 mm wide: no opening within 0.3 d separates them): the rolling ball keeps the wall out, the mask is
    the nodule's part in the lung."""
    spacing = np.array([0.7, 0.7, 0.7])
    n = 31
    zz, yy, xx = np.meshgrid(*[np.arange(n) * s for s in spacing], indexing="ij")
    c = (n - 1) / 2 * spacing
    sphere = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= 3.5**2
    wall = xx >= c[2] + 2.5
    hu = np.where(sphere | wall, 40.0, LUNG_HU)
    from scipy import ndimage

    hu = ndimage.gaussian_filter(hu, 0.5 / spacing) + np.random.default_rng(0).normal(0.0, 15.0, hu.shape)
    truth = sphere & ~wall
    centre = (np.asarray(hu.shape) - 1) / 2.0
    mask, info = fallback_mask(hu, centre, 7.0, spacing)
    assert _dice(mask, truth) >= 0.85
    assert (mask & wall).sum() < 0.1 * truth.sum()
    # Without the lung side, the voxels >= T at the centre hold the wall: far more wall than nodule.
    dense = _component_at(hu >= info["threshold_hu"], centre, np.full(3, 3.5) / spacing)
    assert (dense & wall).sum() > truth.sum()


def test_fallback_on_attached_phantom_nodules():
    """Juxta-pleural and juxta-vascular nodules ≥ 5 mm of scans 0–5 of seed 0 (true centre, generator
    diameter): the chest wall and denser vessels stay out of the mask (before the rolling ball and the
    ground-glass bound, a juxta-pleural nodule's mask held 3× its volume and a ground-glass one's 3.6×)."""
    dices, ratios = [], []
    for _, volume, finding, truth in _phantom_nodules(
        0, range(6), lambda f: f.location != "isolated" and f.diameter_mm >= 5
    ):
        box, found = _fallback_at_truth(volume, finding)
        assert found is not None, finding.finding_id
        dices.append(_dice(found[0], truth[box]))
        ratios.append(found[0].sum() / truth[box].sum())
    # 10 nodules; before: Dice median 0.86, min 0.09, masks up to 3.5× the truth; with the midpoint threshold
    # 0.89, 0.59, 1.7×; at FALLBACK_THRESHOLD_SHARE 0.35: 0.91, 0.63, 2.0× (one 7.8 mm juxta-vascular nodule
    # keeps a piece of its vessel either way; its voxel-count ratio was 1.73 at the midpoint)
    assert len(dices) >= 8
    assert np.median(dices) >= 0.85 and min(dices) >= 0.55, dices
    assert max(ratios) <= 2.1, ratios


def test_fallback_grows_its_search_sphere_when_the_diameter_is_too_small():
    """A 12 mm nodule given as 4 or 6 mm (stage 1's box regression can undersize): such a search sphere lies
    inside the nodule and holds no parenchyma, so `fallback_mask` finds no threshold (the pipeline would
    fall back to a 4 mm sphere); `fallback_segment` widens the sphere until the piece lies inside it."""
    volume, truth = blurred_sphere(6.0, (0.7, 0.7, 1.0), (0.0, 0.0, 0.0))
    spacing = np.asarray(volume.spacing)[::-1]
    hu = np.asarray(volume.array, dtype=np.float64)
    centre = (np.asarray(hu.shape) - 1) / 2.0
    for given in (4.0, 6.0):
        assert fallback_mask(hu, centre, given, spacing) is None
    for given in (4.0, 6.0, 12.0, 20.0):
        mask, info = fallback_segment(hu, centre, given, spacing)
        assert info["attached"] == 0.0 and info["opening_mm"] == 0.0 and info["search_diameter_mm"] >= 8.0
        assert _dice(mask, truth) >= 0.95
