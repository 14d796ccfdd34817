"""Anchors of the CLAF candidate network: grid, cube IoU, target assignment, box encoding.

Conventions (the DeepLung / grt123 family that CLAF follows):

* A *box* is a cube ``(z, y, x, d)``: centre in continuous voxel coordinates of the 1 mm crop (integer
  value = voxel centre, the ``CTVolume.world_to_voxel`` convention) and side ``d`` = nodule diameter in
  voxels (= mm). Cubes, not spheres, because that is how DeepLung-style detectors define anchor IoU and
  it reuses MONAI's box utilities; the LUNA16 metric itself only asks whether a candidate centre lies
  inside the nodule's sphere, so the choice only affects training labels and NMS.
* The network predicts on a grid of stride 4 (128³ → 32³). Cell ``i`` covers voxels ``4i … 4i+3``, so its
  anchors are centred at ``4i + 1.5`` with diameters 5, 10 and 20 (paper: "anchor sizes of 5, 10, and 20").
* Labels: an anchor whose IoU with a nodule is > 0.5 is positive, < 0.02 with every nodule negative,
  anything between is ignored. A nodule that reaches 0.5 with no anchor (a 3 mm nodule has at most
  IoU 27/125 ≈ 0.22 with the 5 mm anchor, and an off-grid centre lowers it further) gets its best anchor as
  positive anyway (``match_best``), otherwise small nodules would never be trained on. Anchors
  overlapping an *ignore* box (LUNA16's excluded findings) by ≥ 0.02 are ignored instead of negative.
* Regression targets: ``dz = (z - z_a) / d_a`` (same for y, x) and ``dd = log(d / d_a)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from monai.data.box_utils import box_iou
from torch import Tensor

__all__ = [
    "DEFAULT_ANCHOR_SIZES",
    "LABEL_IGNORE",
    "LABEL_NEGATIVE",
    "LABEL_POSITIVE",
    "NEGATIVE_IOU",
    "OUTPUT_STRIDE",
    "POSITIVE_IOU",
    "AnchorTargets",
    "anchor_grid",
    "assign_targets",
    "assign_targets_batch",
    "cube_iou",
    "cubes_to_corners",
    "decode_boxes",
    "encode_boxes",
]

DEFAULT_ANCHOR_SIZES: tuple[float, ...] = (5.0, 10.0, 20.0)
OUTPUT_STRIDE = 4
POSITIVE_IOU = 0.5
NEGATIVE_IOU = 0.02
LABEL_POSITIVE, LABEL_NEGATIVE, LABEL_IGNORE = 1, 0, -1
#: Clamp on the predicted log-diameter ratio when decoding, so a wild output cannot overflow ``exp``.
MAX_LOG_RATIO = 4.0


def anchor_grid(
    output_shape: Sequence[int],
    stride: int = OUTPUT_STRIDE,
    sizes: Sequence[float] = DEFAULT_ANCHOR_SIZES,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """All anchors of one prediction grid as boxes.

    Args:
        output_shape: (D, H, W) of the prediction grid (32³ for a 128³ crop).
        stride: input voxels per grid cell along each axis.
        sizes: anchor diameters in voxels.
        device: output device.
        dtype: output dtype.

    Returns:
        (D, H, W, A, 4) tensor of ``(z, y, x, d)`` in crop voxel coordinates, the same layout as the
        network output so ``anchors[mask]`` and ``prediction[mask]`` line up.
    """
    if len(output_shape) != 3:
        raise ValueError(f"anchor_grid: output_shape must be (D, H, W), got {tuple(output_shape)}")
    offset = (stride - 1) / 2.0
    zs, ys, xs = (torch.arange(n, device=device, dtype=dtype) * stride + offset for n in output_shape)
    zz, yy, xx = torch.meshgrid(zs, ys, xs, indexing="ij")
    a = len(sizes)
    centres = torch.stack([zz, yy, xx], dim=-1)[:, :, :, None, :].expand(*zz.shape, a, 3)
    diam = torch.as_tensor(list(sizes), device=device, dtype=dtype).expand(*zz.shape, a)[..., None]
    return torch.cat([centres, diam], dim=-1)


def cubes_to_corners(boxes: Tensor) -> Tensor:
    """``(..., 4)`` cubes ``(z, y, x, d)`` → ``(..., 6)`` corners ``(z0, y0, x0, z1, y1, x1)``."""
    half = boxes[..., 3:4] / 2.0
    return torch.cat([boxes[..., :3] - half, boxes[..., :3] + half], dim=-1)


def cube_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU of axis-aligned cubes (MONAI's ``box_iou`` on their corners).

    Args:
        boxes1: (N, 4) ``(z, y, x, d)``.
        boxes2: (M, 4) ``(z, y, x, d)``.

    Returns:
        (N, M) IoU in [0, 1].
    """
    return box_iou(cubes_to_corners(boxes1), cubes_to_corners(boxes2))


