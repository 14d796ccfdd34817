"""The table registry: paper tables as YAML files, our runs beside the published numbers.

Each file in `configs/tables/` names one table of one paper::

    table: glance_table5                  # id (also the run-name prefix)
    title: GLANCE Table 5 — ablation on LUNA16 and Tianchi detection
    source: papers/000 (GLANCE), Table 5
    command: lungseg                      # CLI of every row (a row may name another)
    stages: [fit, test]                   # what a missing run executes; the last one is read
    checkpoint: best                      # the fit checkpoint the last stage evaluates: best | last
    scale: 100                            # our value × scale = the paper's unit (fractions → percent)
    digits: 1
    base: [configs/x.yaml]                # configs every run starts from (optional)
    parts:                                # settings a column's run uses (default: one part "default")
      luna16: {config: [configs/glance_luna16.yaml]}
      tianchi: {config: [configs/glance_tianchi.yaml]}
    folds: {values: [0, 1, 2], override: "--data.init_args.fold={fold}"}   # optional: mean ± std over folds
    columns:
      - {name: luna16_f1, label: LUNA16 F1, part: luna16, metric: test/f1}
    rows:
      - name: full
        label: Full GLANCE
        config: [configs/glance/full.yaml]        # layered after base and the part's configs
        overrides: ["--model.init_args.lr=1e-4"]  # LightningCLI overrides
        run: glance-full                          # run-name stem, shared by tables that run the same thing
        published: {luna16_f1: 93.2}
      - {name: nodulenet, label: NoduleNet, reference: true, published: {luna16_f1: 87.8}}

A run is `<command> <stage> --config … <overrides> --run_name <run> --trainer.default_root_dir <runs>` and its
name is `<run or table-row>[-<part>][-fold<k>]`. Rows marked `reference` are other authors' methods: only the
paper's numbers are shown. A part may be a `function: module:callable` instead of a run (deterministic
measurements such as parameter counts), named in the package that owns the model (e.g.
`lungcls.complexity:m3net_complexity`: `common` never imports the method packages); its result is stored
like a run so `--from-runs` reads it.
`include: other.yaml` takes every key from another file (e.g. a package's run table in `configs/m3net/`), this
file's keys winning. `paired_test: {column: c, reference: row}` adds a paired t-test over folds.

Nothing is invented: a row without a finished run shows "not run", a run that did not log a metric shows
"not logged", and a value the paper does not give shows "—".
"""

from __future__ import annotations

import csv
import importlib
import json
import math
import os
import re
import shlex
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from common.atomic import atomic_path, csv_text, write_text
from common.experiments.launch import (
    PACKAGE_COMMANDS,
    check_dataset_roots,
    dataset_roots,
    launch,
    merged_config,
    package_command,
    read_yaml_mapping,
    repo_root,
    resolve_path,
)
from common.experiments.runs import (
    CHECKPOINT_CHOICES,
    RunMetrics,
    collect_run_metrics,
    find_checkpoint,
    has_finished,
    metrics_from_file,
    run_versions,
)

TABLES_DIR = Path("configs") / "tables"
STAGES = ("fit", "validate", "test")
COMPUTE_STAGE = "compute"
DEFAULT_PART = "default"

TABLE_KEYS = {
    "table", "title", "source", "notes", "command", "stages", "checkpoint", "scale", "digits", "base",
    "parts", "columns", "rows", "folds", "paired_test", "include", "prerequisites",
}  # fmt: skip
ROW_KEYS = {
    "name", "label", "reference", "command", "config", "overrides", "run", "metrics", "parts", "published",
    "published_std", "note", "metric_keys",
}  # fmt: skip
PART_KEYS = {"config", "overrides", "function", "args", "label"}
COLUMN_KEYS = {"name", "label", "metric", "part", "scale", "digits", "std"}
PREREQUISITE_KEYS = {"name", "command", "config", "overrides", "produces", "rows", "per_fold", "stage"}
PLACEHOLDER = re.compile(r"\{(runs|ckpt:[^{}]+)\}")

NOT_RUN = "not run"
NOT_LOGGED = "not logged"
NO_VALUE = "—"


class TableError(ValueError):
    """A table file that does not follow the schema; the message names the file, the row and the fix."""


# ------------------------------------------------------------------------------------------------- schema
@dataclass(frozen=True)
class PartSpec:
    """How the runs of one column group are made: configs + overrides, or a measuring function."""

    name: str
    config: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()
    function: str | None = None
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ColumnSpec:
    """One metric column: where our value comes from and how it is shown.

    Attributes:
        name: key of the column in `published` and in the CSV.
        label: header text.
        metric: our metric key (e.g. "test/f1"); None for a column only the paper reports.
        part: the part whose run logs `metric`.
        scale: our value × scale is printed (fractions → percent: 100).
        digits: decimals printed.
        std: metric key of the run's own uncertainty (e.g. bootstrap "test/acc_std"), shown as ± when the
            table has no folds.
    """

    name: str
    label: str
    metric: str | None
    part: str
    scale: float
    digits: int
    std: str | None = None


@dataclass(frozen=True)
class RowSpec:
    """One row: our run settings (or `reference`, a published-only method) and the paper's values."""

    name: str
    label: str
    reference: bool
    command: str | None
    config: tuple[str, ...]
    overrides: tuple[str, ...]
    run: str | Mapping[str, str] | None
    metrics: Mapping[str, str]
    parts: Mapping[str, PartSpec | None]
    published: Mapping[str, float | None]
    published_std: Mapping[str, float | None]
    note: str | None = None
    metric_keys: Mapping[str, str] = field(default_factory=dict)

    def metric_key(self, column: ColumnSpec) -> str | None:
        """The metric this row reads for a column: the column's, unless the row maps it to another key
        (a different command may log the same quantity under another name)."""
        if not column.metric:
            return None
        return self.metric_keys.get(column.name, column.metric)


