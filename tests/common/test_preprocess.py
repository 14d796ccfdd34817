"""Preprocessing: HU clipping, windows, B-spline resampling against SimpleITK, lung masks on a phantom."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from common.io import CTVolume, write_mhd
from common.preprocess import (
    CLAF_WINDOW,
    GLANCE_WINDOW,
    clip_hu,
    load_provided_lung_mask,
    lung_mask,
    resample_isotropic,
    resampled_shape,
    window,
)
from tests.common.chest_phantom import chest_phantom


def _rotation(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]) @ np.diag([1.0, -1.0, 1.0])


def _sitk_resample(volume: CTVolume, spacing, interpolator, shape_zyx) -> np.ndarray:
    img = volume.to_sitk()
    out = sitk.Resample(
        img, shape_zyx[::-1], sitk.Transform(), interpolator, img.GetOrigin(), spacing, img.GetDirection(),
        -5000.0, sitk.sitkFloat32,
    )  # fmt: skip
    return sitk.GetArrayFromImage(out)


def test_clip_hu_maps_fov_padding_to_air_and_clamps():
    array = np.array([-3024, -2000, -1999, -1500, -1024, 0, 3071, 4000], dtype=np.int16)
    np.testing.assert_array_equal(clip_hu(array), [-1024, -1024, -1024, -1024, -1024, 0, 3071, 3071])
    assert clip_hu(array).dtype == np.int16
    assert clip_hu(array.astype(np.float32)).dtype == np.float32


def test_windows():
    assert GLANCE_WINDOW == (-1000, 400) and CLAF_WINDOW == (-1200, 600)
    out = window(np.array([-1300, -1200, -300, 600, 900], dtype=np.int16), *CLAF_WINDOW)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0, 0, 0.5, 1, 1])
    with pytest.raises(ValueError):
        window(np.zeros(3), 10, 10)


@pytest.mark.parametrize(
    "shape, spacing, new_spacing, direction",
    [
        ((23, 37, 41), (0.7, 0.8, 2.5), (1.0, 1.0, 1.0), np.eye(3)),
        ((30, 20, 25), (1.3, 0.6, 0.9), (1.0, 1.0, 1.0), _rotation(0.4)),
        ((7, 9, 11), (2.0, 2.0, 3.0), (0.7, 0.9, 1.1), np.diag([-1.0, -1.0, 1.0])),
        ((1, 12, 10), (0.8, 0.8, 5.0), (1.0, 1.0, 1.0), np.eye(3)),
    ],
)
def test_bspline_resampling_matches_simpleitk_everywhere(shape, spacing, new_spacing, direction):
    rng = np.random.default_rng(0)
    volume = CTVolume(
        rng.normal(-500, 400, shape).astype(np.float32), spacing, (-10.5, 3.25, 100.0), direction
    )
    ours = resample_isotropic(volume, new_spacing, dtype=np.float32)
    assert ours.shape == resampled_shape(shape, spacing, new_spacing)
    assert ours.origin == volume.origin and np.array_equal(ours.direction, volume.direction)
    reference = _sitk_resample(volume, new_spacing, sitk.sitkBSpline, ours.shape)
    assert not np.any(reference == -5000.0), "every output voxel must lie inside the input grid"
    np.testing.assert_allclose(ours.array, reference, atol=0.01)  # float32 rounding only, edges included


def test_linear_and_nearest_match_simpleitk():
    rng = np.random.default_rng(1)
    volume = CTVolume(
        rng.normal(0, 300, (17, 19, 23)).astype(np.float32), (0.7, 0.9, 2.5), (0, 0, 0), np.eye(3)
    )
    for order, interpolator in ((1, sitk.sitkLinear), (0, sitk.sitkNearestNeighbor)):
        ours = resample_isotropic(volume, 1.0, order=order, dtype=np.float32)
        reference = _sitk_resample(volume, (1.0, 1.0, 1.0), interpolator, ours.shape)
        np.testing.assert_allclose(ours.array, reference, atol=1e-3)


def test_int16_output_is_rounded_hu_within_one_hu_of_simpleitk_on_a_ct_phantom():
    phantom = chest_phantom((48, 96, 96), (0.7, 0.7, 1.25), seed=2)
    volume = CTVolume(clip_hu(phantom.hu), (0.7, 0.7, 1.25), (-33.6, -33.6, -30.0), np.eye(3))
    ours = resample_isotropic(volume, 1.0)
    assert ours.array.dtype == np.int16
    reference = _sitk_resample(volume, (1.0, 1.0, 1.0), sitk.sitkBSpline, ours.shape)
    diff = np.abs(ours.array[2:-2, 2:-2, 2:-2] - reference[2:-2, 2:-2, 2:-2])
    assert np.percentile(diff, 99) <= 1.0
    assert diff.max() <= 0.5 + 1e-3  # nothing but the rounding to int16


def test_annotation_voxel_positions_follow_the_new_grid_exactly():
    """A bright blob planted at a world point is found at the new grid's world_to_voxel of that point."""
    shape, spacing = (40, 60, 50), (0.75, 0.65, 2.0)
    for direction in (np.eye(3), np.diag([-1.0, -1.0, 1.0]), _rotation(0.3)):
        volume = CTVolume(np.zeros(shape, np.float32), spacing, (20.0, -15.0, 7.5), direction)
        zz, yy, xx = np.indices(shape)
        centre_zyx = np.array([21.3, 28.6, 24.2])
        world = volume.voxel_to_world(centre_zyx)[0]
        dist2 = (
            ((zz - centre_zyx[0]) * spacing[2]) ** 2
            + ((yy - centre_zyx[1]) * spacing[1]) ** 2
            + ((xx - centre_zyx[2]) * spacing[0]) ** 2
        )
        volume.array[:] = 1000.0 * np.exp(-dist2 / (2 * 3.0**2))
        out = resample_isotropic(volume, 1.0, dtype=np.float32)
        expected = out.world_to_voxel(world)[0]
        # Weighted centroid of the resampled blob = where the world coordinate says it is.
        weights = np.clip(out.array, 0, None)
        idx = np.indices(out.shape).reshape(3, -1)
        centroid = (idx * weights.ravel()).sum(axis=1) / weights.sum()
        np.testing.assert_allclose(centroid, expected, atol=0.05)
        np.testing.assert_allclose(out.voxel_to_world(expected)[0], world, atol=1e-9)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.mark.parametrize(
    "shape, spacing", [((100, 150, 150), (1.0, 1.0, 1.0)), ((64, 112, 112), (1.4, 1.4, 2.5))]
)
def test_lung_mask_on_phantom_excludes_trachea_and_body(shape, spacing):
    phantom = chest_phantom(shape, spacing, noise_hu=25.0, seed=1)
    volume = CTVolume(clip_hu(phantom.hu), spacing, (0, 0, 0), np.eye(3))
    mask = lung_mask(volume)
    assert mask.dtype == np.uint8 and mask.shape == shape
    predicted = mask.astype(bool)
    assert _dice(predicted, phantom.lungs) >= 0.95
    # Trachea (above the carina, where no lung is in the slice) is gone entirely, the body is not lung.
    trachea_slices = ~phantom.lungs.any(axis=(1, 2)) & phantom.airway.any(axis=(1, 2))
    assert trachea_slices.any()
    assert not predicted[trachea_slices].any()
    # Main bronchi: at most a sliver where they enter the lung survives the stub cutting.
    assert np.count_nonzero(predicted & phantom.airway) <= 0.1 * np.count_nonzero(phantom.airway)
    assert np.count_nonzero(predicted & phantom.body) <= 0.005 * np.count_nonzero(phantom.lungs)
    # The bowel-gas pocket below the lungs is not a lung.
    assert not predicted[: int(0.05 * shape[0])].any()