def encode_boxes(boxes: Tensor, anchors: Tensor) -> Tensor:
    """Regression targets of ``boxes`` relative to ``anchors`` (same shape ``(..., 4)``).

    ``(dz, dy, dx) = (centre - anchor centre) / anchor d``, ``dd = log(d / anchor d)``.
    """
    d_a = anchors[..., 3:4]
    return torch.cat([(boxes[..., :3] - anchors[..., :3]) / d_a, torch.log(boxes[..., 3:4] / d_a)], dim=-1)


def decode_boxes(deltas: Tensor, anchors: Tensor, max_log_ratio: float = MAX_LOG_RATIO) -> Tensor:
    """Inverse of ``encode_boxes``: boxes ``(..., 4)`` from deltas and anchors.

    Args:
        deltas: ``(..., 4)`` predicted (dz, dy, dx, dd).
        anchors: ``(..., 4)`` anchors, broadcastable to ``deltas``.
        max_log_ratio: ``dd`` is clamped to ±this before ``exp`` (e⁴ ≈ 55× the anchor).
    """
    d_a = anchors[..., 3:4]
    centre = anchors[..., :3] + deltas[..., :3] * d_a
    diam = d_a * torch.exp(deltas[..., 3:4].clamp(-max_log_ratio, max_log_ratio))
    return torch.cat([centre, diam], dim=-1)


@dataclass
class AnchorTargets:
    """Training targets for one prediction grid.

    Attributes:
        labels: (D, H, W, A) int8: 1 positive, 0 negative, −1 ignore.
        deltas: (D, H, W, A, 4) float regression targets (zero where not positive).
        matched: (D, H, W, A) int64 index of the nodule each positive anchor regresses to, −1 elsewhere.
    """

    labels: Tensor
    deltas: Tensor
    matched: Tensor


def _check_boxes(boxes: Tensor, what: str) -> Tensor:
    if boxes.numel() == 0:
        return boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{what} must be an (N, 4) tensor of (z, y, x, d), got shape {tuple(boxes.shape)}")
    if not bool(torch.isfinite(boxes).all()):
        raise ValueError(f"{what} contain NaN or infinite values: {boxes.tolist()}")
    if bool((boxes[:, 3] <= 0).any()):
        bad = boxes[boxes[:, 3] <= 0].tolist()
        raise ValueError(
            f"{what} need a positive diameter, got {bad}; give findings without a size (LUNA16 diameter -1) "
            "a nominal one (e.g. 10 mm) before assigning targets"
        )
    return boxes


