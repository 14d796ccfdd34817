"""The models of a bundle on one CT volume: detection, segmentation, measurements, malignancy, Lung-RADS.

``analyze_volume(volume, bundle)`` runs, each step timed in ``Analysis.timings_s``:

1. **preprocess** — ``common.cache.prepare_volume``: the same clipping, resampling and computed lung mask as
   the preprocessed cache (``lungdata prepare``), in memory, once per distinct cache setting of the bundle's
   models; CLAF's view of it is ``lungdet.data.ScanReader`` over that in-memory entry (window, lung masking,
   fill), so the prepared array equals what ``lungdet test`` reads from a cache of the same scan (tested).
2. **detect** — CLAF stage 1 (``CandidateTask.detect`` with the bundle's ``Stage1Inference``) →
   **fpr** — MPPN probability per candidate, fused with the stage-1 score by the bundle's ``stage1_weight``
   (``lungdet.inference.fuse_scores``). Every scored candidate goes to ``Analysis.candidates`` (LUNA16
   columns, world mm); those scoring at least the bundle's operating threshold become findings, best first.
   With ``nodules_world_mm`` (the ``--nodules`` mode) detection is skipped and the given centres are the
   findings, in the given order.
3. **segment** — GLANCE (``lungseg.inference.predict_scan``) on the slices spanning each finding (within
   max(0.75 d, 8 mm) of its centre; first only those within max(0.75 d, 4 mm), grown when that answer
   might differ: ``_GlanceWindow``) of the GLANCE view of the scan; the probability map is interpolated (linear) onto the
   ORIGINAL scan grid around the finding and thresholded at the model's ``seg_threshold``; the connected
   component holding the finding's centre (else the nearest one within the finding's radius) is the
   nodule. Where GLANCE finds nothing there, the fallback (``fallback_segment``) thresholds the scan at
   a local level between the nodule's core HU and the parenchyma's on the lung's side of the pleura
   (a rolling ball), keeps the piece at the centre, detaches vessels and wall by the smallest opening
   that separates them, and fills holes — growing its search sphere while the piece reaches its surface
   (a detected diameter smaller than the nodule would cut it); where that finds nothing, a sphere of the
   finding's diameter.
   ``Finding.segmentation`` says which ("glance", "hu-threshold", "sphere"). A finding whose centre lies
   in an earlier (better-scoring) finding's mask is the same nodule and is dropped.
4. **measure** — ``lungcad.measure.measure_nodule`` on the original grid.
5. **classify** — M³Net on nested native-resolution patches around the mask centroid (``lungcls.patches``:
   ``crop_block`` + ``nested_crops`` with the bundle's context block, boundary rule, sizes and normalisation).
6. **category** — ``lungcad.lungrads.baseline_category`` from type and size.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.ndimage as ndi
import torch

from common.cache import PrepareSettings, prepare_volume
from common.io import CTVolume
from common.metrics.froc_io import RESULT_COLUMNS
from common.preprocess import clip_hu
from lungcad.bundle import Bundle
from lungcad.measure import SOLID_HU

__all__ = [
    "FALLBACK_HU",
    "Analysis",
    "Finding",
    "PreparedScan",
    "analyze_volume",
    "fallback_mask",
    "fallback_segment",
    "prepare_scan",
]

#: The fallback reads the parenchyma on the voxels below this HU (above it: ground glass and denser).
FALLBACK_HU = -500.0
#: The fallback's threshold lies this share of the way from the parenchyma's HU to the nodule core's. Not
#: the midpoint (0.5, the half-maximum surface of a sharp object): nodules have soft margins and part-solid
#: ones a ground-glass rim whose HU sits near a solid core's midpoint, so the midpoint cuts them, while the
#: partial-volume volume (`lungcad.measure.partial_volume`) weighs the extra edge voxels by their HU anyway.
#: Chosen among 0.25–0.5 on phantoms of seeds 3 and 4 with detection-like centres (0.5–2 mm off, diameter
#: 0.6–1.0×): volume error 16.8 / 16.5 % at 0.5, 14.5 / 13.1 % at 0.35 (docs/measurements.md).
FALLBACK_THRESHOLD_SHARE = 0.35
#: Largest opening radius of the fallback (`fallback_mask`), as a share of the nodule's diameter: a
#: nodule survives an erosion by a ball of 0.3 d; an attachment wider than 0.6 d is not cut.
FALLBACK_MAX_OPENING = 0.3
#: Rolling-ball radius of the fallback's lung side (`lung_side`), as a share of the nodule's diameter (at
#: least 3 mm): wider than the nodule, so the ball closes the dent a juxta-pleural nodule makes in the lung
#: but does not enter the chest wall.
FALLBACK_ROLLING_BALL = 0.75
#: Ground-glass nodules (core below `lungcad.measure.SOLID_HU`) keep only voxels at most this far above their
#: core HU: a solid vessel or wall beside them is denser than the nodule itself, so no threshold below it
#: can separate them.
FALLBACK_GGO_CAP_HU = 200.0
#: On a CPU, the largest number of MPPN crops / GLANCE slices per forward pass. Batching buys nothing there
#: (a 512² GLANCE slice takes 1.52 s in a batch of 4 and 1.57 s in one of 16; 100 MPPN crops take 20 s in
#: chunks of 16 or 64) but every item's activations are held at once: at the paper widths a batch of 16 GLANCE slices holds
#: 2.8 GiB and 64 MPPN crops 1.4 GiB, against 0.3 GiB each at these caps. Each item's output does not
#: depend on its batch (eval mode), so the answers are the same. On a GPU the bundle's sizes apply.
CPU_MPPN_CHUNK = 16
CPU_GLANCE_SLICES = 4
#: `fallback_segment` starts its search at this share of the finding's diameter (at least 3 mm).
FALLBACK_FIRST_SEARCH = 0.5
#: Largest search diameter `fallback_segment` grows to (mm; the largest LIDC nodules are ≈ 30 mm).
FALLBACK_MAX_SEARCH_MM = 30.0
#: Default diameter of a given (``--nodules``) position whose size is unknown, mm.
GIVEN_DIAMETER_MM = 10.0
SCAN_UID = "scan"


@dataclass
class Finding:
    """One nodule (see ``lungcad.pipeline`` for how each field is made)."""

    index: int
    detection_score: float | None
    malignancy_probability: float
    measurements: Any  # lungcad.measure.NoduleMeasurements
    category: Any  # lungcad.lungrads.LungRADSCategory
    source: str  # "detected" | "given"
    segmentation: str = "glance"  # "glance" | "hu-threshold" | "sphere"


@dataclass
class Analysis:
    """Everything ``analyze_volume`` found in one scan (labels on the original grid, k = finding k)."""

    volume: CTVolume
    findings: list[Finding]
    labels: np.ndarray
    candidates: pd.DataFrame
    timings_s: dict[str, float]
    bundle_info: dict[str, Any]
    #: GLANCE slices run, and those the findings' full spans cover (what running every full span would cost).
    glance_slices: tuple[int, int] = (0, 0)


# ------------------------------------------------------------------------------------------ preprocess


@dataclass
class PreparedScan:
    """One scan on a cache grid, in memory: the arrays and manifest-like entry a cache would hold."""

    image: np.ndarray  # int16 HU (z, y, x)
    lung_mask: np.ndarray  # uint8
    entry: dict[str, Any]


class _MemoryCache:
    """The part of ``PreprocessedCache`` that ``ScanReader`` uses, over one in-memory scan."""

    def __init__(self, scan: PreparedScan) -> None:
        self.root = Path("<memory>")
        self.entries = {scan.entry["uid"]: scan.entry}
        self._scan = scan

    def load(self, uid: str, mmap: bool = False) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        return self._scan.image, self._scan.lung_mask, self._scan.entry


def prepare_scan(volume: CTVolume, cache: dict[str, Any], uid: str = SCAN_UID) -> PreparedScan:
    """``common.cache.prepare_volume`` with the cache settings recorded in a bundle model's preprocessing."""
    settings = PrepareSettings(
        spacing=tuple(cache["spacing"]),
        order=int(cache["order"]),
        lung_mask="computed",
        mask_threshold_hu=float(cache["mask_threshold_hu"]),
    )
    resampled, mask = prepare_volume(volume, settings)
    entry = {
        "uid": uid,
        "shape": list(resampled.shape),
        "spacing": list(resampled.spacing),
        "origin": list(resampled.origin),
        "direction": [float(v) for v in resampled.direction.ravel()],
        "original_shape": list(volume.shape),
        "original_spacing": list(volume.spacing),
        "nodules": [],
        "excluded": [],
    }
    return PreparedScan(resampled.array, mask, entry)


