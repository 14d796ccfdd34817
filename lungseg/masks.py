"""Nodule masks on the cache grid: a label volume per scan, built once beside the preprocessed cache.

The common cache (``common.cache``) holds the 1 mm image and lung mask of every scan but no nodule masks,
because only LIDC-IDRI (readers' outlines in the annotation database) and LNDb (per-reader mask files) have
them. GLANCE needs them on exactly the grid its slices come from, so the datamodule adds a sidecar folder
to the cache::

    <cache>/glance_nodule_masks/<uid>.npy    uint16 (z, y, x) on the cached grid, nodule k → label k
    <cache>/glance_nodule_masks/<uid>.json   labels ↔ manifest nodule ids, voxel counts, fingerprint

Masks come from the dataset adapter on the scan's original grid:

* LIDC-IDRI — :meth:`common.datasets.lidc.LIDCDataset.consensus_mask` of each clustered nodule at the
  agreement ``level`` (default 50 %, pylidc's consensus);
* LNDb — :meth:`common.datasets.lndb.LNDbDataset.finding_mask` of each merged finding at the same level.

Each nodule's box is carried onto the cached grid (same origin and direction, cache index = original index
× original spacing / cache spacing) by linear interpolation of the binary mask and a 0.5 threshold — the
partial-volume rule, gentler on 2.5 mm slices than nearest neighbour. Later nodules do not overwrite
earlier ones where two touch.

Rebuilding: the JSON stores a fingerprint of the cache entry (its input fingerprint and shape), the
dataset, the agreement level, :data:`MASK_VERSION` and the nodule list, so an unchanged scan is skipped and
a changed one rebuilt. Files are written atomically (``common.atomic``), the JSON last, so an
interrupted build never leaves a label volume that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import scipy.ndimage as ndi

from common import atomic
from common.cache import PreprocessedCache
from common.datasets.base import ScanDataset, ScanRecord

log = logging.getLogger(__name__)

__all__ = ["MASK_DATASETS", "MASK_DIR", "MASK_VERSION", "NoduleMaskStore", "transfer_box_mask"]

MASK_DIR = "glance_nodule_masks"
MASK_VERSION = 1
"""Bump when the mask derivation changes (forces a rebuild)."""
MASK_DATASETS = ("lidc", "lndb")
"""Datasets whose adapters provide nodule masks; the others are detection-only for GLANCE."""


def transfer_box_mask(
    mask: np.ndarray,
    start_zyx: Iterable[int],
    src_spacing_xyz: Iterable[float],
    dst_spacing_xyz: Iterable[float],
    dst_shape_zyx: Iterable[int],
) -> tuple[np.ndarray, tuple[int, int, int]] | None:
    """Carry a binary mask box from an original grid onto a resampled grid with the same origin/direction.

    Args:
        mask: boolean box (z, y, x) on the source grid.
        start_zyx: index of the box's first voxel on the source grid.
        src_spacing_xyz / dst_spacing_xyz: spacings (x, y, z) of the two grids.
        dst_shape_zyx: shape of the destination grid.

    Returns:
        ``(box, start)`` on the destination grid, or ``None`` when nothing survives (mask thinner than half
        a destination voxel everywhere, or outside the grid).
    """
    mask = np.asarray(mask, dtype=bool)
    start = np.asarray(list(start_zyx), dtype=np.float64)
    src = np.asarray(list(src_spacing_xyz), dtype=np.float64)[::-1]
    dst = np.asarray(list(dst_spacing_xyz), dtype=np.float64)[::-1]
    shape = np.asarray(list(dst_shape_zyx), dtype=np.int64)
    if not mask.any():
        return None
    # One voxel of background around the box, so linear interpolation reaches zero beyond every face even
    # for a one-slice-thick box (scipy's "constant" mode gives cval for any point outside a size-1 axis).
    mask = np.pad(mask, 1)
    start = start - 1
    ratio = dst / src  # source index per destination index
    lo = np.floor((start - 0.5) / ratio).astype(np.int64)
    hi = np.ceil((start + np.asarray(mask.shape) - 0.5) / ratio).astype(np.int64) + 1
    lo, hi = np.maximum(lo, 0), np.minimum(hi, shape)
    if np.any(hi <= lo):
        return None
    values = ndi.affine_transform(
        mask.astype(np.float32),
        ratio,
        offset=lo * ratio - start,
        output_shape=tuple(int(v) for v in hi - lo),
        order=1,
        mode="constant",
        cval=0.0,
    )
    out = values >= 0.5
    if not out.any():
        return None
    return out, (int(lo[0]), int(lo[1]), int(lo[2]))


class NoduleMaskStore:
    """The ``glance_nodule_masks`` sidecar of one preprocessed cache.

    Args:
        cache: the preprocessed cache the masks belong to.
        level: reader agreement for the consensus (0.5 = half of the readers who outlined the nodule).
    """

    def __init__(self, cache: PreprocessedCache, level: float = 0.5) -> None:
        if not 0.0 < level <= 1.0:
            raise ValueError(f"consensus level must lie in (0, 1], got {level}")
        self.cache = cache
        self.level = float(level)
        self.root = Path(cache.root) / MASK_DIR

    # ------------------------------------------------------------------ reading
    def meta(self, uid: str) -> dict[str, Any] | None:
        path = self.root / f"{uid}.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None

    def has(self, uid: str) -> bool:
        meta = self.meta(uid)
        return meta is not None and (self.root / f"{uid}.npy").is_file()

    def load(self, uid: str, mmap: bool = True) -> tuple[np.ndarray, dict[str, int]]:
        """The label volume of ``uid`` and its nodule id → label map.

        Raises:
            FileNotFoundError: the masks were never built (run the datamodule's ``prepare_data``).
        """
        meta = self.meta(uid)
        path = self.root / f"{uid}.npy"
        if meta is None or not path.is_file():
            raise FileNotFoundError(
                f"no nodule masks for scan {uid} under {self.root}; run `prepare_data()` of the GLANCE "
                "datamodule (or `lungseg fit`) once so they are built from the dataset's annotations"
            )
        labels = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        entry_shape = self.cache.entry(uid)["shape"]
        if list(labels.shape) != list(entry_shape):
            raise ValueError(
                f"{path}: mask shape {labels.shape} differs from the cached scan {entry_shape}; delete the "
                f"folder {self.root} and run prepare_data again"
            )
        return labels, {str(k): int(v) for k, v in meta["labels"].items()}

    # ------------------------------------------------------------------ building
    def fingerprint(self, entry: dict[str, Any], dataset: str) -> str:
        nodules = [(n.get("nodule_id"), [round(v, 3) for v in n["world_xyz"]]) for n in entry["nodules"]]
        key = [entry.get("input_fingerprint"), entry["shape"], dataset, self.level, MASK_VERSION, nodules]
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()

    def build(self, adapter: ScanDataset, dataset: str, strict: bool = True) -> dict[str, int]:
        """Build (or bring up to date) the masks of every cached scan of ``adapter``.

        Args:
            adapter: the opened dataset (``LIDCDataset`` or ``LNDbDataset``).
            dataset: its registry name (``"lidc"`` / ``"lndb"``).
            strict: an unreadable mask stops the build (default); lenient logs it and writes an empty mask.

        Returns:
            ``{"built": n, "skipped": m}``.
        """
        if dataset not in MASK_DATASETS:
            raise ValueError(
                f"dataset {dataset!r} has no nodule masks; GLANCE masks come from {MASK_DATASETS}"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        entries = self.cache.entries
        counts = {"built": 0, "skipped": 0}
        for record in adapter.records:
            entry = entries.get(record.uid)
            if entry is None:
                continue
            fingerprint = self.fingerprint(entry, dataset)
            meta = self.meta(record.uid)
            if meta is not None and meta.get("fingerprint") == fingerprint and self.has(record.uid):
                counts["skipped"] += 1
                continue
            labels, table = self._labels(adapter, dataset, record, entry, strict)
            atomic.save_npy(self.root / f"{record.uid}.npy", labels, fsync=True)
            body = {"fingerprint": fingerprint, "level": self.level, "dataset": dataset, **table}
            atomic.write_text(self.root / f"{record.uid}.json", json.dumps(body), fsync=True)
            counts["built"] += 1
        log.info(
            "GLANCE nodule masks in %s: %d built, %d up to date",
            self.root,
            counts["built"],
            counts["skipped"],
        )
        return counts

    def _source_masks(self, adapter: ScanDataset, dataset: str, record: ScanRecord, nodule) -> tuple:
        if dataset == "lidc":
            return adapter.consensus_mask(record.uid, nodule, level=self.level)
        full = adapter.finding_mask(record.uid, nodule, agreement=self.level)
        objects = ndi.find_objects(full.astype(np.uint8))
        if not objects or objects[0] is None:
            return np.zeros((0, 0, 0), dtype=bool), (0, 0, 0)
        box = objects[0]
        return full[box], tuple(s.start for s in box)

    def _labels(
        self, adapter: ScanDataset, dataset: str, record: ScanRecord, entry: dict[str, Any], strict: bool
    ) -> tuple[np.ndarray, dict[str, Any]]:
        shape = tuple(int(v) for v in entry["shape"])
        labels = np.zeros(shape, dtype=np.uint16)
        wanted = {str(n.get("nodule_id")) for n in entry["nodules"]}
        table: dict[str, int] = {}
        voxels: dict[str, int] = {}
        value = 0
        for nodule in record.nodules:
            nodule_id = str(nodule.nodule_id)
            if nodule_id not in wanted or nodule_id in table:
                continue
            value += 1
            table[nodule_id] = value
            try:
                mask, start = self._source_masks(adapter, dataset, record, nodule)
            except (KeyError, ValueError, OSError, RuntimeError) as err:
                if strict:
                    raise ValueError(f"{record.image_path}: nodule {nodule_id}: no mask ({err})") from err
                log.warning("scan %s nodule %s: no mask (%s); left empty", record.uid, nodule_id, err)
                voxels[nodule_id] = 0
                continue
            moved = transfer_box_mask(mask, start, entry["original_spacing"], entry["spacing"], shape)
            if moved is None:
                voxels[nodule_id] = 0
                continue
            box_mask, (z0, y0, x0) = moved
            region = labels[
                z0 : z0 + box_mask.shape[0], y0 : y0 + box_mask.shape[1], x0 : x0 + box_mask.shape[2]
            ]
            fill = box_mask & (region == 0)
            region[fill] = value
            voxels[nodule_id] = int(fill.sum())
        return labels, {"labels": table, "voxels": voxels}
