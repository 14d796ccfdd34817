"""Session fixtures of the lungdet pipeline tests: one tiny synthetic LUNA16 tree and its cache.

Four `small` phantoms (64 slices × 160², drawn at 0.6–0.9 mm × 1.25–2.5 mm; about 100 × 125² voxels at
1 mm) are generated and preprocessed once per test session; scan 3 uses the flipped direction matrix, so any
world/voxel mix-up shows. Under pytest-xdist the workers share them: the first worker to arrive builds the
tree and a master cache under a file lock in the session's common temporary folder, every worker copies the
cache into its own folder (the datamodules' `prepare_data` takes the cache's build lock, so two workers
must never prepare one cache at the same time; the copy's fingerprints still match the shared tree, so it
is up to date and nothing is rebuilt).
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

import pytest

from common.cache import PreprocessedCache, prepare_cache
from common.datasets.luna16 import LUNA16Dataset
from common.synth import make_luna16

N_SCANS = 4
SEED = 3


@pytest.fixture(scope="session")
def _shared_data(tmp_path_factory) -> Path:
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "lungdet-shared"
    shared.mkdir(exist_ok=True)
    with open(shared / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (shared / "ready").is_file():
            make_luna16(shared / "luna16", n_scans=N_SCANS, seed=SEED, size="small")
            prepare_cache(LUNA16Dataset(shared / "luna16").records, shared / "cache")
            (shared / "ready").touch()
    return shared


@pytest.fixture(scope="session")
def luna_tree(_shared_data) -> Path:
    return _shared_data / "luna16"


@pytest.fixture(scope="session")
def luna_cache(_shared_data, tmp_path_factory) -> PreprocessedCache:
    out = tmp_path_factory.mktemp("lungdet-cache")
    shutil.copytree(_shared_data / "cache", out, dirs_exist_ok=True)
    (out / ".lock").unlink(missing_ok=True)
    return PreprocessedCache(out)


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
