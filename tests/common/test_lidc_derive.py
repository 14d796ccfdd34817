"""LUNA16 and M3Net derivations from the shipped LIDC database: published counts, parameter directions,
world-coordinate join and the `lungdata lidc derive` command."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from common.cli import main
from common.datasets.lidc_db import default_database
from common.datasets.lidc_derive import (
    LUNA16_NODULE_COLUMNS,
    LUNA16_PUBLISHED,
    LUNA16_SCAN_COLUMNS,
    M3NET_COLUMNS,
    M3NET_PUBLISHED,
    derive_luna16,
    derive_m3net,
    join_world,
    label_counts,
    luna16_annotations_csv,
)


@pytest.fixture(scope="module")
def db():
    return default_database()


def luna_counts(db, **kwargs) -> tuple[int, int]:
    scans, nodules = derive_luna16(db, **kwargs)
    return len(scans), len(nodules)


def test_luna16_defaults_match_the_challenge(db):
    scans, nodules = derive_luna16(db)
    assert list(scans.columns) == LUNA16_SCAN_COLUMNS and list(nodules.columns) == LUNA16_NODULE_COLUMNS
    assert len(scans) == pytest.approx(LUNA16_PUBLISHED["scans"], rel=0.01)
    assert len(nodules) == pytest.approx(LUNA16_PUBLISHED["nodules"], rel=0.01)
    assert (scans["slice_thickness"] <= 2.5).all() and scans["seriesuid"].is_unique
    assert set(nodules["seriesuid"]) <= set(scans["seriesuid"])
    assert scans["n_nodules"].sum() == len(nodules)
    assert (nodules["n_readers"] >= 3).all() and (nodules["diameter_mm"] >= 3.0).all()
    pylidc_scans, pylidc_nodules = derive_luna16(db, grouping="pylidc")
    assert len(pylidc_scans) == len(scans)
    assert len(pylidc_nodules) == pytest.approx(LUNA16_PUBLISHED["nodules"], rel=0.01)


def test_luna16_parameters_move_counts_the_right_way(db):
    base_scans, base_nodules = luna_counts(db)
    thin, _ = luna_counts(db, max_thickness=2.0)
    thick, _ = luna_counts(db, max_thickness=3.0)
    assert thin < base_scans < thick
    loose, _ = luna_counts(db, require_consistent_spacing=False)
    assert loose > base_scans
    _, two_readers = luna_counts(db, min_readers=2)
    _, four_readers = luna_counts(db, min_readers=4)
    assert two_readers > base_nodules > four_readers
    _, large = luna_counts(db, min_diameter=10.0)
    assert large < base_nodules
    with pytest.raises(ValueError, match="grouping"):
        derive_luna16(db, grouping="nearest")


def test_m3net_defaults_reproduce_the_paper(db):
    table = derive_m3net(db)
    assert list(table.columns) == M3NET_COLUMNS
    counts = label_counts(table)
    for key in ("nodules", "benign", "malignant"):
        assert counts[key] == pytest.approx(M3NET_PUBLISHED[key], rel=0.03)
    assert table["patient_id"].is_monotonic_increasing and table["nodule_index"].tolist() == list(
        range(len(table))
    )
    assert table["patient_id"].nunique() == table["scan_id"].nunique()  # one scan per patient
    assert ((table["malignancy_mean"] > 3) == (table["label"] == 1)).all()
    first = table.iloc[0]
    ids = [int(a) for a in first["annotation_ids"].split(";")]
    assert first["malignancy_mean"] == pytest.approx(np.mean([db.ratings(a)["malignancy"] for a in ids]))


def test_m3net_parameters_move_counts_the_right_way(db):
    base = label_counts(derive_m3net(db))
    assert label_counts(derive_m3net(db, min_diameter=3.0))["nodules"] <= base["nodules"]
    assert label_counts(derive_m3net(db, min_diameter=10.0))["nodules"] < base["nodules"]
    assert label_counts(derive_m3net(db, min_readers=3))["nodules"] < base["nodules"]
    assert label_counts(derive_m3net(db, one_scan_per_patient=False))["nodules"] > base["nodules"]
    strict = label_counts(derive_m3net(db, drop_indeterminate=True))
    assert strict["benign"] < base["benign"] and strict["malignant"] == base["malignant"]


def test_join_world_applies_origin_spacing_and_direction():
    nodules = pd.DataFrame(
        {
            "seriesuid": ["a", "b"],
            "voxelX": [10.0, 1.0],
            "voxelY": [20.0, 2.0],
            "voxelZ": [3.0, 4.0],
            "diameter_mm": 5.0,
        }
    )
    same = join_world(nodules, origin=(-100.0, -200.0, -300.0), spacing=(0.5, 0.5, 2.0))
    assert same[["coordX", "coordY", "coordZ"]].to_numpy().tolist() == [
        [-95.0, -190.0, -294.0],
        [-99.5, -199.0, -292.0],
    ]
    flipped = np.diag([1.0, -1.0, -1.0])
    per_scan = join_world(
        nodules,
        origin={"a": (0.0, 0.0, 0.0), "b": (1.0, 1.0, 1.0)},
        spacing={"a": (1.0, 1.0, 1.0), "b": (2.0, 2.0, 2.0)},
        direction={"a": np.eye(3), "b": flipped},
    )
    assert per_scan[["coordX", "coordY", "coordZ"]].to_numpy().tolist() == [
        [10.0, 20.0, 3.0],
        [3.0, -3.0, -7.0],
    ]
    csv = luna16_annotations_csv(per_scan)
    assert list(csv.columns) == ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
    with pytest.raises(ValueError, match="join_world"):
        luna16_annotations_csv(nodules)
    with pytest.raises(KeyError, match="seriesuid b"):
        join_world(nodules, origin={"a": (0, 0, 0)}, spacing=(1, 1, 1))


def test_join_world_recovers_published_luna16_centres(db):
    # LUNA16 annotations.csv, first scan: world centres of its two nodules. The in-plane origin is not in the
    # database; taken from the first nodule, it must place the second one where LUNA16 has it.
    uid = "1.3.6.1.4.1.14519.5.2.1.6279.6001.100225287222365663678666836860"
    published = np.array(
        [[-128.6994211, -175.3192718, -298.3875064], [103.7836509, -211.9251487, -227.12125]]
    )
    scans, nodules = derive_luna16(db)
    mine = nodules[nodules["seriesuid"] == uid].sort_values("voxelZ")
    assert len(mine) == 2
    spacing = db.spacing(db.scan_id(uid))
    first = mine.iloc[0]
    origin = (
        published[0, 0] - first["voxelX"] * spacing[0],
        published[0, 1] - first["voxelY"] * spacing[1],
        float(db.slice_positions(db.scan_id(uid))[0]),
    )
    world = join_world(mine, origin=origin, spacing=spacing)
    assert np.abs(world[["coordX", "coordY", "coordZ"]].to_numpy() - published).max() < 0.5
    assert np.abs(world["coordZ"].to_numpy() - mine["worldZ"].to_numpy()).max() < 1e-6


def test_cli_writes_tables_and_prints_counts(tmp_path, capsys):
    out = tmp_path / "m3net.csv"
    assert main(["lidc", "derive", "m3net", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "paper 2625" in printed and "paper 633" in printed
    table = pd.read_csv(out)
    assert list(table.columns) == M3NET_COLUMNS and len(table) == len(derive_m3net(default_database()))

    luna = tmp_path / "luna" / "annotations.csv"
    assert (
        main(["lidc", "derive", "luna16", "--max-thickness", "2.0", "--min-readers", "4", "--out", str(luna)])
        == 0
    )
    printed = capsys.readouterr().out
    scans, nodules = derive_luna16(default_database(), max_thickness=2.0, min_readers=4)
    assert f"scans:   {len(scans)} " in printed and f"nodules: {len(nodules)} " in printed
    assert len(pd.read_csv(luna)) == len(nodules)
    uids = pd.read_csv(luna.with_name("annotations_seriesuids.csv"), header=None)[0]
    assert uids.tolist() == scans["seriesuid"].tolist()
    assert main(["lidc", "derive", "luna16", "--database", str(tmp_path / "none.sqlite")]) == 2
    assert "none.sqlite" in capsys.readouterr().err
