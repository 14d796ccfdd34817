"""CT I/O: round trips through MHD/.raw, .zraw, NIfTI and DICOM; exact world↔voxel; clear errors on bad files."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from common.dicom import anonymized_header, write_dicom_series
from common.io import (
    CTVolume,
    VolumeReadError,
    mhd_header_text,
    read_volume,
    write_mhd,
    write_nifti,
)


def _rotation(axis: int, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


DIRECTIONS = {
    "identity": np.eye(3),
    "flipped_xy": np.diag([-1.0, -1.0, 1.0]),  # the LUNA16 "-1 0 0 0 -1 0 0 0 1" scans
    "rotated": _rotation(2, 0.3) @ _rotation(0, -0.2),
    "flipped_rotated": _rotation(1, 0.25) @ np.diag([1.0, -1.0, -1.0]),
}


def _volume(direction: np.ndarray, dtype=np.int16, shape=(6, 7, 9), seed=0) -> CTVolume:
    rng = np.random.default_rng(seed)
    array = rng.integers(-1024, 3000, shape).astype(dtype)
    return CTVolume(array, (0.703125, 0.8, 2.5), (-195.25, 12.5, -300.125), direction, series_uid="1.2.3")


def _assert_same_geometry(a: CTVolume, b: CTVolume, atol: float = 0.0) -> None:
    np.testing.assert_allclose(a.spacing, b.spacing, atol=atol, rtol=0)
    np.testing.assert_allclose(a.origin, b.origin, atol=atol, rtol=0)
    np.testing.assert_allclose(a.direction, b.direction, atol=max(atol, 1e-12), rtol=0)


@pytest.mark.parametrize("name", sorted(DIRECTIONS))
@pytest.mark.parametrize("compress", [False, True])
def test_mhd_round_trip_is_exact(tmp_path, name, compress):
    volume = _volume(DIRECTIONS[name])
    path = write_mhd(volume, tmp_path / "scan.mhd", compress=compress)
    assert (tmp_path / ("scan.zraw" if compress else "scan.raw")).is_file()
    back = read_volume(path)
    assert back.array.dtype == np.int16
    np.testing.assert_array_equal(back.array, volume.array)
    _assert_same_geometry(back, volume)
    assert back.series_uid == "scan" and back.source == path
    # SimpleITK reads our header to the same image as our own reader.
    img = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), volume.array)
    np.testing.assert_allclose(np.reshape(img.GetDirection(), (3, 3)), volume.direction, atol=1e-15)


def test_mhd_header_is_luna16_style_and_deterministic(tmp_path):
    volume = _volume(np.diag([-1.0, -1.0, 1.0]))
    a = write_mhd(volume, tmp_path / "a" / "x.mhd")
    b = write_mhd(volume, tmp_path / "b" / "x.mhd")
    assert a.read_bytes() == b.read_bytes()
    assert a.with_suffix(".raw").read_bytes() == b.with_suffix(".raw").read_bytes()
    assert a.read_text() == (
        "ObjectType = Image\n"
        "NDims = 3\n"
        "BinaryData = True\n"
        "BinaryDataByteOrderMSB = False\n"
        "CompressedData = False\n"
        "TransformMatrix = -1 0 0 0 -1 0 0 0 1\n"
        "Offset = -195.25 12.5 -300.125\n"
        "CenterOfRotation = 0 0 0\n"
        "AnatomicalOrientation = LPI\n"
        "ElementSpacing = 0.703125 0.8 2.5\n"
        "DimSize = 9 7 6\n"
        "ElementType = MET_SHORT\n"
        "ElementDataFile = x.raw\n"
    )
    # The orientation code and the transposed TransformMatrix agree with what SimpleITK writes itself.
    rotated = _volume(DIRECTIONS["flipped_rotated"])
    sitk.WriteImage(rotated.to_sitk(), str(tmp_path / "itk.mhd"))
    itk_fields = dict(line.split(" = ") for line in (tmp_path / "itk.mhd").read_text().splitlines())
    ours = dict(line.split(" = ") for line in mhd_header_text(rotated, "x.raw").splitlines())
    assert ours["AnatomicalOrientation"] == itk_fields["AnatomicalOrientation"]
    np.testing.assert_allclose(
        [float(v) for v in ours["TransformMatrix"].split()],
        [float(v) for v in itk_fields["TransformMatrix"].split()],
        atol=1e-15,
    )


def test_compressed_header_records_size_and_float_and_mask_types(tmp_path):
    for dtype, met in ((np.float32, "MET_FLOAT"), (np.uint8, "MET_UCHAR")):
        volume = _volume(np.eye(3)).with_array(np.arange(6 * 7 * 9, dtype=dtype).reshape(6, 7, 9) % 200)
        path = write_mhd(volume, tmp_path / f"{met}.mhd", compress=True)
        text = path.read_text()
        size = (tmp_path / f"{met}.zraw").stat().st_size
        assert f"CompressedData = True\nCompressedDataSize = {size}\n" in text
        assert f"ElementType = {met}" in text
        back = read_volume(path)
        assert back.array.dtype == dtype
        np.testing.assert_array_equal(back.array, volume.array)


@pytest.mark.parametrize("name", sorted(DIRECTIONS))
def test_nifti_round_trip(tmp_path, name):
    volume = _volume(DIRECTIONS[name])
    for suffix in (".nii", ".nii.gz"):
        back = read_volume(write_nifti(volume, tmp_path / f"scan{suffix}"))
        np.testing.assert_array_equal(back.array, volume.array)
        # NIfTI stores geometry as float32: exact for these values, 1e-5 mm in general.
        _assert_same_geometry(back, volume, atol=1e-5)


@pytest.mark.parametrize("name", ["identity", "rotated"])
def test_dicom_series_round_trip(tmp_path, name):
    volume = _volume(DIRECTIONS[name])
    files = write_dicom_series(volume, tmp_path / "series", series_uid="1.2.826.0.1.99.1")
    assert len(files) == volume.shape[0]
    back = read_volume(tmp_path / "series")
    assert back.series_uid == "1.2.826.0.1.99.1"
    assert back.array.dtype == np.int16
    np.testing.assert_array_equal(back.array, volume.array)
    _assert_same_geometry(back, volume, atol=1e-9)


def test_dicom_series_is_a_valid_ct_image(tmp_path):
    """Every UID fits DICOM's 64 characters (also with the longest series UID pydicom makes), a
    FrameOfReferenceUID is there (Type 1; a DICOM SEG refuses a source without it), the same inputs give
    the same UIDs, and pydicom's validation accepts every UID."""
    import pydicom

    # As long as a UID may be: pydicom's random ones are 64 characters only when their number has no
    # leading zero, so a fixed one keeps this test deterministic.
    series_uid = "1.2.826.0.1.3680043.8.498." + "1" * 38
    assert len(series_uid) == 64
    files = write_dicom_series(_volume(np.eye(3)), tmp_path / "a", series_uid=series_uid, study_uid="1.2.3")
    again = write_dicom_series(_volume(np.eye(3)), tmp_path / "b", series_uid=series_uid, study_uid="1.2.3")
    frames, sops = set(), []
    for path, path_again in zip(files, again, strict=True):
        ds = pydicom.dcmread(path)
        for element in [*ds.iterall(), *ds.file_meta]:
            if element.VR == "UI" and element.value:
                pydicom.valuerep.validate_value("UI", element.value, pydicom.config.RAISE)
                assert len(element.value) <= 64, element
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        ds_again = pydicom.dcmread(path_again, stop_before_pixels=True)
        assert (ds_again.SOPInstanceUID, ds_again.FrameOfReferenceUID) == (
            ds.SOPInstanceUID,
            ds.FrameOfReferenceUID,
        )
        frames.add(ds.FrameOfReferenceUID)
        sops.append(ds.SOPInstanceUID)
    assert len(frames) == 1 and len(set(sops)) == len(files)


