"""The preprocessed cache: every scan once as 1 mm int16 HU + uint8 lung mask, with a JSON manifest.

Layout under the cache root::

    manifest.json              one entry per scan (below), rewritten atomically after every scan
    images/<uid>.npy           int16 HU on the resampled grid, (z, y, x) — memory-mappable
    lung_masks/<uid>.npy       uint8 0/1 lung mask on the same grid

A manifest entry holds the uid, patient id and fold; the new grid (shape, spacing, origin, direction) and
the original spacing and shape; SHA-256 checksums of both arrays; where the lung mask came from (the
dataset's own or computed); the input fingerprint; and the nodules and excluded findings in world mm
*and* in voxel (z, y, x) coordinates of the cached grid, with their diameters and sources.

Why this shape: plain `.npy` can be memory-mapped by every data loader worker, so training never decodes
MHD or resamples. Writes are atomic (temporary file + `os.replace`) and the manifest only learns about a scan
after both arrays are in place, so killing a build at any moment leaves a consistent cache, and the next
build skips every finished scan. A scan is rebuilt only when its input fingerprint changes: the sizes and
modification times of its input files, the SHA-256 of its header, and the hash of the settings (including
`ALGORITHM_VERSION`, bumped whenever the preprocessing itself changes). Annotations are not part of the
fingerprint: they are re-derived for every scan on every build (cheap, no pixels), so an edited
annotation CSV updates the manifest without re-resampling anything.

Where a cache lives (one rule for `lungdata prepare`, every datamodule and the lungcls patch cache): a
folder given explicitly (`--out`, `cache_dir`), else `cache/<dataset>-<8 hex of the resolved dataset
root>` under the working directory (`default_cache_dir`; the lungcls patch cache adds its kind and block
size: `cache/m3net-<dataset>-<hash>-<context>x<depth>`). Scans of a folder to predict on are cached by the
same rule with "predict" as the dataset and that folder as its root — `[<kind>-]predict-<hash of the
folder>[-<variant>]` beside the named cache folder, else in `cache/` (`predict_cache_dir`) — so predicting
never needs the training root.

A scan that cannot be read raises an error naming the file (strict mode) after the scans before it are
safely recorded; lenient mode logs it and moves on. Only one build may write a cache at a time (a lock file
holds the builder's pid; a second build waits for a live holder, up to `PreprocessedCache.lock_wait_s`; a lock
left by a killed build — its pid gone or a zombie — is taken over).

At scale, `build(..., shard=(i, n))` builds only every n-th scan (by sorted uid) so that n processes — a
SLURM array, several machines — fill one shared cache: each scan belongs to exactly one shard, whose lock
is `.lock-shard-<i>-of-<n>`, and every manifest update (sharded or not) is a read-modify-write of
`manifest.json` under an advisory `flock` of `manifest.lock`, so concurrent shards merge their entries
instead of overwriting each other's. The manifest holds no timings or host names: the cache a set of
shards writes is byte-identical to the one a single process writes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common import atomic, preprocess
from common import io as ct_io
from common.datasets.base import Nodule, ScanRecord
from common.datasets.geometry import ScanGeometry
from common.datasets.tables import RowPolicy, locate_in_scan

log = logging.getLogger(__name__)

__all__ = [
    "ALGORITHM_VERSION",
    "CACHE_ROOT",
    "BuildReport",
    "PreprocessedCache",
    "PrepareSettings",
    "default_cache_dir",
    "entry_geometry",
    "grid_geometry",
    "path_digest",
    "predict_cache_dir",
    "prepare_cache",
    "parse_shard",
    "prepare_volume",
    "shard_records",
]

#: where caches live when no folder is named (relative to the working directory)
CACHE_ROOT = Path("cache")


def path_digest(path: str | Path) -> str:
    """Eight hex digits naming a folder by its resolved path, for cache folders that must not collide."""
    return hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:8]


def default_cache_dir(
    dataset: str, root: str | Path, kind: str | None = None, variant: str | None = None
) -> Path:
    """The cache folder of a dataset root when none is named: `cache/[<kind>-]<dataset>-<hash of root>[-<variant>]`.

    `lungdata prepare` (without `--out`) and every datamodule (without `cache_dir`) call this, so the cache
    one prepares is the cache the other finds.
    """
    parts = [kind, dataset, path_digest(root), variant]
    return CACHE_ROOT / "-".join(p for p in parts if p)


def predict_cache_dir(
    cache_dir: str | Path | None,
    predict_root: str | Path,
    kind: str | None = None,
    variant: str | None = None,
) -> Path:
    """The cache of a folder of new scans, found without the training dataset's root.

    Named as `default_cache_dir` names a dataset called "predict" rooted at that folder
    (`[<kind>-]predict-<hash of the folder>[-<variant>]`), beside the named training cache folder or in
    `cache/`.
    """
    base = Path(cache_dir).parent if cache_dir else CACHE_ROOT
    return base / default_cache_dir("predict", predict_root, kind=kind, variant=variant).name


ALGORITHM_VERSION = 2
"""Bump when resampling, clipping or lung masking change in a way that changes cached arrays."""
MANIFEST_NAME = "manifest.json"
MANIFEST_LOCK = "manifest.lock"
LOCK_POLL_S = 0.5  # how often a waiting build looks at the lock again
IMAGE_DIR = "images"
MASK_DIR = "lung_masks"
FORMAT = "lungcad-preprocessed-cache"

ReadFn = Callable[..., ct_io.CTVolume]
#: How a user skips an unreadable scan, in the words of the commands they type.
SKIP_SCANS_FIX = (
    "to skip unreadable scans, pass --lenient (lungdata prepare) / --data.init_args.lenient true "
    "(lungdet, lungseg, lungcls)"
)


@dataclass(frozen=True)
class PrepareSettings:
    """What the cache is built with; its hash is part of every scan's fingerprint.

    Attributes:
        spacing: target voxel size (x, y, z) mm; CLAF resamples to 1 mm isotropic.
        order: interpolation order for images (3 = cubic B-spline as CLAF, 1 = linear).
        lung_mask: "auto" (the dataset's mask where the record has one, else computed), "computed" or
            "provided" (a record without a provided mask is an error).
        mask_threshold_hu: threshold of the computed lung mask (CLAF: −400 HU).
    """

    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    order: int = 3
    lung_mask: str = "auto"
    mask_threshold_hu: float = -400.0

    def __post_init__(self) -> None:
        if self.lung_mask not in ("auto", "computed", "provided"):
            raise ValueError(f"lung_mask must be 'auto', 'computed' or 'provided', not {self.lung_mask!r}")
        if self.order not in (1, 3):
            raise ValueError(f"image interpolation order must be 1 or 3, not {self.order}")
        spacing = tuple(float(s) for s in self.spacing)
        if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
            raise ValueError(f"spacing {self.spacing} must be three positive numbers")
        object.__setattr__(self, "spacing", spacing)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "spacing": list(self.spacing), "algorithm_version": ALGORITHM_VERSION}

    def digest(self) -> str:
        """SHA-256 of the canonical JSON of the settings (and the algorithm version)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


@dataclass
class BuildReport:
    """What one `build` did: uids built, skipped as up to date, and failed (lenient mode) with the reason."""

    built: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        return f"{len(self.built)} built, {len(self.skipped)} up to date, {len(self.failed)} failed"


# -------------------------------------------------------------------------------------- file helpers


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _input_files(record: ScanRecord, settings: PrepareSettings) -> tuple[list[Path], Path | None]:
    """The files a scan's cache entry depends on, and the one whose bytes are hashed (the header)."""
    files: list[Path] = []
    header: Path | None = None
    paths = [record.image_path]
    if _has_label_mask(record) and settings.lung_mask != "computed":
        paths.append(record.lung_mask_path)
    for i, path in enumerate(paths):
        path = Path(path)
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.is_file())
            continue
        files.append(path)
        if path.suffix.lower() == ".mhd":
            data = path.parent / ct_io.parse_mhd_header(path).get("ElementDataFile", "")
            if data.is_file() and data != path:
                files.append(data)
        if i == 0:
            header = path
    return files, header


