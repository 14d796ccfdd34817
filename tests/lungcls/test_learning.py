"""Slow learning checks of the lungcls pipeline (`make test-slow`; numbers are printed with -s).

1. M³Net on a synthetic LIDC-IDRI tree: every nodule is a real LIDC nodule (shape from the readers'
   contours, the readers' real ratings, label = mean malignancy > 3), so malignancy has to be learned from
   morphology as on LIDC. Stage 1 trains the three branches of the reduced-width "tiny" preset alone,
   stage 2 fuses them; on held-out *patients* stage 2 must reach ROC-AUC ≥ 0.75 and not fall below the
   best single scale (within 0.02, the resolution of an AUC on ~50 test nodules).
2. The pathology classifier on the synthetic LDFC classification images must beat the majority-class
   accuracy of the test folder.

Both run the real datamodules and tasks through Lightning's Trainer on CPU with reduced crop sizes
(32 / 48 / 64 in-plane × 24 slices instead of 32 / 64 / 96 × 56) so they finish in minutes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

from lungcls.data import NodulePatchDataModule
from lungcls.pathology_data import PathologyImageDataModule
from lungcls.task import M3NetTask, PathologyTask, ScaleTask

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)

SIZES = {32: 32, 64: 48, 96: 64}
DEPTH = 24
N_SCANS = 100
SIZE = "medium"  # nodules up to 24 mm: the diameter/malignancy mix of LIDC (small caps them at 14 mm)
#: flips and rotations only: the perspective and thin-plate-spline warps cost CPU time this check lacks
AUGMENTATION = {"perspective_p": 0.0, "tps_p": 0.0}


def _trainer(root: Path, epochs: int) -> Trainer:
    return Trainer(
        default_root_dir=str(root),
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def m3net_datamodule(root: Path, cache: Path) -> NodulePatchDataModule:
    """Patient-level 70/10/20 split of a LIDC tree, reduced crops, lung window."""
    return NodulePatchDataModule(
        root=str(root),
        cache_dir=str(cache),
        scales=(32, 64, 96),
        patch_sizes=SIZES,
        depth=DEPTH,
        normalization="window",
        augmentation=AUGMENTATION,
        batch_size=16,
        eval_batch_size=32,
        seed=0,
    )


def train_m3net(
    data_root: Path,
    work: Path,
    stage1_epochs: int = 10,
    stage2_epochs: int = 6,
    backbones: dict[int, dict] | None = None,
    lr: float = 1e-3,
    cache: Path | None = None,
) -> dict[str, float]:
    """Stage 1 per scale, then stage 2; test ROC-AUC of each on the held-out patients.

    Args:
        data_root: the LIDC tree.
        work: folder for the cache and checkpoints.
        stage1_epochs / stage2_epochs: training length.
        backbones: scale → backbone spec replacing the "tiny" preset's.
        lr: stage-1 learning rate (stage 2 uses 0.3 × lr).
        cache: patch cache folder (default `work/cache`).
    """
    datamodule = m3net_datamodule(data_root, cache or work / "cache")
    backbones = backbones or {}
    aucs: dict[str, float] = {}
    checkpoints = {}
    for scale in (32, 64, 96):
        seed_everything(scale)
        task = ScaleTask(
            scale=scale,
            preset="tiny",
            backbone=backbones.get(scale),
            in_slices=DEPTH,
            lr=lr,
            weight_decay=1e-4,
            n_bootstrap=200,
        )
        trainer = _trainer(work / f"s{scale}", stage1_epochs)
        trainer.fit(task, datamodule=datamodule)
        checkpoints[scale] = str(work / f"stage1_{scale}.ckpt")
        trainer.save_checkpoint(checkpoints[scale])
        trainer.test(task, datamodule=datamodule, verbose=False)
        aucs[f"scale{scale}"] = task.test_scores["roc_auc"]["value"]
    seed_everything(0)
    task = M3NetTask(
        preset="tiny",
        backbones=backbones or None,
        in_slices=DEPTH,
        stage1_checkpoints=checkpoints,
        freeze="lower",
        frozen_groups=2,
        lr=0.3 * lr,
        weight_decay=1e-4,
        n_bootstrap=200,
    )
    trainer = _trainer(work / "stage2", stage2_epochs)
    trainer.fit(task, datamodule=datamodule)
    trainer.test(task, datamodule=datamodule, verbose=False)
    aucs["m3net"] = task.test_scores["roc_auc"]["value"]
    aucs["m3net_acc"] = task.test_scores["acc"]["value"]
    test = datamodule.table("test")
    aucs["test_nodules"] = float(len(test))
    aucs["test_malignant"] = float(test["label"].sum())
    return aucs


@pytest.fixture(scope="module")
def lidc_tree(tmp_path_factory):
    from common.synth import make_lidc

    root = tmp_path_factory.mktemp("lidc_learning")
    make_lidc(root, n_scans=N_SCANS, seed=1, size=SIZE)
    return root


def test_m3net_learns_malignancy_on_held_out_patients(lidc_tree, tmp_path):
    result = train_m3net(lidc_tree, tmp_path)
    print("\nM³Net learning check (test ROC-AUC):", {k: round(v, 3) for k, v in result.items()})
    best_single = max(result[f"scale{s}"] for s in (32, 64, 96))
    assert result["m3net"] >= 0.75
    assert result["m3net"] >= best_single - 0.02


def train_pathology(data_root: Path, work: Path, epochs: int = 30) -> dict[str, float]:
    """A small timm ResNet on the LDFC classification folders; test ACC, QWK and the majority baseline.

    The images keep the phantom's 160 × 160 matrix: downsizing shrinks a 5–10 mm nodule to a few pixels.
    """
    seed_everything(0)
    datamodule = PathologyImageDataModule(
        dataset="ldfc", root=str(data_root), img_size=160, batch_size=16, val_fraction=0.0
    )
    task = PathologyTask(model_name="resnet10t", num_classes=3, img_size=160, lr=1e-3, n_bootstrap=200)
    trainer = _trainer(work, epochs)
    trainer.fit(task, datamodule=datamodule)
    trainer.test(task, datamodule=datamodule, verbose=False)
    labels = np.array([s.label for s in datamodule.samples["test"]])
    majority = float(np.bincount(labels).max() / labels.size)
    return {
        "acc": task.test_scores["acc"]["value"],
        "qwk": task.test_scores["qwk"]["value"],
        "majority_acc": majority,
        "test_images": float(labels.size),
    }


def test_pathology_classifier_beats_majority_class(tmp_path_factory):
    from common.synth.ldfc import make_ldfc

    root = tmp_path_factory.mktemp("ldfc_learning")
    make_ldfc(root, n_scans=80, seed=2)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = train_pathology(root, tmp_path_factory.mktemp("ldfc_runs"))
    print("\npathology learning check (LDFC test):", {k: round(v, 3) for k, v in result.items()})
    assert result["acc"] > result["majority_acc"]
