"""DICOM input (series choice, refusals) and output (SEG + TID 1500 SR, read back with pydicom and highdicom)."""

from __future__ import annotations

import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.sr.codedict import codes

from common.dicom import write_dicom_series
from common.io import CTVolume
from lungcad.dicom_input import read_dicom_ct, select_ct_series
from lungcad.dicom_output import ANONYMIZED, write_seg, write_sr

PATIENT = {"0010|0010": "Doe^Jane", "0010|0020": "PID-73519", "0010|0030": "19470203"}
CORONAL = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])  # columns: x, -z, y (det +1)


def _series(
    folder: Path, uid: str, n=10, spacing_z=1.5, direction=None, extra=None, seed=0, size=16
) -> list[Path]:
    """A CT series written by common.io into `folder` with file names prefixed by the UID's last part."""
    rng = np.random.default_rng(seed)
    volume = CTVolume(
        rng.integers(-1000, 300, (n, size, size)).astype(np.int16),
        (0.8, 0.8, spacing_z),
        (-20.0, -30.0, -40.0),
        np.eye(3) if direction is None else direction,
    )
    tmp = folder / f"_tmp_{uid}"
    files = write_dicom_series(volume, tmp, series_uid=uid, tags={**PATIENT, **(extra or {})})
    folder.mkdir(parents=True, exist_ok=True)
    moved = []
    for f in files:
        target = folder / f"s{uid.rsplit('.', 1)[-1]}_{f.name}"
        f.rename(target)
        moved.append(target)
    tmp.rmdir()
    return moved


def _edit(path: Path, **values) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.save_as(path)


# ------------------------------------------------------------------------------------------- series choice


def test_rule_drops_localizers_and_picks_the_thin_series_and_series_uid_overrides(tmp_path):
    folder = tmp_path / "study"
    _series(folder, "1.2.826.0.1.99.1", n=10, spacing_z=1.5)  # thick
    _series(folder, "1.2.826.0.1.99.2", n=20, spacing_z=0.75, seed=1)  # thin: more slices, chosen
    # A coronal scout in its own series, and an axial localizer image inside the thin series' UID.
    _series(
        folder,
        "1.2.826.0.1.99.3",
        n=1,
        direction=CORONAL,
        extra={"0008|0008": "ORIGINAL\\PRIMARY\\LOCALIZER"},
    )
    _series(folder, "1.2.826.0.1.99.4", n=1, direction=CORONAL)  # single-slice series in another plane
    scout = _series(
        tmp_path / "x", "1.2.826.0.1.99.2", n=1, extra={"0008|0008": "ORIGINAL\\PRIMARY\\LOCALIZER"}
    )
    _edit(scout[0], ImagePositionPatient=[-20, -30, 500], SOPInstanceUID="1.2.826.0.1.99.2.999")
    shutil.move(scout[0], folder / "scout.dcm")
    (folder / "notes.txt").write_text("not DICOM")
    dicomdir = pydicom.Dataset()  # an instance-less DICOM file (like a DICOMDIR) is not a slice
    dicomdir.FileSetID = "EXPORT"
    dicomdir.file_meta = pydicom.dataset.FileMetaDataset()
    dicomdir.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
    dicomdir.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.99.77"
    dicomdir.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    dicomdir.save_as(folder / "DICOMDIR", enforce_file_format=True)

    choice = select_ct_series(folder)
    assert choice.series_uid == "1.2.826.0.1.99.2"
    assert len(choice.files) == 20 and (folder / "scout.dcm") not in choice.files
    text = " | ".join(choice.reasons)
    assert "axial, 20 slices, 0.75 mm" in text and "localizer" in text and "1.2.826.0.1.99.4" in text
    z = [float(ds.ImagePositionPatient[2]) for ds in choice.datasets]
    assert z == sorted(z)

    override = select_ct_series(folder, series_uid="1.2.826.0.1.99.1")
    assert override.series_uid == "1.2.826.0.1.99.1" and len(override.files) == 10
    with pytest.raises(ValueError, match=r"no DICOM series with UID 9\.9 \(--series-uid\)"):
        select_ct_series(folder, series_uid="9.9")


