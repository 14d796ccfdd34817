"""CT preprocessing shared by the three methods: HU clipping, lung windows, 1 mm resampling, lung masks.

Resampling
    `resample_isotropic` reproduces SimpleITK's B-spline `Resample` onto a grid with the same origin and
    direction (physical point of output voxel *i* = origin + D·(i·new_spacing)), at a fraction of its cost.
    Because the grid keeps the direction, every output coordinate along one index axis depends only on that
    axis, so the 3D cubic B-spline is a product of three 1D operators. Each 1D operator (mirror-boundary
    B-spline prefilter followed by the 4-tap cubic kernel, exactly what ITK's BSplineDecompositionImageFilter
    and BSplineInterpolateImageFunction do) is a fixed matrix whose entries decay geometrically away from the
    diagonal (the prefilter pole is 0.268). We build it once per axis, cut it into row blocks with only the
    columns that matter (|entry| > 1e-7 of the largest), and apply it as a few float32 matrix products per axis.
    Each product contracts the last array axis and moves the result to the front, so after three of them the
    array is back in (z, y, x) order without any transposing copy. Values agree with SimpleITK to float32
    rounding, edges included.

Lung mask
    `lung_mask` follows the CLAF recipe (per-slice Gaussian smoothing, −400 HU threshold, morphological closing,
    the two largest connected components, hole filling) with the steps a real chest CT needs around it: air
    connected to the in-plane border (outside the body) is removed slice by slice first, and the trachea and extra-pulmonary
    main bronchi are traced from the superior end and removed so that they cannot join the two lungs into one
    component. The component work runs on a ~2 mm working grid whose voxels are block *maxima*, so that a block
    is air only if all its voxels are (a thin chest wall survives, where block means would average it into
    the outside air); the boundary is then refined at full resolution within one working voxel of the coarse
    surface. This keeps a 300-slice scan to about a second.

Provided masks
    `load_provided_lung_mask` reads LUNA16's `seg-lungs-LUNA16/<uid>.mhd`. In those files 3 and 4 label the two
    lungs and 5 (present in part of the files) the trachea and main airways; 0 is background. Only 3 and 4
    count as lung here, matching the CLAF recipe above, which also excludes the airways.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi

from common.io import CTVolume, read_volume

log = logging.getLogger(__name__)

__all__ = [
    "CLAF_WINDOW",
    "GLANCE_WINDOW",
    "HU_MAX",
    "HU_MIN",
    "clip_hu",
    "load_provided_lung_mask",
    "lung_mask",
    "resample_array",
    "resample_isotropic",
    "resampled_shape",
    "window",
]

HU_MIN = -1024
"""Air; also what scanner padding outside the field of view (−2000, −3024, ...) is mapped to."""
HU_MAX = 3071
"""Top of the 12-bit CT range; denser values (metal) are clamped here."""
FOV_PADDING_MAX = -2000
"""Values at or below this are padding outside the reconstructed field of view, not tissue."""

GLANCE_WINDOW = (-1000.0, 400.0)
"""Lung window of GLANCE (npj Digit. Med. 2025), HU."""
CLAF_WINDOW = (-1200.0, 600.0)
"""Lung window of CLAF (Wang et al. 2025), HU."""

LUNA16_LUNG_LABELS = (3, 4)
"""Values of the two lungs in LUNA16 `seg-lungs-LUNA16` masks (5 = trachea/airways, excluded)."""


# ------------------------------------------------------------------------------------------------ HU


def clip_hu(array: np.ndarray) -> np.ndarray:
    """Map field-of-view padding (≤ −2000 HU) to air and clamp to [−1024, 3071] HU, keeping the dtype.

    Padding must become air rather than the clamp floor's neighbour values only by accident: both give −1024
    here, but the explicit rule documents why the circle outside the FOV is not treated as tissue.
    """
    out = np.where(array <= FOV_PADDING_MAX, HU_MIN, array)
    return np.clip(out, HU_MIN, HU_MAX).astype(array.dtype, copy=False)


def window(array: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linear map of [lo, hi] HU to [0, 1] float32, clipped (GLANCE_WINDOW, CLAF_WINDOW)."""
    if hi <= lo:
        raise ValueError(f"window upper bound {hi} must exceed lower bound {lo}")
    out = (np.asarray(array, dtype=np.float32) - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


# ------------------------------------------------------------------------------------------ resampling


def resampled_shape(
    shape_zyx: tuple[int, ...], spacing_xyz: tuple[float, ...], new_spacing_xyz: tuple[float, ...]
) -> tuple[int, int, int]:
    """Output shape (z, y, x) for resampling to `new_spacing_xyz` on a grid with the same origin.

    The usual round(n·s/s'), reduced where needed so that the last output voxel centre stays inside the input
    grid (continuous index < n − 0.5, ITK's inside-buffer test); SimpleITK would otherwise fill it with
    the default value.
    """
    out = []
    for n, s, ns in zip(shape_zyx, spacing_xyz[::-1], new_spacing_xyz[::-1]):
        n_out = max(1, int(round(n * s / ns)))
        while n_out > 1 and (n_out - 1) * ns / s >= n - 0.5 - 1e-6:
            n_out -= 1
        out.append(n_out)
    return tuple(out)  # type: ignore[return-value]


def _mirror(index: np.ndarray, n: int) -> np.ndarray:
    """Whole-sample mirror boundary (ITK's and scipy's 'mirror'): -1 → 1, n → n-2."""
    if n == 1:
        return np.zeros_like(index)
    period = 2 * n - 2
    index = np.abs(index) % period
    return np.where(index >= n, period - index, index)


def _cubic_bspline_weights(t: np.ndarray) -> np.ndarray:
    """Weights of the 4 taps at offsets −1, 0, 1, 2 for fractional position t ∈ [0, 1)."""
    t2 = t * t
    t3 = t2 * t
    return np.stack([(1 - t) ** 3 / 6, (3 * t3 - 6 * t2 + 4) / 6, (-3 * t3 + 3 * t2 + 3 * t + 1) / 6, t3 / 6])


@lru_cache(maxsize=64)
def _axis_operator(
    n: int, n_out: int, step: float, order: int
) -> tuple[tuple[int, int, np.ndarray, int], ...]:
    """The 1D resampling operator for one axis as row blocks (row_lo, row_hi, block, col_lo).

    Output sample *i* sits at input index i·step. `block` holds rows row_lo:row_hi of the (n_out × n) matrix,
    restricted to the columns col_lo:col_lo+width outside which every entry is below 1e-7 of the largest.
    """
    pos = np.arange(n_out, dtype=np.float64) * step
    rows = np.arange(n_out)
    dense = np.zeros((n_out, n), dtype=np.float64)
    if order == 3:
        base = np.floor(pos).astype(np.int64)
        weights = _cubic_bspline_weights(pos - base)
        for k in range(4):
            np.add.at(dense, (rows, _mirror(base - 1 + k, n)), weights[k])
        # Interpolating (not smoothing) B-spline: samples are first turned into spline coefficients.
        # Filtering the identity gives that operator column by column, with ITK's mirror boundary.
        coefficients = ndi.spline_filter1d(np.eye(n), order=3, axis=0, mode="mirror") if n > 1 else np.eye(1)
        dense = dense @ coefficients
    elif order == 1:
        base = np.minimum(np.floor(pos).astype(np.int64), n - 1)
        frac = pos - base
        np.add.at(dense, (rows, base), 1 - frac)
        np.add.at(dense, (rows, np.minimum(base + 1, n - 1)), frac)
    else:
        raise ValueError(f"interpolation order {order} is not supported (0, 1 or 3)")
    threshold = _TOLERANCE * np.abs(dense).max()
    blocks = []
    for r0 in range(0, n_out, _BLOCK_ROWS):
        r1 = min(r0 + _BLOCK_ROWS, n_out)
        cols = np.flatnonzero((np.abs(dense[r0:r1]) > threshold).any(axis=0))
        c0, c1 = int(cols[0]), int(cols[-1]) + 1
        block = np.ascontiguousarray(dense[r0:r1, c0:c1], dtype=np.float32)
        blocks.append((r0, r1, block, c0))
    return tuple(blocks)


_BLOCK_ROWS = 64
_TOLERANCE = 1e-7


def _contract_last_axis(x: np.ndarray, n_out: int, blocks: tuple) -> np.ndarray:
    """Apply a 1D operator to the last axis of `x`, putting the new axis first: (..., n) → (n_out, ...).

    Each block is one BLAS matrix product whose second operand is a column window of `x` read as a
    transposed matrix, so nothing is copied or transposed in memory.
    """
    n = x.shape[-1]
    rest = x.shape[:-1]
    flat = x.reshape(-1, n)
    out = np.empty((n_out, flat.shape[0]), dtype=np.float32)
    for r0, r1, block, c0 in blocks:
        np.matmul(block, flat[:, c0 : c0 + block.shape[1]].T, out=out[r0:r1])
    return out.reshape(n_out, *rest)


def resample_array(
    array: np.ndarray,
    spacing_xyz: tuple[float, float, float],
    new_spacing_xyz: tuple[float, float, float],
    order: int = 3,
    out_shape: tuple[int, int, int] | None = None,
    dtype: np.dtype | type | None = None,
) -> np.ndarray:
    """Resample a (z, y, x) array onto the grid with the same origin/direction and spacing `new_spacing_xyz`.

    Args:
        array: input voxels.
        spacing_xyz: input spacing (x, y, z) mm.
        new_spacing_xyz: output spacing (x, y, z) mm.
        order: 3 cubic B-spline (images, matches SimpleITK `sitkBSpline`), 1 linear, 0 nearest (masks,
            matches `sitkNearestNeighbor`).
        out_shape: output (z, y, x); default `resampled_shape`.
        dtype: output dtype; default the input's. Integer outputs are rounded and clipped to the type's range.

    Returns:
        The resampled array.
    """
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"resample_array needs a 3D (z, y, x) array, got shape {array.shape}")
    out_shape = out_shape or resampled_shape(array.shape, spacing_xyz, new_spacing_xyz)
    dtype = np.dtype(dtype or array.dtype)
    steps = [ns / s for s, ns in zip(spacing_xyz[::-1], new_spacing_xyz[::-1])]  # (z, y, x)
    if order == 0:
        out = array
        for axis in range(3):
            # Nearest index; exact ties round up, as ITK's NearestNeighborInterpolateImageFunction does.
            idx = np.floor(np.arange(out_shape[axis]) * steps[axis] + 0.5 + 1e-9).astype(np.int64)
            out = np.take(out, np.clip(idx, 0, array.shape[axis] - 1), axis=axis)
        return out.astype(dtype, copy=False)
    x = np.ascontiguousarray(array, dtype=np.float32)
    for axis in (2, 1, 0):  # contract x, then y, then z: each contraction moves the new axis to the front
        blocks = _axis_operator(array.shape[axis], out_shape[axis], steps[axis], order)
        x = _contract_last_axis(x, out_shape[axis], blocks)
    out = x
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        out = np.clip(np.rint(out, out=out), info.min, info.max, out=out)
    return out.astype(dtype, copy=False)


