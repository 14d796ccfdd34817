"""Size, position, density and type of one segmented nodule, in the scan's own physical geometry.

Why physical coordinates everywhere: Lung-RADS sizes are millimetres in the patient, so every distance is
measured on points mapped through ``origin + D·diag(spacing)·index`` — anisotropic pixels, flipped and
rotated direction matrices then give the same millimetres as an isotropic identity scan would.

Definitions (see docs/measurements.md for the phantom accuracy of each):

* **centre**: centroid of the mask voxels, as (i, j, k) index and in world mm.
* **volume**: partial-volume corrected (`partial_volume`, after Kuhnigk et al., "Morphological segmentation
  and partial volume analysis for volumetry of solid pulmonary lesions in thoracic CT scans", IEEE
  Transactions on Medical Imaging, 2006): the mask's core counts whole, each voxel of a shell across the
  mask's boundary counts the fraction of nodule its HU says it holds. Why: a 4–9 mm nodule on 1.25–2.5 mm
  slices gains or loses tens of percent of its volume depending on where the slices cut it, and volume
  doubling times divide two such volumes. **voxel_volume**: voxel count × voxel volume, kept beside it.
* **axial plane**: the plane perpendicular to the patient z axis. The scan's index axis closest to world z
  (largest ``|D[2, j]|``) is taken as the slice axis; for the axial scans this toolkit reads (DICOM input
  refuses gantry tilt and mixed orientations) that is index k, and its slices are exactly axial. A stated
  restriction: in a volume whose slices are tilted, the measuring plane is the slice plane (tilted too).
* **long axis**: the longest distance between two points of the outline (marching-squares contour of the
  mask at 0.5, i.e. half-way between inside and outside pixel centres) in the slice of largest mask area.
* **short axis**: the longest chord exactly perpendicular to the long axis (no angular tolerance: the chord
  is cut by lines at 90° in physical mm, stepped every ``CHORD_STEP_MM`` along the long axis).
* **mean diameter**: (long + short) / 2 rounded to 0.1 mm — the Lung-RADS v2022 mean diameter.
* **max 3D diameter**: the longest distance between vertices of the marching-cubes surface of the mask.
* **type**: from the HU inside the mask (`SOLID_HU`, `SOLID_SHARE`, `MIN_SOLID_COMPONENT_MM`: stated
  rules, see `nodule_type`), and `SOLID_COMPONENT_RATIO` (a solid component nearly as wide as the nodule
  makes it solid); for part-solid nodules the solid component's mean diameter (measured like the
  nodule's) and volume.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from skimage import measure as skmeasure

from common.io import CTVolume

__all__ = [
    "NoduleMeasurements",
    "PartialVolume",
    "measure_nodule",
    "partial_volume",
    "nodule_type",
    "SOLID_HU",
    "NODULE_TYPES",
]

NODULE_TYPES = ("solid", "part-solid", "ground-glass")

#: HU at or above which a voxel counts as solid (soft-tissue) attenuation. A stated rule, not a published
#: constant: it lies between the phantoms' ground-glass (−420…−300 HU plus texture and noise) and their
#: soft tissue (−100…+100 HU), with a margin to both; chosen and measured on phantoms
#: (docs/measurements.md).
SOLID_HU = -200.0
#: Interior = mask voxels at least this many pixels from the mask's outline in the axial plane: the outer
#: pixel of every nodule mixes with the lung around it (partial volume) and reads as ground-glass.
INTERIOR_DEPTH_PX = 2.0
#: Share of the interior that is solid at or above which the nodule is solid.
SOLID_SHARE = 0.85
#: Interior solid area (as the diameter of a disc of its area, largest axial slice, mm) below which a
#: not-solid nodule is ground-glass: noise and texture specks are not a solid component.
MIN_SOLID_COMPONENT_MM = 1.0
#: A "part-solid" nodule whose solid component's mean diameter reaches this share of the nodule's is
#: solid: what is left around the component is a rim thinner than a tenth of the diameter on each side.
SOLID_COMPONENT_RATIO = 0.8
#: Step (mm) between the perpendicular chords searched for the short axis.
CHORD_STEP_MM = 0.05


@dataclass(frozen=True)
class NoduleMeasurements:
    """Measurements of one nodule (see the module docstring for each definition)."""

    center_world_mm: tuple[float, float, float]  # (x, y, z) mask centroid in world mm
    center_voxel_xyz: tuple[float, float, float]  # the same point as (i, j, k) index of the scan
    volume_mm3: float  # partial-volume corrected (`partial_volume`)
    voxel_volume_mm3: float  # mask voxel count × voxel volume
    long_axis_mm: float  # in the axial slice of largest mask area
    short_axis_mm: float  # longest chord perpendicular to the long axis, same slice
    mean_diameter_mm: float  # (long + short) / 2 to 0.1 mm
    max_3d_diameter_mm: float
    axial_slice: int  # index of that slice along the slice axis (k, the z index, for axial scans)
    mean_hu: float
    max_hu: float
    type: str  # one of NODULE_TYPES
    solid_component_mm: float | None  # part-solid only: the solid component's mean diameter
    solid_volume_mm3: float | None  # part-solid only (voxel count of the solid component)

    def to_dict(self) -> dict:
        """JSON-ready: tuples become lists, numpy scalars plain floats."""
        out = {}
        for key, value in asdict(self).items():
            if isinstance(value, tuple):
                out[key] = [float(v) for v in value]
            elif isinstance(value, (np.floating, np.integer)):
                out[key] = value.item()
            else:
                out[key] = value
        return out


# ------------------------------------------------------------------------------------------ geometry
def _axis_vectors(volume: CTVolume) -> np.ndarray:
    """(3, 3): row a = world mm vector of one step along array axis a (z, y, x order)."""
    d = np.asarray(volume.direction, dtype=np.float64).reshape(3, 3)
    sx, sy, sz = volume.spacing
    # Column j of D is index axis j in (x, y, z) order; array axis 0 is z = index axis 2.
    return np.stack([d[:, 2] * sz, d[:, 1] * sy, d[:, 0] * sx])


def slice_axis(volume: CTVolume) -> int:
    """Array axis (0 = z, 1 = y, 2 = x) whose direction is closest to the patient z axis."""
    d = np.asarray(volume.direction, dtype=np.float64).reshape(3, 3)
    index_axis = int(np.argmax(np.abs(d[2, :])))  # 0 = i (x), 1 = j (y), 2 = k (z)
    return 2 - index_axis


def _max_pairwise(points: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Longest distance among points (via the convex hull when it exists) and its two end points."""
    pts = np.asarray(points, dtype=np.float64)
    if len(pts) > pts.shape[1] + 1:
        try:
            pts = pts[ConvexHull(pts).vertices]
        except QhullError:  # degenerate (collinear / coplanar): joggled input still names true vertices
            pts = pts[ConvexHull(pts, qhull_options="QJ").vertices]
    if len(pts) < 2:
        return 0.0, pts[0], pts[0]
    diff = pts[:, None, :] - pts[None, :, :]
    dist = np.sqrt((diff**2).sum(-1))
    a, b = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return float(dist[a, b]), pts[a], pts[b]