def test_dicom_left_handed_stack_reads_back_as_the_same_physical_volume(tmp_path):
    volume = _volume(np.diag([1.0, 1.0, -1.0]))
    write_dicom_series(volume, tmp_path / "series")
    back = read_volume(tmp_path / "series")
    # DICOM readers order slices along the normal, so the stack comes back reversed but in the same place.
    np.testing.assert_array_equal(back.array, volume.array[::-1])
    corners = np.array([[0, 0, 0], [5, 6, 8], [2, 3, 4]], dtype=float)
    np.testing.assert_allclose(
        back.voxel_to_world(corners), volume.voxel_to_world(corners * [-1, 1, 1] + [5, 0, 0]), atol=1e-9
    )


def test_dicom_folder_with_two_series_needs_a_uid(tmp_path):
    folder = tmp_path / "study"
    write_dicom_series(_volume(np.eye(3), seed=1), folder / "a", series_uid="1.2.3.1")
    write_dicom_series(_volume(np.eye(3), seed=2), folder / "b", series_uid="1.2.3.2")
    for sub in ("a", "b"):
        for f in (folder / sub).iterdir():
            f.rename(folder / f"{sub}_{f.name}")
    with pytest.raises(VolumeReadError, match=r"holds 2 DICOM series \(1\.2\.3\.1, 1\.2\.3\.2\)"):
        read_volume(folder)
    picked = read_volume(folder, series_uid="1.2.3.2")
    np.testing.assert_array_equal(picked.array, _volume(np.eye(3), seed=2).array)
    with pytest.raises(VolumeReadError, match="no DICOM series with UID 9.9"):
        read_volume(folder, series_uid="9.9")