@pytest.mark.parametrize("direction", ["identity", "left_handed"])
def test_read_dicom_ct_returns_headers_in_the_volume_z_order(tmp_path, direction):
    d = np.eye(3) if direction == "identity" else np.diag([1.0, 1.0, -1.0])
    _series(tmp_path / "s", "1.2.826.0.1.99.8", n=6, direction=d)
    volume, datasets = read_dicom_ct(tmp_path / "s")
    assert volume.shape[0] == len(datasets) == 6
    for k, ds in enumerate(datasets):
        np.testing.assert_allclose(
            volume.voxel_to_world((k, 0, 0))[0], [float(v) for v in ds.ImagePositionPatient]
        )
    assert all("PixelData" not in ds for ds in datasets)


# ----------------------------------------------------------------------------------------------- refusals


def test_refuses_non_ct(tmp_path):
    _series(tmp_path / "mr", "1.2.826.0.1.99.1", extra={"0008|0060": "MR"})
    with pytest.raises(
        ValueError, match=r"no CT series \(found MR series 1\.2\.826\.0\.1\.99\.1 \(10 images\)\)"
    ):
        select_ct_series(tmp_path / "mr")
    with pytest.raises(ValueError, match="series 1.2.826.0.1.99.1 is MR, not CT"):
        select_ct_series(tmp_path / "mr", series_uid="1.2.826.0.1.99.1")


def test_refuses_a_single_slice(tmp_path):
    _series(tmp_path / "one", "1.2.826.0.1.99.1", n=1)
    with pytest.raises(
        ValueError, match=r"CT series 1\.2\.826\.0\.1\.99\.1 has a single slice \(s1_slice_0000\.dcm\)"
    ):
        select_ct_series(tmp_path / "one")


def test_refuses_a_gap_unless_tolerated(tmp_path):
    files = _series(tmp_path / "gap", "1.2.826.0.1.99.1")
    files[5].unlink()
    with pytest.raises(
        ValueError,
        match=r"CT series 1\.2\.826\.0\.1\.99\.1: slices are not evenly spaced \(gap 3\.000 mm at "
        r"s1_slice_0004\.dcm -> s1_slice_0006\.dcm.*--dicom-tolerance",
    ):
        read_dicom_ct(tmp_path / "gap")
    volume, datasets = read_dicom_ct(tmp_path / "gap", tolerance_mm=1.0)
    assert volume.shape[0] == len(datasets) == 9


def test_refuses_a_truncated_slice_naming_it(tmp_path):
    files = _series(tmp_path / "cut", "1.2.826.0.1.99.1")
    files[3].write_bytes(files[3].read_bytes()[: files[3].stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cannot be read \(s1_slice_0003\.dcm\).*--dicom-tolerance"):
        read_dicom_ct(tmp_path / "cut")
    volume, datasets = read_dicom_ct(tmp_path / "cut", tolerance_mm=1.0)  # left out, its gap accepted
    assert volume.shape[0] == len(datasets) == 9
    assert all(float(ds.ImagePositionPatient[2]) != -40.0 + 3 * 1.5 for ds in datasets)


def test_refuses_gantry_tilt(tmp_path):
    _series(tmp_path / "tag", "1.2.826.0.1.99.1", extra={"0018|1120": "15"})
    with pytest.raises(ValueError, match="gantry tilt 15 degrees"):
        select_ct_series(tmp_path / "tag")
    # No tag, but the slices are stacked along a sheared axis (each slice moved 0.4 mm in y).
    files = _series(tmp_path / "shear", "1.2.826.0.1.99.2")
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f, stop_before_pixels=False)
        ds.ImagePositionPatient = [-20.0, -30.0 + 0.4 * k, -40.0 + 1.5 * k]
        ds.save_as(f)
    with pytest.raises(ValueError, match=r"stacked 14\.\d degrees off their normal .*gantry tilt"):
        select_ct_series(tmp_path / "shear")


def test_refuses_mixed_orientations(tmp_path):
    files = _series(tmp_path / "mixed", "1.2.826.0.1.99.1")
    _edit(files[4], ImageOrientationPatient=[1, 0, 0, 0, 0, -1])
    with pytest.raises(
        ValueError, match=r"mixed orientations \(s1_slice_0000\.dcm and s1_slice_0004\.dcm differ\)"
    ):
        select_ct_series(tmp_path / "mixed")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("CT_small.dcm", r"has a single slice \(CT_small\.dcm\)"),
        ("MR_small.dcm", r"no CT series \(found MR series"),
    ],
)
def test_pydicom_test_files_are_refused(tmp_path, name, message):
    """Files no one here wrote: pydicom's own test data, shipped in its wheel."""
    path = get_testdata_file(name, download=False)
    assert path is not None and Path(path).is_file(), f"{name} is not in the installed pydicom wheel"
    (tmp_path / "in").mkdir()
    shutil.copy(path, tmp_path / "in" / name)
    with pytest.raises(ValueError, match=message):
        read_dicom_ct(tmp_path / "in")


