"""Shared GLANCE test data: one tiny synthetic LIDC-IDRI tree and its 1 mm cache, built once per session.

Four `small` phantoms (64×160×160 voxels, 0.6–0.9 mm pixels, 1.25–2.5 mm slices) in the TCIA layout with
reader XML; the cache holds them at 1 mm (≈ 140² pixels per slice, 80–160 slices) with the GLANCE nodule
masks. Models in these tests are narrow (widths 16–128) and work on 64×64 slices.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from common.synth import make_lidc
from lungseg.data import GlanceDataModule

SMALL_MODEL = {"widths": [16, 32, 64, 128], "stem_channels": [8, 16], "gct_heads": [1, 1, 2, 2]}
SIZE = 64
N_SCANS = 4
REPO = Path(__file__).resolve().parents[2]
BASE_CONFIG = REPO / "configs" / "glance_lidc.yaml"


def small_config_text(root: Path, cache: Path, run_dir: Path, logger: bool) -> str:
    """Overrides layered over configs/glance_lidc.yaml: tiny tree, narrow model, 64×64 slices, CPU."""
    widths = ", ".join(map(str, SMALL_MODEL["widths"]))
    return f"""
model:
  init_args:
    model_overrides:
      widths: [{widths}]
      stem_channels: [8, 16]
      gct_heads: [1, 1, 2, 2]
    with_hd95: false
data:
  init_args:
    root: {root}
    cache_dir: {cache}
    image_size: {SIZE}
    ratios: [0.5, 0.25, 0.25]
    batch_size: 2
    num_workers: 0
trainer:
  default_root_dir: {run_dir}
  accelerator: cpu
  devices: 1
  enable_progress_bar: false
  enable_model_summary: false
{"" if logger else "  logger: false"}
"""


@pytest.fixture(scope="session")
def lidc_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("glance_lidc")
    make_lidc(root, n_scans=N_SCANS, seed=0, size="small")
    return root


@pytest.fixture(scope="session")
def lidc_cache(lidc_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The prepared cache (images, lung masks, nodule masks) and its saved split (2 train / 1 val / 1 test)."""
    cache = tmp_path_factory.mktemp("glance_cache")
    dm = make_datamodule(lidc_root, cache)
    dm.prepare_data()
    dm.setup("fit")
    return cache


def make_datamodule(root: Path, cache: Path, **overrides) -> GlanceDataModule:
    """A datamodule on the test tree: 64×64 slices, seeded patient-level split 2/1/1."""
    kwargs = {
        "dataset": "lidc",
        "root": str(root),
        "cache_dir": str(cache),
        "image_size": SIZE,
        "ratios": (0.5, 0.25, 0.25),
        "batch_size": 2,
        "num_workers": 0,
    }
    kwargs.update(overrides)
    return GlanceDataModule(**kwargs)


@pytest.fixture(scope="session")
def fit_datamodule(lidc_root: Path, lidc_cache: Path) -> GlanceDataModule:
    dm = make_datamodule(lidc_root, lidc_cache)
    dm.setup("fit")
    dm.setup("test")
    return dm


@pytest.fixture(scope="session")
def train_batch(fit_datamodule: GlanceDataModule) -> dict:
    """Two training slices that both hold a nodule (fixed, no augmentation randomness)."""
    dataset = fit_datamodule.datasets["train"]
    positives = [i for i, flag in enumerate(dataset.nodule_slices) if flag][:2]
    samples = [dataset.sample(i, seed=k) for k, i in enumerate(positives)]
    return torch.utils.data.default_collate(samples)


@pytest.fixture(scope="session")
def val_item(fit_datamodule: GlanceDataModule) -> dict:
    """The validation scan, cut to the 6 slices around its first nodule (keeps evaluation tests quick)."""
    item = fit_datamodule.datasets["val"][0]
    labels = item["labels"]
    z_nodule = int(torch.nonzero(torch.from_numpy((labels > 0).any(axis=(1, 2))))[0])
    position = int(torch.searchsorted(item["slices"], torch.tensor(z_nodule)))
    keep = slice(max(position - 2, 0), position + 4)
    cut = copy.copy(item)
    cut["image"] = item["image"][keep]
    cut["slices"] = item["slices"][keep]
    return cut