@pytest.mark.parametrize("name", sorted(DIRECTIONS))
def test_world_voxel_round_trip_is_exact(name):
    volume = _volume(DIRECTIONS[name], shape=(30, 40, 50))
    rng = np.random.default_rng(3)
    zyx = rng.uniform(-5, 45, size=(200, 3))
    world = volume.voxel_to_world(zyx)
    np.testing.assert_allclose(volume.world_to_voxel(world), zyx, atol=1e-9)
    np.testing.assert_allclose(volume.voxel_to_world(volume.world_to_voxel(world)), world, atol=1e-6)
    # Single points come back as (1, 3); the voxel index axis order is (z, y, x).
    one = volume.world_to_voxel(world[0])
    assert one.shape == (1, 3)
    # Agrees with SimpleITK's own physical-point transform.
    img = volume.to_sitk()
    for point in zyx[:5]:
        expected = img.TransformContinuousIndexToPhysicalPoint(point[::-1].tolist())
        np.testing.assert_allclose(volume.voxel_to_world(point)[0], expected, atol=1e-9)


@pytest.mark.parametrize("name", sorted(DIRECTIONS))
def test_planted_bright_voxel_is_found_from_its_world_coordinate(tmp_path, name):
    volume = _volume(DIRECTIONS[name], shape=(20, 24, 28)).with_array(np.full((20, 24, 28), -1000, np.int16))
    target = (13, 5, 21)
    volume.array[target] = 2000
    world = volume.voxel_to_world(target)[0]
    back = read_volume(write_mhd(volume, tmp_path / "planted.mhd"))
    index = tuple(int(v) for v in np.rint(back.world_to_voxel(world)[0]))
    assert index == target
    assert back.array[index] == 2000
    # The naive (world - origin) / spacing ignores the direction and misses for every non-identity matrix.
    naive = tuple(int(v) for v in np.rint(((world - back.origin) / back.spacing)[::-1]))
    assert (naive == target) == (name == "identity")


# ------------------------------------------------------------------------------------------- bad input


def test_missing_raw_names_the_file_and_the_fix(tmp_path):
    path = write_mhd(_volume(np.eye(3)), tmp_path / "scan.mhd")
    path.with_suffix(".raw").unlink()
    with pytest.raises(VolumeReadError, match=r"scan\.mhd: ElementDataFile scan\.raw not found") as info:
        read_volume(path)
    assert "copy the matching .raw/.zraw" in str(info.value)


