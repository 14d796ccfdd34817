"""A synthetic chest CT with known lungs, airways and body, for lung-mask and resampling checks.

Geometry in mm relative to the volume (width W along x, height H along y, length D along z; the last slice is
the head end, as with an identity direction in LPS):
body ellipse (+40 HU) with a vertebra (+700 HU) inside the scanner's circular field of view (−3024 HU
padding outside), two lung ellipsoids (−850 HU) with a few vessels (+40 HU spheres), a trachea tube of air
(−1000 HU) from the top down to the carina, two main bronchi from the carina into the lungs, a pocket of
bowel gas below and between the lungs, and Gaussian noise. Built slice by slice so a 512×512×300 scan takes seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ChestPhantom:
    """Phantom voxels and its ground truth, all (z, y, x).

    Attributes:
        hu: int16 HU image.
        lungs: true lung mask (the two ellipsoids, intra-pulmonary airways included).
        airway: trachea and bronchi outside the lungs.
        body: soft tissue of the body (outside lungs and airways).
        spacing: (x, y, z) mm.
    """

    hu: np.ndarray
    lungs: np.ndarray
    airway: np.ndarray
    body: np.ndarray
    spacing: tuple[float, float, float]


def _segment_distance2(px, py, pz, p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    d = p1 - p0
    length2 = float(d @ d)
    rx, ry, rz = px - p0[0], py - p0[1], pz - p0[2]
    t = np.clip((rx * d[0] + ry * d[1] + rz * d[2]) / length2, 0.0, 1.0)
    return (rx - t * d[0]) ** 2 + (ry - t * d[1]) ** 2 + (rz - t * d[2]) ** 2


def chest_phantom(
    shape: tuple[int, int, int] = (120, 160, 160),
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.5),
    noise_hu: float = 20.0,
    seed: int = 0,
    chest_wall_mm: float | None = None,
) -> ChestPhantom:
    """Build the phantom on a (z, y, x) grid with `spacing` (x, y, z) mm.

    `chest_wall_mm` narrows the body so that the lateral chest wall is only that thick (a thin patient);
    by default it is about a tenth of the width.
    """
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    sx, sy, sz = spacing
    width, height, length = nx * sx, ny * sy, nz * sz
    x = (np.arange(nx) * sx)[None, :]
    y = (np.arange(ny) * sy)[:, None]
    cx, cy = width / 2, height / 2
    fov = (x - cx) ** 2 + (y - cy) ** 2 > (0.5 * min(width, height)) ** 2
    body_ax = 0.42 * width if chest_wall_mm is None else 0.33 * width + chest_wall_mm
    body2d = ((x - cx) / body_ax) ** 2 + ((y - cy) / (0.30 * height)) ** 2 <= 1
    spine2d = (x - cx) ** 2 + (y - (cy + 0.2 * height)) ** 2 <= (0.05 * width) ** 2
    lung_centres = [(cx + side * 0.19 * width, cy - 0.02 * height) for side in (-1, 1)]
    lung_axes = (0.14 * width, 0.20 * height, 0.38 * length)
    lung_zc = 0.45 * length
    lung_q = [((x - lx) / lung_axes[0]) ** 2 + ((y - ly) / lung_axes[1]) ** 2 for lx, ly in lung_centres]
    carina = np.array([cx, cy - 0.05 * height, 0.70 * length])
    trachea_r, bronchus_r = 8.0, 5.0
    trachea2d = (x - carina[0]) ** 2 + (y - carina[1]) ** 2 <= trachea_r**2
    bronchus_ends = [np.array([lx, ly - 0.01 * height, 0.58 * length]) for lx, ly in lung_centres]
    vessels = []
    for lx, ly in lung_centres:
        for k in range(3):
            vessels.append(
                (
                    np.array(
                        [lx + (k - 1) * 0.04 * width, ly + 0.05 * height, lung_zc + (k - 1) * 0.15 * length]
                    ),
                    3.5,
                )
            )
    gas = (np.array([cx, cy + 0.05 * height, 0.03 * length]), min(12.0, 0.06 * width))

    hu = np.empty(shape, dtype=np.float32)
    lungs = np.zeros(shape, dtype=bool)
    airway = np.zeros(shape, dtype=bool)
    for k in range(nz):
        z = k * sz
        sl = np.full((ny, nx), -1000.0, dtype=np.float32)
        sl[body2d] = 40.0
        sl[spine2d] = 700.0
        lung = np.zeros((ny, nx), dtype=bool)
        dz2 = ((z - lung_zc) / lung_axes[2]) ** 2
        if dz2 < 1:
            for q in lung_q:
                lung |= q <= 1 - dz2
        sl[lung] = -850.0
        for centre, radius in vessels:
            if abs(z - centre[2]) < radius:
                r2 = radius**2 - (z - centre[2]) ** 2
                sl[((x - centre[0]) ** 2 + (y - centre[1]) ** 2 <= r2) & lung] = 40.0
        air = np.zeros((ny, nx), dtype=bool)
        if z >= carina[2]:
            air |= trachea2d
        for end in bronchus_ends:
            if min(carina[2], end[2]) - bronchus_r <= z <= max(carina[2], end[2]) + bronchus_r:
                air |= _segment_distance2(x, y, z, carina, end) <= bronchus_r**2
        centre, radius = gas
        if abs(z - centre[2]) < radius:
            sl[(x - centre[0]) ** 2 + (y - centre[1]) ** 2 <= radius**2 - (z - centre[2]) ** 2] = -1000.0
        sl[air] = -1000.0
        lungs[k] = lung
        airway[k] = air & ~lung
        hu[k] = sl
    if noise_hu > 0:
        hu += rng.standard_normal(shape, dtype=np.float32) * np.float32(noise_hu)
    hu[:, fov] = -3024.0
    body = np.broadcast_to(body2d & ~fov, shape) & ~lungs & ~airway
    return ChestPhantom(np.rint(hu).astype(np.int16), lungs, airway, body, spacing)