@dataclass(frozen=True)
class FoldSpec:
    """Cross-validation: one run per fold, the cell shows mean ± std over folds."""

    values: tuple[Any, ...]
    override: str

    def argument(self, fold: Any) -> str:
        return self.override.replace("{fold}", str(fold))


@dataclass(frozen=True)
class Prerequisite:
    """A run the table's rows depend on: M³Net stage 1 before stage 2, CLAF stage 1 (and its candidates, by
    `predict`) before the MPPN.

    It runs when its output is missing: the file `produces` when given (a checkpoint or candidate CSV the
    rows load by path; `{runs}` is the runs folder), else a fit checkpoint in its run folder. `stage` is
    `fit` or `predict`; overrides may hold `{ckpt:RUN}`. With `per_fold` there is one run per table fold:
    `{fold}` is filled in everywhere and the table's fold override is appended.
    """

    name: str
    command: str
    config: tuple[str, ...]
    overrides: tuple[str, ...]
    produces: str | None = None
    rows: tuple[str, ...] = ()
    per_fold: bool = False
    stage: str = "fit"

    def needed_by(self, row: str) -> bool:
        """Whether a row's runs load this prerequisite's output (all rows when `rows` is not given)."""
        return not self.rows or row in self.rows

    def for_fold(self, fold: Any, folds: FoldSpec | None = None) -> Prerequisite:
        """This prerequisite for one fold: `{fold}` filled in and the table's fold override appended."""
        if fold is None:
            return self

        def fill(text: str) -> str:
            return text.replace("{fold}", str(fold))

        return Prerequisite(
            fill(self.name),
            self.command,
            self.config,
            tuple(fill(o) for o in self.overrides) + ((folds.argument(fold),) if folds else ()),
            fill(self.produces) if self.produces else None,
            self.rows,
            False,
            self.stage,
        )

    def output(self, runs_dir: str | Path) -> Path | None:
        return resolve_path(fill_placeholders(self.produces, runs_dir)) if self.produces else None

    def done(self, runs_dir: str | Path) -> bool:
        output = self.output(runs_dir)
        if output is not None:
            return output.exists()
        return find_checkpoint(Path(runs_dir) / self.name) is not None

    def argv(
        self,
        runs_dir: str | Path,
        extra_configs: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        strict: bool = True,
    ) -> list[str]:
        argv = [*package_command(self.command), self.stage]
        for config in (*self.config, *configs_for(self.command, extra_configs, self.config)):
            argv += ["--config", str(resolve_path(config))]
        overrides = [fill_placeholders(o, runs_dir, None, strict) for o in (*self.overrides, *extra_args)]
        return [*argv, *overrides, f"--run_name={self.name}", f"--trainer.default_root_dir={runs_dir}"]


def configs_for(command: str, extra_configs: Sequence[str], run_configs: Sequence[str] = ()) -> list[str]:
    """The extra configs that apply to one run.

    A plain path applies to every run. `PREFIX:FILE` applies only where PREFIX is the run's command
    (`lungseg:small.yaml`) or the stem of one of the run's configs (`mppn_luna16:small_mppn.yaml`): a table
    such as GLANCE Table 3 mixes commands and tasks whose settings differ.
    """
    stems = {Path(c).stem for c in run_configs}
    out = []
    for entry in extra_configs:
        prefix, sep, path = str(entry).partition(":")
        if sep and prefix and "/" not in prefix and not Path(str(entry)).exists():
            if prefix == command or prefix in stems:
                out.append(path)
        else:
            out.append(str(entry))
    return out


def fill_placeholders(text: str, runs_dir: str | Path, fold: Any = None, strict: bool = True) -> str:
    """Replace `{fold}`, `{runs}` and `{ckpt:RUN}` (the best checkpoint of run RUN under the runs folder)
    in an override; other braces (YAML flow mappings such as `{name: resnet3d18}`) are left alone."""

    if fold is not None:
        text = text.replace("{fold}", str(fold))

    def replace(match: re.Match[str]) -> str:
        key = match.group(1)
        if key == "runs":
            return str(runs_dir)
        run = key.partition(":")[2]
        ckpt = find_checkpoint(Path(runs_dir) / run, "best")
        if ckpt is None:
            if strict:
                raise RuntimeError(f"`{{{key}}}`: run {run} has no checkpoint under {runs_dir}; fit it first")
            return f"<best checkpoint of {run}>"
        return str(ckpt)

    return PLACEHOLDER.sub(replace, text)


@dataclass(frozen=True)
class RunPlan:
    """One run a table needs (a row × part × fold)."""

    table: str
    row: str
    part: str
    fold: Any
    run_name: str
    command: str
    stages: tuple[str, ...]
    checkpoint: str
    configs: tuple[str, ...]
    overrides: tuple[str, ...]
    function: str | None = None
    args: Mapping[str, Any] = field(default_factory=dict)
    metrics_file: str | None = None

    @property
    def eval_stage(self) -> str:
        return COMPUTE_STAGE if self.function else self.stages[-1]

    def argv(
        self,
        stage: str,
        runs_dir: str | Path,
        extra_configs: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        ckpt_path: str | Path | None = None,
        strict: bool = True,
    ) -> list[str]:
        """The command line of one stage of this run (`strict` False: unknown checkpoints as placeholders)."""
        argv = [*package_command(self.command), stage]
        for config in (*self.configs, *configs_for(self.command, extra_configs, self.configs)):
            argv += ["--config", str(resolve_path(config))]
        overrides = [
            fill_placeholders(o, runs_dir, self.fold, strict) for o in (*self.overrides, *extra_args)
        ]
        argv += [*overrides, f"--run_name={self.run_name}", f"--trainer.default_root_dir={runs_dir}"]
        if ckpt_path is not None:
            argv.append(f"--ckpt_path={ckpt_path}")
        return argv


