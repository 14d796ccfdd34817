"""Project-wide test settings.

- One torch/BLAS thread per test process: `make test` runs pytest-xdist workers side by side, and on a
  2-core machine two workers × two threads each is several times slower than one thread each.
- No network: albumentations' update check is off and wandb runs disabled unless a test asks otherwise.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402  (after the thread variables, so BLAS reads them)

torch.set_num_threads(1)