def claf_view(scan: PreparedScan, pre: dict[str, Any]) -> np.ndarray:
    """The windowed, lung-masked float32 scan CLAF sees (``ScanReader.whole`` over the in-memory entry)."""
    from lungdet.scan_reader import ScanReader

    reader = ScanReader(
        _MemoryCache(scan),  # type: ignore[arg-type]
        window=tuple(pre["window_hu"]),
        mask_outside_lung=bool(pre["mask_outside_lung"]),
        outside_hu=float(pre["outside_hu"]),
        lung_margin=int(pre["lung_margin"]),
    )
    return reader.whole(scan.entry["uid"])


# ------------------------------------------------------------------------------------------ steps


def _cpu_cap(size: int, cap: int, device: torch.device) -> int:
    """`size` items per forward pass, at most `cap` on a CPU (``CPU_MPPN_CHUNK``)."""
    return min(int(size), cap) if torch.device(device).type == "cpu" else int(size)


def _detect(bundle: Bundle, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """CLAF stage-1 candidates (score, z, y, x, d) of the prepared scan, and the scan as a tensor."""
    stage1 = bundle.models["stage1"].task
    stage1.pad_value = float(bundle.models["stage1"].preprocessing["fill_value"])
    tensor = torch.from_numpy(image).to(next(stage1.parameters()).device)
    return stage1.detect(tensor), tensor


def _fpr(bundle: Bundle, scan: PreparedScan, tensor: torch.Tensor, cands: torch.Tensor) -> pd.DataFrame:
    """MPPN probability of each candidate, fused with stage 1 as the bundle says: LUNA16 rows, best first."""
    from lungdet.inference import candidates_to_world, fuse_scores, score_candidates

    mppn = bundle.models["mppn"].task
    mppn.pad_value = float(bundle.models["mppn"].preprocessing["fill_value"])
    p = score_candidates(
        mppn.model,
        tensor,
        cands[:, 1:4],
        chunk_size=_cpu_cap(mppn.chunk_size, CPU_MPPN_CHUNK, tensor.device),
        pad_value=mppn.pad_value,
        mirror=mppn.mirror_tta,
        engine=getattr(mppn, "engine", "eager"),
    )
    final = fuse_scores(p, cands[:, 0], bundle.stage1_weight)
    world = candidates_to_world(cands[:, 1:4], scan.entry).reshape(-1, 3)
    frame = pd.DataFrame(
        {
            "seriesuid": [scan.entry["uid"]] * len(world),
            "coordX": world[:, 0],
            "coordY": world[:, 1],
            "coordZ": world[:, 2],
            "probability": final.double().cpu().numpy(),
            "stage1_probability": cands[:, 0].double().cpu().numpy(),
            "mppn_probability": p.double().cpu().numpy(),
            "diameter_mm": cands[:, 4].double().cpu().numpy() * float(scan.entry["spacing"][0]),
        }
    )
    return frame.sort_values("probability", ascending=False, kind="stable").reset_index(drop=True)


def _glance_item(scan: PreparedScan, pre: dict[str, Any], slices: np.ndarray) -> dict[str, Any]:
    """A ``GlanceScanDataset`` item of the given slices (same box, window and 2.5D context as ScanView)."""
    from common.preprocess import window
    from lungseg.slices import AIR_HU, crop_resize, full_box, lung_box

    shape = tuple(int(v) for v in scan.entry["shape"])
    spacing = tuple(float(v) for v in scan.entry["spacing"])
    size = int(pre["image_size"])
    box = None
    if pre["lung_crop"]:
        box = lung_box(scan.lung_mask, float(pre["crop_margin_mm"]) / min(spacing[:2]))
    box = box or full_box(shape[1:])
    lo, hi = pre["window_hu"]
    context, step = int(pre["context_slices"]), int(pre["context_step"])

    def one(z: int) -> np.ndarray:
        hu = crop_resize(np.asarray(scan.image[z], dtype=np.float32), box, size, AIR_HU)
        return window(hu, lo, hi)

    stack = np.stack(
        [
            np.stack(
                [one(int(k)) for k in np.clip(z + step * np.arange(-context, context + 1), 0, shape[0] - 1)]
            )
            for z in slices
        ]
    ).astype(np.float16)
    return {
        "uid": scan.entry["uid"],
        "image": torch.from_numpy(stack),
        "slices": torch.from_numpy(np.asarray(slices, dtype=np.int64)),
        "box": box.as_tuple(),
        "image_size": size,
        "shape": shape,
        "spacing": spacing,
        "origin": tuple(scan.entry["origin"]),
        "direction": tuple(scan.entry["direction"]),
    }


class GlanceSlices:
    """GLANCE nodule probability of one scan's slices, each slice run once, in batches.

    Findings near each other share slices (their spans of diameter ± margin overlap); the analysis asks for
    each finding's span and only the slices not seen yet run through the network, ``slice_batch_size`` at a
    time (at most ``CPU_GLANCE_SLICES`` on a CPU; ``lungseg.inference.probability_slices``). A slice's probability does not depend on the other
    slices of its batch, so the maps are those of one ``predict_scan`` per finding.
    """

    def __init__(self, bundle: Bundle, scan: PreparedScan) -> None:
        model = bundle.models["seg"]
        self.task, self.pre, self.scan = model.task, model.preprocessing, scan
        cfg, device = self.task.inference, next(self.task.model.parameters()).device
        self.cfg = replace(cfg, slice_batch_size=_cpu_cap(cfg.slice_batch_size, CPU_GLANCE_SLICES, device))
        if device.type == "cpu" and not getattr(self.task.model, "exported", False):
            # Channels-last weights: oneDNN runs GLANCE's 2D convolutions ≈ 20 % faster on a CPU (0.97 vs
            # 1.14–1.23 s per 512² slice at paper size) and its output is the same (max difference 0.0 there).
            self.task.model.to(memory_format=torch.channels_last)
        self.probability: np.ndarray | None = None  # float16 on the scan's cache grid, like predict_scan's
        self.done: set[int] = set()
        self.has_segmentation = True
        self.full_spans: set[int] = set()  # slices of the findings' full spans (`_segment` adds them)

    def __call__(self, slices: np.ndarray) -> np.ndarray | None:
        """The probability volume with at least `slices` filled (None for a model without segmentation)."""
        from lungseg.inference import probability_slices

        missing = np.asarray([int(z) for z in slices if int(z) not in self.done], dtype=np.int64)
        if missing.size and self.has_segmentation:
            item = _glance_item(self.scan, self.pre, missing)
            for z, prob in probability_slices(self.task.model, item, self.cfg):
                if prob is None:
                    self.has_segmentation = False
                    break
                if self.probability is None:
                    self.probability = np.zeros(item["shape"], dtype=np.float16)
                self.probability[z] = prob
                self.done.add(int(z))
        return self.probability if self.has_segmentation else None

    @property
    def slices_run(self) -> int:
        """Slices that ran through the network (each once)."""
        return len(self.done)


def _component_at(mask: np.ndarray, centre: np.ndarray, radius_vox: np.ndarray) -> np.ndarray | None:
    """The connected component of `mask` holding `centre` (z, y, x), else the nearest one within the radius."""
    labels, n = ndi.label(mask)
    if n == 0:
        return None
    idx = tuple(int(np.clip(round(c), 0, s - 1)) for c, s in zip(centre, mask.shape))
    if labels[idx]:
        return labels == labels[idx]
    points = np.argwhere(labels > 0)
    dist = np.sqrt((((points - centre) / np.maximum(radius_vox, 1e-6)) ** 2).sum(1))
    nearest = int(np.argmin(dist))
    if dist[nearest] > 1.0:
        return None
    return labels == labels[tuple(points[nearest])]


def _box_around(centre: np.ndarray, half: np.ndarray, shape: tuple[int, ...]) -> tuple[slice, ...]:
    lo = np.maximum(np.floor(centre - half).astype(int), 0)
    hi = np.minimum(np.ceil(centre + half).astype(int) + 1, np.asarray(shape))
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _ellipsoid_element(radius_mm: float, spacing_zyx: np.ndarray) -> np.ndarray:
    """Bool structuring element: the voxels within `radius_mm` of the centre (per-axis spacing)."""
    half = np.floor(radius_mm / spacing_zyx).astype(int)
    grids = np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half, spacing_zyx)], indexing="ij")
    return sum(g**2 for g in grids) <= radius_mm**2 + 1e-9


