"""Stage-1 output → candidate list: decode anchors, threshold scores, 3D non-maximum suppression.

A candidate is one row ``(score, z, y, x, d)``: objectness probability, centre in continuous voxel
coordinates (of the crop, or of the scan when an ``offset`` is given) and diameter in voxels (mm at 1 mm
spacing). Whole-scan inference runs ``candidates_from_prediction`` per 128³ block with the block's start
as ``offset`` and then ``nms_candidates`` once more over the concatenated blocks, so duplicates from the
overlapping margins collapse. Converting to world mm is the caller's job (``CTVolume.voxel_to_world`` on
the resampled scan's geometry).

NMS uses cube IoU (``lungdet.anchors.cube_iou``) through MONAI's ``non_max_suppression``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.data.box_utils import non_max_suppression
from torch import Tensor

from lungdet.anchors import DEFAULT_ANCHOR_SIZES, OUTPUT_STRIDE, anchor_grid, cubes_to_corners, decode_boxes

__all__ = [
    "CANDIDATE_COLUMNS",
    "candidates_from_prediction",
    "candidates_from_batch",
    "decode_prediction",
    "nms_candidates",
]

#: Column order of every candidate tensor this module returns.
CANDIDATE_COLUMNS: tuple[str, ...] = ("score", "z", "y", "x", "diameter")


def decode_prediction(
    prediction: Tensor,
    anchors: Tensor | None = None,
    stride: int = OUTPUT_STRIDE,
    anchor_sizes: Sequence[float] = DEFAULT_ANCHOR_SIZES,
) -> Tensor:
    """All anchors of one crop as ``(score, z, y, x, d)`` rows, before any filtering.

    Args:
        prediction: (D, H, W, A, 5) raw output of one crop.
        anchors: (D, H, W, A, 4) grid; built from ``stride`` / ``anchor_sizes`` when omitted.
        stride: grid stride, used only to build missing anchors.
        anchor_sizes: anchor diameters, used only to build missing anchors.

    Returns:
        (D·H·W·A, 5) tensor with the sigmoid objectness in column 0.
    """
    if prediction.ndim != 5 or prediction.shape[-1] != 5:
        raise ValueError(
            f"decode_prediction expects one crop's (D, H, W, A, 5) output, got {tuple(prediction.shape)}"
        )
    if anchors is None:
        anchors = anchor_grid(
            prediction.shape[:3], stride, anchor_sizes, device=prediction.device, dtype=prediction.dtype
        )
    if anchors.shape[:-1] != prediction.shape[:-1]:
        raise ValueError(f"anchors {tuple(anchors.shape)} do not match prediction {tuple(prediction.shape)}")
    boxes = decode_boxes(prediction[..., 1:], anchors)
    scores = torch.sigmoid(prediction[..., :1])
    return torch.cat([scores, boxes], dim=-1).reshape(-1, 5)


def nms_candidates(candidates: Tensor, iou_threshold: float = 0.1, max_candidates: int = -1) -> Tensor:
    """Greedy 3D NMS: keep the best-scoring candidate, drop others whose cube IoU with it exceeds the threshold.

    Args:
        candidates: (N, 5) ``(score, z, y, x, d)`` rows.
        iou_threshold: overlap above which the lower-scored candidate is removed.
        max_candidates: keep at most this many (−1: no limit).

    Returns:
        The kept rows sorted by descending score.
    """
    if candidates.ndim != 2 or candidates.shape[1] != 5:
        raise ValueError(f"candidates must be (N, 5) (score, z, y, x, d), got {tuple(candidates.shape)}")
    if candidates.shape[0] == 0:
        return candidates
    keep = non_max_suppression(
        cubes_to_corners(candidates[:, 1:]), candidates[:, 0], iou_threshold, max_proposals=max_candidates
    )
    return candidates[torch.as_tensor(keep, dtype=torch.long, device=candidates.device)]


def candidates_from_prediction(
    prediction: Tensor,
    anchors: Tensor | None = None,
    *,
    score_threshold: float = 0.5,
    nms_iou: float = 0.1,
    pre_nms_top_k: int = 2000,
    max_candidates: int = -1,
    offset: Sequence[float] | Tensor | None = None,
) -> Tensor:
    """Candidates of one crop: decode, keep scores ≥ threshold (at most ``pre_nms_top_k``), NMS, shift.

    Args:
        prediction: (D, H, W, A, 5) raw output of one crop.
        anchors: matching (D, H, W, A, 4) grid, default stride 4 / sizes 5, 10, 20.
        score_threshold: minimum objectness probability.
        nms_iou: cube-IoU threshold of the NMS.
        pre_nms_top_k: best-scoring boxes that enter NMS (bounds its cost on a noisy map).
        max_candidates: cap after NMS (−1: none).
        offset: (z, y, x) voxel position of the crop's first voxel in the scan; added to the centres.

    Returns:
        (K, 5) ``(score, z, y, x, d)`` sorted by descending score.
    """
    rows = decode_prediction(prediction.detach(), anchors)
    rows = rows[rows[:, 0] >= score_threshold]
    if rows.shape[0] > pre_nms_top_k:
        rows = rows[torch.topk(rows[:, 0], pre_nms_top_k).indices]
    rows = nms_candidates(rows, nms_iou, max_candidates)
    if offset is not None:
        shift = torch.as_tensor(offset, dtype=rows.dtype, device=rows.device).reshape(3)
        rows = torch.cat([rows[:, :1], rows[:, 1:4] + shift, rows[:, 4:]], dim=1)
    return rows


def candidates_from_batch(
    prediction: Tensor,
    anchors: Tensor | None = None,
    offsets: Sequence[Sequence[float]] | Tensor | None = None,
    **kwargs,
) -> list[Tensor]:
    """``candidates_from_prediction`` for each crop of a (B, D, H, W, A, 5) output.

    Args:
        prediction: batched raw output.
        anchors: shared (D, H, W, A, 4) grid.
        offsets: optional (B, 3) crop starts in scan voxels.
        **kwargs: thresholds forwarded to ``candidates_from_prediction``.
    """
    if prediction.ndim != 6:
        raise ValueError(f"candidates_from_batch expects (B, D, H, W, A, 5), got {tuple(prediction.shape)}")
    if offsets is not None and len(offsets) != prediction.shape[0]:
        raise ValueError(f"got {len(offsets)} offsets for a batch of {prediction.shape[0]}")
    return [
        candidates_from_prediction(p, anchors, offset=None if offsets is None else offsets[i], **kwargs)
        for i, p in enumerate(prediction)
    ]
