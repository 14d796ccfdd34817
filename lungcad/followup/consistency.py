"""One segmentation decision for both time points of a matched nodule (the HU fallback's masks).

Segmented alone, each scan of a juxta-vascular or juxta-pleural nodule gets its own cut: the smart opening of
`lungcad.pipeline.fallback_mask` separates the vessel or wall on one scan and not on the other, or cuts it at
another place, and the volume changes by 30–200 % without any growth (docs/journal/2026-12-07-volumetry.md).
The ±27 % repeatability behind the VDT interval (`lungcad.followup.growth`) is that of one method applied the
same way twice, so here both scans get one cut:

1. one search sphere in the prior's frame: centred on the prior centre, radius from the larger of the two
   diameters (`lungcad.pipeline.search_radius_mm`); the current scan's voxels are placed in it through the
   registration (current → prior);
2. each scan's own threshold (`lungcad.pipeline.fallback_levels`: the local midpoint between its nodule core
   and its parenchyma) gives its voxels ≥ T inside the sphere;
3. the *common* voxels ≥ T (the current's placed onto the prior grid by nearest neighbour, anded with the
   prior's) — the anatomy present at both times: the nodule's unchanged part, the vessel, the wall — get
   the smart opening (`lungcad.pipeline.smart_opening`) at the prior grid;
4. what lies *beyond the cut* — the common pieces left outside the opened piece that reach the sphere's
   surface and do not touch the opened piece (so slices that the opening shaved off the nodule's top and
   bottom stay the nodule's) — is removed from each scan's voxels ≥ T (mapped back onto the current grid
   for the current), and each scan keeps its connected piece at the centre, holes filled
   (`lungcad.pipeline.fill_holes`). Common anatomy that reaches the surface is removed even where it does
   not touch the nodule in one scan: that is the juxta-pleural case where the wall joins the nodule on one
   scan only.

Everything else — the nodule's outline at each time, its growth (only in the current scan, so never part
of the common anatomy) — stays each scan's own; no opening is applied to each scan's piece afterwards (that
was the independent decision that differed between scans). `attached` says when a piece still reaches the
surface after the cut (an attachment not present at both times, or not separable within the largest
opening): its volume then holds part of that structure.

Measured on the follow-up phantoms: docs/followup.md, docs/journal/2026-12-07-followup-consistency.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.ndimage as ndi

from common.io import CTVolume
from lungcad.pipeline import (
    _box_around,
    _component_at,
    fallback_levels,
    fill_holes,
    search_radius_mm,
    smart_opening,
)

PointMap = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class JointSegmentation:
    """Masks (bool, each scan's whole grid) of one nodule at two time points, cut the same way."""

    prior_mask: np.ndarray
    current_mask: np.ndarray
    opening_radius_mm: float  # the opening that cut the common anatomy; 0: none needed
    attached: (
        bool  # a piece still reaches the search sphere after the cut (it holds part of a vessel or wall)
    )
    cut_mm3: float  # volume beyond the cut (prior grid), removed from both scans


def _world_grid(volume: CTVolume, box: tuple[slice, ...]) -> np.ndarray:
    """World (x, y, z) of every voxel of `box`, shape (n, 3) in C order."""
    grid = np.stack(np.meshgrid(*[np.arange(s.start, s.stop) for s in box], indexing="ij"), -1)
    return volume.voxel_to_world(grid.reshape(-1, 3))


def _lookup(
    values: np.ndarray, box: tuple[slice, ...], volume: CTVolume, world_xyz: np.ndarray
) -> np.ndarray:
    """Nearest-neighbour value of `values` (defined on `box` of `volume`) at world points; False outside."""
    index = np.rint(volume.world_to_voxel(world_xyz) - [s.start for s in box]).astype(int)
    inside = np.all((index >= 0) & (index < values.shape), axis=1)
    out = np.zeros(len(index), dtype=bool)
    out[inside] = values[tuple(index[inside].T)]
    return out


def joint_fallback(
    prior: CTVolume,
    current: CTVolume,
    prior_centre_xyz: np.ndarray,
    diameter_mm: float,
    prior_to_current: PointMap,
    current_to_prior: PointMap,
) -> JointSegmentation | None:
    """The nodule at `prior_centre_xyz` (prior world mm) segmented at both time points with one cut.

    Args:
        diameter_mm: the larger of the nodule's two diameters (the sphere must hold the grown nodule).
        prior_to_current, current_to_prior: world (N, 3) → world (N, 3) through the registration
            (`RegistrationResult.prior_to_current` / `current_to_prior`).

    Returns:
        None when either scan holds no contrast at the nodule (`fallback_levels`) or nothing ≥ T near it.
    """
    d = max(float(diameter_mm), 3.0)
    radius = search_radius_mm(d)
    centre_xyz = np.asarray(prior_centre_xyz, dtype=np.float64).reshape(3)
    s_a = np.asarray(prior.spacing, dtype=np.float64)[::-1]
    s_b = np.asarray(current.spacing, dtype=np.float64)[::-1]
    centre_a = prior.world_to_voxel(centre_xyz)[0]
    box_a = _box_around(centre_a, (radius + 1.0) / s_a + 1, prior.shape)
    centre_b = current.world_to_voxel(prior_to_current(centre_xyz[None]))[0]
    # The sphere in the current scan can be larger by the registration's scale (≤ 1.25, its check).
    box_b = _box_around(centre_b, (1.25 * radius + 1.0) / s_b + 1, current.shape)
    world_a = _world_grid(prior, box_a)
    world_b = _world_grid(current, box_b)
    in_prior_b = current_to_prior(world_b)
    shape_a = tuple(s.stop - s.start for s in box_a)
    shape_b = tuple(s.stop - s.start for s in box_b)
    dist_a = np.linalg.norm(world_a - centre_xyz, axis=1).reshape(shape_a)
    dist_b = np.linalg.norm(in_prior_b - centre_xyz, axis=1).reshape(shape_b)
    hu_a = np.asarray(prior.array[box_a], dtype=np.float64)
    hu_b = np.asarray(current.array[box_b], dtype=np.float64)
    levels_a = fallback_levels(hu_a, dist_a, d, s_a)
    levels_b = fallback_levels(hu_b, dist_b, d, s_b)
    if levels_a is None or levels_b is None:
        return None
    dense_a = (dist_a <= radius) & (hu_a >= levels_a["threshold_hu"])
    dense_b = (dist_b <= radius) & (hu_b >= levels_b["threshold_hu"])
    local_a = centre_a - [s.start for s in box_a]
    local_b = centre_b - [s.start for s in box_b]
    common = dense_a & _lookup(dense_b, box_b, current, prior_to_current(world_a)).reshape(shape_a)
    rim = dist_a > radius - float(s_a.max())
    opened = smart_opening(common, local_a, d, s_a, rim)
    if opened is None:
        return None
    kept, used, _ = opened
    # What lies beyond the cut: common pieces reaching the surface, not touching the kept piece (a nodule's
    # top or bottom slice that the opening shaved off touches it and stays the nodule's).
    beyond = common & ~ndi.binary_dilation(kept, structure=np.ones((3, 3, 3), dtype=bool))
    labels, _ = ndi.label(beyond)
    reaching = np.unique(labels[rim & (labels > 0)])
    cut = np.isin(labels, reaching[reaching > 0])
    cut_b = _lookup(cut, box_a, prior, in_prior_b).reshape(shape_b)
    piece_a = _component_at(dense_a & ~cut, local_a, 0.5 * d / s_a)
    piece_b = _component_at(dense_b & ~cut_b, local_b, 0.5 * d / s_b)
    if piece_a is None or piece_b is None:
        return None
    rim_b = dist_b > radius - float(s_b.max())
    attached = bool((piece_a & rim).any() or (piece_b & rim_b).any())
    mask_a = np.zeros(prior.shape, dtype=bool)
    mask_a[box_a] = fill_holes(piece_a)
    mask_b = np.zeros(current.shape, dtype=bool)
    mask_b[box_b] = fill_holes(piece_b)
    return JointSegmentation(
        prior_mask=mask_a,
        current_mask=mask_b,
        opening_radius_mm=float(used),
        attached=bool(attached),
        cut_mm3=float(cut.sum()) * float(np.prod(s_a)),
    )
