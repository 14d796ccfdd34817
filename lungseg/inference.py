"""GLANCE inference: slice predictions → 3D candidates in world mm and 3D nodule masks.

Per scan (an item of :class:`lungseg.data.GlanceScanDataset`):

1. **Slices.** The model runs over the scan's slices in chunks; sigmoid turns logits into the nodule
   probability map and the centre heatmap.
2. **Peaks.** Heatmap peaks are local maxima (``nms_kernel``×``nms_kernel`` max-pool, as CenterNet) above
   ``peak_threshold``; the top ``max_peaks_per_slice`` survive a greedy distance NMS (``nms_radius_mm``),
   which removes twin maxima on plateaus.
3. **Mask filter** (paper: "optionally filtered by the segmentation mask to suppress vascular false
   positives"): a peak is kept when the nodule probability reaches ``seg_threshold`` within
   ``mask_filter_radius`` pixels of it. Needs a segmentation head that was trained; ``filter_by_mask``
   decides.
4. **Size.** Each slice detection gets an in-plane diameter: the area-equivalent diameter of the
   segmentation component under the peak when there is one, otherwise the heatmap's half-maximum area read
   back through the target's σ = ``heatmap_sigma_scale`` · diameter (half maximum at 1.1774 σ).
5. **3D merge.** Detections on slices at most ``merge_gap`` + 1 apart whose in-plane distance is below
   max(``merge_distance_mm``, half the larger diameter) are linked (union–find); every group is one
   candidate: centre = score-weighted mean (z, y, x) on the cache grid → world (x, y, z) mm through the
   cache geometry (direction matrix included), probability = the group's best slice score, diameter = its
   largest in-plane diameter. The ``max_candidates`` most probable are kept (LUNA16 caps at 100).
6. **3D mask.** The slice probability maps are pasted back on the cache grid (inverse of the crop/resize)
   and thresholded; :func:`save_mask` writes it on the scan's original grid (or the cache grid) as MHD or
   NIfTI through :mod:`common.io`.

Models without a heatmap head (``segmentation_only``) get candidates from the segmentation instead: each
connected component of the thresholded probability map in a slice is a detection (centroid, best
probability, equivalent diameter). Models without a segmentation head (``detection_only``) skip 3, take
sizes from the heatmap and write no mask.

CSV output (:func:`candidate_rows` written by ``common.metrics.froc_io.write_results_csv`` with
``RESULT_FORMAT``) is the LUNA16 results format ``seriesuid, coordX, coordY, coordZ, probability`` plus
``diameter_mm`` (extra columns are ignored by ``lungdata evaluate-froc``);
:func:`write_reference_csvs` writes the matching ``annotations.csv``, ``annotations_excluded.csv`` and
``seriesuids.csv`` from the cache manifest, so a prediction folder can be scored directly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F
from torch import nn

from common.io import CTVolume, write_mhd, write_nifti
from common.metrics.froc_io import EVALUATION_FILES, write_annotations_csv, write_seriesuids
from common.preprocess import resample_array
from lungseg.slices import SquareBox, paste_back

__all__ = [
    "ANNOTATION_FORMAT",
    "CSV_LINE_END",
    "RESULT_EXTRA_COLUMNS",
    "RESULT_FORMAT",
    "Candidates",
    "candidate_rows",
    "InferenceConfig",
    "ScanPrediction",
    "SliceDetections",
    "find_peaks",
    "merge_detections",
    "predict_scan",
    "probability_slices",
    "save_mask",
    "voxel_to_world",
    "write_reference_csvs",
]

#: How GLANCE writes the LUNA16 CSVs (``common.metrics.froc_io`` writers): the results carry the candidate's
#: diameter as an extra column (the official evaluation ignores it); lines end in CRLF as the csv module writes.
RESULT_EXTRA_COLUMNS = ("diameter_mm",)
RESULT_FORMAT = {
    "coordX": "%.4f",
    "coordY": "%.4f",
    "coordZ": "%.4f",
    "probability": "%.6f",
    "diameter_mm": "%.3f",
}
ANNOTATION_FORMAT = {"coordX": "%.4f", "coordY": "%.4f", "coordZ": "%.4f", "diameter_mm": "%.3f"}
CSV_LINE_END = "\r\n"
HALF_MAX_SIGMAS = math.sqrt(2.0 * math.log(2.0))  # a Gaussian falls to half its peak at 1.1774 σ


@dataclass
class InferenceConfig:
    """Knobs of :func:`predict_scan` (defaults chosen on the synthetic validation scans; see docs)."""

    peak_threshold: float = 0.1
    nms_kernel: int = 3
    nms_radius_mm: float = 3.0
    max_peaks_per_slice: int = 10
    seg_threshold: float = 0.5
    filter_by_mask: bool = True
    mask_filter_radius: int = 2
    heatmap_sigma_scale: float = 1.0 / 6.0
    merge_distance_mm: float = 3.0
    merge_gap: int = 1
    min_slices: int = 1
    max_candidates: int = 100
    slice_batch_size: int = 16
    flip_tta: bool = False

    def __post_init__(self) -> None:
        if self.nms_kernel < 1 or self.nms_kernel % 2 == 0:
            raise ValueError(f"nms_kernel must be a positive odd number, got {self.nms_kernel}")
        if not 0.0 <= self.peak_threshold < 1.0 or not 0.0 < self.seg_threshold < 1.0:
            raise ValueError("peak_threshold must lie in [0, 1) and seg_threshold in (0, 1)")
        if self.merge_gap < 0 or self.min_slices < 1 or self.max_candidates < 1 or self.slice_batch_size < 1:
            raise ValueError("merge_gap >= 0, min_slices >= 1, max_candidates >= 1, slice_batch_size >= 1")


@dataclass
class SliceDetections:
    """Detections of one scan's slices on the cache grid.

    Attributes:
        zyx: (n, 3) continuous cache voxel coordinates (z is the slice index).
        score: (n,) probabilities.
        diameter_mm: (n,) in-plane diameters.
    """

    zyx: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    score: np.ndarray = field(default_factory=lambda: np.zeros(0))
    diameter_mm: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __len__(self) -> int:
        return int(self.score.shape[0])


@dataclass
class Candidates:
    """3D candidates of one scan.

    Attributes:
        zyx: (n, 3) centres in cache voxels.
        world_xyz: (n, 3) centres in world mm.
        probability: (n,) scores, decreasing.
        diameter_mm: (n,) size estimates.
        n_slices: (n,) how many slice detections each merges.
    """

    zyx: np.ndarray
    world_xyz: np.ndarray
    probability: np.ndarray
    diameter_mm: np.ndarray
    n_slices: np.ndarray

    def __len__(self) -> int:
        return int(self.probability.shape[0])

    def as_tensor(self) -> torch.Tensor:
        """(n, 4) world x, y, z, probability — the input of the FROC metric."""
        rows = np.column_stack((self.world_xyz, self.probability)) if len(self) else np.zeros((0, 4))
        return torch.as_tensor(rows, dtype=torch.float64)


@dataclass
class ScanPrediction:
    """Everything :func:`predict_scan` returns for one scan.

    Attributes:
        uid: scan uid.
        candidates: 3D candidates.
        detections: the slice detections they were merged from.
        probability: nodule probability on the cache grid (float16) or ``None`` without a segmentation head.
    """

    uid: str
    candidates: Candidates
    detections: SliceDetections
    probability: np.ndarray | None

    def mask(self, threshold: float = 0.5) -> np.ndarray | None:
        """Binary uint8 nodule mask on the cache grid."""
        return None if self.probability is None else (self.probability >= threshold).astype(np.uint8)


def voxel_to_world(
    zyx: np.ndarray, origin_xyz: Sequence[float], spacing_xyz: Sequence[float], direction: Sequence[float]
) -> np.ndarray:
    """Cache voxel (z, y, x) → world (x, y, z) mm: ``origin + D · diag(spacing) · (x, y, z)``."""
    ijk = np.asarray(zyx, dtype=np.float64).reshape(-1, 3)[:, ::-1]
    matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3) @ np.diag(np.asarray(spacing_xyz, float))
    return np.asarray(origin_xyz, dtype=np.float64) + ijk @ matrix.T


def find_peaks(
    heat: torch.Tensor, threshold: float, kernel: int = 3, max_peaks: int = 10, min_distance: float = 0.0
) -> list[np.ndarray]:
    """Local maxima of a batch of heatmaps.

    Args:
        heat: (B, 1, H, W) probabilities.
        threshold: lowest peak value kept.
        kernel: max-pool window (odd); a peak equals the maximum of its window.
        max_peaks: most peaks per map, strongest first.
        min_distance: greedy NMS radius in pixels (0: none) applied after the max-pool.

    Returns:
        Per map an (n, 3) array of (y, x, score), strongest first.
    """
    pooled = F.max_pool2d(heat, kernel, stride=1, padding=kernel // 2)
    is_peak = (heat == pooled) & (heat >= threshold)
    out = []
    for b in range(heat.shape[0]):
        ys, xs = torch.nonzero(is_peak[b, 0], as_tuple=True)
        scores = heat[b, 0, ys, xs]
        order = torch.argsort(scores, descending=True)
        rows = torch.stack((ys[order].double(), xs[order].double(), scores[order].double()), 1).cpu().numpy()
        kept: list[np.ndarray] = []
        for row in rows:
            if len(kept) >= max_peaks:
                break
            if min_distance > 0 and any(np.hypot(*(row[:2] - k[:2])) < min_distance for k in kept):
                continue
            kept.append(row)
        out.append(np.asarray(kept, dtype=np.float64).reshape(-1, 3))
    return out


def _component_at(labels: np.ndarray, y: int, x: int, radius: int) -> np.ndarray | None:
    """Pixels of the labelled component nearest to (y, x) within ``radius`` pixels, or ``None``."""
    h, w = labels.shape
    y0, y1, x0, x1 = max(y - radius, 0), min(y + radius + 1, h), max(x - radius, 0), min(x + radius + 1, w)
    local = labels[y0:y1, x0:x1]
    ly, lx = np.nonzero(local)
    if ly.size == 0:
        return None
    nearest = np.argmin((ly + y0 - y) ** 2 + (lx + x0 - x) ** 2)
    return labels == local[ly[nearest], lx[nearest]]


def _half_max_diameter(heat: np.ndarray, y: int, x: int, sigma_scale: float, window: int = 48) -> float:
    """Diameter (pixels) implied by the heatmap blob at (y, x): half-maximum area → σ → σ / scale.

    The blob is searched within ``window`` pixels of the peak, which bounds the cost on large slices.
    """
    h, w = heat.shape
    y0, x0 = max(y - window, 0), max(x - window, 0)
    local = heat[y0 : min(y + window + 1, h), x0 : min(x + window + 1, w)]
    labels, _ = ndi.label(local >= 0.5 * heat[y, x])
    area = float((labels == labels[y - y0, x - x0]).sum()) if labels[y - y0, x - x0] else 1.0
    sigma = math.sqrt(area / math.pi) / HALF_MAX_SIGMAS
    return sigma / sigma_scale


def _slice_detections(
    heat: np.ndarray | None,
    prob: np.ndarray | None,
    peaks: np.ndarray | None,
    cfg: InferenceConfig,
    filter_by_mask: bool,
) -> list[tuple[float, float, float, float]]:
    """(y, x, score, diameter_px) detections of one working-size slice."""
    found: list[tuple[float, float, float, float]] = []
    labels = None
    if prob is not None:
        labels, _ = ndi.label(prob >= cfg.seg_threshold)
    if heat is None:  # segmentation-only: components are the detections
        for k, box in enumerate(ndi.find_objects(labels), start=1):
            if box is None:
                continue
            component = labels[box] == k
            ys, xs = np.nonzero(component)
            score = float(prob[box][component].max())
            diameter = 2.0 * math.sqrt(ys.size / math.pi)
            found.append((ys.mean() + box[0].start, xs.mean() + box[1].start, score, diameter))
        return found
    for y, x, score in peaks:
        iy, ix = int(round(y)), int(round(x))
        component = None
        if labels is not None:
            component = _component_at(labels, iy, ix, cfg.mask_filter_radius)
            if filter_by_mask and component is None:
                continue
        if component is not None:
            diameter = 2.0 * math.sqrt(component.sum() / math.pi)
        else:
            diameter = _half_max_diameter(heat, iy, ix, cfg.heatmap_sigma_scale)
        found.append((float(y), float(x), float(score), diameter))
    return found


def merge_detections(
    detections: SliceDetections,
    spacing_xyz: Sequence[float],
    merge_distance_mm: float = 3.0,
    merge_gap: int = 1,
    min_slices: int = 1,
) -> list[np.ndarray]:
    """Group slice detections into 3D objects (union–find over nearby detections on nearby slices).

    Two detections link when their slices differ by 1 … ``merge_gap`` + 1 and their in-plane distance is
    below max(``merge_distance_mm``, half the larger of their diameters).

    Returns:
        Index arrays into ``detections``, one per group with at least ``min_slices`` distinct slices.
    """
    n = len(detections)
    if n == 0:
        return []
    sx, sy, _ = (float(s) for s in spacing_xyz)
    z = np.rint(detections.zyx[:, 0]).astype(np.int64)
    yx_mm = detections.zyx[:, 1:] * np.array([sy, sx])
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    order = np.argsort(z, kind="stable")
    for a_pos, a in enumerate(order):
        for b in order[a_pos + 1 :]:
            dz = z[b] - z[a]
            if dz == 0:
                continue
            if dz > merge_gap + 1:
                break
            limit = max(merge_distance_mm, 0.5 * max(detections.diameter_mm[a], detections.diameter_mm[b]))
            if np.hypot(*(yx_mm[a] - yx_mm[b])) < limit:
                ra, rb = find(int(a)), find(int(b))
                if ra != rb:
                    parent[rb] = ra
    roots = np.array([find(i) for i in range(n)])
    groups = [np.flatnonzero(roots == r) for r in np.unique(roots)]
    return [g for g in groups if np.unique(z[g]).size >= min_slices]


def _candidates(
    detections: SliceDetections, groups: list[np.ndarray], item: dict[str, Any], max_candidates: int
) -> Candidates:
    rows = []
    for g in groups:
        weights = detections.score[g]
        centre = (detections.zyx[g] * weights[:, None]).sum(0) / max(weights.sum(), 1e-12)
        rows.append(
            (*centre, float(weights.max()), float(detections.diameter_mm[g].max()), float(np.unique(
                np.rint(detections.zyx[g, 0])).size))
        )  # fmt: skip
    table = np.asarray(rows, dtype=np.float64).reshape(-1, 6)
    table = table[np.argsort(-table[:, 3], kind="stable")][:max_candidates]
    world = voxel_to_world(table[:, :3], item["origin"], item["spacing"], item["direction"])
    return Candidates(table[:, :3], world.reshape(-1, 3), table[:, 3], table[:, 4], table[:, 5].astype(int))


#: In-plane flips of a (B, C, H, W) slice batch averaged by ``flip_tta``: none, vertical, horizontal, both.
SLICE_FLIPS: tuple[tuple[int, ...], ...] = ((), (2,), (3,), (2, 3))


def slice_probabilities(
    model: nn.Module, chunk: torch.Tensor, flip_tta: bool = False
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Segmentation and heatmap probabilities (``B×1×H×W``, or None for a missing head) of a slice batch.

    With ``flip_tta`` each is the mean over the four in-plane flips of the input, each flipped back:
    test-time augmentation at 4× the inference compute (not in the paper).
    """
    flips = SLICE_FLIPS if flip_tta else ((),)
    sums: dict[str, torch.Tensor] = {}
    for axes in flips:
        out = model(torch.flip(chunk, axes) if axes else chunk)
        for key in ("seg", "heatmap"):
            if key in out:
                p = torch.sigmoid(out[key].float())
                p = torch.flip(p, axes) if axes else p
                sums[key] = sums[key] + p if key in sums else p
    mean = {key: value / len(flips) for key, value in sums.items()}
    return mean.get("seg"), mean.get("heatmap")


