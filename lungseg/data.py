"""GLANCE data: 2D slices of the preprocessed cache with nodule masks and centre-heatmap targets.

Resolution (a decision the paper leaves open for us; see ``docs/lungseg.md``): GLANCE works on whole
axial slices resized to 512×512. We take the slices from the shared 1 mm cache (``common.cache``) rather
than from the native DICOM/MHD slices: a typical 350 mm field of view is 350 px at 1 mm and becomes
512 px at ≈ 0.68 mm per pixel — the native in-plane pixel size of most LIDC scans — so no detail is
lost, while every scan gets the same pixel size (a 10 mm nodule is always ≈ 15 px) and the same 1 mm
slice spacing, which makes 3D merging of slice detections uniform. ``spacing`` (the cache's) can be set
finer or coarser; the working size (``image_size``) is independent of it.

Samples:

* **train** (:class:`GlanceSliceDataset`): one slice → ``image`` (1×S×S, lung window [−1000, 400] HU →
  [0, 1]), ``mask`` (1×S×S nodule mask), ``heatmap`` (1×S×S Gaussian centres, σ ∝ diameter), ``has_mask``.
  Slices holding a nodule cross-section are drawn with probability ``nodule_fraction`` (oversampling, the
  paper's "sample slices that include at least one positive nodule"); the rest are drawn uniformly from
  the lung slices. Augmentation: :class:`lungseg.augment.SliceAugment`.
* **val / test / predict** (:class:`GlanceScanDataset`): one whole scan → its lung slices at the working
  size plus what is needed to map predictions back (box, cache geometry) and to score them (nodules in
  world mm, excluded findings, the nodule label volume). Batches are lists of scans.

Masks: LIDC-IDRI (consensus of the readers' outlines, joined to the scans by series UID inside the
adapter) and LNDb have nodule masks (:mod:`lungseg.masks` builds them on the cache grid during
``prepare_data``); LUNA16 and Tianchi are detection-only: their heatmaps come from centre + diameter
(sphere cross-sections), ``has_mask`` is False and the task turns the segmentation loss off for them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from common.cache import PreprocessedCache
from common.lightning.datamodule import CacheDataModule
from common.preprocess import GLANCE_WINDOW, window
from lungseg.augment import SliceAugment
from lungseg.losses import gaussian_center_heatmap
from lungseg.masks import MASK_DATASETS, NoduleMaskStore
from lungseg.slices import (
    AIR_HU,
    NoduleSection,
    SquareBox,
    crop_resize,
    full_box,
    lung_box,
    lung_slices,
    nodule_sections,
)

log = logging.getLogger(__name__)

__all__ = ["GlanceDataModule", "GlanceScanDataset", "GlanceSliceDataset", "ScanView", "collate_scans"]

MASK_MODES = ("auto", "none")
SLICE_MODES = ("lung", "all")


class ScanView:
    """One cached scan as GLANCE sees it: its box, its slices, its nodule cross-sections.

    Arrays are memory-mapped lazily and per process (never pickled into data-loader workers).

    Args:
        cache: the preprocessed cache.
        uid: scan uid.
        image_size: working size S.
        lung_crop: crop to the lung bounding box (else the whole slice).
        crop_margin_mm: margin around the lungs.
        masks: the nodule mask store, or ``None`` for a detection-only dataset.
        slice_margin: extra slices kept above and below the lungs.
    """

    def __init__(
        self,
        cache: PreprocessedCache,
        uid: str,
        image_size: int,
        lung_crop: bool,
        crop_margin_mm: float,
        masks: NoduleMaskStore | None,
        slice_margin: int = 2,
    ) -> None:
        self.uid = uid
        self.root = Path(cache.root)
        self.entry = cache.entry(uid)
        self.image_size = image_size
        self.shape = tuple(int(v) for v in self.entry["shape"])
        self.spacing = tuple(float(v) for v in self.entry["spacing"])
        lung = self._lung()
        box = lung_box(lung, crop_margin_mm / min(self.spacing[:2])) if lung_crop else None
        if lung_crop and box is None:
            log.warning("scan %s has an empty lung mask; using the whole slice instead of the lung box", uid)
        self.box: SquareBox = box or full_box(self.shape[1:])
        self.lung_slices = lung_slices(lung, slice_margin)
        self.has_mask = masks is not None
        self.mask_path: Path | None = None
        self.label_of: dict[str, int] = {}
        labels = None
        if masks is not None:
            labels, self.label_of = masks.load(uid)
            self.mask_path = masks.root / f"{uid}.npy"
        self.sections: dict[int, list[NoduleSection]] = nodule_sections(
            self.entry["nodules"], self.shape, self.spacing, labels, self.label_of
        )
        self._arrays: dict[str, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"] = {}
        return state

    def _lung(self) -> np.ndarray:
        return np.load(self.root / self.entry["lung_mask"], mmap_mode="r", allow_pickle=False)

    def array(self, key: str) -> np.ndarray:
        """The memory-mapped ``"image"`` or ``"labels"`` volume."""
        if key not in self._arrays:
            path = self.root / self.entry["image"] if key == "image" else self.mask_path
            if path is None:
                raise KeyError(f"scan {self.uid} has no nodule masks")
            self._arrays[key] = np.load(path, mmap_mode="r", allow_pickle=False)
        return self._arrays[key]

    def image_slice(self, z: int, lo: float, hi: float) -> np.ndarray:
        """Slice ``z`` at the working size, windowed to [0, 1]."""
        hu = crop_resize(
            np.asarray(self.array("image")[z], dtype=np.float32), self.box, self.image_size, AIR_HU
        )
        return window(hu, lo, hi)

    def image_stack(self, z: int, lo: float, hi: float, context: int = 0, step: int = 1) -> np.ndarray:
        """Slices ``z − context·step … z + context·step`` (clamped to the scan) as channels: (2·context+1, S, S)."""
        zs = np.clip(z + step * np.arange(-context, context + 1), 0, self.shape[0] - 1)
        return np.stack([self.image_slice(int(k), lo, hi) for k in zs])

    def mask_slice(self, z: int) -> np.ndarray:
        """Nodule mask of slice ``z`` at the working size (uint8 0/1; zeros without masks)."""
        if not self.has_mask:
            return np.zeros((self.image_size, self.image_size), dtype=np.uint8)
        binary = (np.asarray(self.array("labels")[z]) > 0).astype(np.float32)
        return (crop_resize(binary, self.box, self.image_size, 0.0) >= 0.5).astype(np.uint8)

    def centres(self, z: int) -> tuple[list[tuple[float, float]], list[float]]:
        """Nodule cross-section centres (y, x) and diameters in working pixels for slice ``z``."""
        sections = self.sections.get(int(z), [])
        if not sections:
            return [], []
        yx = self.box.to_working(np.array([[s.cy, s.cx] for s in sections]), self.image_size)
        scale = self.box.scale(self.image_size)
        return [tuple(map(float, p)) for p in yx], [s.diameter * scale for s in sections]


def _world_rows(findings: Sequence[dict[str, Any]]) -> torch.Tensor:
    rows = [[*f["world_xyz"], f["diameter_mm"]] for f in findings]
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 4)


class GlanceSliceDataset(Dataset):
    """Training slices (see the module docstring).

    Args:
        views: the part's scans.
        window_hu: lung window.
        augment: the augmentation, or ``None``.
        heatmap_sigma_scale, min_heatmap_sigma: Gaussian σ = max(min, scale · diameter) in working pixels.
        slices: ``"lung"`` (slices with lung ± margin, plus every nodule slice) or ``"all"``.
        context_slices, context_step: 2.5D input, see :class:`GlanceDataModule`.
    """

    def __init__(
        self,
        views: Sequence[ScanView],
        window_hu: tuple[float, float] = GLANCE_WINDOW,
        augment: SliceAugment | None = None,
        heatmap_sigma_scale: float = 1.0 / 6.0,
        min_heatmap_sigma: float = 1.0,
        slices: str = "lung",
        context_slices: int = 0,
        context_step: int = 1,
    ) -> None:
        self.views = list(views)
        self.window = (float(window_hu[0]), float(window_hu[1]))
        self.context = (int(context_slices), int(context_step))
        self.augment = augment
        self.sigma_scale = heatmap_sigma_scale
        self.min_sigma = min_heatmap_sigma
        index = []
        for s, view in enumerate(self.views):
            zs = set(range(view.shape[0])) if slices == "all" else set(view.lung_slices.tolist())
            zs |= set(view.sections)
            index += [(s, z, z in view.sections) for z in sorted(zs)]
        if not index:
            raise ValueError("the training part has no slices; check the cache and the split")
        self.index = np.asarray(index, dtype=np.int64).reshape(-1, 3)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def nodule_slices(self) -> np.ndarray:
        """Boolean flag per sample: the slice holds a nodule cross-section."""
        return self.index[:, 2].astype(bool)

    def sample(self, i: int, seed: int | None = None) -> dict[str, Any]:
        """Sample ``i``; ``seed`` fixes the augmentation (default: drawn from torch's generator)."""
        s, z, _ = (int(v) for v in self.index[i])
        view = self.views[s]
        image = view.image_stack(z, *self.window, *self.context).transpose(1, 2, 0)  # (S, S, C)
        mask = view.mask_slice(z)
        centres, diameters = view.centres(z)
        if self.augment is not None:
            if seed is None:
                seed = int(torch.randint(0, 2**31 - 1, ()).item())
            image, mask, centres, diameters = self.augment(image, mask, centres, diameters, seed)
        image = image.reshape(image.shape[0], image.shape[1], -1)
        size = image.shape[0]
        heatmap = gaussian_center_heatmap(
            (size, size), centres, diameters, sigma_scale=self.sigma_scale, min_sigma=self.min_sigma
        )
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)),
            "mask": torch.from_numpy(mask.astype(np.float32))[None],
            "heatmap": torch.from_numpy(heatmap)[None],
            "has_mask": torch.tensor(view.has_mask),
            "uid": view.uid,
            "z": z,
        }

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.sample(i)


