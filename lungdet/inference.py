"""Whole-scan inference of CLAF: stage-1 sliding window, candidates in world mm, stage-2 re-scoring, CSV.

Stage 1 (``detect_scan``), run as ``Stage1Inference`` says (one frozen object holds every run-time choice
of the sliding window and the candidate selection; the anchor sizes and the output stride are the network's
own, ``net.anchor_sizes`` and ``net.stride``, never assumed here): the prepared 1 mm scan (windowed, lung-masked; ``lungdet.scan_reader.ScanReader``) is
padded at its far end to a multiple of the network stride and to at least one block, then MONAI's
``sliding_window_inference`` runs the candidate net over overlapping ``block_size``³ blocks (paper: 128³).
Each block's output (D/4, H/4, W/4, A, 5) is flattened to A·5 channels on the 4×-coarser grid, which MONAI
stitches into one whole-scan map (overlaps averaged, ``blend_mode="constant"``, or Gaussian-weighted).
Block starts are multiples of the stride (checked), so every block's cells coincide with the whole-scan
grid and the stitched map is a proper per-anchor average. The coordinate channels of each block come from
its position in the scan (``with_coord=True`` hands the block slices to the predictor), exactly as in
training. The stitched map is decoded against the whole-scan anchor grid, thresholded, and reduced by 3D
NMS (``lungdet.postprocess``, cube IoU) followed by a centre-distance NMS (``suppress_near_duplicates``:
a candidate within one diameter of a better one is a duplicate); candidates whose centre falls in the
padding are dropped.

World coordinates (``candidates_to_world``) use the cached grid's geometry from the cache manifest
(origin, direction, 1 mm spacing) through ``ScanGeometry.voxel_to_world`` — the direction matrix is
applied, so flipped scans come out right.

Stage 2 (``score_candidates``): 32×48×48 crops around each candidate (``crop_candidates``, padded with the
reader's fill value), MPPN probability, in chunks. ``fuse_scores`` optionally blends in the stage-1 score.

The LUNA16 results CSV (seriesuid, coordX, coordY, coordZ, probability) that ``lungdata evaluate-froc`` and
the official script read is written by ``common.metrics.froc_io.write_results_csv``.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from torch import Tensor, nn

from common.cache import entry_geometry
from common.engine import ENGINES, EngineCache, describe
from common.metrics.froc_io import RESULT_COLUMNS
from lungdet.anchors import anchor_grid
from lungdet.models import coordinate_maps, crop_candidates
from lungdet.postprocess import candidates_from_prediction

__all__ = [
    "BLEND_MODES",
    "ENGINES",
    "RESULT_COLUMNS",
    "Stage1Inference",
    "candidates_to_world",
    "detect_scan",
    "fuse_scores",
    "score_candidates",
    "stitched_prediction",
    "suppress_near_duplicates",
]


BLEND_MODES = ("constant", "gaussian")
#: Compiled stage-1 / MPPN engines (``common.engine``), reused across scans while the weights stay the same.
_ENGINE_CACHE = EngineCache()


@dataclass(frozen=True)
class Stage1Inference:
    """How stage 1 runs over a whole scan: the run-time choices, kept apart from the trained network.

    They are not hyperparameters of a checkpoint (``lungdet test --ckpt_path … --model.init_args.
    score_threshold 0.05`` must win over what the run was trained with), so ``CandidateTask`` builds this
    object from its inference arguments and ``FPRTask.stage1_inference`` overrides fields of it by name.

    Attributes:
        block_size: sliding-window block side(s), multiples of 32 (paper: 128).
        overlap: fraction of a block shared with its neighbour; ``block × (1 − overlap)`` must be a multiple
            of the network stride.
        sw_batch_size: blocks per forward pass.
        blend_mode: "constant" (average) or "gaussian" (centre-weighted) blending of overlaps.
        score_threshold: minimum objectness probability of a candidate.
        nms_iou: cube-IoU threshold of the 3D NMS.
        merge_factor: centre-distance NMS radius in diameters (``suppress_near_duplicates``); 0 disables.
        max_candidates: at most this many (the most probable) per scan; −1 for all (LUNA16 scores ≤ 100).
        pre_nms_top_k: best-scoring anchors that enter the NMS.
        engine: how the network runs on a CPU (``common.engine.ENGINES``): "eager" (fp32 PyTorch, the
            reference), "channels_last", "frozen" (TorchScript + freeze), "onnxruntime", or "bf16" (autocast
            where the CPU has native bf16, else fp32 eager). ``engine_used`` says which ran. On another
            device the network runs eager.
    """

    block_size: int | tuple[int, int, int] = 128
    overlap: float = 0.25
    sw_batch_size: int = 2
    blend_mode: str = "constant"
    score_threshold: float = 0.1
    nms_iou: float = 0.1
    merge_factor: float = 1.0
    max_candidates: int = 100
    pre_nms_top_k: int = 5000
    engine: str = "eager"

    def __post_init__(self) -> None:
        block = self.block_size
        block = int(block) if isinstance(block, int) else tuple(int(b) for b in block)  # YAML gives lists
        if isinstance(block, tuple) and len(block) != 3:
            raise ValueError(f"block_size must be one side or three (z, y, x) sides, got {self.block_size}")
        object.__setattr__(self, "block_size", block)
        if self.blend_mode not in BLEND_MODES:
            raise ValueError(f"blend_mode must be one of {BLEND_MODES}, got {self.blend_mode!r}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must lie in [0, 1), got {self.overlap}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.sw_batch_size < 1 or self.pre_nms_top_k < 1:
            raise ValueError("sw_batch_size and pre_nms_top_k must be at least 1")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def updated(self, overrides: Mapping[str, Any] | None) -> Stage1Inference:
        """A copy with some fields replaced by name (unknown names are a ValueError naming the valid ones)."""
        overrides = dict(overrides or {})
        unknown = set(overrides) - set(self.field_names())
        if unknown:
            raise ValueError(f"stage-1 inference accepts {sorted(self.field_names())}, not {sorted(unknown)}")
        return replace(self, **overrides)

    @property
    def block(self) -> tuple[int, int, int]:
        """Block sides (z, y, x)."""
        b = self.block_size
        return (b, b, b) if isinstance(b, int) else b  # type: ignore[return-value]

    def engine_used(self, device: torch.device | str = "cpu") -> str:
        """One line: the engine that runs on `device` (e.g. bf16 requested without native bf16 → fp32 eager)."""
        return describe(self.engine, device)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["block_size"] = self.block_size if isinstance(self.block_size, int) else list(self.block_size)
        return out


def stitched_prediction(
    net: nn.Module, image: Tensor, settings: Stage1Inference, *, pad_value: float = 0.0
) -> Tensor:
    """The stage-1 output of a whole scan, stitched from overlapping blocks.

    Args:
        net: a ``CandidateNet`` (anything with its ``forward(x, coords)``, output layout and ``stride``,
            ``num_anchors``, ``use_coords`` attributes).
        image: (Z, Y, X) prepared scan.
        settings: block size, overlap, blocks per pass and blending (the other fields are not used here).
        pad_value: value of the padding added at the far end of each axis (the reader's fill value).

    Returns:
        (Z'/s, Y'/s, X'/s, A, 5) raw output on the grid of the padded scan (Z' ≥ Z, multiples of s).

    Raises:
        ValueError: on a non-3D image or a block/overlap that would misalign the output grids.
    """
    if image.ndim != 3:
        raise ValueError(f"stitched_prediction expects one (Z, Y, X) scan, got shape {tuple(image.shape)}")
    stride = int(net.stride)
    block, overlap = settings.block, settings.overlap
    for b in block:
        step = int(b * (1 - overlap))
        if b % 32 or step % stride:
            raise ValueError(
                f"block {b} with overlap {overlap} steps by {step} voxels: blocks must be multiples of 32 and "
                f"steps multiples of the stride {stride} (e.g. 128 with overlap 0.25 or 0.5)"
            )
    scan_shape = tuple(int(n) for n in image.shape)
    padded = [max(b, -(-n // stride) * stride) for n, b in zip(scan_shape, block)]
    pad = [p - n for p, n in zip(padded, scan_shape)]
    x = F.pad(image[None, None], (0, pad[2], 0, pad[1], 0, pad[0]), value=float(pad_value))
    num_anchors = int(net.num_anchors)

    def predictor(window: Tensor, slices: list[list[slice]]) -> Tensor:
        starts = torch.tensor([[s[2 + a].start for a in range(3)] for s in slices], dtype=torch.float64)
        coords = None
        if net.use_coords:
            coords = coordinate_maps(
                starts, window.shape[-3:], torch.tensor(scan_shape), dtype=window.dtype, device=window.device
            )
        inputs = (window, coords) if coords is not None else (window,)
        out = _runner(net, settings.engine, inputs)(*inputs)
        b, d, h, w = out.shape[:4]
        return out.permute(0, 4, 5, 1, 2, 3).reshape(b, num_anchors * 5, d, h, w)

    stitched = sliding_window_inference(
        x,
        roi_size=block,
        sw_batch_size=settings.sw_batch_size,
        predictor=predictor,
        overlap=overlap,
        mode=settings.blend_mode,
        with_coord=True,
    )
    _, _, d, h, w = stitched.shape
    return stitched[0].reshape(num_anchors, 5, d, h, w).permute(2, 3, 4, 0, 1).contiguous()


def _runner(net: nn.Module, engine: str, example: tuple[Tensor, ...]):
    """The callable that runs `net` with `engine` (torch networks with weights compile; exported drop-ins and
    weightless stand-ins run as they are)."""
    if engine == "eager" or getattr(net, "exported", False) or next(net.parameters(), None) is None:
        return net
    return _ENGINE_CACHE.get(net, engine, example)


def suppress_near_duplicates(candidates: Tensor, factor: float = 1.0) -> Tensor:
    """Centre-distance NMS: drop a candidate whose centre lies within ``factor ×`` the larger of its and a
    better candidate's diameter.

    Cube-IoU NMS keeps boxes that overlap little even when they describe one nodule (two 10 mm cubes offset
    by 7 mm along two axes have IoU < 0.1), so a detector whose boxes are not yet tight leaves a ring of
    near-duplicates around a nodule, each counted as a false positive just outside the nodule's radius.
    Applied after the IoU NMS; ``factor = 0`` disables it.

    Args:
        candidates: (K, 5) ``(score, z, y, x, d)`` sorted by descending score.
        factor: suppression radius in units of the larger diameter.

    Returns:
        The kept rows, still sorted.
    """
    if factor <= 0 or candidates.shape[0] < 2:
        return candidates
    centres, diam = candidates[:, 1:4], candidates[:, 4]
    dist = torch.cdist(centres[None].double(), centres[None].double())[0]
    reach = factor * torch.maximum(diam[:, None], diam[None, :]).double()
    close = dist < reach
    suppressed = torch.zeros(candidates.shape[0], dtype=torch.bool, device=candidates.device)
    keep = []
    for i in range(candidates.shape[0]):
        if bool(suppressed[i]):
            continue
        keep.append(i)
        suppressed |= close[i]
    return candidates[torch.as_tensor(keep, dtype=torch.long, device=candidates.device)]


def detect_scan(
    net: nn.Module, image: Tensor, settings: Stage1Inference | None = None, *, pad_value: float = 0.0
) -> Tensor:
    """Stage-1 candidates of one whole scan.

    Args:
        net: the candidate net (put it in eval mode; this runs without gradients); its ``anchor_sizes`` and
            ``stride`` define the anchor grid.
        image: (Z, Y, X) prepared scan on the net's device.
        settings: the inference settings (default ``Stage1Inference()``).
        pad_value: value outside the scan (the reader's fill value; a property of the data, not a choice).

    Returns:
        (K, 5) ``(score, z, y, x, d)`` in voxels of the scan, descending score.
    """
    settings = settings or Stage1Inference()
    with torch.no_grad():
        prediction = stitched_prediction(net, image, settings, pad_value=pad_value)
        anchors = anchor_grid(
            prediction.shape[:3],
            int(net.stride),
            tuple(net.anchor_sizes),
            device=prediction.device,
            dtype=prediction.dtype,
        )
        cands = candidates_from_prediction(
            prediction,
            anchors,
            score_threshold=settings.score_threshold,
            nms_iou=settings.nms_iou,
            pre_nms_top_k=settings.pre_nms_top_k,
        )
        upper = torch.as_tensor(image.shape, dtype=cands.dtype, device=cands.device) - 0.5
        inside = ((cands[:, 1:4] >= -0.5) & (cands[:, 1:4] <= upper)).all(dim=1)
        cands = suppress_near_duplicates(cands[inside], settings.merge_factor)
        if settings.max_candidates >= 0:
            cands = cands[: settings.max_candidates]
    return cands


def candidates_to_world(voxel_zyx: Tensor | np.ndarray, entry: dict[str, Any]) -> np.ndarray:
    """Voxel (z, y, x) positions on the cached 1 mm grid → world (x, y, z) mm.

    Args:
        voxel_zyx: (K, 3) positions.
        entry: a cache manifest entry (or any dict with shape, spacing, origin, direction).

    Returns:
        (K, 3) float64 world coordinates.
    """
    zyx = np.asarray(torch.as_tensor(voxel_zyx).detach().cpu().numpy(), dtype=np.float64).reshape(-1, 3)
    if zyx.shape[0] == 0:
        return np.zeros((0, 3))
    return entry_geometry(entry).voxel_to_world(zyx).reshape(-1, 3)


#: The 8 mirrorings of a (B, C, Z, Y, X) crop batch: every subset of the three spatial axes.
MIRRORINGS: tuple[tuple[int, ...], ...] = tuple(
    axes for n in range(4) for axes in itertools.combinations((2, 3, 4), n)
)


def score_candidates(
    mppn: nn.Module,
    image: Tensor,
    centres_zyx: Tensor,
    *,
    chunk_size: int = 64,
    pad_value: float = 0.0,
    mirror: bool = False,
    engine: str = "eager",
) -> Tensor:
    """MPPN nodule probability of each candidate, in chunks.

    Args:
        mppn: the stage-2 network (eval mode).
        image: (Z, Y, X) prepared scan.
        centres_zyx: (K, 3) candidate voxel positions.
        chunk_size: candidates per forward pass.
        pad_value: value outside the scan.
        mirror: test-time augmentation — the mean probability over the 8 mirrorings of each crop (the flips
            the MPPN is trained with; 8× the stage-2 compute). The three concentric crops stay concentric.
        engine: how the MPPN runs on a CPU (``Stage1Inference.engine``; "eager" is fp32 PyTorch).

    Returns:
        (K,) probabilities on the image's device.
    """
    centres = torch.as_tensor(centres_zyx).reshape(-1, 3).cpu()
    size = tuple(int(v) for v in mppn.crop_sizes[0])
    volume = image.detach().cpu()  # crops are cut on the CPU, then moved to the network's device
    flips = MIRRORINGS if mirror else ((),)
    out = []
    with torch.no_grad():
        for i in range(0, centres.shape[0], chunk_size):
            crops = crop_candidates(volume, centres[i : i + chunk_size], size, pad_value=pad_value)
            crops = crops.to(device=image.device, dtype=image.dtype)
            run = _runner(mppn, engine, (crops,))
            probs = [mppn.nodule_probability(run(torch.flip(crops, f) if f else crops)) for f in flips]
            out.append(torch.stack(probs).mean(0))
    if not out:
        return torch.zeros(0, device=image.device)
    return torch.cat(out)


def fuse_scores(mppn_prob: Tensor, stage1_prob: Tensor | None, stage1_weight: float) -> Tensor:
    """Final candidate score: ``(1 − w)·p_MPPN + w·p_stage1`` where the stage-1 score is known, else p_MPPN."""
    if not 0.0 <= stage1_weight <= 1.0:
        raise ValueError(f"stage1_weight must lie in [0, 1], got {stage1_weight}")
    if stage1_prob is None or stage1_weight == 0.0:
        return mppn_prob
    s1 = stage1_prob.to(mppn_prob)
    fused = (1.0 - stage1_weight) * mppn_prob + stage1_weight * s1
    return torch.where(torch.isnan(s1), mppn_prob, fused)
