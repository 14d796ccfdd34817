"""DICOM series: read one (choosing the series, refusing unreadable, missing or unevenly spaced slices), write
one (the synthetic LIDC tree, the demo's series), and list a header without patient identifiers.

`common.io.read_volume` dispatches a folder here; everything returns or takes `common.io.CTVolume`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from common import atomic
from common.io import CTVolume, VolumeReadError, first_line, format_float, validate_volume

log = logging.getLogger(__name__)

__all__ = [
    "DICOM_POSITION_TOLERANCE_MM",
    "anonymized_header",
    "check_slice_positions",
    "check_unreadable_slices",
    "is_dicomdir",
    "read_dicom_folder",
    "read_dicom_slices",
    "write_dicom_series",
]


#: How far (mm) a slice may sit from the evenly spaced grid the volume puts it on before a DICOM series is
#: refused by default. Positions in real headers are rounded to ~0.001 mm; a missing slice moves its
#: neighbours by half a slice spacing or more. `--dicom-tolerance MM` (`dicom_tolerance_mm=`) raises it.
DICOM_POSITION_TOLERANCE_MM = 0.05

_TOLERANCE_FIX = (
    "pass --dicom-tolerance MM (dicom_tolerance_mm=) to accept slices up to MM mm off an even grid"
)


def _dicom_floats(value: str | None) -> np.ndarray | None:
    """A DICOM multi-valued decimal string ("a\\b\\c") as floats; None when absent or unparsable."""
    if not value:
        return None
    try:
        return np.asarray([float(v) for v in value.split("\\")], dtype=np.float64)
    except ValueError:
        return None


def check_slice_positions(
    positions_mm: np.ndarray,
    names: list[str],
    series: str,
    tolerance_mm: float | None = None,
) -> None:
    """Refuse a stack whose slices are not evenly spaced: missing slices, gaps, repeats, irregular spacing.

    The volume puts slice *k* at ``first + k * (last - first) / (n - 1)`` along the slice normal (what
    SimpleITK does), so the check is how far each slice's own position is from that place.

    Args:
        positions_mm: each slice's ImagePositionPatient projected on the slice normal, in stack order.
        names: the slice file names, same order (for the message).
        series: what to call the series in the message (folder and UID).
        tolerance_mm: the largest accepted offset; None = `DICOM_POSITION_TOLERANCE_MM` (the default rule).

    Raises:
        VolumeReadError: naming the series, the slice files around the worst gap and the tolerance flag.
    """
    pos = np.asarray(positions_mm, dtype=np.float64)
    if pos.size < 2:
        return
    tol = DICOM_POSITION_TOLERANCE_MM if tolerance_mm is None else float(tolerance_mm)
    gaps = np.diff(pos)
    median = float(np.median(gaps))
    worst = int(np.argmax(np.abs(gaps - median)))
    where = f"{names[worst]} -> {names[worst + 1]}"
    repeated = np.flatnonzero(np.abs(gaps) <= 1e-6 * max(1.0, abs(median)))
    if repeated.size:
        k = int(repeated[0])
        raise VolumeReadError(
            f"{series}: slices {names[k]} and {names[k + 1]} have the same position ({pos[k]:.3f} mm); the "
            "folder mixes two acquisitions or holds a duplicate file, remove one or pick the series by UID"
        )
    grid = pos[0] + np.arange(pos.size) * (pos[-1] - pos[0]) / (pos.size - 1)
    offset = float(np.max(np.abs(pos - grid)))
    if offset > tol:
        raise VolumeReadError(
            f"{series}: slices are not evenly spaced (gap {abs(gaps[worst]):.3f} mm at {where}, median "
            f"{abs(median):.3f} mm; a slice sits {offset:.3f} mm off the even grid, tolerance {tol:g} mm): missing "
            f"slices or irregular spacing; re-export the complete series, or {_TOLERANCE_FIX}"
        )
    if offset > DICOM_POSITION_TOLERANCE_MM:
        log.warning(
            "%s: uneven slice spacing accepted (a slice sits %.3f mm off the even grid, gap %.3f mm at %s)",
            series, offset, abs(gaps[worst]), where,
        )  # fmt: skip


def check_unreadable_slices(series: str, unreadable: list[Path], tolerance_mm: float | None = None) -> None:
    """Refuse a series with unreadable slice files, unless a tolerance was given (then warn and go on without them).

    Raises:
        VolumeReadError: naming the series, the files and the `--dicom-tolerance` flag.
    """
    if not unreadable:
        return
    shown = ", ".join(Path(p).name for p in unreadable[:5]) + (" ..." if len(unreadable) > 5 else "")
    if tolerance_mm is None:
        raise VolumeReadError(
            f"{series}: {len(unreadable)} slice file(s) cannot be read ({shown}): truncated or corrupt; "
            "re-export or re-download the series, or pass --dicom-tolerance MM (dicom_tolerance_mm=) to "
            "leave them out and accept the gap they leave up to MM mm"
        )
    log.warning("%s: left out %d unreadable slice file(s): %s", series, len(unreadable), shown)


def is_dicomdir(ds) -> bool:
    """Whether a parsed DICOM file is a media directory (DICOMDIR), the one kind of DICOM file with no series."""
    meta = getattr(ds, "file_meta", None)
    return str(getattr(meta, "MediaStorageSOPClassUID", "")) == "1.2.840.10008.1.3.10"


def _unreadable_slices(files: list[Path], listed: set[str], series_uid: str) -> list[Path]:
    """DICOM files GDCM left out of every series that belong to `series_uid` or to no readable series.

    A truncated or corrupt slice is dropped by GDCM without a word; the series would be built without it.
    """
    import pydicom

    bad = []
    for path in files:
        if str(path) in listed:
            continue
        with open(path, "rb") as fh:
            is_dicom = fh.read(132)[128:] == b"DICM"
        if not is_dicom:
            continue  # not DICOM (LIDC's XML, notes), or a preamble-less file GDCM could not place either
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - a DICOM file pydicom cannot parse either is an unreadable slice
            bad.append(path)
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        if uid == series_uid or (not uid and not is_dicomdir(ds)):  # no series UID: cut before it
            bad.append(path)
    return bad


def read_dicom_folder(folder: Path, series_uid: str | None, tolerance_mm: float | None = None) -> CTVolume:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    if not files:
        raise VolumeReadError(
            f"{folder}: DICOM folder is empty; point at the folder that holds the .dcm files"
        )
    reader = sitk.ImageSeriesReader()
    try:
        uids = list(reader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError as err:
        raise VolumeReadError(
            f"{folder}: cannot scan the folder for DICOM series ({first_line(err)})"
        ) from err
    if not uids:
        raise VolumeReadError(
            f"{folder}: no readable DICOM series among {len(files)} file(s); the files are not DICOM or are "
            "corrupt (check them with dcmdump / pydicom)"
        )
    if series_uid is None:
        if len(uids) > 1:
            raise VolumeReadError(
                f"{folder}: holds {len(uids)} DICOM series ({', '.join(sorted(uids))}); pass series_uid= to pick one"
            )
        series_uid = uids[0]
    elif series_uid not in uids:
        raise VolumeReadError(
            f"{folder}: no DICOM series with UID {series_uid}; the folder holds {', '.join(sorted(uids))}"
        )
    names = list(reader.GetGDCMSeriesFileNames(str(folder), series_uid))
    listed = {str(Path(n)) for uid in uids for n in reader.GetGDCMSeriesFileNames(str(folder), uid)}
    # GDCM silently leaves out slice files it cannot parse (a truncated file): find them and say so.
    unreadable = _unreadable_slices(files, listed, series_uid)
    volume, _ = read_dicom_slices(
        [Path(n) for n in names], series_uid, folder, tolerance_mm, unreadable=unreadable
    )
    return volume


def read_dicom_slices(
    files: list[Path],
    series_uid: str,
    source: Path,
    tolerance_mm: float | None = None,
    unreadable: list[Path] = (),
) -> tuple[CTVolume, list[Path]]:
    """Read one DICOM series from its slice files, in the given order (sorted along the slice normal).

    Every slice must be readable and the slices evenly spaced (`check_slice_positions`). With a tolerance
    (`tolerance_mm` given: the user's `--dicom-tolerance`), unreadable slice files are left out with a
    warning and the resulting gap is judged against that tolerance.

    Args:
        files: the slice files of the series, sorted along the slice normal (GDCM's order).
        series_uid: the series UID (for the volume and the messages).
        source: the folder (for the volume and the messages).
        tolerance_mm: None = the default rule (`DICOM_POSITION_TOLERANCE_MM`, no unreadable slices).
        unreadable: slice files of this series already known to be unreadable.

    Returns:
        The volume (slice *k* = ``files_read[k]``) and the files read (``files`` less unreadable ones).

    Raises:
        VolumeReadError: an unreadable slice, uneven spacing, or SimpleITK failing; the message names the
            folder, the series and the slice files.
    """
    series = f"{source}: DICOM series {series_uid}"
    files = [Path(f) for f in files]
    unreadable = [Path(f) for f in unreadable]

    def execute(paths: list[Path]) -> tuple[sitk.ImageSeriesReader, sitk.Image]:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames([str(p) for p in paths])
        reader.MetaDataDictionaryArrayUpdateOn()
        # ITK's own "non uniform sampling" warning names no file; check_slice_positions says it better.
        shown = sitk.ProcessObject.GetGlobalWarningDisplay()
        sitk.ProcessObject.SetGlobalWarningDisplay(False)
        try:
            return reader, reader.Execute()
        finally:
            sitk.ProcessObject.SetGlobalWarningDisplay(shown)

    try:
        reader, img = execute(files)
    except RuntimeError as err:
        failing = [p for p in files if not _readable_slice(p)]
        if not failing:
            raise VolumeReadError(
                f"{series}: reading the series failed ({first_line(err)}); some slices are corrupt"
            ) from err
        unreadable += failing
        files = [p for p in files if p not in failing]
        reader = img = None
    check_unreadable_slices(series, unreadable, tolerance_mm)
    if not files:
        raise VolumeReadError(f"{series}: no readable slice file")
    if img is None:
        try:
            reader, img = execute(files)
        except RuntimeError as err:
            raise VolumeReadError(
                f"{series}: reading the series failed ({first_line(err)}); some slices are corrupt"
            ) from err
    if len(files) >= 2:
        orientation = (
            _dicom_floats(reader.GetMetaData(0, "0020|0037"))
            if reader.HasMetaDataKey(0, "0020|0037")
            else None
        )
        positions = [
            _dicom_floats(reader.GetMetaData(k, "0020|0032"))
            if reader.HasMetaDataKey(k, "0020|0032")
            else None
            for k in range(len(files))
        ]
        if (
            orientation is not None
            and orientation.size == 6
            and all(p is not None and p.size == 3 for p in positions)
        ):
            normal = np.cross(orientation[:3], orientation[3:])
            check_slice_positions(
                np.asarray(positions) @ normal, [p.name for p in files], series, tolerance_mm
            )
    if img.GetDimension() == 2:
        img = sitk.JoinSeries([img])
    volume = CTVolume.from_sitk(img, series_uid=series_uid, source=source)
    validate_volume(volume, source)
    return volume, files


def _readable_slice(path: Path) -> bool:
    try:
        sitk.ReadImage(str(path))
    except RuntimeError:
        return False
    return True


def write_dicom_series(
    volume: CTVolume,
    folder: str | Path,
    series_uid: str | None = None,
    study_uid: str | None = None,
    tags: dict[str, str] | None = None,
) -> list[Path]:
    """Write `volume` as a DICOM CT series (one file per slice) that `read_volume` reads back exactly.

    Geometry goes into ImagePositionPatient / ImageOrientationPatient / PixelSpacing / SliceThickness, so
    spacing, origin and a right-handed direction matrix round-trip. DICOM readers order slices along the
    normal of the in-plane axes, so a left-handed direction (det = -1) reads back as the same physical volume
    with the slice order reversed.

    The series is a valid CT Image IOD: it carries a FrameOfReferenceUID (Type 1; a DICOM SEG needs it) and
    every UID is at most 64 characters. The frame of reference and the SOP Instance UIDs are derived from
    the series UID (pydicom's hashed ``generate_uid``), so the same inputs give the same bytes.

    Args:
        volume: an integer volume (int16 HU or uint8); float volumes must be rounded first.
        folder: created if needed; files are `slice_0000.dcm`, ...
        series_uid: SeriesInstanceUID; a fresh one is generated if omitted.
        study_uid: StudyInstanceUID; a fresh one is generated if omitted.
        tags: extra `"gggg|eeee": value` tags written to every slice (e.g. synthetic patient fields); they
            override the defaults, e.g. ``"0020|0052"`` to share one frame of reference between series.

    Returns:
        The written file paths in slice order.
    """
    if not np.issubdtype(volume.array.dtype, np.integer):
        raise ValueError("write_dicom_series stores integer voxels; round float volumes to int16 HU first")
    from pydicom.uid import generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    img = volume.to_sitk()
    d = volume.direction
    orientation = "\\".join(format_float(v) for v in (*d[:, 0], *d[:, 1]))
    base_tags = {
        "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL",
        "0008|0016": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
        "0008|0060": "CT",
        "0008|0021": "20000101",
        "0008|0031": "000000",
        "0008|103e": "lungcad series",
        "0020|000d": study_uid,
        "0020|000e": series_uid,
        "0020|0052": generate_uid(entropy_srcs=[series_uid, "frame of reference"]),
        "0020|0011": "1",
        "0020|0037": orientation,
        "0018|0050": format_float(volume.spacing[2]),
        "0018|0088": format_float(volume.spacing[2]),
        "0028|1052": "0",
        "0028|1053": "1",
        "0028|1054": "HU",
    }
    if tags:
        base_tags.update(tags)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    paths = []
    for k in range(img.GetDepth()):
        slice_img = img[:, :, k]
        for tag, value in base_tags.items():
            slice_img.SetMetaData(tag, value)
        position = img.TransformIndexToPhysicalPoint((0, 0, k))
        slice_img.SetMetaData("0020|0032", "\\".join(format_float(v) for v in position))
        slice_img.SetMetaData("0020|0013", str(k + 1))
        # Not f"{series_uid}.{k + 1}": a 64-character series UID would give SOP UIDs over the 64 allowed.
        slice_img.SetMetaData("0008|0018", generate_uid(entropy_srcs=[series_uid, "slice", str(k + 1)]))
        out = folder / f"slice_{k:04d}.dcm"
        with atomic.atomic_path(out, suffix=".dcm") as tmp:
            writer.SetFileName(str(tmp))
            writer.Execute(slice_img)
        paths.append(out)
    return paths


# ---------------------------------------------------------------------------------- DICOM anonymization

# DICOM PS3.15 Annex E basic application-level confidentiality profile: attributes that identify the patient,
# the people involved or the institution, and the dates/times that help re-identify. Dropped before logging.
IDENTIFYING_KEYWORDS = frozenset(
    {
        "AccessionNumber",
        "AcquisitionDate",
        "AcquisitionDateTime",
        "AcquisitionTime",
        "AdditionalPatientHistory",
        "AdmittingDiagnosesDescription",
        "BranchOfService",
        "ContentDate",
        "ContentTime",
        "CountryOfResidence",
        "DeviceSerialNumber",
        "EthnicGroup",
        "InstitutionAddress",
        "InstitutionName",
        "InstitutionalDepartmentName",
        "IssuerOfPatientID",
        "MedicalAlerts",
        "MedicalRecordLocator",
        "MilitaryRank",
        "NameOfPhysiciansReadingStudy",
        "Occupation",
        "OperatorsName",
        "OtherPatientIDs",
        "OtherPatientIDsSequence",
        "OtherPatientNames",
        "PatientAddress",
        "PatientAge",
        "PatientBirthDate",
        "PatientBirthName",
        "PatientBirthTime",
        "PatientComments",
        "PatientID",
        "PatientInsurancePlanCodeSequence",
        "PatientMotherBirthName",
        "PatientName",
        "PatientReligiousPreference",
        "PatientSex",
        "PatientSize",
        "PatientTelephoneNumbers",
        "PatientWeight",
        "PerformedProcedureStepStartDate",
        "PerformedProcedureStepStartTime",
        "PerformingPhysicianName",
        "PhysiciansOfRecord",
        "ReferringPhysicianAddress",
        "ReferringPhysicianName",
        "ReferringPhysicianTelephoneNumbers",
        "RegionOfResidence",
        "RequestingPhysician",
        "ResponsiblePerson",
        "ScheduledPerformingPhysicianName",
        "SeriesDate",
        "SeriesTime",
        "StationName",
        "StudyDate",
        "StudyID",
        "StudyTime",
    }
)


def _json_value(value: Any) -> Any:
    from pydicom.multival import MultiValue
    from pydicom.valuerep import IS, DSfloat

    if isinstance(value, MultiValue | list | tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, DSfloat | float):
        return float(value)
    if isinstance(value, IS | int):
        return int(value)
    return str(value)


def anonymized_header(path_or_folder: str | Path) -> dict[str, Any]:
    """DICOM header of a file (or of the first readable file in a folder) without identifying attributes.

    Drops the PS3.15 basic-profile identity attributes listed in `IDENTIFYING_KEYWORDS`, every person-name
    (PN) element, private tags, sequences (they can nest identity) and binary values. UIDs stay: the series
    UID is this project's scan key and is public in LUNA16/LIDC.

    Returns:
        keyword → value (str, int, float or list of them).
    """
    import pydicom

    path = Path(path_or_folder)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such DICOM file or folder")
    candidates = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    dataset = None
    for candidate in candidates:
        try:
            dataset = pydicom.dcmread(candidate, stop_before_pixels=True)
            break
        except (pydicom.errors.InvalidDicomError, OSError, ValueError):
            continue
    if dataset is None:
        raise VolumeReadError(f"{path}: no readable DICOM file found")
    header: dict[str, Any] = {}
    for element in dataset:
        if element.tag.is_private or element.VR in ("SQ", "PN", "OB", "OW", "OF", "OD", "UN"):
            continue
        keyword = element.keyword
        if not keyword or keyword in IDENTIFYING_KEYWORDS or keyword == "PixelData":
            continue
        if element.value is None or element.value == "":
            continue
        header[keyword] = _json_value(element.value)
    return header
