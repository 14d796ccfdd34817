"""Datamodules of M³Net: nodule patches for stage 1, stage 2 and few-shot adaptation.

The pathology image folders (LDFC (Sci. Data 2024) and STPD (Jian et al., preprint 2024)) are `lungcls.pathology_data`.

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
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import pandas as pd
import torch
from torch.utils.data import ConcatDataset, Dataset

from common.datasets.base import Nodule, ScanDataset, ScanRecord
from common.datasets.registry import open_dataset
from common.lightning.datamodule import DatasetDataModule
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


class NodulePatchDataModule(DatasetDataModule):
    """Labelled nodules of a scan dataset as nested native-resolution crops (module docstring).

    Args:
        dataset: adapter name (`common.datasets.registry`), "lidc" by default.
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
        stratify: balance the (patient's highest) label over the parts.
        min_diameter: smallest mean reader diameter kept (mm).
        min_readers: smallest number of readers kept.
        one_scan_per_patient: keep each patient's first scan only (the M³Net reference selection).
        drop_indeterminate: drop nodules whose mean malignancy is exactly 3.
        reuse_cache: when the cache holds a nodule table, do not open the dataset again in
            `prepare_data` (fast restarts on the real LIDC; new or edited scans are then not seen).
        predict_csv: nodule centres to classify in the scans of `predict_root` (which it goes with):
            ``seriesuid, coordX, coordY, coordZ`` world mm (the LUNA16 results format `lungdet predict`
            writes; extra columns are kept).
        batch_size: batch size (the paper uses 32).
        eval_batch_size: batch size of val/test/predict (default `batch_size`).
        **kwargs: `common.lightning.datamodule.DatasetDataModule` arguments: root, cache_dir (default
            ``cache/m3net-<dataset>-<root hash>-<block size>``, `common.cache.default_cache_dir`), split_file
            (default: in `cache_dir`), ratios, columns, seed, predict_root (its patches are cached in
            ``m3net-predict-<hash of the folder>-<block size>``, `common.cache.predict_cache_dir`: no
            training root needed), num_workers, lenient, dataset_kwargs (LIDC: source, database, outline,
            cluster_tol).
    """

    drop_last_train = True  # a last training batch of one sample breaks BatchNorm

    def __init__(
        self,
        dataset: str = "lidc",
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
        stratify: bool = True,
        min_diameter: float = 0.0,
        min_readers: int = 1,
        one_scan_per_patient: bool = True,
        drop_indeterminate: bool = False,
        reuse_cache: bool = False,
        predict_csv: str | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset=dataset, batch_size=batch_size, **kwargs)
        if (self.predict_root is None) != (predict_csv is None):
            raise ValueError(
                "predict_root and predict_csv go together: a folder of scans and the nodule centres"
            )
        if split_level not in SPLIT_LEVELS:
            raise ValueError(f"split_level must be one of {SPLIT_LEVELS}, got {split_level!r}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if not scales:
            raise ValueError("scales is empty: give the scale keys to crop, e.g. [32, 64, 96]")
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
        self.ratios = tuple(float(r) for r in self.ratios)
        self.stratify = stratify
        self.min_diameter = float(min_diameter)
        self.min_readers = int(min_readers)
        self.one_scan_per_patient = one_scan_per_patient
        self.drop_indeterminate = drop_indeterminate
        self.reuse_cache = reuse_cache
        self.predict_csv = predict_csv
        self.eval_batch_size = eval_batch_size or batch_size
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
        self.tables: dict[str, pd.DataFrame] = {}

    # ------------------------------------------------------------------------------------ locations
    cache_kind = "m3net"

    def cache_variant(self) -> str:
        """The block size, so runs with other blocks keep their own cache: ``<context>x<context_depth>``."""
        return f"{self.patch_settings.context}x{self.patch_settings.context_depth}"

    @property
    def cache(self) -> PatchCache:
        return PatchCache(self.cache_dir)

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
            if self.predicting_new_scans():
                return  # new scans: the training data are not needed
        if self.reuse_cache and self.cache.exists():
            return
        dataset = self.open_dataset()
        self.cache.build(
            self._records(dataset), self.patch_settings, strict=not self.lenient, keep=self._keep
        )

    @property
    def predict_cache(self) -> PatchCache:
        """Patch cache of the `predict_csv` nodules in the scans of `predict_root`.

        ``m3net-predict-<hash of predict_root>-<block size>`` (`predict_cache_dir`), so it is found without the
        training root; a changed `predict_csv` rewrites its nodule table and crops only the moved or new
        nodules (`PatchCache.build`).
        """
        return PatchCache(self.predict_cache_dir)

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
