"""Reading finished runs: their metrics, stage and checkpoints.

A run of any of the three package commands (`lungdet`, `lungseg`, `lungcls`, all `LungCLI`) writes
`<trainer.default_root_dir>/<run_name>/version_<n>/` with `metrics.csv` (Lightning's CSVLogger, always on),
`config.yaml` and `run_info.json` (whose `stage` says which sub-command made it), plus `checkpoints/` for
`fit`. `fit` and a later `test` of the same run name land in two versions of one folder, so a table reads
each metric from the newest version of the stage it asks for (`test/…` from the `test` version, never the
per-epoch `val/…` curve of the `fit` version when a `validate` was asked for).

A metrics file holds one row per logging step; the value a run reports for a key is its last non-empty
entry (what wandb calls the summary), or, on request, the best one for a goal (for sweeps).
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VERSION_PATTERN = re.compile(r"^version_(\d+)$")
CHECKPOINT_CHOICES = ("best", "last")


class RunError(ValueError):
    """A run folder or metrics file that cannot be read; the message names the file and the fix."""


def _as_float(text: Any) -> float | None:
    if text is None:
        return None
    if isinstance(text, bool):
        return float(text)
    if isinstance(text, int | float):
        return float(text)
    text = str(text).strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def read_metrics_csv(path: str | Path, goal: str = "last") -> dict[str, float]:
    """Every numeric column of a CSVLogger `metrics.csv` as one value per key.

    Args:
        path: the metrics file.
        goal: "last" — the last non-empty value (the run's summary); "maximize" / "minimize" — the best.

    Returns:
        key → value; a NaN entry gives way to any numeric one, and a key logged only as NaN reads NaN.
        `epoch` and `step` are left out.
    """
    path = Path(path)
    if goal not in ("last", "maximize", "minimize"):
        raise ValueError(f"goal={goal!r}: use last, maximize or minimize")
    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None:
                raise RunError(f"{path}: empty metrics file (no header); the run logged nothing — rerun it")
            values: dict[str, float] = {}
            logged_nan: set[str] = set()
            for row in reader:
                for key, text in row.items():
                    if key in (None, "epoch", "step"):
                        continue
                    value = _as_float(text)
                    if value is not None and math.isnan(value):
                        logged_nan.add(key)
                    if value is None or math.isnan(value):
                        continue
                    if goal == "last" or key not in values:
                        values[key] = value
                    elif goal == "maximize":
                        values[key] = max(values[key], value)
                    else:
                        values[key] = min(values[key], value)
    except OSError as err:
        raise RunError(f"{path}: cannot read metrics ({err})") from err
    except csv.Error as err:
        raise RunError(f"{path}: not a CSV metrics file ({err})") from err
    for key in logged_nan - set(values):
        values[key] = math.nan  # logged, but never a number (e.g. a recall over no nodules)
    return values


def read_metrics_json(path: str | Path) -> dict[str, float]:
    """Metrics from a JSON report.

    Two shapes are understood: a flat `{"test/acc": 0.8, ...}` mapping, and the lungcls report
    (`{"stage": "test", "metrics": {"acc": {"value": …, "std": …}, …}}`), whose keys become `test/acc` and
    `test/acc_std` as they are in `metrics.csv`.
    """
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise RunError(f"{path}: not a readable JSON metrics file ({err})") from err
    if not isinstance(document, Mapping):
        raise RunError(f"{path}: a JSON metrics file must hold an object, got {type(document).__name__}")
    out: dict[str, float] = {}
    nested = document.get("metrics")
    if isinstance(nested, Mapping):
        stage = str(document.get("stage") or "test")
        for key, entry in nested.items():
            if isinstance(entry, Mapping):
                value = _as_float(entry.get("value"))
                std = _as_float(entry.get("std"))
                if value is not None:
                    out[f"{stage}/{key}"] = value
                if std is not None:
                    out[f"{stage}/{key}_std"] = std
            elif (value := _as_float(entry)) is not None:
                out[f"{stage}/{key}"] = value
        return out
    for key, entry in document.items():
        value = _as_float(entry)
        if value is not None and not isinstance(entry, str):
            out[str(key)] = value
    return out


def read_metrics_file(path: str | Path) -> dict[str, float]:
    """`metrics.csv` (CSVLogger) or a JSON report, chosen by the file suffix."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: metrics file not found; point the table row at a finished run's metrics.csv")
    if path.suffix.lower() == ".json":
        return read_metrics_json(path)
    return read_metrics_csv(path)


