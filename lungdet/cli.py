"""`lungdet`: the CLAF detector's LightningCLI (fit / validate / test / predict).

Stage 1 and stage 2 are two tasks with their datamodules, picked by the config's ``class_path``::

    lungdet fit --config configs/claf_luna16.yaml                      # stage 1, LUNA16_ROOT
    lungdet fit --config configs/mppn_luna16.yaml                      # stage 2 (MPPN)
    lungdet test --config configs/claf_luna16.yaml --ckpt_path RUN/checkpoints/last.ckpt
    lungdet predict --config configs/mppn_luna16.yaml --ckpt_path MPPN.ckpt \\
        --model.init_args.stage1_checkpoint STAGE1.ckpt --data.init_args.predict_root SCANS/

Everything else (run folders, saved configs, loggers, seeding) comes from ``common.lightning.cli.LungCLI``.
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import ArgsType

from common.lightning.cli import LungCLI, run_main
from common.lightning.datamodule import CacheDataModule
from common.lightning.task import BaseTask

__all__ = ["main", "run_cli"]


def run_cli(args: ArgsType = None, run: bool = True) -> LungCLI:
    """Run `lungdet` with ``args`` (default ``sys.argv``) and return the CLI: its trainer, model, datamodule.

    Tests and ``lungdet.demo`` call this in-process to read checkpoints, run folders and splits afterwards.
    """
    import lungdet.data  # noqa: F401  (imports the task and datamodule classes the configs name)
    import lungdet.task  # noqa: F401

    return LungCLI(BaseTask, CacheDataModule, package="lungdet", args=args, run=run)


def main(args: ArgsType = None) -> int:
    """Entry point of the ``lungdet`` console script; user errors are one line and exit status 2."""
    return run_main("lungdet", run_cli, args)


if __name__ == "__main__":
    sys.exit(main())
