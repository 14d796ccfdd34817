"""Datamodules of lungcls: M³Net nodule patches (stage 1, stage 2, few-shot) and pathology image folders.

`NodulePatchDataModule` — every labelled nodule of a scan dataset (LIDC-IDRI by default) as nested crops
at native spacing and native HU (`lungcls.patches`: one context block per nodule, cached as .npz, read
from the original scan through its adapter). A sample is::

    {"patches": {32: (1, 56, 32, 32), 64: (1, 56, 64, 64), 96: (1, 56, 96, 96)} float32,
     "label": int64, "index": int64}

``index`` is the row of the part's nodule table (`datamodule.table(part)`), so predictions can be joined
back to their nodule. Scale keys are the paper's scale names; `patch_sizes` may map them to other
in-plane sizes (reduced sizes for CPU runs and tests, the crop-size study of Table 2).

* Label: the adapter's nodule label — for LIDC M³Net's mean malignancy > 3 (benign 0, malignant 1).
  Nodules without a label are left out (counted in the log).
* Selection as the M³Net reference (`common.datasets.lidc_derive.derive_m3net`): every clustered nodule,
  the first scan of a patient only (`one_scan_per_patient`); `min_diameter`, `min_readers` and
  `drop_indeterminate` narrow it.
* Splits: patient-level by default (`split_level="patient"`, train/val/test 70/10/20, seeded, stratified
  by the patient's highest label), saved beside the cache as a `common.splits` file every later run
  reuses; `split_level="nodule"` splits nodules at random as the released reference code does (for
  comparison only: a patient's nodules then leak across parts).
* Normalisation: none by default (native HU, the paper); ``normalization="window"`` maps `window` HU to
  [0, 1] (clipped), which trains more easily from scratch.
* Augmentation (train part, `augment=True`): the paper's set, each with probability 0.5 — vertical flip,
  affine rotation in [0°, 180°) (with scaling in `scale`), perspective distortion, thin-plate-spline warp
  (albumentations on the slices-as-channels block) — plus a random shift of the common crop centre. All of
  it acts on the one context block before the nested crops are cut, so the three scales stay concentric
  and see the same transformed anatomy; the nodule centre is carried through the warp as a keypoint.

`FewShotPatchDataModule` — the few-shot adaptation of M³Net §4.3: `pairs` positive–negative pairs of the
target dataset to fine-tune on, `replay_pairs` pairs of the source dataset's training part replayed
against forgetting; every other target nodule (of patients not used for fine-tuning) is the test set.

`PathologyImageDataModule` — the 2D cancer-type / pathology image folders of papers/003 (LDFC, 3 classes,
``BMP_classification/{train,test}``) and papers/004 (spatio-temporal, 6 classes,
``class_dataset/{train,validate}``): grey BMPs → [0, 1] → `in_chans` channels at `img_size`, flips and
rotation for training (papers/003's augmentation). The validation part is a patient-level share of the
training folder (patients from the file names); the published held-out folder is the test part.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset

from common.datasets.base import Nodule, ScanDataset, ScanRecord
from common.datasets.image_folders import ImageFolderIndex, ImageSample
from common.datasets.registry import open_dataset, resolve_root
from common.lightning.datamodule import PartLoaderDataModule, path_digest
from common.preprocess import GLANCE_WINDOW
from common.splits import Split, SplitItem, ratio_split
from lungcls.patches import AIR_HU, PatchCache, PatchSettings, context_for, nested_crops

log = logging.getLogger(__name__)

__all__ = [
    "NORMALIZATIONS",
    "PART_NAMES",
    "SPLIT_LEVELS",
    "FewShotPatchDataModule",
    "NodulePatchDataModule",
    "NodulePatchDataset",
    "PatchAugmentation",
    "PathologyImageDataModule",
    "PathologyImageDataset",
    "normalize_hu",
]

PART_NAMES = ("train", "val", "test")
SPLIT_LEVELS = ("patient", "nodule")
NORMALIZATIONS = ("none", "window")
PAPER_SCALES = (32, 64, 96)
PAPER_DEPTH = 56


def normalize_hu(values: np.ndarray, mode: str, window: Sequence[float]) -> np.ndarray:
    """HU → network input: unchanged float32 ("none"), or `window` HU linearly to [0, 1], clipped."""
    out = np.asarray(values, dtype=np.float32)
    if mode == "none":
        return out
    if mode == "window":
        lo, hi = float(window[0]), float(window[1])
        if hi <= lo:
            raise ValueError(f"window upper bound {hi} must exceed lower bound {lo}")
        return np.clip((out - lo) / (hi - lo), 0.0, 1.0)
    raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {mode!r}")


class PatchAugmentation:
    """The paper's augmentation on one context block, so that every scale sees the same transform.

    Args:
        flip_p: probability of a vertical (row) flip.
        affine_p: probability of the affine transform (rotation in `rotate`, scaling in `scale`).
        rotate: rotation range in degrees.
        scale: isotropic in-plane scaling range.
        perspective_p: probability of a perspective distortion.
        perspective_scale: albumentations `Perspective` corner-displacement range.
        tps_p: probability of a thin-plate-spline warp.
        tps_scale: albumentations `ThinPlateSpline` displacement range (fraction of the size).
        max_shift: in-plane shift of the common crop centre, voxels (uniform in ±max_shift).
        z_shift: shift of the crop along z, slices (uniform in ±z_shift).
        fill: HU outside the block after warping (air).
    """

    def __init__(
        self,
        flip_p: float = 0.5,
        affine_p: float = 0.5,
        rotate: tuple[float, float] = (0.0, 180.0),
        scale: tuple[float, float] = (0.9, 1.1),
        perspective_p: float = 0.5,
        perspective_scale: tuple[float, float] = (0.02, 0.06),
        tps_p: float = 0.5,
        tps_scale: tuple[float, float] = (0.03, 0.08),
        max_shift: int = 2,
        z_shift: int = 2,
        fill: float = AIR_HU,
    ) -> None:
        self.max_shift = int(max_shift)
        self.z_shift = int(z_shift)
        self.transform = A.Compose(
            [
                A.VerticalFlip(p=flip_p),
                A.Affine(rotate=rotate, scale=scale, border_mode=0, fill=fill, p=affine_p),
                A.Perspective(scale=perspective_scale, border_mode=0, fill=fill, p=perspective_p),
                A.ThinPlateSpline(scale_range=tps_scale, border_mode=0, fill=fill, p=tps_p),
            ],
            keypoint_params=A.KeypointParams(format="xy", remove_invisible=False),
        )

    def __call__(
        self, block: np.ndarray, centre_zyx: Sequence[float], seed: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Warp a `(D, H, W)` float block; return it and the nodule centre `(z, y, x)` in the warped block."""
        self.transform.set_random_seed(seed)
        rng = np.random.default_rng(seed)
        out = self.transform(
            image=np.ascontiguousarray(block.transpose(1, 2, 0)),
            keypoints=np.array([[centre_zyx[2], centre_zyx[1]]], dtype=np.float32),
        )
        warped = np.ascontiguousarray(out["image"].transpose(2, 0, 1))
        x, y = (float(v) for v in np.asarray(out["keypoints"])[0][:2])
        shift = rng.integers(-self.max_shift, self.max_shift + 1, size=2) if self.max_shift else (0, 0)
        dz = int(rng.integers(-self.z_shift, self.z_shift + 1)) if self.z_shift else 0
        return warped, np.array([centre_zyx[0] + dz, y + shift[0], x + shift[1]])