def test_truncated_raw_reports_expected_and_actual_bytes(tmp_path):
    path = write_mhd(_volume(np.eye(3)), tmp_path / "scan.mhd")
    raw = path.with_suffix(".raw")
    raw.write_bytes(raw.read_bytes()[:-100])
    expected = 6 * 7 * 9 * 2
    with pytest.raises(
        VolumeReadError, match=rf"scan\.raw: size mismatch, expected {expected} bytes .* {expected - 100}"
    ):
        read_volume(path)


def test_truncated_zraw_is_reported(tmp_path):
    path = write_mhd(_volume(np.eye(3)), tmp_path / "scan.mhd", compress=True)
    zraw = path.with_suffix(".zraw")
    zraw.write_bytes(zraw.read_bytes()[:-10])
    with pytest.raises(VolumeReadError, match=r"scan\.zraw: compressed data size mismatch"):
        read_volume(path)


@pytest.mark.parametrize("spacing", ["0 0.7 2.5", "0.7 -0.7 2.5", "0.7 nan 2.5"])
def test_bad_spacing_is_rejected(tmp_path, spacing):
    path = write_mhd(_volume(np.eye(3)), tmp_path / "scan.mhd")
    text = path.read_text().replace("ElementSpacing = 0.703125 0.8 2.5", f"ElementSpacing = {spacing}")
    path.write_text(text)
    with pytest.raises(VolumeReadError, match=r"scan\.mhd: invalid voxel spacing"):
        read_volume(path)


def test_nan_voxels_are_rejected(tmp_path):
    array = np.zeros((4, 5, 6), dtype=np.float32)
    array[2, 3, 4] = np.nan
    path = write_mhd(CTVolume(array, (1, 1, 1), (0, 0, 0), np.eye(3)), tmp_path / "nan.mhd")
    with pytest.raises(VolumeReadError, match=r"nan\.mhd: 1 voxel\(s\) are NaN"):
        read_volume(path)


def test_unreadable_and_empty_dicom_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VolumeReadError, match=r"empty: DICOM folder is empty"):
        read_volume(empty)
    junk = tmp_path / "junk"
    junk.mkdir()
    for i in range(3):
        (junk / f"IM{i:04d}.dcm").write_bytes(b"not a dicom file" * 20)
    with pytest.raises(VolumeReadError, match=r"junk: no readable DICOM series among 3 file"):
        read_volume(junk)


def test_missing_path_and_unknown_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.mhd"):
        read_volume(tmp_path / "nothere.mhd")
    other = tmp_path / "scan.png"
    other.write_bytes(b"x")
    with pytest.raises(VolumeReadError, match="unsupported file type"):
        read_volume(other)


def test_corrupt_zlib_payload_is_a_read_error(tmp_path):
    path = write_mhd(_volume(np.eye(3)), tmp_path / "scan.mhd", compress=True)
    zraw = path.with_suffix(".zraw")
    zraw.write_bytes(b"\x00" * zraw.stat().st_size)
    with pytest.raises(VolumeReadError, match=r"scan\.zraw: corrupt compressed data"):
        read_volume(path)


def test_write_is_atomic_and_leaves_no_temporaries(tmp_path):
    volume = _volume(np.eye(3))
    write_mhd(volume, tmp_path / "scan.mhd")
    write_mhd(volume, tmp_path / "scan.mhd", compress=True)
    write_nifti(volume, tmp_path / "scan.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.mhd", "scan.nii.gz", "scan.raw", "scan.zraw"]


# ------------------------------------------------------------------------------------------ anonymizing


def test_anonymized_header_drops_identifying_tags(tmp_path):
    tags = {
        "0010|0010": "Doe^Jane",  # PatientName
        "0010|0020": "PAT-0042",  # PatientID
        "0010|0030": "19500101",  # PatientBirthDate
        "0008|0080": "General Hospital",  # InstitutionName
        "0008|0090": "House^Gregory",  # ReferringPhysicianName
        "0008|0050": "ACC123",  # AccessionNumber
        "0010|1000": "OTHER-1",  # OtherPatientIDs
        "0010|1040": "1 Main Street",  # PatientAddress
        "0008|0020": "20010203",  # StudyDate
    }
    write_dicom_series(_volume(np.eye(3)), tmp_path / "series", series_uid="1.2.3.4.5", tags=tags)
    header = anonymized_header(tmp_path / "series")
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "InstitutionName",
        "ReferringPhysicianName",
        "AccessionNumber",
        "OtherPatientIDs",
        "PatientAddress",
        "StudyDate",
    ):
        assert keyword not in header
    text = repr(header)
    for value in tags.values():
        assert value not in text
    assert header["Modality"] == "CT"
    assert header["SeriesInstanceUID"] == "1.2.3.4.5"
    assert header["SliceThickness"] == pytest.approx(2.5)
    assert len(header["ImageOrientationPatient"]) == 6


