"""CT volume I/O: one `CTVolume` type for MHD/RAW (.raw and zlib .zraw), NIfTI and DICOM series.

DICOM series reading (with its slice checks), writing and header anonymization live in `common.dicom`;
`read_volume` dispatches a folder there.

Everything downstream works on `CTVolume`: a (z, y, x) array plus the SimpleITK geometry
(spacing and origin in (x, y, z) order, the 3x3 direction matrix whose column *j* is the world direction
of index axis *j*). World and voxel coordinates are converted through the full direction matrix, so
flipped or rotated scans land where they should; `(world - origin) / spacing` alone is wrong for them.

Reading goes through SimpleITK, but MHD headers are checked by us first because SimpleITK's own messages
for a missing or truncated data file do not say which file or what to do. Every problem a reader finds is a
`VolumeReadError` naming the file, the problem and the fix.

`write_mhd` writes the MetaImage header text itself (LUNA16 key order, shortest round-tripping numbers,
no timestamps), so the same volume always gives the same bytes; this is what the synthetic LUNA16 tree and
the preprocessed-cache checksums rely on. Every writer is atomic: data goes to a temporary file that is
renamed into place, and for MHD the header is renamed last, so an interrupted write never leaves a header
pointing at a partial data file.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from common import atomic

log = logging.getLogger(__name__)

__all__ = [
    "CTVolume",
    "VolumeReadError",
    "index_to_world_matrix",
    "read_volume",
    "voxel_to_world",
    "write_mhd",
    "write_nifti",
    "world_to_voxel",
]


class VolumeReadError(ValueError):
    """A scan that cannot be read or fails validation; the message names the file, the problem and the fix."""


# MetaImage element types we read and write, numpy dtype <-> MET name.
_MET_TYPES: dict[str, np.dtype] = {
    "MET_UCHAR": np.dtype(np.uint8),
    "MET_CHAR": np.dtype(np.int8),
    "MET_USHORT": np.dtype(np.uint16),
    "MET_SHORT": np.dtype(np.int16),
    "MET_UINT": np.dtype(np.uint32),
    "MET_INT": np.dtype(np.int32),
    "MET_FLOAT": np.dtype(np.float32),
    "MET_DOUBLE": np.dtype(np.float64),
}
_DTYPE_TO_MET = {dtype: name for name, dtype in _MET_TYPES.items()}

_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def index_to_world_matrix(spacing, direction) -> np.ndarray:
    """The 3x3 matrix D·diag(spacing) that maps an (x, y, z) index offset to a world offset in mm."""
    return np.asarray(direction, dtype=np.float64).reshape(3, 3) @ np.diag(
        np.asarray(spacing, dtype=np.float64)
    )


def world_to_voxel(points_xyz, origin, spacing, direction) -> np.ndarray:
    """World mm (x, y, z) → continuous voxel index in array order (z, y, x), through the direction matrix.

    Args:
        points_xyz: one point (3,) or many (N, 3).
        origin, spacing: (x, y, z) as SimpleITK gives them; direction: 3x3 (or its 9 values, row-major).

    Returns:
        (N, 3) float64 continuous indices (z, y, x); voxel centres are integers.
    """
    pts = np.asarray(points_xyz, dtype=np.float64).reshape(-1, 3)
    ijk = np.linalg.solve(
        index_to_world_matrix(spacing, direction), (pts - np.asarray(origin, dtype=np.float64)).T
    )
    return ijk.T[:, ::-1].copy()


def voxel_to_world(points_zyx, origin, spacing, direction) -> np.ndarray:
    """Continuous voxel index (z, y, x) → world mm (x, y, z); the exact inverse of `world_to_voxel`.

    Returns:
        (N, 3) float64 world coordinates.
    """
    idx = np.asarray(points_zyx, dtype=np.float64).reshape(-1, 3)[:, ::-1]
    return np.asarray(origin, dtype=np.float64) + idx @ index_to_world_matrix(spacing, direction).T


@dataclass
class CTVolume:
    """A CT scan in memory with its world geometry.

    Attributes:
        array: voxels in (z, y, x) order; int16 HU for CT, float32 where values are not integral, uint8 for masks.
        spacing: voxel size in mm, (x, y, z).
        origin: world position of voxel (0, 0, 0) in mm, (x, y, z).
        direction: 3x3 direction cosines, column *j* = world direction of index axis *j* (x, y, z).
        series_uid: DICOM series instance UID (or LUNA16 seriesuid), if known.
        source: file or folder the volume was read from, if any.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    series_uid: str | None = None
    source: Path | None = None

    def __post_init__(self) -> None:
        self.spacing = tuple(float(v) for v in self.spacing)  # type: ignore[assignment]
        self.origin = tuple(float(v) for v in self.origin)  # type: ignore[assignment]
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        if self.array.ndim != 3:
            raise ValueError(f"CTVolume needs a 3D (z, y, x) array, got shape {self.array.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape, (z, y, x)."""
        return tuple(int(n) for n in self.array.shape)  # type: ignore[return-value]

    @property
    def size_xyz(self) -> tuple[int, int, int]:
        """Number of voxels per index axis in SimpleITK order, (x, y, z)."""
        z, y, x = self.shape
        return (x, y, z)

    @property
    def physical_size(self) -> tuple[float, float, float]:
        """Extent of the voxel grid in mm along each index axis, (x, y, z)."""
        return tuple(n * s for n, s in zip(self.size_xyz, self.spacing))  # type: ignore[return-value]

    def world_to_voxel(self, points_xyz: np.ndarray | tuple[float, float, float]) -> np.ndarray:
        """World mm (x, y, z) → continuous voxel index (z, y, x), as an (N, 3) array (see `world_to_voxel`)."""
        return world_to_voxel(points_xyz, self.origin, self.spacing, self.direction)

    def voxel_to_world(self, points_zyx: np.ndarray | tuple[float, float, float]) -> np.ndarray:
        """Continuous voxel index (z, y, x) → world mm (x, y, z), as an (N, 3) array (see `voxel_to_world`)."""
        return voxel_to_world(points_zyx, self.origin, self.spacing, self.direction)

    def contains_voxel(self, points_zyx: np.ndarray) -> np.ndarray:
        """Whether continuous indices lie inside the grid (within half a voxel of the outer voxel centres)."""
        idx = np.asarray(points_zyx, dtype=np.float64).reshape(-1, 3)
        upper = np.asarray(self.shape, dtype=np.float64) - 0.5
        return np.all((idx >= -0.5) & (idx <= upper), axis=1)

    def to_sitk(self) -> sitk.Image:
        """The volume as a SimpleITK image (copies the array)."""
        img = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(self.direction.ravel().tolist())
        return img

    @classmethod
    def from_sitk(
        cls, img: sitk.Image, series_uid: str | None = None, source: str | Path | None = None
    ) -> CTVolume:
        """Wrap a 3D SimpleITK image; integer images whose values fit become int16, others float32."""
        if img.GetDimension() != 3:
            raise ValueError(f"expected a 3D image, got {img.GetDimension()}D")
        if img.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError("expected a scalar image, got a multi-component (vector/RGB) image")
        array = _to_canonical_dtype(sitk.GetArrayFromImage(img))
        return cls(
            array=array,
            spacing=img.GetSpacing(),
            origin=img.GetOrigin(),
            direction=np.asarray(img.GetDirection()).reshape(3, 3),
            series_uid=series_uid,
            source=Path(source) if source is not None else None,
        )

    def with_array(self, array: np.ndarray) -> CTVolume:
        """A volume on the same grid with other voxels (a mask, a clipped copy)."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} differs from the volume's {self.array.shape}")
        return CTVolume(array, self.spacing, self.origin, self.direction.copy(), self.series_uid, self.source)


def _to_canonical_dtype(array: np.ndarray) -> np.ndarray:
    """int16 for integer CT that fits (the cache format), uint8 masks kept, float32 otherwise."""
    if array.dtype in (np.int16, np.uint8, np.float32):
        return array
    if np.issubdtype(array.dtype, np.integer):
        if array.size == 0 or (
            array.min() >= np.iinfo(np.int16).min and array.max() <= np.iinfo(np.int16).max
        ):
            return array.astype(np.int16)
        return array.astype(np.float32)
    return array.astype(np.float32)


# ----------------------------------------------------------------------------------------------- reading


def read_volume(
    path: str | Path, series_uid: str | None = None, *, dicom_tolerance_mm: float | None = None
) -> CTVolume:
    """Read a CT scan from an `.mhd` header (.raw or .zraw data), a `.nii`/`.nii.gz` file or a DICOM folder.

    Rescale slope/intercept are applied (SimpleITK does this for DICOM), so integer CT comes back as int16 HU.

    Args:
        path: the `.mhd` / `.nii(.gz)` file, or a folder of DICOM files.
        series_uid: which series to read when the folder holds several.
        dicom_tolerance_mm: DICOM only: accept slices up to this far (mm) off an even grid and leave out
            unreadable slice files (the user's `--dicom-tolerance`); None = refuse both (see
            `check_slice_positions`).

    Raises:
        FileNotFoundError: the path does not exist.
        VolumeReadError: the file is unreadable or fails validation (missing or truncated data file,
            zero/negative/non-finite spacing, NaN voxels, no or ambiguous DICOM series, unreadable DICOM
            slices, missing slices or uneven slice spacing).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder; check the dataset root and the scan list")
    if path.is_dir():
        from common.dicom import read_dicom_folder  # common.dicom imports this module

        volume = read_dicom_folder(path, series_uid, dicom_tolerance_mm)
    else:
        name = path.name.lower()
        compressed_data = None
        if name.endswith(".mhd"):
            compressed_data = _check_mhd(path)
        elif not name.endswith(_NIFTI_SUFFIXES):
            raise VolumeReadError(
                f"{path}: unsupported file type; expected .mhd (with .raw/.zraw), .nii, .nii.gz or a DICOM folder"
            )
        try:
            if compressed_data is not None:
                img = _read_compressed_mhd(path, *compressed_data)
            else:
                img = sitk.ReadImage(str(path))
        except RuntimeError as err:
            raise VolumeReadError(
                f"{path}: SimpleITK could not read it ({first_line(err)}); the file is corrupt or not an image"
            ) from err
        if img.GetDimension() != 3:
            raise VolumeReadError(
                f"{path}: expected a 3D volume, the file holds a {img.GetDimension()}D image"
            )
        uid = series_uid
        if uid is None and name.endswith(".mhd"):
            uid = path.name[: -len(".mhd")]
        volume = CTVolume.from_sitk(img, series_uid=uid, source=path)
        if name.endswith(".mhd"):
            check_voxel_order(volume, path)
    validate_volume(volume, path)
    return volume


def first_line(err: Exception) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


def validate_volume(volume: CTVolume, path: Path) -> None:
    spacing = np.asarray(volume.spacing)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise VolumeReadError(
            f"{path}: invalid voxel spacing {tuple(volume.spacing)} (must be finite and > 0); fix ElementSpacing / "
            "pixdim / PixelSpacing+slice positions in the file"
        )
    if not np.all(np.isfinite(volume.origin)):
        raise VolumeReadError(
            f"{path}: non-finite origin {tuple(volume.origin)}; fix Offset / origin in the file"
        )
    if abs(abs(np.linalg.det(volume.direction)) - 1.0) > 1e-3:
        raise VolumeReadError(
            f"{path}: direction matrix is not orthonormal (det {np.linalg.det(volume.direction):.4f}); "
            "fix TransformMatrix / orientation in the file"
        )
    if volume.array.size == 0:
        raise VolumeReadError(f"{path}: the volume has no voxels (shape {volume.array.shape})")
    if np.issubdtype(volume.array.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(volume.array)))
        if bad:
            raise VolumeReadError(
                f"{path}: {bad} voxel(s) are NaN or infinite; the file is corrupt, re-export or re-download it"
            )


