"""`trainer.precision: bf16-mixed` trains M³Net and the pathology classifier (a few CPU steps)."""

from __future__ import annotations

from lungcls.pathology_data import PathologyImageDataModule
from lungcls.task import M3NetTask, PathologyTask
from tests.lungcls.test_data import DEPTH, small_datamodule
from tests.precision_check import fit_steps


def test_m3net_bf16_mixed_training_steps(lidc_tree, patch_cache_dir):
    task = M3NetTask(preset="tiny", in_slices=DEPTH, n_bootstrap=10)
    fit_steps(task, small_datamodule(lidc_tree, patch_cache_dir), "bf16-mixed", steps=2)


def test_pathology_bf16_mixed_training_steps(ldfc_tree):
    task = PathologyTask(model_name="test_resnet", num_classes=3, img_size=32, n_bootstrap=10)
    data = PathologyImageDataModule(
        dataset="ldfc", root=str(ldfc_tree), img_size=32, batch_size=4, val_fraction=0.25
    )
    fit_steps(task, data, "bf16-mixed", steps=2)