def input_fingerprint(record: ScanRecord, settings: PrepareSettings) -> dict[str, Any]:
    """Sizes and mtimes of a scan's inputs, the SHA-256 of its header (or DICOM file list), the settings hash."""
    files, header = _input_files(record, settings)
    stats = []
    for path in files:
        try:
            st = path.stat()
        except FileNotFoundError:
            stats.append({"path": str(path), "missing": True})
            continue
        stats.append({"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    if header is not None and header.suffix.lower() == ".mhd" and header.is_file():
        header_sha = sha256_file(header)
    else:  # NIfTI and DICOM: the listing (names, sizes, mtimes) stands in for the header bytes
        header_sha = hashlib.sha256(json.dumps(stats, sort_keys=True).encode()).hexdigest()
    settings_sha = settings.digest()
    digest = hashlib.sha256(
        json.dumps([stats, header_sha, settings_sha], sort_keys=True).encode()
    ).hexdigest()
    return {"digest": digest, "files": stats, "header_sha256": header_sha, "settings_sha256": settings_sha}


# ---------------------------------------------------------------------------------------- annotations


def _finding_entries(
    findings: Iterable[Nodule],
    original: ScanGeometry,
    cached: ScanGeometry,
    uid: str,
    policy: RowPolicy,
) -> list[dict[str, Any]]:
    """Findings as manifest rows (world and cached-grid voxel coordinates); out-of-volume ones are bad rows."""
    rows = []
    for finding in findings:
        xyz = np.asarray(finding.world_xyz, dtype=np.float64)
        where = str(finding.extras.get("source", "annotation"))
        _, problem = locate_in_scan(original, xyz, where, "finding", f"scan {uid}")
        if problem:
            policy.bad_row(problem)
            continue
        row: dict[str, Any] = {
            "world_xyz": [float(v) for v in xyz],
            "voxel_zyx": [float(v) for v in cached.world_to_voxel(xyz)],
            "diameter_mm": float(finding.diameter_mm),
            "nodule_id": finding.nodule_id,
            "label": finding.label,
        }
        if "source" in finding.extras:
            row["source"] = str(finding.extras["source"])
        rows.append(row)
    return rows


def grid_geometry(shape_zyx, spacing, origin, direction) -> ScanGeometry:
    """A voxel grid as the manifest stores it (shape z, y, x; spacing and origin x, y, z; direction flat or
    3×3) as a `ScanGeometry`, so world ↔ voxel goes through the scan's direction like everywhere else."""
    direction = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    return ScanGeometry(
        size_xyz=tuple(int(n) for n in shape_zyx[::-1]),  # type: ignore[arg-type]
        spacing=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
        origin=tuple(float(o) for o in origin),  # type: ignore[arg-type]
        direction=tuple(tuple(float(v) for v in row) for row in direction),
    )


def entry_geometry(entry: dict[str, Any]) -> ScanGeometry:
    """The cached (resampled) grid of a manifest entry, or of any dict with shape, spacing, origin, direction."""
    return grid_geometry(entry["shape"], entry["spacing"], entry["origin"], entry["direction"])


def _annotations(record: ScanRecord, entry: dict[str, Any], strict: bool) -> dict[str, list]:
    original = grid_geometry(
        entry["original_shape"], entry["original_spacing"], entry["origin"], entry["direction"]
    )
    cached = entry_geometry(entry)
    policy = RowPolicy(strict, log)
    return {
        "nodules": _finding_entries(record.nodules, original, cached, record.uid, policy),
        "excluded": _finding_entries(record.excluded, original, cached, record.uid, policy),
    }


def _json_safe(extras: dict[str, Any]) -> dict[str, Any]:
    safe = {}
    for key, value in extras.items():
        try:
            json.dumps(value)
        except TypeError:
            continue
        safe[key] = value
    return safe


# ------------------------------------------------------------------------------------------- one scan


def _has_label_mask(record: ScanRecord) -> bool:
    """Whether the record's `lung_mask_path` is a label mask (LUNA16 style), not e.g. a lung-segmented CT copy.

    Adapters mark a provided file that is an image rather than labels with `extras["lung_segmented_ct"]`
    (the spatio-temporal dataset); label values other than LUNA16's 3/4 go in `extras["lung_mask_labels"]`.
    """
    return record.lung_mask_path is not None and not record.extras.get("lung_segmented_ct", False)


def _check_uid(uid: str) -> None:
    if not uid or uid.startswith(".") or "/" in uid or "\\" in uid or os.sep in uid:
        raise ValueError(f"scan uid {uid!r} cannot name a cache file; uids must be plain names")


SCAN_BLAS_THREADS = 1
"""BLAS threads of one scan's resampling. Fixed, because float32 matrix products round differently with
another thread count (±1 HU on a few hundred voxels of a scan): with it fixed, a scan's bytes do not depend
on `workers`, shards or the machine's core count, and `prepare_volume` (`lungcad analyze`) gives the very
bytes the cache holds. Parallelism comes from `workers` (one scan per process)."""


def clipped_hu(volume: ct_io.CTVolume) -> ct_io.CTVolume:
    """The scan as int16 HU with scanner padding mapped to air (``preprocess.clip_hu``): the cache's input."""
    hu = preprocess.clip_hu(volume.array)
    if hu.dtype != np.int16:
        hu = np.rint(hu).astype(np.int16)
    return volume.with_array(hu)


def resample_hu(volume: ct_io.CTVolume, settings: PrepareSettings) -> ct_io.CTVolume:
    """A `clipped_hu` scan on the cache grid: the array a cache entry's ``image`` file holds."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=SCAN_BLAS_THREADS):
        resampled = preprocess.resample_isotropic(
            volume, settings.spacing, order=settings.order, dtype=np.int16
        )
    # The cubic B-spline overshoots at sharp edges (air/FOV border, bone): clip again to the HU range.
    return resampled.with_array(preprocess.clip_hu(resampled.array))


def computed_lung_mask(resampled: ct_io.CTVolume, settings: PrepareSettings) -> np.ndarray:
    """The computed lung mask of a `resample_hu` scan (what the cache stores when no mask is provided)."""
    return preprocess.lung_mask(resampled, threshold_hu=settings.mask_threshold_hu)


def prepare_volume(volume: ct_io.CTVolume, settings: PrepareSettings) -> tuple[ct_io.CTVolume, np.ndarray]:
    """A new scan prepared in memory exactly as `preprocess_scan` caches it (computed lung mask): the
    resampled int16 HU volume and its uint8 lung mask. `lungcad analyze` uses it, so analysing a scan and
    caching it cannot drift apart."""
    resampled = resample_hu(clipped_hu(volume), settings)
    return resampled, computed_lung_mask(resampled, settings).astype(np.uint8, copy=False)


def preprocess_scan(
    record: ScanRecord,
    settings: PrepareSettings,
    root: str | Path,
    fingerprint: dict[str, Any],
    read_fn: ReadFn | None = None,
    strict: bool = True,
) -> dict[str, Any]:
    """Read, clip, resample and mask one scan, write its two arrays, and return its manifest entry.

    Runs in worker processes too, hence a plain function of picklable arguments.
    """
    started = time.perf_counter()
    root = Path(root)
    read_fn = read_fn or ct_io.read_volume
    volume = clipped_hu(read_fn(record.image_path, series_uid=record.series_uid))
    entry: dict[str, Any] = {
        "uid": record.uid,
        "patient_id": record.patient_id,
        "fold": record.fold,
        "series_uid": record.series_uid,
        "source": str(record.image_path),
        "original_shape": list(volume.shape),
        "original_spacing": list(volume.spacing),
        "origin": list(volume.origin),
        "direction": [float(v) for v in volume.direction.ravel()],
        "extras": _json_safe(record.extras),
    }
    # Annotations are checked against the scan before any pixel work, so a bad row fails fast.
    entry["shape"] = list(preprocess.resampled_shape(volume.shape, volume.spacing, settings.spacing))
    entry["spacing"] = list(settings.spacing)
    entry.update(_annotations(record, entry, strict))

    resampled = resample_hu(volume, settings)
    has_mask = _has_label_mask(record)
    use_provided = settings.lung_mask != "computed" and has_mask
    if settings.lung_mask == "provided" and not has_mask:
        raise FileNotFoundError(
            f"scan {record.uid} has no provided lung label mask and settings ask for provided masks; use "
            "lung_mask='auto' or 'computed'"
        )
    if use_provided:
        labels = tuple(record.extras.get("lung_mask_labels") or preprocess.LUNA16_LUNG_LABELS)
        mask = preprocess.load_provided_lung_mask(
            record.lung_mask_path, reference=resampled, lung_labels=labels
        ).array
    else:
        mask = computed_lung_mask(resampled, settings)

    image_rel = f"{IMAGE_DIR}/{record.uid}.npy"
    mask_rel = f"{MASK_DIR}/{record.uid}.npy"
    entry["image"] = image_rel
    entry["lung_mask"] = mask_rel
    entry["image_sha256"] = atomic.save_npy(root / image_rel, resampled.array)
    entry["lung_mask_sha256"] = atomic.save_npy(root / mask_rel, mask.astype(np.uint8, copy=False))
    entry["lung_mask_source"] = "provided" if use_provided else "computed"
    entry["lung_fraction"] = float(np.count_nonzero(mask)) / mask.size
    entry["input_fingerprint"] = fingerprint["digest"]
    entry["inputs"] = fingerprint["files"]
    entry["header_sha256"] = fingerprint["header_sha256"]
    entry["settings"] = settings.to_dict()
    entry["settings_sha256"] = fingerprint["settings_sha256"]
    # Timing is logged, not stored: the manifest must not depend on which process built the scan or how fast.
    log.debug("%s preprocessed in %.1f s", record.uid, time.perf_counter() - started)
    return entry


# ---------------------------------------------------------------------------------------------- cache


class PreprocessedCache:
    """A preprocessed-cache folder: build it from `ScanRecord`s, load scans from it.

    Args:
        root: the cache folder (created on first build).
    """

    #: how long a build waits for another live build of the same folder before it gives up (seconds)
    lock_wait_s: float = 6 * 3600.0

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    def _read_manifest(self) -> dict[str, Any]:
        if not self.manifest_path.is_file():
            return {"format": FORMAT, "version": 1, "scans": {}}
        try:
            data = json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{self.manifest_path} is not valid JSON ({err}); it was edited by hand or the disk is failing. "
                "Delete the cache folder and run `lungdata prepare` again."
            ) from err
        if data.get("format") != FORMAT:
            raise ValueError(f"{self.manifest_path} is not a lungcad preprocessed-cache manifest")
        return data

    @property
    def entries(self) -> dict[str, dict[str, Any]]:
        """uid → manifest entry of every cached scan."""
        return dict(self._read_manifest()["scans"])

    @property
    def uids(self) -> list[str]:
        return sorted(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, uid: object) -> bool:
        return uid in self.entries

    def entry(self, uid: str) -> dict[str, Any]:
        entries = self.entries
        if uid not in entries:
            raise KeyError(
                f"scan {uid!r} is not in the cache {self.root}; run `lungdata prepare` for its dataset first"
            )
        return entries[uid]

    def load(
        self, uid: str, mmap: bool = True, verify: bool = False
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """One cached scan: (int16 HU image, uint8 lung mask, manifest entry).

        Args:
            uid: scan uid.
            mmap: memory-map the arrays read-only (cheap for data-loader workers) instead of reading them.
            verify: recompute the SHA-256 of both files and compare with the manifest.
        """
        entry = self.entry(uid)
        arrays = []
        for key in ("image", "lung_mask"):
            path = self.root / entry[key]
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} listed in {self.manifest_path} is missing; rerun `lungdata prepare` to rebuild it"
                )
            if verify and sha256_file(path) != entry[f"{key}_sha256"]:
                raise ValueError(f"{path}: checksum differs from the manifest; rerun `lungdata prepare`")
            array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
            if list(array.shape) != entry["shape"]:
                raise ValueError(f"{path}: shape {array.shape} differs from the manifest's {entry['shape']}")
            arrays.append(array)
        return arrays[0], arrays[1], entry

    # ------------------------------------------------------------------------------------------ build

    @contextlib.contextmanager
    def _lock(self, name: str = ".lock") -> Iterator[None]:
        """Hold the build lock; a live build holding it is waited for (``lock_wait_s``), not failed.

        Two runs started together on one cache (two sweep agents, two variants trained in parallel) both
        check the cache first: the second waits for the first's check or build, then finds the scans done.
        The lock file appears with its holder's pid already in it (a hard link of a written temporary), so a
        reader never sees it empty; taking over a dead holder's lock happens under the manifest's `flock`,
        so two builders finding the same dead lock cannot both take it.
        """
        lock = self.root / name
        deadline = time.monotonic() + self.lock_wait_s
        announced = False
        while True:
            pid = self._try_lock(lock)
            if pid is None:
                break
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"{self.root} is being written by another build (pid {pid}); wait for it or stop it"
                )
            if not announced:
                log.info("%s is being written by another build (pid %d); waiting for it", self.root, pid)
                announced = True
            time.sleep(LOCK_POLL_S)
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)

    def _try_lock(self, lock: Path) -> int | None:
        """Create `lock` holding this process's pid: None when taken, else the live holder's pid."""
        own = lock.with_name(f"{lock.name}{atomic.TMP_MARKER}{os.getpid()}")
        while True:  # a holder's clean-up of stale temporaries may remove `own` before it is linked
            own.write_text(str(os.getpid()))
            try:
                with self._manifest_lock():
                    if not _link(own, lock):
                        try:
                            pid = int(lock.read_text().strip() or 0)
                        except (OSError, ValueError):
                            pid = 0
                        if pid and pid != os.getpid() and _alive(pid):
                            return pid
                        lock.unlink(missing_ok=True)  # left behind by a killed build
                        _link(own, lock)
                    return None
            except FileNotFoundError:
                continue
            finally:
                own.unlink(missing_ok=True)

    def _remove_stale_temporaries(self, uids: Iterable[str] | None = None) -> None:
        """Delete temporary files of killed writers: all of them, or (a shard) only those of `uids`."""
        if uids is None:
            patterns = [f".*{atomic.TMP_MARKER}*"]
            folders = (self.root, self.root / IMAGE_DIR, self.root / MASK_DIR)
        else:  # other shards may be writing their own scans right now
            patterns = [f".{uid}.npy.*{atomic.TMP_MARKER}*" for uid in uids]
            folders = (self.root / IMAGE_DIR, self.root / MASK_DIR)
        for folder in folders:
            for pattern in patterns:
                for tmp in folder.glob(pattern):
                    tmp.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _manifest_lock(self) -> Iterator[None]:
        """Exclusive advisory lock around a read-modify-write of the manifest (between shards and machines).

        `flock` is released by the kernel when its holder dies, so a killed shard never leaves it stale; on
        NFS (v4, or v3 with lockd), Lustre (mounted with `flock`) and GPFS it holds across machines.
        """
        with open(self.root / MANIFEST_LOCK, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _merge_into_manifest(self, entries: dict[str, dict[str, Any]]) -> None:
        """Add or replace `entries` in the manifest on disk, keeping every other builder's entries."""
        with self._manifest_lock():
            manifest = self._read_manifest()
            manifest["scans"].update(entries)
            atomic.write_json(self.manifest_path, manifest, fsync=True)

    def _files_intact(self, entry: dict[str, Any]) -> bool:
        for key in ("image", "lung_mask"):
            path = self.root / entry.get(key, "")
            if not path.is_file():
                return False
            try:
                header_shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
            except (ValueError, OSError):
                return False
            if list(header_shape) != entry["shape"]:
                return False
        return True

    def build(
        self,
        records: Iterable[ScanRecord],
        settings: PrepareSettings | None = None,
        read_fn: ReadFn | None = None,
        workers: int = 1,
        strict: bool = True,
        shard: tuple[int, int] | None = None,
    ) -> BuildReport:
        """Preprocess every record not already cached with the same inputs and settings.

        Args:
            records: the scans (e.g. `LUNA16Dataset(root).records`).
            settings: preprocessing settings; default 1 mm cubic B-spline with provided-or-computed masks.
            read_fn: volume reader `(path, series_uid=...) -> CTVolume`; default `common.io.read_volume`.
            workers: scans processed in parallel (processes), one BLAS thread each (`SCAN_BLAS_THREADS`).
            strict: a bad scan stops the build with its error (default); lenient logs it and continues.
            shard: (i, n): build only shard i of n (`shard_records`); n such builds, in any order or at the
                same time, on one machine or several sharing the folder, give the cache one build gives.

        Returns:
            What was built, skipped and (lenient) failed. The manifest on disk already holds every success.
        """
        settings = settings or PrepareSettings()
        records = list(records)
        uids = [r.uid for r in records]
        duplicates = sorted(uid for uid, count in Counter(uids).items() if count > 1)
        if duplicates:
            raise ValueError(
                f"records contain duplicate uids {duplicates[:5]}; every scan must have its own uid"
            )
        for uid in uids:
            _check_uid(uid)
        if shard is not None:
            records = shard_records(records, *shard)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / IMAGE_DIR).mkdir(exist_ok=True)
        (self.root / MASK_DIR).mkdir(exist_ok=True)
        report = BuildReport()
        lock_name = ".lock" if shard is None else f".lock-shard-{shard[0]}-of-{shard[1]}"
        with self._lock(lock_name):
            self._remove_stale_temporaries(None if shard is None else [r.uid for r in records])
            scans = self._read_manifest()["scans"]
            todo: list[tuple[ScanRecord, dict[str, Any]]] = []
            changed: dict[str, dict[str, Any]] = {}
            for record in records:
                fingerprint = input_fingerprint(record, settings)
                entry = scans.get(record.uid)
                if (
                    entry
                    and entry.get("input_fingerprint") == fingerprint["digest"]
                    and self._files_intact(entry)
                ):
                    refreshed = _annotations(record, entry, strict)
                    refreshed["patient_id"], refreshed["fold"] = record.patient_id, record.fold
                    if any(entry.get(k) != v for k, v in refreshed.items()):
                        changed[record.uid] = {**entry, **refreshed}
                    report.skipped.append(record.uid)
                else:
                    todo.append((record, fingerprint))
            if changed:
                self._merge_into_manifest(changed)
            if report.skipped:
                log.info("%d scan(s) already cached with the same inputs and settings", len(report.skipped))

            def done(entry: dict[str, Any]) -> None:
                self._merge_into_manifest({entry["uid"]: entry})
                report.built.append(entry["uid"])
                log.info(
                    "[%d/%d] %s: %s -> %s",
                    len(report.built) + len(report.failed), len(todo), entry["uid"],
                    "x".join(map(str, entry["original_shape"])), "x".join(map(str, entry["shape"])),
                )  # fmt: skip

            def failed(record: ScanRecord, err: Exception) -> None:
                if strict:
                    if isinstance(err, ct_io.VolumeReadError):
                        raise ct_io.VolumeReadError(f"{err}; {SKIP_SCANS_FIX}") from None
                    raise err
                log.error("skipped scan %s: %s", record.uid, err)
                report.failed[record.uid] = str(err)

            if workers <= 1 or len(todo) <= 1:
                for record, fingerprint in todo:
                    try:
                        entry = preprocess_scan(record, settings, self.root, fingerprint, read_fn, strict)
                    except (ValueError, OSError, RuntimeError) as err:
                        failed(record, err)
                        continue
                    done(entry)
            else:
                self._build_parallel(todo, settings, read_fn, workers, strict, done, failed)
        return report

    def _build_parallel(self, todo, settings, read_fn, workers, strict, done, failed) -> None:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            pending = {
                pool.submit(
                    preprocess_scan, record, settings, self.root, fingerprint, read_fn, strict
                ): record
                for record, fingerprint in todo
            }
            try:
                while pending:
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        record = pending.pop(future)
                        try:
                            entry = future.result()
                        except (ValueError, OSError, RuntimeError) as err:
                            failed(record, err)
                            continue
                        done(entry)
            except BaseException:
                for future in pending:
                    future.cancel()
                raise


def _link(source: Path, target: Path) -> bool:
    """Hard-link `target` to `source`; False when `target` exists (atomic on POSIX and NFS)."""
    try:
        os.link(source, target)
    except FileExistsError:
        return False
    return True


def _alive(pid: int) -> bool:
    """Whether `pid` is a running process; a zombie (killed, not yet reaped by its parent) is not.

    Right after ``kill -9`` of a build, its pid stays a zombie until the parent (a shell, a test, a job
    runner) waits for it; ``os.kill(pid, 0)`` still succeeds then, so the state in /proc decides.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): trust os.kill
    state = stat.rsplit(")", 1)[-1].split()[:1]
    return state not in (["Z"], ["X"], ["x"])


def parse_shard(text: str) -> tuple[int, int]:
    """ "I/N" (0 ≤ I < N) as (I, N); the form `--shard` takes, e.g. `$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT`."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        index, count = -1, 0
    if not 0 <= index < count:
        raise ValueError(f"--shard {text!r}: give I/N with 0 <= I < N, e.g. --shard 0/4 (SLURM: array 0-3)")
    return index, count


def shard_records(records: Iterable[ScanRecord], index: int, count: int) -> list[ScanRecord]:
    """Shard `index` of `count`: every `count`-th record in sorted-uid order, starting at `index`.

    Sorting makes the split independent of the order the dataset lists its scans in, so every shard —
    on any machine — agrees on who owns which scan; neighbours in uid order go to different shards.
    """
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: the index must lie in [0, {count})")
    ordered = sorted(records, key=lambda r: r.uid)
    return ordered[index::count]


def prepare_cache(
    records: Iterable[ScanRecord],
    out: str | Path,
    settings: PrepareSettings | None = None,
    workers: int = 1,
    strict: bool = True,
) -> PreprocessedCache:
    """Build (or bring up to date) the cache at `out`; what a DataModule's `prepare_data()` calls."""
    cache = PreprocessedCache(out)
    report = cache.build(records, settings, workers=workers, strict=strict)
    log.info("preprocessed cache %s: %s", cache.root, report.summary())
    return cache
