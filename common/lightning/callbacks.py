"""Callbacks shared by the three packages."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback

from common import atomic


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parents[2],
            timeout=5,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_info() -> dict[str, Any]:
    """Versions and code revision of this run (no host names, user names or data paths)."""
    import lightning
    import torch

    return {
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "command": os.path.basename(sys.argv[0]),
        "argv": [a for a in sys.argv[1:] if not os.path.isabs(a)],
    }


class RunConfigSaver(SaveConfigCallback):
    """Writes the fully resolved config (`config.yaml`) and `run_info.json` into the run folder.

    The saved config is the one LightningCLI resolved after every file and override was applied, so
    `lungdet fit --config <run>/config.yaml` repeats the run exactly. Overwrites on resume (same folder).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["overwrite"] = True
        super().__init__(*args, **kwargs)
        self._run_dir: str | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # `trainer.log_dir` broadcasts under DDP, so every rank must ask for it; Lightning calls
        # `save_config` on rank 0 only, where asking again would leave the other ranks waiting forever.
        self._run_dir = None if self.already_saved else trainer.log_dir
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        log_dir = self._run_dir
        if log_dir is None:
            return
        atomic.write_json(Path(log_dir) / "run_info.json", {"stage": stage, **run_info()}, indent=2)
