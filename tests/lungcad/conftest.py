"""A tiny bundle for the lungcad tests: all four models trained a couple of steps, once per session.

One synthetic LIDC-IDRI tree (4 `small` phantoms, TCIA layout) serves every model: CLAF stage 1 and the
MPPN (dataset ``lidc``; the MPPN's training candidates are the training scans' nodules plus random lung
points, written as a LUNA16 results CSV), GLANCE on 64×64 slices and M³Net (`tiny` preset, 8/12/16-voxel
crops × 8 slices). Each model is trained through its own CLI with the user's config plus a small overlay
(`fit`, one or two steps, no validation), so the run folders look like real ones (`runs/<name>/version_0`:
config.yaml, run_info.json, checkpoints/last.ckpt), and `lungcad bundle` (the CLI, in-process) bundles
them — including the operating threshold chosen on the stage-1 run's validation scan.

``tiny_bundle`` (the bundle folder) is what other lungcad tests use; ``tiny_bundle_env`` also holds the
tree, the 1 mm cache and the runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
N_SCANS = 4
RATIOS = [0.5, 0.25, 0.25]
CLS_SIZES = {32: 8, 64: 12, 96: 16}
CLS_DEPTH = 8


def _trainer(root: Path, steps: int) -> dict[str, Any]:
    return {
        "default_root_dir": str(root),
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "limit_train_batches": steps,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 1,
    }


def _write(path: Path, document: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return str(path)


def _run_dir(root: Path) -> Path:
    runs = sorted(root.glob("*/version_*"))
    assert runs, f"no run folder under {root}"
    return runs[-1]


def _candidates_csv(cache_dir: Path, path: Path) -> Path:
    """Training candidates for the MPPN: every cached nodule and 6 random lung points per scan."""
    from common.cache import PreprocessedCache, entry_geometry

    cache = PreprocessedCache(cache_dir)
    rng = np.random.default_rng(0)
    rows = []
    for uid in cache.uids:
        entry = cache.entry(uid)
        for finding in entry["nodules"]:
            rows.append((uid, *finding["world_xyz"], 0.9))
        _, mask, _ = cache.load(uid, mmap=True)
        lung = np.argwhere(np.asarray(mask) > 0)
        picks = lung[rng.choice(len(lung), size=min(6, len(lung)), replace=False)] if len(lung) else []
        for zyx in picks:
            rows.append((uid, *entry_geometry(entry).voxel_to_world(np.asarray(zyx, float)).reshape(3), 0.2))
    pd.DataFrame(rows, columns=["seriesuid", "coordX", "coordY", "coordZ", "probability"]).to_csv(
        path, index=False
    )
    return path


def build_tiny_bundle(tmp: Path) -> dict[str, Path]:
    """Tree, cache, the four run folders and the bundle folder under `tmp` (see the module docstring)."""
    import torch

    from common.synth import make_lidc
    from lungcad.cli import main as lungcad_main
    from lungcls.cli import main as lungcls_main
    from lungdet.cli import run_cli as lungdet_main
    from lungseg.cli import main as lungseg_main

    os.environ.setdefault("WANDB_MODE", "disabled")
    torch.manual_seed(0)
    tree, cache = tmp / "lidc", tmp / "cache"
    make_lidc(tree, n_scans=N_SCANS, seed=0, size="small")
    data = {"dataset": "lidc", "root": str(tree), "cache_dir": str(cache), "split": "ratio", "ratios": RATIOS}
    data.update({"seed": 0, "num_workers": 0})

    # GLANCE first: its prepare_data builds the shared 1 mm cache (images, lung masks) and the nodule masks.
    seg = {
        "model": {
            "init_args": {
                "model_overrides": {
                    "widths": [16, 32, 64, 128],
                    "stem_channels": [8, 16],
                    "gct_heads": [1, 1, 2, 2],
                },
                "with_hd95": False,
            }
        },
        "data": {"init_args": {**data, "image_size": 64, "batch_size": 2, "augment": False}},
        "trainer": _trainer(tmp / "runs_seg", 2),
    }
    lungseg_main(
        ["fit", "--config", str(REPO / "configs/glance_lidc.yaml"), "--config", _write(tmp / "seg.yaml", seg)]
    )

    stage1 = {
        "model": {
            "init_args": {
                "width": 2,
                "head_channels": 8,
                "block_size": 64,
                "overlap": 0.25,
                "sw_batch_size": 1,
                "score_threshold": 0.0,
                "max_candidates": 4,
            }
        },
        "data": {"init_args": {**data, "crop_size": 32, "samples_per_epoch": 4, "batch_size": 2}},
        "trainer": _trainer(tmp / "runs_stage1", 2),
    }
    lungdet_main(
        [
            "fit",
            "--config",
            str(REPO / "configs/claf_luna16.yaml"),
            "--config",
            _write(tmp / "s1.yaml", stage1),
        ]
    )

    candidates = _candidates_csv(cache, tmp / "candidates.csv")
    mppn = {
        "model": {
            "init_args": {
                "width": 2,
                "chunk_size": 16,
                "stage1_weight": 0.5,
                "stage1_inference": {"max_candidates": 3},
            }
        },
        "data": {
            "init_args": {
                **data,
                "candidates_csv": str(candidates),
                "dataset_candidates": False,
                "samples_per_epoch": 8,
                "batch_size": 4,
            }
        },
        "trainer": _trainer(tmp / "runs_mppn", 2),
    }
    lungdet_main(
        [
            "fit",
            "--config",
            str(REPO / "configs/mppn_luna16.yaml"),
            "--config",
            _write(tmp / "mppn.yaml", mppn),
        ]
    )

    cls = {
        "model": {
            "class_path": "lungcls.task.M3NetTask",
            "init_args": {"preset": "tiny", "in_slices": CLS_DEPTH},
        },
        "data": {
            "class_path": "lungcls.data.NodulePatchDataModule",
            "init_args": {
                "root": str(tree),
                "cache_dir": str(tmp / "patches"),
                "patch_sizes": CLS_SIZES,
                "depth": CLS_DEPTH,
                "batch_size": 4,
                "ratios": RATIOS,
                "stratify": False,
                "normalization": "window",
                "augment": False,
            },
        },
        "trainer": {
            **_trainer(tmp / "runs_cls", 1),
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"save_last": True},
                }
            ],
        },
    }
    lungcls_main(["fit", "--config", _write(tmp / "cls.yaml", cls)])

    runs = {kind: _run_dir(tmp / f"runs_{kind}") for kind in ("stage1", "mppn", "seg", "cls")}
    bundle = tmp / "bundle"
    args = [f"--{kind}={path}" for kind, path in runs.items()]
    assert lungcad_main(["bundle", *args, "--out", str(bundle), "--fp-per-scan", "1"]) == 0
    return {
        "tree": tree,
        "cache": cache,
        "bundle": bundle,
        "tmp": tmp,
        **{f"run_{k}": v for k, v in runs.items()},
    }


@pytest.fixture(scope="session")
def tiny_bundle_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tree, cache, the four run folders and the bundle folder (see the module docstring)."""
    return build_tiny_bundle(tmp_path_factory.mktemp("tiny_bundle"))


@pytest.fixture(scope="session")
def tiny_bundle(tiny_bundle_env: dict[str, Path]) -> Path:
    """The tiny bundle's folder (bundle.json + four checkpoints)."""
    return tiny_bundle_env["bundle"]
