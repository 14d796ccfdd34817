"""Prepared scans as both CLAF stages see them: ``ScanReader`` over the preprocessed cache.

The cache (`common.cache`) holds 1 mm int16 HU + a uint8 lung mask per scan. Every network input is read
through ``ScanReader``:

* HU are windowed with ``CLAF_WINDOW`` ([−1200, 600] HU) to [0, 1];
* voxels outside the lung mask, dilated by ``lung_margin`` voxels (a cube of side 2·margin+1, i.e. the
  Chebyshev distance, computed by separable max-pooling), are set to the window value of ``outside_hu``
  (default 0 HU → 0.667, soft tissue: the chest wall keeps its brightness, so a juxta-pleural nodule
  still sits on a wall, but the wall, mediastinum and body lose every texture that could fire the
  detector — grt123 and DeepLung fill with the same tissue value);
* everything outside the scan is the same constant, so padded crops look like masked tissue.

``finding_array`` reads a manifest entry's nodules or excluded findings in world or cached-voxel space.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from common.cache import PreprocessedCache
from common.metrics.froc import UNKNOWN_DIAMETER_MM
from common.preprocess import CLAF_WINDOW

__all__ = [
    "DEFAULT_FILL",
    "DEFAULT_LUNG_MARGIN",
    "DEFAULT_OUTSIDE_HU",
    "ScanReader",
    "dilate_mask",
    "fill_value",
    "finding_array",
    "finding_rows",
    "sized_diameters",
]

DEFAULT_OUTSIDE_HU = 0.0
DEFAULT_LUNG_MARGIN = 5
_SCAN_LRU = 32


def fill_value(
    window: Sequence[float] = CLAF_WINDOW,
    mask_outside_lung: bool = True,
    outside_hu: float = DEFAULT_OUTSIDE_HU,
) -> float:
    """Windowed value of every voxel outside the lungs (when masking) and outside the scan."""
    lo, hi = (float(v) for v in window)
    hu = outside_hu if mask_outside_lung else -1000.0
    return float(np.clip((hu - lo) / (hi - lo), 0.0, 1.0))


DEFAULT_FILL = fill_value()
"""Fill value of the default preprocessing (0 HU in the CLAF window = 0.667)."""


def finding_rows(entry: dict[str, Any], key: str) -> np.ndarray:
    """(n, 7) float64: world x, y, z, voxel z, y, x, diameter (−1 kept) of a manifest finding list."""
    rows = [(*f["world_xyz"], *f["voxel_zyx"], f["diameter_mm"]) for f in entry.get(key, [])]
    return np.asarray(rows, dtype=np.float64).reshape(-1, 7)


def finding_array(entry: dict[str, Any], key: str, space: str = "world") -> np.ndarray:
    """(n, 4) float64 centre + diameter (−1 kept) of a manifest finding list ("nodules", "excluded").

    Args:
        entry: a cache manifest entry.
        key: which finding list.
        space: "world" for x, y, z mm (what `label_candidates` and the FROC rule take), "voxel" for the
            cached grid's z, y, x (what crops and figures take).
    """
    if space not in ("world", "voxel"):
        raise ValueError(f"space must be 'world' or 'voxel', got {space!r}")
    columns = [0, 1, 2, 6] if space == "world" else [3, 4, 5, 6]
    return finding_rows(entry, key)[:, columns]


def sized_diameters(diameters: np.ndarray) -> np.ndarray:
    """Diameters with unknown sizes (≤ 0, LUNA16's −1) replaced by the evaluation's 10 mm."""
    return np.where(diameters > 0, diameters, UNKNOWN_DIAMETER_MM)


def dilate_mask(mask: np.ndarray, margin: int) -> np.ndarray:
    """Dilate a (D, H, W) 0/1 mask by ``margin`` voxels with a cube (three separable 1D max filters)."""
    out = np.asarray(mask).astype(np.uint8, copy=False)
    if margin > 0:
        for axis in range(3):
            out = ndimage.maximum_filter1d(out, 2 * margin + 1, axis=axis, mode="constant", cval=0)
    return out.astype(bool)


def _read_padded(array: np.ndarray, start: Sequence[int], size: Sequence[int], fill: float) -> np.ndarray:
    """``array[start : start + size]`` with ``fill`` wherever the box leaves the array."""
    out = np.full(tuple(size), fill, dtype=array.dtype)
    src, dst = [], []
    for a in range(3):
        lo, hi = max(start[a], 0), min(start[a] + size[a], array.shape[a])
        if lo >= hi:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - start[a], hi - start[a]))
    out[tuple(dst)] = array[tuple(src)]
    return out


class ScanReader:
    """Windowed, lung-masked views of cached scans (see the module docstring for the rules).

    Arrays are memory-mapped and kept for the last few scans, so data-loader workers read only the voxels a
    crop needs.

    Args:
        cache: the preprocessed cache.
        window: HU window mapped to [0, 1].
        mask_outside_lung: replace voxels outside the dilated lung mask by ``outside_hu``.
        outside_hu: HU written outside the lungs and outside the scan.
        lung_margin: lung-mask dilation in voxels (mm at 1 mm spacing).
    """

    def __init__(
        self,
        cache: PreprocessedCache,
        window: Sequence[float] = CLAF_WINDOW,
        mask_outside_lung: bool = True,
        outside_hu: float = DEFAULT_OUTSIDE_HU,
        lung_margin: int = DEFAULT_LUNG_MARGIN,
    ) -> None:
        lo, hi = (float(v) for v in window)
        if hi <= lo:
            raise ValueError(f"window {tuple(window)}: the upper bound must exceed the lower one")
        self.cache = cache
        self.window = (lo, hi)
        self.mask_outside_lung = mask_outside_lung
        self.outside_hu = float(outside_hu)
        self.lung_margin = int(lung_margin)
        self.entries = cache.entries
        self._arrays: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._lung_boxes: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"] = OrderedDict()  # memory maps are reopened in each worker
        return state

    @property
    def fill_value(self) -> float:
        """Windowed value of everything outside the lungs and the scan."""
        return fill_value(self.window, self.mask_outside_lung, self.outside_hu)

    def to_unit(self, hu: float | np.ndarray) -> Any:
        lo, hi = self.window
        return np.clip((np.asarray(hu, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0)

    def entry(self, uid: str) -> dict[str, Any]:
        if uid not in self.entries:
            raise KeyError(
                f"scan {uid!r} is not in the cache {self.cache.root}; run `lungdata prepare` first"
            )
        return self.entries[uid]

    def arrays(self, uid: str) -> tuple[np.ndarray, np.ndarray]:
        """Memory-mapped (image HU, lung mask) of a scan."""
        if uid in self._arrays:
            self._arrays.move_to_end(uid)
            return self._arrays[uid]
        image, mask, _ = self.cache.load(uid, mmap=True)
        self._arrays[uid] = (image, mask)
        while len(self._arrays) > _SCAN_LRU:
            self._arrays.popitem(last=False)
        return image, mask

    def shape(self, uid: str) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.entry(uid)["shape"])  # type: ignore[return-value]

    def lung_box(self, uid: str) -> tuple[np.ndarray, np.ndarray]:
        """(first, last) voxel (z, y, x) of the lung mask; the whole scan when the mask is empty."""
        if uid not in self._lung_boxes:
            _, mask = self.arrays(uid)
            boxes = []
            for axis in range(3):
                other = tuple(a for a in range(3) if a != axis)
                hit = np.flatnonzero(np.asarray(mask).any(axis=other))
                boxes.append((hit[0], hit[-1]) if hit.size else (0, mask.shape[axis] - 1))
            self._lung_boxes[uid] = (np.array([b[0] for b in boxes]), np.array([b[1] for b in boxes]))
        return self._lung_boxes[uid]

    def region(self, uid: str, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
        """The prepared (windowed, masked) float32 box ``start … start + size`` of a scan, padded outside."""
        image, mask = self.arrays(uid)
        start = [int(v) for v in start]
        size = [int(v) for v in size]
        hu = _read_padded(image, start, size, -1000).astype(np.float32)
        if self.mask_outside_lung:
            m = self.lung_margin
            grown = _read_padded(mask, [s - m for s in start], [n + 2 * m for n in size], 0)
            inside = dilate_mask(grown, m)
            inside = inside[m : m + size[0], m : m + size[1], m : m + size[2]] if m > 0 else inside
            hu = np.where(inside, hu, np.float32(self.outside_hu))
        return self.to_unit(hu)

    def whole(self, uid: str) -> np.ndarray:
        """The whole prepared scan, float32 (Z, Y, X)."""
        return self.region(uid, (0, 0, 0), self.shape(uid))