@dataclass(frozen=True)
class TableSpec:
    """A parsed table file (see the module docstring for the YAML schema)."""

    name: str
    title: str
    source: str
    notes: str | None
    command: str | None
    stages: tuple[str, ...]
    checkpoint: str
    base: tuple[str, ...]
    parts: Mapping[str, PartSpec]
    columns: tuple[ColumnSpec, ...]
    rows: tuple[RowSpec, ...]
    folds: FoldSpec | None
    paired_test: Mapping[str, str] | None
    prerequisites: tuple[Prerequisite, ...] = ()
    path: Path | None = None

    def row(self, name: str) -> RowSpec:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"table {self.name} has no row {name!r}; rows: {', '.join(r.name for r in self.rows)}")

    def needed_parts(self) -> list[str]:
        """Parts some column reads a metric from, in column order."""
        return list(dict.fromkeys(c.part for c in self.columns if c.metric))

    def run_name(self, row: RowSpec, part: str, fold: Any = None) -> str:
        if isinstance(row.run, Mapping) and part in row.run:
            name = str(row.run[part])
        else:
            stem = row.run if isinstance(row.run, str) else f"{self.name}-{row.name}"
            name = stem if list(self.parts) == [DEFAULT_PART] else f"{stem}-{part}"
        return name if fold is None else f"{name}-fold{fold}"

    def plans(self, row: RowSpec) -> list[RunPlan]:
        """The runs behind a row (none for a reference row)."""
        if row.reference:
            return []
        plans = []
        for part_name in self.needed_parts():
            part = row.parts[part_name] if part_name in row.parts else self.parts[part_name]
            if part is None:
                continue
            command = row.command or self.command
            folds: Iterable[Any] = (None,) if self.folds is None or part.function else self.folds.values
            for fold in folds:
                overrides = [*part.overrides, *row.overrides]
                if fold is not None and self.folds is not None:
                    overrides.append(self.folds.argument(fold))
                plans.append(
                    RunPlan(
                        table=self.name,
                        row=row.name,
                        part=part_name,
                        fold=fold,
                        run_name=self.run_name(row, part_name, fold),
                        command=str(command),
                        stages=self.stages,
                        checkpoint=self.checkpoint,
                        configs=(*self.base, *part.config, *row.config),
                        overrides=tuple(overrides),
                        function=part.function,
                        args=dict(part.args),
                        metrics_file=row.metrics.get(part_name),
                    )
                )
        return plans


def _strings(value: Any, where: str, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise TableError(f"{where}: `{key}` must be a string or a list of strings, got {value!r}")


def _unknown(data: Mapping[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(data) - allowed)
    if extra:
        raise TableError(f"{where}: unknown key(s) {extra}; allowed: {sorted(allowed)}")


def _number_map(value: Any, where: str, key: str, columns: set[str]) -> dict[str, float | None]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TableError(f"{where}: `{key}` must map column names to numbers")
    out: dict[str, float | None] = {}
    for name, number in value.items():
        if name not in columns:
            raise TableError(f"{where}: `{key}` names column {name!r}, which the table does not define")
        if number is not None and (isinstance(number, bool) or not isinstance(number, int | float)):
            raise TableError(f"{where}: `{key}.{name}` must be a number or null, got {number!r}")
        out[str(name)] = None if number is None else float(number)
    return out


def _part(name: str, data: Any, where: str) -> PartSpec:
    if not isinstance(data, Mapping):
        raise TableError(f"{where}: part {name!r} must be a mapping with config/overrides or function")
    _unknown(data, PART_KEYS, f"{where}, part {name!r}")
    function = data.get("function")
    if function is not None and (not isinstance(function, str) or ":" not in function):
        raise TableError(f"{where}, part {name!r}: `function` must read 'package.module:callable'")
    args = data.get("args") or {}
    if not isinstance(args, Mapping):
        raise TableError(f"{where}, part {name!r}: `args` must be a mapping")
    return PartSpec(
        name=name,
        config=_strings(data.get("config"), f"{where}, part {name!r}", "config"),
        overrides=_strings(data.get("overrides"), f"{where}, part {name!r}", "overrides"),
        function=function,
        args=dict(args),
    )


def _columns(
    data: Any, where: str, parts: Mapping[str, PartSpec], scale: float, digits: int
) -> list[ColumnSpec]:
    if isinstance(data, Mapping):  # the compact form of the packages' run tables: name → metric key
        items = [
            {"name": k, "metric": v} if isinstance(v, str) else {"name": k, **(v or {})}
            for k, v in data.items()
        ]
    elif isinstance(data, list):
        items = data
    else:
        raise TableError(f"{where}: `columns` must be a list of column mappings (or name → metric key)")
    default_part = next(iter(parts))
    columns = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping) or not item.get("name"):
            raise TableError(f"{where}: column {i + 1} needs at least a `name`")
        _unknown(item, COLUMN_KEYS, f"{where}, column {item['name']!r}")
        part = str(item.get("part", default_part))
        if part not in parts:
            raise TableError(f"{where}, column {item['name']!r}: part {part!r} is not one of {sorted(parts)}")
        columns.append(
            ColumnSpec(
                name=str(item["name"]),
                label=str(item.get("label", item["name"])),
                metric=item.get("metric"),
                part=part,
                scale=float(item.get("scale", scale)),
                digits=int(item.get("digits", digits)),
                std=item.get("std"),
            )
        )
    names = [c.name for c in columns]
    if len(set(names)) != len(names):
        raise TableError(f"{where}: column names must be unique, got {names}")
    return columns


def _metric_keys(value: Any, where: str, columns: set[str]) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(v, str) for v in value.values()):
        raise TableError(f"{where}: `metric_keys` must map column names to metric keys")
    unknown = sorted(set(value) - columns)
    if unknown:
        raise TableError(f"{where}: `metric_keys` names unknown column(s) {unknown}")
    return {str(k): str(v) for k, v in value.items()}


