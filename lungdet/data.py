"""Datamodules of the CLAF pipeline: stage-1 training crops and whole scans, stage-2 candidate crops.

Both stages read the preprocessed cache (`common.cache`: 1 mm int16 HU + uint8 lung mask per scan) and see
the scan the same way (``lungdet.scan_reader.ScanReader``: CLAF window, lung mask dilated by ``lung_margin``,
``outside_hu`` outside the lungs and outside the scan).

Stage 1 (``CandidateDataModule``):

* train: ``samples_per_epoch`` 3D crops per epoch. With probability ``pos_fraction`` a crop holds a
  nodule at a random position (at least ``pos_margin`` voxels inside the crop), otherwise it is centred on
  a random point of the scan's lung bounding box. Augmentation: random flips per axis and isotropic
  scaling by ``s`` ∈ ``scale_range`` (the crop covers crop/s voxels of the scan, resampled trilinearly; box
  centres and diameters scale with it). Each sample carries its nodule boxes (z, y, x, d in crop voxels),
  the excluded findings as ignore boxes (LUNA16 diameter −1 → 10 mm), and the crop's place in the scan
  (``start``, ``scan_shape``, both in units of the scaled scan) from which the task builds the coordinate
  channels. A flip is treated as mirroring the whole patient, so ``start`` is mirrored too and the
  coordinate maps stay monotonic, exactly as for an unflipped crop of the mirrored scan. Anchor targets are
  assigned in the task (``lungdet.task.CandidateTask``), next to the network whose grid they must match.
* val / test / predict: one whole scan per item (``ScanItem`` fields below) for sliding-window inference.

Stage 2 (``FPRDataModule``):

* candidates come from stage-1 results CSVs (``candidates_csv``, LUNA16 results format) and/or the
  dataset's own candidate list (``dataset_candidates``: LUNA16 ``candidates_V2.csv``), labelled by
  ``lungdet.candidates.candidate_table`` (the LUNA16 hit rule; candidates on excluded findings are dropped
  from training and from AUC/accuracy, the FROC ignores them too);
* train: ``samples_per_epoch`` crops per epoch, exactly 1 true : ``negatives_per_positive`` false, with
  random shifts (± ``max_shift`` voxels), flips and 90° in-plane rotations; the crop is the MPPN's
  32×48×48 large crop (``crop_candidates`` convention), the MPPN cuts the medium and small ones;
* val / test: whole scans with their candidates, or without (``eval_candidates="stage1"``) so the task
  runs stage 1 first — the full two-stage pipeline; predict on a folder always runs both stages.

Determinism: training samples are drawn from ``numpy.random.default_rng([seed, epoch, index])`` and the
order comes from ``EpochSampler`` seeded with (seed, epoch), so the data of epoch *e* do not depend on
what ran before; resuming from an epoch-end checkpoint replays exactly the same crops (tested).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from common.cache import PreprocessedCache
from common.lightning.datamodule import CacheDataModule
from common.preprocess import CLAF_WINDOW
from lungdet.candidates import CANDIDATE_COLUMNS, candidate_table
from lungdet.models.mppn import MPPN_CROP_SIZES
from lungdet.scan_reader import (
    DEFAULT_LUNG_MARGIN,
    DEFAULT_OUTSIDE_HU,
    ScanReader,
    fill_value,
    finding_array,
    finding_rows,
    sized_diameters,
)

log = logging.getLogger(__name__)

__all__ = [
    "CandidateCropDataset",
    "CandidateDataModule",
    "EpochSampler",
    "FPRCropDataset",
    "FPRDataModule",
    "ScanDataset",
    "collate_crops",
    "collate_scans",
]

# ------------------------------------------------------------------------------------------ samplers


class EpochSampler(DistributedSampler):
    """Yields ``(index, epoch)`` keys in an order drawn from (seed, epoch); a rank's share under DDP.

    The dataset derives each sample's randomness from the same key, so epoch *e* yields the same crops in
    the same order whether or not the run was interrupted before it. Subclassing ``DistributedSampler``
    keeps Lightning from wrapping it; Lightning calls ``set_epoch`` at every epoch start.

    Args:
        length: samples per epoch (all ranks together).
        seed: base seed.
        shuffle: permute the order each epoch.
    """

    def __init__(self, length: int, seed: int = 0, shuffle: bool = True) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            replicas, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        else:
            replicas, rank = 1, 0
        self.length = int(length)
        super().__init__(
            range(self.length), num_replicas=replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
        )

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        if len(order) < self.total_size:  # pad so every rank gets the same count
            order += order[: self.total_size - len(order)]
        for index in order[self.rank : self.total_size : self.num_replicas]:
            yield index, self.epoch

    def __len__(self) -> int:
        return self.num_samples


def _key(key: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(key, tuple | list):
        return int(key[0]), int(key[1])
    return int(key), 0


# ----------------------------------------------------------------------------------- stage-1 samples


def collate_crops(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack equal-shape tensors; keep per-sample box tensors (variable length) and uids as lists."""
    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [b[key] for b in batch]
        if key in ("boxes", "ignore", "uid") or not isinstance(values[0], torch.Tensor):
            out[key] = values
        else:
            out[key] = torch.stack(values)
    return out


