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

from lightning.pytorch.cli import ArgsType

from common.lightning.cli import LungCLI
from common.lightning.datamodule import CacheDataModule
from common.lightning.task import BaseTask


def main(args: ArgsType = None, run: bool = True) -> LungCLI:
    """Run the `lungdet` command (``args`` instead of ``sys.argv`` for tests and the demo)."""
    import lungdet.data  # noqa: F401  (registers the datamodules for short class names)
    import lungdet.task  # noqa: F401

    return LungCLI(BaseTask, CacheDataModule, package="lungdet", args=args, run=run)


if __name__ == "__main__":
    main()