@pytest.mark.parametrize(
    "shape, spacing, wall_mm",
    [((100, 150, 150), (1.0, 1.0, 1.0), 3.0), ((80, 200, 200), (0.7, 0.7, 1.25), 2.0)],
)
def test_lung_mask_keeps_lungs_behind_a_thin_chest_wall(shape, spacing, wall_mm):
    """A wall of two or three voxels must still separate the lung from the outside air on the 2 mm grid."""
    phantom = chest_phantom(shape, spacing, noise_hu=25.0, seed=4, chest_wall_mm=wall_mm)
    mask = lung_mask(CTVolume(clip_hu(phantom.hu), spacing, (0, 0, 0), np.eye(3))).astype(bool)
    assert _dice(mask, phantom.lungs) >= 0.95


def test_lung_mask_follows_the_direction_for_the_superior_end():
    shape, spacing = (64, 112, 112), (1.4, 1.4, 2.5)
    phantom = chest_phantom(shape, spacing, seed=3)
    upright = lung_mask(CTVolume(clip_hu(phantom.hu), spacing, (0, 0, 0), np.eye(3)))
    # Same patient stored head-first: the array is z-reversed and the direction says so.
    flipped = lung_mask(CTVolume(clip_hu(phantom.hu[::-1]), spacing, (0, 0, 0), np.diag([1.0, 1.0, -1.0])))
    np.testing.assert_array_equal(flipped[::-1], upright)
    # A bare array needs the spacing and assumes the last slice is the head end.
    np.testing.assert_array_equal(lung_mask(clip_hu(phantom.hu), spacing), upright)
    with pytest.raises(ValueError, match="spacing"):
        lung_mask(phantom.hu)


def test_lung_mask_without_lungs_is_empty():
    body = np.full((20, 64, 64), 40, dtype=np.int16)
    body[:, :4] = -1000
    assert lung_mask(body, (2.0, 2.0, 2.0)).sum() == 0


def test_load_provided_lung_mask_keeps_lungs_drops_airways_and_resamples(tmp_path):
    shape, spacing = (30, 40, 40), (0.8, 0.8, 2.0)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[5:25, 10:30, 5:18] = 3
    labels[5:25, 10:30, 22:35] = 4
    labels[20:30, 18:22, 18:22] = 5
    volume = CTVolume(labels, spacing, (-16.0, -16.0, -30.0), np.diag([-1.0, -1.0, 1.0]))
    path = write_mhd(volume, tmp_path / "mask.mhd", compress=True)
    native = load_provided_lung_mask(path)
    np.testing.assert_array_equal(native.array, np.isin(labels, (3, 4)).astype(np.uint8))
    reference = resample_isotropic(volume.with_array(np.zeros(shape, np.int16)), 1.0)
    on_grid = load_provided_lung_mask(path, reference=reference)
    assert on_grid.shape == reference.shape and on_grid.array.dtype == np.uint8
    img = sitk.GetImageFromArray(native.array)
    img.CopyInformation(volume.to_sitk())
    expected = sitk.GetArrayFromImage(
        sitk.Resample(
            img,
            reference.size_xyz,
            sitk.Transform(),
            sitk.sitkNearestNeighbor,
            volume.origin,
            (1, 1, 1),
            img.GetDirection(),
        )  # fmt: skip
    )
    np.testing.assert_array_equal(on_grid.array, expected)
    other = CTVolume(np.zeros((5, 5, 5), np.int16), (1, 1, 1), (0.0, 0.0, 0.0), np.eye(3))
    with pytest.raises(ValueError, match="does not match the scan"):
        load_provided_lung_mask(path, reference=other)