def _neighbour_ratio(array: np.ndarray, axis: int, rng: np.random.Generator, n: int = 20000) -> float:
    """Mean |difference| of voxels next to each other along `axis`, over that of random voxel pairs."""
    flat = array.reshape(-1)
    shape = np.asarray(array.shape)
    index = [rng.integers(0, s, n) for s in shape]
    index[axis] = rng.integers(0, shape[axis] - 1, n)
    first = np.ravel_multi_index(index, array.shape)
    second = first + int(np.prod(shape[axis + 1 :]))
    neighbours = np.abs(flat[first].astype(np.float64) - flat[second]).mean()
    pairs = np.abs(
        flat[rng.integers(0, flat.size, n)].astype(np.float64) - flat[rng.integers(0, flat.size, n)]
    )
    return float(neighbours / max(pairs.mean(), 1e-9))


def check_voxel_order(volume: CTVolume, path: Path) -> None:
    """Refuse a volume whose header DimSize is in the wrong order although the data file's size fits it.

    The size check cannot see a permuted DimSize (``64 40 64`` for ``64 64 40``: same product). The data
    then still runs smoothly in file order (x neighbours stay x neighbours), but rows or slices no longer
    continue one another: voxels next to each other along y or z differ as much as random pairs. Real CT,
    even with thick slices, stays far from that; pure noise (smooth along no axis) is left alone.
    """
    array = volume.array
    if array.ndim != 3 or min(array.shape) < 4 or array.size < 4096:
        return
    rng = np.random.default_rng(0)
    x_ratio = _neighbour_ratio(array, 2, rng)
    if x_ratio > 0.5:
        return
    for axis, what in ((1, "rows (y)"), (0, "slices (z)")):
        ratio = _neighbour_ratio(array, axis, rng)
        if ratio > 0.8:
            dims = " ".join(str(n) for n in volume.size_xyz)
            raise VolumeReadError(
                f"{path}: DimSize {dims} looks permuted: neighbouring {what} do not continue one another "
                f"(difference {ratio:.2f} of random voxel pairs, along x {x_ratio:.2f}) although the data file "
                "has the right size; fix DimSize (x y z order) in the header"
            )