def _row(
    data: Any, index: int, where: str, columns: set[str], parts: Mapping[str, PartSpec], command: str | None
) -> RowSpec:
    if not isinstance(data, Mapping) or not data.get("name"):
        raise TableError(f"{where}: row {index + 1} needs a `name`")
    name = str(data["name"])
    here = f"{where}, row {name!r}"
    _unknown(data, ROW_KEYS, here)
    reference = bool(data.get("reference", False))
    if reference and any(k in data for k in ("config", "overrides", "run", "metrics", "parts", "command")):
        raise TableError(f"{here}: a reference (published-only) row cannot have run settings")
    row_command = data.get("command", command)
    if not reference and row_command not in PACKAGE_COMMANDS:
        raise TableError(
            f"{here}: `command` must be one of {PACKAGE_COMMANDS} (set it on the table or the row)"
        )
    metrics = data.get("metrics") or {}
    if isinstance(metrics, str):
        metrics = {next(iter(parts)): metrics}
    if not isinstance(metrics, Mapping) or any(p not in parts for p in metrics):
        raise TableError(f"{here}: `metrics` must be a file path or a mapping part → file ({sorted(parts)})")
    row_parts: dict[str, PartSpec | None] = {}
    for part_name, part_data in (data.get("parts") or {}).items():
        if part_name not in parts:
            raise TableError(f"{here}: part {part_name!r} is not one of the table's parts {sorted(parts)}")
        row_parts[part_name] = None if part_data is None else _part(part_name, part_data, here)
    run = data.get("run")
    if run is not None and not isinstance(run, str | Mapping):
        raise TableError(f"{here}: `run` must be a run name or a mapping part → run name")
    return RowSpec(
        name=name,
        label=str(data.get("label", name)),
        reference=reference,
        command=None if reference else str(row_command),
        config=_strings(data.get("config"), here, "config"),
        overrides=_strings(data.get("overrides"), here, "overrides"),
        run=run,
        metrics={str(k): str(v) for k, v in metrics.items()},
        parts=row_parts,
        published=_number_map(data.get("published"), here, "published", columns),
        published_std=_number_map(data.get("published_std"), here, "published_std", columns),
        note=data.get("note"),
        metric_keys=_metric_keys(data.get("metric_keys"), here, columns),
    )


def _load_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path in seen:
        raise TableError(f"{path}: include cycle through {' → '.join(str(p) for p in seen)}")
    data = read_yaml_mapping(path, TableError, "table file")
    include = data.pop("include", None)
    if include is None:
        return data
    included_path = resolve_path(include, path.parent)
    if not included_path.is_file():
        raise TableError(f"{path}: include {include!r} does not exist")
    return {**_load_yaml(included_path, (*seen, path)), **data}


