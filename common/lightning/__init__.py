"""Lightning layer shared by lungdet, lungseg and lungcls: base task, base datamodule, callbacks, loggers, CLI."""

from common.lightning.callbacks import RunConfigSaver, run_info
from common.lightning.loggers import EnvWandbLogger, default_loggers, wandb_mode
from common.lightning.task import BaseTask

__all__ = ["BaseTask", "EnvWandbLogger", "RunConfigSaver", "default_loggers", "run_info", "wandb_mode"]
