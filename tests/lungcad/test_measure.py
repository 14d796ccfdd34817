"""lungcad.measure against analytic shapes (spheres, ellipsoids; anisotropic, flipped, rotated and
permuted geometry) and against phantom nodules with their true masks.

Tolerances (stated once, here): volume within 3 % for objects ≥ 6 mm; long / short axis within 0.6 mm of
the analytic section in the measured slice (marching-squares outline: about half a pixel either way);
max 3D diameter within one voxel diagonal; centre within 0.05 mm of the voxel-mask centroid's world point.
"""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
from scipy import ndimage

from common.io import CTVolume
from lungcad.measure import (
    NODULE_TYPES,
    NoduleMeasurements,
    mean_diameter,
    measure_nodule,
    partial_volume,
)

LUNG_HU = -850.0
AXIS_TOL_MM = 0.6
VOLUME_RTOL = 0.03


def _rotation_z(degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    return np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])


def ellipsoid_scan(
    semi_mm,
    spacing=(0.7, 0.7, 0.7),
    extent_mm=40.0,
    direction=None,
    rotation=None,
    centre_world=(10.3, -20.7, 30.2),
    hu=0.0,
):
    """A scan holding one ellipsoid given in WORLD mm (semi axes along `rotation`'s columns) and its mask.

    The grid is laid out by `direction` so that the ellipsoid sits in the middle of the scan: the object is
    the same physical thing whatever the storage orientation.
    """
    spacing = np.asarray(spacing, float)
    direction = np.eye(3) if direction is None else np.asarray(direction, float).reshape(3, 3)
    rotation = np.eye(3) if rotation is None else np.asarray(rotation, float)
    n_xyz = np.ceil(extent_mm / spacing).astype(int)
    # Place the origin so that the index centre maps to (about) the ellipsoid centre.
    centre_index = (n_xyz - 1) / 2.0 + np.array([0.31, -0.17, 0.23])
    origin = np.asarray(centre_world) - direction @ (spacing * centre_index)
    k, j, i = np.meshgrid(*(np.arange(n) for n in n_xyz[::-1]), indexing="ij")
    ijk = np.stack([i, j, k], axis=-1).astype(float)
    world = origin + (ijk * spacing) @ direction.T
    local = (world - np.asarray(centre_world)) @ rotation
    mask = ((local / np.asarray(semi_mm, float)) ** 2).sum(-1) <= 1.0
    array = np.where(mask, hu, LUNG_HU).astype(np.int16)
    return CTVolume(array, tuple(spacing), tuple(origin), direction), mask


def _section_axes(semi, z_offset):
    """Analytic long / short axis of an axis-aligned ellipsoid's section at height z_offset (mm)."""
    f = np.sqrt(max(0.0, 1.0 - (z_offset / semi[2]) ** 2))
    return 2 * max(semi[0], semi[1]) * f, 2 * min(semi[0], semi[1]) * f


def _world_z_of_slice(volume: CTVolume, m: NoduleMeasurements) -> float:
    zyx = np.array([m.axial_slice, 0.0, 0.0])
    return float(volume.voxel_to_world(zyx)[0][2])


def _check_against_ellipsoid(volume, mask, m, semi, centre_world):
    semi = np.asarray(semi, float)
    true_volume = 4.0 / 3.0 * np.pi * semi.prod()
    assert m.volume_mm3 == pytest.approx(true_volume, rel=VOLUME_RTOL)
    # Centre: the world point of the voxel-mask centroid, and close to the analytic centre.
    centroid = np.argwhere(mask).mean(axis=0)
    np.testing.assert_allclose(m.center_voxel_xyz, centroid[::-1], atol=1e-9)
    np.testing.assert_allclose(m.center_world_mm, volume.voxel_to_world(centroid)[0], atol=1e-6)
    np.testing.assert_allclose(m.center_world_mm, centre_world, atol=0.3)
    long_true, short_true = _section_axes(semi, _world_z_of_slice(volume, m) - centre_world[2])
    assert m.long_axis_mm == pytest.approx(long_true, abs=AXIS_TOL_MM)
    assert m.short_axis_mm == pytest.approx(short_true, abs=AXIS_TOL_MM)
    assert m.mean_diameter_mm == mean_diameter(m.long_axis_mm, m.short_axis_mm)
    diagonal = float(np.linalg.norm(volume.spacing))
    assert m.max_3d_diameter_mm == pytest.approx(2 * semi.max(), abs=diagonal)


