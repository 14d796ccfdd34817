"""Where a GLANCE working image comes from: a square box of one cached slice, resized to the working size.

GLANCE is 2D. Each axial slice of the preprocessed cache (1 mm grid by default, see ``docs/lungseg.md``) is
mapped to the ``S×S`` working image (paper: 512×512) by one square box per scan:

* without the lung crop the box is the whole slice, padded with air to a square so the aspect ratio and
  the pixel size stay the same in y and x;
* with the lung crop (paper: "optionally extract a coarse lung mask and crop to its bounding box") it is
  the bounding box of the scan's lung mask over all slices plus a margin, squared around its centre. One
  box per scan (not per slice) keeps the pixel size constant along z, so slice detections and masks stack
  into 3D without per-slice rescaling.

The box ↔ working-image map is the one ``cv2.resize`` applies (pixel centres aligned):
``work = (cache − origin + 0.5) · S / side − 0.5``; :class:`SquareBox` holds it in both directions, so the
datamodule (targets), the augmentation test and the inference (back to the cache grid) share one formula.

Nodule cross-sections (:func:`nodule_sections`) give the heatmap targets of every slice: with a nodule
mask, the centroid and area-equivalent diameter of the nodule's pixels in that slice; without one (LUNA16,
Tianchi: centre and diameter only) the cross-section of the sphere of the annotated diameter.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import scipy.ndimage as ndi

__all__ = [
    "NoduleSection",
    "SquareBox",
    "crop_resize",
    "full_box",
    "lung_box",
    "lung_slices",
    "nodule_sections",
    "paste_back",
]

AIR_HU = -1024


@dataclass(frozen=True)
class SquareBox:
    """A square region ``[y0, y0+side) × [x0, x0+side)`` of a cached slice (may reach past its edges).

    Attributes:
        y0, x0: top-left corner in cache voxels (may be negative).
        side: edge length in cache voxels.
    """

    y0: int
    x0: int
    side: int

    def scale(self, size: int) -> float:
        """Working pixels per cache voxel for a working image of ``size``."""
        return size / self.side

    def to_working(self, yx: np.ndarray, size: int) -> np.ndarray:
        """Cache (y, x) → working-image (y, x), continuous pixel coordinates."""
        yx = np.asarray(yx, dtype=np.float64)
        return (yx - np.array([self.y0, self.x0]) + 0.5) * self.scale(size) - 0.5

    def to_cache(self, yx: np.ndarray, size: int) -> np.ndarray:
        """Working-image (y, x) → cache (y, x); the inverse of :meth:`to_working`."""
        yx = np.asarray(yx, dtype=np.float64)
        return (yx + 0.5) / self.scale(size) - 0.5 + np.array([self.y0, self.x0])

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.y0, self.x0, self.side)


def full_box(shape_yx: Sequence[int]) -> SquareBox:
    """The whole slice, padded to a square (centred)."""
    h, w = int(shape_yx[0]), int(shape_yx[1])
    side = max(h, w)
    return SquareBox((h - side) // 2, (w - side) // 2, side)


def lung_box(lung_mask: np.ndarray, margin_vox: float, min_side: int = 32) -> SquareBox | None:
    """Square box around the lungs of a whole scan, or ``None`` when the mask is empty.

    Args:
        lung_mask: (z, y, x) lung mask of the scan on the cache grid.
        margin_vox: margin added on every side, in voxels (juxta-pleural nodules sit just outside the mask).
        min_side: smallest box edge, so a tiny mask cannot blow a few voxels up to the working size.
    """
    footprint = np.asarray(lung_mask).any(axis=0)
    if not footprint.any():
        return None
    rows = np.flatnonzero(footprint.any(axis=1))
    cols = np.flatnonzero(footprint.any(axis=0))
    margin = int(math.ceil(max(margin_vox, 0.0)))
    y0, y1 = rows[0] - margin, rows[-1] + 1 + margin
    x0, x1 = cols[0] - margin, cols[-1] + 1 + margin
    side = max(y1 - y0, x1 - x0, min_side)
    cy, cx = (y0 + y1) / 2.0, (x0 + x1) / 2.0
    return SquareBox(int(round(cy - side / 2.0)), int(round(cx - side / 2.0)), int(side))


def lung_slices(lung_mask: np.ndarray, margin: int = 0) -> np.ndarray:
    """Indices of the slices that hold lung (± ``margin`` slices); all slices when the mask is empty."""
    present = np.asarray(lung_mask).reshape(lung_mask.shape[0], -1).any(axis=1)
    if not present.any():
        return np.arange(lung_mask.shape[0])
    if margin > 0:
        present = ndi.binary_dilation(present, iterations=margin)
    return np.flatnonzero(present)


def _interpolation(side: int, size: int, nearest: bool) -> int:
    if nearest:
        return cv2.INTER_NEAREST
    return cv2.INTER_AREA if size < side else cv2.INTER_LINEAR


def crop_resize(
    slice_yx: np.ndarray, box: SquareBox, size: int, fill: float = 0.0, nearest: bool = False
) -> np.ndarray:
    """Cut ``box`` out of a slice (padding with ``fill`` beyond its edges) and resize it to ``size × size``.

    Args:
        slice_yx: 2D slice.
        box: the square region.
        size: working size.
        fill: value outside the slice (air).
        nearest: nearest-neighbour interpolation (label maps); otherwise area (shrinking) or linear.
    """
    h, w = slice_yx.shape
    out = np.full((box.side, box.side), fill, dtype=np.float32)
    ys, ye = max(box.y0, 0), min(box.y0 + box.side, h)
    xs, xe = max(box.x0, 0), min(box.x0 + box.side, w)
    if ys < ye and xs < xe:
        out[ys - box.y0 : ye - box.y0, xs - box.x0 : xe - box.x0] = slice_yx[ys:ye, xs:xe]
    if box.side == size:
        return out
    return cv2.resize(out, (size, size), interpolation=_interpolation(box.side, size, nearest))


def paste_back(work_yx: np.ndarray, box: SquareBox, shape_yx: Sequence[int]) -> np.ndarray:
    """Inverse of :func:`crop_resize` for a working-size map: resize to the box and place it in the slice.

    Returns:
        float32 array of ``shape_yx``; zero outside the box.
    """
    h, w = int(shape_yx[0]), int(shape_yx[1])
    work = np.asarray(work_yx, dtype=np.float32)
    size = work.shape[0]
    region = work if box.side == size else cv2.resize(
        work, (box.side, box.side), interpolation=_interpolation(size, box.side, False)
    )  # fmt: skip
    out = np.zeros((h, w), dtype=np.float32)
    ys, ye = max(box.y0, 0), min(box.y0 + box.side, h)
    xs, xe = max(box.x0, 0), min(box.x0 + box.side, w)
    if ys < ye and xs < xe:
        out[ys:ye, xs:xe] = region[ys - box.y0 : ye - box.y0, xs - box.x0 : xe - box.x0]
    return out


@dataclass(frozen=True)
class NoduleSection:
    """One nodule's cross-section in one slice, in cache voxels.

    Attributes:
        cy, cx: centre (y, x).
        diameter: in-plane diameter in voxels (area-equivalent for masks, sphere chord otherwise).
        label: the nodule's value in the label volume (0 when it has no mask).
    """

    cy: float
    cx: float
    diameter: float
    label: int = 0


def _mask_sections(labels: np.ndarray, label_values: Iterable[int]) -> dict[int, list[NoduleSection]]:
    """Per-slice centroid and equivalent diameter of each label's pixels."""
    out: dict[int, list[NoduleSection]] = {}
    objects = ndi.find_objects(labels)
    for value in label_values:
        if value <= 0 or value > len(objects) or objects[value - 1] is None:
            continue
        box = objects[value - 1]
        part = labels[box] == value
        for dz in range(part.shape[0]):
            ys, xs = np.nonzero(part[dz])
            if ys.size == 0:
                continue
            out.setdefault(box[0].start + dz, []).append(
                NoduleSection(
                    cy=float(ys.mean()) + box[1].start,
                    cx=float(xs.mean()) + box[2].start,
                    diameter=2.0 * math.sqrt(ys.size / math.pi),
                    label=int(value),
                )
            )
    return out