def _slice_outline(mask2d: np.ndarray, row_vec: np.ndarray, col_vec: np.ndarray) -> list[np.ndarray]:
    """Closed outlines (marching squares at 0.5) of a 2D mask as physical 2D points in the slice plane."""
    padded = np.pad(mask2d.astype(np.float32), 1)
    contours = [c - 1.0 for c in skmeasure.find_contours(padded, 0.5)]
    # In-plane orthonormal basis of the slice: e1 along the columns, e2 the rest of the rows.
    e1 = col_vec / np.linalg.norm(col_vec)
    r_perp = row_vec - (row_vec @ e1) * e1
    e2 = r_perp / np.linalg.norm(r_perp)
    basis = np.stack([e1, e2], axis=1)  # (3, 2)
    out = []
    for c in contours:
        world = c[:, :1] * row_vec[None] + c[:, 1:2] * col_vec[None]  # (n, 3)
        out.append(world @ basis)
    return out


def _chord_extent(polygons: list[np.ndarray], u: np.ndarray, step: float) -> float:
    """Longest chord perpendicular to unit vector u: over lines ⟂ u, the span of their crossings."""
    v = np.array([-u[1], u[0]])
    best = 0.0
    allpts = np.concatenate(polygons)
    s_all = allpts @ u
    ts = np.arange(s_all.min(), s_all.max() + step / 2, step)
    if len(ts) == 0:
        return 0.0
    lo = np.full(len(ts), np.inf)
    hi = np.full(len(ts), -np.inf)
    for poly in polygons:
        a = poly
        b = np.roll(poly, -1, axis=0)
        sa, sb = a @ u, b @ u
        ta, tb = a @ v, b @ v
        s0, s1 = np.minimum(sa, sb), np.maximum(sa, sb)
        # Edges × lines crossing matrix (half-open in s so a vertex is counted once).
        cross = (s0[:, None] <= ts[None, :]) & (ts[None, :] <= s1[:, None]) & (s1 > s0)[:, None]
        if not cross.any():
            continue
        frac = (ts[None, :] - sa[:, None]) / np.where(sb - sa == 0, 1.0, sb - sa)[:, None]
        t = ta[:, None] + frac * (tb - ta)[:, None]
        lo = np.minimum(lo, np.where(cross, t, np.inf).min(axis=0))
        hi = np.maximum(hi, np.where(cross, t, -np.inf).max(axis=0))
    span = hi - lo
    span = span[np.isfinite(span)]
    if span.size:
        best = float(span.max())
    return best


