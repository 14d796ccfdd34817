"""`trainer.precision: bf16-mixed` trains both CLAF stages (a few CPU steps: finite loss, weights move)."""

from __future__ import annotations

import pytest

from lungdet.cli import run_cli
from tests.lungdet.test_task_cli import CLAF, MPPN, _overlay
from tests.precision_check import fit_steps


@pytest.mark.parametrize("stage, config", [(1, CLAF), (2, MPPN)], ids=["stage1", "mppn"])
def test_bf16_mixed_training_steps(stage, config, luna_tree, luna_cache, tmp_path):
    tiny = _overlay(tmp_path, luna_tree, luna_cache.root, stage)
    cli = run_cli(["--config", config, "--config", tiny], run=False)
    fit_steps(cli.model, cli.datamodule, "bf16-mixed", steps=2)


def test_detection_loss_of_bf16_outputs_is_computed_in_fp32():
    """bf16 network outputs give exactly the loss of their fp32 upcast (targets are not rounded to bf16)."""
    import torch

    from lungdet.losses import DetectionLoss

    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 4, 4, 4, 3, 5, generator=gen).bfloat16()
    labels = torch.zeros(2, 4, 4, 4, 3, dtype=torch.long)
    labels[0, 1, 1, 1, 0] = labels[1, 2, 2, 2, 1] = 1
    deltas = torch.randn(2, 4, 4, 4, 3, 4, generator=gen) * 0.123
    loss_fn = DetectionLoss(min_negatives=5)
    half, full = loss_fn(pred, labels, deltas), loss_fn(pred.float(), labels, deltas)
    assert half.loss.dtype == torch.float32
    assert torch.equal(half.loss, full.loss) and torch.equal(half.reg, full.reg)
