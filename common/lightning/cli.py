"""`LungCLI`: the LightningCLI the three package commands (`lungdet`, `lungseg`, `lungcls`) share.

What it adds to LightningCLI:
- subclass mode for model and data, so a YAML names any task/datamodule by `class_path`;
- `omegaconf` parser mode, so configs may use `${...}` interpolation and `${oc.env:LUNA16_ROOT}`;
- the resolved config and run info written into the run folder (`RunConfigSaver`);
- when the config names no logger, CSV (always) plus wandb with its mode from WANDB_MODE, in
  `<trainer.default_root_dir>/<run_name>` — `run_name` defaults to the first config file's stem;
- seed 0 by default, so two identical commands train identical weights on CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from common.lightning.callbacks import RunConfigSaver
from common.lightning.loggers import default_loggers


class LungCLI(LightningCLI):
    """LightningCLI with the toolkit's defaults (see module docstring)."""

    def __init__(
        self,
        model_class: type[LightningModule] | None = None,
        datamodule_class: type[LightningDataModule] | None = None,
        *,
        package: str = "lungcad",
        args: ArgsType = None,
        **kwargs: Any,
    ) -> None:
        self.package = package
        parser_kwargs = kwargs.pop("parser_kwargs", {})
        parser_kwargs.setdefault("parser_mode", "omegaconf")
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_callback", RunConfigSaver)
        super().__init__(
            model_class,
            datamodule_class,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_kwargs=parser_kwargs,
            args=args,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run_name",
            type=str | None,
            default=None,
            help="run folder name under trainer.default_root_dir (default: the first --config file's stem)",
        )

    def _run_name(self) -> str:
        config = self.config.get(str(self.subcommand), self.config)
        if config.get("run_name"):
            return str(config["run_name"])
        files = config.get("config") or []
        for item in files:
            path = getattr(item, "relative", None) or getattr(item, "absolute", None) or item
            if path:
                return Path(str(path)).stem
        return self.package

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_config = self._get(self.config_init, "trainer", default={})
        logger = trainer_config.get("logger")
        if logger is None or logger is True:
            root = trainer_config.get("default_root_dir") or "runs"
            kwargs["logger"] = default_loggers(
                save_dir=str(root), name=self._run_name(), project=self.package
            )
        return super().instantiate_trainer(**kwargs)