def axial_diameters(mask2d: np.ndarray, row_vec: np.ndarray, col_vec: np.ndarray) -> tuple[float, float]:
    """(long, short) axis in mm of a 2D mask whose rows / columns step by the given world vectors."""
    polygons = _slice_outline(mask2d, row_vec, col_vec)
    if not polygons:
        return 0.0, 0.0
    long_mm, p, q = _max_pairwise(np.concatenate(polygons))
    if long_mm == 0.0:
        return 0.0, 0.0
    u = (q - p) / long_mm
    short_mm = _chord_extent(polygons, u, CHORD_STEP_MM)
    return long_mm, min(short_mm, long_mm)


def max_3d_diameter(mask: np.ndarray, axis_vectors: np.ndarray) -> float:
    """Longest distance (mm) between vertices of the mask's marching-cubes surface."""
    padded = np.pad(mask.astype(np.float32), 1)
    verts, *_ = skmeasure.marching_cubes(padded, 0.5)
    world = (verts - 1.0) @ axis_vectors
    return _max_pairwise(world)[0]


def _largest_slice(mask: np.ndarray, axis: int) -> int:
    areas = mask.sum(axis=tuple(a for a in range(3) if a != axis))
    return int(np.argmax(areas))


def _plane_diameters(mask: np.ndarray, axis: int, index: int, vectors: np.ndarray) -> tuple[float, float]:
    in_plane = [a for a in range(3) if a != axis]
    plane = np.take(mask, index, axis=axis)
    return axial_diameters(plane, vectors[in_plane[0]], vectors[in_plane[1]])


def mean_diameter(long_mm: float, short_mm: float) -> float:
    """Lung-RADS mean diameter: (long + short) / 2, rounded to 0.1 mm."""
    return round((long_mm + short_mm) / 2.0 + 1e-9, 1)


# ------------------------------------------------------------------------------------------ type
def _in_plane_depth(mask: np.ndarray, axis: int) -> np.ndarray:
    """Per slice along `axis`, each mask pixel's distance (pixels) to the nearest pixel outside the mask."""
    moved = np.moveaxis(mask, axis, 0)
    depth = np.stack([ndimage.distance_transform_edt(np.pad(s, 1))[1:-1, 1:-1] for s in moved])
    return np.moveaxis(depth, 0, axis)