OPERATING_FP_RATES = (0.55, 1.0)
OPERATING_SENSITIVITIES = (0.9,)


def froc_operating_points(path: str | Path) -> dict[str, float]:
    """Operating points read off the FROC curve of a report (`FROCResult.to_dict(include_curve=True)`).

    CLAF reports its system at an FP rate (90 % sensitivity at 0.55 FP/scan) and its ablation as "FPs/scan at
    90 % sensitivity", while GLANCE Table 3 scores precision / recall / F1 at an operating point. From the curve
    and the counts (nodules, scans) these follow exactly:

    - `fps@sens<s>`: the fewest FPs/scan at which sensitivity reaches s (absent when it never does);
    - at rate r in `OPERATING_FP_RATES`, taking the last curve point with FPs/scan ≤ r:
      `recall@<r>fps`, `precision@<r>fps` = TP / (TP + FP) with TP = recall × nodules and FP = FPs/scan × scans,
      `f1@<r>fps`, and `fp@<r>fps` = 100 × (1 − precision) (GLANCE Table 3's "FP" column).

    Returns:
        {} when the file has no curve or counts.
    """
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
        curve = document["curve"]
        fps = [float(v) for v in curve["fps_per_scan"]]
        sens = [float(v) for v in curve["sensitivity"]]
        counts = document.get("counts") or {}
        n_nodules = float(counts.get("nodules", 0))
        n_scans = float(counts.get("scans", 0))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return {}
    if not fps or len(fps) != len(sens):
        return {}
    out: dict[str, float] = {}
    for target in OPERATING_SENSITIVITIES:
        reached = [f for f, s in zip(fps, sens) if s >= target]
        if reached:
            out[f"fps@sens{target:g}"] = min(reached)
    for rate in OPERATING_FP_RATES:
        points = [(f, s) for f, s in zip(fps, sens) if f <= rate]
        if not points or n_nodules <= 0 or n_scans <= 0:
            continue
        f, s = points[-1]
        tp, fp = s * n_nodules, f * n_scans
        precision = tp / (tp + fp) if tp + fp > 0 else 0.0
        f1 = 2 * precision * s / (precision + s) if precision + s > 0 else 0.0
        out[f"recall@{rate:g}fps"] = s
        out[f"precision@{rate:g}fps"] = precision
        out[f"f1@{rate:g}fps"] = f1
        out[f"fp@{rate:g}fps"] = 100.0 * (1.0 - precision)
    return out


@dataclass(frozen=True)
class RunVersion:
    """One `version_<n>` folder of a run.

    Attributes:
        path: the folder.
        number: n.
        stage: the sub-command that wrote it (from run_info.json; None when the file is missing).
    """

    path: Path
    number: int
    stage: str | None

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.csv"

    def metrics(self, goal: str = "last") -> dict[str, float]:
        """The version's metrics (empty when it logged none), plus the operating points derived from a
        FROC report (`<stage>_froc.json`) written beside them."""
        values = read_metrics_csv(self.metrics_path, goal) if self.metrics_path.is_file() else {}
        for report in sorted(self.path.glob("*_froc.json")):
            stage = report.name[: -len("_froc.json")]
            for key, value in froc_operating_points(report).items():
                values.setdefault(f"{stage}/{key}", value)
        return values

    def checkpoints(self) -> list[Path]:
        folder = self.path / "checkpoints"
        return sorted(folder.glob("*.ckpt")) if folder.is_dir() else []


def _stage_of(folder: Path) -> str | None:
    info = folder / "run_info.json"
    if not info.is_file():
        return None
    try:
        stage = json.loads(info.read_text(encoding="utf-8")).get("stage")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return str(stage) if stage else None