def fallback_mask(
    hu: np.ndarray, centre_zyx: np.ndarray, diameter_mm: float, spacing_zyx
) -> tuple[np.ndarray, dict[str, float]] | None:
    """Nodule mask from the HU alone (when GLANCE segments nothing): a threshold at a local level.

    The rule (d: the finding's diameter; search sphere: max(0.75 d, 0.5 d + 3 mm) around the centre):

    1. parenchyma HU P = median of the sphere's voxels below ``FALLBACK_HU`` (the lung around the nodule);
       nodule HU N = the largest value of the HU smoothed by σ 0.5 voxel within max(0.25 d, one in-plane
       pixel) of the centre — the nodule's own core, so a ground-glass nodule gets its ground-glass HU;
    2. threshold T = P + ``FALLBACK_THRESHOLD_SHARE`` × (N − P), a local level: relative to the nodule's
       own contrast, so the mask's outline follows the nodule's surface whatever its density (a fixed HU
       cut does not), on the inclusive side of its half-maximum (see the constant);
    3. the connected piece of voxels ≥ T at the centre (else the nearest within d/2), among the voxels on
       the lung's side (`nodule_region`: the chest wall cut off by a rolling ball, and for a ground-glass
       nodule the denser vessels by an upper HU bound);
    4. vessel and wall detachment ("smart opening"): while that piece reaches the sphere's surface, erode
       the voxels ≥ T by a ball of growing radius (one in-plane pixel per step, at most
       ``FALLBACK_MAX_OPENING`` × d; along a thick-slice axis the ball has no extent until the radius
       reaches the spacing), keep the eroded piece at the centre and dilate it back by the same ball inside
       the voxels ≥ T; a piece still attached at the largest radius is kept as it is then;
    5. holes filled in 3D and in each slice.

    Returns None when the centre holds no contrast (N − P < 100 HU) or nothing ≥ T is near it; else the
    mask and {"nodule_hu", "parenchyma_hu", "threshold_hu", "opening_mm", "attached"} (opening_mm > 0: the
    piece reached the sphere's surface and was cut off it; attached 1.0: it still reaches it — either way
    the sphere may have cut the nodule, see `fallback_segment`).
    """
    spacing = np.asarray(spacing_zyx, dtype=np.float64)
    d = max(float(diameter_mm), 3.0)
    centre = np.asarray(centre_zyx, dtype=np.float64)
    dist = _distance_mm(hu.shape, centre, spacing)
    levels = fallback_levels(hu, dist, d, spacing, FALLBACK_THRESHOLD_SHARE)
    if levels is None:
        return None
    bound_r = search_radius_mm(d)
    dense = nodule_region(hu, dist, levels, d, spacing)
    opened = smart_opening(dense, centre, d, spacing, dist > bound_r - float(spacing.max()))
    if opened is None:
        return None
    return fill_holes(opened[0]), {**levels, "opening_mm": opened[1], "attached": float(opened[2])}


