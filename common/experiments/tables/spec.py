"""Table files (`configs/tables/*.yaml`): the schema, its parsing and the registry; see the package docstring."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.experiments.launch import (
    PACKAGE_COMMANDS,
    package_command,
    read_yaml_mapping,
    repo_root,
    resolve_path,
)
from common.experiments.runs import (
    CHECKPOINT_CHOICES,
    find_checkpoint,
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


__all__ = [
    "ColumnSpec",
    "FoldSpec",
    "PartSpec",
    "Prerequisite",
    "RowSpec",
    "RunPlan",
    "TableError",
    "TableSpec",
    "configs_for",
    "fill_placeholders",
    "list_tables",
    "load_table",
    "parse_table",
    "repo_root",
    "table_path",
]
