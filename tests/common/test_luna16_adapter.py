"""LUNA16 adapter on a tiny tree in the release layout."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest

from common.datasets.luna16 import LUNA16, LUNA16Columns, LUNA16Dataset
from common.datasets.tables import AnnotationError
from tests.common.luna_tree import write_tiny_luna16


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_tiny_luna16(tmp_path_factory.mktemp("luna16"), n_scans=3, n_subsets=2)


@pytest.fixture
def copy(tree, tmp_path):
    """A private copy of the tree for tests that edit it."""
    root = tmp_path / "luna"
    shutil.copytree(tree.root, root)
    return root


def test_records_folds_nodules_and_masks(tree):
    ds = LUNA16Dataset(tree.root)
    assert LUNA16 is LUNA16Dataset and ds.name == "luna16" and ds.env_var == "LUNA16_ROOT"
    assert sorted(ds.uids) == sorted(tree.uids)
    by_uid = {r.uid: r for r in ds}
    for i, uid in enumerate(tree.uids):
        record = by_uid[uid]
        assert record.patient_id == uid and record.series_uid == uid
        assert record.fold == i % 2 and record.extras["subset"] == f"subset{i % 2}"
        assert record.image_path == tree.root / f"subset{i % 2}" / f"{uid}.mhd"
        assert record.lung_mask_path == tree.root / "seg-lungs-LUNA16" / f"{uid}.mhd"
        (nodule,) = record.nodules
        np.testing.assert_allclose(nodule.world_xyz, tree.nodules[uid][0], atol=1e-5)
        assert nodule.diameter_mm == 8.0
        assert nodule.extras["source"] == f"{tree.root / 'annotations.csv'}:{i + 2}"
        (excluded,) = record.excluded
        assert excluded.diameter_mm == -1.0
        np.testing.assert_allclose(excluded.world_xyz, tree.excluded[uid], atol=1e-5)
    assert ds[tree.uids[0]].uid == tree.uids[0]
    assert ds.series_uids() == tree.uids
    # Every annotation lies inside its scan, flipped direction included.
    assert ds.check_annotations() == []


def test_subset_selection(tree):
    ds = LUNA16Dataset(tree.root, subsets=[1])
    assert ds.uids == [tree.uids[1]]
    with pytest.raises(FileNotFoundError, match="subset7"):
        _ = LUNA16Dataset(tree.root, subsets=[7]).records


def test_candidates_are_standardized_and_filtered(tree):
    frame = LUNA16Dataset(tree.root, subsets=[0]).candidates()
    assert list(frame.columns) == ["seriesuid", "coordX", "coordY", "coordZ", "class"]
    assert set(frame["seriesuid"]) == {tree.uids[0], tree.uids[2]}
    assert frame["class"].dtype.kind == "i" and frame["coordX"].dtype.kind == "f"
    assert sorted(frame["class"].tolist()) == [0, 0, 1, 1]


def test_csvs_in_release_subfolders_and_custom_columns(copy):
    (copy / "CSVFILES").mkdir()
    text = (copy / "annotations.csv").read_text().replace("seriesuid,coordX", "series_id,coordX")
    (copy / "CSVFILES" / "annotations.csv").write_text(text)
    (copy / "annotations.csv").unlink()
    with pytest.raises(
        AnnotationError, match=r"lacks column\(s\) seriesuid='seriesuid'.*LUNA16Dataset\(columns"
    ):
        _ = LUNA16Dataset(copy, excluded=None).records
    ds = LUNA16Dataset(copy, excluded=None, columns=LUNA16Columns(seriesuid="series_id"))
    assert all(len(r.nodules) == 1 for r in ds) and all(r.excluded == [] for r in ds)


def test_unknown_seriesuid_is_an_error_naming_file_and_line(copy):
    with open(copy / "annotations.csv", "a") as fh:
        fh.write("1.2.3.999,1.0,2.0,3.0,5.0\n")
    with pytest.raises(
        AnnotationError, match=r"annotations\.csv, line 5: seriesuid '1\.2\.3\.999' has no scan"
    ):
        _ = LUNA16Dataset(copy).records


def test_unknown_seriesuid_is_skipped_in_lenient_mode(copy, caplog):
    with open(copy / "annotations.csv", "a") as fh:
        fh.write("1.2.3.999,1.0,2.0,3.0,5.0\n")
    with caplog.at_level(logging.WARNING):
        ds = LUNA16Dataset(copy, strict=False)
        assert sum(len(r.nodules) for r in ds) == 3
    assert "line 5" in caplog.text and ds.policy.skipped


def test_partial_download_drops_rows_of_absent_listed_scans(copy):
    """A scan listed in seriesuids.csv but not on disk is a partial download, not an error."""
    missing = copy / "subset1"
    shutil.rmtree(missing)
    ds = LUNA16Dataset(copy)
    assert sorted(ds.uids) == sorted([u for i, u in enumerate(ds.series_uids()) if i % 2 == 0])


def test_missing_annotations_empty_csv_and_bad_numbers(copy):
    (copy / "annotations.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"annotations\.csv not found .*lungdata synth luna16"):
        _ = LUNA16Dataset(copy).records
    (copy / "annotations.csv").write_text("")
    with pytest.raises(AnnotationError, match="is empty"):
        _ = LUNA16Dataset(copy).records
    uid = (copy / "seriesuids.csv").read_text().split()[0]
    (copy / "annotations.csv").write_text(f"seriesuid,coordX,coordY,coordZ,diameter_mm\n{uid},abc,1,2,3\n")
    with pytest.raises(AnnotationError, match=r"line 2: column 'coordX' is not a number"):
        _ = LUNA16Dataset(copy).records


def test_missing_root_and_subsets(tmp_path):
    with pytest.raises(FileNotFoundError, match="lungdata synth luna16"):
        LUNA16Dataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no subset0"):
        _ = LUNA16Dataset(tmp_path / "empty").records


def test_annotation_outside_volume_is_found_lazily(copy):
    uid = (copy / "seriesuids.csv").read_text().split()[0]
    with open(copy / "annotations.csv", "a") as fh:
        fh.write(f"{uid},900.0,0.0,0.0,5.0\n")
    ds = LUNA16Dataset(copy)
    assert len(ds[uid].nodules) == 2  # reading the CSV does not open any scan
    with pytest.raises(
        AnnotationError, match=rf"annotations\.csv:5: finding at world \(900\.0, .*outside scan {uid}"
    ):
        ds.check_annotations()
    lenient = LUNA16Dataset(copy, strict=False)
    (problem,) = lenient.check_annotations()
    assert "annotations.csv:5" in problem


def test_missing_raw_is_reported_when_indexing(copy):
    uid = (copy / "seriesuids.csv").read_text().split()[0]
    (copy / "subset0" / f"{uid}.raw").unlink()
    with pytest.raises(
        AnnotationError, match=rf"{uid}\.mhd points to pixel data {uid}\.raw which is missing"
    ):
        _ = LUNA16Dataset(copy).records
    lenient = LUNA16Dataset(copy, strict=False)
    assert uid not in lenient.uids and len(lenient) == 2