def nodule_type(hu: np.ndarray, mask: np.ndarray, axis: int, pixel_area_mm2: float) -> tuple[str, np.ndarray]:
    """Solid / part-solid / ground-glass from the HU inside the mask; returns (type, solid-component mask).

    Solid voxels are mask voxels ≥ `SOLID_HU`. The type is read on the mask's interior (pixels ≥
    `INTERIOR_DEPTH_PX` from the outline in the axial plane, or the deepest pixels of a mask too small to
    have any), because the outer pixel of a solid nodule is diluted by the lung and would read as
    ground-glass. Interior solid share ≥ `SOLID_SHARE` → solid; an interior solid area below a disc of
    `MIN_SOLID_COMPONENT_MM` → ground-glass; otherwise part-solid, whose solid component is the connected
    piece of solid voxels holding most of the interior solid voxels (returned; empty for the other types).
    """
    depth = _in_plane_depth(mask, axis)
    interior = depth >= INTERIOR_DEPTH_PX
    if not interior.any():
        interior = mask & (depth >= depth.max())
    solid = mask & (hu >= SOLID_HU)
    core = solid & interior
    if core.sum() >= SOLID_SHARE * interior.sum():
        return "solid", mask.copy()
    largest_area = float(core.sum(axis=tuple(a for a in range(3) if a != axis)).max()) * pixel_area_mm2
    if 2.0 * np.sqrt(largest_area / np.pi) < MIN_SOLID_COMPONENT_MM:
        return "ground-glass", np.zeros_like(mask)
    labels, _ = ndimage.label(solid)
    counts = np.bincount(labels[core], minlength=labels.max() + 1)
    counts[0] = 0
    return "part-solid", labels == int(np.argmax(counts))


# ------------------------------------------------------------------------------------------ partial volume
#: Reach (mm) of partial volume beyond a voxel's own extent: about 2σ of a CT reconstruction kernel's blur
#: (σ ≈ 0.35–0.55 mm). A voxel belongs to the partial-volume shell when its centre lies within one *shell
#: width* — its spacing + this reach, per axis — of a voxel on the other side of the mask's boundary: one
#: slice on 1.25–2.5 mm slices, two pixels of 0.7 mm in-plane.
PV_REACH_MM = 1.0
#: The parenchyma reference is read in the ring from 1 to this many shell widths outside the mask.
PV_RING = 2.5
#: σ (mm) of the local average of the core's outer layer that gives each shell voxel its nodule reference.
PV_NODULE_SIGMA_MM = 2.0
#: A part-solid nodule needs at least this many ground-glass voxels (below) to read its ground-glass HU.
PV_MIN_GROUND_GLASS_VOXELS = 10


@dataclass(frozen=True)
class PartialVolume:
    """Partial-volume analysis of one mask (`partial_volume`)."""

    volume_mm3: float
    core_voxels: int  # counted whole
    shell_fraction_voxels: float  # Σ of the shell voxels' fractions
    nodule_hu: float  # median over the shell of its voxels' nodule reference
    parenchyma_hu: float
    excluded_voxels: int  # outside shell voxels of an attached dense structure, counted 0


