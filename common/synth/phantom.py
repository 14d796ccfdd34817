"""Chest CT phantom anatomy: body, lungs, airways, vessel trees, noise and blur.

Why a phantom and not random blobs: every detector, segmenter and classifier in this repository is tested
and demonstrated on data generated here, so the data must pose the problems real chest CT poses. The
phantom therefore has what makes lung-nodule CAD hard and what the preprocessing must handle:

* air (−1000 HU) outside an elliptical body of soft tissue (+40 HU) with a subcutaneous fat layer
  (−100 HU) and a vertebral body (+400 HU), so a threshold lung mask must drop the outside air;
* a chest wall (fat and muscle, 7–20 mm from skin to pleura) all round the thoracic cavity, in every
  slice, so the lungs never touch the outside air and a mask that drops border-connected air keeps them;
* two lungs (≈ −850 HU, denser posteriorly as in a supine patient) shaped as half-ellipsoids with a
  diaphragm dome, clipped to the thoracic cavity (so they lie against the chest wall as real lungs do),
  a mediastinum between them and a heart that makes the left lung smaller;
* a trachea of real size (lumen radius 6–10 mm, even in the miniature small preset) that enters from the
  top of the scan and splits at the carina into two main bronchi with soft-tissue walls, so lung masks
  must find and drop the airway (it is labelled separately, as in LUNA16);
* one branching vessel tree per hilum in each lung — tapering tubes (+40 HU, radius 4 → 0.5 mm) whose
  cross-sections look like small nodules on a single slice: the realistic false-positive mimics;
* CT-like Gaussian noise (σ 20–30 HU, slightly correlated), a slight blur, and optionally the −2000 HU
  padding outside a circular scanner field of view.

Geometry. All anatomy is built in a *canonical* voxel frame with identity direction (LPS: +x patient
left, +y posterior, +z superior; array axes (z, y, x)). Some scans are then stored with the LUNA16 "flipped"
direction ``TransformMatrix = -1 0 0 0 -1 0 0 0 1`` (the array reversed in y and x and the origin moved
to the opposite corner), which keeps every world coordinate identical while exercising the readers' use
of the direction matrix. Anatomy sizes scale with the field of view, so the small test preset is a
miniature chest with real-size (mm) nodules and vessels.

Everything is drawn from a ``numpy.random.Generator`` passed in by the caller (never global state), and
everything is vectorised: the small preset (64 × 160 × 160) builds in well under a second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

# Label values of the LUNA16 `seg-lungs-LUNA16` masks (0 elsewhere).
LEFT_LUNG_LABEL = 3
RIGHT_LUNG_LABEL = 4
AIRWAY_LABEL = 5

# HU of the tissues (means; noise and texture are added on top).
HU_AIR = -1000.0
HU_FAT = -100.0
HU_SOFT = 40.0
HU_BONE = 400.0
HU_LUNG = -850.0
HU_VESSEL = 40.0
HU_FOV_PADDING = -2000

#: The body narrows by this fraction of its radius from mid-scan to the top slice (upper chest).
BODY_TAPER = 0.06
#: Chest wall (skin to pleura, fat and muscle) in mm: a fraction of the field of view within these limits,
#: times a random factor, never above the largest. Real adults have 8–20 mm; the miniature small preset
#: keeps at least 7 mm, more than three 2 mm working voxels of the lung-mask recipe.
CHEST_WALL_FRACTION = 0.04
CHEST_WALL_MM = (7.0, 20.0)

SIZE_PRESETS: dict[str, tuple[int, int, int]] = {
    # (slices, rows, columns). `small` is the default of every test: a miniature chest whose in-plane field
    # of view is 96–144 mm at the drawn 0.6–0.9 mm pixel spacing. `large` has the matrix of a real scan.
    "small": (64, 160, 160),
    "medium": (128, 256, 256),
    "large": (200, 512, 512),
}
IN_PLANE_SPACING_RANGE_MM = (0.6, 0.9)
SLICE_SPACINGS_MM = (1.25, 1.5, 2.0, 2.5)
FLIPPED_DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
IDENTITY_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def size_shape(size: str) -> tuple[int, int, int]:
    """The (z, y, x) matrix of a size preset.

    Raises:
        ValueError: for an unknown preset, naming the known ones.
    """
    try:
        return SIZE_PRESETS[size]
    except KeyError:
        raise ValueError(f"unknown phantom size {size!r}; choose one of {sorted(SIZE_PRESETS)}") from None


@dataclass(frozen=True)
class PhantomGeometry:
    """Where a phantom scan sits in the world: the grid the generator draws before it builds the anatomy.

    Its counterpart for real scans is `common.datasets.geometry.ScanGeometry` (read from a scan header).

    Attributes:
        shape: array shape (z, y, x).
        spacing: voxel size (x, y, z) in mm.
        origin: world position (x, y, z) in mm of stored voxel (0, 0, 0).
        direction: SimpleITK direction matrix, row-major 9-tuple.
        flipped: True when the array is stored reversed in y and x (direction diag(-1, -1, 1)).
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    flipped: bool

    @property
    def canonical_origin(self) -> np.ndarray:
        """World (x, y, z) of canonical voxel (0, 0, 0) (identity direction)."""
        origin = np.asarray(self.origin, dtype=np.float64)
        if self.flipped:
            nz, ny, nx = self.shape
            origin = origin - np.array([self.spacing[0] * (nx - 1), self.spacing[1] * (ny - 1), 0.0])
        return origin

    def canonical_to_world(self, zyx: np.ndarray) -> np.ndarray:
        """World (x, y, z) mm of canonical continuous voxel indices (z, y, x); accepts (..., 3)."""
        zyx = np.asarray(zyx, dtype=np.float64)
        xyz = zyx[..., ::-1] * np.asarray(self.spacing)
        return xyz + self.canonical_origin

    def world_to_canonical(self, xyz: np.ndarray) -> np.ndarray:
        """Canonical continuous voxel indices (z, y, x) of world points (x, y, z); accepts (..., 3)."""
        xyz = np.asarray(xyz, dtype=np.float64)
        ijk = (xyz - self.canonical_origin) / np.asarray(self.spacing)
        return ijk[..., ::-1]

    def to_storage(self, array: np.ndarray) -> np.ndarray:
        """Turn a canonical (z, y, x) array into the stored orientation (a view for flipped scans)."""
        return array[:, ::-1, ::-1] if self.flipped else array

    def canonical_to_storage_index(self, zyx: np.ndarray) -> np.ndarray:
        """Stored voxel indices (z, y, x) of canonical indices; accepts (..., 3)."""
        zyx = np.array(zyx, dtype=np.float64)
        if self.flipped:
            zyx[..., 1] = self.shape[1] - 1 - zyx[..., 1]
            zyx[..., 2] = self.shape[2] - 1 - zyx[..., 2]
        return zyx