# ------------------------------------------------------------------ DICOM series integrity (issue 19 item 1)


def _series(tmp_path, n=10, spacing_z=1.5):
    volume = CTVolume(
        np.random.default_rng(4).integers(-1000, 400, (n, 12, 14)).astype(np.int16),
        (0.7, 0.7, spacing_z),
        (-40.0, -30.0, -100.0),
        np.eye(3),
    )
    folder = tmp_path / "series"
    files = write_dicom_series(volume, folder, series_uid="1.2.826.0.1.99.7")
    return volume, folder, files


def test_dicom_truncated_slice_is_an_error_naming_the_slice_and_the_flag(tmp_path):
    volume, folder, files = _series(tmp_path)
    files[4].write_bytes(files[4].read_bytes()[: files[4].stat().st_size // 2])
    with pytest.raises(
        VolumeReadError,
        match=r"1\.2\.826\.0\.1\.99\.7: 1 slice file\(s\) cannot be read \(slice_0004\.dcm\).*--dicom-tolerance",
    ):
        read_volume(folder)
    # Opting in: the slice is left out and the gap it leaves (0.75 mm off the even grid) is accepted ...
    back = read_volume(folder, dicom_tolerance_mm=0.8)
    assert back.shape[0] == 9
    # ... but only within the stated tolerance.
    with pytest.raises(
        VolumeReadError, match=r"gap 3\.000 mm at slice_0003\.dcm -> slice_0005\.dcm.*tolerance 0\.5 mm"
    ):
        read_volume(folder, dicom_tolerance_mm=0.5)


def test_dicom_folder_with_a_dicomdir_and_notes_reads_cleanly(tmp_path):
    import pydicom

    volume, folder, _ = _series(tmp_path)
    (folder / "notes.xml").write_text("<not-dicom/>")
    ds = pydicom.Dataset()  # an instance-less DICOM file, as a DICOMDIR: not a slice
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.99.77"
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.save_as(folder / "DICOMDIR", enforce_file_format=True)
    np.testing.assert_array_equal(read_volume(folder).array, volume.array)


def test_dicom_missing_slice_and_uneven_spacing_are_errors(tmp_path):
    _, folder, files = _series(tmp_path)
    files[6].unlink()
    with pytest.raises(
        VolumeReadError,
        match=r"not evenly spaced \(gap 3\.000 mm at slice_0005\.dcm -> slice_0007\.dcm.*--dicom-tolerance",
    ):
        read_volume(folder)
    # Uneven spacing without a missing file: move one slice 0.4 mm.
    _, folder2, files2 = _series(tmp_path / "b")
    import pydicom

    ds = pydicom.dcmread(files2[3])
    ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 0.4]
    ds.save_as(files2[3])
    with pytest.raises(
        VolumeReadError, match=r"series.*1\.2\.826\.0\.1\.99\.7: slices are not evenly spaced"
    ):
        read_volume(folder2)
    assert read_volume(folder2, dicom_tolerance_mm=0.5).shape[0] == 10


def test_prepare_cli_refuses_a_truncated_slice_and_names_the_flag(tmp_path, capsys):
    from common.cli import main

    _, folder, files = _series(tmp_path / "root", n=12)
    files[5].write_bytes(files[5].read_bytes()[:300])
    argv = ["prepare", "folder", "--root", str(tmp_path / "root"), "--out", str(tmp_path / "cache")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "slice_0005.dcm" in err and "--dicom-tolerance" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert main([*argv, "--dicom-tolerance", "1"]) == 0