def partial_volume(
    hu: np.ndarray, mask: np.ndarray, spacing_zyx, nodule_hu: float | None = None
) -> PartialVolume:
    """Nodule volume from the HU across the mask's boundary (Kuhnigk et al., IEEE TMI 2006).

    The mask's *core* (mask voxels deeper than one shell width, `PV_REACH_MM`) counts whole; every voxel of
    the *shell* (the rest of the mask and the outside voxels within one shell width) counts
    (HU − HU_parenchyma) / (HU_nodule − HU_parenchyma), clipped to [0, 1]. Both references are local:

    * HU_parenchyma: median of the ring 1 to `PV_RING` shell widths outside the mask, over its voxels below
      the midpoint to the core's median (so vessels and chest wall in the ring do not raise it);
    * HU_nodule: per shell voxel, the Gaussian average (σ `PV_NODULE_SIGMA_MM`) of the core's *outer
      layer* nearest to it — the nodule's own attenuation where the shell meets it: a ground-glass nodule
      is referred to its ground glass, and a calcified centre does not stand for the soft tissue at the
      border. A mask without a core (small nodules on thick slices) uses its deepest voxels. `nodule_hu`
      replaces it with one value (`measure_nodule` passes a part-solid nodule's ground-glass HU).

    Outside shell voxels ≥ the local midpoint that belong to a dense structure reaching beyond the shell
    (an attached vessel, the chest wall) count 0.

    Args:
        hu: HU around the mask, with a margin of `PV_RING` shell widths where the scan has it.
        mask: bool, same shape.
        spacing_zyx: voxel size (mm) along the array axes.
    """
    spacing = np.asarray(spacing_zyx, dtype=np.float64)
    hu = np.asarray(hu, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    sampling = spacing / (spacing + PV_REACH_MM)  # distances in shell widths
    outside = ndimage.distance_transform_edt(~mask, sampling=sampling)
    inside = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=sampling)[1:-1, 1:-1, 1:-1]
    core = mask & (inside > 1.0)
    if not core.any():
        core = mask & (inside >= inside.max())
    shell = (mask & ~core) | (~mask & (outside <= 1.0))
    ring = ~mask & (outside > 1.0) & (outside <= PV_RING)
    ring_hu = hu[ring] if ring.any() else hu[~mask & ~shell]
    core_median = float(np.median(hu[core]))
    if ring_hu.size == 0:  # the mask fills the array: nothing to refer to, count the voxels
        n = float(mask.sum())
        return PartialVolume(n * float(np.prod(spacing)), int(mask.sum()), 0.0, core_median, np.nan, 0)
    parenchyma = float(np.median(ring_hu))
    below = ring_hu[ring_hu < 0.5 * (core_median + parenchyma)]
    if below.size:
        parenchyma = float(np.median(below))
    if nodule_hu is None:
        layer = core & ~ndimage.binary_erosion(core)
        sigma = PV_NODULE_SIGMA_MM / spacing
        weight = ndimage.gaussian_filter(layer.astype(np.float64), sigma, truncate=2.0)
        local = ndimage.gaussian_filter(np.where(layer, hu, 0.0), sigma, truncate=2.0)
        local = np.where(layer, local / np.maximum(weight, 1e-12), 0.0)
        nearest = ndimage.distance_transform_edt(
            ~layer, sampling=spacing, return_distances=False, return_indices=True
        )
        reference = local[tuple(nearest)]
    else:
        reference = np.full(hu.shape, float(nodule_hu))
    contrast = reference - parenchyma
    contrast = np.where(np.abs(contrast) < 1.0, 1.0, contrast)  # no contrast: a voxel is in or out
    fraction = np.clip((hu - parenchyma) / contrast, 0.0, 1.0)
    dense = ~mask & (hu >= parenchyma + 0.5 * contrast)
    labels, n = ndimage.label(dense)
    excluded = np.zeros_like(mask)
    if n:
        reaching = np.unique(labels[dense & (outside > 1.0)])
        excluded = np.isin(labels, reaching[reaching > 0]) & shell
    counted = shell & ~excluded
    fractions = float(fraction[counted].sum())
    return PartialVolume(
        volume_mm3=(float(core.sum()) + fractions) * float(np.prod(spacing)),
        core_voxels=int(core.sum()),
        shell_fraction_voxels=fractions,
        nodule_hu=float(np.median(reference[shell])) if shell.any() else core_median,
        parenchyma_hu=parenchyma,
        excluded_voxels=int(excluded.sum()),
    )


def ground_glass_hu(hu: np.ndarray, mask: np.ndarray, axis: int) -> float | None:
    """Median HU of a nodule's ground glass: mask voxels below `SOLID_HU` that are ≥ `INTERIOR_DEPTH_PX`
    from the outline in their slice and have mask voxels above and below (so the slices a thick-slice
    scan cuts through the nodule's top and bottom, diluted by the lung, do not pass for ground glass);
    None with fewer than `PV_MIN_GROUND_GLASS_VOXELS` such voxels."""
    moved = np.moveaxis(mask, axis, 0)
    between = np.zeros_like(moved)
    between[1:-1] = moved[1:-1] & moved[:-2] & moved[2:]
    between = np.moveaxis(between, 0, axis)
    pick = between & (_in_plane_depth(mask, axis) >= INTERIOR_DEPTH_PX) & (hu < SOLID_HU)
    if pick.sum() < PV_MIN_GROUND_GLASS_VOXELS:
        return None
    return float(np.median(hu[pick]))