def draw_geometry(rng: np.random.Generator, size: str = "small", flipped: bool = False) -> PhantomGeometry:
    """Draw per-scan spacing and a LUNA16-like non-zero origin.

    In-plane spacing is uniform in 0.6–0.9 mm, slice spacing one of 1.25/1.5/2.0/2.5 mm (the LUNA16
    selection keeps slices ≤ 2.5 mm), so the 1 mm resampling of the preprocessing is always exercised.
    The origin puts the field-of-view centre near the world origin in x and y, as scanners do, and the
    first slice at a table position between −400 and −100 mm.
    """
    shape = size_shape(size)
    nz, ny, nx = shape
    pixel = float(np.round(rng.uniform(*IN_PLANE_SPACING_RANGE_MM), 6))
    slice_mm = float(rng.choice(SLICE_SPACINGS_MM))
    spacing = (pixel, pixel, slice_mm)
    centre_xy = rng.uniform(-15.0, 15.0, size=2)
    canonical_origin = np.array(
        [
            centre_xy[0] - pixel * (nx - 1) / 2.0,
            centre_xy[1] - pixel * (ny - 1) / 2.0,
            rng.uniform(-400.0, -100.0),
        ]
    )
    origin = canonical_origin.copy()
    if flipped:
        origin[0] += pixel * (nx - 1)
        origin[1] += pixel * (ny - 1)
    origin = np.round(origin, 6)
    return PhantomGeometry(
        shape=shape,
        spacing=spacing,
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        direction=FLIPPED_DIRECTION if flipped else IDENTITY_DIRECTION,
        flipped=flipped,
    )