@torch.inference_mode()
def probability_slices(
    model: nn.Module, item: dict[str, Any], cfg: InferenceConfig
) -> Iterator[tuple[int, np.ndarray | None]]:
    """(slice index, nodule probability on the cache grid's slice, float32) of every slice of an item.

    The segmentation part of :func:`predict_scan` alone (no peaks, no 3D merge), for callers that need only
    the map, e.g. the analysis pipeline's per-nodule masks. The probability is None for a model without a
    segmentation head.
    """
    device = next(model.parameters()).device
    box = SquareBox(*item["box"])
    shape = item["shape"]
    slices = item["slices"].tolist()
    for start in range(0, len(slices), cfg.slice_batch_size):
        chunk = item["image"][start : start + cfg.slice_batch_size].to(device=device, dtype=torch.float32)
        prob, _ = slice_probabilities(model, chunk, cfg.flip_tta)
        prob_np = prob[:, 0].cpu().numpy() if prob is not None else None
        for j in range(chunk.shape[0]):
            yield slices[start + j], (paste_back(prob_np[j], box, shape[1:]) if prob_np is not None else None)


@torch.no_grad()
def predict_scan(
    model: nn.Module,
    item: dict[str, Any],
    cfg: InferenceConfig,
    filter_by_mask: bool | None = None,
    segmentation: bool = True,
) -> ScanPrediction:
    """Run GLANCE over one scan and turn its slice outputs into 3D candidates and a probability volume.

    Args:
        model: a ``GlanceNet`` (any variant); it is run in its current mode (call ``eval()`` first).
        item: one sample of :class:`lungseg.data.GlanceScanDataset`.
        cfg: inference settings.
        filter_by_mask: overrides ``cfg.filter_by_mask`` (the task passes False for a segmentation head that
            was never trained).
        segmentation: use the segmentation head's output. False (the task's choice for a head that never saw
            a mask, e.g. trained on LUNA16 / Tianchi) treats the model as ``detection_only``: sizes from the
            heatmap, no probability volume. An untrained head's map is noise around 0.5 whose components
            would otherwise set the detections' diameters, and through them how far the 3D merge reaches.
    """
    device = next(model.parameters()).device
    filter_by_mask = cfg.filter_by_mask if filter_by_mask is None else filter_by_mask
    size = int(item["image_size"])
    box = SquareBox(*item["box"])
    scale = box.scale(size)
    spacing = item["spacing"]
    pixel_mm = (float(spacing[0]) + float(spacing[1])) / 2.0 / scale
    shape = item["shape"]
    slices = item["slices"].tolist()
    volume: np.ndarray | None = None
    det_rows: list[tuple[float, float, float, float, float]] = []
    for start in range(0, len(slices), cfg.slice_batch_size):
        chunk = item["image"][start : start + cfg.slice_batch_size].to(device=device, dtype=torch.float32)
        prob, heat = slice_probabilities(model, chunk, cfg.flip_tta)
        if not segmentation and heat is not None:
            prob = None
        peaks = None
        if heat is not None:
            peaks = find_peaks(
                heat,
                cfg.peak_threshold,
                cfg.nms_kernel,
                cfg.max_peaks_per_slice,
                cfg.nms_radius_mm / pixel_mm,
            )
        prob_np = prob[:, 0].cpu().numpy() if prob is not None else None
        heat_np = heat[:, 0].cpu().numpy() if heat is not None else None
        for j in range(chunk.shape[0]):
            z = slices[start + j]
            p = prob_np[j] if prob_np is not None else None
            if p is not None:
                if volume is None:
                    volume = np.zeros(shape, dtype=np.float16)
                volume[z] = paste_back(p, box, shape[1:])
            found = _slice_detections(
                heat_np[j] if heat_np is not None else None,
                p,
                peaks[j] if peaks else None,
                cfg,
                filter_by_mask,
            )
            for y, x, score, diameter_px in found:
                cy, cx = box.to_cache(np.array([y, x]), size)
                det_rows.append((float(z), float(cy), float(cx), score, diameter_px * pixel_mm))
    table = np.asarray(det_rows, dtype=np.float64).reshape(-1, 5)
    detections = SliceDetections(table[:, :3], table[:, 3], table[:, 4])
    groups = merge_detections(detections, spacing, cfg.merge_distance_mm, cfg.merge_gap, cfg.min_slices)
    candidates = _candidates(detections, groups, item, cfg.max_candidates)
    return ScanPrediction(str(item["uid"]), candidates, detections, volume)


