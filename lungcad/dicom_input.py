"""DICOM input for `lungcad analyze`: choose the CT series in a folder by rule, refuse what cannot be analysed.

A DICOM folder from a PACS export often holds more than the scan: scout/localizer images, a thick and a
thin reconstruction, sometimes an MR or a report. `select_ct_series` reads every header (pydicom, no
pixels) and picks one series:

1. Only CT (Modality CT) is analysed. Localizer images (ImageType containing LOCALIZER or SCOUT) are
   dropped, and so is a single-slice series when a multi-slice one exists (a scout in another plane).
2. Among the remaining CT series: axial first (slice normal closest to the patient's z axis), then the
   most slices, then the thinnest slice spacing. ``series_uid`` (`--series-uid`) overrides the rule.
3. The chosen series is refused with one line naming the folder, the series and the slice files when it
   has one slice, mixes orientations, is tilted (GantryDetectorTilt ≠ 0, or slices stacked off their
   normal), or has missing slices / uneven spacing beyond the tolerance (`common.dicom.check_slice_positions`,
   the same rule `lungdata prepare` uses; `--dicom-tolerance MM` raises it).

`read_dicom_ct` then reads the pixels through `common.dicom.read_dicom_slices` (the one place that reads
DICOM pixel data) and returns the volume with the source headers in the volume's z order, which the
DICOM SEG / SR writers (`lungcad.dicom_output`) reference.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from common import dicom as ct_dicom
from common.io import CTVolume

log = logging.getLogger(__name__)

__all__ = ["SeriesChoice", "read_dicom_ct", "select_ct_series"]

#: Slices stacked further than this off their normal (degrees) count as gantry tilt.
MAX_TILT_DEGREES = 0.5
#: Two ImageOrientationPatient vectors differing by more than this (cosine units) are different orientations.
ORIENTATION_ATOL = 1e-3


@dataclass
class SeriesChoice:
    """The chosen CT series of a folder.

    Attributes:
        folder: the folder that was searched.
        series_uid: SeriesInstanceUID of the chosen series.
        files: its slice files sorted along the slice normal (= the volume's z index).
        datasets: their headers (no pixel data), same order.
        reasons: why this series, and what else the folder held (localizers dropped, other series).
        unreadable: DICOM files of this series (or of no readable series) that cannot be read; refused unless
            a tolerance was given, then left out.
    """

    folder: Path
    series_uid: str
    files: list[Path]
    datasets: list[pydicom.Dataset]
    reasons: list[str] = field(default_factory=list)
    unreadable: list[Path] = field(default_factory=list)


def _is_dicom_file(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(132)[128:] == b"DICM"


def _read_headers(folder: Path) -> tuple[list[tuple[Path, pydicom.Dataset]], list[Path]]:
    """(path, header) of every DICOM file directly in `folder`, and the DICOM files whose header is unreadable."""
    headers, unreadable = [], []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except pydicom.errors.InvalidDicomError:
            continue  # not DICOM (notes, XML)
        except Exception:  # noqa: BLE001 - any parse failure of a DICOM file makes it unreadable
            if _is_dicom_file(path):
                unreadable.append(path)
            continue
        if "SeriesInstanceUID" not in ds:
            if not ct_dicom.is_dicomdir(ds):
                unreadable.append(path)  # cut before its series UID: a truncated slice
            continue
        if _truncated(path, ds):
            unreadable.append(path)
            continue
        headers.append((path, ds))
    return headers, unreadable


def _truncated(path: Path, ds: pydicom.Dataset) -> bool:
    """An image whose header stops early, or whose file is too short for its uncompressed pixel data."""
    if "SOPClassUID" in ds and "Rows" not in ds and str(ds.get("Modality", "")) in ("CT", "MR", ""):
        return True  # an image without its image pixel module: the header was cut
    if "Rows" not in ds:
        return False
    try:
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            return False
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        expected = (
            int(ds.Rows)
            * int(ds.Columns)
            * int(ds.get("SamplesPerPixel", 1))
            * frames
            * int(ds.BitsAllocated)
            // 8
        )
    except Exception:  # noqa: BLE001 - a value cut mid-way (pydicom BytesLengthException) or absent
        return True
    size = path.stat().st_size
    if size < expected:
        return True
    # A cut in the header can still leave more bytes than the pixel data needs: the file is whole when its
    # last `expected` bytes follow the Pixel Data element's header (8 or 12 bytes); else parse it all.
    with open(path, "rb") as fh:
        fh.seek(max(size - expected - 12, 0))
        if _PIXEL_DATA_TAG in fh.read(12):
            return False
    try:
        return len(pydicom.dcmread(path).get("PixelData", b"")) < expected
    except Exception:  # noqa: BLE001 - any parse failure here means a cut file
        return True


#: (7FE0,0010) Pixel Data in little-endian byte order.
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"


def _floats(ds: pydicom.Dataset, keyword: str, n: int) -> np.ndarray | None:
    value = ds.get(keyword)
    if value is None:
        return None
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.size == n else None


def _normal(ds: pydicom.Dataset) -> np.ndarray | None:
    iop = _floats(ds, "ImageOrientationPatient", 6)
    if iop is None:
        return None
    n = np.cross(iop[:3], iop[3:])
    norm = np.linalg.norm(n)
    return n / norm if norm > 0 else None


def _is_localizer(ds: pydicom.Dataset) -> bool:
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    return "LOCALIZER" in image_type or "SCOUT" in image_type


def _summary(uid: str, items: list[tuple[Path, pydicom.Dataset]]) -> str:
    modality = str(items[0][1].get("Modality", "?"))
    return f"{modality} series {uid} ({len(items)} image{'s' if len(items) != 1 else ''})"


def _median_spacing(items: list[tuple[Path, pydicom.Dataset]]) -> float:
    normal = _normal(items[0][1])
    positions = [_floats(ds, "ImagePositionPatient", 3) for _, ds in items]
    if normal is None or any(p is None for p in positions):
        return float("inf")
    pos = np.sort(np.asarray(positions) @ normal)
    return float(np.median(np.diff(pos))) if pos.size > 1 else float("inf")


def _axial(items: list[tuple[Path, pydicom.Dataset]]) -> bool:
    normal = _normal(items[0][1])
    return normal is not None and int(np.argmax(np.abs(normal))) == 2


def select_ct_series(
    folder: str | Path, series_uid: str | None = None, *, tolerance_mm: float | None = None
) -> SeriesChoice:
    """Choose the CT series of a DICOM folder by rule (module docstring) and check it can be analysed.

    Args:
        folder: a folder holding the DICOM files (not searched recursively).
        series_uid: analyse this series (`--series-uid`) instead of the rule's choice.
        tolerance_mm: accepted slice offset from an even grid (`--dicom-tolerance`); None = the default rule
            of `common.dicom.check_slice_positions`.

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: one line naming the folder, the series and the slice files: no DICOM files, unknown
            series UID, not CT, a single slice, mixed orientations, gantry tilt, missing slices or uneven spacing.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such DICOM folder")
    headers, unreadable = _read_headers(folder)
    if not headers:
        raise ValueError(
            f"{folder}: no readable DICOM image among its files; point at the folder that holds the series' .dcm files"
        )
    groups: dict[str, list[tuple[Path, pydicom.Dataset]]] = defaultdict(list)
    for path, ds in headers:
        groups[str(ds.SeriesInstanceUID)].append((path, ds))
    reasons: list[str] = []

    if series_uid is not None and series_uid not in groups:
        raise ValueError(
            f"{folder}: no DICOM series with UID {series_uid} (--series-uid); the folder holds "
            + "; ".join(_summary(u, g) for u, g in sorted(groups.items()))
        )
    candidates: dict[str, list[tuple[Path, pydicom.Dataset]]] = {}
    for uid, items in sorted(groups.items()):
        if series_uid is not None and uid != series_uid:
            continue
        modality = str(items[0][1].get("Modality", "")).upper()
        if modality != "CT":
            if series_uid is not None:
                raise ValueError(
                    f"{folder}: series {uid} is {modality or 'of unknown modality'}, not CT; lungcad analyses CT scans only"
                )
            reasons.append(f"skipped {_summary(uid, items)}: not CT")
            continue
        kept = [(p, ds) for p, ds in items if not _is_localizer(ds)]
        if len(kept) < len(items):
            reasons.append(f"dropped {len(items) - len(kept)} localizer image(s) of series {uid}")
        if kept:
            candidates[uid] = kept
    if not candidates:
        found = "; ".join(_summary(u, g) for u, g in sorted(groups.items()))
        raise ValueError(f"{folder}: no CT series (found {found}); lungcad analyses CT scans only")

    multi = {uid: items for uid, items in candidates.items() if len(items) > 1}
    if not multi:
        uid, items = next(iter(sorted(candidates.items())))
        raise ValueError(
            f"{folder}: CT series {uid} has a single slice ({items[0][0].name}); a 3D scan needs the whole "
            "series, export every slice into the folder"
        )
    for uid in sorted(set(candidates) - set(multi)):
        reasons.append(f"dropped single-slice CT series {uid} (a localizer)")

    def rank(uid: str) -> tuple[bool, int, float]:
        items = multi[uid]
        return (_axial(items), len(items), -_median_spacing(items))

    chosen = max(sorted(multi), key=rank)
    items = multi[chosen]
    if series_uid is not None:
        reasons.insert(0, f"series {chosen} given by --series-uid")
    else:
        axial, n, spacing = rank(chosen)
        reasons.insert(
            0,
            f"chose CT series {chosen}: {'axial' if axial else 'not axial'}, {n} slices, "
            f"{-spacing:.3g} mm apart (rule: axial, most slices, thinnest spacing)",
        )
        for uid in sorted(set(multi) - {chosen}):
            axial, n, spacing = rank(uid)
            reasons.append(
                f"not chosen: CT series {uid} ({'axial' if axial else 'not axial'}, {n} slices, {-spacing:.3g} mm)"
            )
    # Unreadable DICOM files of this series (or of no readable series) would leave a gap: name them first.
    # A file cut inside its SeriesInstanceUID claims a prefix of it ("" when cut before).
    unreadable = [p for p in unreadable if chosen.startswith(_claimed_series(p))]
    ct_dicom.check_unreadable_slices(f"{folder}: CT series {chosen}", unreadable, tolerance_mm)
    files, datasets = _check_geometry(folder, chosen, items, tolerance_mm)
    return SeriesChoice(folder, chosen, files, datasets, reasons, unreadable)


def _claimed_series(path: Path) -> str:
    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True).get("SeriesInstanceUID", ""))
    except Exception:  # noqa: BLE001 - unparsable: claims no series
        return ""


