"""Name → adapter registry, and opening a dataset with its root from the environment.

One place answers "which class reads dataset X and where is it": `lungdata prepare`, the datamodules and the
table runner all call `open_dataset`. Adapters are imported lazily so naming one never imports the others.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from common.datasets.base import ScanDataset

DATASETS: dict[str, str] = {
    "luna16": "common.datasets.luna16:LUNA16Dataset",
    "lidc": "common.datasets.lidc:LIDCDataset",
    "lndb": "common.datasets.lndb:LNDbDataset",
    "tianchi": "common.datasets.tianchi:TianchiDataset",
    "ldfc": "common.datasets.ldfc:LDFCDataset",
    "spatiotemporal": "common.datasets.spatiotemporal:SpatioTemporalDataset",
    "folder": "common.datasets.folder:ScanFolderDataset",
}


def register_dataset(name: str, target: str) -> None:
    """Make NAME resolve to the adapter `target` ("package.module:ClassName")."""
    DATASETS[name] = target


def dataset_class(name: str) -> type[ScanDataset]:
    """Import the adapter registered under `name`."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    module_name, _, class_name = DATASETS[name].partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def resolve_root(name: str, root: str | Path | None) -> Path:
    """`root` if given, else the adapter's environment variable (LUNA16_ROOT, ...); a clear error if neither."""
    if root not in (None, ""):
        return Path(root)
    env_var = getattr(dataset_class(name), "env_var", None)
    value = os.environ.get(env_var) if env_var else None
    if not value:
        raise FileNotFoundError(
            f"no {name} root: set {env_var or 'the root'} (or pass root/--root) to your copy of the dataset; for "
            f"a synthetic stand-in run `lungdata synth {name} --out DIR` and point {env_var or 'root'} at DIR"
        )
    return Path(value)


def open_dataset(name: str, root: str | Path | None = None, **kwargs: Any) -> ScanDataset:
    """Instantiate the adapter for `name` on `root` (or its environment variable)."""
    return dataset_class(name)(resolve_root(name, root), **kwargs)