def resample_isotropic(
    volume: CTVolume,
    spacing: tuple[float, float, float] | float = (1.0, 1.0, 1.0),
    order: int = 3,
    dtype: np.dtype | type | None = None,
) -> CTVolume:
    """Resample a volume to `spacing` mm (default 1 mm isotropic), same origin and direction.

    Annotations stay in world mm; their voxel positions on the new grid are `result.world_to_voxel(xyz)`,
    which is exact because the new grid's geometry is known exactly.

    Args:
        volume: the scan (int16 HU) or a mask.
        spacing: new (x, y, z) spacing in mm, or one number for isotropic.
        order: 3 for images (cubic B-spline, CLAF), 0 for masks (nearest).
        dtype: output dtype; default the input's (int16 HU is rounded).
    """
    if np.isscalar(spacing):
        spacing = (float(spacing),) * 3  # type: ignore[assignment]
    spacing = tuple(float(s) for s in spacing)  # type: ignore[union-attr]
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"target spacing {spacing} must be three positive numbers")
    array = resample_array(volume.array, volume.spacing, spacing, order=order, dtype=dtype)
    return CTVolume(array, spacing, volume.origin, volume.direction.copy(), volume.series_uid, volume.source)


# ------------------------------------------------------------------------------------------- lung mask


def _block_max(array: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Maxima over non-overlapping blocks of `factors` voxels, float32, one axis at a time.

    The working grid keeps the most tissue-like value of each block, so a block counts as air only when
    all of its voxels are air: a chest wall or pleura thinner than a block still separates the lung from
    the outside air (a block mean would average a 3 mm wall away). A trailing partial block uses the voxels
    it has. Reducing axis by axis reads the big input once; later passes work on already reduced arrays.
    """
    out = array
    for axis, f in enumerate(factors):
        if f == 1:
            continue
        n = out.shape[axis]
        n_full = n // f

        def take(start: int, stop: int | None, step: int = f, axis: int = axis) -> tuple[slice, ...]:
            return tuple(slice(start, stop, step) if a == axis else slice(None) for a in range(3))

        acc = out[take(0, n_full * f)].copy()
        for k in range(1, f):
            np.maximum(acc, out[take(k, n_full * f)], out=acc)
        if n % f:
            rest = out[take(n_full * f, None, 1)].max(axis=axis, keepdims=True)
            acc = np.concatenate([acc, rest], axis=axis)
        out = acc
    return out.astype(np.float32)


def _upsample(mask: np.ndarray, factors: tuple[int, int, int], shape: tuple[int, int, int]) -> np.ndarray:
    """Nearest-neighbour inverse of `_block_max`'s grid: repeat each coarse voxel, crop to `shape`."""
    out = mask
    for axis, f in enumerate(factors):
        if f > 1:
            out = np.repeat(out, f, axis=axis)
    return out[: shape[0], : shape[1], : shape[2]]


_SLICE_4CONN = np.zeros((3, 3, 3), dtype=bool)
_SLICE_4CONN[1] = ndi.generate_binary_structure(2, 1)


def _remove_border_air(candidate: np.ndarray) -> np.ndarray:
    """Drop air connected to the in-plane border (around the body, beyond the FOV), slice by slice.

    Per slice rather than in 3D: where a lung touches the outside in a few slices (a truncated field of
    view, a wall thinner than the working grid) only those slices lose it, not the whole lung.
    """
    labels, n = ndi.label(candidate, structure=_SLICE_4CONN)
    if n == 0:
        return candidate
    border = np.unique(
        np.concatenate(
            [
                labels[:, 0, :].ravel(),
                labels[:, -1, :].ravel(),
                labels[:, :, 0].ravel(),
                labels[:, :, -1].ravel(),
            ]
        )
    )
    keep = np.ones(n + 1, dtype=bool)
    keep[0] = False
    keep[border] = False
    return keep[labels]


def _trace_airways(
    candidate: np.ndarray,
    hu: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    superior_last: bool,
    threshold_hu: float,
    seed_search_mm: float = 80.0,
    seed_area_mm2: tuple[float, float] = (40.0, 800.0),
) -> tuple[np.ndarray, float]:
    """Trace the trachea and extra-pulmonary bronchi slice by slice from the superior end.

    The seed is a small, roughly central air region in the first `seed_search_mm` of the scan (lung apices
    are lateral). Below it, every 2D air region that overlaps the previous slice's airway and stays small
    (≤ max(3 × seed area, 400 mm²)) is airway. Once a branch meets a lung its 2D region becomes large and the
    branch stops there, so intra-pulmonary bronchi stay in the lung. A bronchus that runs into the lung
    within a slice or two leaves a stub attached to the lung; `_cut_airway_stubs` removes it.

    Returns:
        The airway mask and the trachea's equivalent radius in mm (0 when no trachea was found).
    """
    sz, sy, sx = spacing_zyx
    pixel_area = sy * sx
    n_slices = candidate.shape[0]
    order = range(n_slices - 1, -1, -1) if superior_last else range(n_slices)
    airway = np.zeros_like(candidate)
    previous: np.ndarray | None = None
    max_area = 0.0
    trachea_radius = 0.0
    for step, z in enumerate(order):
        labels, n = ndi.label(candidate[z])
        if previous is None:
            if step * sz > seed_search_mm:
                break
            seed = _airway_seed(labels, n, hu[z], pixel_area, threshold_hu, seed_area_mm2)
            if seed:
                previous = labels == seed
                airway[z] = previous
                seed_area = float(previous.sum()) * pixel_area
                max_area = max(3.0 * seed_area, 400.0)
                trachea_radius = float(np.sqrt(seed_area / np.pi))
            continue
        current = _follow(labels, previous, pixel_area, max_area)
        if not current.any():
            break
        airway[z] = current
        previous = current
    return airway, trachea_radius


def _airway_shell(airway: np.ndarray) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """Voxels 6-adjacent to the traced airway, as (box, mask within the box); None without an airway."""
    if not airway.any():
        return None
    box = _bbox(airway, 1)
    return box, ndi.binary_dilation(airway[box]) & ~airway[box]


def _cut_airway_stubs(
    lung: np.ndarray,
    shell: tuple[tuple[slice, ...], np.ndarray],
    spacing_zyx: tuple[float, float, float],
    radius_mm: float,
) -> np.ndarray:
    """Remove bronchus stubs: parts of `lung` next to the traced airway too thin to hold a `radius_mm` ball.

    A morphological opening (Euclidean ball, via two distance transforms) of the lung near where the airway
    tracing stopped keeps the parenchyma and drops tube-like protrusions; only the thin pieces that touch the
    airway are removed, so sharp lung edges elsewhere are untouched. Works in a small box around the contact.
    """
    shell_box, shell_mask = shell
    contact = np.zeros(lung.shape, dtype=bool)
    contact[shell_box] = shell_mask & lung[shell_box]
    if not contact.any():
        return lung
    margin = [int(np.ceil(3 * radius_mm / s)) for s in spacing_zyx]
    box = []
    for axis, contact_box in enumerate(_bbox(contact[shell_box], 0)):
        start = shell_box[axis].start + contact_box.start
        stop = shell_box[axis].start + contact_box.stop
        box.append(slice(max(0, start - margin[axis]), min(lung.shape[axis], stop + margin[axis])))
    box = tuple(box)
    part = lung[box]
    inside = ndi.distance_transform_edt(part, sampling=spacing_zyx) > radius_mm
    if inside.any():
        opened = ndi.distance_transform_edt(~inside, sampling=spacing_zyx) <= radius_mm
    else:
        opened = np.zeros_like(part)
    labels, _ = ndi.label(part & ~opened)
    touching = np.unique(labels[contact[box]])
    touching = touching[touching > 0]
    if touching.size == 0:
        return lung
    out = lung.copy()
    out[box] = part & ~np.isin(labels, touching)
    return out


def _airway_seed(
    labels: np.ndarray,
    n: int,
    hu_slice: np.ndarray,
    pixel_area: float,
    threshold_hu: float,
    area_range: tuple[float, float],
) -> int:
    """Label of the trachea in a slice: an air region of trachea size closest to the body's midline, or 0."""
    if n == 0:
        return 0
    body_cols = np.flatnonzero((hu_slice > threshold_hu).any(axis=0))
    if body_cols.size == 0:
        return 0
    midline = 0.5 * (body_cols[0] + body_cols[-1])
    width = body_cols[-1] - body_cols[0] + 1
    areas = np.bincount(labels.ravel()) * pixel_area
    centres = ndi.center_of_mass(np.ones_like(labels), labels, np.arange(1, n + 1))
    best, best_offset = 0, np.inf
    for label in range(1, n + 1):
        offset = abs(centres[label - 1][1] - midline)
        if area_range[0] <= areas[label] <= area_range[1] and offset <= 0.15 * width and offset < best_offset:
            best, best_offset = label, offset
    return best


def _follow(labels: np.ndarray, previous: np.ndarray, pixel_area: float, max_area: float) -> np.ndarray:
    """Regions of `labels` that overlap `previous` and are at most `max_area` mm²."""
    areas = np.bincount(labels.ravel()) * pixel_area
    keep = [lab for lab in np.unique(labels[previous]) if lab > 0 and areas[lab] <= max_area]
    return np.isin(labels, keep) if keep else np.zeros(labels.shape, dtype=bool)


def _fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """Fill 2D holes slice by slice (one labelling call for all slices, in-plane 4-connectivity)."""
    padded = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
    labels, _ = ndi.label(~padded, structure=_SLICE_4CONN)
    outside = np.unique(
        np.concatenate(
            [
                labels[:, 0, :].ravel(),
                labels[:, -1, :].ravel(),
                labels[:, :, 0].ravel(),
                labels[:, :, -1].ravel(),
            ]
        )
    )
    holes = (labels > 0) & ~np.isin(labels, outside)
    return (padded | holes)[:, 1:-1, 1:-1]


def _close(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary closing with a 3D cross iterated `radius` times, edge-padded so scan borders do not erode."""
    if radius <= 0:
        return mask
    padded = np.pad(mask, radius, mode="edge")
    structure = ndi.generate_binary_structure(3, 1)
    closed = ndi.binary_closing(padded, structure=structure, iterations=radius)
    return closed[radius:-radius, radius:-radius, radius:-radius]


def _bbox(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    slices = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        slices.append(slice(max(0, idx[0] - margin), min(mask.shape[axis], idx[-1] + 1 + margin)))
    return tuple(slices)


def lung_mask(
    volume_or_array: CTVolume | np.ndarray,
    spacing: tuple[float, float, float] | None = None,
    *,
    threshold_hu: float = -400.0,
    sigma_mm: float = 1.0,
    work_spacing_mm: float = 2.0,
    closing_mm: float = 4.0,
    min_second_fraction: float = 0.1,
    min_lung_ml: float = 20.0,
    remove_airways: bool = True,
    superior_last: bool | None = None,
    refine: bool = True,
) -> np.ndarray:
    """Lung parenchyma mask (CLAF recipe), uint8 (z, y, x) on the input grid.

    Steps: block maxima on a ~`work_spacing_mm` grid → `threshold_hu`, where the per-slice Gaussian (`sigma_mm`)
    must agree (smoothing only removes air) → drop air that
    touches the in-plane border → trace and drop trachea/main bronchi, and cut the bronchus stubs where the
    tracing met the lungs → keep the largest component and the
    second largest when it has ≥ `min_second_fraction` of the largest's volume (otherwise bowel gas could
    pass as a lung) → per lung: closing (`closing_mm`) and per-slice hole filling → back to full resolution,
    re-deciding voxels within one working voxel of the surface by the full-resolution threshold.

    Args:
        volume_or_array: a `CTVolume` or a (z, y, x) HU array.
        spacing: (x, y, z) mm; required for an array, taken from the volume otherwise.
        superior_last: whether the head end is the last slice; default from the volume's direction
            (world z grows with the index) and True for a bare array (identity direction, LPS).
        refine: re-threshold the boundary band at full resolution; without it the boundary is blocky at
            the working spacing.

    Returns:
        uint8 mask, 1 = lung. All zeros (with a warning) when no lung-sized region exists.
    """
    if isinstance(volume_or_array, CTVolume):
        array = volume_or_array.array
        spacing = volume_or_array.spacing
        if superior_last is None:
            superior_last = bool(volume_or_array.direction[2, 2] >= 0)
    else:
        array = np.asarray(volume_or_array)
        if spacing is None:
            raise ValueError("lung_mask needs `spacing` (x, y, z) for a bare array")
        if superior_last is None:
            superior_last = True
    if array.ndim != 3:
        raise ValueError(f"lung_mask needs a 3D (z, y, x) array, got shape {array.shape}")
    spacing_zyx = tuple(float(s) for s in spacing[::-1])
    factors = tuple(max(1, int(round(work_spacing_mm / s))) for s in spacing_zyx)
    coarse_spacing = tuple(s * f for s, f in zip(spacing_zyx, factors))

    coarse = _block_max(array, factors)
    air = coarse < threshold_hu
    if sigma_mm > 0:
        # The per-slice Gaussian denoises, but may only veto air (noise speckle), never create it: blurring
        # a 2-3 mm chest wall or pleura into the neighbouring air would join the lung to the outside.
        smoothed = ndi.gaussian_filter(
            coarse, sigma=(0.0, sigma_mm / coarse_spacing[1], sigma_mm / coarse_spacing[2])
        )
        air &= smoothed < threshold_hu
    candidate = _remove_border_air(air)
    if remove_airways:
        airway, trachea_radius = _trace_airways(
            candidate, coarse, coarse_spacing, superior_last, threshold_hu
        )
        candidate &= ~airway
        shell = _airway_shell(airway)
        if shell is not None:
            # Cut the bronchus stubs before choosing components: they may still join the two lungs.
            # The opening ball must not fit in a main bronchus (≈ 0.7 trachea radius) but fit in the lung.
            candidate = _cut_airway_stubs(candidate, shell, coarse_spacing, max(6.0, 1.2 * trachea_radius))

    labels, n = ndi.label(candidate)
    empty = np.zeros(array.shape, dtype=np.uint8)
    if n == 0:
        log.warning("lung_mask: no air region inside the body; returning an empty mask")
        return empty
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    voxel_ml = float(np.prod(coarse_spacing)) / 1000.0
    ranked = np.argsort(sizes)[::-1][:2]
    chosen = [int(ranked[0])] if sizes[ranked[0]] * voxel_ml >= min_lung_ml else []
    if chosen and len(ranked) > 1 and sizes[ranked[1]] >= min_second_fraction * sizes[ranked[0]]:
        chosen.append(int(ranked[1]))
    if not chosen:
        log.warning("lung_mask: largest air region %.1f ml is below %.0f ml; returning an empty mask",
                    sizes[ranked[0]] * voxel_ml, min_lung_ml)  # fmt: skip
        return empty

    radius = int(round(closing_mm / min(coarse_spacing)))
    coarse_mask = np.zeros(candidate.shape, dtype=bool)
    for label in chosen:
        component = labels == label
        box = _bbox(component, radius + 1)
        part = _fill_holes_per_slice(_close(component[box], radius))
        coarse_mask[box] |= part

    if not refine or factors == (1, 1, 1):
        return _upsample(coarse_mask, factors, array.shape).astype(np.uint8)
    # Boundary band: one working voxel either side of the coarse surface, re-decided at full resolution.
    box = _bbox(coarse_mask, 1)
    inner = ndi.binary_erosion(coarse_mask[box], border_value=1)  # scan borders do not erode
    outer = ndi.binary_dilation(coarse_mask[box])
    fine_box = tuple(slice(b.start * f, min(n, b.stop * f)) for b, f, n in zip(box, factors, array.shape))
    fine_shape = tuple(b.stop - b.start for b in fine_box)
    band = _upsample(outer & ~inner, factors, fine_shape)
    fine = _upsample(inner, factors, fine_shape)
    fine |= band & (array[fine_box] < threshold_hu)
    empty[fine_box] = fine
    return empty


def load_provided_lung_mask(
    path: str | Path,
    reference: CTVolume | None = None,
    lung_labels: tuple[int, ...] = LUNA16_LUNG_LABELS,
) -> CTVolume:
    """Read a provided lung segmentation (LUNA16 `seg-lungs-LUNA16/<uid>.mhd`) as a uint8 0/1 mask.

    Args:
        path: the mask file.
        reference: when given, the mask is resampled (nearest) onto this volume's grid, which must share the
            mask's origin and direction (true for LUNA16, whose masks are on the scan grid).
        lung_labels: values that mean lung (LUNA16: 3 and 4; 5 = airways is excluded).

    Raises:
        VolumeReadError / FileNotFoundError: unreadable file.
        ValueError: the mask does not cover the reference grid.
    """
    mask_volume = read_volume(path)
    binary = np.isin(mask_volume.array, lung_labels).astype(np.uint8)
    mask_volume = mask_volume.with_array(binary)
    if reference is None:
        return mask_volume
    if not (
        np.allclose(mask_volume.origin, reference.origin, atol=1e-3)
        and np.allclose(mask_volume.direction, reference.direction, atol=1e-6)
    ):
        raise ValueError(
            f"{path}: provided lung mask geometry (origin {mask_volume.origin}) does not match the scan "
            f"(origin {reference.origin}); it belongs to another scan or was resampled differently"
        )
    array = resample_array(
        binary, mask_volume.spacing, reference.spacing, order=0, out_shape=reference.shape, dtype=np.uint8
    )
    return reference.with_array(array)