@pytest.mark.parametrize(
    "semi, spacing",
    [
        ((4.0, 4.0, 4.0), (0.7, 0.7, 0.7)),  # 8 mm sphere, isotropic
        ((6.0, 3.5, 4.5), (0.7, 0.7, 0.7)),  # ellipsoid, long axis along x
        ((3.0, 5.0, 4.0), (0.6, 0.9, 1.25)),  # anisotropic pixels, long axis along y
        ((7.5, 5.0, 6.0), (0.8, 0.8, 2.5)),  # thick slices
    ],
)
def test_ellipsoids_identity_direction(semi, spacing):
    centre = (10.3, -20.7, 30.2)
    volume, mask = ellipsoid_scan(semi, spacing=spacing, centre_world=centre)
    m = measure_nodule(volume, mask)
    _check_against_ellipsoid(volume, mask, m, semi, centre)
    assert m.type == "solid" and m.solid_component_mm is None and m.solid_volume_mm3 is None
    assert m.mean_hu == pytest.approx(0.0) and m.max_hu == pytest.approx(0.0)


def _flip_xy(volume: CTVolume, mask: np.ndarray) -> tuple[CTVolume, np.ndarray]:
    """The same voxels stored with LUNA16's flipped direction (−x, −y): arrays reversed in y and x, the
    origin moved to the opposite corner, so every voxel keeps its world position."""
    direction = volume.direction @ np.diag([-1.0, -1.0, 1.0])
    nz, ny, nx = volume.shape
    origin = volume.voxel_to_world(np.array([0.0, ny - 1, nx - 1]))[0]
    flipped = CTVolume(volume.array[:, ::-1, ::-1].copy(), volume.spacing, tuple(origin), direction)
    return flipped, mask[:, ::-1, ::-1].copy()


def test_same_object_same_measurements_in_flipped_storage():
    """LUNA16's flipped direction stores the same voxels at the same world points: same numbers."""
    semi, spacing, centre = (6.0, 3.5, 4.5), (0.65, 0.8, 1.25), (5.0, 7.0, -40.0)
    plain, plain_mask = ellipsoid_scan(semi, spacing=spacing, centre_world=centre, rotation=_rotation_z(25))
    flipped, flipped_mask = _flip_xy(plain, plain_mask)
    a, b = measure_nodule(plain, plain_mask), measure_nodule(flipped, flipped_mask)
    _check_against_ellipsoid(flipped, flipped_mask, b, semi, centre)
    for field in ("volume_mm3", "long_axis_mm", "short_axis_mm", "max_3d_diameter_mm", "axial_slice"):
        assert getattr(b, field) == pytest.approx(getattr(a, field), abs=1e-6), field
    np.testing.assert_allclose(b.center_world_mm, a.center_world_mm, atol=1e-6)
    # The voxel centre is in the flipped scan's own indices.
    nz, ny, nx = plain.shape
    i, j, k = a.center_voxel_xyz
    np.testing.assert_allclose(b.center_voxel_xyz, (nx - 1 - i, ny - 1 - j, k), atol=1e-6)


def test_flipped_ellipsoid_drawn_in_place():
    """An ellipsoid rasterised directly on a flipped grid (its own sampling): analytic values hold."""
    semi, centre = (6.0, 3.5, 4.5), (5.0, 7.0, -40.0)
    volume, mask = ellipsoid_scan(
        semi, spacing=(0.65, 0.8, 1.25), centre_world=centre, direction=np.diag([-1.0, -1.0, 1.0])
    )
    _check_against_ellipsoid(volume, mask, measure_nodule(volume, mask), semi, centre)


def test_long_axis_found_at_any_in_plane_angle():
    """An ellipsoid rotated 30° about z, on anisotropic pixels: long / short axis are still its axes."""
    semi, centre = (6.0, 3.0, 4.0), (0.0, 0.0, 0.0)
    volume, mask = ellipsoid_scan(
        semi, spacing=(0.6, 0.9, 1.0), centre_world=centre, rotation=_rotation_z(30)
    )
    m = measure_nodule(volume, mask)
    _check_against_ellipsoid(volume, mask, m, semi, centre)


