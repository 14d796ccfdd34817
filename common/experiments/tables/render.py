"""A table's numbers collected from a runs folder, rendered as markdown and CSV beside the paper's."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.atomic import csv_text, write_text
from common.experiments.launch import (
    resolve_path,
)
from common.experiments.runs import (
    RunMetrics,
    collect_run_metrics,
    has_finished,
    metrics_from_file,
)
from common.experiments.tables.spec import (
    NO_VALUE,
    NOT_LOGGED,
    NOT_RUN,
    ColumnSpec,
    RowSpec,
    RunPlan,
    TableSpec,
)


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


__all__ = [
    "Cell",
    "RowResult",
    "TableResult",
    "collect",
    "render_csv",
    "render_markdown",
    "write_outputs",
]