class NodulePatchDataset(Dataset):
    """Nested crops of the nodules in `table` (rows of a `PatchCache` nodule table).

    Args:
        cache: the patch cache holding the blocks.
        table: the nodules of this part.
        sizes: scale key → in-plane crop size.
        depth: slices per crop.
        normalization: "none" or "window".
        window: HU window for "window".
        augmentation: training augmentation (None: plain crops).
    """

    def __init__(
        self,
        cache: PatchCache,
        table: pd.DataFrame,
        sizes: Mapping[int, int],
        depth: int,
        normalization: str = "none",
        window: Sequence[float] = GLANCE_WINDOW,
        augmentation: PatchAugmentation | None = None,
    ) -> None:
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        self.cache = cache
        self.table = table.reset_index(drop=True)
        self.sizes = {int(k): int(v) for k, v in sizes.items()}
        self.depth = int(depth)
        self.normalization = normalization
        self.window = tuple(window)
        self.augmentation = augmentation

    def __len__(self) -> int:
        return len(self.table)

    @property
    def labels(self) -> np.ndarray:
        return self.table["label"].to_numpy(dtype=np.int64)

    def crops(self, index: int, seed: int | None = None) -> dict[int, np.ndarray]:
        """The nested HU crops of one nodule (augmented when the dataset augments and a seed is given)."""
        row = self.table.iloc[index]
        block = self.cache.load(str(row["file"]))
        centre = np.asarray(block.shape) // 2 + np.array([row["offset_z"], row["offset_y"], row["offset_x"]])
        if self.augmentation is not None and seed is not None:
            block, centre = self.augmentation(block.astype(np.float32), centre, seed)
        offset = np.rint(centre - np.asarray(block.shape) // 2).astype(int)
        return nested_crops(block, self.sizes, self.depth, offset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        seed = int(torch.randint(0, 2**31 - 1, ()).item()) if self.augmentation is not None else None
        crops = self.crops(index, seed)
        patches = {
            k: torch.from_numpy(normalize_hu(v, self.normalization, self.window)[None].copy())
            for k, v in crops.items()
        }
        return {
            "patches": patches,
            "label": torch.tensor(int(self.table.at[index, "label"]), dtype=torch.long),
            "index": torch.tensor(index, dtype=torch.long),
        }


class NodulePatchDataModule(PartLoaderDataModule):
    """Labelled nodules of a scan dataset as nested native-resolution crops (module docstring).

    Args:
        dataset: adapter name (`common.datasets.registry`), "lidc" by default.
        root: dataset root; None takes the adapter's environment variable (LIDC_ROOT, ...).
        cache_dir: patch cache folder; default ``cache/m3net-<dataset>-<root hash>-<block size>``.
        scales: scale keys to deliver (all three for stage 2, one for a stage-1 run).
        patch_sizes: scale key → in-plane size, where it differs from the key (reduced sizes, Table 2).
        depth: slices per crop.
        boundary: "shift" or "pad" (`lungcls.patches`).
        context: in-plane size of the cached block; default: room for the largest crop to rotate and shift
            (`lungcls.patches.context_for`; 140 for 96-voxel crops). Runs that give the same context and
            depth share one cache (and its split file): the stage-1 configs name stage 2's block size.
        context_depth: slices of the cached block (default `depth` + 2 · z_shift).
        normalization: "none" (native HU) or "window".
        window: HU window for "window".
        augment: augment the training part (`PatchAugmentation`).
        augmentation: `PatchAugmentation` keyword overrides (probabilities, ranges).
        split_level: "patient" (default) or "nodule" (reference-code comparison).
        ratios: train/val/test shares.
        stratify: balance the (patient's highest) label over the parts.
        split_file: an existing split file to use, or where to save the one made (default: in `cache_dir`).
        seed: split seed.
        min_diameter: smallest mean reader diameter kept (mm).
        min_readers: smallest number of readers kept.
        one_scan_per_patient: keep each patient's first scan only (the M³Net reference selection).
        drop_indeterminate: drop nodules whose mean malignancy is exactly 3.
        reuse_cache: when the cache holds a nodule table, do not open the dataset again in
            `prepare_data` (fast restarts on the real LIDC; new or edited scans are then not seen).
        predict_root: a folder of new scans (any layout `common.datasets.folder` reads) to predict on,
            with `predict_csv`; None predicts the test part.
        predict_csv: nodule centres to classify in those scans: ``seriesuid, coordX, coordY, coordZ``
            world mm (the LUNA16 results format `lungdet predict` writes; extra columns are kept).
        batch_size: batch size (the paper uses 32).
        eval_batch_size: batch size of val/test/predict (default `batch_size`).
        num_workers: data-loader workers.
        lenient: skip unreadable scans and bad annotation rows instead of stopping.
        dataset_kwargs: extra adapter arguments (LIDC: source, database, outline, cluster_tol).
    """

    drop_last_train = True  # a last training batch of one sample breaks BatchNorm

    def __init__(
        self,
        dataset: str = "lidc",
        root: str | None = None,
        cache_dir: str | None = None,
        scales: Sequence[int] = PAPER_SCALES,
        patch_sizes: Mapping[int, int] | None = None,
        depth: int = PAPER_DEPTH,
        boundary: str = "shift",
        context: int | None = None,
        context_depth: int | None = None,
        normalization: str = "none",
        window: tuple[float, float] = GLANCE_WINDOW,
        augment: bool = True,
        augmentation: dict[str, Any] | None = None,
        split_level: str = "patient",
        ratios: tuple[float, float, float] = (0.7, 0.1, 0.2),
        stratify: bool = True,
        split_file: str | None = None,
        seed: int = 0,
        min_diameter: float = 0.0,
        min_readers: int = 1,
        one_scan_per_patient: bool = True,
        drop_indeterminate: bool = False,
        reuse_cache: bool = False,
        predict_root: str | None = None,
        predict_csv: str | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        lenient: bool = False,
        dataset_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if (predict_root is None) != (predict_csv is None):
            raise ValueError(
                "predict_root and predict_csv go together: a folder of scans and the nodule centres"
            )
        if split_level not in SPLIT_LEVELS:
            raise ValueError(f"split_level must be one of {SPLIT_LEVELS}, got {split_level!r}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if not scales:
            raise ValueError("scales is empty: give the scale keys to crop, e.g. [32, 64, 96]")
        self.save_hyperparameters()
        self.dataset_name = dataset
        self.root = root
        self.scales = tuple(int(s) for s in scales)
        overrides = {int(k): int(v) for k, v in (patch_sizes or {}).items()}
        self.sizes = {s: overrides.get(s, s) for s in self.scales}
        if min(self.sizes.values()) < 1 or depth < 1:
            raise ValueError(f"crop sizes must be positive, got {self.sizes} × {depth} slices")
        self.depth = int(depth)
        self.normalization = normalization
        self.window = tuple(window)
        self.augment = augment
        self.augmentation_kwargs = dict(augmentation or {})
        self.split_level = split_level
        self.ratios = tuple(float(r) for r in ratios)
        self.stratify = stratify
        self.split_file = split_file
        self.seed = seed
        self.min_diameter = float(min_diameter)
        self.min_readers = int(min_readers)
        self.one_scan_per_patient = one_scan_per_patient
        self.drop_indeterminate = drop_indeterminate
        self.reuse_cache = reuse_cache
        self.predict_root = predict_root
        self.predict_csv = predict_csv
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.lenient = lenient
        self.dataset_kwargs = dict(dataset_kwargs or {})
        max_shift = int(self.augmentation_kwargs.get("max_shift", 2))
        z_shift = int(self.augmentation_kwargs.get("z_shift", 2))
        auto, auto_depth = context_for(max(self.sizes.values()), self.depth, True, max_shift, z_shift)
        context = int(context or auto)
        context_depth = int(context_depth or auto_depth)
        if context < max(self.sizes.values()) or context_depth < self.depth:
            raise ValueError(
                f"context block {context_depth} × {context} × {context} is smaller than the crops "
                f"({self.depth} × {max(self.sizes.values())}²); enlarge context / context_depth"
            )
        self.patch_settings = PatchSettings(context, context_depth, boundary)
        self._cache_dir = cache_dir
        self.tables: dict[str, pd.DataFrame] = {}
        self.datasets: dict[str, Dataset] = {}

    # ------------------------------------------------------------------------------------ locations
    @property
    def cache_dir(self) -> Path:
        if self._cache_dir:
            return Path(self._cache_dir)
        root = resolve_root(self.dataset_name, self.root)
        s = self.patch_settings
        return Path("cache") / f"m3net-{self.dataset_name}-{path_digest(root)}-{s.context}x{s.context_depth}"

    @property
    def cache(self) -> PatchCache:
        return PatchCache(self.cache_dir)

    def open_dataset(self) -> ScanDataset:
        """The adapter over the dataset root."""
        return open_dataset(self.dataset_name, self.root, strict=not self.lenient, **self.dataset_kwargs)

    # ------------------------------------------------------------------------------------ selection
    def _records(self, dataset: ScanDataset) -> list[ScanRecord]:
        records = [r for r in dataset.records if r.nodules]
        if self.one_scan_per_patient:
            first: dict[str, ScanRecord] = {}
            for record in records:  # adapters list scans in a stable order: keep the first one listed
                first.setdefault(record.patient_id, record)
            records = [r for r in records if first[r.patient_id] is r]
        return records

    def _keep(self, record: ScanRecord, nodule: Nodule) -> bool:
        if nodule.diameter_mm < self.min_diameter:
            return False
        readers = nodule.extras.get("n_readers")
        if readers is not None and int(readers) < self.min_readers:
            return False
        if self.drop_indeterminate and nodule.extras.get("malignancy_mean") == 3.0:
            return False
        return True

    # ------------------------------------------------------------------------------------ hooks
    def prepare_data(self) -> None:
        """Crop and cache the nodule patches (skipped for nodules already cached)."""
        if self.predict_csv:
            self.predict_cache.build(self._predict_records(), self.patch_settings, strict=not self.lenient)
            state = getattr(getattr(self, "trainer", None), "state", None)
            if state is not None and str(getattr(state.fn, "value", state.fn)) == "predict":
                return  # new scans: the training data are not needed
        if self.reuse_cache and self.cache.exists():
            return
        dataset = self.open_dataset()
        self.cache.build(
            self._records(dataset), self.patch_settings, strict=not self.lenient, keep=self._keep
        )

    @property
    def predict_cache(self) -> PatchCache:
        """Patch cache of the `predict_csv` nodules (beside the training cache)."""
        key = f"{Path(self.predict_root or '').resolve()}|{Path(self.predict_csv or '').resolve()}"
        digest = hashlib.sha1(key.encode()).hexdigest()[:8]
        return PatchCache(self.cache_dir.parent / f"{self.cache_dir.name}-predict-{digest}")

    def _predict_records(self) -> list[ScanRecord]:
        """The scans of `predict_root` with the centres of `predict_csv` as unlabelled nodules."""
        path = Path(str(self.predict_csv))
        if not path.is_file():
            raise FileNotFoundError(f"predict_csv {path} does not exist")
        table = pd.read_csv(path, dtype={"seriesuid": str})
        missing = [c for c in ("seriesuid", "coordX", "coordY", "coordZ") if c not in table.columns]
        if missing:
            raise ValueError(
                f"{path}: columns {missing} are missing (need seriesuid, coordX, coordY, coordZ)"
            )
        scans = {r.uid: r for r in open_dataset("folder", self.predict_root).records}
        records: dict[str, ScanRecord] = {}
        for i, row in table.iterrows():
            uid = str(row["seriesuid"])
            if uid not in scans:
                raise ValueError(
                    f"{path}, line {int(i) + 2}: seriesuid {uid} is not a scan under {self.predict_root}"
                )
            scan = scans[uid]
            record = records.setdefault(
                uid, ScanRecord(uid, uid, scan.image_path, series_uid=scan.series_uid)
            )
            world = (float(row["coordX"]), float(row["coordY"]), float(row["coordZ"]))
            diameter = float(row["diameter_mm"]) if "diameter_mm" in table.columns else -1.0
            record.nodules.append(Nodule(world, diameter, nodule_id=f"row{int(i)}"))
        return list(records.values())

    def labelled_table(self) -> pd.DataFrame:
        """The cached nodules that carry a label."""
        table = self.cache.table
        unlabelled = int((table["label"] < 0).sum())
        if unlabelled:
            log.info("%d nodules have no label and are left out of training and evaluation", unlabelled)
        table = table[table["label"] >= 0].reset_index(drop=True)
        if table.empty:
            raise ValueError(
                f"the patch cache {self.cache_dir} holds no labelled nodule; check the dataset and the "
                "selection (min_diameter, min_readers)"
            )
        return table

    def _split_path(self) -> Path:
        if self.split_file:
            return Path(self.split_file)
        return self.cache_dir / f"split_{self.split_level}_seed{self.seed}.json"

    def make_split(self, table: pd.DataFrame) -> Split:
        """Load the split file, or make a seeded patient- (or nodule-) level split and save it."""
        path = self._split_path()
        if path.is_file():
            return Split.load(path)
        if self.split_level == "patient":
            labels = table.groupby("uid")["label"].max()
            patients = table.groupby("uid")["patient_id"].first()
            items = [SplitItem(uid, patients[uid], int(labels[uid])) for uid in labels.index]
        else:
            items = [SplitItem(k, k, int(lbl)) for k, lbl in zip(table["key"], table["label"])]
        split = ratio_split(items, dict(zip(PART_NAMES, self.ratios)), seed=self.seed, stratify=self.stratify)
        split.meta["level"] = self.split_level
        split.save(path)
        return split

    def split_tables(self) -> dict[str, pd.DataFrame]:
        """Nodule table per part ("train", "val", "test")."""
        table = self.labelled_table()
        split = self.make_split(table)
        column = "uid" if split.meta.get("level", self.split_level) == "patient" else "key"
        parts = {}
        for part in PART_NAMES:
            members = set(split.uids(part)) if part in split.parts else set()
            parts[part] = table[table[column].isin(members)].reset_index(drop=True)
        unassigned = ~table[column].isin(set().union(*(set(split.uids(p)) for p in split.parts)))
        if unassigned.any():
            log.warning(
                "%d nodules are not in the split file %s (new scans?); they are left out",
                int(unassigned.sum()),
                self._split_path(),
            )
        return parts

    def _augmentation(self) -> PatchAugmentation | None:
        return PatchAugmentation(**self.augmentation_kwargs) if self.augment else None

    def build_dataset(self, part: str, table: pd.DataFrame) -> NodulePatchDataset:
        """The dataset of one part; training augments."""
        return NodulePatchDataset(
            self.predict_cache if part == "predict" and self.predict_csv else self.cache,
            table,
            self.sizes,
            self.depth,
            self.normalization,
            self.window,
            self._augmentation() if part == "train" else None,
        )

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict" and self.predict_csv:  # new scans: the training data are not needed
            if "predict" not in self.datasets:
                self.tables["predict"] = self.predict_cache.table
                self.datasets["predict"] = self.build_dataset("predict", self.tables["predict"])
            return
        if not set(PART_NAMES) <= set(self.tables):
            self.tables.update(self.split_tables())
            counts = {p: (len(self.tables[p]), int((self.tables[p]["label"] > 0).sum())) for p in PART_NAMES}
            log.info("nodule split (%s level), (nodules, label > 0): %s", self.split_level, counts)
        self.setup_parts(stage, self._dataset_for)

    def _dataset_for(self, part: str) -> Dataset:
        source = "test" if part == "predict" else part
        if self.tables[source].empty:
            raise ValueError(
                f"the {source} part of the nodule split is empty ({len(self.labelled_table())} labelled "
                "nodules); use more scans, other ratios or another split file"
            )
        return self.build_dataset(part, self.tables[source])

    def table(self, part: str) -> pd.DataFrame:
        """Nodule table of a part ("train", "val", "test"; "predict": the test part or `predict_csv`)."""
        if part == "predict" and "predict" in self.tables:
            return self.tables["predict"]
        return self.tables["test" if part == "predict" else part]


class FewShotPatchDataModule(NodulePatchDataModule):
    """Few-shot adaptation data (M³Net §4.3): target pairs to fine-tune on, source pairs replayed.

    The target dataset is configured with the `NodulePatchDataModule` arguments. Fine-tuning nodules are
    drawn by patient (seeded): patients are taken in random order and their nodules added until `pairs`
    positives and `pairs` negatives are collected (surplus nodules of those patients are used for neither
    fine-tuning nor testing, so the test set shares no patient with the fine-tuning set). The replayed
    source nodules are `replay_pairs` positives and negatives from the *training* part of the source's
    own split (made with the same seed and ratios), never from its test part. Validation runs on the
    target fine-tuning nodules without augmentation (the paper has no validation set, and validating on
    the test nodules would leak them into checkpoint selection).

    Args:
        source_dataset: adapter name of the source dataset (the one stage 2 was trained on).
        source_root: its root (None: its environment variable).
        source_cache_dir: its patch cache (default as `NodulePatchDataModule` would choose).
        source_split_file: the source split (default: made/reused in its cache folder).
        source_dataset_kwargs: extra adapter arguments of the source.
        pairs: target positive–negative pairs for fine-tuning (20 in the paper).
        replay_pairs: source pairs replayed (20 in the paper).
        **kwargs: `NodulePatchDataModule` arguments for the target dataset.
    """

    def __init__(
        self,
        source_dataset: str = "lidc",
        source_root: str | None = None,
        source_cache_dir: str | None = None,
        source_split_file: str | None = None,
        source_dataset_kwargs: dict[str, Any] | None = None,
        pairs: int = 20,
        replay_pairs: int = 20,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if pairs < 1 or replay_pairs < 0:
            raise ValueError(f"pairs must be >= 1 and replay_pairs >= 0, got {pairs}, {replay_pairs}")
        self.pairs = int(pairs)
        self.replay_pairs = int(replay_pairs)
        self.source = NodulePatchDataModule(
            dataset=source_dataset,
            root=source_root,
            cache_dir=source_cache_dir,
            scales=self.scales,
            patch_sizes=self.sizes,
            depth=self.depth,
            boundary=self.patch_settings.boundary,
            context=self.patch_settings.context,
            context_depth=self.patch_settings.context_depth,
            normalization=self.normalization,
            window=self.window,
            augment=self.augment,
            augmentation=self.augmentation_kwargs,
            ratios=self.ratios,
            stratify=self.stratify,
            split_file=source_split_file,
            seed=self.seed,
            min_diameter=self.min_diameter,
            min_readers=self.min_readers,
            one_scan_per_patient=self.one_scan_per_patient,
            drop_indeterminate=self.drop_indeterminate,
            reuse_cache=self.reuse_cache,
            lenient=self.lenient,
            dataset_kwargs=source_dataset_kwargs,
        )

    def prepare_data(self) -> None:
        super().prepare_data()
        self.source.prepare_data()

    @staticmethod
    def _balanced(table: pd.DataFrame, n: int, rng: np.random.Generator, what: str) -> pd.DataFrame:
        """`n` label-1 and `n` label-0 nodules, drawn by patient in random order."""
        patients = table["patient_id"].drop_duplicates().to_numpy()
        rng.shuffle(patients)
        chosen: list[int] = []
        counts = {0: 0, 1: 0}
        for patient in patients:
            if counts[0] >= n and counts[1] >= n:
                break
            take = []
            for i in table.index[table["patient_id"] == patient]:
                positive = int(table.at[i, "label"] > 0)
                if counts[positive] < n:
                    counts[positive] += 1
                    take.append(i)
            if take:
                chosen += take
        if counts[0] < n or counts[1] < n:
            raise ValueError(
                f"{what}: needs {n} positive and {n} negative nodules, found {counts[1]} and {counts[0]}; "
                "lower pairs/replay_pairs or use a larger dataset"
            )
        return table.loc[chosen].assign(_patient_used=True)

    def split_tables(self) -> dict[str, pd.DataFrame]:
        target = self.labelled_table()
        rng = np.random.default_rng([self.seed, 0xF5])
        finetune = self._balanced(target, self.pairs, rng, f"few-shot target {self.dataset_name}")
        used = set(finetune["patient_id"])
        test = target[~target["patient_id"].isin(used)].reset_index(drop=True)
        parts = {"train": finetune.drop(columns="_patient_used").reset_index(drop=True), "test": test}
        if self.replay_pairs:
            source_train = self.source.split_tables()["train"]
            replay = self._balanced(
                source_train, self.replay_pairs, rng, f"few-shot source {self.source.dataset_name}"
            )
            parts["replay"] = replay.drop(columns="_patient_used").reset_index(drop=True)
        else:
            parts["replay"] = target.iloc[:0]
        parts["val"] = parts["train"]
        return parts

    def build_dataset(self, part: str, table: pd.DataFrame) -> Dataset:
        if part != "train":
            return super().build_dataset(part, table)
        target = super().build_dataset("train", table)
        if self.tables["replay"].empty:
            return target
        replay = self.source.build_dataset("train", self.tables["replay"])
        return ConcatDataset([target, replay])

    def table(self, part: str) -> pd.DataFrame:
        if part == "train" and not self.tables["replay"].empty:
            return pd.concat([self.tables["train"], self.tables["replay"]], ignore_index=True)
        return super().table(part)


# ------------------------------------------------------------------------------------------ pathology
class PathologyImageDataset(Dataset):
    """2D class-folder images → `(in_chans, img_size, img_size)` float tensors in [0, 1] (or normalised).

    Args:
        samples: the images with their labels.
        img_size: output size (square).
        in_chans: output channels (a grey image is repeated; 3 for ImageNet-shaped models).
        augment: flips and rotation (papers/003: horizontal, vertical flips and rotation).
        mean / std: per-channel normalisation after scaling to [0, 1].
        centres: in-plane nodule centre (row, column) per sample, None where unknown (image centre).
        crop: side in pixels of a square crop around the centre, taken before resizing (None: whole image;
            outside the image counts as black).
        jitter: training-time random shift of the crop centre, up to this many pixels per axis.
    """

    def __init__(
        self,
        samples: Sequence[ImageSample],
        img_size: int = 224,
        in_chans: int = 3,
        augment: bool = False,
        mean: float = 0.5,
        std: float = 0.5,
        centres: Sequence[tuple[float, float] | None] | None = None,
        crop: int | None = None,
        jitter: int = 0,
    ) -> None:
        self.samples = list(samples)
        self.centres = list(centres) if centres is not None else [None] * len(self.samples)
        if len(self.centres) != len(self.samples):
            raise ValueError(f"{len(self.centres)} crop centres for {len(self.samples)} images")
        self.crop = int(crop) if crop else None
        self.jitter = int(jitter) if augment else 0
        self.img_size = int(img_size)
        self.in_chans = int(in_chans)
        self.mean = float(mean)
        self.std = float(std)
        steps = [A.Resize(self.img_size, self.img_size)]
        if augment:
            steps += [
                A.HorizontalFlip(p=0.5),
                A.VerticalFlip(p=0.5),
                A.Affine(rotate=(-180, 180), border_mode=0, fill=0, p=0.5),
            ]
        self.transform = A.Compose(steps)

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, index: int) -> np.ndarray:
        """The image as float32 in [0, 1], grey `(H, W)` (colour images are averaged to grey)."""
        path = self.samples[index].path
        try:
            with Image.open(path) as img:
                pixels = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
        except OSError as err:
            raise ValueError(f"{path}: cannot read the image ({err}); replace or remove the file") from err
        return pixels

    def cropped(self, index: int) -> np.ndarray:
        """The image, or its `crop` × `crop` square around the sample's centre (shifted by the jitter)."""
        pixels = self.image(index)
        if self.crop is None:
            return pixels
        h, w = pixels.shape
        centre = self.centres[index] or ((h - 1) / 2.0, (w - 1) / 2.0)
        shift = torch.randint(-self.jitter, self.jitter + 1, (2,)).tolist() if self.jitter else (0, 0)
        top = int(round(centre[0] - (self.crop - 1) / 2.0)) + shift[0]
        left = int(round(centre[1] - (self.crop - 1) / 2.0)) + shift[1]
        out = np.zeros((self.crop, self.crop), dtype=np.float32)
        y0, x0 = max(top, 0), max(left, 0)
        y1, x1 = min(top + self.crop, h), min(left + self.crop, w)
        if y1 > y0 and x1 > x0:
            out[y0 - top : y1 - top, x0 - left : x1 - left] = pixels[y0:y1, x0:x1]
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        self.transform.set_random_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
        pixels = self.transform(image=self.cropped(index))["image"]
        tensor = (torch.from_numpy(np.ascontiguousarray(pixels)) - self.mean) / self.std
        return {
            "image": tensor.unsqueeze(0).expand(self.in_chans, -1, -1).contiguous(),
            "label": torch.tensor(self.samples[index].label, dtype=torch.long),
            "index": torch.tensor(index, dtype=torch.long),
        }


class PathologyImageDataModule(PartLoaderDataModule):
    """The LDFC / spatio-temporal classification image folders (module docstring).

    Args:
        dataset: "ldfc" (3 classes) or "spatiotemporal" (6 classes), or any adapter with a
            `classification()` index.
        root: dataset root (None: LDFC_ROOT / STPD_ROOT).
        train_part: the training folder ("train").
        test_part: the held-out folder (LDFC "test", spatio-temporal "validate"); None picks the
            adapter's non-training part.
        val_fraction: patient-level share of the training folder used for validation; 0 validates on
            the test part (the papers have no separate validation set).
        predict_root: a folder of images to predict (recursively; any label); None predicts the test part.
        img_size: network input size.
        in_chans: input channels.
        augment: flips and rotation on the training part.
        crop: side in pixels of a nodule-centred square crop taken before resizing (None: the whole image);
            the centres come from the adapter's `image_centres` (LDFC: its voxel annotation table).
        crop_jitter: training-time random shift of the crop centre, pixels per axis.
        seed: validation-split seed.
        batch_size / eval_batch_size / num_workers: loaders.
        lenient: an empty class folder is a warning, not an error.
        dataset_kwargs: extra adapter arguments.
    """

    drop_last_train = True  # a last training batch of one sample breaks BatchNorm

    def __init__(
        self,
        dataset: str = "ldfc",
        root: str | None = None,
        train_part: str = "train",
        test_part: str | None = None,
        val_fraction: float = 0.15,
        predict_root: str | None = None,
        img_size: int = 224,
        in_chans: int = 3,
        augment: bool = True,
        crop: int | None = None,
        crop_jitter: int = 0,
        seed: int = 0,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        lenient: bool = False,
        dataset_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.dataset_name = dataset
        self.root = root
        self.train_part = train_part
        self.test_part = test_part
        self.val_fraction = float(val_fraction)
        self.predict_root = predict_root
        self.img_size = img_size
        self.in_chans = in_chans
        self.augment = augment
        self.crop = crop
        self.crop_jitter = crop_jitter
        self.seed = seed
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.lenient = lenient
        self.dataset_kwargs = dict(dataset_kwargs or {})
        self.samples: dict[str, list[ImageSample]] = {}
        self.datasets: dict[str, PathologyImageDataset] = {}
        self.class_names: list[str] = []
        self.centres: dict[Path, tuple[float, float] | None] = {}

    def adapter(self) -> ScanDataset:
        return open_dataset(self.dataset_name, self.root, strict=not self.lenient, **self.dataset_kwargs)

    def index(self) -> ImageFolderIndex:
        """The adapter's classification image index."""
        adapter = self.adapter()
        if not hasattr(adapter, "classification"):
            raise ValueError(f"dataset {self.dataset_name!r} has no classification image folders")
        return adapter.classification()

    def _crop_centres(self, samples: Sequence[ImageSample]) -> dict[Path, tuple[float, float] | None]:
        adapter = self.adapter()
        if not hasattr(adapter, "image_centres"):
            raise ValueError(
                f"dataset {self.dataset_name!r} gives no nodule positions for its images; set crop: null"
            )
        paths = [s.path for s in samples]
        centres = dict(zip(paths, adapter.image_centres(paths)))
        missing = sum(c is None for c in centres.values())
        if missing:
            log.warning(
                "%d of %d images have no annotated nodule; cropped at the image centre", missing, len(paths)
            )
        return centres

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _val_split(self, train: list[ImageSample]) -> tuple[list[ImageSample], list[ImageSample]]:
        items = [SplitItem(str(s.path), s.patient_id or f"image:{s.path.name}", s.label) for s in train]
        split = ratio_split(
            items, {"train": 1.0 - self.val_fraction, "val": self.val_fraction}, seed=self.seed, stratify=True
        )
        val = set(split.uids("val"))
        return [s for s in train if str(s.path) not in val], [s for s in train if str(s.path) in val]

    def setup(self, stage: str | None = None) -> None:
        if not self.samples:
            index = self.index()
            self.class_names = [index.class_descriptions.get(c, c) for c in index.classes]
            if self.train_part not in index.parts:
                raise ValueError(f"{index.root} has no {self.train_part!r} folder; parts are {index.parts}")
            test_part = self.test_part or next((p for p in index.parts if p != self.train_part), None)
            if test_part is None or test_part not in index.parts:
                raise ValueError(
                    f"{index.root} has no held-out folder {test_part!r}; parts are {index.parts}"
                )
            train = index.part(self.train_part)
            test = index.part(test_part)
            if self.val_fraction > 0:
                train, val = self._val_split(train)
            else:
                val = test
            self.samples = {"train": train, "val": val, "test": test}
            if self.predict_root:
                root = Path(self.predict_root)
                files = sorted(
                    p for p in root.rglob("*") if p.suffix.lower() in (".bmp", ".png", ".jpg", ".jpeg")
                )
                if not files:
                    raise FileNotFoundError(f"no images (.bmp, .png, .jpg) under predict_root {root}")
                self.samples["predict"] = [ImageSample(p, 0, "", "predict") for p in files]
            else:
                self.samples["predict"] = test
            if self.crop:
                self.centres = self._crop_centres([s for part in self.samples.values() for s in part])
            log.info("pathology images: %s", {k: len(v) for k, v in self.samples.items()})
        self.setup_parts(stage, self._dataset_for)

    def _dataset_for(self, part: str) -> PathologyImageDataset:
        if not self.samples[part]:
            raise ValueError(f"the {part} part of {self.dataset_name} has no images")
        samples = self.samples[part]
        return PathologyImageDataset(
            samples,
            self.img_size,
            self.in_chans,
            augment=self.augment and part == "train",
            centres=[self.centres.get(s.path) for s in samples] if self.crop else None,
            crop=self.crop,
            jitter=self.crop_jitter,
        )

    def table(self, part: str) -> pd.DataFrame:
        """Images of a part: file, label, class folder, patient id."""
        return pd.DataFrame(
            {
                "file": [str(s.path) for s in self.samples[part]],
                "label": [s.label for s in self.samples[part]],
                "class_folder": [s.class_name for s in self.samples[part]],
                "patient_id": [s.patient_id or "" for s in self.samples[part]],
            }
        )