def assign_targets(
    anchors: Tensor,
    gt_boxes: Tensor,
    ignore_boxes: Tensor | None = None,
    *,
    pos_iou: float = POSITIVE_IOU,
    neg_iou: float = NEGATIVE_IOU,
    match_best: bool = True,
) -> AnchorTargets:
    """Label every anchor of one crop and compute its regression target.

    Args:
        anchors: (D, H, W, A, 4) from ``anchor_grid``.
        gt_boxes: (N, 4) nodules ``(z, y, x, d)`` in the crop's voxel coordinates (N may be 0; nodules
            partly outside the crop are fine).
        ignore_boxes: (M, 4) findings that must be neither positive nor negative (e.g. LUNA16 excluded).
        pos_iou: IoU above which an anchor is positive.
        neg_iou: IoU below which (with every nodule) an anchor is negative.
        match_best: make each nodule's best anchor positive when no anchor exceeds ``pos_iou``.

    Returns:
        ``AnchorTargets`` for the grid.

    Raises:
        ValueError: on malformed boxes or thresholds.
    """
    if not 0.0 <= neg_iou <= pos_iou <= 1.0:
        raise ValueError(f"need 0 ≤ neg_iou ≤ pos_iou ≤ 1, got neg_iou={neg_iou}, pos_iou={pos_iou}")
    grid_shape = anchors.shape[:-1]
    flat = anchors.reshape(-1, 4)
    gt = _check_boxes(gt_boxes.to(device=flat.device, dtype=flat.dtype), "gt_boxes")
    n = flat.shape[0]
    labels = torch.full((n,), LABEL_NEGATIVE, dtype=torch.int8, device=flat.device)
    matched = torch.full((n,), -1, dtype=torch.int64, device=flat.device)
    deltas = torch.zeros((n, 4), dtype=flat.dtype, device=flat.device)

    if gt.shape[0]:
        iou = cube_iou(flat, gt)  # (n, N)
        best_iou, best_gt = iou.max(dim=1)
        labels[best_iou >= neg_iou] = LABEL_IGNORE
        positive = best_iou > pos_iou
        matched[positive] = best_gt[positive]
        if match_best:
            for j in torch.nonzero(iou.max(dim=0).values <= pos_iou).flatten().tolist():
                col = iou[:, j]
                if float(col.max()) <= 0.0:
                    continue  # the nodule lies entirely outside this crop's anchors
                k = int(col.argmax())
                if not bool(positive[k]):
                    positive[k] = True
                    matched[k] = j
        labels[positive] = LABEL_POSITIVE
        deltas[positive] = encode_boxes(gt[matched[positive]], flat[positive])

    if ignore_boxes is not None and ignore_boxes.numel():
        ign = _check_boxes(ignore_boxes.to(device=flat.device, dtype=flat.dtype), "ignore_boxes")
        near_ignored = cube_iou(flat, ign).max(dim=1).values >= neg_iou
        labels[near_ignored & (labels == LABEL_NEGATIVE)] = LABEL_IGNORE

    return AnchorTargets(
        labels=labels.reshape(grid_shape),
        deltas=deltas.reshape(*grid_shape, 4),
        matched=matched.reshape(grid_shape),
    )


def assign_targets_batch(
    anchors: Tensor,
    gt_boxes: Sequence[Tensor],
    ignore_boxes: Sequence[Tensor | None] | None = None,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """``assign_targets`` for a batch of crops sharing one anchor grid.

    Args:
        anchors: (D, H, W, A, 4).
        gt_boxes: one (N_i, 4) tensor per crop.
        ignore_boxes: optional one (M_i, 4) tensor (or None) per crop.
        **kwargs: thresholds forwarded to ``assign_targets``.

    Returns:
        ``labels`` (B, D, H, W, A) int8 and ``deltas`` (B, D, H, W, A, 4), the inputs of ``DetectionLoss``.
    """
    if ignore_boxes is not None and len(ignore_boxes) != len(gt_boxes):
        raise ValueError(f"got {len(gt_boxes)} gt_boxes entries but {len(ignore_boxes)} ignore_boxes entries")
    targets = [
        assign_targets(anchors, g, None if ignore_boxes is None else ignore_boxes[i], **kwargs)
        for i, g in enumerate(gt_boxes)
    ]
    return torch.stack([t.labels for t in targets]), torch.stack([t.deltas for t in targets])
