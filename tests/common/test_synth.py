"""Phantom anatomy, the LIDC shape bank and the scan generator (array level, no files)."""

from __future__ import annotations

import numpy as np
import pytest

from common.datasets.lidc_db import LIDCDatabase, rasterise_outlines
from common.io import CTVolume
from common.synth.lidc import trace_outlines
from common.synth.nodules import texture_class
from common.synth.phantom import (
    AIRWAY_LABEL,
    LEFT_LUNG_LABEL,
    RIGHT_LUNG_LABEL,
    build_anatomy,
    draw_geometry,
    finish_scan,
)
from common.synth.scan import SYNTH_UID_ROOT, default_bank, generate_scan, synthetic_uid


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(key))))


@pytest.fixture(scope="module")
def bank():
    return default_bank()


def test_anatomy_tissues_have_their_hu():
    geometry = draw_geometry(_rng(0, 1), "small")
    anatomy = build_anatomy(_rng(0, 2), geometry)
    labels = anatomy.labels
    lungs = (labels == LEFT_LUNG_LABEL) | (labels == RIGHT_LUNG_LABEL)
    parenchyma = lungs & (anatomy.vessel < 0.01)
    assert -900 < anatomy.hu[parenchyma].mean() < -790
    assert (labels == LEFT_LUNG_LABEL).sum() > 0.05 * labels.size / 3
    assert (labels == RIGHT_LUNG_LABEL).sum() > (labels == LEFT_LUNG_LABEL).sum() * 0.8
    # Vessels inside the lungs are soft tissue where they are fully resolved.
    assert np.all(np.abs(anatomy.hu[anatomy.vessel >= 1.0] - 40.0) < 0.01)
    # The right lung (label 4) lies at smaller world x (patient right) than the left lung (label 3).
    xs = np.arange(geometry.shape[2])
    right_x = (xs * (labels == RIGHT_LUNG_LABEL).sum(axis=(0, 1))).sum() / (labels == RIGHT_LUNG_LABEL).sum()
    left_x = (xs * (labels == LEFT_LUNG_LABEL).sum(axis=(0, 1))).sum() / (labels == LEFT_LUNG_LABEL).sum()
    assert right_x < left_x
    # The trachea enters from the top slice (highest z = superior) and is air inside a wall.
    airway = labels == AIRWAY_LABEL
    assert airway[-1].any() and not airway[0].any()
    assert anatomy.hu[airway].min() == -1000.0
    # Outside air, and a vessel tree with many branch points.
    assert anatomy.hu[0, 0, 0] == -1000.0
    assert len(anatomy.segments) > 50 and len(anatomy.branch_points) > 20


def test_noise_has_the_drawn_sigma():
    geometry = draw_geometry(_rng(3, 1), "small")
    anatomy = build_anatomy(_rng(3, 2), geometry)
    image = finish_scan(_rng(3, 3), np.zeros(geometry.shape, np.float32), anatomy, geometry).astype(float)
    if anatomy.fov_padding:
        image = image[:, 60:100, 60:100]
    assert abs(image.std() - anatomy.noise_sigma) < 0.1 * anatomy.noise_sigma