def parse_table(data: Mapping[str, Any], path: Path | None = None) -> TableSpec:
    """Validate a table mapping and build its `TableSpec`."""
    where = str(path) if path else "table"
    _unknown(data, TABLE_KEYS, where)
    name = data.get("table") or (path.stem if path else None)
    if not name:
        raise TableError(f"{where}: give the table an id with `table: NAME`")
    stages = _strings(data.get("stages") or ["fit", "test"], where, "stages")
    if (
        any(s not in STAGES for s in stages)
        or stages[-1] == "fit"
        or list(stages) != sorted(stages, key=STAGES.index)
    ):
        raise TableError(
            f"{where}: `stages` must be an ordered subset of {STAGES} ending in validate or test"
        )
    checkpoint = str(data.get("checkpoint", "best"))
    if checkpoint not in CHECKPOINT_CHOICES:
        raise TableError(f"{where}: `checkpoint` must be one of {CHECKPOINT_CHOICES}")
    command = data.get("command")
    if command is not None and command not in PACKAGE_COMMANDS:
        raise TableError(f"{where}: `command` must be one of {PACKAGE_COMMANDS}, got {command!r}")
    raw_parts = data.get("parts") or {DEFAULT_PART: {}}
    if not isinstance(raw_parts, Mapping):
        raise TableError(f"{where}: `parts` must map part names to settings")
    parts = {str(k): _part(str(k), v or {}, where) for k, v in raw_parts.items()}
    scale = float(data.get("scale", 1.0))
    digits = int(data.get("digits", 2))
    columns = _columns(data.get("columns"), where, parts, scale, digits)
    names = {c.name for c in columns}
    rows_data = data.get("rows")
    if not isinstance(rows_data, list) or not rows_data:
        raise TableError(f"{where}: `rows` must be a non-empty list")
    rows = [_row(r, i, where, names, parts, command) for i, r in enumerate(rows_data)]
    row_names = [r.name for r in rows]
    if len(set(row_names)) != len(row_names):
        raise TableError(f"{where}: row names must be unique, got duplicates in {row_names}")
    folds = None
    if data.get("folds") is not None:
        raw = data["folds"]
        if (
            not isinstance(raw, Mapping)
            or not raw.get("values")
            or "{fold}" not in str(raw.get("override", ""))
        ):
            raise TableError(f"{where}: `folds` needs `values` and an `override` containing {{fold}}")
        folds = FoldSpec(tuple(raw["values"]), str(raw["override"]))
    paired = data.get("paired_test")
    if paired is not None:
        if (
            not isinstance(paired, Mapping)
            or paired.get("column") not in names
            or paired.get("reference") not in row_names
        ):
            raise TableError(
                f"{where}: `paired_test` needs `column` (a column name) and `reference` (a row name)"
            )
        if folds is None:
            raise TableError(f"{where}: `paired_test` compares folds; the table needs `folds`")
    prerequisites = []
    for i, item in enumerate(data.get("prerequisites") or []):
        here = f"{where}, prerequisite {i + 1}"
        if not isinstance(item, Mapping) or not item.get("name"):
            raise TableError(f"{here}: needs `name`, `command` and `config` (and optionally `produces`)")
        _unknown(item, PREREQUISITE_KEYS, here)
        if item.get("command") not in PACKAGE_COMMANDS:
            raise TableError(f"{here}: `command` must be one of {PACKAGE_COMMANDS}")
        per_fold = bool(item.get("per_fold", False))
        if per_fold and folds is None:
            raise TableError(f"{here}: `per_fold` needs the table's `folds`")
        if per_fold and "{fold}" not in str(item["name"]):
            raise TableError(f"{here}: a per-fold prerequisite needs {{fold}} in its `name`")
        stage = str(item.get("stage", "fit"))
        if stage not in ("fit", "predict"):
            raise TableError(f"{here}: `stage` must be fit or predict, got {stage!r}")
        if stage == "predict" and not item.get("produces"):
            raise TableError(f"{here}: a predict prerequisite needs `produces` (the file it writes)")
        prerequisites.append(
            Prerequisite(
                str(item["name"]),
                str(item["command"]),
                _strings(item.get("config"), here, "config"),
                _strings(item.get("overrides"), here, "overrides"),
                str(item["produces"]) if item.get("produces") else None,
                _strings(item.get("rows"), here, "rows"),
                per_fold,
                stage,
            )
        )
        unknown_rows = sorted(set(prerequisites[-1].rows) - set(row_names))
        if unknown_rows:
            raise TableError(f"{here}: `rows` names unknown row(s) {unknown_rows}")
    spec = TableSpec(
        name=str(name),
        title=str(data.get("title", name)),
        source=str(data.get("source", "")),
        notes=data.get("notes"),
        command=command,
        stages=stages,
        checkpoint=checkpoint,
        base=_strings(data.get("base"), where, "base"),
        parts=parts,
        columns=tuple(columns),
        rows=tuple(rows),
        folds=folds,
        paired_test=dict(paired) if paired else None,
        prerequisites=tuple(prerequisites),
        path=path,
    )
    return spec


def tables_dir() -> Path:
    """`configs/tables` of the working directory when it has one, else of the repository."""
    return resolve_path(TABLES_DIR)


def table_path(name_or_path: str | Path) -> Path:
    """A table file from its name (`glance_table3`) or its path."""
    text = str(name_or_path)
    candidate = Path(text)
    if candidate.suffix in (".yaml", ".yml") or os.sep in text:
        resolved = resolve_path(candidate)
        if not resolved.is_file():
            raise FileNotFoundError(f"table file {text} does not exist")
        return resolved
    path = tables_dir() / f"{text}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in tables_dir().glob("*.yaml")))
        raise FileNotFoundError(f"no table {text!r} in {tables_dir()}; registered: {known}")
    return path


def load_table(name_or_path: str | Path) -> TableSpec:
    """Load and validate a registered table (by name) or a table file (by path)."""
    path = table_path(name_or_path)
    return parse_table(_load_yaml(path), path)


def list_tables(folder: str | Path | None = None) -> list[TableSpec]:
    """Every table of the registry (`configs/tables/*.yaml`), by file name."""
    folder = Path(folder) if folder is not None else tables_dir()
    return [load_table(p) for p in sorted(folder.glob("*.yaml"))]


# ----------------------------------------------------------------------------------------------- results
@dataclass
class Cell:
    """Our values (one per fold, or one) and the paper's for one row × column."""

    values: list[float]
    expected: int
    runs_present: int
    std: float | None
    paper: float | None
    paper_std: float | None
    nan_runs: int = 0

    @property
    def mean(self) -> float | None:
        return sum(self.values) / len(self.values) if self.values else None

    @property
    def spread(self) -> float | None:
        """Std over folds (ddof 1) when there are several, else the run's own reported std."""
        if len(self.values) > 1:
            m = self.mean or 0.0
            return math.sqrt(sum((v - m) ** 2 for v in self.values) / (len(self.values) - 1))
        return self.std


@dataclass
class RowResult:
    """One rendered row."""

    row: RowSpec
    status: str
    cells: dict[str, Cell]
    runs: list[str]
    fold_values: dict[str, dict[Any, float]] = field(default_factory=dict)
    p_value: float | None = None


@dataclass
class TableResult:
    """A table with our numbers collected from a runs folder."""

    spec: TableSpec
    rows: list[RowResult]
    runs_dir: Path


def _run_metrics(plan: RunPlan, runs_dir: Path, keys: list[str]) -> tuple[RunMetrics, bool]:
    """(metrics, whether the run exists) of one planned run."""
    if plan.metrics_file:
        path = resolve_path(plan.metrics_file)
        return metrics_from_file(path, keys), True
    metrics = collect_run_metrics(runs_dir, plan.run_name, keys, stage=plan.eval_stage)
    exists = has_finished(runs_dir / plan.run_name, plan.eval_stage)
    return metrics, exists


