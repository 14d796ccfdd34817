"""Tianchi adapter on a generated Tianchi tree: counts, parts, world↔voxel and bad inputs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from common.datasets.tables import AnnotationError, WorldColumns
from common.datasets.tianchi import TianchiDataset
from common.io import read_volume
from common.synth.tianchi import make_tianchi

N_SCANS = 4  # 3 train + 1 val; scan index 3 is stored flipped


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tianchi(tmp_path_factory.mktemp("tianchi"), n_scans=N_SCANS, seed=5)


@pytest.fixture()
def copy(tree, tmp_path):
    target = tmp_path / "tianchi"
    shutil.copytree(tree.root, target)
    return target


def _truth(tree) -> dict[str, list[dict]]:
    manifest = json.loads((tree.root / "synth_manifest.json").read_text())
    return {s["case_id"]: [f for f in s["findings"] if f["in_annotations_csv"]] for s in manifest["scans"]}


def test_counts_parts_and_coordinates(tree):
    ds = TianchiDataset(tree.root)
    truth = _truth(tree)
    assert ds.uids == list(tree.case_ids)
    assert [r.extras["part"] for r in ds] == ["train"] * 3 + ["val"]
    assert all(r.fold == 0 and r.patient_id == r.uid for r in ds)
    assert sum(len(r.nodules) for r in ds) == tree.n_annotations > 0
    for record in ds:
        volume = read_volume(record.image_path)
        expected = sorted(tuple(f["world_xyz"]) for f in truth[record.uid])
        got = sorted(n.world_xyz for n in record.nodules)
        np.testing.assert_allclose(
            np.reshape(got, (-1, 3)), np.reshape(expected, (-1, 3)), atol=1e-4
        )  # manifest: 4 decimals
        for nodule in record.nodules:
            zyx = np.asarray(nodule.extras["voxel_zyx"])
            np.testing.assert_allclose(zyx, volume.world_to_voxel(nodule.world_xyz)[0], atol=1e-6)
            # Solid or ground-glass nodule tissue is far denser than aerated lung at the annotated centre.
            assert volume.array[tuple(np.rint(zyx).astype(int))] > -750


def test_single_annotation_file_and_custom_columns(copy):
    path = copy / "csv" / "train" / "annotations.csv"
    frame = pd.read_csv(path).rename(columns={"seriesuid": "case", "diameter_mm": "d"})
    frame.to_csv(path, index=False)
    ds = TianchiDataset(
        copy, annotations="csv/train/annotations.csv", columns=WorldColumns(seriesuid="case", diameter="d")
    )
    assert sum(len(r.nodules) for r in ds) == len(frame)
    with pytest.raises(AnnotationError, match=r"annotations.csv lacks column\(s\) seriesuid='seriesuid'"):
        _ = TianchiDataset(copy).records


def test_unknown_case_and_double_annotation(copy):
    path = copy / "csv" / "val" / "annotations.csv"
    frame = pd.read_csv(path, dtype=str)
    frame.loc[len(frame)] = ["LKDS-09999", "0", "0", "0", "5"]
    frame.to_csv(path, index=False)
    with pytest.raises(
        AnnotationError, match=rf"val/annotations.csv, line {len(frame) + 1}: seriesuid 'LKDS-09999'"
    ):
        _ = TianchiDataset(copy).records
    lenient = TianchiDataset(copy, strict=False)
    assert len(lenient) == N_SCANS and len(lenient.policy.skipped) == 1
    train = pd.read_csv(copy / "csv" / "train" / "annotations.csv", dtype=str)
    train.loc[len(train)] = ["LKDS-00004", *frame.iloc[0, 1:].tolist()]
    train.to_csv(copy / "csv" / "train" / "annotations.csv", index=False)
    with pytest.raises(AnnotationError, match="annotated in both"):
        _ = TianchiDataset(copy, strict=False).records


def test_empty_annotation_file(copy):
    (copy / "csv" / "val" / "annotations.csv").write_text("")
    with pytest.raises(AnnotationError, match="val/annotations.csv is empty"):
        _ = TianchiDataset(copy).records