def _check_geometry(
    folder: Path, uid: str, items: list[tuple[Path, pydicom.Dataset]], tolerance_mm: float | None
) -> tuple[list[Path], list[pydicom.Dataset]]:
    """Sort the slices along their normal; refuse mixed orientations, gantry tilt and uneven spacing."""
    series = f"{folder}: CT series {uid}"
    first_path, first = items[0]
    iop0 = _floats(first, "ImageOrientationPatient", 6)
    for path, ds in items:
        iop = _floats(ds, "ImageOrientationPatient", 6)
        if iop is None or _floats(ds, "ImagePositionPatient", 3) is None:
            raise ValueError(
                f"{series}: slice {path.name} has no ImageOrientationPatient / ImagePositionPatient; the "
                "series has no 3D geometry (not an original CT reconstruction)"
            )
        if not np.allclose(iop, iop0, atol=ORIENTATION_ATOL):
            raise ValueError(
                f"{series}: mixed orientations ({first_path.name} and {path.name} differ); the series mixes "
                "image planes, export each reconstruction as its own series or pick one with --series-uid"
            )
        tilt = ds.get("GantryDetectorTilt")
        if tilt is not None and str(tilt).strip() != "" and abs(float(tilt)) > 1e-3:
            raise ValueError(
                f"{series}: gantry tilt {float(tilt):g} degrees ({path.name}); tilted acquisitions are not "
                "supported, reconstruct the scan without tilt (or resample it to an untilted series first)"
            )
    normal = _normal(first)
    if normal is None:
        raise ValueError(f"{series}: ImageOrientationPatient of {first_path.name} is degenerate")
    positions = np.asarray([_floats(ds, "ImagePositionPatient", 3) for _, ds in items])
    order = np.argsort(positions @ normal, kind="stable")
    items = [items[i] for i in order]
    positions = positions[order]
    stack = positions[-1] - positions[0]
    length = np.linalg.norm(stack)
    if length > 0:
        angle = float(np.degrees(np.arccos(np.clip(abs(stack @ normal) / length, -1.0, 1.0))))
        if angle > MAX_TILT_DEGREES:
            raise ValueError(
                f"{series}: slices are stacked {angle:.1f} degrees off their normal ({items[0][0].name} -> "
                f"{items[-1][0].name}): gantry tilt; reconstruct the scan without tilt (or resample it first)"
            )
    ct_dicom.check_slice_positions(positions @ normal, [p.name for p, _ in items], series, tolerance_mm)
    return [p for p, _ in items], [ds for _, ds in items]


def read_dicom_ct(
    folder: str | Path, series_uid: str | None = None, *, tolerance_mm: float | None = None
) -> tuple[CTVolume, list[pydicom.Dataset]]:
    """Choose the CT series of `folder` (`select_ct_series`) and read it.

    Returns:
        The volume (int16 HU, original geometry) and the source headers (no pixel data) sorted as the
        volume's z index: ``datasets[k]`` is slice ``volume.array[k]``.
    """
    choice = select_ct_series(folder, series_uid, tolerance_mm=tolerance_mm)
    for reason in choice.reasons:
        log.info("%s: %s", choice.folder, reason)
    # Unreadable files were refused or (with a tolerance) left out by select_ct_series already.
    volume, read = ct_dicom.read_dicom_slices(choice.files, choice.series_uid, choice.folder, tolerance_mm)
    kept = {Path(p) for p in read}
    datasets = [ds for p, ds in zip(choice.files, choice.datasets) if p in kept]
    if len(datasets) != volume.shape[0]:  # defensive: the reader and the headers must agree slice by slice
        raise ValueError(
            f"{choice.folder}: series {choice.series_uid}: read {volume.shape[0]} slices but {len(datasets)} headers"
        )
    return volume, datasets
