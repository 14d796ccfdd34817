"""lungcad.pipeline._segment: the smaller first GLANCE span gives exactly the full span's mask, with fewer slices."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import scipy.ndimage as ndi

from common.io import CTVolume
from lungcad import pipeline
from lungcad.pipeline import PreparedScan

O_SPACING_XYZ = (0.7, 0.7, 1.25)  # the original grid
C_SPACING_XYZ = (0.7, 0.7, 1.0)  # GLANCE's cache grid: z resampled, so interpolation mixes slices
SHAPE_O = (48, 72, 72)


class RecordingGlance:
    """Stands in for `GlanceSlices`: a fixed probability map on the cache grid, recording the slices asked."""

    def __init__(self, probability: np.ndarray) -> None:
        self.probability = probability
        self.asked: set[int] = set()
        self.full_spans: set[int] = set()

    def __call__(self, slices: np.ndarray) -> np.ndarray:
        self.asked.update(int(z) for z in slices)
        return self.probability


def _case(seed: int) -> tuple[CTVolume, PreparedScan, np.ndarray, np.ndarray, float]:
    """A parenchyma-like volume, a random probability map (a blob at or near the finding, smooth noise,
    sometimes a vessel-like tube through it) and the finding's world centre and diameter."""
    rng = np.random.default_rng(seed)
    volume = CTVolume(
        np.full(SHAPE_O, -850, dtype=np.int16), O_SPACING_XYZ, (10.0, -20.0, -100.0), np.eye(3), "span"
    )
    shape_c = tuple(
        int(round(n * o / c)) for n, o, c in zip(SHAPE_O, O_SPACING_XYZ[::-1], C_SPACING_XYZ[::-1])
    )
    mm = np.meshgrid(*[np.arange(n) * c for n, c in zip(shape_c, C_SPACING_XYZ[::-1])], indexing="ij")
    centre_zyx_mm = np.array([n * c / 2 for n, c in zip(shape_c, C_SPACING_XYZ[::-1])]) + rng.uniform(
        -3, 3, 3
    )
    diameter = float(rng.uniform(3.0, 12.0))
    blob_radius = diameter / 2 * rng.uniform(0.3, 2.0)
    blob_centre = centre_zyx_mm + rng.normal(0.0, diameter / 4, 3) * rng.integers(0, 2)
    distance = np.sqrt(sum((m - c) ** 2 for m, c in zip(mm, blob_centre)))
    probability = np.clip(1.2 - distance / blob_radius, 0, 1) * rng.integers(0, 2)
    noise = ndi.gaussian_filter(rng.normal(size=shape_c), 2.0)
    probability = np.maximum(probability, noise / noise.std() * 0.25 + rng.uniform(-0.2, 0.3))
    if rng.integers(0, 3) == 0:  # a vessel along y through the finding's neighbourhood
        tube = np.hypot(mm[0] - centre_zyx_mm[0] - rng.uniform(-4, 4), mm[2] - centre_zyx_mm[2]) <= 1.5
        probability[tube] = 0.9
    scan = PreparedScan(
        np.zeros(shape_c, dtype=np.int16),
        np.zeros(shape_c, dtype=np.uint8),
        {"spacing": list(C_SPACING_XYZ), "shape": list(shape_c)},
    )
    centre_o = centre_zyx_mm / np.asarray(O_SPACING_XYZ[::-1])
    world = np.asarray(volume.voxel_to_world(centre_o[None]), dtype=np.float64)[0]
    return volume, scan, np.clip(probability, 0, 1).astype(np.float16), world, diameter


@pytest.fixture
def bundle() -> SimpleNamespace:
    inference = SimpleNamespace(seg_threshold=0.5)
    return SimpleNamespace(models={"seg": SimpleNamespace(task=SimpleNamespace(inference=inference))})


def test_first_span_answer_is_the_full_span_answer(bundle, monkeypatch):
    """On 60 random maps the mask and its source are those of the full span alone; some settle with the
    smaller span (fewer slices), some grow, so both branches are exercised."""
    settled = grown = 0
    for seed in range(60):
        volume, scan, probability, world, diameter = _case(seed)
        short = RecordingGlance(probability)
        mask, how = pipeline._segment(bundle, short, scan, volume, world, diameter)
        monkeypatch.setattr(pipeline, "SEGMENT_FIRST_HALF_MM", 1e9)  # the full span only
        full = RecordingGlance(probability)
        reference, reference_how = pipeline._segment(bundle, full, scan, volume, world, diameter)
        monkeypatch.undo()
        assert how == reference_how, seed
        np.testing.assert_array_equal(mask, reference, err_msg=f"seed {seed}")
        assert short.asked <= full.asked == short.full_spans
        if short.asked < full.asked:
            settled += 1
        else:
            grown += 1
    assert settled >= 10 and grown >= 10, (settled, grown)


def test_a_small_compact_nodule_needs_only_the_first_span(bundle):
    volume, scan, _, world, _ = _case(0)
    shape_c = scan.image.shape
    mm = np.meshgrid(*[np.arange(n) * c for n, c in zip(shape_c, C_SPACING_XYZ[::-1])], indexing="ij")
    centre = np.asarray(volume.world_to_voxel(world)).reshape(3) * np.asarray(O_SPACING_XYZ[::-1])
    probability = (np.sqrt(sum((m - c) ** 2 for m, c in zip(mm, centre))) <= 2.5).astype(np.float16)
    glance = RecordingGlance(probability)
    mask, how = pipeline._segment(bundle, glance, scan, volume, world, 5.0)
    assert how == "glance" and 50 < mask.sum() * np.prod(O_SPACING_XYZ) < 100  # 4/3 π 2.5³ = 65 mm³
    full_span = 2 * (int(np.ceil(pipeline.SEGMENT_HALF_MM / C_SPACING_XYZ[2])) + 1) + 1
    first_span = 2 * (int(np.ceil(pipeline.SEGMENT_FIRST_HALF_MM / C_SPACING_XYZ[2])) + 1) + 1
    assert len(glance.asked) == first_span < full_span
