"""Spatio-temporal adapter on a generated tree: follow-ups, class folders, VOC, patient-level splits."""

from __future__ import annotations

import argparse
import json
import logging
import shutil

import numpy as np
import pandas as pd
import pytest

from common.commands import split as split_command
from common.datasets.spatiotemporal import SpatioTemporalDataset
from common.datasets.tables import AnnotationError
from common.io import read_volume
from common.splits import Split, SplitError, items_from_records, kfold_split, ratio_split
from common.synth.spatiotemporal import make_spatiotemporal
from tests.common.pathology_probe import grouped_cv_accuracy, nodule_features

N_SCANS = 6  # patients P0001..P0004 with 2, 1, 2, 1 time points; P0002 and P0004 are the validation part


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_spatiotemporal(tmp_path_factory.mktemp("stpd"), n_scans=N_SCANS, seed=2)


@pytest.fixture(scope="module")
def manifest(tree):
    return {s["uid"]: s for s in json.loads((tree.root / "synth_manifest.json").read_text())["scans"]}


@pytest.fixture()
def copy(tree, tmp_path):
    target = tmp_path / "stpd"
    shutil.copytree(tree.root, target)
    return target


def test_follow_up_scans_share_patient_and_nodules(tree, manifest):
    ds = SpatioTemporalDataset(tree.root)
    assert ds.uids == ["P0001_T1", "P0001_T2", "P0002_T1", "P0003_T1", "P0003_T2", "P0004_T1"]
    assert [r.patient_id for r in ds] == ["P0001", "P0001", "P0002", "P0003", "P0003", "P0004"]
    assert [r.extras["time_point"] for r in ds] == [1, 2, 1, 1, 2, 1]
    for record in ds:
        truth = manifest[record.uid]["nodules"]
        assert len(record.nodules) == len(truth) == 3
        assert record.lung_mask_path is not None and record.lung_mask_path.is_file()
        volume = read_volume(record.image_path)
        for nodule, t in zip(record.nodules, truth):
            np.testing.assert_allclose(nodule.world_xyz, t["world_xyz"], atol=1e-4)
            np.testing.assert_allclose(
                nodule.extras["voxel_zyx"], volume.world_to_voxel(nodule.world_xyz)[0], atol=1e-6
            )
    first, second = ds["P0003_T1"], ds["P0003_T2"]
    for a, b in zip(first.nodules, second.nodules):
        assert np.linalg.norm(np.subtract(a.world_xyz, b.world_xyz)) < 2.0  # same nodule, same place
        assert b.diameter_mm == pytest.approx(1.1 * a.diameter_mm, rel=1e-6)  # grown 10 % per time point


def test_class_is_visible_in_the_pixels(tree, manifest):
    """Ground-glass (class 3) nodules are much less dense than solid malignant ones (classes 1, 4)."""
    density: dict[int, list[float]] = {}
    for scan in manifest.values():
        image = read_volume(tree.root / scan["files"]["image"]).array
        for nodule in scan["nodules"]:
            z, y, x = (int(round(v)) for v in nodule["voxel_zyx"])
            density.setdefault(nodule["label"], []).append(
                float(image[z, y - 1 : y + 2, x - 1 : x + 2].mean())
            )
    assert set(density) == {1, 2, 3, 4, 5, 6}
    assert max(density[3]) < -150, density[3]
    assert min(density[1] + density[4]) > -100, density


def test_classification_and_voc_are_patient_level(tree):
    ds = SpatioTemporalDataset(tree.root)
    index = ds.classification()
    assert index.counts() == tree.n_class_images
    assert all(n > 0 for counts in index.counts().values() for n in counts.values())
    validate_patients = {s.patient_id for s in index.part("validate")}
    assert validate_patients == {"P0002", "P0004"}
    assert not validate_patients & {s.patient_id for s in index.part("train")}
    voc = ds.detection_2d()
    assert sorted(voc.parts) == ["train", "val"]
    assert {i.patient_id for i in voc.part("val")} == validate_patients
    assert all(i.boxes for i in voc.images)


