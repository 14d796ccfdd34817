"""Nodule patches at native resolution for M³Net: crop geometry and the per-nodule patch cache.

M³Net (Li et al., preprint 2025 §4.3) reads every nodule as nested crops of the *original* scan: native voxel spacing
(no resampling), native HU (rescale slope/intercept applied, nothing else), centred on the nodule centroid
averaged over the readers, "with boundary control". The shared preprocessed cache (`common.cache`) holds
scans resampled to 1 mm, so it cannot serve these patches. Instead each scan is read once through its
dataset adapter and `common.io.read_volume`, and one *context block* per nodule is stored:

```
<cache_dir>/
  patch_manifest.json     settings, per scan its input fingerprint and its nodules' patch files
  nodules.csv             one row per nodule (key, uid, patient_id, label, diameter, ratings, centre, file)
  patches/<key>.npz       "block": int16 HU, (context_depth, context, context) around the centroid
```

The block is larger than the largest crop so that in-plane rotation and small shifts of the augmentation
(`lungcls.data.PatchAugmentation`) see real anatomy in the corners instead of fill: with the default
margins a 96 × 96 × 56 crop gets a 136 × 136 × 64 block (136 ≥ 96·√2). Every scale is then cut from the
same (augmented) block around the same centre (`nested_crops`), so the three scales always show the same
anatomy, nested.

Boundary control. A nodule near the edge of the scan needs voxels outside it. ``boundary="shift"`` (the
default) moves the block inward just enough to stay inside the scan, as the reference code does, and
records the nodule's offset from the block centre (``offset_zyx``) so crops remain centred on the nodule
whenever the shifted block allows it; ``boundary="pad"`` keeps the block centred and fills the outside
with air (−1024 HU). Where the scan is smaller than the block (fewer slices than the block depth), the
rest is filled with air in both modes.

HU: ``common.preprocess.clip_hu`` maps scanner padding (≤ −2000 HU) to air and clamps to the 12-bit range;
otherwise values are untouched (the paper applies no windowing or normalisation; the datamodule offers
it as an option).

A scan is re-read only when its input files change (``common.cache.input_fingerprint``), when the patch
settings change (they are part of the cache folder's manifest), or when one of its nodule files is missing
or its centre moved. Labels, ratings and patient ids are re-derived from the adapter on every build
(cheap: no pixels), so a relabelled nodule table never needs a re-crop. Files are written atomically and
the manifest after every scan, so an interrupted build resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common import atomic
from common import io as ct_io
from common.cache import PrepareSettings, input_fingerprint
from common.datasets.base import Nodule, ScanRecord
from common.datasets.tables import RowPolicy
from common.preprocess import HU_MIN, clip_hu

log = logging.getLogger(__name__)

__all__ = [
    "AIR_HU",
    "BOUNDARIES",
    "NODULE_COLUMNS",
    "PATCH_CACHE_VERSION",
    "PatchCache",
    "PatchSettings",
    "context_for",
    "crop_block",
    "nested_crops",
    "nodule_key",
]

PATCH_CACHE_VERSION = 1
"""Bump when the cropping itself changes so that existing patch caches are rebuilt."""
AIR_HU = HU_MIN
BOUNDARIES = ("shift", "pad")
MANIFEST_NAME = "patch_manifest.json"
TABLE_NAME = "nodules.csv"
PATCH_DIR = "patches"
NODULE_COLUMNS = (
    "key",
    "uid",
    "patient_id",
    "nodule_id",
    "label",
    "diameter_mm",
    "n_readers",
    "malignancy_mean",
    "world_x",
    "world_y",
    "world_z",
    "centre_z",
    "centre_y",
    "centre_x",
    "spacing_x",
    "spacing_y",
    "spacing_z",
    "offset_z",
    "offset_y",
    "offset_x",
    "file",
)

ReadFn = Callable[[ScanRecord], ct_io.CTVolume]


@dataclass(frozen=True)
class PatchSettings:
    """How context blocks are cut; part of the cache's identity.

    Attributes:
        context: in-plane size of the stored block (voxels, square).
        context_depth: slices of the stored block.
        boundary: "shift" or "pad" (module docstring).
    """

    context: int
    context_depth: int
    boundary: str = "shift"

    def __post_init__(self) -> None:
        if self.context < 1 or self.context_depth < 1:
            raise ValueError(f"context sizes must be positive, got {self.context} × {self.context_depth}")
        if self.boundary not in BOUNDARIES:
            raise ValueError(f"boundary must be one of {BOUNDARIES}, got {self.boundary!r}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "version": PATCH_CACHE_VERSION}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def context_for(
    max_size: int, depth: int, rotation: bool = True, max_shift: int = 4, z_margin: int = 4
) -> tuple[int, int]:
    """Block size (in-plane, depth) that lets the largest crop rotate and shift without leaving the block.

    Args:
        max_size: largest in-plane crop (96 in the paper).
        depth: slices per crop (56).
        rotation: leave room for any in-plane rotation (√2 × the crop).
        max_shift: in-plane translation the augmentation may apply, voxels.
        z_margin: slices of room above and below for z shifts.
    """
    reach = max_size * math.sqrt(2.0) if rotation else float(max_size)
    context = int(math.ceil(reach)) + 2 * max_shift
    context += context % 2  # even sizes keep integer centres for even crops
    return context, depth + 2 * z_margin


def nodule_key(uid: str, nodule: Nodule, index: int) -> str:
    """A file-safe, unique key of one nodule: the scan uid and the nodule's id (or its index)."""
    raw = f"{uid}_{nodule.nodule_id if nodule.nodule_id not in (None, '') else index}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", raw)


