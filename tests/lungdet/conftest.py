"""Session fixtures of the lungdet pipeline tests: one tiny synthetic LUNA16 tree and its cache.

Four `small` phantoms (64 slices × 160², drawn at 0.6–0.9 mm × 1.25–2.5 mm; about 100 × 125² voxels at
1 mm) are generated and preprocessed once per session; scan 3 uses the flipped direction matrix, so any
world/voxel mix-up shows. Tests that write copy nothing: the cache is read-only to them except through the
cache's own (idempotent) build.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from common.cache import PreprocessedCache, prepare_cache
from common.datasets.luna16 import LUNA16Dataset
from common.synth import make_luna16

N_SCANS = 4
SEED = 3


@pytest.fixture(scope="session")
def luna_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lungdet-luna16")
    make_luna16(root, n_scans=N_SCANS, seed=SEED, size="small")
    return root


@pytest.fixture(scope="session")
def luna_cache(luna_tree, tmp_path_factory) -> PreprocessedCache:
    out = tmp_path_factory.mktemp("lungdet-cache")
    return prepare_cache(LUNA16Dataset(luna_tree).records, out)


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("NO_ALBUMENTATIONS_UPDATE", "1")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread in these tests: on a busy 2-core machine, OpenMP threads that spin-wait for a
    core make 3D convolutions an order of magnitude slower than running on one thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