def fallback_segment(
    array: np.ndarray, centre_zyx: np.ndarray, diameter_mm: float, spacing_zyx
) -> tuple[np.ndarray, dict[str, float]] | None:
    """`fallback_mask` on the block around a finding, as a mask on the whole grid of `array`; the search
    sphere grows while the piece reaches its surface.

    Why: the search sphere decides what the smart opening cuts. Too small — a detected diameter from stage
    1's box regression is often smaller than the nodule — and the opening shaves the nodule itself off the
    sphere's surface (a 9 mm nodule measured 6.3 mm); too large, and it takes in vessel branches that end
    inside it. So the search grows from below: diameters max(``FALLBACK_FIRST_SEARCH`` × d, 3 mm), then
    ×1.5 per try up to max(d, ``FALLBACK_MAX_SEARCH_MM``); the first piece that lies inside its sphere
    without any opening is the nodule; else (a vessel or the wall crosses every sphere) the first piece the
    opening detached, from the smallest sphere; else the first try. A sphere that finds nothing grows too
    (one inside a large nodule holds no parenchyma to set the threshold by). Returns (mask, info of the
    kept try + "search_diameter_mm").
    """
    spacing = np.asarray(spacing_zyx, dtype=np.float64)
    centre = np.asarray(centre_zyx, dtype=np.float64).reshape(3)
    tries = []
    limit = max(float(diameter_mm), FALLBACK_MAX_SEARCH_MM)
    d = max(FALLBACK_FIRST_SEARCH * float(diameter_mm), 3.0)
    while True:
        box = _box_around(centre, (search_radius_mm(d) + 1.0) / spacing + 1, array.shape)
        offset = np.array([s.start for s in box], dtype=np.float64)
        found = fallback_mask(np.asarray(array[box], dtype=np.float64), centre - offset, d, spacing)
        if found is not None:
            mask = np.zeros(array.shape, dtype=bool)
            mask[box] = found[0]
            tries.append((mask, {**found[1], "search_diameter_mm": d}))
            if not found[1]["attached"] and found[1]["opening_mm"] == 0.0:
                return tries[-1]  # inside its sphere, nothing cut
        if d >= limit:
            break
        d = min(1.5 * d, limit)
    detached = [t for t in tries if not t[1]["attached"]]
    return (detached or tries or [None])[0]