def collect(spec: TableSpec, runs_dir: str | Path) -> TableResult:
    """Our numbers for every row of `spec` from the runs under `runs_dir` (nothing is run)."""
    runs_dir = Path(runs_dir)
    results = []
    for row in spec.rows:
        cells: dict[str, Cell] = {}
        plans = spec.plans(row)
        fetched: dict[tuple[str, Any], tuple[RunMetrics, bool]] = {}
        for plan in plans:
            keys = [k for c in spec.columns if c.part == plan.part for k in (row.metric_key(c), c.std) if k]
            fetched[(plan.part, plan.fold)] = _run_metrics(plan, runs_dir, keys)
        fold_values: dict[str, dict[Any, float]] = {}
        for column in spec.columns:
            mine = [p for p in plans if p.part == column.part] if column.metric else []
            values, present, std, nans = [], 0, None, 0
            per_fold: dict[Any, float] = {}
            for plan in mine:
                metrics, exists = fetched[(plan.part, plan.fold)]
                present += int(exists)
                key = row.metric_key(column)
                value = metrics.get(key) if key else None
                nans += int(value is not None and math.isnan(value))
                if value is not None and not math.isnan(value):
                    values.append(value * column.scale)
                    per_fold[plan.fold] = value * column.scale
                    if column.std and len(mine) == 1 and metrics.get(column.std) is not None:
                        std = metrics.get(column.std) * column.scale
            fold_values[column.name] = per_fold
            cells[column.name] = Cell(
                values,
                len(mine),
                present,
                std,
                row.published.get(column.name),
                row.published_std.get(column.name),
                nans,
            )
        if row.reference:
            status = "published only"
        else:
            total_present = sum(int(exists) for _, exists in fetched.values())
            complete = all(len(c.values) == c.expected for c in cells.values() if c.expected)
            status = NOT_RUN if total_present == 0 else ("done" if complete else "partial")
        results.append(RowResult(row, status, cells, [p.run_name for p in plans], fold_values))
    result = TableResult(spec, results, runs_dir)
    _paired_tests(result)
    return result


def _paired_tests(result: TableResult) -> None:
    test = result.spec.paired_test
    if not test:
        return
    from scipy.stats import ttest_rel

    column, reference = test["column"], test["reference"]
    ref = next(r for r in result.rows if r.row.name == reference)
    for row in result.rows:
        if row is ref or row.row.reference:
            continue
        mine, theirs = row.fold_values.get(column, {}), ref.fold_values.get(column, {})
        folds = sorted(set(mine) & set(theirs), key=str)
        if len(folds) >= 2:
            a, b = [mine[f] for f in folds], [theirs[f] for f in folds]
            p = float(ttest_rel(a, b).pvalue) if any(x != y for x, y in zip(a, b)) else 1.0
            row.p_value = p


# -------------------------------------------------------------------------------------------- rendering
def _fmt(value: float | None, digits: int) -> str:
    return NO_VALUE if value is None else f"{value:.{digits}f}"


def format_ours(cell: Cell, column: ColumnSpec, reference: bool) -> str:
    """Our side of a cell: the value (± spread, k/n folds when partial), "not run", "not logged", or "nan"
    when the run logged NaN (e.g. a recall over a test set without nodules)."""
    if reference or not column.metric or cell.expected == 0:
        return NO_VALUE
    if not cell.values:
        if cell.nan_runs:
            return "nan"
        return NOT_RUN if cell.runs_present == 0 else NOT_LOGGED
    text = _fmt(cell.mean, column.digits)
    spread = cell.spread
    if spread is not None:
        text += f" ± {_fmt(spread, column.digits)}"
    if cell.expected > 1 and len(cell.values) < cell.expected:
        text += f" ({len(cell.values)}/{cell.expected} folds)"
    return text


def format_paper(cell: Cell, column: ColumnSpec) -> str:
    text = _fmt(
        cell.paper, column.digits if cell.paper is None else max(column.digits, _decimals(cell.paper))
    )
    if cell.paper is not None and cell.paper_std is not None:
        text += f" ± {_fmt(cell.paper_std, max(column.digits, _decimals(cell.paper_std)))}"
    return text


def _decimals(value: float) -> int:
    """Decimals needed to print a transcribed number exactly as the paper does (0.878 → 3)."""
    text = repr(float(value))
    return 0 if text.endswith(".0") else len(text.split(".")[1]) if "." in text else 0


def render_markdown(result: TableResult) -> str:
    """The table as markdown, each cell `ours / paper`."""
    spec = result.spec
    lines = [f"### {spec.title}", ""]
    if spec.source:
        lines.append(f"Source: {spec.source}.")
    lines.append(
        f"Cells: ours / paper. Ours from runs under `{result.runs_dir}`; “{NOT_RUN}”: no finished run; "
        f"“{NOT_LOGGED}”: the run did not log the metric; “{NO_VALUE}”: no value (published-only row, or the "
        "paper gives none)."
    )
    lines.append("")
    header = ["Row", "Status", *[c.label for c in spec.columns]]
    if spec.paired_test:
        ref = spec.row(spec.paired_test["reference"]).label
        col = next(c.label for c in spec.columns if c.name == spec.paired_test["column"])
        header.append(f"p ({col} vs {ref}, paired t over folds)")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in result.rows:
        cells = [
            f"{format_ours(row.cells[c.name], c, row.row.reference)} / {format_paper(row.cells[c.name], c)}"
            for c in spec.columns
        ]
        line = [row.row.label.replace("|", "\\|"), row.status, *cells]
        if spec.paired_test:
            line.append(NO_VALUE if row.p_value is None else f"{row.p_value:.3g}")
        lines.append("| " + " | ".join(line) + " |")
    notes = [f"{r.row.label}: {r.row.note}" for r in result.rows if r.row.note]
    if spec.notes:
        notes.insert(0, str(spec.notes).strip())
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def render_csv(result: TableResult) -> str:
    """The table as CSV: per column our mean, spread, number of runs, and the paper's value and std."""
    spec = result.spec
    header = ["table", "row", "label", "status"]
    for c in spec.columns:
        header += [c.name, f"{c.name}_std", f"{c.name}_n", f"{c.name}_paper", f"{c.name}_paper_std"]
    header += ["p_value", "runs"]

    def num(value: float | None) -> str:
        return "" if value is None else repr(float(value))

    def line(row: RowResult) -> list[str]:
        cells = [spec.name, row.row.name, row.row.label, row.status]
        for c in spec.columns:
            cell = row.cells[c.name]
            cells += [
                num(cell.mean),
                num(cell.spread),
                str(len(cell.values)),
                num(cell.paper),
                num(cell.paper_std),
            ]
        return cells + [num(row.p_value), ";".join(row.runs)]

    return csv_text(header, (line(row) for row in result.rows))