class SmoothField:
    """A smooth random scalar field: a sum of a few random plane waves (random Fourier features).

    Cheap to evaluate on a broadcast grid or at single points, which is what both the lung deformation
    (evaluated everywhere and at vessel growth points) and the parenchyma texture need.
    """

    def __init__(self, rng: np.random.Generator, n_waves: int, wavelength_mm: tuple[float, float]) -> None:
        directions = rng.normal(size=(n_waves, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        wavenumbers = 2.0 * np.pi / rng.uniform(*wavelength_mm, size=n_waves)
        self._k = directions * wavenumbers[:, None]
        self._phase = rng.uniform(0.0, 2.0 * np.pi, size=n_waves)
        self._norm = 1.0 / math.sqrt(n_waves / 2.0)
        self._waves = [(tuple(float(v) for v in k), float(p)) for k, p in zip(self._k, self._phase)]

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Field value at mm positions x, y, z (broadcastable), clipped to ±2."""
        if all(np.ndim(a) == 3 for a in (x, y, z)) and {np.shape(a).count(1) for a in (x, y, z)} == {2}:
            return self._on_open_grid(np.ravel(z), np.ravel(y), np.ravel(x))
        if np.ndim(x) == 0 and np.ndim(y) == 0 and np.ndim(z) == 0:
            return self.at_point(float(x), float(y), float(z))
        total = 0.0
        for (kx, ky, kz), phase in zip(self._k, self._phase):
            total = total + np.sin(kx * x + ky * y + kz * z + phase)
        return np.clip(total * self._norm, -2.0, 2.0)

    def at_point(self, x: float, y: float, z: float) -> float:
        """Scalar fast path (vessel growth queries single points thousands of times)."""
        total = 0.0
        for (kx, ky, kz), phase in self._waves:
            total += math.sin(kx * x + ky * y + kz * z + phase)
        return min(max(total * self._norm, -2.0), 2.0)

    def _on_open_grid(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Separable evaluation on a (z, y, x) grid: sin(a+b+c) = Im(e^{ia} e^{ib} e^{ic}), no per-voxel sin."""
        total = np.zeros((z.size, y.size, x.size), dtype=np.complex64)
        for (kx, ky, kz), phase in zip(self._k, self._phase):
            ez = np.exp(1j * (kz * z.astype(np.float64) + phase)).astype(np.complex64)
            ey = np.exp(1j * ky * y.astype(np.float64)).astype(np.complex64)
            ex = np.exp(1j * kx * x.astype(np.float64)).astype(np.complex64)
            total += (ez[:, None] * ey[None, :])[:, :, None] * ex[None, None, :]
        return np.clip(total.imag * np.float32(self._norm), -2.0, 2.0)


@dataclass(frozen=True)
class ChestWall:
    """The body outline and the thoracic cavity inside it, in centred canonical mm coordinates (x, y, z).

    Why a separate cavity: the lungs are cut to it, so between every lung voxel and the outside air lies at
    least `thickness` mm of fat and muscle, in every slice, whatever the lung deformation — which is what a
    lung mask that removes the border-connected air relies on in real chest CT.

    Attributes:
        half_axes: body ellipse semi-axes (ax, ay) in mm at and below mid-scan (z ≤ 0).
        centre_y: y of the body ellipse centre.
        taper_half_length: z (mm) over which the body narrows by `BODY_TAPER` (half the scan length).
        fat_fraction: subcutaneous fat as a fraction of the body radius.
        thickness: skin-to-pleura distance in mm along the ellipse axes (the cavity's semi-axes are the
            body's minus this).
        spine_centre_y: y of the vertebral body (on the midline, x = 0).
        spine_radius: its radius; the cavity keeps `thickness / 4` (≥ 2 mm) of tissue around it.
        z_top: highest z the cavity reaches (below the top slice, so lungs never touch the scan border).
    """

    half_axes: tuple[float, float]
    centre_y: float
    taper_half_length: float
    fat_fraction: float
    thickness: float
    spine_centre_y: float
    spine_radius: float
    z_top: float

    def taper(self, z: np.ndarray | float) -> np.ndarray | float:
        """Scale of the body ellipse at height z (1 up to mid-scan, then narrowing towards the top)."""
        return 1.0 - BODY_TAPER * np.clip(np.divide(z, self.taper_half_length), 0.0, None) ** 2

    def body_radius(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Normalised elliptical radius of the body outline (≤ 1 inside the body), broadcastable."""
        taper = self.taper(z)
        ax, ay = self.half_axes
        return np.sqrt((x / (ax * taper)) ** 2 + ((y - self.centre_y) / (ay * taper)) ** 2)

    def cavity(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Boolean thoracic cavity (inside the chest wall, off the spine, below `z_top`), broadcastable."""
        taper = self.taper(z)
        ax, ay = self.half_axes
        cx = ax * taper - self.thickness
        cy = ay * taper - self.thickness
        spine = self.spine_radius + max(2.0, 0.25 * self.thickness)
        return (
            ((x / cx) ** 2 + ((y - self.centre_y) / cy) ** 2 <= 1.0)
            & (x * x + (y - self.spine_centre_y) ** 2 > spine * spine)
            & (z <= self.z_top)
        )

    def cavity_contains(self, x: float, y: float, z: float) -> bool:
        """Scalar version of `cavity` (vessel growth queries single points)."""
        if z > self.z_top:
            return False
        taper = 1.0 - BODY_TAPER * max(z / self.taper_half_length, 0.0) ** 2
        ax, ay = self.half_axes
        cx = ax * taper - self.thickness
        cy = ay * taper - self.thickness
        spine = self.spine_radius + max(2.0, 0.25 * self.thickness)
        if x * x + (y - self.spine_centre_y) ** 2 <= spine * spine:
            return False
        return (x / cx) ** 2 + ((y - self.centre_y) / cy) ** 2 <= 1.0


@dataclass
class LungShape:
    """Analytic description of one lung in centred canonical mm coordinates (x, y, z).

    A half-ellipsoid standing on a diaphragm dome, deformed by a smooth field, cut medially by the
    mediastinum (and the heart on the left) and, when `wall` is set, to the thoracic cavity.
    """

    side: int  # -1 patient right (−x), +1 patient left (+x)
    centre: tuple[float, float]  # x, y of the base ellipse
    radii: tuple[float, float]  # rx, ry of the base ellipse
    z_base: float
    height: float
    dome: float
    mediastinum_half_width: float
    heart_centre: tuple[float, float, float]
    heart_radii: tuple[float, float, float]
    deform: SmoothField
    deform_amplitude: float
    wall: ChestWall | None = None

    def field(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """≤ 1 inside the lung (before the medial cuts), broadcastable."""
        cx, cy = self.centre
        rx, ry = self.radii
        u = (x - cx) / rx
        v = (y - cy) / ry
        w = (z - self.z_base) / self.height
        return u * u + v * v + w * w - self.deform_amplitude * self.deform(x, y, z)

    def inside(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Boolean lung membership, broadcastable."""
        if np.ndim(x) == 0 and np.ndim(y) == 0 and np.ndim(z) == 0:
            return self.contains(float(x), float(y), float(z))
        cx, cy = self.centre
        rx, ry = self.radii
        u = (x - cx) / rx
        v = (y - cy) / ry
        dome_z = self.z_base + self.dome * np.clip(1.0 - u * u - v * v, 0.0, None)
        hx, hy, hz = self.heart_centre
        ax, ay, az = self.heart_radii
        heart = ((x - hx) / ax) ** 2 + ((y - hy) / ay) ** 2 + ((z - hz) / az) ** 2 <= 1.0
        inside = (
            (self.field(x, y, z) <= 1.0)
            & (z >= dome_z)
            & (self.side * x >= self.mediastinum_half_width)
            & ~heart
        )
        return inside if self.wall is None else inside & self.wall.cavity(x, y, z)

    def contains(self, x: float, y: float, z: float) -> bool:
        """Scalar version of `inside`."""
        if self.side * x < self.mediastinum_half_width:
            return False
        cx, cy = self.centre
        rx, ry = self.radii
        u = (x - cx) / rx
        v = (y - cy) / ry
        if z < self.z_base + self.dome * max(1.0 - u * u - v * v, 0.0):
            return False
        hx, hy, hz = self.heart_centre
        ax, ay, az = self.heart_radii
        if ((x - hx) / ax) ** 2 + ((y - hy) / ay) ** 2 + ((z - hz) / az) ** 2 <= 1.0:
            return False
        if self.wall is not None and not self.wall.cavity_contains(x, y, z):
            return False
        w = (z - self.z_base) / self.height
        return u * u + v * v + w * w - self.deform_amplitude * self.deform.at_point(x, y, z) <= 1.0


@dataclass
class VesselSegment:
    """A tapering tube between two canonical mm points (centred coordinates)."""

    start: np.ndarray
    end: np.ndarray
    r_start: float
    r_end: float
    generation: int


@dataclass
class Anatomy:
    """The noise-free phantom in the canonical frame.

    Attributes:
        hu: float32 HU (z, y, x) without nodules, noise or blur.
        labels: uint8 (z, y, x): 3 left lung, 4 right lung, 5 trachea + main bronchi, 0 elsewhere.
        vessel: float32 (z, y, x) vessel partial-volume fraction inside the lungs.
        branch_points: (N, 3) canonical voxel (z, y, x) of vessel bifurcations (false-positive mimics).
        segments: the vessel tubes (centred mm coordinates).
        lung_shapes: the analytic lungs, right first.
        noise_sigma: σ in HU of the noise `finish_scan` will add.
        blur_sigma_mm: σ in mm of the blur `finish_scan` will apply.
        fov_padding: whether `finish_scan` pads outside a circular field of view with −2000.
    """

    hu: np.ndarray
    labels: np.ndarray
    vessel: np.ndarray
    branch_points: np.ndarray
    segments: list[VesselSegment]
    lung_shapes: list[LungShape]
    noise_sigma: float
    blur_sigma_mm: float
    fov_padding: bool
    centre_offset_zyx: np.ndarray = field(default_factory=lambda: np.zeros(3))

    @property
    def lung_region(self) -> np.ndarray:
        """Boolean mask of both lungs (vessels included, airway excluded)."""
        return (self.labels == LEFT_LUNG_LABEL) | (self.labels == RIGHT_LUNG_LABEL)


def _centred_axes(geometry: PhantomGeometry) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Open-grid mm coordinates (z, y, x broadcastable) centred on the volume, plus the centre index."""
    nz, ny, nx = geometry.shape
    sx, sy, sz = geometry.spacing
    centre = np.array([(nz - 1) / 2.0, (ny - 1) / 2.0, (nx - 1) / 2.0])
    z = ((np.arange(nz, dtype=np.float32) - centre[0]) * sz)[:, None, None]
    y = ((np.arange(ny, dtype=np.float32) - centre[1]) * sy)[None, :, None]
    x = ((np.arange(nx, dtype=np.float32) - centre[2]) * sx)[None, None, :]
    return z, y, x, centre


def _segment_distance(
    points: tuple[np.ndarray, np.ndarray, np.ndarray], start: np.ndarray, end: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Distance (mm) from grid points (z, y, x mm arrays, broadcastable) to a segment, and the segment
    parameter t ∈ [0, 1] of the closest point. `start`/`end` are (x, y, z) mm."""
    pz, py, px = points
    d = end - start
    length2 = float(d @ d) or 1e-9
    t = ((px - start[0]) * d[0] + (py - start[1]) * d[1] + (pz - start[2]) * d[2]) / length2
    t = np.clip(t, 0.0, 1.0)
    dx = px - (start[0] + t * d[0])
    dy = py - (start[1] + t * d[1])
    dz = pz - (start[2] + t * d[2])
    return np.sqrt(dx * dx + dy * dy + dz * dz), t


def _draw_tube(
    target: np.ndarray,
    geometry: PhantomGeometry,
    centre_index: np.ndarray,
    start: np.ndarray,
    end: np.ndarray,
    r_start: float,
    r_end: float,
    soft: bool = True,
) -> None:
    """Rasterise a tapering capsule into `target` (max-combine), restricted to its bounding box.

    With `soft`, the value is the partial-volume fraction (anti-aliased over one pixel), else 0/1.
    """
    sx, sy, sz = geometry.spacing
    spacing_xyz = np.array([sx, sy, sz])
    r_max = max(r_start, r_end) + max(sx, sz)
    lo_xyz = np.minimum(start, end) - r_max
    hi_xyz = np.maximum(start, end) + r_max
    lo = np.floor(lo_xyz / spacing_xyz + centre_index[::-1]).astype(int)
    hi = np.ceil(hi_xyz / spacing_xyz + centre_index[::-1]).astype(int) + 1
    nz, ny, nx = target.shape
    x0, y0, z0 = max(lo[0], 0), max(lo[1], 0), max(lo[2], 0)
    x1, y1, z1 = min(hi[0], nx), min(hi[1], ny), min(hi[2], nz)
    if x0 >= x1 or y0 >= y1 or z0 >= z1:
        return
    z = ((np.arange(z0, z1, dtype=np.float32) - centre_index[0]) * sz)[:, None, None]
    y = ((np.arange(y0, y1, dtype=np.float32) - centre_index[1]) * sy)[None, :, None]
    x = ((np.arange(x0, x1, dtype=np.float32) - centre_index[2]) * sx)[None, None, :]
    dist, t = _segment_distance((z, y, x), start, end)
    radius = r_start + (r_end - r_start) * t
    if soft:
        value = np.clip((radius - dist) / sx + 0.5, 0.0, 1.0)
    else:
        value = (dist <= radius).astype(np.float32)
    view = target[z0:z1, y0:y1, x0:x1]
    np.maximum(view, value.astype(target.dtype, copy=False), out=view)


def _rotate_towards(direction: np.ndarray, rng: np.random.Generator, angle: float) -> np.ndarray:
    """Rotate a unit vector by `angle` about a random axis perpendicular to it."""
    hx, hy, hz = (float(v) for v in rng.normal(size=3))
    dx, dy, dz = (float(v) for v in direction)
    ax, ay, az = dy * hz - dz * hy, dz * hx - dx * hz, dx * hy - dy * hx
    norm = math.sqrt(ax * ax + ay * ay + az * az) + 1e-12
    ax, ay, az = ax / norm, ay / norm, az / norm
    c, s = math.cos(angle), math.sin(angle)
    rotated = np.array(
        [dx * c + (ay * dz - az * dy) * s, dy * c + (az * dx - ax * dz) * s, dz * c + (ax * dy - ay * dx) * s]
    )
    return rotated / np.linalg.norm(rotated)


def _grow_tree(
    rng: np.random.Generator,
    lung: LungShape,
    root: np.ndarray,
    direction: np.ndarray,
    length: float,
    radius: float,
    min_radius: float,
) -> tuple[list[VesselSegment], list[np.ndarray]]:
    """Grow a binary vessel tree inside `lung` (iteratively, breadth first, deterministic order)."""
    segments: list[VesselSegment] = []
    branch_points: list[np.ndarray] = []
    stack = [(root, direction, length, radius, 0)]
    while stack:
        start, dirn, seg_len, r0, generation = stack.pop(0)
        r1 = r0 * 0.92
        end = None
        # Near the pleura, first shorten the branch, then bend it back towards the lung core.
        core = np.array([lung.centre[0], lung.centre[1], lung.z_base + 0.4 * lung.height])
        inward = core - start
        inward /= np.linalg.norm(inward) + 1e-12
        for bend, shrink in ((0.0, 1.0), (0.0, 0.6), (0.5, 0.8), (0.5, 0.45)):
            trial = (1.0 - bend) * dirn + bend * inward
            trial /= np.linalg.norm(trial) + 1e-12
            candidate = start + trial * seg_len * shrink
            if lung.inside(*candidate):
                end = candidate
                break
        if end is None:
            continue
        segments.append(VesselSegment(start, end, r0, r1, generation))
        child_radius = r1 * rng.uniform(0.74, 0.86)
        if child_radius < min_radius or generation >= 8:
            continue
        branch_points.append(end)
        outward = end - start
        outward /= np.linalg.norm(outward) + 1e-12
        for _ in range(2):
            child_dir = _rotate_towards(outward, rng, math.radians(rng.uniform(22.0, 42.0)))
            stack.append((end, child_dir, seg_len * rng.uniform(0.68, 0.85), child_radius, generation + 1))
    return segments, branch_points


def _lung_box(
    lung: LungShape, geometry: PhantomGeometry, centre_index: np.ndarray
) -> tuple[slice, slice, slice]:
    """Index bounding box (z, y, x slices) that surely contains the lung (field deformation ≤ 2·amplitude)."""
    sx, sy, sz = geometry.spacing
    margin = math.sqrt(1.0 + 2.0 * lung.deform_amplitude) + 0.02
    cx, cy = lung.centre
    rx, ry = lung.radii
    lo = np.array([lung.z_base / sz, (cy - margin * ry) / sy, (cx - margin * rx) / sx]) + centre_index
    hi = (
        np.array(
            [(lung.z_base + margin * lung.height) / sz, (cy + margin * ry) / sy, (cx + margin * rx) / sx]
        )
        + centre_index
    )
    return tuple(
        slice(max(int(math.floor(a)), 0), min(int(math.ceil(b)) + 1, n))
        for a, b, n in zip(lo, hi, geometry.shape)
    )


def build_anatomy(rng: np.random.Generator, geometry: PhantomGeometry) -> Anatomy:
    """Draw and rasterise the anatomy of one scan in the canonical frame."""
    z, y, x, centre_index = _centred_axes(geometry)
    nz, ny, nx = geometry.shape
    sx, sy, sz = geometry.spacing
    width_x = nx * sx
    width_y = ny * sy
    extent_z = nz * sz

    # Body: an ellipse per slice, slightly narrower towards the top of the chest, with a chest wall of fat
    # and muscle round the thoracic cavity that the lungs are cut to.
    body_ax = 0.44 * width_x * rng.uniform(0.95, 1.02)
    body_ay = 0.33 * width_y * rng.uniform(0.93, 1.03)
    body_cy = 0.02 * width_y
    fat_fraction = rng.uniform(0.04, 0.08)
    wall_mm = min(
        float(np.clip(CHEST_WALL_FRACTION * width_x, *CHEST_WALL_MM)) * rng.uniform(1.0, 1.4),
        CHEST_WALL_MM[1],
    )
    # Muscle inside the fat: the wall is at least the fat layer plus 3 mm.
    wall_mm = max(wall_mm, fat_fraction * body_ax + 3.0)
    spine_r = 0.055 * width_x
    top_z = (nz - 1 - centre_index[0]) * sz
    chest = ChestWall(
        half_axes=(float(body_ax), float(body_ay)),
        centre_y=float(body_cy),
        taper_half_length=extent_z / 2.0,
        fat_fraction=float(fat_fraction),
        thickness=float(wall_mm),
        spine_centre_y=float(body_cy + body_ay * 0.72),
        spine_radius=float(spine_r),
        z_top=float(top_z - max(4.0, 2.0 * sz)),
    )
    r_body = chest.body_radius(x, y, z)
    hu = np.full(geometry.shape, HU_AIR, dtype=np.float32)
    hu[np.broadcast_to(r_body <= 1.0, geometry.shape)] = HU_FAT
    hu[np.broadcast_to(r_body <= 1.0 - chest.fat_fraction, geometry.shape)] = HU_SOFT

    # Vertebral body, posterior midline, the whole length of the scan.
    spine = (x**2 + (y - chest.spine_centre_y) ** 2) <= spine_r**2
    hu[np.broadcast_to(spine, geometry.shape)] = HU_BONE

    # Lungs: half-ellipsoids on the diaphragm, apices near the top of the scan, sized to the thoracic cavity
    # at the base: each lung reaches the lateral chest wall (the cavity cut flattens it against the ribs'
    # plane), the smaller left lung leaves room for the heart medially.
    cavity_ax = body_ax - wall_mm
    cavity_ay = body_ay - wall_mm
    z_base = -0.42 * extent_z * rng.uniform(0.9, 1.05)
    height = (0.40 * extent_z - z_base) * rng.uniform(0.93, 1.0)
    heart_centre = (0.05 * width_x, -0.08 * width_y, z_base + 0.18 * height)
    heart_radii = (0.16 * width_x, 0.14 * width_y, 0.32 * height)
    mediastinum = 0.05 * width_x
    lungs: list[LungShape] = []
    for side in (-1, +1):
        size_x = rng.uniform(0.95, 1.05)
        reach = cavity_ax * (1.0 + 0.6 * (size_x - 0.95))
        rx = (1.0 if side < 0 else 0.17 / 0.185) * (reach - mediastinum) / 1.85
        ry = cavity_ay * rng.uniform(0.95, 1.05)
        cx = side * (reach - rx)
        lungs.append(
            LungShape(
                side=side,
                centre=(cx, body_cy + 0.01 * width_y),
                radii=(rx, ry),
                z_base=z_base,
                height=height,
                dome=0.22 * height * rng.uniform(0.8, 1.2),
                mediastinum_half_width=mediastinum,
                heart_centre=heart_centre,
                heart_radii=heart_radii,
                deform=SmoothField(rng, 5, (0.6 * rx * 2, 1.5 * rx * 2)),
                deform_amplitude=float(rng.uniform(0.06, 0.12)),
                wall=chest,
            )
        )

    labels = np.zeros(geometry.shape, dtype=np.uint8)
    for lung in lungs:
        box = _lung_box(lung, geometry, centre_index)
        inside = lung.inside(x[:, :, box[2]], y[:, box[1], :], z[box[0], :, :])
        labels[box][inside] = RIGHT_LUNG_LABEL if lung.side < 0 else LEFT_LUNG_LABEL
    lung_any = labels > 0
    # Parenchyma: a smooth texture plus the gravity gradient of a supine patient (posterior lung denser).
    box = tuple(
        slice(int(idx.min()), int(idx.max()) + 1) for idx in np.nonzero(np.any(lung_any, axis=(1, 2)))
    ) + (
        slice(None),
        slice(None),
    )
    zb, yb, xb = (
        z[box[0], :, :],
        y[:, box[1], :],
        x[:, :, box[2]],
    )
    texture = SmoothField(rng, 6, (8.0, 30.0))
    lung_hu = (
        HU_LUNG
        + rng.uniform(-25.0, 25.0)
        + 18.0 * texture(xb, yb, zb)
        + 35.0 * np.clip(yb / (0.3 * width_y), -1.0, 1.0)
    ).astype(np.float32)
    hu_box = hu[box]
    np.copyto(hu_box, lung_hu, where=lung_any[box])

    # Airway: trachea from the top slice to the carina, two main bronchi into the hila. The lumen keeps a
    # real size even in a miniature chest: lung-mask recipes find the trachea by its area (CLAF-style
    # tracing seeds on a 40–800 mm² air region near the midline) and would seed on a lung instead.
    trachea_r = float(np.clip(0.03 * width_x, 6.0, 10.0))
    wall = max(2.0, 1.6 * sx)
    carina = np.array([-0.01 * width_x, -0.06 * width_y, z_base + 0.62 * height])
    top = np.array([carina[0], carina[1] - 0.02 * width_y, (nz - 1 - centre_index[0]) * sz + 2.0 * sz])
    airway_outer = np.zeros(geometry.shape, dtype=np.float32)
    airway_lumen = np.zeros(geometry.shape, dtype=np.float32)
    hilum_points = []
    for lung in lungs:
        cx, cy = lung.centre
        hilum = np.array(
            [cx - lung.side * 0.45 * lung.radii[0], cy - 0.05 * width_y, carina[2] - 0.1 * height]
        )
        hilum_points.append(hilum)
        bronchus_r = 0.7 * trachea_r
        _draw_tube(
            airway_outer, geometry, centre_index, carina, hilum, bronchus_r + wall, bronchus_r + wall, False
        )
        _draw_tube(airway_lumen, geometry, centre_index, carina, hilum, bronchus_r, bronchus_r * 0.9, False)
    _draw_tube(airway_outer, geometry, centre_index, top, carina, trachea_r + wall, trachea_r + wall, False)
    _draw_tube(airway_lumen, geometry, centre_index, top, carina, trachea_r, trachea_r, False)
    airway = airway_outer > 0
    hu[airway] = HU_SOFT
    hu[airway_lumen > 0] = HU_AIR
    labels[airway] = AIRWAY_LABEL

    # Vessel trees: four roots per hilum, aimed at the apex, the lateral lung and the anterior and posterior
    # bases, so the branches fill the lung the way the pulmonary arteries and veins do.
    min_radius = 0.5
    root_radius = float(np.clip(0.022 * width_x, 1.6, 4.0))
    segments: list[VesselSegment] = []
    branch_points: list[np.ndarray] = []
    for lung, hilum in zip(lungs, hilum_points):
        cx, cy = lung.centre
        rx, ry = lung.radii
        targets = (
            (cx, cy, lung.z_base + 0.85 * lung.height),
            (cx + lung.side * 0.65 * rx, cy, lung.z_base + 0.45 * lung.height),
            (cx, cy - 0.55 * ry, lung.z_base + 0.15 * lung.height),
            (cx + lung.side * 0.2 * rx, cy + 0.55 * ry, lung.z_base + 0.12 * lung.height),
        )
        for target in targets:
            root = hilum + np.array(
                [lung.side * (trachea_r + 2.0 * wall), 0.0, rng.uniform(-0.05, 0.05) * height]
            )
            if not lung.inside(*root):
                root = np.array([cx - lung.side * 0.35 * rx, cy, hilum[2]])
            direction = np.asarray(target) - root
            distance = float(np.linalg.norm(direction))
            direction = _rotate_towards(direction / distance, rng, math.radians(rng.uniform(0.0, 12.0)))
            tree, points = _grow_tree(
                rng, lung, root, direction, 0.4 * distance, root_radius * rng.uniform(0.8, 1.0), min_radius
            )
            segments.extend(tree)
            branch_points.extend(points)
    vessel = np.zeros(geometry.shape, dtype=np.float32)
    for seg in segments:
        _draw_tube(vessel, geometry, centre_index, seg.start, seg.end, seg.r_start, seg.r_end, True)
    lung_region = (labels == LEFT_LUNG_LABEL) | (labels == RIGHT_LUNG_LABEL)
    vessel *= lung_region
    hu = hu + vessel * (HU_VESSEL - hu)

    if branch_points:
        points_xyz = np.asarray(branch_points)
        branch_zyx = points_xyz[:, ::-1] / np.array([sz, sy, sx]) + centre_index
    else:
        branch_zyx = np.zeros((0, 3))
    return Anatomy(
        hu=hu.astype(np.float32, copy=False),
        labels=labels,
        vessel=vessel,
        branch_points=branch_zyx,
        segments=segments,
        lung_shapes=lungs,
        noise_sigma=float(rng.uniform(20.0, 30.0)),
        blur_sigma_mm=float(rng.uniform(0.35, 0.55)),
        fov_padding=bool(rng.random() < 0.25),
        centre_offset_zyx=centre_index,
    )


def finish_scan(
    rng: np.random.Generator, hu: np.ndarray, anatomy: Anatomy, geometry: PhantomGeometry
) -> np.ndarray:
    """Blur, add correlated noise, pad outside the field of view, and round to int16 (canonical frame).

    The blur stands for the reconstruction kernel; the noise is white noise smoothed over about one
    pixel and rescaled to the drawn σ, which is closer to CT noise texture than white noise.
    """
    sx, sy, sz = geometry.spacing
    sigma_vox = (anatomy.blur_sigma_mm / sz, anatomy.blur_sigma_mm / sy, anatomy.blur_sigma_mm / sx)
    image = ndimage.gaussian_filter(hu, sigma=sigma_vox, mode="nearest", truncate=3.0)
    noise = rng.standard_normal(size=geometry.shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, sigma=(0.0, 0.6, 0.6), truncate=2.5)
    # Smoothing shrinks the white-noise σ; divide by the exact factor so the drawn σ is what the scan has.
    noise *= np.float32(anatomy.noise_sigma / _smoothed_noise_std(0.6))
    image += noise
    if anatomy.fov_padding:
        nz, ny, nx = geometry.shape
        yy = np.arange(ny)[:, None] - (ny - 1) / 2.0
        xx = np.arange(nx)[None, :] - (nx - 1) / 2.0
        outside = (yy**2 + xx**2) > (min(nx, ny) / 2.0) ** 2
        image[:, outside] = HU_FOV_PADDING
    np.clip(image, -3024, 3071, out=image)
    return np.rint(image).astype(np.int16)


def _smoothed_noise_std(sigma_px: float) -> float:
    """Standard deviation of unit white noise after a 2D Gaussian filter of `sigma_px` (truncate 2.5)."""
    radius = int(2.5 * sigma_px + 0.5)
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma_px) ** 2)
    kernel /= kernel.sum()
    # The 2D kernel is the outer product k kᵀ, so the filtered σ is sqrt(Σ_ij k_i² k_j²) = Σ_i k_i².
    return float(np.sum(kernel**2))
