"""Experiments at scale: the paper-table registry, reading finished runs, and sweeps without a server.

- `common.experiments.tables` — `configs/tables/*.yaml`: rows = runs, columns = metrics, the papers' numbers
  beside ours (`lungdata table render`).
- `common.experiments.runs` — metrics, stage and checkpoints of finished `LungCLI` runs.
- `common.experiments.sweeps` — wandb sweep files (`configs/sweeps/*.yaml`) expanded and run locally
  (`lungdata sweep run`), the same files `wandb sweep` + `wandb agent` run against a W&B server.
- `common.experiments.launch` — package CLI runs in subprocesses, dataset-root checks before they start.
"""
