"""Running what a table is missing: planned runs, prerequisites, measuring functions, dry runs."""

from __future__ import annotations

import csv
import importlib
import json
import os
import shlex
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from common.atomic import atomic_path, write_text
from common.experiments.launch import (
    check_dataset_roots,
    dataset_roots,
    launch,
    merged_config,
)
from common.experiments.runs import (
    find_checkpoint,
    has_finished,
    run_versions,
)
from common.experiments.schedule import Step, run_steps, serialized, threads_per_job
from common.experiments.tables.render import TableResult, collect
from common.experiments.tables.spec import (
    COMPUTE_STAGE,
    Prerequisite,
    RowSpec,
    RunPlan,
    TableSpec,
    configs_for,
    load_table,
)


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


def _prerequisite_needs(prerequisite: Prerequisite, earlier: Sequence[Prerequisite]) -> tuple[str, ...]:
    """Step keys of the earlier prerequisites this one needs: its own run's earlier stage (fit before
    predict) and every run whose checkpoint or files its overrides load."""
    return tuple(
        f"prerequisite:{i}"
        for i, q in enumerate(earlier)
        if q.name == prerequisite.name or _loads(prerequisite.overrides, q.name)
    )


def _loads(overrides: Sequence[str], name: str) -> bool:
    """Whether overrides load run `name`'s checkpoint (`{ckpt:NAME}`) or a file of its folder."""
    text = " ".join(overrides)
    return f"{{ckpt:{name}}}" in text or f"/{name}/" in text


def _plan_needs(plan: RunPlan, prerequisites: Sequence[Prerequisite]) -> tuple[str, ...]:
    """Step keys of the prerequisites a planned run needs: those of its row that its overrides load, or —
    when it names none of them — all of its row's (so a failed stage 1 of one dataset does not hold back
    the other dataset's MPPN)."""
    of_row = [(i, q) for i, q in enumerate(prerequisites) if q.needed_by(plan.row)]
    named = [i for i, q in of_row if _loads(plan.overrides, q.name)]
    return tuple(f"prerequisite:{i}" for i in (named or [i for i, _ in of_row]))


def _thread_env(threads: int) -> dict[str, str]:
    """Thread counts for one of several runs sharing the machine (a setting in the environment wins)."""
    return {k: os.environ.get(k, str(threads)) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}


def execute_plan(
    plan: RunPlan,
    runs_dir: str | Path,
    extra_configs: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    timeout: float | None = None,
    echo: Callable[[str], None] = print,
    env: Mapping[str, str] | None = None,
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
            launch(argv, run_dir / "fit.log", env=env, timeout=timeout)
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
        launch(argv, run_dir / f"{stage}.log", env=env, timeout=timeout)


def execute_prerequisite(
    prerequisite: Prerequisite,
    runs_dir: str | Path,
    extra_configs: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    timeout: float | None = None,
    echo: Callable[[str], None] = print,
    env: Mapping[str, str] | None = None,
) -> None:
    """Run a prerequisite (fit or predict) and check that it wrote what the table's rows load."""
    log = Path(runs_dir) / prerequisite.name / f"{prerequisite.stage}.log"
    echo(f"prerequisite {prerequisite.name}: {prerequisite.stage} (log: {log})")
    launch(prerequisite.argv(runs_dir, extra_configs, extra_args), log, env=env, timeout=timeout)
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
    jobs: int = 1,
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
            not lose the rest to one crash; runs that need it are reported, not run); False stops at the
            first failure.
        jobs: runs at once (`common.experiments.schedule`): prerequisites before the rows that need them,
            each run with ``threads_per_job(jobs)`` threads (``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``
            when the environment does not set them).
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
        env = {} if jobs <= 1 else _thread_env(threads_per_job(jobs))
        echo = serialized(echo)
        steps = [
            Step(
                f"prerequisite:{i}",
                f"prerequisite {p.name} ({p.stage})",
                partial(execute_prerequisite, p, runs_dir, extra_configs, extra_args, timeout, echo, env),
                _prerequisite_needs(p, prerequisites[:i]),
            )
            for i, p in enumerate(prerequisites)
        ]
        steps += [
            Step(
                f"plan:{i}",
                f"{p.table} row {p.row!r} ({p.run_name})",
                partial(execute_plan, p, runs_dir, extra_configs, extra_args, timeout, echo, env),
                _plan_needs(p, prerequisites),
            )
            for i, p in enumerate(plans)
        ]
        failures = run_steps(steps, jobs=jobs, keep_going=keep_going, echo=echo)
    return collect(spec, runs_dir), failures


__all__ = [
    "check_plans_data",
    "dry_run_commands",
    "execute_plan",
    "execute_prerequisite",
    "missing_plans",
    "missing_prerequisites",
    "render_table",
]