# --------------------------------------------------------------------------------------- SEG and SR output


def _report() -> dict:
    def nodule(index, volume, long_axis, short_axis, prob, category):
        return {
            "index": index,
            "label": index,
            "source": "detected",
            "detection_score": 0.9,
            "malignancy_probability": prob,
            "measurements": {
                "volume_mm3": volume,
                "long_axis_mm": long_axis,
                "short_axis_mm": short_axis,
                "mean_diameter_mm": round((long_axis + short_axis) / 2, 1),
                "max_3d_diameter_mm": long_axis + 0.5,
                "type": "solid",
            },
            "category": {
                "category": category,
                "descriptor": "Probably benign",
                "management": "",
                "reason": "",
            },
        }

    return {
        "schema_version": "1.0",
        "generator": {"name": "lungcad", "version": "0.1.0"},
        "mode": "detection",
        "nodules": [nodule(1, 212.5, 8.2, 6.1, 0.41, "4A"), nodule(2, 30.25, 4.0, 3.0, 0.05, "2")],
    }


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("segsr")
    _series(root / "ct", "1.2.826.0.1.99.5", n=12, size=24, direction=np.diag([-1.0, -1.0, 1.0]))
    volume, datasets = read_dicom_ct(root / "ct")
    labels = np.zeros(volume.shape, np.uint16)
    labels[3:7, 5:10, 6:12] = 1
    labels[9, 15:18, 15:18] = 2
    report = _report()
    out = {}
    for anonymize in (False, True):
        seg = write_seg(datasets, labels, report, root / f"seg_{anonymize}.dcm", anonymize=anonymize)
        sr = write_sr(datasets, seg, report, root / f"sr_{anonymize}.dcm", anonymize=anonymize)
        out[anonymize] = (seg, sr)
    return volume, datasets, labels, report, out


def test_seg_segments_and_frames_overlay_the_labels(written):
    volume, datasets, labels, _, out = written
    seg_path, _ = out[False]
    raw = pydicom.dcmread(seg_path)
    assert raw.Modality == "SEG" and raw.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in raw.SegmentSequence] == ["Nodule 1", "Nodule 2"]
    assert raw.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "27925004"  # SCT Nodule
    assert raw.SegmentSequence[0].AnatomicRegionSequence[0].CodeValue == "39607008"  # SCT Lung
    assert raw.FrameOfReferenceUID == datasets[0].FrameOfReferenceUID  # written by common.io
    # Every frame sits at its source slice's position and references that slice.
    by_uid = {ds.SOPInstanceUID: ds for ds in datasets}
    for frame in raw.PerFrameFunctionalGroupsSequence:
        source = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_allclose(
            [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
            [float(v) for v in by_uid[source].ImagePositionPatient],
        )
    seg = hd.seg.segread(seg_path)
    assert seg.get_segment_numbers() == [1, 2]
    back = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in datasets], combine_segments=True
    )
    np.testing.assert_array_equal(back, labels)
    # The same in world mm, from the SEG's own per-frame geometry (frames of empty slices are omitted).
    shared = raw.SharedFunctionalGroupsSequence[0]
    iop = np.array([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient])
    row_mm, col_mm = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    pixels = raw.pixel_array.reshape(len(raw.PerFrameFunctionalGroupsSequence), raw.Rows, raw.Columns)
    points = {1: [], 2: []}
    for frame, mask in zip(raw.PerFrameFunctionalGroupsSequence, pixels):
        number = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        ipp = np.array([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient])
        rc = np.argwhere(mask > 0)
        points[number].append(ipp + rc[:, 1:2] * col_mm * iop[:3] + rc[:, 0:1] * row_mm * iop[3:])
    for number in (1, 2):
        got = np.concatenate(points[number])
        want = volume.voxel_to_world(np.argwhere(labels == number))
        np.testing.assert_allclose(
            np.unique(got.round(6), axis=0), np.unique(want.round(6), axis=0), atol=1e-6
        )