def test_flipped_geometry_keeps_world_coordinates():
    flipped = draw_geometry(_rng(5, 1), "small", flipped=True)
    plain = draw_geometry(_rng(5, 1), "small", flipped=False)
    assert flipped.direction == (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    canonical = np.array([[10.0, 20.0, 30.0], [63.0, 0.0, 159.0]])
    world = flipped.canonical_to_world(canonical)
    np.testing.assert_allclose(world, plain.canonical_to_world(canonical))
    volume = CTVolume(
        np.zeros(flipped.shape, np.int16),
        flipped.spacing,
        flipped.origin,
        np.reshape(flipped.direction, (3, 3)),
    )
    stored = flipped.canonical_to_storage_index(canonical)
    np.testing.assert_allclose(volume.voxel_to_world(stored), world, atol=1e-9)
    np.testing.assert_allclose(flipped.world_to_canonical(world), canonical, atol=1e-9)


def test_synthetic_uids_are_valid_and_never_real_lidc_uids():
    uid = synthetic_uid(0, 0, "series")
    assert uid.startswith(SYNTH_UID_ROOT + ".") and len(uid) + len(".9999") <= 64
    assert all(part.isdigit() and (part == "0" or not part.startswith("0")) for part in uid.split("."))
    others = {
        synthetic_uid(1, 0, "series"),
        synthetic_uid(0, 1, "series"),
        synthetic_uid(0, 0, "series", "medium"),
    }
    assert uid not in others and len(others) == 3
    real = LIDCDatabase().scans()["series_uid"]
    # Every real LIDC/LUNA16 UID has exactly one arc after the LIDC root; ours have two.
    root = SYNTH_UID_ROOT.rsplit(".", 1)[0] + "."
    assert all(u.startswith(root) and "." not in u[len(root) :] for u in real)


def test_texture_rating_decides_solidity():
    assert [texture_class(t) for t in (1, 2, 2.5, 3, 4, 5)] == [
        "ggo",
        "ggo",
        "part-solid",
        "part-solid",
        "solid",
        "solid",
    ]


def test_bank_nodules_are_real_lidc_clusters(bank):
    db = bank.database
    entries = bank.entries
    assert len(entries) > 200
    for entry in entries[:: max(1, len(entries) // 12)]:
        assert entry.series_uid == db.scan(entry.scan_id)["series_uid"]
        assert list(entry.annotation_ids) in db.cluster_annotations(entry.scan_id)
        assert list(entry.reader_ratings) == [db.ratings(a) for a in entry.annotation_ids]
        assert entry.diameter_mm == pytest.approx(np.mean([db.diameter_mm(a) for a in entry.annotation_ids]))


def test_template_rescaling_keeps_the_physical_size(bank):
    entry = next(e for e in bank.entries if e.n_readers == 4 and 8.0 <= e.diameter_mm <= 14.0)
    masks, spacing = bank.source_masks(entry)
    source_volume = masks.sum(axis=(1, 2, 3)) * np.prod(spacing)
    for target in ((0.6, 0.6, 1.25), (0.9, 0.9, 2.5)):
        template = bank.template(entry, target)
        assert template is not None and template.reader_masks.shape[0] == 4
        volume = template.reader_masks.sum(axis=(1, 2, 3)) * np.prod(target)
        np.testing.assert_allclose(volume, source_volume, rtol=0.3)


def test_generate_scan_is_deterministic_and_index_local(bank):
    a = generate_scan(7, 2, "small", bank)
    b = generate_scan(7, 2, "small", bank)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.lung_labels, b.lung_labels)
    assert [f.manifest() for f in a.findings] == [f.manifest() for f in b.findings]
    other = generate_scan(8, 2, "small", bank)
    assert other.series_uid != a.series_uid and not np.array_equal(other.image, a.image)


def test_findings_sit_where_the_manifest_says(bank):
    scan = generate_scan(11, 0, "small", bank)
    assert scan.accepted, "scans 0-3 always carry an accepted nodule"
    for finding in scan.findings:
        z, y, x = np.rint(finding.voxel_zyx).astype(int)
        assert scan.lung_labels[z, y, x] in (LEFT_LUNG_LABEL, RIGHT_LUNG_LABEL)
        np.testing.assert_allclose(scan.storage_to_world(finding.voxel_zyx), finding.world_xyz, atol=1e-6)
        if finding.category == "nodule":
            assert len(finding.reader_masks) == finding.n_readers == finding.bank.n_readers
            stacked = []
            for rm in finding.reader_masks:
                full = np.zeros(scan.image.shape, bool)
                full[tuple(slice(s, s + n) for s, n in zip(rm.start, rm.mask.shape))] = rm.mask
                stacked.append(full)
            consensus = np.mean(stacked, axis=0) >= 0.5
            assert consensus[z, y, x]
            np.testing.assert_allclose(np.argwhere(consensus).mean(axis=0), finding.voxel_zyx, atol=1e-6)


def test_trace_outlines_round_trips_through_the_lidc_rasteriser():
    rng = np.random.default_rng(0)
    from scipy import ndimage

    for _ in range(60):
        mask = ndimage.gaussian_filter(rng.random((28, 28)), 2.0) > 0.5 + rng.uniform(-0.03, 0.03)
        mask[:2] = mask[-2:] = False
        mask[:, :2] = mask[:, -2:] = False
        outlines = trace_outlines(mask)
        filled, rings = rasterise_outlines([o.points_xy for o in outlines], (0, 0), mask.shape)
        rebuilt = np.zeros_like(mask)
        for outline, inside, ring in zip(outlines, filled, rings):
            if outline.inclusion:
                rebuilt |= inside & ~ring
        for outline, inside, ring in zip(outlines, filled, rings):
            if not outline.inclusion:
                rebuilt &= ~(inside | ring)
        assert np.array_equal(rebuilt, mask)
