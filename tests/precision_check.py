"""Shared by the per-package mixed-precision tests: a few real Lightning training steps at a given precision."""

from __future__ import annotations

import math

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer


class _Losses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.dtypes: set[torch.dtype] = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.dtypes.add(loss.dtype)
        self.losses.append(float(loss.detach().float()))


def fit_steps(
    task: LightningModule, datamodule: LightningDataModule, precision: str = "bf16-mixed", steps: int = 2
) -> list[float]:
    """Train `steps` optimiser steps on CPU with `precision`; assert finite losses and moved weights.

    Returns the per-step losses. The weights are compared before/after, so a silently skipped optimiser
    step (e.g. a GradScaler that meets inf) or a loss that stops the gradient is caught.
    """
    losses = _Losses()
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,
        max_steps=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[losses],
    )
    before = {n: p.detach().clone() for n, p in task.named_parameters() if p.requires_grad}
    assert before, "the task has no trainable parameters"
    trainer.fit(task, datamodule=datamodule)
    assert len(losses.losses) == steps, losses.losses
    assert all(math.isfinite(v) for v in losses.losses), losses.losses
    # the network runs in bf16 under autocast, but the loss is reduced in fp32 (sums over many voxels)
    assert losses.dtypes == {torch.float32}, losses.dtypes
    after = dict(task.named_parameters())
    moved = [n for n, p in before.items() if not torch.equal(p, after[n].detach())]
    assert moved, "no weight changed in training"
    assert all(p.dtype == torch.float32 for p in task.parameters()), (
        "mixed precision keeps fp32 master weights"
    )
    return losses.losses
