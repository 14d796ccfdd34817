"""The one LightningModule base every task in the toolkit derives from.

Subclasses build their parts in three hooks, called in order from `__init__`:

- `configure_models()`  — the networks (`self.model`, ...),
- `configure_losses()`  — loss modules (`self.criterion`, ...),
- `configure_metrics()` — one `MetricCollection` returned; the base clones it into `train_metrics`,
  `val_metrics` and `test_metrics` with `train/`, `val/`, `test/` prefixes so the three stages never share state.

Optimiser and schedule come from the constructor arguments (so YAML selects them), unless the user passes
LightningCLI's own `--optimizer` / `--lr_scheduler`, which replace `configure_optimizers` entirely.
"""

from __future__ import annotations

import abc
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torchmetrics import MetricCollection

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
SCHEDULERS = ("none", "cosine", "cosine_warm_restarts", "plateau", "step")


class BaseTask(LightningModule, abc.ABC):
    """Base task with configure_* hooks, per-stage metrics and config-driven optimisation.

    Args:
        optimizer: "adam", "adamw" or "sgd".
        lr: learning rate.
        weight_decay: weight decay.
        scheduler: "none", "cosine" (over `max_epochs`), "cosine_warm_restarts" (T_0 = `t0` epochs),
            "plateau" (on `monitor`) or "step" (`step_size`, `gamma`).
        t0: restart period in epochs for cosine_warm_restarts (GLANCE uses 20).
        step_size: epochs between decays for "step".
        gamma: decay factor for "step" and "plateau".
        monitor: metric the plateau scheduler and checkpoint callbacks watch.
        ignore: constructor arguments not to store in the hyperparameters (e.g. large objects).
    """

    monitor: str = "val/loss"
    monitor_mode: str = "min"

    def __init__(
        self,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        scheduler: str = "none",
        t0: int = 20,
        step_size: int = 30,
        gamma: float = 0.1,
        monitor: str | None = None,
        ignore: list[str] | None = None,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={optimizer!r}: choose one of {sorted(OPTIMIZERS)}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler={scheduler!r}: choose one of {SCHEDULERS}")
        self.save_hyperparameters(ignore=["ignore", *(ignore or [])])
        if monitor is not None:
            self.monitor = monitor
        self.configure_models()
        self.configure_losses()
        metrics = self.configure_metrics()
        metrics = metrics if metrics is not None else MetricCollection({})
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    @abc.abstractmethod
    def configure_models(self) -> None:
        """Build the networks."""

    def configure_losses(self) -> None:
        """Build loss modules (optional)."""

    def configure_metrics(self) -> MetricCollection | None:
        """Return the metric collection cloned into each stage (optional)."""
        return None

    def metrics_for(self, stage: str) -> MetricCollection:
        """The collection of a stage name ("train", "val"/"validate", "test")."""
        return {"train": self.train_metrics, "val": self.val_metrics, "validate": self.val_metrics}.get(
            stage, self.test_metrics
        )

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters the optimiser updates; frozen ones (requires_grad False) are left out."""
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = self.trainable_parameters()
        kwargs: dict[str, Any] = {"lr": hp.lr, "weight_decay": hp.weight_decay}
        if hp.optimizer == "sgd":
            kwargs["momentum"] = 0.9
        optimizer = OPTIMIZERS[hp.optimizer](params, **kwargs)
        if hp.scheduler == "none":
            return optimizer
        if hp.scheduler == "cosine":
            t_max = max(1, int(self.trainer.max_epochs or 1)) if self._trainer is not None else 1
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t_max)
        elif hp.scheduler == "cosine_warm_restarts":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=hp.t0)
        elif hp.scheduler == "step":
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=hp.step_size, gamma=hp.gamma)
        else:
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode=self.monitor_mode, factor=hp.gamma
            )
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": self.monitor}}
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
