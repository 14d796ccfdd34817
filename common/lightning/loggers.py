"""Experiment loggers: Weights & Biases driven by WANDB_MODE, always with a local CSV copy.

Lightning's `WandbLogger(offline=True)` silently overrides the WANDB_MODE environment variable, which breaks
sweeps on air-gapped hospital machines where the variable is the one switch people know. `EnvWandbLogger`
therefore takes its mode from WANDB_MODE (default "offline", so nothing ever needs a network) and refuses an
explicit `offline` argument. A `CSVLogger` always runs beside it: metrics.csv in the run folder is what
`lungdata table render --from-runs` reads, whether or not wandb is enabled.
"""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

WANDB_MODES = ("online", "offline", "disabled", "dryrun", "run", "shared")


def wandb_mode() -> str:
    """The wandb mode from WANDB_MODE; offline when unset so nothing needs a network."""
    mode = os.environ.get("WANDB_MODE", "offline").strip().lower() or "offline"
    if mode not in WANDB_MODES:
        raise ValueError(f"WANDB_MODE={mode!r} is not a wandb mode; use one of {', '.join(WANDB_MODES)}")
    return mode


class EnvWandbLogger(WandbLogger):
    """`WandbLogger` whose mode always comes from WANDB_MODE.

    Args:
        project: wandb project name.
        save_dir: folder for the local wandb files (the run folder by default).
        **kwargs: passed to `WandbLogger` / `wandb.init` (name, group, tags, entity, log_model, ...).
    """

    def __init__(self, project: str = "lungcad", save_dir: str = "runs", **kwargs: Any) -> None:
        if "offline" in kwargs or "mode" in kwargs:
            raise ValueError(
                "EnvWandbLogger takes its mode from the WANDB_MODE environment variable; remove `offline`/`mode` "
                "from the logger config and export WANDB_MODE=offline|online|disabled instead."
            )
        os.makedirs(save_dir, exist_ok=True)
        super().__init__(project=project, save_dir=save_dir, mode=wandb_mode(), **kwargs)


def default_loggers(save_dir: str, name: str, project: str = "lungcad") -> list[Logger]:
    """CSV always; wandb too unless WANDB_MODE=disabled. Both write under `save_dir/name`."""
    csv = CSVLogger(save_dir=save_dir, name=name)
    loggers: list[Logger] = [csv]
    if wandb_mode() != "disabled":
        loggers.append(EnvWandbLogger(project=project, save_dir=os.path.join(save_dir, name), name=name))
    return loggers