# ------------------------------------------------------------------------------------------------ output


def save_mask(mask: np.ndarray, item: dict[str, Any], path: str | Path, grid: str = "original") -> Path:
    """Write a cache-grid mask as MHD (``.mhd``) or NIfTI (``.nii`` / ``.nii.gz``).

    Args:
        mask: uint8 (z, y, x) on the cache grid.
        item: the scan's dataset item (geometry).
        path: output file; the suffix picks the format.
        grid: ``"original"`` resamples to the scan's own grid (linear + 0.5 threshold, the inverse of the
            cache's resampling), so the mask overlays the input scan; ``"cache"`` keeps the 1 mm grid.
    """
    if grid not in ("original", "cache"):
        raise ValueError(f"grid must be 'original' or 'cache', got {grid!r}")
    spacing = tuple(float(v) for v in item["spacing"])
    array = np.asarray(mask, dtype=np.uint8)
    if grid == "original":
        spacing_out = tuple(float(v) for v in item["original_spacing"])
        values = resample_array(
            array.astype(np.float32), spacing, spacing_out, order=1, out_shape=tuple(item["original_shape"])
        )
        array = (values >= 0.5).astype(np.uint8)
        spacing = spacing_out
    volume = CTVolume(array, spacing, tuple(item["origin"]), np.asarray(item["direction"]).reshape(3, 3))
    path = Path(path)
    if path.suffix.lower() == ".mhd":
        return write_mhd(volume, path, compress=True)
    return write_nifti(volume, path)