def nodule_sections(
    nodules: Sequence[Mapping[str, Any]],
    shape_zyx: Sequence[int],
    spacing_xyz: Sequence[float],
    labels: np.ndarray | None = None,
    label_of: Mapping[str, int] | None = None,
) -> dict[int, list[NoduleSection]]:
    """Every nodule's cross-section per slice (the heatmap centres), keyed by slice index.

    Args:
        nodules: manifest nodule rows (``voxel_zyx`` on the cache grid, ``diameter_mm``, ``nodule_id``).
        shape_zyx: cache grid shape.
        spacing_xyz: cache spacing (x, y, z) mm.
        labels: nodule label volume on the cache grid, or ``None`` (detection-only datasets).
        label_of: nodule id → label value in ``labels``.

    Nodules with a non-empty mask use the mask; the others (no mask, or a mask that vanished at this
    resolution) use the sphere of their annotated diameter. Findings with unknown size (diameter ≤ 0) are
    skipped.
    """
    sx, sy, sz = (float(s) for s in spacing_xyz)
    label_of = dict(label_of or {})
    from_mask: dict[int, list[NoduleSection]] = {}
    masked: set[int] = set()
    if labels is not None and label_of:
        wanted = [v for v in label_of.values() if v > 0]
        from_mask = _mask_sections(labels, wanted)
        masked = {s.label for sections in from_mask.values() for s in sections}
    out: dict[int, list[NoduleSection]] = {z: list(v) for z, v in from_mask.items()}
    for nodule in nodules:
        if label_of.get(str(nodule.get("nodule_id")), 0) in masked:
            continue
        diameter_mm = float(nodule.get("diameter_mm", -1.0))
        if not diameter_mm > 0:
            continue
        cz, cy, cx = (float(v) for v in nodule["voxel_zyx"])
        radius = diameter_mm / 2.0
        z_lo = max(0, int(math.ceil(cz - radius / sz)))
        z_hi = min(int(shape_zyx[0]) - 1, int(math.floor(cz + radius / sz)))
        for z in range(z_lo, z_hi + 1):
            chord_sq = radius**2 - ((z - cz) * sz) ** 2
            if chord_sq <= 0:
                continue
            chord_mm = 2.0 * math.sqrt(chord_sq)
            out.setdefault(z, []).append(NoduleSection(cy, cx, chord_mm / ((sx + sy) / 2.0)))
    return out
