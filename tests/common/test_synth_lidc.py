"""`lungdata synth lidc`: the LIDC-IDRI download layout, the reader XML, and the pylidc-schema database.

The same seed gives the same phantoms as `synth luna16` (the LUNA16↔LIDC join), the XML has LIDC's tags,
and `LIDCDatabase` run on the written database reproduces every reader mask and the nodule clusters.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from common.datasets.lidc_db import RATING_NAMES, LIDCDatabase
from common.io import read_volume
from common.synth.lidc import DATABASE_NAME, make_lidc
from common.synth.luna16 import make_luna16

NS = {"nih": "http://www.nih.gov"}
N_SCANS = 4  # scan 3 is stored flipped


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> tuple[Path, Path]:
    lidc = tmp_path_factory.mktemp("lidc")
    luna = tmp_path_factory.mktemp("luna16")
    make_lidc(lidc, n_scans=N_SCANS, seed=3)
    make_luna16(luna, n_scans=N_SCANS, seed=3)
    return lidc, luna


@pytest.fixture(scope="module")
def manifest(trees) -> dict:
    return json.loads((trees[0] / "synth_manifest.json").read_text())


def test_same_phantoms_and_uids_as_luna16(trees, manifest):
    lidc, luna = trees
    luna_manifest = json.loads((luna / "synth_manifest.json").read_text())
    assert [s["seriesuid"] for s in manifest["scans"]] == [s["seriesuid"] for s in luna_manifest["scans"]]
    for scan, luna_scan in zip(manifest["scans"], luna_manifest["scans"]):
        folder = lidc / scan["files"]["dicom_series"]
        assert folder.parts[-3] == f"LIDC-IDRI-{scan['index'] + 1:04d}"
        assert folder.parts[-2] == scan["study_uid"] and folder.parts[-1] == scan["seriesuid"]
        dicom = read_volume(folder)
        mhd = read_volume(luna / luna_scan["files"]["image"])
        assert np.array_equal(dicom.array, mhd.array)
        np.testing.assert_allclose(dicom.origin, mhd.origin, atol=1e-4)
        np.testing.assert_allclose(dicom.direction, mhd.direction, atol=1e-6)
        header = pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True)
        assert header.PatientID == scan["patient_id"] and header.PatientID.startswith("SYNTH-")
        assert [f["world_xyz"] for f in scan["findings"]] == [f["world_xyz"] for f in luna_scan["findings"]]


def test_xml_has_the_lidc_structure(trees, manifest):
    lidc, _ = trees
    for scan in manifest["scans"]:
        folder = lidc / scan["files"]["dicom_series"]
        sop_by_z = {}
        for path in folder.glob("*.dcm"):
            header = pydicom.dcmread(path, stop_before_pixels=True)
            sop_by_z[round(float(header.ImagePositionPatient[2]), 4)] = header.SOPInstanceUID
        root = ET.parse(lidc / scan["files"]["xml"]).getroot()
        assert root.tag == "{http://www.nih.gov}LidcReadMessage"
        assert root.find("nih:ResponseHeader/nih:SeriesInstanceUid", NS).text == scan["seriesuid"]
        sessions = root.findall("nih:readingSession", NS)
        assert len(sessions) == 4
        marked = 0
        for session in sessions:
            for nodule in session.findall("nih:unblindedReadNodule", NS):
                marked += 1
                characteristics = nodule.find("nih:characteristics", NS)
                if characteristics is not None:
                    assert [c.tag.split("}")[1] for c in characteristics] == list(RATING_NAMES)
                for roi in nodule.findall("nih:roi", NS):
                    z = round(float(roi.find("nih:imageZposition", NS).text), 4)
                    assert roi.find("nih:imageSOP_UID", NS).text == sop_by_z[z]
                    assert roi.find("nih:inclusion", NS).text in ("TRUE", "FALSE")
                    assert roi.findall("nih:edgeMap/nih:xCoord", NS)
            for non_nodule in session.findall("nih:nonNodule", NS):
                marked += 1
                assert non_nodule.find("nih:locus/nih:xCoord", NS) is not None
        expected = sum(f["n_readers"] for f in scan["findings"])
        assert marked == expected


def test_database_reproduces_reader_masks_and_clusters(trees, manifest):
    lidc, _ = trees
    db = LIDCDatabase(lidc / DATABASE_NAME)
    scans = db.scans()
    assert list(scans["series_uid"]) == [s["seriesuid"] for s in manifest["scans"]]
    for scan_id, scan in enumerate(manifest["scans"], start=1):
        groups = []
        for finding in scan["findings"]:
            if finding["category"] != "nodule":
                continue
            ids = [r["database_annotation_id"] for r in finding["readers"]]
            groups.append(sorted(ids))
            for reader, source_ratings in zip(finding["readers"], finding["lidc"]["reader_ratings"]):
                assert db.ratings(reader["database_annotation_id"]) == source_ratings
                written = sitk.ReadImage(str(lidc / reader["mask"]))
                np.testing.assert_allclose(written.GetOrigin(), scan["origin_xyz"], atol=1e-3)
                nifti = sitk.GetArrayFromImage(written).astype(bool)
                rebuilt = db.annotation_mask(reader["database_annotation_id"], outline="exclude")
                full = np.zeros_like(nifti)
                full[rebuilt.slices] = rebuilt.mask
                assert np.array_equal(full, nifti)
        assert sorted(sorted(g) for g in db.cluster_annotations(scan_id)) == sorted(groups)


def test_same_seed_gives_identical_bytes(tmp_path):
    import hashlib

    def hashes(root: Path) -> dict[str, str]:
        return {
            p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }

    make_lidc(tmp_path / "a", n_scans=1, seed=9)
    make_lidc(tmp_path / "b", n_scans=1, seed=9)
    assert hashes(tmp_path / "a") == hashes(tmp_path / "b")
