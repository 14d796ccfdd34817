"""LNDb adapter on a generated LNDb tree: counts, world↔voxel, reader masks, folds and bad inputs."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pandas as pd
import pytest

from common.datasets.lndb import LNDbColumns, LNDbDataset, equivalent_diameter
from common.datasets.tables import AnnotationError
from common.io import read_volume
from common.synth.lndb import make_lndb

N_SCANS = 4  # scan index 3 is stored with the flipped LUNA16 direction


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("lndb")
    return make_lndb(root, n_scans=N_SCANS, seed=3)


@pytest.fixture()
def copy(tree, tmp_path):
    """A private copy of the tree that a test may corrupt."""
    target = tmp_path / "lndb"
    shutil.copytree(tree.root, target)
    return target


def test_counts_and_folds(tree):
    ds = LNDbDataset(tree.root)
    assert ds.uids == [f"LNDb-{i:04d}" for i in range(1, N_SCANS + 1)]
    for index, record in enumerate(ds):
        truth = tree.findings[record.uid]
        assert record.patient_id == record.uid
        assert len(record.nodules) == sum(f["category"] != "non-nodule" for f in truth)
        assert len(record.excluded) == sum(f["category"] == "non-nodule" for f in truth)
        assert record.fold == index % 4
        readers = {r for f in truth for r in f["readers"]}
        assert readers <= set(record.extras["reader_masks"])


def test_world_voxel_and_masks_agree_with_generator(tree):
    ds = LNDbDataset(tree.root)
    checked_flipped = False
    for record in ds:
        volume = read_volume(record.image_path)
        flipped = volume.direction[0, 0] < 0
        truth = {f["finding_id"]: f for f in tree.findings[record.uid]}
        for nodule in record.nodules:
            t = truth[int(nodule.nodule_id)]
            np.testing.assert_allclose(nodule.world_xyz, t["world_xyz"], atol=1e-4)
            np.testing.assert_allclose(
                nodule.extras["voxel_zyx"], volume.world_to_voxel(nodule.world_xyz)[0], atol=1e-6
            )
            assert nodule.extras["readers"] == t["readers"]
            assert nodule.extras["agreement"] == t["agreement"]
            assert nodule.diameter_mm == pytest.approx(equivalent_diameter(t["volume_mm3"]), rel=1e-5)
            if not t["segmented"]:
                assert not ds.finding_mask(record.uid, nodule).any()
                continue
            # Every reader's segmentation of the finding has the volume the CSV states.
            voxel_mm3 = float(np.prod(volume.spacing))
            volumes = [
                (ds.reader_mask(record.uid, r) == f).sum() * voxel_mm3
                for r, f in zip(nodule.extras["readers"], nodule.extras["reader_finding_ids"])
            ]
            assert np.mean(volumes) == pytest.approx(nodule.extras["volume_mm3"], rel=1e-4)
            consensus = ds.finding_mask(record.uid, nodule, agreement=0.5)
            union = ds.finding_mask(record.uid, nodule, agreement=0.0)
            assert 0 < consensus.sum() <= union.sum()
            # The world centre lands inside the readers' masks: world↔voxel respects the direction matrix.
            centre = tuple(int(round(v)) for v in nodule.extras["voxel_zyx"])
            assert union[centre]
            checked_flipped |= flipped
    assert checked_flipped, "the tree should contain a flipped scan with a segmented nodule"


def test_reader_table_mode(tree):
    ds = LNDbDataset(tree.root, annotations="readers")
    rows = pd.read_csv(tree.root / "trainNodules.csv")
    assert sum(len(r.nodules) for r in ds) == int((rows["Nodule"] == 1).sum())
    assert sum(len(r.excluded) for r in ds) == int((rows["Nodule"] == 0).sum())


def test_unknown_scan_row_is_an_error_or_a_logged_skip(copy, caplog):
    gt = copy / "trainNodules_gt.csv"
    frame = pd.read_csv(gt, dtype=str)
    frame.loc[len(frame)] = ["77", "1", "1", "1", "0", "0", "0", "1", "1", "100", "5"]
    frame.to_csv(gt, index=False)
    line = len(frame) + 1
    with pytest.raises(
        AnnotationError, match=rf"trainNodules_gt.csv, line {line}: .*LNDb-0077 which has no scan"
    ):
        _ = LNDbDataset(copy).records
    with caplog.at_level(logging.WARNING):
        ds = LNDbDataset(copy, strict=False)
        assert len(ds) == N_SCANS
    assert ds.policy.skipped and "LNDb-0077" in caplog.text


def test_missing_column_names_file_and_option(copy):
    gt = copy / "trainNodules_gt.csv"
    pd.read_csv(gt, dtype=str).drop(columns=["AgrLevel"]).to_csv(gt, index=False)
    with pytest.raises(
        AnnotationError, match=r"trainNodules_gt.csv lacks column\(s\) agreement='AgrLevel'.*LNDbColumns"
    ):
        _ = LNDbDataset(copy).records
    renamed = pd.read_csv(gt, dtype=str)
    renamed["Agreement"] = "1"
    renamed.to_csv(gt, index=False)
    assert len(LNDbDataset(copy, columns=LNDbColumns(agreement="Agreement"))) == N_SCANS


def test_annotation_outside_volume(copy):
    gt = copy / "trainNodules_gt.csv"
    frame = pd.read_csv(gt, dtype=str)
    frame.loc[0, "z"] = "5000"
    frame.to_csv(gt, index=False)
    with pytest.raises(AnnotationError, match=r"line 2: finding at world .* lies outside LNDb-0001"):
        _ = LNDbDataset(copy).records


def test_missing_raw_and_missing_root(copy, tmp_path):
    (copy / "data0" / "LNDb-0002.raw").unlink()
    with pytest.raises(
        AnnotationError, match=r"LNDb-0002.mhd points to pixel data LNDb-0002.raw which is missing"
    ):
        _ = LNDbDataset(copy).records
    with pytest.raises(FileNotFoundError, match="lungdata synth lndb"):
        LNDbDataset(tmp_path / "nowhere")