def test_oblique_in_plane_direction():
    """A scan rotated about z (direction not axis-aligned): the axial plane is still the slice plane."""
    semi, centre = (5.0, 3.0, 4.0), (1.0, 2.0, 3.0)
    volume, mask = ellipsoid_scan(
        semi, spacing=(0.7, 0.7, 1.25), centre_world=centre, direction=_rotation_z(20)
    )
    m = measure_nodule(volume, mask)
    _check_against_ellipsoid(volume, mask, m, semi, centre)


def test_axial_plane_follows_the_direction_matrix():
    """A coronally stored scan (index j along world z): the axial plane is cut along array axis 1."""
    semi, centre = (6.0, 3.0, 4.5), (0.0, 0.0, 0.0)
    coronal = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])  # i→x, j→z, k→y
    volume, mask = ellipsoid_scan(semi, spacing=(0.7, 0.7, 0.7), centre_world=centre, direction=coronal)
    m = measure_nodule(volume, mask)
    # The largest axial section is the ellipsoid's equator: long 12 mm (x), short 6 mm (y).
    assert m.long_axis_mm == pytest.approx(12.0, abs=AXIS_TOL_MM)
    assert m.short_axis_mm == pytest.approx(6.0, abs=AXIS_TOL_MM)
    assert m.volume_mm3 == pytest.approx(4.0 / 3.0 * np.pi * np.prod(semi), rel=VOLUME_RTOL)


def test_mean_diameter_rounds_to_a_tenth():
    assert mean_diameter(7.0, 6.1) == 6.6
    assert mean_diameter(6.04, 5.9) == 6.0
    assert mean_diameter(6.06, 5.9) == 6.0  # 5.98 → 6.0
    assert mean_diameter(5.0, 4.89) == 4.9  # 4.945 → 4.9


def test_bad_masks_are_refused():
    volume, mask = ellipsoid_scan((3.0, 3.0, 3.0), extent_mm=12.0)
    with pytest.raises(ValueError, match="empty nodule mask"):
        measure_nodule(volume, np.zeros_like(mask))
    with pytest.raises(ValueError, match="differs from the scan"):
        measure_nodule(volume, mask[:-1])


def test_to_dict_is_json_ready():
    volume, mask = ellipsoid_scan((3.0, 3.0, 3.0), extent_mm=12.0)
    data = measure_nodule(volume, mask).to_dict()
    assert json.loads(json.dumps(data)) == data
    assert set(data) == set(NoduleMeasurements.__dataclass_fields__)
    assert isinstance(data["center_world_mm"], list) and len(data["center_world_mm"]) == 3


def test_single_voxel_and_single_slice_masks():
    volume, _ = ellipsoid_scan((3.0, 3.0, 3.0), extent_mm=12.0)
    one = np.zeros(volume.shape, bool)
    one[5, 6, 7] = True
    m = measure_nodule(volume, one)
    assert m.voxel_volume_mm3 == pytest.approx(0.7**3)
    assert 0.0 < m.long_axis_mm <= 1.0 and m.axial_slice == 5
    flat = np.zeros(volume.shape, bool)
    flat[5, 4:12, 6:9] = True
    m = measure_nodule(volume, flat)
    assert m.long_axis_mm == pytest.approx(np.hypot(8 * 0.7, 3 * 0.7), abs=0.5)
    line = np.zeros(volume.shape, bool)
    line[5, 8, 3:12] = True  # one pixel wide: collinear pixel centres
    m = measure_nodule(volume, line)
    assert m.long_axis_mm == pytest.approx(9 * 0.7, abs=0.5) and m.short_axis_mm <= 1.0


# --------------------------------------------------------------------------------------------- type
def _typed_nodule(kind: str, seed: int = 0):
    """A 10 mm nodule with CT-like noise and partial volume: solid (0 HU), ground-glass (−400 HU), or
    part-solid (−400 HU with a 5 mm solid core)."""
    rng = np.random.default_rng(seed)
    spacing = np.array([0.7, 0.7, 1.0])
    n = np.array([40, 40, 30])
    k, j, i = np.meshgrid(*(np.arange(v) for v in n[::-1]), indexing="ij")
    pts = np.stack([i, j, k], axis=-1) * spacing - (n - 1) / 2.0 * spacing
    r = np.linalg.norm(pts, axis=-1)
    # Partial volume: each voxel's occupancy over about one pixel across the surface.
    occupancy = np.clip((5.0 - r) / 0.7 + 0.5, 0.0, 1.0)
    core = np.clip((2.5 - r) / 0.7 + 0.5, 0.0, 1.0)
    tissue = {"solid": 0.0, "ground-glass": -400.0, "part-solid": -400.0}[kind]
    hu = tissue + (core * 400.0 if kind == "part-solid" else 0.0)
    image = LUNG_HU + occupancy * (hu - LUNG_HU) + rng.normal(0.0, 25.0, size=r.shape)
    volume = CTVolume(np.round(image).astype(np.int16), tuple(spacing), (0.0, 0.0, 0.0), np.eye(3))
    return volume, occupancy >= 0.5