def collate_scans(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Scan batches stay lists: scans differ in slice count and geometry."""
    return list(items)


class GlanceScanDataset(Dataset):
    """Whole scans for validation, testing and prediction (see the module docstring).

    Args:
        views: the part's scans.
        window_hu: lung window.
        slices: ``"lung"`` (slices with lung ± margin; all when the lung mask is empty) or ``"all"``.
        context_slices, context_step: 2.5D input, see :class:`GlanceDataModule`.
    """

    collate_fn = staticmethod(collate_scans)

    def __init__(
        self,
        views: Sequence[ScanView],
        window_hu: tuple[float, float] = GLANCE_WINDOW,
        slices: str = "lung",
        context_slices: int = 0,
        context_step: int = 1,
    ) -> None:
        self.views = list(views)
        self.window = (float(window_hu[0]), float(window_hu[1]))
        self.slices = slices
        self.context = (int(context_slices), int(context_step))

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, i: int) -> dict[str, Any]:
        view = self.views[i]
        zs = np.arange(view.shape[0]) if self.slices == "all" else view.lung_slices
        stack = np.stack([view.image_stack(int(z), *self.window, *self.context) for z in zs]).astype(
            np.float16
        )
        entry = view.entry
        return {
            "uid": view.uid,
            "image": torch.from_numpy(stack),
            "slices": torch.from_numpy(np.asarray(zs, dtype=np.int64)),
            "box": view.box.as_tuple(),
            "image_size": view.image_size,
            "shape": view.shape,
            "spacing": view.spacing,
            "origin": tuple(float(v) for v in entry["origin"]),
            "direction": tuple(float(v) for v in entry["direction"]),
            "original_shape": tuple(int(v) for v in entry["original_shape"]),
            "original_spacing": tuple(float(v) for v in entry["original_spacing"]),
            "nodules": _world_rows(entry["nodules"]),
            "excluded": _world_rows(entry["excluded"]),
            "labels": np.asarray(view.array("labels")) if view.has_mask else None,
            "has_mask": view.has_mask,
        }


class GlanceDataModule(CacheDataModule):
    """The GLANCE datamodule over the common cache (arguments of ``CacheDataModule`` plus the ones below).

    Args:
        dataset, split, batch_size: as in ``CacheDataModule``, with GLANCE's defaults (LIDC-IDRI, a seeded
            patient-level ratio split, 8 slices per batch).
        image_size: working size S of the square slices (paper 512; multiple of 32).
        window_hu: lung window (paper [−1000, 400] HU).
        lung_crop: crop every slice of a scan to the scan's lung bounding box before resizing.
        crop_margin_mm: margin around the lung box.
        masks: ``"auto"`` (nodule masks for LIDC-IDRI and LNDb, detection-only otherwise) or ``"none"``
            (heatmap targets only, also for LIDC/LNDb).
        consensus_level: reader agreement of the LIDC/LNDb consensus masks.
        slices: training and evaluation slices, ``"lung"`` or ``"all"``.
        nodule_fraction: share of training draws taken from slices with a nodule (oversampling); ``None``
            draws all slices uniformly.
        samples_per_epoch: training draws per epoch (default: the number of training slices).
        heatmap_sigma_scale, min_heatmap_sigma: heatmap σ = max(min, scale × diameter), working pixels.
        augment: rotation / scaling / elastic augmentation of the training slices.
        rotation_deg, scale_range, elastic, elastic_sigma, elastic_displacement, p_affine, p_elastic:
            see :class:`lungseg.augment.SliceAugment`.
        eval_batch_size: scans per validation/test/predict batch.
        context_slices: 2.5D input: ``k`` neighbouring slices on each side become extra input channels
            (``2k + 1`` in all; linked to the task's ``context_slices``). 0 — the paper's single slice — by
            default.
        context_step: cache slices between two context channels (at 1 mm: the context reaches ±k·step mm).
        **kwargs: the other ``CacheDataModule`` / ``DatasetDataModule`` arguments (root, cache_dir, spacing,
            split_file, fold, ratios, seed, predict_root, num_workers, lenient, dataset_kwargs).
    """

    def __init__(
        self,
        dataset: str = "lidc",
        split: str = "ratio",
        batch_size: int = 8,
        image_size: int = 512,
        window_hu: tuple[float, float] = GLANCE_WINDOW,
        lung_crop: bool = False,
        crop_margin_mm: float = 10.0,
        masks: str = "auto",
        consensus_level: float = 0.5,
        slices: str = "lung",
        nodule_fraction: float | None = 0.5,
        samples_per_epoch: int | None = None,
        heatmap_sigma_scale: float = 1.0 / 6.0,
        min_heatmap_sigma: float = 1.0,
        augment: bool = True,
        rotation_deg: float = 15.0,
        scale_range: float = 0.1,
        elastic: bool = True,
        elastic_sigma: float = 0.05,
        elastic_displacement: float = 0.008,
        p_affine: float = 0.8,
        p_elastic: float = 0.3,
        eval_batch_size: int = 1,
        context_slices: int = 0,
        context_step: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset=dataset, split=split, batch_size=batch_size, **kwargs)
        if image_size % 32 or image_size < 32:
            raise ValueError(
                f"image_size must be a positive multiple of 32 (GLANCE's stride), got {image_size}"
            )
        if masks not in MASK_MODES:
            raise ValueError(f"masks={masks!r}: choose one of {MASK_MODES}")
        if slices not in SLICE_MODES:
            raise ValueError(f"slices={slices!r}: choose one of {SLICE_MODES}")
        if nodule_fraction is not None and not 0.0 <= nodule_fraction <= 1.0:
            raise ValueError(f"nodule_fraction must lie in [0, 1] or be null, got {nodule_fraction}")
        self.image_size = image_size
        self.window_hu = (float(window_hu[0]), float(window_hu[1]))
        self.lung_crop = lung_crop
        self.crop_margin_mm = crop_margin_mm
        self.masks = masks
        self.consensus_level = consensus_level
        self.slices = slices
        self.nodule_fraction = nodule_fraction
        self.samples_per_epoch = samples_per_epoch
        self.heatmap_sigma_scale = heatmap_sigma_scale
        self.min_heatmap_sigma = min_heatmap_sigma
        self.augment = augment
        self.augment_kwargs = {
            "rotation_deg": rotation_deg,
            "scale": scale_range,
            "elastic": elastic,
            "elastic_sigma": elastic_sigma,
            "elastic_displacement": elastic_displacement,
            "p_affine": p_affine,
            "p_elastic": p_elastic,
        }
        self.eval_batch_size = eval_batch_size
        if context_slices < 0 or context_step < 1:
            raise ValueError(
                f"context_slices must be >= 0 and context_step >= 1, got {context_slices}, {context_step}"
            )
        self.context_slices = context_slices
        self.context_step = context_step

    @property
    def has_masks(self) -> bool:
        """Whether the training scans come with nodule masks (LIDC-IDRI / LNDb with ``masks="auto"``)."""
        return self.masks == "auto" and self.dataset_name in MASK_DATASETS

    def mask_store(self, cache: PreprocessedCache | None = None) -> NoduleMaskStore:
        return NoduleMaskStore(cache or PreprocessedCache(self.cache_dir), self.consensus_level)

    def prepare_data(self) -> None:
        """Build the cache (base class), then the nodule masks on its grid for datasets that have them
        (not while predicting on a folder of new scans: they have no annotations)."""
        super().prepare_data()
        if self.has_masks and not self.predicting_new_scans():
            self.mask_store().build(self.open_dataset(), self.dataset_name, strict=not self.lenient)

    def _views(self, uids: Sequence[str], cache: PreprocessedCache, with_masks: bool) -> list[ScanView]:
        store = self.mask_store(cache) if with_masks else None
        return [
            ScanView(cache, uid, self.image_size, self.lung_crop, self.crop_margin_mm, store) for uid in uids
        ]

    def build_dataset(self, part: str, uids: list[str], cache: PreprocessedCache) -> Dataset:
        with_masks = self.has_masks and not (part == "predict" and self.predict_root)
        views = self._views(uids, cache, with_masks)
        if part == "train":
            augment = SliceAugment(self.image_size, **self.augment_kwargs) if self.augment else None
            return GlanceSliceDataset(
                views,
                self.window_hu,
                augment,
                self.heatmap_sigma_scale,
                self.min_heatmap_sigma,
                self.slices,
                self.context_slices,
                self.context_step,
            )
        return GlanceScanDataset(views, self.window_hu, self.slices, self.context_slices, self.context_step)

    def train_dataloader(self) -> DataLoader:
        dataset = self.datasets["train"]
        if self.nodule_fraction is None:
            return self._loader("train", shuffle=True)
        flags = dataset.nodule_slices
        n_pos, n_neg = int(flags.sum()), int((~flags).sum())
        if n_pos == 0 or n_neg == 0:
            weights = np.ones(len(flags))
        else:
            weights = np.where(flags, self.nodule_fraction / n_pos, (1.0 - self.nodule_fraction) / n_neg)
        generator = torch.Generator().manual_seed(int(torch.initial_seed()) % (2**63))
        sampler = WeightedRandomSampler(
            torch.as_tensor(weights, dtype=torch.double),
            num_samples=self.samples_per_epoch or len(flags),
            replacement=True,
            generator=generator,
        )
        return self._loader("train", shuffle=False, sampler=sampler)
