"""GLANCE training augmentation: rotation ±15°, scaling ±10 %, minor elastic deformation (paper, Methods).

One albumentations pipeline (``Affine`` then ``ElasticTransform``) warps the image and the nodule mask with
the same random field. The centre heatmap is not warped as a picture: its Gaussian peaks must stay exactly
1.0 on one pixel for the CenterNet focal loss, and interpolation would flatten them. Instead every nodule
cross-section enters the pipeline as five keypoints — its centre and four points on its rim — and the heatmap is
rendered afterwards (:func:`lungseg.losses.gaussian_center_heatmap`) at the warped centre with the warped
radius (mean distance of four warped rim points). Image, mask and heatmap therefore stay aligned (tested with a planted disk in
``tests/lungseg/test_data.py``), and a scaled nodule gets a proportionally scaled Gaussian.

Randomness: albumentations keeps its own generator. :meth:`SliceAugment.__call__` takes a seed, which the
dataset draws from torch's generator, so Lightning's ``seed_everything(workers=True)`` makes runs repeat.

Elastic strength is given in units that do not depend on the working size: ``elastic_sigma`` is the
smoothing of the displacement field and ``elastic_displacement`` its typical magnitude, both as fractions
of the image side (defaults 0.05 and 0.008: about 4 px of smooth wobble at 512 px — "minor").
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from typing import Any  # noqa: E402

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import scipy.ndimage as ndi  # noqa: E402

__all__ = ["SliceAugment"]

_POINTS_PER_NODULE = 5  # centre + four rim points (±x, ±y): the warped radius is their mean distance


class _ElasticTransform(A.ElasticTransform):
    """albumentations' elastic warp with an exact, fast inverse for keypoints.

    The warp samples the source at ``map(q) = q + d(q)`` for every output pixel q, so a source point p
    lands where ``q + d(q) = p``. albumentations 2.0 inverts the whole map in a Python loop for that
    (≈ 0.3 s at 96², minutes per batch at 512²) and rounds points to whole pixels; its mask-based
    alternative can drop points. Because the field is smooth (|∇d| ≪ 1), the fixed-point iteration
    ``q ← p − d(q)`` with bilinear sampling of d converges in a few steps to sub-pixel accuracy.
    """

    def apply_to_keypoints(
        self, keypoints: np.ndarray, map_x: np.ndarray, map_y: np.ndarray, **params: Any
    ) -> np.ndarray:
        if keypoints.size == 0:
            return keypoints
        height, width = map_x.shape
        grid_y, grid_x = np.mgrid[:height, :width].astype(np.float32)
        dx, dy = map_x - grid_x, map_y - grid_y
        target = keypoints[:, :2].astype(np.float64)
        points = target.copy()
        for _ in range(12):
            coords = [np.clip(points[:, 1], 0, height - 1), np.clip(points[:, 0], 0, width - 1)]
            shift = np.stack(
                [ndi.map_coordinates(dx, coords, order=1), ndi.map_coordinates(dy, coords, order=1)], axis=1
            )
            points = target - shift
        out = keypoints.astype(np.float64, copy=True)
        out[:, :2] = points
        return out


def _elastic_alpha(size: int, sigma_px: float, displacement_px: float) -> float:
    """albumentations ``alpha`` giving an RMS displacement of ``displacement_px``.

    albumentations draws standard-normal noise, divides it by its maximum absolute value (≈ √(2 ln n) for n
    pixels), blurs it with a Gaussian of σ = ``sigma_px`` and multiplies by alpha. A 2D Gaussian blur of
    white noise of unit variance leaves a standard deviation of 1 / (2 √π σ).
    """
    peak = math.sqrt(2.0 * math.log(size * size))
    blurred_std = 1.0 / (2.0 * math.sqrt(math.pi) * max(sigma_px, 1e-3))
    return displacement_px * peak / blurred_std


class SliceAugment:
    """Random rotation, scaling and elastic warp of one working image with its mask and nodule centres.

    Args:
        size: working image side in pixels.
        rotation_deg: maximal absolute rotation (paper: 15°).
        scale: maximal relative zoom (paper: ±10 % → 0.1).
        elastic: add the elastic deformation.
        elastic_sigma: field smoothness, fraction of the side.
        elastic_displacement: RMS displacement, fraction of the side.
        p_affine: probability of the rotation/scaling.
        p_elastic: probability of the elastic warp.
    """

    def __init__(
        self,
        size: int,
        rotation_deg: float = 15.0,
        scale: float = 0.1,
        elastic: bool = True,
        elastic_sigma: float = 0.05,
        elastic_displacement: float = 0.008,
        p_affine: float = 0.8,
        p_elastic: float = 0.3,
    ) -> None:
        if rotation_deg < 0 or not 0 <= scale < 1:
            raise ValueError(f"rotation_deg must be >= 0 and scale in [0, 1); got {rotation_deg}, {scale}")
        transforms: list[A.BasicTransform] = [
            A.Affine(
                rotate=(-rotation_deg, rotation_deg),
                scale=(1.0 - scale, 1.0 + scale),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0.0,
                fill_mask=0,
                p=p_affine,
            )
        ]
        if elastic:
            sigma_px = elastic_sigma * size
            transforms.append(
                _ElasticTransform(
                    alpha=_elastic_alpha(size, sigma_px, elastic_displacement * size),
                    sigma=sigma_px,
                    interpolation=cv2.INTER_LINEAR,
                    mask_interpolation=cv2.INTER_NEAREST,
                    border_mode=cv2.BORDER_CONSTANT,
                    fill=0.0,
                    fill_mask=0,
                    p=p_elastic,
                )
            )
        self.pipeline = A.Compose(
            transforms,
            keypoint_params=A.KeypointParams(format="xy", label_fields=["point_ids"], remove_invisible=False),
            seed=0,
        )

    def __call__(
        self,
        image: np.ndarray,
        mask: np.ndarray,
        centers_yx: Sequence[tuple[float, float]],
        diameters: Sequence[float],
        seed: int,
    ) -> tuple[np.ndarray, np.ndarray, list[tuple[float, float]], list[float]]:
        """Warp one sample.

        Args:
            image: (H, W) or (H, W, C) float32 working image (C: 2.5D context channels).
            mask: (H, W) uint8 nodule mask.
            centers_yx: nodule cross-section centres (y, x) in working pixels.
            diameters: their diameters in working pixels.
            seed: seed of this draw.

        Returns:
            ``(image, mask, centers_yx, diameters)`` after the same random warp.
        """
        keypoints = []
        for (cy, cx), diameter in zip(centers_yx, diameters):
            r = diameter / 2.0
            keypoints += [(cx, cy), (cx + r, cy), (cx - r, cy), (cx, cy + r), (cx, cy - r)]
        self.pipeline.set_random_seed(int(seed) % (2**32))
        out = self.pipeline(
            image=np.ascontiguousarray(image, dtype=np.float32),
            mask=np.ascontiguousarray(mask, dtype=np.uint8),
            keypoints=np.asarray(keypoints, dtype=np.float32).reshape(-1, 2),
            point_ids=list(range(len(keypoints))),
        )
        points = dict(zip(out["point_ids"], np.asarray(out["keypoints"], dtype=np.float64).reshape(-1, 2)))
        if len(points) != len(keypoints):  # remove_invisible=False keeps every point
            raise RuntimeError("the augmentation lost nodule keypoints; check the albumentations version")
        centers, warped = [], []
        for k in range(0, len(keypoints), _POINTS_PER_NODULE):
            centre = points[k]
            rims = [points[k + j] for j in range(1, _POINTS_PER_NODULE)]
            centers.append((float(centre[1]), float(centre[0])))
            warped.append(2.0 * float(np.mean([math.hypot(*(rim - centre)) for rim in rims])))
        return out["image"].astype(np.float32, copy=False), out["mask"].astype(np.uint8), centers, warped
