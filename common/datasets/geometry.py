"""Scan geometry from an image header, without reading the pixels.

Adapters need every annotation in voxel coordinates too, and must refuse annotations that fall outside
their volume (SPEC §9). Reading the header alone (SimpleITK ``ReadImageInformation``) gives size,
spacing, origin and direction in milliseconds, so a dataset index of hundreds of scans stays cheap.
World↔voxel goes through the direction matrix as docs/architecture.md prescribes:
``world = origin + D · diag(spacing) · ijk`` with ``ijk = (x, y, z)``; arrays are ``(z, y, x)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from common.io import voxel_to_world, world_to_voxel


@dataclass(frozen=True)
class ScanGeometry:
    """Voxel grid of one scan.

    Attributes:
        size_xyz: number of voxels along x, y, z (SimpleITK order).
        spacing: voxel size in mm, (x, y, z).
        origin: world position of voxel (0, 0, 0) in mm, (x, y, z).
        direction: 3×3 direction matrix (column j = world direction of index axis j).
    """

    size_xyz: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[tuple[float, float, float], ...]

    @classmethod
    def from_header(cls, path: str | Path) -> ScanGeometry:
        """Read the geometry of an MHD/NIfTI (or any SimpleITK-readable) file from its header.

        Raises:
            ValueError: the header cannot be read, or spacing is zero/negative/NaN.
        """
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as err:
            first = str(err).strip().splitlines()[-1] if str(err).strip() else "unreadable"
            raise ValueError(f"cannot read the image header of {path}: {first}") from None
        size = tuple(int(s) for s in reader.GetSize())
        if len(size) != 3:
            raise ValueError(f"{path} is {len(size)}-D; a CT scan must be 3-D")
        spacing = tuple(float(s) for s in reader.GetSpacing())
        if not all(np.isfinite(spacing)) or min(spacing) <= 0:
            raise ValueError(f"{path} has invalid spacing {spacing}; fix ElementSpacing in the header")
        direction = np.asarray(reader.GetDirection(), dtype=np.float64).reshape(3, 3)
        return cls(
            size_xyz=size,  # type: ignore[arg-type]
            spacing=spacing,  # type: ignore[arg-type]
            origin=tuple(float(o) for o in reader.GetOrigin()),  # type: ignore[arg-type]
            direction=tuple(tuple(float(v) for v in row) for row in direction),
        )

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        """Array shape (z, y, x)."""
        return (self.size_xyz[2], self.size_xyz[1], self.size_xyz[0])

    def world_to_voxel(self, xyz) -> np.ndarray:
        """World (x, y, z) mm → continuous voxel (z, y, x); (3,) in → (3,) out, (N, 3) → (N, 3)."""
        out = world_to_voxel(xyz, self.origin, self.spacing, self.direction)
        return out[0] if np.ndim(xyz) == 1 else out

    def voxel_to_world(self, zyx) -> np.ndarray:
        """Continuous voxel (z, y, x) → world (x, y, z) mm; (3,) in → (3,) out, (N, 3) → (N, 3)."""
        out = voxel_to_world(zyx, self.origin, self.spacing, self.direction)
        return out[0] if np.ndim(zyx) == 1 else out

    def contains(self, zyx, margin: float = 0.5) -> bool:
        """Whether a voxel position lies inside the volume (voxel centres span 0 … n-1, ± `margin`)."""
        zyx = np.asarray(zyx, dtype=np.float64)
        upper = np.asarray(self.shape_zyx, dtype=np.float64) - 1 + margin
        return bool(np.all(zyx >= -margin) and np.all(zyx <= upper))
