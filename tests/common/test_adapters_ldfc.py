"""LDFC adapter on a generated LDFC tree: 3D tables, class folders, VOC set and bad inputs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from common.datasets.ldfc import LDFCDataset
from common.datasets.tables import AnnotationError
from common.io import read_volume
from common.synth.ldfc import make_ldfc
from tests.common.pathology_probe import grouped_cv_accuracy, nodule_features

N_SCANS = 2  # one training and one test patient; the second is stored with the flipped direction


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_ldfc(tmp_path_factory.mktemp("ldfc"), n_scans=N_SCANS, seed=11)


@pytest.fixture(scope="module")
def manifest(tree):
    return {s["uid"]: s for s in json.loads((tree.root / "synth_manifest.json").read_text())["scans"]}


@pytest.fixture()
def copy(tree, tmp_path):
    target = tmp_path / "ldfc"
    shutil.copytree(tree.root, target)
    return target


def test_same_seed_same_bytes(tree, tmp_path):
    again = make_ldfc(tmp_path / "again", n_scans=N_SCANS, seed=11)
    files = sorted(p.relative_to(tree.root) for p in tree.root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again.root) for p in again.root.rglob("*") if p.is_file())
    for name in files:
        assert (tree.root / name).read_bytes() == (again.root / name).read_bytes(), name


def test_scans_and_nodules_join_both_tables(tree, manifest):
    ds = LDFCDataset(tree.root)
    assert ds.uids == ["1", "2"]
    assert any(np.asarray(s["direction"])[0] < 0 for s in manifest.values())
    for record in ds:
        truth = manifest[record.uid]["nodules"]
        volume = read_volume(record.image_path)
        assert len(record.nodules) == len(truth) == 3
        for nodule in record.nodules:
            lo, hi = (np.asarray(c) for c in nodule.extras["bbox_zyx"])
            zyx = np.asarray(nodule.extras["voxel_zyx"])
            np.testing.assert_allclose(zyx, (lo + hi) / 2)
            # The world table and the voxel table describe the same point through the scan geometry.
            np.testing.assert_allclose(volume.voxel_to_world(zyx)[0], nodule.world_xyz, atol=1e-5)
            match = [t for t in truth if t["bbox_lo_zyx"] == lo.tolist() and t["bbox_hi_zyx"] == hi.tolist()]
            assert len(match) == 1
            assert nodule.diameter_mm == pytest.approx(match[0]["diameter_mm"], abs=1e-4)  # 4 decimals
            assert nodule.extras["radius_mm"] == pytest.approx(nodule.diameter_mm / 2, abs=1e-5)
            assert np.all(lo <= np.asarray(match[0]["voxel_zyx"]) + 0.5)
            assert np.all(np.asarray(match[0]["voxel_zyx"]) - 0.5 <= hi)


def test_single_table_modes_agree(tree):
    both = LDFCDataset(tree.root)
    world_only = LDFCDataset(tree.root, voxel_csv=None)
    voxel_only = LDFCDataset(tree.root, world_csv=None)
    for a, b, c in zip(both, world_only, voxel_only):
        np.testing.assert_allclose(a.nodule_array()[:, :3], b.nodule_array()[:, :3], atol=1e-9)
        np.testing.assert_allclose(a.nodule_array()[:, :3], c.nodule_array()[:, :3], atol=1e-5)


def test_classification_folders(tree, manifest):
    index = LDFCDataset(tree.root).classification()
    assert index.parts == ["train", "test"] and index.classes == ["0", "1", "2"]
    assert index.counts() == tree.n_class_images
    assert index.counts()["test"] == {"0": 1, "1": 1, "2": 1}
    parts_of = {}
    for sample in index.samples:
        assert sample.label == int(sample.class_name)
        parts_of.setdefault(sample.patient_id, set()).add(sample.part)
        labels = {n["label"] for n in manifest[sample.patient_id]["nodules"]}
        assert sample.label in labels
        with Image.open(sample.path) as image:
            assert image.size == (160, 160) and image.mode == "L"
    assert all(len(parts) == 1 for parts in parts_of.values())  # patient-level train/test


def test_voc_detection_set(tree, manifest):
    voc = LDFCDataset(tree.root).detection_2d()
    assert sorted(voc.parts) == ["test", "train"]
    assert len(voc) == sum(tree.n_voc_images.values())
    for image in voc.images:
        scan, z = image.annotation_path.stem.split("_")
        nodules = manifest[scan]["nodules"]
        on_slice = [n for n in nodules if n["bbox_lo_zyx"][0] <= int(z) <= n["bbox_hi_zyx"][0]]
        assert 1 <= len(image.boxes) <= len(on_slice)
        assert image.parts == (manifest[scan]["part"],)
        for box in image.boxes:
            assert 1 <= box.xmin < box.xmax <= image.width and 1 <= box.ymin < box.ymax <= image.height


def test_empty_class_folder(copy, caplog):
    for image in (copy / "BMP_classification" / "test" / "2").iterdir():
        image.unlink()
    with pytest.raises(AnnotationError, match=r"class folder .*BMP_classification/test/2 is empty"):
        LDFCDataset(copy).classification()
    lenient = LDFCDataset(copy, strict=False).classification()
    assert lenient.counts()["test"]["2"] == 0 and len(lenient.policy.skipped) == 1
    assert "BMP_classification/test/2" in caplog.text


def test_unmatched_and_missing_rows(copy):
    world = copy / "anno_WorldCoord.csv"
    frame = pd.read_csv(world, dtype=str)
    frame.loc[0, "coordX"] = str(float(frame.loc[0, "coordX"]) + 40.0)
    frame.to_csv(world, index=False)
    with pytest.raises(
        AnnotationError, match=r"anno_WorldCoord.csv, line 2: no nodule of scan 1 in .*all_anno_3D.csv"
    ):
        _ = LDFCDataset(copy).records
    frame.loc[0, "index"] = "42"
    frame.to_csv(world, index=False)
    with pytest.raises(AnnotationError, match=r"line 2: scan '42' has no 42.mhd"):
        _ = LDFCDataset(copy).records
    # Lenient: the bad world row is skipped, and its voxel-table partner is then reported as unmatched.
    lenient = LDFCDataset(copy, strict=False)
    assert sum(len(r.nodules) for r in lenient) == 5 and len(lenient.policy.skipped) == 2


def test_box_outside_volume_and_renamed_columns(tree, copy):
    voxel = copy / "all_anno_3D.csv"
    frame = pd.read_csv(voxel, dtype=str)
    frame.loc[1, "z_max"] = "999"
    frame.to_csv(voxel, index=False)
    with pytest.raises(
        AnnotationError, match=r"all_anno_3D.csv, line 3: .*disagree|line 3: box .* lies outside"
    ):
        _ = LDFCDataset(copy).records
    frame = pd.read_csv(tree.root / "all_anno_3D.csv", dtype=str).rename(columns={"x_center": "cx"})
    frame.to_csv(voxel, index=False)
    with pytest.raises(AnnotationError, match=r"lacks column\(s\) x_center='x_center'.*LDFCColumns"):
        _ = LDFCDataset(copy).records


@pytest.mark.slow
def test_classes_are_learnable_from_pixels(tmp_path):
    """15 patients, 45 nodules: a crude pixel probe beats the 1/3 chance level clearly."""
    tree = make_ldfc(tmp_path / "ldfc15", n_scans=15, seed=4)
    scans = {s["uid"]: s for s in json.loads((tree.root / "synth_manifest.json").read_text())["scans"]}
    index = LDFCDataset(tree.root).classification()
    features, labels, groups = [], [], []
    for sample in index.samples:
        scan, _slice, k = sample.path.stem.split("_")
        _, row, col = scans[scan]["nodules"][int(k)]["voxel_zyx"]
        features.append(nodule_features(sample.path, row, col))
        labels.append(sample.label)
        groups.append(sample.patient_id)
    assert np.bincount(labels).tolist() == [15, 15, 15]
    assert grouped_cv_accuracy(np.asarray(features), np.asarray(labels), np.asarray(groups)) > 0.5