def write_outputs(result: TableResult, out_dir: str | Path) -> tuple[Path, Path]:
    """Write `<table>.md` and `<table>.csv` into `out_dir` (atomically); return their paths."""
    out_dir = Path(out_dir)
    markdown = write_text(out_dir / f"{result.spec.name}.md", render_markdown(result))
    table = write_text(out_dir / f"{result.spec.name}.csv", render_csv(result))
    return markdown, table


# --------------------------------------------------------------------------------------------- running
def select_rows(spec: TableSpec, names: Sequence[str] | None) -> list[RowSpec]:
    """The rows named (all when None); an unknown name is an error listing the table's rows."""
    if not names:
        return list(spec.rows)
    return [spec.row(n) for n in names]


def missing_plans(spec: TableSpec, runs_dir: str | Path, rows: Sequence[str] | None = None) -> list[RunPlan]:
    """Runs of the selected rows that have no finished evaluation stage under `runs_dir`."""
    runs_dir = Path(runs_dir)
    out = []
    for row in select_rows(spec, rows):
        for plan in spec.plans(row):
            if plan.metrics_file:
                continue
            if has_finished(runs_dir / plan.run_name, plan.eval_stage):
                continue
            out.append(plan)
    return out


def missing_prerequisites(
    spec: TableSpec, plans: Sequence[RunPlan], runs_dir: str | Path = "runs"
) -> list[Prerequisite]:
    """The prerequisite runs (per fold where asked) that the planned runs need and that are not done."""
    out: list[Prerequisite] = []
    for prerequisite in spec.prerequisites:
        needing = [p for p in plans if prerequisite.needed_by(p.row)]
        folds = [p.fold for p in needing] if prerequisite.per_fold else ([None] if needing else [])
        for fold in dict.fromkeys(folds):
            concrete = prerequisite.for_fold(fold, spec.folds)
            if not concrete.done(runs_dir) and concrete not in out:
                out.append(concrete)
    return out


def check_plans_data(
    plans: Sequence[RunPlan],
    extra_configs: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    prerequisites: Sequence[Prerequisite] = (),
) -> None:
    """Stop before anything runs when a planned run's dataset root is unset or missing (all listed)."""
    problems = []
    checks: list[tuple[str, str, tuple[str, ...], tuple[str, ...]]] = [
        (f"prerequisite {p.name!r}", p.command, p.config, p.overrides) for p in prerequisites
    ]
    checks += [
        (f"{p.table} row {p.row!r} ({p.run_name})", p.command, p.configs, p.overrides)
        for p in plans
        if not p.function
    ]
    for context, command, configs, overrides in checks:
        config = merged_config(
            [*configs, *configs_for(command, extra_configs, configs)], [*overrides, *extra_args]
        )
        try:
            check_dataset_roots(dataset_roots(config), context)
        except FileNotFoundError as err:
            problems.append(str(err))
    if problems:
        unique = list(dict.fromkeys(problems))
        raise FileNotFoundError(
            "cannot run the missing rows:\n  "
            + "\n  ".join(unique)
            + "\n(render what already exists with `lungdata table render NAME --from-runs DIR`)"
        )


def _call_function(target: str, args: Mapping[str, Any]) -> dict[str, float]:
    module_name, _, attr = target.partition(":")
    function: Callable[..., Mapping[str, Any]] = getattr(importlib.import_module(module_name), attr)
    values = function(**dict(args))
    return {str(k): float(v) for k, v in values.items()}


def _store_computed(run_dir: Path, values: Mapping[str, float], target: str) -> Path:
    """Write a function part's result as a run version (metrics.csv + run_info.json, stage "compute")."""
    numbers = [v.number for v in run_versions(run_dir)]
    folder = run_dir / f"version_{(max(numbers) + 1) if numbers else 0}"
    with atomic_path(folder / "metrics.csv") as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(list(values))
        writer.writerow([repr(v) for v in values.values()])
    write_text(folder / "run_info.json", json.dumps({"stage": COMPUTE_STAGE, "function": target}, indent=2))
    return folder