def run_versions(run_dir: str | Path) -> list[RunVersion]:
    """The `version_<n>` folders of a run, newest (highest n) first; [] when the run does not exist."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for child in run_dir.iterdir():
        match = VERSION_PATTERN.match(child.name)
        if match and child.is_dir():
            found.append(RunVersion(child, int(match.group(1)), _stage_of(child)))
    return sorted(found, key=lambda v: v.number, reverse=True)


@dataclass
class RunMetrics:
    """What a table needs from one run: values per key and where they came from.

    Attributes:
        name: run name (folder under the runs directory) or the metrics file it was read from.
        values: metric key → value.
        sources: metric key → the file the value was read from.
    """

    name: str
    values: dict[str, float] = field(default_factory=dict)
    sources: dict[str, Path] = field(default_factory=dict)

    def get(self, key: str) -> float | None:
        return self.values.get(key)


def has_finished(run_dir: str | Path, stage: str) -> bool:
    """Whether a run has a version of `stage` — by its run_info.json, or, for a folder without one (copied
    from elsewhere), by having logged metrics. A crashed run whose version holds neither does not count."""
    for version in run_versions(run_dir):
        if version.stage == stage or (version.stage is None and version.metrics_path.is_file()):
            return True
    return False


def collect_run_metrics(
    runs_dir: str | Path, run_name: str, keys: Iterable[str], stage: str | None = None
) -> RunMetrics:
    """Each of `keys` from the newest version of `run_name` that logged it.

    Args:
        runs_dir: the folder that holds run folders (`trainer.default_root_dir`).
        run_name: the run's folder name.
        keys: metric keys wanted (e.g. "test/f1").
        stage: only versions written by this sub-command ("test", "validate", "fit"); versions without
            run_info.json are accepted too, so folders copied from elsewhere still read.

    Returns:
        The keys that were found (missing keys are simply absent).
    """
    result = RunMetrics(run_name)
    wanted = list(dict.fromkeys(keys))
    for version in run_versions(Path(runs_dir) / run_name):
        if stage is not None and version.stage not in (None, stage):
            continue
        if all(k in result.values for k in wanted):
            break
        values = version.metrics()
        for key in wanted:
            if key not in result.values and key in values:
                result.values[key] = values[key]
                result.sources[key] = version.metrics_path
    return result


def metrics_from_file(path: str | Path, keys: Iterable[str]) -> RunMetrics:
    """The keys found in one explicit metrics file (a table row's `metrics:` entry)."""
    path = Path(path)
    values = read_metrics_file(path)
    result = RunMetrics(str(path))
    for key in keys:
        if key in values:
            result.values[key] = values[key]
            result.sources[key] = path
    return result


def _best_from_last_checkpoint(last: Path) -> Path | None:
    """The ModelCheckpoint's `best_model_path` stored in `last.ckpt`, when it still exists."""
    import torch

    try:
        state = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 — any unreadable checkpoint means "no recorded best"
        return None
    for key, value in (state.get("callbacks") or {}).items():
        if "ModelCheckpoint" in str(key) and isinstance(value, Mapping):
            best = value.get("best_model_path")
            if best and Path(best).is_file():
                return Path(best)
    return None


def find_checkpoint(run_dir: str | Path, which: str = "best") -> Path | None:
    """The checkpoint a table or sweep evaluates, from the newest `fit` version of a run.

    "last" is `last.ckpt`. "best" is `best.ckpt` when the config names it so, else the single monitored
    checkpoint, else the `best_model_path` that ModelCheckpoint recorded in `last.ckpt`, else `last.ckpt`
    (a run without a monitored metric has nothing better).

    Returns:
        The path, or None when the run has no fit version with checkpoints.
    """
    if which not in CHECKPOINT_CHOICES:
        raise ValueError(f"checkpoint={which!r}: use one of {CHECKPOINT_CHOICES}")
    for version in run_versions(run_dir):
        if version.stage not in (None, "fit"):
            continue
        ckpts = version.checkpoints()
        if not ckpts:
            continue
        by_name = {p.name: p for p in ckpts}
        last = by_name.get("last.ckpt")
        if which == "last" and last is not None:
            return last
        if "best.ckpt" in by_name:
            return by_name["best.ckpt"]
        others = [p for p in ckpts if not p.name.startswith("last")]
        if len(others) == 1:
            return others[0]
        if last is not None:
            return _best_from_last_checkpoint(last) or last
        return max(others, key=lambda p: p.stat().st_mtime)
    return None


__all__ = [
    "CHECKPOINT_CHOICES",
    "RunError",
    "RunMetrics",
    "RunVersion",
    "collect_run_metrics",
    "find_checkpoint",
    "froc_operating_points",
    "has_finished",
    "metrics_from_file",
    "read_metrics_csv",
    "read_metrics_file",
    "read_metrics_json",
    "run_versions",
]