def test_splits_keep_follow_ups_together(tree, tmp_path):
    records = SpatioTemporalDataset(tree.root).records
    items = items_from_records(records)
    for split in (kfold_split(items, k=2, seed=0), ratio_split(items, {"train": 0.5, "test": 0.5}, seed=4)):
        for patient in {r.patient_id for r in records}:
            parts = {split.part_of(r.uid) for r in records if r.patient_id == patient}
            assert len(parts) == 1
    parser = argparse.ArgumentParser()
    split_command.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "stpd_split.json"
    argv = [
        "split",
        "make",
        "spatiotemporal",
        "--root",
        str(tree.root),
        "--out",
        str(out),
        "--method",
        "kfold",
    ]
    args = parser.parse_args([*argv, "--folds", "2", "--seed", "7"])
    assert args.func(args) == 0
    first = Split.load(out)
    again = split_command.make_split(parser.parse_args([*argv, "--folds", "2", "--seed", "7"]))
    assert again.assignments == first.assignments  # same seed, same split
    check = parser.parse_args(
        ["split", "check", str(out), "--dataset", "spatiotemporal", "--root", str(tree.root)]
    )
    assert check.func(check) == 0
    # A hand-edited file that separates a patient's follow-up from its baseline is refused.
    payload = json.loads(out.read_text())
    for row in payload["assignments"]:
        if row[0] == "P0001_T2":
            row[2] = "fold1" if row[2] == "fold0" else "fold0"
    out.write_text(json.dumps(payload))
    with pytest.raises(SplitError, match=r"patient 'P0001' appears in parts \['fold0', 'fold1'\]"):
        Split.load(out)


def test_patient_table_and_unmatched_names(copy, caplog):
    table = copy / "patients.csv"
    pd.DataFrame(
        {"seriesuid": ["P0002_T1", "P0004_T1"], "patient_id": ["P0002", "P0002"], "time_point": [1, 2]}
    ).to_csv(table, index=False)
    ds = SpatioTemporalDataset(copy, patient_table="patients.csv")
    assert ds["P0004_T1"].patient_id == "P0002" and ds["P0004_T1"].extras["time_point"] == 2
    with caplog.at_level(logging.WARNING):
        plain = SpatioTemporalDataset(copy, patient_pattern=None)
        assert all(r.patient_id == r.uid for r in plain)
    assert "6 of 6 scans match neither" in caplog.text


def test_bad_annotation_rows(copy):
    path = copy / "detection_3d" / "annotations.csv"
    frame = pd.read_csv(path, dtype=str)
    frame.loc[2, "coordZ"] = "-5000"
    frame.to_csv(path, index=False)
    with pytest.raises(
        AnnotationError, match=r"annotations.csv, line 4: annotation at world .* outside scan 'P0001_T1'"
    ):
        _ = SpatioTemporalDataset(copy).records
    assert sum(len(r.nodules) for r in SpatioTemporalDataset(copy, strict=False)) == len(frame) - 1
    frame.drop(columns=["diameter_mm"]).to_csv(path, index=False)
    with pytest.raises(AnnotationError, match=r"lacks column\(s\) diameter='diameter_mm'"):
        _ = SpatioTemporalDataset(copy).records


@pytest.mark.slow
def test_classes_are_learnable_from_pixels(tmp_path):
    """11 patients, 60 images of six classes: a crude pixel probe beats the 1/6 chance level clearly."""
    tree = make_spatiotemporal(tmp_path / "stpd20", n_scans=20, seed=4)
    scans = {s["uid"]: s for s in json.loads((tree.root / "synth_manifest.json").read_text())["scans"]}
    index = SpatioTemporalDataset(tree.root).classification()
    features, labels, groups = [], [], []
    for sample in index.samples:
        patient, time, _slice, k = sample.path.stem.split("_")
        _, row, col = scans[f"{patient}_{time}"]["nodules"][int(k)]["voxel_zyx"]
        features.append(nodule_features(sample.path, row, col))
        labels.append(sample.label)
        groups.append(sample.patient_id)
    counts = np.bincount(labels)
    assert counts.min() >= 8 and counts.max() <= 12  # classes balanced across follow-ups
    assert grouped_cv_accuracy(np.asarray(features), np.asarray(labels), np.asarray(groups)) > 0.3