def search_radius_mm(diameter_mm: float) -> float:
    """Radius of the fallback's search sphere: max(0.75 d, 0.5 d + 3 mm)."""
    return max(0.75 * diameter_mm, 0.5 * diameter_mm + 3.0)


def _distance_mm(shape: tuple[int, ...], centre: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    return np.sqrt((((grid - centre) * spacing) ** 2).sum(-1))


def fallback_levels(
    hu: np.ndarray, dist_mm: np.ndarray, diameter_mm: float, spacing: np.ndarray, share: float = 0.5
) -> dict[str, float] | None:
    """Steps 1–2 of `fallback_mask`: parenchyma, nodule and threshold HU; None without contrast.

    `dist_mm`: each voxel's distance to the centre (mm); `diameter_mm` ≥ 3; the threshold lies `share` of
    the way from the parenchyma to the nodule (0.5: the midpoint, what `lungcad.followup.consistency` uses;
    `fallback_mask` passes ``FALLBACK_THRESHOLD_SHARE``).
    """
    lung = (dist_mm <= search_radius_mm(diameter_mm)) & (hu < FALLBACK_HU)
    if not lung.any():
        return None
    parenchyma = float(np.median(hu[lung]))
    smooth = ndi.gaussian_filter(hu.astype(np.float64), 0.5)
    near = dist_mm <= max(0.25 * diameter_mm, float(spacing[1:].min()))
    if not near.any():
        near = dist_mm <= dist_mm.min()
    nodule = float(smooth[near].max())
    if nodule - parenchyma < 100.0:
        return None
    threshold = parenchyma + share * (nodule - parenchyma)
    return {"nodule_hu": nodule, "parenchyma_hu": parenchyma, "threshold_hu": threshold}


def lung_side(hu: np.ndarray, diameter_mm: float, spacing: np.ndarray) -> np.ndarray:
    """The voxels on the lung's side of the pleura: the air (< ``FALLBACK_HU``) closed by a rolling ball.

    A ball of radius max(``FALLBACK_ROLLING_BALL`` × d, 3 mm) rolled through the air fills every dent
    narrower than itself — the nodule, juxta-pleural ones included — and stops at the flat chest wall (the
    rolling-ball lung boundary of lung CAD; Armato et al., "Automated detection of lung nodules in CT
    scans", Medical Physics, 2001). The block is padded by edge replication, so its faces do not erode it;
    the closing is computed with Euclidean distance transforms in mm, so a large ball costs no more.
    """
    radius = max(FALLBACK_ROLLING_BALL * diameter_mm, 3.0)
    pad = [(int(h), int(h)) for h in np.ceil(radius / np.asarray(spacing, dtype=np.float64)) + 1]
    air = np.pad(hu < FALLBACK_HU, pad, mode="edge")
    # closing by a ball as two distance transforms (linear in the block, whatever the radius): dilation =
    # within r of the air, erosion = farther than r from what the dilation left out
    dilated = ndi.distance_transform_edt(~air, sampling=spacing) <= radius
    closed = ndi.distance_transform_edt(dilated, sampling=spacing) > radius
    return closed[tuple(slice(a, a + n) for (a, _), n in zip(pad, hu.shape))]


def nodule_region(
    hu: np.ndarray, dist_mm: np.ndarray, levels: dict[str, float], diameter_mm: float, spacing: np.ndarray
) -> np.ndarray:
    """Step 3's candidate voxels: within the search sphere, ≥ T, on the lung's side (`lung_side`), and for a
    ground-glass core (N < ``SOLID_HU``) at most N + ``FALLBACK_GGO_CAP_HU``."""
    region = (dist_mm <= search_radius_mm(diameter_mm)) & (hu >= levels["threshold_hu"])
    region &= lung_side(hu, diameter_mm, spacing)
    if levels["nodule_hu"] < SOLID_HU:
        region &= hu <= levels["nodule_hu"] + FALLBACK_GGO_CAP_HU
    return region


def smart_opening(
    dense: np.ndarray, centre: np.ndarray, diameter_mm: float, spacing: np.ndarray, rim: np.ndarray
) -> tuple[np.ndarray, float, bool] | None:
    """Steps 3–4 of `fallback_mask`: the piece of `dense` at the centre, detached from what reaches `rim`.

    Returns (piece, opening radius in mm (0: none needed), whether it still reaches the rim), or None when
    nothing of `dense` is near the centre.
    """
    near = 0.5 * diameter_mm / spacing
    mask = _component_at(dense, centre, near)
    if mask is None:
        return None
    step = float(spacing[1:].min())
    radius, used = step, 0.0
    while (mask & rim).any() and radius <= FALLBACK_MAX_OPENING * diameter_mm:
        element = _ellipsoid_element(radius, spacing)
        seed = _component_at(ndi.binary_erosion(dense, structure=element), centre, near)
        if seed is None:
            break
        mask = ndi.binary_dilation(seed, structure=element) & dense
        used = radius
        radius += step
    return mask, used, bool((mask & rim).any())


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Step 5 of `fallback_mask`: holes filled in 3D, then in each slice."""
    mask = ndi.binary_fill_holes(mask)
    return np.stack([ndi.binary_fill_holes(s) for s in mask])


#: GLANCE segments a finding on the slices within max(0.75 d, this) mm of its centre, and takes the component
#: in the box of the same half-size on the original grid (d: the finding's diameter).
SEGMENT_HALF_MM = 8.0
#: It first runs the slices within max(0.75 d, this) mm only, and keeps that answer where it provably equals
#: the full span's (`_GlanceWindow.settled`); else it runs the rest of the full span. Exact, and a finding
#: whose mask stays inside the smaller span costs 15 instead of 19 slices at 8 mm (1 mm slices), 11 at ≤ 5 mm.
SEGMENT_FIRST_HALF_MM = 4.0
#: `_GlanceWindow.component`'s answer when the smaller span cannot settle the mask.
_GROW = object()


class _GlanceWindow:
    """One finding's GLANCE slices and box at a given half-size, and whether a smaller one's answer is final.

    The mask of a half-size is the connected component (6-connectivity) of the thresholded, interpolated
    probability in the box holding the finding's centre, else the nearest within its radius
    (`_component_at`). The smaller box's answer equals the full box's when nothing it depends on can change:
    the voxels whose probability may differ are those on the faces beyond which the full box goes on and
    those whose interpolation reads a slice that only the full span runs; the answer is settled when its
    component, the component's 6-neighbours, the finding's search ellipsoid and its centre voxel avoid them.
    """

    def __init__(
        self,
        centre_o: np.ndarray,
        o_spacing: np.ndarray,
        c_spacing: np.ndarray,
        shape_c: tuple[int, ...],
        shape_o: tuple[int, ...],
        diameter_mm: float,
        threshold: float,
    ) -> None:
        self.centre_o, self.o_spacing, self.c_spacing = centre_o, o_spacing, c_spacing
        self.shape_c, self.shape_o = shape_c, tuple(int(v) for v in shape_o)
        self.radius_vox = 0.5 * diameter_mm / o_spacing
        self.threshold = threshold
        self.full_mm = max(0.75 * diameter_mm, SEGMENT_HALF_MM)
        self.first_mm = min(max(0.75 * diameter_mm, SEGMENT_FIRST_HALF_MM), self.full_mm)
        centre_c = centre_o * o_spacing / c_spacing  # same origin and direction: index scales with spacing
        self.zc = int(np.clip(round(centre_c[0]), 0, shape_c[0] - 1))

    def slices(self, half_mm: float) -> np.ndarray:
        span = int(np.ceil(half_mm / self.c_spacing[0])) + 1
        return np.arange(max(self.zc - span, 0), min(self.zc + span + 1, self.shape_c[0]))

    def box(self, half_mm: float) -> tuple[slice, ...]:
        return _box_around(self.centre_o, half_mm / self.o_spacing + 1, self.shape_o)

    def component(
        self, glance: GlanceSlices, half_mm: float
    ) -> tuple[tuple[slice, ...], np.ndarray] | None | object:
        """(box, mask in it), None (no component, or no segmentation model), or `_GROW` (below the full
        half-size only)."""
        slices = self.slices(half_mm)
        probability = glance(slices)
        if probability is None:
            return None
        box = self.box(half_mm)
        grid = np.meshgrid(*[np.arange(s.start, s.stop) for s in box], indexing="ij")
        coords = [g * (o / c) for g, o, c in zip(grid, self.o_spacing, self.c_spacing)]
        prob = _interpolate(probability, coords, slices)
        centre = self.centre_o - [s.start for s in box]
        local = _component_at(prob >= self.threshold, centre, self.radius_vox)
        if half_mm < self.full_mm and not self.settled(local, box, centre, coords[0], slices):
            return _GROW
        return None if local is None else (box, local)

    def settled(
        self,
        local: np.ndarray | None,
        box: tuple[slice, ...],
        centre: np.ndarray,
        z_cache: np.ndarray,
        slices: np.ndarray,
    ) -> bool:
        """Whether the answer `local` in `box` (from `slices`; `centre` in box voxels) is the one the full
        half-size would give."""
        full_slices, full_box = self.slices(self.full_mm), self.box(self.full_mm)
        shape = tuple(s.stop - s.start for s in box)
        zone = np.zeros(shape, dtype=bool)
        if full_slices[0] < slices[0]:  # reads a slice below the span that only the full span runs
            zone |= z_cache < slices[0]
        if full_slices[-1] > slices[-1]:
            zone |= z_cache > slices[-1]
        unsure = ndi.binary_dilation(zone) if zone.any() else zone
        for axis, (mine, full) in enumerate(zip(box, full_box)):
            index: list[Any] = [slice(None)] * 3
            for side, beyond in ((0, full.start < mine.start), (-1, full.stop > mine.stop)):
                if beyond:
                    index[axis] = side
                    unsure[tuple(index)] = True
        if not unsure.any():
            return True
        offsets = np.meshgrid(*[np.arange(n) - c for n, c in zip(shape, centre)], indexing="ij")
        needed = sum((o / r) ** 2 for o, r in zip(offsets, self.radius_vox)) <= 1.0
        needed[tuple(int(np.clip(round(c), 0, n - 1)) for c, n in zip(centre, shape))] = True
        if local is not None:
            needed |= local
        return not (needed & unsure).any()


def _segment(
    bundle: Bundle,
    glance: GlanceSlices,
    seg_scan: PreparedScan,
    volume: CTVolume,
    world_xyz: np.ndarray,
    diameter_mm: float,
) -> tuple[np.ndarray, str]:
    """Mask (bool, original grid) of the nodule at `world_xyz` and how it was made (module docstring)."""
    d = max(float(diameter_mm), 3.0)
    c_spacing = np.asarray(seg_scan.entry["spacing"], dtype=np.float64)[::-1]  # (z, y, x)
    o_spacing = np.asarray(volume.spacing, dtype=np.float64)[::-1]
    centre_o = np.asarray(
        volume.world_to_voxel(np.asarray(world_xyz, dtype=np.float64)), dtype=np.float64
    ).reshape(3)
    shape_c = tuple(int(v) for v in seg_scan.entry["shape"])
    threshold = bundle.models["seg"].task.inference.seg_threshold
    window = _GlanceWindow(centre_o, o_spacing, c_spacing, shape_c, volume.shape, d, threshold)
    glance.full_spans.update(int(z) for z in window.slices(window.full_mm))
    answer = window.component(glance, window.first_mm)
    if answer is _GROW:
        answer = window.component(glance, window.full_mm)
    if isinstance(answer, tuple):
        box, local = answer
        mask = np.zeros(volume.shape, dtype=bool)
        mask[box] = local
        return mask, "glance"
    # Fallback: the HU rule of `fallback_segment`; where it finds nothing, a sphere of the finding's diameter.
    found = fallback_segment(volume.array, centre_o, d, o_spacing)
    if found is not None:
        return found[0], "hu-threshold"
    half = (search_radius_mm(d) + 1.0) / o_spacing + 1
    box = _box_around(centre_o, half, volume.shape)
    offset = np.array([s.start for s in box], dtype=np.float64)
    grid = np.stack(np.meshgrid(*[np.arange(s.start, s.stop) for s in box], indexing="ij"), -1)
    local = ((((grid - centre_o) * o_spacing) / (0.5 * d)) ** 2).sum(-1) <= 1.0
    if not local.any():  # a sphere smaller than a voxel: the centre voxel
        local[tuple(np.clip(np.round(centre_o - offset).astype(int), 0, np.asarray(local.shape) - 1))] = True
    mask = np.zeros(volume.shape, dtype=bool)
    mask[box] = local
    return mask, "sphere"


def _interpolate(probability: np.ndarray, coords: list[np.ndarray], slices: np.ndarray) -> np.ndarray:
    """Linear interpolation of the probability volume at `coords`, reading only the finding's slices.

    Outside `slices` the per-finding map was zero; other findings' slices are masked out so that the result
    is the one of a map holding this finding's slices alone (the map the pipeline segmented from before).
    """
    z0, z1 = int(slices.min()), int(slices.max()) + 1
    part = probability[z0:z1].astype(np.float32)
    lo = max(z0 - 1, 0)
    padded = np.zeros((z1 + 1 - lo, *part.shape[1:]), dtype=np.float32)
    padded[z0 - lo : z1 - lo] = part
    shifted = [coords[0] - lo, *coords[1:]]
    return ndi.map_coordinates(padded, shifted, order=1, mode="constant")


#: Findings per M³Net forward pass (their nested patches stacked into one batch).
CLASSIFY_BATCH = 8


def _malignancy(bundle: Bundle, hu: np.ndarray, centres_zyx: list[np.ndarray]) -> list[float]:
    """M³Net probability of class 1 (malignant) on the nested native-resolution patches around each centre.

    The findings' patches run ``CLASSIFY_BATCH`` at a time (the network is in eval mode: a finding's
    probability does not depend on the others in its batch).
    """
    from lungcls.data import normalize_hu
    from lungcls.patches import crop_block, nested_crops

    model = bundle.models["cls"]
    pre, task = model.preprocessing, model.task
    sizes = {int(k): int(v) for k, v in pre["sizes"].items()}
    device = next(task.parameters()).device
    out: list[float] = []
    for start in range(0, len(centres_zyx), CLASSIFY_BATCH):
        batch: dict[int, list[np.ndarray]] = {}
        for centre in centres_zyx[start : start + CLASSIFY_BATCH]:
            block, offset = crop_block(
                hu, centre, (pre["context_depth"], pre["context"], pre["context"]), pre["boundary"]
            )
            for k, v in nested_crops(block, sizes, int(pre["depth"]), offset).items():
                batch.setdefault(k, []).append(normalize_hu(v, pre["normalization"], pre["window_hu"])[None])
        patches = {k: torch.from_numpy(np.stack(v)).to(device) for k, v in batch.items()}
        with torch.inference_mode():
            logits = task.model(patches).logits
        out += [float(p) for p in torch.softmax(logits.float(), dim=-1)[:, -1]]
    return out


@contextmanager
def _timed(timings: dict[str, float], step: str, progress: Callable[[str], None] | None) -> Iterator[None]:
    if progress:
        progress(step)
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[step] = timings.get(step, 0.0) + round(time.perf_counter() - start, 4)


def analyze_volume(
    volume: CTVolume,
    bundle: Bundle,
    *,
    nodules_world_mm: np.ndarray | None = None,
    progress: Callable[[str], None] | None = None,
) -> Analysis:
    """Run the bundle's models on one scan (module docstring).

    Args:
        volume: the scan as read (HU, original geometry).
        bundle: a loaded, verified bundle.
        nodules_world_mm: (n, 3) world (x, y, z) centres, or (n, 4) with a diameter in mm: skip detection and
            analyse these positions (findings in the given order, ``detection_score`` None).
        progress: called with each step's name as it starts.

    Returns:
        The ``Analysis``; ``timings_s`` has read (0 here; the caller adds it), preprocess, detect, fpr, segment,
        measure, classify.
    """
    from lungcad.lungrads import baseline_category
    from lungcad.measure import measure_nodule

    timings: dict[str, float] = {"read": 0.0}
    with _timed(timings, "preprocess", progress):
        det_pre = bundle.models["stage1"].preprocessing
        seg_pre = bundle.models["seg"].preprocessing
        det_scan = prepare_scan(volume, det_pre["cache"])
        seg_scan = (
            det_scan if seg_pre["cache"] == det_pre["cache"] else prepare_scan(volume, seg_pre["cache"])
        )
        hu = clip_hu(np.asarray(volume.array))  # M³Net's native HU, as its patch cache stores them
    if nodules_world_mm is None:
        with _timed(timings, "preprocess", None):
            image = claf_view(det_scan, det_pre)
        with _timed(timings, "detect", progress):
            cands, tensor = _detect(bundle, image)
        with _timed(timings, "fpr", progress):
            candidates = _fpr(bundle, det_scan, tensor, cands)
        chosen = candidates[candidates["probability"] >= bundle.operating_threshold]
        targets = [
            (np.array([r.coordX, r.coordY, r.coordZ]), float(r.diameter_mm), float(r.probability))
            for r in chosen.itertuples()
        ]
        source = "detected"
    else:
        given = np.asarray(nodules_world_mm, dtype=np.float64)
        if given.ndim != 2 or given.shape[1] not in (3, 4):
            raise ValueError(
                f"nodules_world_mm must be (n, 3) or (n, 4) world mm rows, got shape {given.shape}"
            )
        candidates = pd.DataFrame(columns=list(RESULT_COLUMNS))
        timings["detect"] = timings["fpr"] = 0.0
        targets = [
            (row[:3], float(row[3]) if given.shape[1] == 4 and row[3] > 0 else GIVEN_DIAMETER_MM, None)
            for row in given
        ]
        source = "given"
    labels = np.zeros(volume.shape, dtype=np.uint16)
    glance = GlanceSlices(bundle, seg_scan)
    kept: list[tuple[float | None, Any, str]] = []
    timings.update(segment=0.0, measure=0.0, classify=0.0)
    for world, diameter, score in targets:
        voxel = np.asarray(volume.world_to_voxel(world)).reshape(3)
        inside = np.all((voxel >= -0.5) & (voxel <= np.asarray(volume.shape) - 0.5))
        if not inside:
            if source == "given":
                raise ValueError(f"nodule at world {tuple(np.round(world, 2))} mm lies outside the scan")
            continue
        centre_idx = tuple(int(np.clip(round(v), 0, s - 1)) for v, s in zip(voxel, volume.shape))
        if source == "detected" and labels[centre_idx]:
            continue  # inside a better finding's mask: the same nodule
        with _timed(timings, "segment", progress):
            mask, how = _segment(bundle, glance, seg_scan, volume, world, diameter)
            mask &= labels == 0
            if not mask.any():
                mask = np.zeros(volume.shape, dtype=bool)
                mask[centre_idx] = True
                how = "sphere"
        with _timed(timings, "measure", progress):
            measurements = measure_nodule(volume, mask)
        labels[mask] = len(kept) + 1
        kept.append((score, measurements, how))
    findings: list[Finding] = []
    with _timed(timings, "classify", progress if kept else None):
        centroids = [np.asarray(m.center_voxel_xyz, dtype=np.float64)[::-1] for _, m, _ in kept]
        probabilities = _malignancy(bundle, hu, centroids) if kept else []
        for index, ((score, m, how), probability) in enumerate(zip(kept, probabilities), start=1):
            category = baseline_category(m.type, m.mean_diameter_mm, m.solid_component_mm)
            findings.append(Finding(index, score, probability, m, category, source, how))
    return Analysis(
        volume,
        findings,
        labels,
        candidates,
        timings,
        bundle.info(),
        (glance.slices_run, len(glance.full_spans)),
    )
