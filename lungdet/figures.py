"""Report figures of lungdet: candidates drawn on the scan (the paper's Fig. 7, one candidate per PNG).

Figures use ``matplotlib.figure.Figure`` directly (no pyplot state, no display needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Circle, Rectangle

__all__ = ["save_candidate_overlay"]


def save_candidate_overlay(
    image: np.ndarray,
    centre_zyx: Sequence[float],
    path: str | Path,
    *,
    probability: float,
    diameter: float | None = None,
    nodules_zyx_d: np.ndarray | None = None,
    half_size: int = 32,
    title: str = "",
    dpi: int = 120,
) -> Path:
    """Axial slice through a candidate with its box and the annotated nodules on that slice.

    Args:
        image: (Z, Y, X) prepared scan (values in [0, 1]).
        centre_zyx: candidate centre in voxels.
        path: PNG to write.
        probability: the candidate's score (printed).
        diameter: candidate diameter in voxels (box size), if known.
        nodules_zyx_d: (n, 4) annotated nodules (voxel z, y, x, diameter) drawn as circles where they cut
            the slice.
        half_size: half the side of the shown window, voxels.
        title: figure title.
        dpi: resolution.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    z, y, x = (float(v) for v in centre_zyx)
    zi = int(np.clip(round(z), 0, image.shape[0] - 1))
    y0, x0 = int(round(y)) - half_size, int(round(x)) - half_size
    window = np.full((2 * half_size, 2 * half_size), np.nan, dtype=np.float32)
    ys, xs = (
        slice(max(y0, 0), min(y0 + 2 * half_size, image.shape[1])),
        slice(max(x0, 0), min(x0 + 2 * half_size, image.shape[2])),
    )
    window[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0] = image[zi, ys, xs]
    fig = Figure(figsize=(3.6, 3.8))
    ax = fig.subplots()
    ax.imshow(window, cmap="gray", vmin=0, vmax=1)
    side = float(diameter) if diameter else 10.0
    ax.add_patch(
        Rectangle((x - x0 - side / 2, y - y0 - side / 2), side, side, fill=False, ec="yellow", lw=1.2)
    )
    for nz, ny, nx, nd in np.asarray(nodules_zyx_d if nodules_zyx_d is not None else np.zeros((0, 4))):
        r2 = (nd / 2.0) ** 2 - (zi - nz) ** 2
        if r2 > 0:
            ax.add_patch(Circle((nx - x0, ny - y0), np.sqrt(r2), fill=False, ec="lime", lw=1.2, ls="--"))
    ax.set_title(title or f"p = {probability:.3f}", fontsize=9)
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path