def execute_plan(
    plan: RunPlan,
    runs_dir: str | Path,
    extra_configs: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    timeout: float | None = None,
    echo: Callable[[str], None] = print,
) -> None:
    """Run one planned run: `fit` unless it already has a checkpoint, then the evaluation stage on the
    chosen checkpoint (or call its function and store the result)."""
    runs_dir = Path(runs_dir)
    run_dir = runs_dir / plan.run_name
    if plan.function:
        echo(f"[{plan.table}] {plan.run_name}: {plan.function}({plan.args})")
        _store_computed(run_dir, _call_function(plan.function, plan.args), plan.function)
        return
    ckpt = None
    if "fit" in plan.stages:
        ckpt = find_checkpoint(run_dir, plan.checkpoint)
        if ckpt is None:
            argv = plan.argv("fit", runs_dir, extra_configs, extra_args)
            echo(f"[{plan.table}] {plan.run_name}: fit (log: {run_dir / 'fit.log'})")
            launch(argv, run_dir / "fit.log", timeout=timeout)
            ckpt = find_checkpoint(run_dir, plan.checkpoint)
            if ckpt is None:
                raise RuntimeError(
                    f"{plan.table} row {plan.row!r}: fit of {plan.run_name} wrote no checkpoint under {run_dir}; "
                    "the config needs a ModelCheckpoint callback (save_last: true)"
                )
    for stage in plan.stages:
        if stage == "fit":
            continue
        argv = plan.argv(stage, runs_dir, extra_configs, extra_args, ckpt)
        echo(f"[{plan.table}] {plan.run_name}: {stage} (log: {run_dir / f'{stage}.log'})")
        launch(argv, run_dir / f"{stage}.log", timeout=timeout)


def execute_prerequisite(
    prerequisite: Prerequisite,
    runs_dir: str | Path,
    extra_configs: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    timeout: float | None = None,
    echo: Callable[[str], None] = print,
) -> None:
    """Run a prerequisite (fit or predict) and check that it wrote what the table's rows load."""
    log = Path(runs_dir) / prerequisite.name / f"{prerequisite.stage}.log"
    echo(f"prerequisite {prerequisite.name}: {prerequisite.stage} (log: {log})")
    launch(prerequisite.argv(runs_dir, extra_configs, extra_args), log, timeout=timeout)
    if not prerequisite.done(runs_dir):
        wanted = prerequisite.output(runs_dir) or f"a checkpoint under {Path(runs_dir) / prerequisite.name}"
        raise RuntimeError(
            f"prerequisite {prerequisite.name} ({prerequisite.stage}) finished but wrote no {wanted}; check "
            "its log and that its settings write that file (ModelCheckpoint dirpath, results_csv)"
        )


def dry_run_commands(
    plans: Sequence[RunPlan],
    runs_dir: str | Path,
    extra_configs: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    prerequisites: Sequence[Prerequisite] = (),
) -> list[str]:
    """The command lines `execute_plan` would run (checkpoints shown as placeholders)."""
    lines = [shlex.join(p.argv(runs_dir, extra_configs, extra_args, strict=False)) for p in prerequisites]
    for plan in plans:
        if plan.function:
            lines.append(f"{plan.function}({plan.args})  → {Path(runs_dir) / plan.run_name}")
            continue
        for stage in plan.stages:
            ckpt = (
                None
                if stage == "fit" or "fit" not in plan.stages
                else f"<{plan.checkpoint} checkpoint of fit>"
            )
            lines.append(
                shlex.join(plan.argv(stage, runs_dir, extra_configs, extra_args, ckpt, strict=False))
            )
    return lines


def render_table(
    name_or_path: str | Path,
    runs_dir: str | Path = "runs",
    *,
    run_missing: bool = True,
    rows: Sequence[str] | None = None,
    extra_configs: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    timeout: float | None = None,
    keep_going: bool = True,
    echo: Callable[[str], None] = print,
) -> tuple[TableResult, list[str]]:
    """Load a table, run its missing rows (unless `run_missing` is False) and collect the numbers.

    Args:
        name_or_path: registered table name or table file.
        runs_dir: where runs are read from and written to (`trainer.default_root_dir`).
        run_missing: launch the runs without a finished evaluation stage; False only reads.
        rows: restrict running to these rows (the rendered table always has every row).
        extra_configs: config files layered after each row's (e.g. a small-scale demo override);
            `PREFIX:FILE` applies only to runs of command PREFIX or built from a config named PREFIX.
        extra_args: overrides appended to every command.
        timeout: seconds per launched command.
        keep_going: a failing run is reported and the others still run (a table of many long runs should
            not lose the rest to one crash); False stops at the first failure.
        echo: progress printer.

    Returns:
        The collected table and one message per failed run (empty when every run succeeded).
    """
    spec = load_table(name_or_path)
    failures: list[str] = []
    if run_missing:
        plans = missing_plans(spec, runs_dir, rows)
        prerequisites = missing_prerequisites(spec, plans, runs_dir)
        check_plans_data(plans, extra_configs, extra_args, prerequisites)
        steps: list[tuple[str, Callable[[], None]]] = [
            (
                f"prerequisite {p.name} ({p.stage})",
                partial(execute_prerequisite, p, runs_dir, extra_configs, extra_args, timeout, echo),
            )
            for p in prerequisites
        ]
        steps += [
            (
                f"{p.table} row {p.row!r} ({p.run_name})",
                partial(execute_plan, p, runs_dir, extra_configs, extra_args, timeout, echo),
            )
            for p in plans
        ]
        for what, step in steps:
            try:
                step()
            except (RuntimeError, FileNotFoundError, ValueError) as err:
                if not keep_going:
                    raise
                failures.append(f"{what}: {err}")
                echo(f"FAILED {what} (continuing): {str(err).splitlines()[0]}")
    return collect(spec, runs_dir), failures


__all__ = [
    "Cell",
    "ColumnSpec",
    "FoldSpec",
    "PartSpec",
    "Prerequisite",
    "RowResult",
    "RowSpec",
    "RunPlan",
    "TableError",
    "TableResult",
    "TableSpec",
    "check_plans_data",
    "configs_for",
    "collect",
    "dry_run_commands",
    "execute_plan",
    "execute_prerequisite",
    "fill_placeholders",
    "list_tables",
    "load_table",
    "missing_plans",
    "missing_prerequisites",
    "parse_table",
    "render_csv",
    "render_markdown",
    "render_table",
    "repo_root",
    "table_path",
    "write_outputs",
]