def crop_block(
    array: np.ndarray, centre_zyx: Sequence[float], shape: Sequence[int], boundary: str = "shift"
) -> tuple[np.ndarray, np.ndarray]:
    """Cut a block of `shape` (z, y, x) around a continuous voxel centre.

    The block's centre voxel is the rounded centroid (for even sizes the voxel just after the middle),
    so a crop of size s taken from the block centre holds the centroid voxel at index s // 2.

    Args:
        array: the scan, (z, y, x).
        centre_zyx: nodule centre, continuous voxel indices.
        shape: block size (z, y, x).
        boundary: "shift" moves the block inside the scan where it fits, "pad" keeps it centred.

    Returns:
        (block, offset): the block (outside voxels are `AIR_HU`) and the nodule centre's offset in voxels
        from the block centre (non-zero only where "shift" moved the block).
    """
    if boundary not in BOUNDARIES:
        raise ValueError(f"boundary must be one of {BOUNDARIES}, got {boundary!r}")
    shape_arr = np.asarray(shape, dtype=np.int64)
    dims = np.asarray(array.shape, dtype=np.int64)
    centre = np.floor(np.asarray(centre_zyx, dtype=np.float64) + 0.5).astype(np.int64)
    start = centre - shape_arr // 2
    if boundary == "shift":
        fits = shape_arr <= dims
        shifted = np.clip(start, 0, np.maximum(dims - shape_arr, 0))
        start = np.where(fits, shifted, start)
    offset = centre - (start + shape_arr // 2)
    block = np.full(tuple(int(s) for s in shape_arr), AIR_HU, dtype=array.dtype)
    lo = np.maximum(start, 0)
    hi = np.minimum(start + shape_arr, dims)
    if np.all(hi > lo):
        src = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        dst = tuple(slice(int(a - s), int(b - s)) for a, b, s in zip(lo, hi, start))
        block[dst] = array[src]
    return block, offset


def nested_crops(
    block: np.ndarray,
    sizes: Mapping[int, int],
    depth: int,
    offset_zyx: Sequence[int] = (0, 0, 0),
) -> dict[int, np.ndarray]:
    """Concentric crops of one block: scale key → `(depth, size, size)`.

    Every crop is centred on the same voxel (the block centre plus `offset_zyx`, clamped so the largest
    crop stays inside the block), which is what keeps the scales spatially consistent: the small crop is
    always the middle of the large one.

    Args:
        block: `(D, H, W)` context block (any dtype).
        sizes: scale key → in-plane size (e.g. {32: 32, 64: 64, 96: 96}).
        depth: slices per crop.
        offset_zyx: shift of the common centre from the block centre, voxels.
    """
    if not sizes:
        raise ValueError("no crop sizes given")
    big = max(sizes.values())
    need = np.array([depth, big, big])
    if np.any(need > np.asarray(block.shape)):
        raise ValueError(f"crops of {depth} × {big} × {big} do not fit the {block.shape} block")
    centre = np.asarray(block.shape) // 2 + np.asarray(offset_zyx, dtype=np.int64)
    half = need // 2
    centre = np.clip(centre, half, np.asarray(block.shape) - (need - half))
    out = {}
    for key, size in sizes.items():
        extent = np.array([depth, size, size])
        start = centre - extent // 2
        out[key] = block[tuple(slice(int(a), int(a + n)) for a, n in zip(start, extent))]
    return out


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def _default_read(record: ScanRecord) -> ct_io.CTVolume:
    return ct_io.read_volume(record.image_path, series_uid=record.series_uid)


def _nodule_row(record: ScanRecord, nodule: Nodule, key: str) -> dict[str, Any]:
    extras = nodule.extras
    return {
        "key": key,
        "uid": record.uid,
        "patient_id": record.patient_id,
        "nodule_id": "" if nodule.nodule_id is None else str(nodule.nodule_id),
        "label": -1 if nodule.label is None else int(nodule.label),
        "diameter_mm": float(nodule.diameter_mm),
        "n_readers": int(extras.get("n_readers", 0) or 0),
        "malignancy_mean": float(extras.get("malignancy_mean", float("nan"))),
        "world_x": float(nodule.world_xyz[0]),
        "world_y": float(nodule.world_xyz[1]),
        "world_z": float(nodule.world_xyz[2]),
    }


class PatchCache:
    """The per-nodule context blocks of one dataset (module docstring).

    Args:
        root: cache folder.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._table: pd.DataFrame | None = None

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    @property
    def table_path(self) -> Path:
        return self.root / TABLE_NAME

    def exists(self) -> bool:
        """Whether a completed build left a nodule table here."""
        return self.table_path.is_file() and self.manifest_path.is_file()

    def _manifest(self) -> dict[str, Any]:
        if not self.manifest_path.is_file():
            return {}
        try:
            return json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{self.manifest_path} is not valid JSON ({err}); delete the file to rebuild the patch cache"
            ) from err

    def settings(self) -> PatchSettings:
        """The settings the cache was built with."""
        manifest = self._manifest()
        if "settings" not in manifest:
            raise FileNotFoundError(
                f"no patch cache at {self.root}; run prepare_data() / `lungcls fit` first"
            )
        s = manifest["settings"]
        return PatchSettings(int(s["context"]), int(s["context_depth"]), str(s["boundary"]))

    @property
    def table(self) -> pd.DataFrame:
        """The nodule table (`NODULE_COLUMNS`), one row per cached nodule, in dataset order."""
        if self._table is None:
            if not self.table_path.is_file():
                raise FileNotFoundError(
                    f"no nodule table at {self.table_path}; run prepare_data() / `lungcls fit` first"
                )
            self._table = pd.read_csv(
                self.table_path, dtype={"uid": str, "patient_id": str, "nodule_id": str}
            )
            self._table["nodule_id"] = self._table["nodule_id"].fillna("")
        return self._table

    def load(self, key_or_file: str) -> np.ndarray:
        """The int16 context block of one nodule (by key or by its file name in the table)."""
        name = key_or_file if key_or_file.endswith(".npz") else f"{key_or_file}.npz"
        path = self.root / PATCH_DIR / name
        try:
            with np.load(path) as data:
                return data["block"]
        except (OSError, KeyError, ValueError) as err:
            raise ValueError(
                f"{path}: cannot read the nodule patch ({err}); delete it and run prepare_data() again"
            ) from err

    # ------------------------------------------------------------------------------------------ build
    def build(
        self,
        records: Iterable[ScanRecord],
        settings: PatchSettings,
        *,
        strict: bool = True,
        read_fn: ReadFn | None = None,
        keep: Callable[[ScanRecord, Nodule], bool] | None = None,
    ) -> pd.DataFrame:
        """Crop every nodule of `records` that is not cached yet; write the nodule table.

        Args:
            records: scans with their nodules (world mm centres).
            settings: block geometry.
            strict: a scan that cannot be read stops the build (after everything before it is saved);
                lenient mode logs it and leaves its nodules out.
            read_fn: scan reader (default `common.io.read_volume` on the record's image path and series).
            keep: nodule filter (size, readers, ...); rejected nodules are neither cropped nor listed.

        Returns:
            The nodule table.
        """
        read_fn = read_fn or _default_read
        policy = RowPolicy(strict, log)
        self.root.mkdir(parents=True, exist_ok=True)
        manifest = self._manifest()
        if manifest.get("settings") != settings.to_dict():
            if manifest:
                log.info("patch settings changed: re-cropping every nodule in %s", self.root)
            manifest = {"format": "lungcad-nodule-patches", "settings": settings.to_dict(), "scans": {}}
        scans: dict[str, Any] = manifest["scans"]
        block_shape = (settings.context_depth, settings.context, settings.context)
        fingerprint_settings = PrepareSettings()
        rows: list[dict[str, Any]] = []
        seen: set[str] = set()
        n_read = 0
        for record in records:
            nodules = [
                (nodule_key(record.uid, n, i), n)
                for i, n in enumerate(record.nodules)
                if keep is None or keep(record, n)
            ]
            if not nodules:
                continue
            if record.uid in seen:
                raise ValueError(f"scan uid {record.uid!r} occurs twice in the dataset ({record.image_path})")
            seen.add(record.uid)
            digest = input_fingerprint(record, fingerprint_settings)["digest"]
            entry = scans.get(record.uid, {})
            cached = entry.get("nodules", {}) if entry.get("digest") == digest else {}
            todo = [
                (k, n)
                for k, n in nodules
                if k not in cached
                or not (self.root / PATCH_DIR / cached[k]["file"]).is_file()
                or not np.allclose(cached[k]["world_xyz"], n.world_xyz, atol=1e-3)
            ]
            if todo:
                try:
                    volume = read_fn(record)
                except (OSError, ValueError, RuntimeError) as err:
                    policy.bad_row(
                        f"{record.image_path}: cannot read scan {record.uid} for nodule patches ({err})",
                        fix="pass lenient=True to skip such scans",
                    )
                    continue
                n_read += 1
                array = clip_hu(volume.array)
                cached = {k: v for k, v in cached.items() if k in {key for key, _ in nodules}}
                for key, nodule in todo:
                    centre = volume.world_to_voxel(nodule.world_xyz)[0]
                    if not volume.contains_voxel(centre[None])[0]:
                        policy.bad_row(
                            f"{record.image_path}: nodule {nodule.nodule_id or key} at world "
                            f"{tuple(round(v, 1) for v in nodule.world_xyz)} lies outside the scan",
                            fix="check the annotation table, or skip such rows with --data.init_args.lenient true",
                        )
                        continue
                    block, offset = crop_block(array, centre, block_shape, settings.boundary)
                    file = f"{key}.npz"
                    atomic.write_bytes(self.root / PATCH_DIR / file, _npz_bytes(block=block), fsync=True)
                    cached[key] = {
                        "file": file,
                        "world_xyz": [float(v) for v in nodule.world_xyz],
                        "centre_zyx": [float(v) for v in centre],
                        "offset_zyx": [int(v) for v in offset],
                        "spacing_xyz": [float(v) for v in volume.spacing],
                    }
                scans[record.uid] = {"digest": digest, "nodules": cached}
                self._write_manifest(manifest)
            for key, nodule in nodules:
                if key not in cached:
                    continue
                info = cached[key]
                row = _nodule_row(record, nodule, key)
                row.update(zip(("centre_z", "centre_y", "centre_x"), info["centre_zyx"]))
                row.update(zip(("spacing_x", "spacing_y", "spacing_z"), info["spacing_xyz"]))
                row.update(zip(("offset_z", "offset_y", "offset_x"), info["offset_zyx"]))
                row["file"] = info["file"]
                rows.append(row)
        for uid in set(scans) - seen:  # scans no longer in the dataset
            scans.pop(uid)
        self._write_manifest(manifest)
        table = pd.DataFrame(rows, columns=list(NODULE_COLUMNS))
        atomic.write_csv(self.table_path, table, fsync=True)
        self._table = None
        log.info(
            "nodule patches: %d nodules of %d scans (%d scans read) in %s",
            len(table),
            len(seen),
            n_read,
            self.root,
        )
        return table

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        atomic.write_json(self.manifest_path, manifest, fsync=True)