@pytest.mark.parametrize("kind", NODULE_TYPES)
def test_type_of_rendered_nodules(kind):
    volume, mask = _typed_nodule(kind)
    m = measure_nodule(volume, mask)
    assert m.type == kind
    if kind == "part-solid":
        assert m.solid_component_mm == pytest.approx(5.0, abs=1.0)
        assert m.solid_volume_mm3 == pytest.approx(4.0 / 3.0 * np.pi * 2.5**3, rel=0.35)
        assert m.solid_component_mm < m.mean_diameter_mm
    else:
        assert m.solid_component_mm is None and m.solid_volume_mm3 is None


# --------------------------------------------------------------------------------------------- phantoms
_PHANTOM_TYPE = {"solid": "solid", "part-solid": "part-solid", "ggo": "ground-glass"}


def _phantom_nodules(seed: int, indices, keep=lambda finding: True):
    """(scan, volume, finding, consensus mask) of each phantom nodule that ``keep`` accepts."""
    from common.synth.scan import generate_scan

    for index in indices:
        scan = generate_scan(seed, index, "small")
        g = scan.geometry
        volume = CTVolume(scan.image, g.spacing, g.origin, np.asarray(g.direction).reshape(3, 3))
        for finding in scan.findings:
            if finding.category != "nodule" or not keep(finding):
                continue
            yield scan, volume, finding, finding.consensus_mask(scan.image.shape)


def test_phantom_nodules_volume_and_centre_match_ground_truth():
    """Scans 0–3 of seed 0 (scan 3 is stored flipped; they hold solid, part-solid and ground-glass
    nodules): volume and centre equal the truth; types agree for ≥ 80 %."""
    seen_flipped = False
    types = collections.Counter()
    for scan, volume, finding, mask in _phantom_nodules(0, range(4)):
        m = measure_nodule(volume, mask)
        types[(_PHANTOM_TYPE[finding.texture], m.type)] += 1
        assert m.voxel_volume_mm3 == pytest.approx(finding.volume_mm3, rel=1e-9)
        np.testing.assert_allclose(m.center_world_mm, finding.world_xyz, atol=1e-3)
        np.testing.assert_allclose(m.center_voxel_xyz, finding.voxel_zyx[::-1], atol=1e-3)
        assert m.mean_diameter_mm <= m.max_3d_diameter_mm + 0.5
        seen_flipped |= scan.geometry.flipped
    assert seen_flipped
    assert {kind for kind, _ in types} == set(NODULE_TYPES)  # solid, part-solid and ground-glass phantoms
    assert sum(n for (a, b), n in types.items() if a == b) >= 0.8 * sum(types.values()), types


@pytest.mark.slow
def test_type_agreement_with_the_phantoms():
    """All nodules of 60 phantoms (seed 3, never used to choose the rule): agreement ≥ 80 % (87.9 %)."""
    table = collections.Counter()
    for _, volume, finding, mask in _phantom_nodules(3, range(60)):
        table[(_PHANTOM_TYPE[finding.texture], measure_nodule(volume, mask).type)] += 1
    total = sum(table.values())
    agreement = sum(v for (a, b), v in table.items() if a == b) / total
    rows = [f"{t:>12}: " + " ".join(f"{table[(t, p)]:4d}" for p in NODULE_TYPES) for t in NODULE_TYPES]
    print(
        f"\ntrue \\ measured {NODULE_TYPES}\n" + "\n".join(rows) + f"\nagreement {agreement:.3f} of {total}"
    )
    assert agreement >= 0.80


