"""One cut for both time points (`lungcad.followup.consistency`): a stable juxta-pleural phantom nodule whose
independently segmented volumes leave the repeatability interval stays inside it, a growing nodule next to
the wall keeps its growth, and `lungcad followup`'s interval assessment uses it for HU-fallback masks."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from common.io import CTVolume
from common.synth.followup import generate_followup_patient
from lungcad.followup.consistency import joint_fallback
from lungcad.followup.growth import interval_growth
from lungcad.followup.registration import register
from lungcad.followup.track import TimePoint, assess_interval
from lungcad.lungrads import baseline_category
from lungcad.measure import measure_nodule
from lungcad.pipeline import _box_around, fallback_mask, search_radius_mm

# Seed 0, patient P0006, time points 1 → 2: nodule 5 is stable and juxta-pleural; on its own the fallback
# separates the wall at time 1 and not at time 2 (70 → 197 mm³, docs/journal/2026-12-07-volumetry.md).
SEED, PATIENT, TIMES = 0, 5, (1, 2)
STABLE_JUXTA_PLEURAL = 5


def _identity(points: np.ndarray) -> np.ndarray:
    return np.asarray(points, dtype=np.float64).reshape(-1, 3)


def _alone(volume: CTVolume, centre_zyx, diameter_mm: float) -> np.ndarray:
    """`fallback_mask` with one search sphere of the given diameter, on the whole grid: what `analyze`
    stored before `fallback_segment` grew the sphere (which measures this nodule 70 → 57 mm³ on its own)."""
    spacing = np.asarray(volume.spacing, dtype=np.float64)[::-1]
    box = _box_around(
        np.asarray(centre_zyx, float), (search_radius_mm(diameter_mm) + 1.0) / spacing + 1, volume.shape
    )
    offset = np.array([s.start for s in box], dtype=np.float64)
    found = fallback_mask(
        np.asarray(volume.array[box], np.float64), centre_zyx - offset, diameter_mm, spacing
    )
    assert found is not None
    mask = np.zeros(volume.shape, dtype=bool)
    mask[box] = found[0]
    return mask


@pytest.fixture(scope="module")
def pair():
    scans, truth = generate_followup_patient(SEED, PATIENT, n_times=3)
    g = truth["geometry"]
    direction = np.asarray(g["direction"]).reshape(3, 3)
    volumes = [
        CTVolume(scans[t]["image"], g["spacing_xyz"], g["origin_xyz"], direction, scans[t]["uid"])
        for t in TIMES
    ]
    return volumes, truth, register(volumes[0], volumes[1])


def test_one_cut_keeps_a_stable_juxta_pleural_nodule_inside_the_repeatability(pair):
    (prior, current), truth, registration = pair
    nodule = truth["nodules"][STABLE_JUXTA_PLEURAL]
    assert (nodule["kind"], nodule["location"]) == ("stable", "juxta-pleural")
    a, b = (nodule["per_time"][t] for t in TIMES)
    days = truth["scans"][TIMES[1]]["days_from_first"] - truth["scans"][TIMES[0]]["days_from_first"]
    # Segmented alone, the wall is cut on one scan and not on the other: "growth" beyond the interval.
    ma = measure_nodule(prior, _alone(prior, np.asarray(a["voxel_zyx"]), a["diameter_mm"]))
    mb = measure_nodule(current, _alone(current, np.asarray(b["voxel_zyx"]), b["diameter_mm"]))
    alone = interval_growth(ma.volume_mm3, mb.volume_mm3, ma.mean_diameter_mm, mb.mean_diameter_mm, days)
    assert not alone.includes_no_growth
    joint = joint_fallback(
        prior,
        current,
        np.asarray(a["world_xyz"]),
        max(a["diameter_mm"], b["diameter_mm"]),
        registration.prior_to_current,
        registration.current_to_prior,
    )
    assert joint is not None and joint.cut_mm3 > 0
    ja, jb = measure_nodule(prior, joint.prior_mask), measure_nodule(current, joint.current_mask)
    together = interval_growth(ja.volume_mm3, jb.volume_mm3, ja.mean_diameter_mm, jb.mean_diameter_mm, days)
    assert together.includes_no_growth
    for m in (ja, jb):  # and the volume is the nodule's, not the wall's
        assert abs(m.volume_mm3 / a["volume_mm3"] - 1.0) < 0.35


def _wall_phantom(radius_mm: float) -> CTVolume:
    """Lung (−850 HU) above a chest wall (+40 HU below z = 20 mm), a solid nodule (0 HU) touching the wall;
    1.25 mm slices, 0.8 mm pixels, mild noise."""
    spacing_zyx = np.array([1.25, 0.8, 0.8])
    shape = (48, 60, 60)
    z, y, x = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing_zyx)], indexing="ij")
    hu = np.full(shape, -850.0)
    hu[z < 20.0] = 40.0
    centre = np.array([20.0 + radius_mm - 0.5, 24.0, 24.0])  # touching the wall over a small disc
    inside = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= radius_mm**2
    hu[inside] = 0.0
    hu += np.random.default_rng(0).normal(0.0, 15.0, shape)
    return CTVolume(hu.astype(np.int16), tuple(spacing_zyx[::-1]), (0.0, 0.0, 0.0), np.eye(3), "wall")


def test_one_cut_keeps_the_growth_of_a_nodule_on_the_wall():
    prior, current = _wall_phantom(3.5), _wall_phantom(5.0)
    centre_xyz = np.array([24.0, 24.0, 23.0])
    joint = joint_fallback(prior, current, centre_xyz, 10.0, _identity, _identity)
    assert joint is not None
    ratio = (
        measure_nodule(current, joint.current_mask).volume_mm3
        / measure_nodule(prior, joint.prior_mask).volume_mm3
    )
    true_ratio = (5.0 / 3.5) ** 3
    assert abs(np.log(ratio / true_ratio)) < np.log(1.25)
    # The wall (a slab through the whole search sphere) is cut from both: neither mask reaches 8 mm under it.
    wall_z = int(np.floor(12.0 / 1.25))
    assert not joint.prior_mask[:wall_z].any() and not joint.current_mask[:wall_z].any()


def _report(volume: CTVolume, nodules: list[tuple[np.ndarray, float]]) -> dict:
    """A report.json-like dict whose nodules the HU fallback segmented at the given (voxel zyx, diameter)."""
    rows = []
    for index, (centre_zyx, diameter) in enumerate(nodules, start=1):
        m = measure_nodule(volume, _alone(volume, centre_zyx, diameter))
        rows.append(
            {
                "index": index,
                "segmentation": "hu-threshold",
                "measurements": {
                    "center_world_mm": list(m.center_world_mm),
                    "volume_mm3": m.volume_mm3,
                    "mean_diameter_mm": m.mean_diameter_mm,
                    "max_3d_diameter_mm": m.max_3d_diameter_mm,
                    "type": m.type,
                    "solid_component_mm": m.solid_component_mm,
                },
                "category": baseline_category(m.type, m.mean_diameter_mm, m.solid_component_mm).to_dict(),
            }
        )
    return {"nodules": rows}


def test_followup_interval_uses_the_joint_segmentation_for_fallback_masks(pair):
    (prior, current), truth, registration = pair
    present = [n for n in truth["nodules"] if all(n["per_time"][t]["present"] for t in TIMES)]
    points = []
    for k, (volume, t) in enumerate(zip((prior, current), TIMES)):
        given = [
            (np.asarray(n["per_time"][t]["voxel_zyx"]), n["per_time"][t]["diameter_mm"]) for n in present
        ]
        points.append(TimePoint(f"T{t}", dt.date(2024, 1 + 6 * k, 1), _report(volume, given), volume))
    result = assess_interval(points[0], points[1], registration)
    matched = [row for row in result.rows if row["growth"] is not None]
    assert len(matched) == len(present)
    assert {row["growth"]["volume_source"] for row in matched} == {"joint-segmentation"}
    stable = [
        row
        for row, n in zip(sorted(matched, key=lambda r: r["prior"]["index"]), present)
        if n["kind"] == "stable"
    ]
    assert stable and all(row["growth"]["includes_no_growth"] for row in stable)
    for row in matched:
        assert row["growth"]["joint_segmentation"]["cut_mm3"] >= 0.0