def parse_mhd_header(path: str | Path) -> dict[str, str]:
    """The key/value pairs of a MetaImage header, values as written (keys case preserved)."""
    path = Path(path)
    fields: dict[str, str] = {}
    with open(path, "rb") as fh:
        for raw_line in fh:
            line = raw_line.decode("latin-1").strip()
            if not line or "=" not in line:
                continue
            key, value = line.split("=", 1)
            fields[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                break  # binary data may follow in LOCAL files
    return fields


def _check_mhd(path: Path) -> tuple[Path, np.dtype, list[int]] | None:
    """Validate an MHD header and its data file before SimpleITK sees them, with messages that say what to do.

    Returns:
        For zlib-compressed single-channel data of a known type: (data file, dtype, DimSize), so that
        `read_volume` decodes it itself (SimpleITK only prints a warning for a corrupt .zraw and returns
        garbage voxels). None otherwise.
    """
    try:
        fields = parse_mhd_header(path)
    except OSError as err:
        raise VolumeReadError(f"{path}: cannot read the header ({err})") from err
    missing = [k for k in ("NDims", "DimSize", "ElementType", "ElementDataFile") if k not in fields]
    if missing:
        raise VolumeReadError(f"{path}: not a MetaImage header, missing {', '.join(missing)}")
    try:
        dims = [int(v) for v in fields["DimSize"].split()]
    except ValueError as err:
        raise VolumeReadError(f"{path}: DimSize {fields['DimSize']!r} is not a list of integers") from err
    if any(d <= 0 for d in dims):
        raise VolumeReadError(f"{path}: DimSize {dims} has a zero or negative size")
    if "ElementSpacing" in fields or "ElementSize" in fields:
        text = fields.get("ElementSpacing", fields.get("ElementSize", ""))
        try:
            spacing = [float(v) for v in text.split()]
        except ValueError as err:
            raise VolumeReadError(f"{path}: ElementSpacing {text!r} is not numeric") from err
        if not all(np.isfinite(s) and s > 0 for s in spacing):
            raise VolumeReadError(
                f"{path}: invalid voxel spacing ElementSpacing = {text} (must be finite and > 0); fix the header"
            )
    data_name = fields["ElementDataFile"]
    if data_name.upper() == "LOCAL" or data_name.upper().startswith("LIST") or "%" in data_name:
        return None  # data inside the header file or a file pattern: let SimpleITK check it
    data_path = path.parent / data_name
    if not data_path.exists():
        raise VolumeReadError(
            f"{path}: ElementDataFile {data_name} not found (looked for {data_path}); copy the matching "
            f".raw/.zraw next to the header or fix ElementDataFile"
        )
    actual = data_path.stat().st_size
    compressed = fields.get("CompressedData", "False").strip().lower() == "true"
    if compressed:
        size_text = fields.get("CompressedDataSize")
        if size_text is not None and int(size_text) != actual:
            raise VolumeReadError(
                f"{data_path}: compressed data size mismatch, header says {int(size_text)} bytes, file has "
                f"{actual} bytes; the file is truncated or corrupt, re-download or re-export it"
            )
    met = fields["ElementType"].strip()
    channels = int(fields.get("ElementNumberOfChannels", "1"))
    if met not in _MET_TYPES:
        return None  # exotic element types: SimpleITK decides
    if compressed:
        if channels != 1 or len(dims) != 3:
            return None
        dtype = _MET_TYPES[met].newbyteorder(
            ">" if fields.get("BinaryDataByteOrderMSB", "False") == "True" else "<"
        )
        return data_path, dtype, dims
    expected = int(np.prod(dims)) * _MET_TYPES[met].itemsize * channels
    header_size = int(fields.get("HeaderSize", "0"))
    if header_size == -1:
        ok = actual >= expected
    else:
        expected += max(header_size, 0)
        ok = actual == expected
    if not ok:
        raise VolumeReadError(
            f"{data_path}: size mismatch, expected {expected} bytes for DimSize {dims} x {met} but the file has "
            f"{actual} bytes; the file is truncated or does not belong to {path.name}, re-download or re-export it"
        )
    return None


def _read_compressed_mhd(path: Path, data_path: Path, dtype: np.dtype, dims: list[int]) -> sitk.Image:
    """Decode a .zraw ourselves (integrity checked) and take the geometry from SimpleITK's header parser."""
    info = sitk.ImageFileReader()
    info.SetFileName(str(path))
    info.ReadImageInformation()
    expected = int(np.prod(dims)) * dtype.itemsize
    try:
        payload = zlib.decompressobj(wbits=47).decompress(data_path.read_bytes())  # zlib or gzip stream
    except zlib.error as err:
        raise VolumeReadError(
            f"{data_path}: corrupt compressed data ({err}); the file is damaged, re-download or re-export it"
        ) from err
    if len(payload) != expected:
        raise VolumeReadError(
            f"{data_path}: decompresses to {len(payload)} bytes, expected {expected} for DimSize {dims}; the file "
            "is truncated or does not belong to its header, re-download or re-export it"
        )
    array = np.frombuffer(payload, dtype=dtype).reshape(dims[::-1]).astype(dtype.newbyteorder("="))
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(info.GetSpacing())
    img.SetOrigin(info.GetOrigin())
    img.SetDirection(info.GetDirection())
    return img


# ----------------------------------------------------------------------------------------------- writing


def format_float(value: float) -> str:
    """Shortest text that reads back to the same float64 ("-195", "0.7617189884185791")."""
    return np.format_float_positional(float(value), trim="-") if np.isfinite(value) else repr(float(value))


def _orientation_code(direction: np.ndarray) -> str:
    """ITK's AnatomicalOrientation letters: per index axis, the dominant world axis and its sign (RAI = identity)."""
    letters = (("R", "L"), ("A", "P"), ("I", "S"))
    code = []
    for j in range(3):
        col = direction[:, j]
        k = int(np.argmax(np.abs(col)))
        code.append(letters[k][0] if col[k] >= 0 else letters[k][1])
    return "".join(code)


def mhd_header_text(volume: CTVolume, data_file: str, compressed_size: int | None = None) -> str:
    """The MetaImage header LUNA16 ships, in its key order, for `volume` stored in `data_file`."""
    dtype = np.dtype(volume.array.dtype).newbyteorder("=")
    if dtype not in _DTYPE_TO_MET:
        raise ValueError(
            f"cannot write element type {volume.array.dtype} to MHD; use int16, float32 or uint8"
        )
    z, y, x = volume.shape
    lines = [
        "ObjectType = Image",
        "NDims = 3",
        "BinaryData = True",
        "BinaryDataByteOrderMSB = False",
        f"CompressedData = {'True' if compressed_size is not None else 'False'}",
    ]
    if compressed_size is not None:
        lines.append(f"CompressedDataSize = {compressed_size}")
    lines += [
        # MetaIO stores the direction column by column (the transpose of SimpleITK's row-major tuple).
        "TransformMatrix = " + " ".join(format_float(v) for v in volume.direction.T.ravel()),
        "Offset = " + " ".join(format_float(v) for v in volume.origin),
        "CenterOfRotation = 0 0 0",
        f"AnatomicalOrientation = {_orientation_code(volume.direction)}",
        "ElementSpacing = " + " ".join(format_float(v) for v in volume.spacing),
        f"DimSize = {x} {y} {z}",
        f"ElementType = {_DTYPE_TO_MET[dtype]}",
        f"ElementDataFile = {data_file}",
    ]
    return "\n".join(lines) + "\n"


def write_mhd(volume: CTVolume, path: str | Path, compress: bool = False) -> Path:
    """Write `volume` as a LUNA16-style `.mhd` header plus `.raw` (or zlib `.zraw`) data, atomically.

    The output is byte-for-byte deterministic: fixed key order, shortest round-tripping numbers,
    little-endian data, zlib level 6 for `.zraw`.

    Args:
        volume: the volume; int16, float32 or uint8 (also int8/uint16/int32/uint32/float64).
        path: the `.mhd` path; the data file gets the same stem.
        compress: write `CompressedData = True` with a `.zraw` file.

    Returns:
        The header path.
    """
    path = Path(path)
    if path.suffix.lower() != ".mhd":
        raise ValueError(f"{path}: write_mhd needs a .mhd path")
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.ascontiguousarray(volume.array)
    payload = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    data_path = path.with_suffix(".zraw" if compress else ".raw")
    compressed_size = None
    if compress:
        payload = zlib.compress(payload, 6)
        compressed_size = len(payload)
    header = mhd_header_text(volume, data_path.name, compressed_size)
    atomic.write_bytes(data_path, payload)
    atomic.write_bytes(path, header.encode("ascii"))
    return path


def write_nifti(volume: CTVolume, path: str | Path) -> Path:
    """Write `volume` as NIfTI (`.nii` or `.nii.gz`) through SimpleITK, atomically.

    NIfTI keeps spacing and the qform/sform in float32, so geometry round-trips to float32 precision
    (about 1e-5 mm for typical origins), voxels exactly.
    """
    path = Path(path)
    if not path.name.lower().endswith(_NIFTI_SUFFIXES):
        raise ValueError(f"{path}: write_nifti needs a .nii or .nii.gz path")
    suffix = ".nii.gz" if path.name.lower().endswith(".gz") else ".nii"
    with atomic.atomic_path(path, suffix=suffix) as tmp:
        sitk.WriteImage(volume.to_sitk(), str(tmp))
    return path
