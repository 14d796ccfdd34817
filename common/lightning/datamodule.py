"""Base datamodule over the preprocessed cache (`common.cache`).

`prepare_data()` builds or updates the cache for the configured dataset (only on local rank 0; an unchanged
cache is a no-op), `setup()` resolves the split into train / val / test / predict uids. Subclasses implement
`build_dataset(part, uids)`; everything about where data lives and which scans go where is decided here, once.
Where a cache lives follows `common.cache.default_cache_dir`, the rule `lungdata prepare` follows too.

Predicting on a folder of new scans (`predict_root`) never needs the training dataset: in `lungdet predict` /
`lungseg predict` / `lungcls predict` only that folder is cached (`common.cache.predict_cache_dir`) and read
(a hospital has no LUNA16).

Splits: `split_file` (a file written by `lungdata split` or by an earlier run) wins; otherwise `split`
chooses how one is made and it is saved beside the cache so every later run sees the same scans:
- "luna16_subsets": the ten official subsets as folds; `fold` is the test subset, the next one validation;
- "claf_sixfold": the CLAF paper's six folds (seeded), same rotation;
- "ratio": patient-level train/val/test by `ratios` (seeded).

Each parameter is declared once, in the class that first uses it:
- `PartLoaderDataModule`: the per-part datasets and the loader hooks (a part may bring its own sampler);
- `AdapterDataModule`: the dataset adapter (dataset, root, dataset_kwargs, lenient), the folder to predict
  on, the split seed and the loader sizes — all the lungcls pathology image-folder module needs;
- `DatasetDataModule`: adds where the cache lives, the split file, split ratios and column names — what
  the cache-backed modules share (`CacheDataModule` here, the lungcls nodule-patch modules);
- `CacheDataModule`: adds the preprocessed cache's spacing and the kind of split (lungdet, lungseg).
So every package builds its parts and loaders in one place.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from common.cache import (
    PrepareSettings,
    PreprocessedCache,
    default_cache_dir,
    predict_cache_dir,
    prepare_cache,
)
from common.datasets.registry import open_dataset, resolve_root
from common.splits import Split, claf_sixfold, items_from_records, luna16_subset_folds, ratio_split

log = logging.getLogger(__name__)

SPLIT_KINDS = ("luna16_subsets", "claf_sixfold", "ratio")
PARTS = ("train", "val", "test")
#: the parts each Lightning stage needs (any other stage: all of `PARTS`)
STAGE_PARTS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}


class PartLoaderDataModule(LightningDataModule):
    """Datasets per part and Lightning's four loader hooks over them, written once for every datamodule.

    A subclass builds `datasets` ("train", "val", "test", "predict") in `setup` through `setup_parts` and
    sets `batch_size` and `num_workers`; the class attributes below tune the loaders without repeating
    them. Training shuffles, the other parts keep their order (predictions are joined back by index).

    Attributes:
        eval_batch_size: batch size of val/test/predict; None uses `batch_size`.
        drop_last_train: drop the last training batch when it is shorter than `batch_size` (and the part
            holds more than one batch): a last batch of one sample breaks BatchNorm training.
    """

    datasets: dict[str, Dataset]
    batch_size: int
    num_workers: int
    eval_batch_size: int | None = None
    drop_last_train: bool = False

    def setup_parts(self, stage: str | None, dataset_for: Callable[[str], Dataset]) -> None:
        """Build the datasets `stage` needs (None: "fit") that are not built yet, `dataset_for(part)` each."""
        for part in STAGE_PARTS.get(stage or "fit", PARTS):
            if part not in self.datasets:
                self.datasets[part] = dataset_for(part)

    def part_batch_size(self, part: str) -> int:
        """The batch size of `part`: `batch_size` for training, `eval_batch_size` (if set) otherwise."""
        if part == "train" or self.eval_batch_size is None:
            return self.batch_size
        return self.eval_batch_size

    def _loader(
        self,
        part: str,
        shuffle: bool,
        batch_size: int | None = None,
        collate_fn=None,
        sampler: Sampler | None = None,
    ) -> DataLoader:
        """A loader over one part; `collate_fn` defaults to the dataset's own `collate_fn`, if it has one.

        `sampler` replaces shuffling (give `shuffle=False`): an epoch-seeded or weighted draw of the part.
        """
        dataset = self.datasets[part]
        batch_size = batch_size or self.part_batch_size(part)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_fn or getattr(dataset, "collate_fn", None),
            drop_last=self.drop_last_train and part == "train" and len(dataset) > batch_size,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", shuffle=False)


class AdapterDataModule(PartLoaderDataModule):
    """A dataset adapter, the folder to predict on and the loader sizes: what every dataset-backed module takes.

    Args:
        dataset: adapter name (`common.datasets.registry.DATASETS`), e.g. "luna16".
        root: dataset root; None takes the adapter's environment variable (LUNA16_ROOT, ...).
        predict_root: a folder of new scans (or images) to predict on; None predicts the test part.
        seed: seed of the split made from the dataset.
        batch_size: batch size.
        num_workers: data-loader workers.
        lenient: log and skip bad scans/rows instead of stopping.
        dataset_kwargs: extra adapter arguments (file names, subsets, ...).
    """

    def __init__(
        self,
        dataset: str = "luna16",
        root: str | None = None,
        predict_root: str | None = None,
        seed: int = 0,
        batch_size: int = 2,
        num_workers: int = 0,
        lenient: bool = False,
        dataset_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()  # collects the arguments of every subclass __init__ on the way here
        self.dataset_name = dataset
        self.root = root
        self.predict_root = predict_root
        self.seed = seed
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.lenient = lenient
        self.dataset_kwargs = dict(dataset_kwargs or {})
        self.datasets: dict[str, Dataset] = {}

    @property
    def resolved_root(self) -> Path:
        return resolve_root(self.dataset_name, self.root)

    def open_dataset(self):
        """The adapter over the dataset root (records, candidates, image folders, ...)."""
        return open_dataset(self.dataset_name, self.root, strict=not self.lenient, **self.dataset_kwargs)

    def predicting_new_scans(self) -> bool:
        """True while a trainer runs `predict` with a `predict_root`: only that folder is needed."""
        trainer = getattr(self, "trainer", None)
        fn = getattr(getattr(trainer, "state", None), "fn", None)
        return bool(self.predict_root) and fn is not None and str(getattr(fn, "value", fn)) == "predict"


class DatasetDataModule(AdapterDataModule):
    """`AdapterDataModule` plus where its cache lives and the split file.

    Args:
        cache_dir: cache folder; None → `common.cache.default_cache_dir` (`cache/<dataset>-<hash of root>`
            under the working directory, where `lungdata prepare` without `--out` writes it).
        split_file: an existing split file, or where to save the one made (default: in `cache_dir`).
        ratios: train/val/test ratios of a seeded split.
        columns: the annotation tables' column names where your copy differs, ``{role: name}``
            (e.g. ``{x: coordX_mm}``; roles as in the adapter's columns class).
        **kwargs: `AdapterDataModule` arguments (dataset, root, predict_root, seed, batch_size, num_workers,
            lenient, dataset_kwargs).

    Attributes:
        cache_kind / cache_variant(): the `kind` and `variant` of `common.cache.default_cache_dir` and
            `common.cache.predict_cache_dir` (None: the preprocessed scan cache).
    """

    cache_kind: str | None = None

    def __init__(
        self,
        cache_dir: str | None = None,
        split_file: str | None = None,
        ratios: tuple[float, float, float] = (0.7, 0.1, 0.2),
        columns: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.split_file = split_file
        self.ratios = tuple(ratios)
        if columns:
            self.dataset_kwargs["columns"] = dict(columns)
        self._cache_dir = cache_dir

    # ------------------------------------------------------------------ locations
    def cache_variant(self) -> str | None:
        """What else names the cache folder (settings a subclass caches under); None by default."""
        return None

    @property
    def cache_dir(self) -> Path:
        """The configured `cache_dir`, else `default_cache_dir()`."""
        return Path(self._cache_dir) if self._cache_dir else self.default_cache_dir()

    def default_cache_dir(self) -> Path:
        """Where the cache lives when no `cache_dir` is given (`common.cache.default_cache_dir`)."""
        return default_cache_dir(
            self.dataset_name, self.resolved_root, kind=self.cache_kind, variant=self.cache_variant()
        )

    @property
    def predict_cache_dir(self) -> Path:
        """The cache of `predict_root` (`common.cache.predict_cache_dir`), found without the training root."""
        return predict_cache_dir(
            self._cache_dir, self.predict_root, kind=self.cache_kind, variant=self.cache_variant()
        )


class CacheDataModule(DatasetDataModule, abc.ABC):
    """Dataset → preprocessed cache → split → per-part datasets.

    Args:
        spacing: resampling target in mm (isotropic).
        split: how to make the split when `split_file` is absent (see module docstring).
        fold: test fold index for k-fold splits.
        **kwargs: `DatasetDataModule` arguments (cache_dir, split_file, ratios, columns) and
            `AdapterDataModule` ones (dataset, root, predict_root, seed, batch_size, num_workers, lenient,
            dataset_kwargs).
    """

    def __init__(
        self,
        spacing: float = 1.0,
        split: str = "luna16_subsets",
        fold: int = 0,
        **kwargs: Any,
    ) -> None:
        if split not in SPLIT_KINDS:
            raise ValueError(f"split={split!r}: choose one of {SPLIT_KINDS} or give split_file")
        super().__init__(**kwargs)
        self.spacing = float(spacing)
        self.split_kind = split
        self.fold = fold
        self.uids: dict[str, list[str]] = {}

    @property
    def settings(self) -> PrepareSettings:
        return PrepareSettings(spacing=(self.spacing,) * 3)

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        """Cache the dataset (and `predict_root`); while predicting on `predict_root`, that folder only."""
        if not self.predicting_new_scans():
            records = self.open_dataset().records
            prepare_cache(records, self.cache_dir, self.settings, strict=not self.lenient)
        if self.predict_root:
            folder = open_dataset("folder", self.predict_root)
            prepare_cache(folder.records, self.predict_cache_dir, self.settings, strict=not self.lenient)

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict" and self.predict_root:  # new scans: no split, no training cache
            if "predict" not in self.datasets:
                cache = PreprocessedCache(self.predict_cache_dir)
                self.datasets["predict"] = self.build_dataset("predict", cache.uids, cache)
            return
        self.cache = PreprocessedCache(self.cache_dir)
        if not self.uids:
            self.uids = self._resolve_split()
            log.info("split %s: %s", self.split_kind, {k: len(v) for k, v in self.uids.items()})
        self.setup_parts(stage, self._dataset_for)

    def _dataset_for(self, part: str) -> Dataset:
        uids = self.uids["test" if part == "predict" else part]
        if not uids:
            raise ValueError(
                f"the {part} part of the split is empty ({self.split_kind}, fold {self.fold}, {len(self.cache)} "
                "cached scans); use more scans or another split"
            )
        return self.build_dataset(part, uids, self.cache)

    def _resolve_split(self) -> dict[str, list[str]]:
        cached = set(self.cache.uids)
        path = (
            Path(self.split_file)
            if self.split_file
            else self.cache_dir / f"split_{self.split_kind}_seed{self.seed}.json"
        )
        if path.is_file():
            split = Split.load(path)
        else:
            records = [r for r in self.open_dataset().records if r.uid in cached]
            if self.split_kind == "luna16_subsets":
                split = luna16_subset_folds(records, on_conflict="merge")
            elif self.split_kind == "claf_sixfold":
                split = claf_sixfold(records, seed=self.seed)
            else:
                split = ratio_split(
                    items_from_records(records), dict(zip(PARTS, self.ratios)), seed=self.seed
                )
            split.save(path)
        if set(split.parts) <= set(PARTS):
            parts = {p: [u for u in split.uids(p) if u in cached] if p in split.parts else [] for p in PARTS}
        else:
            folds = [p for p in split.parts if split.uids(p)]
            present = Split([a for a in split.assignments if a.part in folds], split.meta)
            parts = {
                k: [u for u in v if u in cached] for k, v in present.fold(self.fold % len(folds)).items()
            }
        return parts

    @abc.abstractmethod
    def build_dataset(self, part: str, uids: list[str], cache: PreprocessedCache) -> Dataset:
        """The dataset of one part ("train", "val", "test" or "predict"); subclasses decide what a sample is."""