# ------------------------------------------------------------------------------------- partial volume
def blurred_sphere(radius_mm, spacing_xyz, offset_zyx, hu_nodule=0.0, sigma_mm=0.5, noise_hu=15.0, seed=0):
    """A sphere imaged like CT: each voxel's HU mixes nodule and lung by the share of the voxel the sphere
    fills (9 × 5 × 5 sub-samples), then a Gaussian blur (the kernel) and noise. Mask: the voxels at or
    above the midpoint HU, as a segmentation at the boundary would give."""
    sp = np.asarray(spacing_xyz, float)[::-1]
    n = np.ceil((2 * radius_mm + 8) / sp).astype(int) + 1
    centre = (n - 1) / 2 + np.asarray(offset_zyx)
    zz, yy, xx = np.meshgrid(*[np.arange(k, dtype=float) for k in n], indexing="ij")
    occupancy = np.zeros(tuple(n))
    subs = [(np.arange(k) + 0.5) / k - 0.5 for k in (9, 5, 5)]
    for dz in subs[0]:
        for dy in subs[1]:
            for dx in subs[2]:
                r2 = ((zz + dz - centre[0]) * sp[0]) ** 2 + ((yy + dy - centre[1]) * sp[1]) ** 2
                occupancy += r2 + ((xx + dx - centre[2]) * sp[2]) ** 2 <= radius_mm**2
    occupancy /= 9 * 5 * 5
    image = LUNG_HU + occupancy * (hu_nodule - LUNG_HU)
    image = ndimage.gaussian_filter(image, sigma_mm / sp, mode="nearest")
    image += np.random.default_rng(seed).normal(0.0, noise_hu, image.shape)
    volume = CTVolume(np.round(image).astype(np.int16), tuple(spacing_xyz), (0.0, 0.0, 0.0), np.eye(3))
    return volume, image >= 0.5 * (hu_nodule + LUNG_HU)


@pytest.mark.parametrize(
    "radius, spacing, hu, tolerance",
    [
        (4.0, (0.7, 0.7, 2.5), 0.0, 0.02),  # 8 mm solid nodule on 2.5 mm slices
        (2.5, (0.7, 0.7, 1.25), 0.0, 0.03),  # 5 mm solid nodule on 1.25 mm slices
        (4.0, (0.7, 0.7, 2.5), -400.0, 0.03),  # 8 mm ground-glass nodule: referred to its own HU
    ],
)
def test_partial_volume_recovers_the_sphere_where_the_voxel_count_does_not(radius, spacing, hu, tolerance):
    true = 4.0 / 3.0 * np.pi * radius**3
    count_errors = []
    for offset in (0.0, 0.25, 0.5):  # where the slices cut the sphere
        volume, mask = blurred_sphere(radius, spacing, (offset, 0.13, -0.21), hu_nodule=hu)
        m = measure_nodule(volume, mask)
        assert m.volume_mm3 == pytest.approx(true, rel=tolerance), offset
        assert m.voxel_volume_mm3 == pytest.approx(mask.sum() * np.prod(spacing))
        count_errors.append(abs(m.voxel_volume_mm3 / true - 1.0))
    assert max(count_errors) > 0.1, count_errors  # the voxel count is off by more than 10 % somewhere


def test_partial_volume_references_and_attached_vessel():
    """The references are read off the image; a vessel leaving the shell does not count as nodule."""
    volume, mask = blurred_sphere(4.0, (0.7, 0.7, 0.7), (0.0, 0.0, 0.0), noise_hu=0.0)
    spacing = np.asarray(volume.spacing)[::-1]
    hu = np.asarray(volume.array, dtype=np.float64)
    alone = partial_volume(hu, mask, spacing)
    assert alone.parenchyma_hu == pytest.approx(LUNG_HU, abs=5)
    assert alone.nodule_hu == pytest.approx(0.0, abs=40)
    assert alone.excluded_voxels == 0
    # A 2 mm vessel (+40 HU) from the nodule's surface to the edge of the array along x.
    centre = (np.asarray(hu.shape) - 1) / 2.0
    zz, yy, xx = np.meshgrid(*[np.arange(k) * s for k, s in zip(hu.shape, spacing)], indexing="ij")
    tube = ((zz - centre[0] * spacing[0]) ** 2 + (yy - centre[1] * spacing[1]) ** 2 <= 1.0) & (
        xx > centre[2] * spacing[2]
    )
    with_vessel = np.where(tube, 40.0, hu)
    attached = partial_volume(with_vessel, mask, spacing)
    assert attached.excluded_voxels > 0
    assert attached.volume_mm3 == pytest.approx(alone.volume_mm3, rel=0.03)