def _padded_box(
    mask_box: tuple[slice, ...], spacing: np.ndarray, shape: tuple[int, ...]
) -> tuple[slice, ...]:
    """The mask's bounding box grown by the partial-volume ring (`PV_RING` shell widths) plus one voxel."""
    pad = np.ceil(PV_RING * (spacing + PV_REACH_MM) / spacing).astype(int) + 1
    return tuple(
        slice(max(s.start - int(p), 0), min(s.stop + int(p), n)) for s, p, n in zip(mask_box, pad, shape)
    )


# ------------------------------------------------------------------------------------------ main
def measure_nodule(volume: CTVolume, mask: np.ndarray) -> NoduleMeasurements:
    """Measure one nodule given its bool (z, y, x) mask on `volume`'s grid.

    Raises:
        ValueError: empty mask, or a mask whose shape differs from the volume's.
    """
    mask = np.asarray(mask).astype(bool)
    if mask.shape != volume.shape:
        raise ValueError(
            f"nodule mask shape {mask.shape} differs from the scan's {volume.shape}; "
            "pass a mask on the scan's own grid"
        )
    if not mask.any():
        raise ValueError("empty nodule mask: nothing to measure; pass a mask with at least one voxel")
    coords = np.argwhere(mask)
    lo, hi = coords.min(axis=0), coords.max(axis=0) + 1
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    sub = mask[box]
    hu = np.asarray(volume.array[box], dtype=np.float64)
    vectors = _axis_vectors(volume)

    centre_zyx = coords.mean(axis=0)
    centre_world = volume.voxel_to_world(centre_zyx)[0]
    voxel_mm3 = float(abs(np.linalg.det(vectors)))
    voxel_volume_mm3 = float(mask.sum()) * voxel_mm3

    axis = slice_axis(volume)
    local = _largest_slice(sub, axis)
    long_mm, short_mm = _plane_diameters(sub, axis, local, vectors)

    values = hu[sub]
    in_plane = [a for a in range(3) if a != axis]
    pixel_area = float(np.linalg.norm(np.cross(vectors[in_plane[0]], vectors[in_plane[1]])))
    kind, component = nodule_type(hu, sub, axis, pixel_area)
    solid_mm = solid_mm3 = None
    if kind == "part-solid":
        s_long, s_short = _plane_diameters(component, axis, _largest_slice(component, axis), vectors)
        solid_mm = mean_diameter(s_long, s_short)
        solid_mm3 = float(component.sum()) * voxel_mm3
        if solid_mm >= SOLID_COMPONENT_RATIO * mean_diameter(long_mm, short_mm):
            kind, solid_mm, solid_mm3 = "solid", None, None  # no ground-glass part worth the name
    # A part-solid nodule's border is its ground glass: refer the shell to that, not to the solid core.
    reference = ground_glass_hu(hu, sub, axis) if kind == "part-solid" else None
    spacing = np.linalg.norm(vectors, axis=1)
    pbox = _padded_box(box, spacing, volume.shape)
    pv = partial_volume(np.asarray(volume.array[pbox]), mask[pbox], spacing, nodule_hu=reference)

    return NoduleMeasurements(
        center_world_mm=tuple(float(v) for v in centre_world),
        center_voxel_xyz=tuple(float(v) for v in centre_zyx[::-1]),
        volume_mm3=pv.volume_mm3,
        voxel_volume_mm3=voxel_volume_mm3,
        long_axis_mm=float(long_mm),
        short_axis_mm=float(short_mm),
        mean_diameter_mm=mean_diameter(long_mm, short_mm),
        max_3d_diameter_mm=float(max_3d_diameter(sub, vectors)),
        axial_slice=int(lo[axis] + local),
        mean_hu=float(values.mean()),
        max_hu=float(values.max()),
        type=kind,
        solid_component_mm=solid_mm,
        solid_volume_mm3=solid_mm3,
    )