def candidate_rows(predictions: Iterable[tuple[str, Candidates]]) -> Iterator[tuple[Any, ...]]:
    """``(seriesuid, x, y, z, probability, diameter_mm)`` rows of ``(uid, candidates)`` pairs, for
    ``common.metrics.froc_io.write_results_csv`` with ``RESULT_FORMAT``."""
    for uid, cands in predictions:
        for (x, y, z), p, d in zip(cands.world_xyz, cands.probability, cands.diameter_mm):
            yield uid, x, y, z, p, d


def write_reference_csvs(items: Iterable[dict[str, Any]], folder: str | Path) -> dict[str, Path]:
    """The evaluation inputs of ``lungdata evaluate-froc`` for the predicted scans, from the cache manifest.

    Writes ``annotations.csv`` (the scans' nodules), ``annotations_excluded.csv`` (their excluded findings)
    and ``seriesuids.csv`` (one uid per line, no header).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {key: folder / EVALUATION_FILES[key] for key in ("annotations", "excluded", "seriesuids")}
    items = list(items)
    for key, field_name in (("annotations", "nodules"), ("excluded", "excluded")):
        rows = (
            [item["uid"], x, y, z, d]
            for item in items
            for x, y, z, d in np.asarray(item[field_name], dtype=np.float64).reshape(-1, 4)
        )
        write_annotations_csv(rows, paths[key], float_format=ANNOTATION_FORMAT, lineterminator=CSV_LINE_END)
    write_seriesuids((item["uid"] for item in items), paths["seriesuids"])
    return paths