def _group_values(group) -> dict:
    values = {}
    for m in group.get_measurements():
        derivation = m.derivation.meaning if m.derivation is not None else None
        values[(m.name.meaning, derivation)] = (m.value, m.unit.value)
    return values


def test_sr_holds_the_report_measurements_and_references_seg_and_series(written):
    _, datasets, _, report, out = written
    seg_path, sr_path = out[False]
    raw = pydicom.dcmread(sr_path)
    assert raw.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert raw.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    sr = hd.sr.srread(sr_path)
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 2
    seg = pydicom.dcmread(seg_path)
    for number, (group, nodule) in enumerate(zip(groups, report["nodules"]), start=1):
        m = nodule["measurements"]
        values = _group_values(group)
        assert values[("Volume", None)] == (m["volume_mm3"], "mm3")
        assert values[("Long axis", None)] == (m["long_axis_mm"], "mm")
        assert values[("Short axis", None)] == (m["short_axis_mm"], "mm")
        assert values[("Diameter", "Mean")] == (m["mean_diameter_mm"], "mm")
        assert values[("Diameter", "Maximum")] == (m["max_3d_diameter_mm"], "mm")
        assert values[("Probability of cancer", None)] == (nodule["malignancy_probability"], "1")
        (evaluation,) = group.get_qualitative_evaluations()
        assert (
            evaluation.name.value == "111005"
            and evaluation.value.value == "LR" + nodule["category"]["category"]
        )
        assert group.tracking_identifier == f"Nodule {nodule['index']}"
        ref = group.referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert ref.referenced_segment_numbers == [number]
        assert ref.source_series_for_segmentation.value == datasets[0].SeriesInstanceUID
    evidence = raw.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert {s.SeriesInstanceUID for s in evidence} == {datasets[0].SeriesInstanceUID, seg.SeriesInstanceUID}


def test_patient_module_is_copied_and_anonymize_replaces_it(written):
    _, _, _, _, out = written
    for path in out[False]:
        ds = pydicom.dcmread(path)
        assert (str(ds.PatientName), ds.PatientID, ds.PatientBirthDate) == (
            "Doe^Jane",
            "PID-73519",
            "19470203",
        )
    for path in out[True]:
        ds = pydicom.dcmread(path)
        assert (
            str(ds.PatientName) == f"{ANONYMIZED}^"
            and ds.PatientID == ANONYMIZED
            and ds.PatientBirthDate == ""
        )
        assert ds.PatientIdentityRemoved == "YES"
        data = Path(path).read_bytes()
        assert b"Doe" not in data and b"PID-73519" not in data and b"19470203" not in data


def test_seg_refuses_labels_on_another_grid(written):
    _, datasets, labels, report, _ = written
    with pytest.raises(
        ValueError, match=r"labels have shape \(11, 24, 24\) but the source series is \(12, 24, 24\)"
    ):
        write_seg(datasets, labels[1:], report, Path("unused.dcm"))
    other = labels.copy()
    other[0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"labels hold value\(s\) \[7\] that no nodule of the report has"):
        write_seg(datasets, other, report, Path("unused.dcm"))


def test_codes_are_the_documented_ones():
    assert codes.SCT.Nodule.value == "27925004" and codes.SCT.Lung.value == "39607008"


def test_no_nodules_no_seg_no_sr(written, tmp_path):
    _, datasets, labels, report, out = written
    empty = {**report, "nodules": []}
    with pytest.raises(ValueError, match="no nodules; a DICOM SEG needs at least one segment"):
        write_seg(datasets, np.zeros_like(labels), empty, tmp_path / "seg.dcm")
    with pytest.raises(ValueError, match="no nodules; a TID 1500 SR needs at least one"):
        write_sr(datasets, out[False][0], empty, tmp_path / "sr.dcm")