def collate_scans(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Whole scans differ in size: a batch is the list of items."""
    return list(batch)


class CandidateCropDataset(Dataset):
    """Stage-1 training crops (see the module docstring).

    Args:
        reader: prepared-scan reader.
        uids: scans of this part.
        crop_size: (D, H, W) crop, each a multiple of 32 (128³ in the paper).
        samples_per_epoch: crops per epoch.
        pos_fraction: probability that a crop holds a nodule.
        pos_margin: voxels kept between a nodule centre and the crop border in positive crops.
        flip: random flips along each axis.
        scale_range: (min, max) isotropic scale factor; (1, 1) disables scaling.
        seed: base seed of the per-sample generators.
    """

    def __init__(
        self,
        reader: ScanReader,
        uids: Sequence[str],
        crop_size: Sequence[int],
        samples_per_epoch: int,
        pos_fraction: float = 0.5,
        pos_margin: int = 8,
        flip: bool = True,
        scale_range: Sequence[float] = (0.8, 1.25),
        seed: int = 0,
    ) -> None:
        if not 0.0 <= pos_fraction <= 1.0:
            raise ValueError(f"pos_fraction must lie in [0, 1], got {pos_fraction}")
        lo, hi = (float(v) for v in scale_range)
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must be 0 < min ≤ max, got {tuple(scale_range)}")
        self.reader = reader
        self.uids = list(uids)
        self.crop = tuple(int(v) for v in crop_size)
        self.length = int(samples_per_epoch)
        self.pos_fraction = float(pos_fraction)
        self.pos_margin = int(pos_margin)
        self.flip = flip
        self.scale_range = (lo, hi)
        self.seed = int(seed)
        self.nodules = {u: finding_rows(reader.entry(u), "nodules") for u in self.uids}
        self.excluded = {u: finding_rows(reader.entry(u), "excluded") for u in self.uids}
        self.nodule_index = [(u, j) for u in self.uids for j in range(len(self.nodules[u]))]

    def __len__(self) -> int:
        return self.length

    def plan(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """What sample ``key`` = (index, epoch) is: scan, scale, crop origin and flips (no voxels read)."""
        index, epoch = _key(key)
        rng = np.random.default_rng([self.seed, epoch, index])
        crop = np.asarray(self.crop, dtype=np.float64)
        lo, hi = self.scale_range
        positive = bool(self.nodule_index) and rng.random() < self.pos_fraction
        scale = float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) if hi > lo else 1.0
        if positive:
            uid, j = self.nodule_index[int(rng.integers(len(self.nodule_index)))]
            centre = self.nodules[uid][j, 3:6]
            margin = np.minimum(self.pos_margin, (crop - 1) / 2.0)
            at = rng.uniform(margin, crop - 1 - margin)  # where the nodule lands in the crop
            origin = centre - at / scale  # scan position of crop voxel 0
        else:
            uid = self.uids[int(rng.integers(len(self.uids)))]
            first, last = self.reader.lung_box(uid)
            centre = rng.uniform(first, last + 1e-9)
            origin = centre - (crop - 1) / (2.0 * scale)
        if scale == 1.0:
            origin = np.round(origin)
        flips = rng.random(3) < 0.5 if self.flip else np.zeros(3, dtype=bool)
        return {"uid": uid, "scale": scale, "origin": origin, "flips": flips, "positive": positive}

    def _voxels(self, uid: str, origin: np.ndarray, scale: float) -> np.ndarray:
        crop = self.crop
        if scale == 1.0 and np.allclose(origin, np.round(origin)):
            return self.reader.region(uid, np.round(origin).astype(int), crop)
        # Crop voxel i sits at scan position origin + i / scale: read the covering box, resample.
        span = (np.asarray(crop) - 1) / scale
        first = np.floor(origin).astype(int)
        size = (np.ceil(origin + span).astype(int) - first + 1).clip(min=2)
        block = torch.from_numpy(self.reader.region(uid, first, size))[None, None]
        axes = []
        for a in range(3):
            pos = origin[a] + np.arange(crop[a]) / scale - first[a]
            axes.append(torch.as_tensor(2.0 * pos / (size[a] - 1) - 1.0, dtype=torch.float32))
        zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
        grid = torch.stack([xx, yy, zz], dim=-1)[None]
        out = F.grid_sample(block, grid, mode="bilinear", padding_mode="border", align_corners=True)
        return out[0, 0].numpy()

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        p = self.plan(key)
        uid, scale, origin, flips = p["uid"], p["scale"], p["origin"], p["flips"]
        image = self._voxels(uid, origin, scale)
        crop = np.asarray(self.crop, dtype=np.float64)
        shape = np.asarray(self.reader.shape(uid), dtype=np.float64)

        def boxes(rows: np.ndarray) -> np.ndarray:
            centres = (rows[:, 3:6] - origin) * scale
            diam = sized_diameters(rows[:, 6:7]) * scale
            return np.concatenate([centres, diam], axis=1)

        nod, ign = boxes(self.nodules[uid]), boxes(self.excluded[uid])
        # Coordinate channels: the crop in units of the scaled scan (see module docstring).
        start = scale * (origin + 0.5) - 0.5
        scan_shape = shape * scale
        for axis in np.flatnonzero(flips):
            image = np.flip(image, axis=axis)
            nod[:, axis] = crop[axis] - 1 - nod[:, axis]
            ign[:, axis] = crop[axis] - 1 - ign[:, axis]
            start[axis] = scan_shape[axis] - start[axis] - crop[axis]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None],
            "start": torch.as_tensor(start, dtype=torch.float64),
            "scan_shape": torch.as_tensor(scan_shape, dtype=torch.float64),
            "boxes": torch.as_tensor(nod, dtype=torch.float32),
            "ignore": torch.as_tensor(ign, dtype=torch.float32),
            "uid": uid,
        }

    collate_fn = staticmethod(collate_crops)


class ScanDataset(Dataset):
    """Whole prepared scans for sliding-window inference.

    Items (``ScanItem``): ``uid``; ``image`` (Z, Y, X) float32; ``entry`` geometry fields (shape, spacing,
    origin, direction); ``nodules`` / ``excluded`` (n, 4) world x, y, z + diameter mm (empty for
    unannotated scans); and, when ``candidates`` are given, ``candidates`` (K, 3) voxel z, y, x,
    ``candidates_world`` (K, 3), ``stage1`` (K,) stage-1 probability (NaN when unknown), ``labels`` (K,)
    and ``ignore`` (K,) bool.

    Args:
        reader: prepared-scan reader.
        uids: scans.
        candidates: optional candidate table (``candidate_table``) to attach per scan.
        stage1_list: ``candidates`` is a stage-1 results list of the task's own stage-1 checkpoint: only the
            scans it lists get candidates (marked ``stage1_list``, so the task keeps those its stage-1
            settings would keep); the others come without, so the task runs stage 1 on them.
    """

    def __init__(
        self,
        reader: ScanReader,
        uids: Sequence[str],
        candidates: pd.DataFrame | None = None,
        stage1_list: bool = False,
    ) -> None:
        self.reader = reader
        self.uids = list(uids)
        self.candidates = None
        self.stage1_list = stage1_list
        if candidates is not None:
            self.candidates = {uid: frame for uid, frame in candidates.groupby("seriesuid", sort=False)}

    def __len__(self) -> int:
        return len(self.uids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        uid = self.uids[index]
        entry = self.reader.entry(uid)
        item: dict[str, Any] = {
            "uid": uid,
            "image": torch.from_numpy(self.reader.whole(uid)),
            "entry": {k: entry[k] for k in ("shape", "spacing", "origin", "direction")},
            "nodules": torch.as_tensor(finding_array(entry, "nodules")),
            "excluded": torch.as_tensor(finding_array(entry, "excluded")),
        }
        if self.candidates is not None and not (self.stage1_list and uid not in self.candidates):
            frame = self.candidates.get(uid)
            if frame is None:
                frame = pd.DataFrame(columns=CANDIDATE_COLUMNS)
            if self.stage1_list:
                item["stage1_list"] = True
            item["candidates"] = torch.as_tensor(frame[["vz", "vy", "vx"]].to_numpy(np.float64)).reshape(
                -1, 3
            )
            item["candidates_world"] = torch.as_tensor(
                frame[["coordX", "coordY", "coordZ"]].to_numpy(np.float64)
            ).reshape(-1, 3)
            item["stage1"] = torch.tensor(frame["stage1"].to_numpy(np.float64, copy=True))
            if not self.stage1_list:  # a stage-1 list is cut by the task, which labels what it keeps
                item["labels"] = torch.tensor(frame["label"].to_numpy(np.int64, copy=True))
                item["ignore"] = torch.tensor(frame["ignore"].to_numpy(bool, copy=True))
        return item

    collate_fn = staticmethod(collate_scans)


class FPRCropDataset(Dataset):
    """Stage-2 training crops: 1 true : ``negatives_per_positive`` false per epoch, with augmentation.

    Sample ``i`` of an epoch is a true candidate when ``i % (1 + negatives_per_positive) == 0``; which one,
    and its shift, flips and rotation, come from ``default_rng([seed, epoch, i])``.

    False draws come from the whole false pool, or — with ``stage1_negative_fraction`` — that share of them
    from the false candidates stage 1 proposed (rows with a stage-1 score). Those are the false positives
    stage 2 exists to reject; a dataset list such as ``candidates_V2.csv`` is mostly easy lung and vessel
    points and, drawn uniformly, outnumbers them (18 synthetic training scans: ~4100 listed vs ~1750 stage-1
    false candidates).

    Args:
        reader: prepared-scan reader.
        table: labelled candidates (``candidate_table``); ignored rows are dropped here.
        samples_per_epoch: crops per epoch; default ``(1 + negatives_per_positive) × #true``.
        negatives_per_positive: false candidates per true one (paper: 3).
        crop_size: (z, y, x) of the MPPN's large crop.
        max_shift: largest random shift of the crop centre, voxels per axis.
        flip: random flips along each axis.
        rotate: random 90° rotations in the axial (y, x) plane (needs a square in-plane crop).
        seed: base seed.
        stage1_negative_fraction: share of false draws taken from the stage-1 false candidates (0: none
            singled out, uniform over the whole false pool; ignored when the table has no stage-1 rows).
    """

    def __init__(
        self,
        reader: ScanReader,
        table: pd.DataFrame,
        samples_per_epoch: int | None = None,
        negatives_per_positive: int = 3,
        crop_size: Sequence[int] = MPPN_CROP_SIZES[0],
        max_shift: int = 2,
        flip: bool = True,
        rotate: bool = True,
        seed: int = 0,
        stage1_negative_fraction: float = 0.0,
    ) -> None:
        if not 0.0 <= stage1_negative_fraction <= 1.0:
            raise ValueError(f"stage1_negative_fraction must lie in [0, 1], got {stage1_negative_fraction}")
        table = table[~table["ignore"].astype(bool)]
        columns = ["seriesuid", "vz", "vy", "vx"]
        self.positives = table[table["label"] == 1][columns].to_numpy(object)
        self.negatives = table[table["label"] == 0][columns].to_numpy(object)
        proposed = (table["label"] == 0) & table["stage1"].notna()
        self.stage1_negatives = table[proposed][columns].to_numpy(object)
        self.stage1_fraction = float(stage1_negative_fraction) if len(self.stage1_negatives) else 0.0
        if len(self.positives) == 0 or len(self.negatives) == 0:
            raise ValueError(
                f"stage-2 training needs true and false candidates, got {len(self.positives)} true and "
                f"{len(self.negatives)} false; check candidates_csv / dataset_candidates and the annotations"
            )
        self.reader = reader
        self.ratio = int(negatives_per_positive)
        self.length = int(samples_per_epoch or (1 + self.ratio) * len(self.positives))
        self.crop = tuple(int(v) for v in crop_size)
        if rotate and self.crop[1] != self.crop[2]:
            raise ValueError(f"90° in-plane rotation needs a square in-plane crop, got {self.crop}")
        self.max_shift = int(max_shift)
        self.flip = flip
        self.rotate = rotate
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = _key(key)
        rng = np.random.default_rng([self.seed, epoch, index])
        positive = index % (1 + self.ratio) == 0
        pool = self.positives if positive else self.negatives
        if not positive and self.stage1_fraction > 0 and rng.random() < self.stage1_fraction:
            pool = self.stage1_negatives
        uid, *centre = pool[int(rng.integers(len(pool)))]
        shift = rng.integers(-self.max_shift, self.max_shift + 1, size=3)
        start = (
            np.round(np.asarray(centre, dtype=np.float64)).astype(int) + shift - np.asarray(self.crop) // 2
        )
        crop = self.reader.region(str(uid), start, self.crop)
        if self.flip:
            for axis in np.flatnonzero(rng.random(3) < 0.5):
                crop = np.flip(crop, axis=axis)
        if self.rotate:
            crop = np.rot90(crop, k=int(rng.integers(4)), axes=(1, 2))
        return {
            "image": torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32))[None],
            "label": torch.tensor(int(positive), dtype=torch.int64),
        }


# ---------------------------------------------------------------------------------------- datamodules


class _LungdetDataModule(CacheDataModule):
    """What both stages share: the prepared-scan reader, deterministic epoch samplers, and choosing which
    parts ``predict`` covers (folder prediction without a training root is ``CacheDataModule``'s)."""

    def __init__(
        self,
        window: tuple[float, float] = CLAF_WINDOW,
        mask_outside_lung: bool = True,
        outside_hu: float = DEFAULT_OUTSIDE_HU,
        lung_margin: int = DEFAULT_LUNG_MARGIN,
        predict_parts: tuple[str, ...] = ("test",),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        bad = [p for p in predict_parts if p not in ("train", "val", "test")]
        if bad or not predict_parts:
            raise ValueError(f"predict_parts must name train/val/test parts, got {tuple(predict_parts)}")
        self.window = tuple(float(v) for v in window)
        self.mask_outside_lung = mask_outside_lung
        self.outside_hu = float(outside_hu)
        self.lung_margin = int(lung_margin)
        self.predict_parts = tuple(predict_parts)

    def preprocessing(self) -> dict[str, Any]:
        """The settings that decide what the networks see (checked between stage 1 and stage 2)."""
        return {
            "window": list(self.window),
            "mask_outside_lung": self.mask_outside_lung,
            "outside_hu": self.outside_hu,
            "lung_margin": self.lung_margin,
            "spacing": self.spacing,
        }

    @property
    def fill_value(self) -> float:
        """What the networks see outside the lungs and outside the scan (whole-scan padding uses it too)."""
        return fill_value(self.window, self.mask_outside_lung, self.outside_hu)

    def reader(self, cache: PreprocessedCache) -> ScanReader:
        return ScanReader(cache, self.window, self.mask_outside_lung, self.outside_hu, self.lung_margin)

    def _predict_uids(self, uids: list[str]) -> list[str]:
        if self.predict_root:
            return uids
        return [u for part in self.predict_parts for u in self.uids.get(part, [])]

    def _epoch_loader(self, part: str) -> DataLoader:
        return self._loader(
            part, shuffle=False, sampler=EpochSampler(len(self.datasets[part]), seed=self.seed)
        )

    def _scan_loader(self, part: str) -> DataLoader:
        return self._loader(part, shuffle=False, batch_size=1, collate_fn=collate_scans)

    def train_dataloader(self) -> DataLoader:
        return self._epoch_loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._scan_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._scan_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._scan_loader("predict")


class CandidateDataModule(_LungdetDataModule):
    """Stage 1: random/nodule-centred training crops, whole scans for validation, test and prediction.

    Args:
        crop_size: training crop (D, H, W), sides multiples of 32 (paper: 128³; tests and the demo use 64³).
        samples_per_epoch: training crops per epoch (default 64 per training scan).
        pos_fraction: share of crops that contain a nodule.
        pos_margin: voxels between a nodule centre and the crop border in positive crops.
        flip: random flips.
        scale_range: isotropic scale augmentation range; (1, 1) disables it.
        window: HU window mapped to [0, 1] (``CLAF_WINDOW``).
        mask_outside_lung: set voxels outside the dilated lung mask to ``outside_hu``.
        outside_hu: value outside the lungs and outside the scan (HU, windowed like the image).
        lung_margin: lung-mask dilation in voxels.
        predict_parts: split parts ``predict`` runs on when no ``predict_root`` is given.
        **kwargs: ``CacheDataModule`` arguments (dataset, root, cache_dir, split, fold, batch_size, ...).
    """

    def __init__(
        self,
        crop_size: int | tuple[int, int, int] = 128,
        samples_per_epoch: int | None = None,
        pos_fraction: float = 0.5,
        pos_margin: int = 8,
        flip: bool = True,
        scale_range: tuple[float, float] = (0.8, 1.25),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        crop = (crop_size,) * 3 if isinstance(crop_size, int) else tuple(crop_size)
        if len(crop) != 3 or any(int(c) % 32 for c in crop):
            raise ValueError(
                f"crop_size must be multiples of 32 (the network pools five times), got {crop_size}"
            )
        self.crop_size = tuple(int(c) for c in crop)
        self.samples_per_epoch = samples_per_epoch
        self.pos_fraction = pos_fraction
        self.pos_margin = pos_margin
        self.flip = flip
        self.scale_range = tuple(scale_range)

    def build_dataset(self, part: str, uids: list[str], cache: PreprocessedCache) -> Dataset:
        reader = self.reader(cache)
        if part == "train":
            if uids and not any(cache.entry(uid).get("nodules") for uid in uids):
                raise ValueError(
                    f"no nodules in the {len(uids)} training scan(s) of the cache {cache.root}: the detector "
                    "needs annotated nodules to learn; check the dataset's annotations file (a header-only "
                    "annotations.csv gives this)"
                )
            return CandidateCropDataset(
                reader,
                uids,
                self.crop_size,
                self.samples_per_epoch or 64 * len(uids),
                self.pos_fraction,
                self.pos_margin,
                self.flip,
                self.scale_range,
                self.seed,
            )
        if part == "predict":
            uids = self._predict_uids(uids)
        return ScanDataset(reader, uids)


def _path_list(value: str | Sequence[str] | None) -> list[str]:
    """One path, several, or none (a config may give either form) as a list of strings."""
    return [value] if isinstance(value, str) else [str(p) for p in value or []]


class FPRDataModule(_LungdetDataModule):
    """Stage 2 (MPPN): labelled candidate crops for training, scans with candidates for evaluation.

    Args:
        candidates_csv: stage-1 results CSV(s) (LUNA16 results format) to take candidates from.
        dataset_candidates: also use the dataset's candidate list (LUNA16 ``candidates_V2.csv``).
        eval_candidates: ``"same"`` — validation/test scans come with candidates from the sources above;
            ``"stage1"`` — without, so the task runs its stage-1 checkpoint first (two-stage evaluation).
        stage1_results_csv: with ``eval_candidates: stage1``, the results CSV(s) of the *same* stage-1
            checkpoint on some of the validation/test scans (``lungdet test``'s ``test_results.csv``, or
            ``lungdet predict``'s), with the same inference settings and at least as many candidates per
            scan: the scans listed there take their candidates from it instead of running stage 1 again
            (the task keeps the ones its ``stage1_inference`` would: above ``score_threshold``, at most
            ``max_candidates``); the others run stage 1. The same candidates, without the second pass.
        samples_per_epoch: training crops per epoch (default (1 + ratio) × #true candidates).
        negatives_per_positive: false per true candidate in each epoch (paper: 1:3).
        max_shift: random shift of the crop centre, voxels.
        flip: random flips.
        rotate: random 90° in-plane rotations.
        crop_size: the MPPN large crop (z, y, x).
        stage1_negative_fraction: share of the false crops drawn from stage 1's own false candidates
            (``candidates_csv``) instead of the whole false pool (see :class:`FPRCropDataset`).
        **kwargs: ``_LungdetDataModule`` / ``CacheDataModule`` arguments.
    """

    def __init__(
        self,
        candidates_csv: str | list[str] | None = None,
        dataset_candidates: bool = True,
        eval_candidates: str = "same",
        samples_per_epoch: int | None = None,
        negatives_per_positive: int = 3,
        max_shift: int = 2,
        flip: bool = True,
        rotate: bool = True,
        crop_size: tuple[int, int, int] = MPPN_CROP_SIZES[0],
        stage1_negative_fraction: float = 0.0,
        stage1_results_csv: str | list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if eval_candidates not in ("same", "stage1"):
            raise ValueError(f"eval_candidates must be 'same' or 'stage1', got {eval_candidates!r}")
        listed = _path_list(stage1_results_csv)
        if listed and eval_candidates != "stage1":
            raise ValueError(
                "stage1_results_csv stands in for the stage-1 pass of two-stage evaluation: set "
                "--data.init_args.eval_candidates stage1 with it"
            )
        for path in listed:
            if not Path(path).is_file():
                raise FileNotFoundError(
                    f"{path}: stage-1 results not found (--data.init_args.stage1_results_csv); run `lungdet test` "
                    "of the stage-1 checkpoint first, or leave the option out to run stage 1 on each scan"
                )
        self.stage1_results_csv = listed
        self.candidates_csv = _path_list(candidates_csv)
        if not self.candidates_csv and not dataset_candidates:
            raise ValueError("no candidate source: give candidates_csv or set dataset_candidates: true")
        self.dataset_candidates = dataset_candidates
        self.eval_candidates = eval_candidates
        self.samples_per_epoch = samples_per_epoch
        self.negatives_per_positive = negatives_per_positive
        self.max_shift = max_shift
        self.flip = flip
        self.rotate = rotate
        self.crop_size = tuple(int(v) for v in crop_size)
        self.stage1_negative_fraction = stage1_negative_fraction
        self._dataset_frame: pd.DataFrame | None = None

    def _dataset_list(self) -> pd.DataFrame | None:
        if not self.dataset_candidates:
            return None
        if self._dataset_frame is None:
            adapter = self.open_dataset()
            if not hasattr(adapter, "candidates"):
                raise ValueError(
                    f"dataset {self.dataset_name!r} has no candidate list; set dataset_candidates: false and "
                    "give candidates_csv (a stage-1 results CSV)"
                )
            self._dataset_frame = adapter.candidates()
        return self._dataset_frame

    def table(self, uids: Sequence[str], cache: PreprocessedCache) -> pd.DataFrame:
        """Labelled candidates of ``uids`` from the configured sources."""
        return candidate_table(self.reader(cache), uids, self.candidates_csv, self._dataset_list())

    def build_dataset(self, part: str, uids: list[str], cache: PreprocessedCache) -> Dataset:
        reader = self.reader(cache)
        if part == "train":
            table = self.table(uids, cache)
            log.info(
                "stage-2 training candidates: %d true, %d false, %d on excluded findings",
                int((table["label"] == 1).sum()),
                int(((table["label"] == 0) & ~table["ignore"].astype(bool)).sum()),
                int(table["ignore"].astype(bool).sum()),
            )
            return FPRCropDataset(
                reader,
                table,
                self.samples_per_epoch,
                self.negatives_per_positive,
                self.crop_size,
                self.max_shift,
                self.flip,
                self.rotate,
                self.seed,
                self.stage1_negative_fraction,
            )
        if part == "predict":
            return ScanDataset(reader, self._predict_uids(uids))
        if self.eval_candidates == "stage1":
            if not self.stage1_results_csv:
                return ScanDataset(reader, uids)
            table = candidate_table(reader, uids, self.stage1_results_csv)
            listed = set(table["seriesuid"])
            log.info(
                "%s: %d of %d scans take their stage-1 candidates from %s; the others run stage 1",
                part, sum(u in listed for u in uids), len(uids), ", ".join(self.stage1_results_csv),
            )  # fmt: skip
            return ScanDataset(reader, uids, table, stage1_list=True)
        return ScanDataset(reader, uids, self.table(uids, cache))
