"""The shared Lightning layer: hooks, per-stage metrics, optimiser config, CLI defaults, loggers, config saving."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAccuracy

from common.lightning import BaseTask, EnvWandbLogger, default_loggers, wandb_mode
from common.lightning.cli import LungCLI

REPO = Path(__file__).resolve().parents[2]


class ToyTask(BaseTask):
    """Logistic regression on 4 features; exercises every BaseTask hook."""

    def __init__(self, hidden: int = 4, **kwargs) -> None:
        self.hidden = hidden
        super().__init__(**kwargs)

    def configure_models(self) -> None:
        self.model = torch.nn.Linear(4, 1)

    def configure_losses(self) -> None:
        self.criterion = torch.nn.BCEWithLogitsLoss()

    def configure_metrics(self) -> MetricCollection:
        return MetricCollection({"acc": BinaryAccuracy()})

    def _step(self, batch, stage: str):
        x, y = batch
        logits = self.model(x).squeeze(1)
        loss = self.criterion(logits, y)
        metrics = self.metrics_for(stage)
        metrics.update(torch.sigmoid(logits), y.long())
        self.log(f"{stage}/loss", loss)
        self.log_dict(metrics, on_epoch=True, on_step=False)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")


class ToyData(LightningDataModule):
    def __init__(self, n: int = 32, batch_size: int = 8) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 4, generator=g)
        self.ds = TensorDataset(x, (x[:, 0] > 0).float())
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.ds, batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(self.ds, batch_size=self.batch_size)


def test_stage_metrics_are_separate_clones():
    task = ToyTask()
    assert task.train_metrics.prefix == "train/" and task.val_metrics.prefix == "val/"
    assert task.train_metrics["acc"] is not task.val_metrics["acc"]
    assert task.metrics_for("validate") is task.val_metrics


@pytest.mark.parametrize("scheduler", ["none", "cosine", "cosine_warm_restarts", "step", "plateau"])
def test_optimizer_and_scheduler_from_arguments(scheduler):
    task = ToyTask(optimizer="adamw", lr=1e-4, weight_decay=0.05, scheduler=scheduler, t0=20)
    out = task.configure_optimizers()
    optimizer = out if isinstance(out, torch.optim.Optimizer) else out["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["lr"] == 1e-4 and optimizer.param_groups[0]["weight_decay"] == 0.05
    if scheduler == "cosine_warm_restarts":
        assert out["lr_scheduler"]["scheduler"].T_0 == 20


def test_frozen_parameters_are_not_optimised():
    task = ToyTask()
    task.model.bias.requires_grad_(False)
    optimizer = task.configure_optimizers()
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == 4


def test_bad_optimizer_name_is_rejected():
    with pytest.raises(ValueError, match="optimizer"):
        ToyTask(optimizer="lion")


def test_wandb_mode_comes_from_environment(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"
    assert [type(x).__name__ for x in default_loggers("x", "y")] == ["CSVLogger"]
    monkeypatch.setenv("WANDB_MODE", "bogus")
    with pytest.raises(ValueError, match="WANDB_MODE"):
        wandb_mode()
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(ValueError, match="WANDB_MODE"):
        EnvWandbLogger(offline=True)


def _write_config(tmp_path: Path) -> Path:
    config = tmp_path / "toy_experiment.yaml"
    config.write_text(
        f"""
model:
  class_path: tests.common.test_lightning_layer.ToyTask
  init_args:
    hidden: 4
    optimizer: adamw
    lr: 0.01
data:
  class_path: tests.common.test_lightning_layer.ToyData
  init_args:
    batch_size: ${{model.init_args.hidden}}
trainer:
  default_root_dir: {tmp_path / "runs"}
  max_epochs: 1
  limit_train_batches: 2
  limit_val_batches: 2
  enable_progress_bar: false
  accelerator: cpu
"""
    )
    return config


def test_cli_fit_writes_run_folder_with_config_csv_and_offline_wandb(tmp_path):
    # A fresh process: wandb keeps process-wide state, so an earlier test's run must not decide this one's.
    config = _write_config(tmp_path)
    code = (
        "from common.lightning.cli import LungCLI\n"
        "from tests.common.test_lightning_layer import ToyData, ToyTask\n"
        f"cli = LungCLI(ToyTask, ToyData, package='toy', args=['fit', '--config', {str(config)!r}])\n"
        "print('LOG_DIR=' + cli.trainer.log_dir)\n"
        "print('LR=' + str(cli.model.hparams.lr))\n"
    )
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    run_dir = Path(lines["LOG_DIR"])
    assert run_dir.parent.name == "toy_experiment", "run folder is named after the config file"
    saved = (run_dir / "config.yaml").read_text()
    assert "batch_size: 4" in saved, "interpolation is resolved in the saved config"
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["stage"] == "fit" and "torch" in info
    metrics = (run_dir / "metrics.csv").read_text()
    assert "val/acc" in metrics and "train/acc" in metrics and "val/loss" in metrics
    wandb_dirs = list((tmp_path / "runs" / "toy_experiment" / "wandb").glob("offline-run-*"))
    assert wandb_dirs, "wandb ran offline with no network"
    assert float(lines["LR"]) == 0.01


def test_cli_print_config(tmp_path, capsys):
    config = _write_config(tmp_path)
    with pytest.raises(SystemExit):
        LungCLI(ToyTask, ToyData, args=["fit", "--config", str(config), "--print_config"])
    assert "ToyTask" in capsys.readouterr().out
