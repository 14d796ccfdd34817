"""wandb sweep files, run with or without a W&B server.

The files in `configs/sweeps/` are plain wandb sweep configurations::

    program: lungseg
    method: grid                                   # grid | random (bayes needs the server)
    metric: {name: val/cpm, goal: maximize}
    parameters:
      model.init_args.loss_overrides.lambda_det: {values: [0.2, 0.3, 0.4, 0.5]}
    command: [${env}, ${program}, fit, --config, configs/glance_lidc.yaml, ${args}]

so `wandb sweep FILE` + `wandb agent ID` run them against a server, and `lungdata sweep run FILE` runs the
same file on a machine with no network: this module expands the parameters (grid in wandb's order, or seeded
random draws from wandb's distributions), builds each trial's command exactly as the agent does (`${args}` →
`--key=value` with Python's `str` of the value), runs the trials one after the other with WANDB_MODE=offline
(so `wandb sync` can upload them later), reads each trial's metric from its `metrics.csv`, and writes one CSV
ranked by `metric.name` / `goal`.

Two additions to the agent's command, both outside the swept settings: `--trainer.default_root_dir=<trial
folder>`, so each trial's run folder is known, and our package commands run as `python -m <package>` with
this interpreter when `${env} ${program}` names one, so an environment that is not activated still works.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import random
import re
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.atomic import atomic_path
from common.experiments.launch import (
    PACKAGE_COMMANDS,
    launch,
    package_command,
    read_yaml_mapping,
    resolve_path,
)
from common.experiments.runs import read_metrics_csv

METHODS = ("grid", "random", "bayes")
GOALS = ("maximize", "minimize")
SUMMARIES = ("last", "best")
SWEEP_KEYS = {
    "program", "method", "metric", "parameters", "command", "name", "description", "project", "entity",
    "early_terminate", "run_cap", "controller",
}  # fmt: skip
DISTRIBUTIONS = (
    "constant", "categorical", "int_uniform", "uniform", "q_uniform", "log_uniform", "log_uniform_values",
    "q_log_uniform", "q_log_uniform_values", "inv_log_uniform", "inv_log_uniform_values", "normal", "q_normal",
    "log_normal", "q_log_normal", "beta", "q_beta",
)  # fmt: skip
GRID_DISTRIBUTIONS = ("constant", "categorical", "int_uniform", "q_uniform")
DEFAULT_COMMAND = ("${env}", "${interpreter}", "${program}", "${args}")
ENVVAR_MACRO = re.compile(r"\$\{envvar:([A-Za-z0-9_]*)\}")
TRIAL_ROOT_ARG = "--trainer.default_root_dir"


class SweepError(ValueError):
    """A sweep file that cannot be run; the message names the file, the parameter and the fix."""


# ------------------------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class Parameter:
    """One swept setting with wandb's semantics (distribution inferred as wandb infers it)."""

    name: str
    distribution: str
    config: Mapping[str, Any]

    @classmethod
    def parse(cls, name: str, config: Any, where: str) -> Parameter:
        here = f"{where}: parameter {name!r}"
        if not isinstance(config, Mapping):
            raise SweepError(f"{here}: must be a mapping such as {{values: [...]}} or {{min: 0, max: 1}}")
        if "parameters" in config:
            raise SweepError(
                f"{here}: nested parameters are not supported by the offline driver; write the dotted CLI key "
                "(model.init_args.lr) as the parameter name instead"
            )
        distribution = config.get("distribution")
        if distribution is None:
            if "value" in config:
                distribution = "constant"
            elif "values" in config:
                distribution = "categorical"
            elif "min" in config and "max" in config:
                ints = all(
                    isinstance(config[k], int) and not isinstance(config[k], bool) for k in ("min", "max")
                )
                distribution = "int_uniform" if ints else "uniform"
            else:
                raise SweepError(f"{here}: give `value`, `values`, `min`/`max` or a `distribution`")
        if distribution not in DISTRIBUTIONS:
            raise SweepError(
                f"{here}: unknown distribution {distribution!r}; wandb's are {', '.join(DISTRIBUTIONS)}"
            )
        if distribution == "constant" and "value" not in config:
            raise SweepError(f"{here}: a constant needs `value`")
        if distribution == "categorical":
            values = config.get("values")
            if not isinstance(values, list) or not values:
                raise SweepError(f"{here}: `values` must be a non-empty list")
            probabilities = config.get("probabilities")
            if probabilities is not None and (
                len(probabilities) != len(values) or abs(sum(probabilities) - 1.0) > 1e-6
            ):
                raise SweepError(f"{here}: `probabilities` must match `values` and sum to 1")
        needs_range = {"int_uniform", "uniform", "q_uniform", "log_uniform", "log_uniform_values", "q_log_uniform",
                       "q_log_uniform_values", "inv_log_uniform", "inv_log_uniform_values"}  # fmt: skip
        if distribution in needs_range:
            if "min" not in config or "max" not in config:
                raise SweepError(f"{here}: distribution {distribution} needs `min` and `max`")
            if not config["min"] < config["max"]:
                raise SweepError(f"{here}: `min` must be below `max`")
            if distribution.endswith("_values") and config["min"] <= 0:
                raise SweepError(
                    f"{here}: {distribution} needs a positive `min` (it is a log scale of values)"
                )
        return cls(name, str(distribution), dict(config))

    def grid_values(self) -> list[Any]:
        """The values a grid search iterates (wandb: int_uniform every integer, q_uniform arange(min, max, q))."""
        c = self.config
        if self.distribution == "constant":
            return [c["value"]]
        if self.distribution == "categorical":
            if c.get("probabilities") is not None:
                raise SweepError(f"parameter {self.name!r}: grid search does not take `probabilities`")
            return list(c["values"])
        if self.distribution == "int_uniform":
            return list(range(int(c["min"]), int(c["max"]) + 1))
        if self.distribution == "q_uniform":
            q = c.get("q", 1)
            count = math.ceil((c["max"] - c["min"]) / q)
            values = [c["min"] + i * q for i in range(count)]
            return [int(v) if isinstance(q, int) and isinstance(c["min"], int) else v for v in values]
        raise SweepError(
            f"parameter {self.name!r}: a {self.distribution} distribution cannot be gridded; grid search takes "
            f"{', '.join(GRID_DISTRIBUTIONS)} (use --method random)"
        )

    def sample(self, rng: random.Random) -> Any:
        """One random draw (wandb's distributions, Python's random generator)."""
        c, d = self.config, self.distribution
        if d == "constant":
            return c["value"]
        if d == "categorical":
            weights = c.get("probabilities")
            return rng.choices(c["values"], weights=weights)[0]
        if d == "int_uniform":
            return rng.randint(int(c["min"]), int(c["max"]))
        q = c.get("q", 1)
        if d in ("uniform", "q_uniform"):
            x = rng.uniform(c["min"], c["max"])
        elif d in ("log_uniform", "q_log_uniform"):
            x = math.exp(rng.uniform(c["min"], c["max"]))
        elif d in ("log_uniform_values", "q_log_uniform_values", "inv_log_uniform_values"):
            x = math.exp(rng.uniform(math.log(c["min"]), math.log(c["max"])))
        elif d == "inv_log_uniform":
            x = math.exp(-rng.uniform(c["min"], c["max"]))
        elif d in ("normal", "q_normal"):
            x = rng.gauss(c.get("mu", 0.0), c.get("sigma", 1.0))
        elif d in ("log_normal", "q_log_normal"):
            x = math.exp(rng.gauss(c.get("mu", 0.0), c.get("sigma", 1.0)))
        else:  # beta, q_beta
            x = rng.betavariate(c.get("a", 1.0), c.get("b", 1.0))
        if d.startswith("q_"):
            x = round(x / q) * q
            return int(x) if isinstance(q, int) else x
        return x


# ------------------------------------------------------------------------------------------------ sweep
@dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep file."""

    path: Path
    name: str
    program: str | None
    method: str
    metric: str | None
    goal: str
    parameters: tuple[Parameter, ...]
    command: tuple[str, ...]
    run_cap: int | None = None
    ignored: tuple[str, ...] = ()

    def trials(
        self, method: str | None = None, count: int | None = None, seed: int = 0
    ) -> list[dict[str, Any]]:
        """The parameter sets of the trials, in run order.

        Args:
            method: "grid" or "random" (default: the file's).
            count: at most this many (grid: the first ones; random: required unless the file sets run_cap).
            seed: random seed (same seed → same draws).
        """
        method = method or self.method
        if method == "bayes":
            raise SweepError(
                f"{self.path}: bayes search needs the W&B server (`wandb sweep` + `wandb agent`); offline, run it "
                "with --method random or --method grid"
            )
        if method not in ("grid", "random"):
            raise SweepError(f"method {method!r}: use grid or random")
        limit = count if count is not None else self.run_cap
        if count is not None and count < 1:
            raise SweepError("--count must be at least 1")
        ordered = sorted(self.parameters, key=lambda p: p.name)  # wandb orders the parameter set by name
        if method == "grid":
            combos = itertools.product(*(p.grid_values() for p in ordered))
            trials = [dict(zip((p.name for p in ordered), combo)) for combo in combos]
            return trials[:limit] if limit else trials
        if not limit:
            raise SweepError(f"{self.path}: a random sweep needs --count N (or run_cap in the file)")
        rng = random.Random(seed)
        return [{p.name: p.sample(rng) for p in ordered} for _ in range(limit)]


def _command(raw: Any, where: str) -> tuple[str, ...]:
    if raw is None:
        return DEFAULT_COMMAND
    if not isinstance(raw, list) or not all(isinstance(c, str | int | float) for c in raw):
        raise SweepError(f"{where}: `command` must be a list of strings")
    return tuple(str(c) for c in raw)


def parse_sweep(data: Mapping[str, Any], path: Path) -> SweepSpec:
    """Validate a sweep mapping (wandb's schema, the parts a local driver can honour)."""
    where = str(path)
    unknown = sorted(set(data) - SWEEP_KEYS)
    if unknown:
        raise SweepError(f"{where}: unknown key(s) {unknown}; a wandb sweep has {sorted(SWEEP_KEYS)}")
    method = data.get("method")
    if method not in METHODS:
        raise SweepError(f"{where}: `method` must be one of {METHODS}")
    metric = data.get("metric") or {}
    if not isinstance(metric, Mapping):
        raise SweepError(f"{where}: `metric` must be {{name: ..., goal: maximize|minimize}}")
    goal = str(metric.get("goal", "minimize"))
    if goal not in GOALS:
        raise SweepError(f"{where}: metric goal must be maximize or minimize")
    if method == "bayes" and not metric.get("name"):
        raise SweepError(f"{where}: bayes search needs `metric.name`")
    parameters = data.get("parameters")
    if not isinstance(parameters, Mapping) or not parameters:
        raise SweepError(f"{where}: `parameters` must map CLI keys to their values or distributions")
    params = tuple(Parameter.parse(str(k), v, where) for k, v in parameters.items())
    command = _command(data.get("command"), where)
    if not any(c.startswith("${args") for c in command):
        raise SweepError(f"{where}: `command` must contain ${{args}} (the swept --key=value flags)")
    if "${program}" in command and not data.get("program"):
        raise SweepError(f"{where}: `command` uses ${{program}} but the file has no `program`")
    run_cap = data.get("run_cap")
    ignored = tuple(k for k in ("early_terminate", "controller") if k in data)
    return SweepSpec(
        path=path,
        name=str(data.get("name") or path.stem),
        program=data.get("program"),
        method=str(method),
        metric=metric.get("name"),
        goal=goal,
        parameters=params,
        command=command,
        run_cap=int(run_cap) if run_cap is not None else None,
        ignored=ignored,
    )


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate a sweep file."""
    resolved = resolve_path(path)
    if not resolved.is_file():
        raise FileNotFoundError(f"sweep file {path} does not exist")
    return parse_sweep(read_yaml_mapping(resolved, SweepError, "sweep file"), resolved)


# --------------------------------------------------------------------------------------------- commands
def _plain(value: Any) -> Any:
    """Python scalars (not numpy's) so `str` prints what the agent would print."""
    return value.item() if hasattr(value, "item") and callable(value.item) else value


def command_args(params: Mapping[str, Any]) -> dict[str, list[str]]:
    """The agent's argument macros for one trial (same formatting as wandb's agent)."""
    flags, no_hyphens, no_booleans, no_equals, hydra_append, hydra_override = [], [], [], [], [], []
    plain = {k: _plain(v) for k, v in params.items()}
    for key, value in plain.items():
        flag = f"{key}={value}"
        flags.append(f"--{flag}")
        no_hyphens.append(flag)
        no_equals += [f"--{key}", str(value)]
        hydra_append.append(f"+{flag}")
        hydra_override.append(f"++{flag}")
        if isinstance(value, bool):
            if value:
                no_booleans.append(f"--{key}")
        else:
            no_booleans.append(f"--{flag}")
    return {
        "args": flags,
        "args_no_hyphens": no_hyphens,
        "args_no_boolean_flags": no_booleans,
        "args_no_equals": no_equals,
        "args_json": [json.dumps(plain)],
        "args_append_hydra": hydra_append,
        "args_override_hydra": hydra_override,
    }


def build_command(spec: SweepSpec, params: Mapping[str, Any], json_file: Path | None = None) -> list[str]:
    """The trial's argv as `wandb agent` builds it (macros expanded, `${envvar:NAME}` filled in)."""
    macros: dict[str, list[str]] = {
        **command_args(params),
        "env": ["/usr/bin/env"] if os.name != "nt" else [],
        "interpreter": ["python"],
        "program": [str(spec.program)] if spec.program else [],
        "args_json_file": [str(json_file)] if json_file else [],
    }
    argv: list[str] = []
    for chunk in spec.command:
        chunk = ENVVAR_MACRO.sub(lambda m: os.environ.get(m.group(1), m.group(1)), chunk)
        if chunk.startswith("${") and chunk.endswith("}"):
            name = chunk[2:-1]
            if name not in macros:
                raise SweepError(f"{spec.path}: unknown macro {chunk} in `command`")
            argv += macros[name]
        else:
            argv.append(chunk)
    return argv


def local_command(argv: Sequence[str]) -> list[str]:
    """`/usr/bin/env lungseg …` or `lungseg …` → `python -m lungseg …` with this interpreter."""
    argv = list(argv)
    if len(argv) >= 2 and argv[0] in ("/usr/bin/env", "env") and argv[1] in (*PACKAGE_COMMANDS, "lungdata"):
        return [*package_command(argv[1]), *argv[2:]]
    if argv and argv[0] in (*PACKAGE_COMMANDS, "lungdata"):
        return [*package_command(argv[0]), *argv[1:]]
    return argv


def cli_overrides(spec: SweepSpec, params: Mapping[str, Any]) -> tuple[str, list[str]]:
    """(package command, the CLI arguments after it) of a trial — for checking keys against the parser."""
    argv = local_command(build_command(spec, params))
    for i in range(len(argv) - 1):
        if argv[i] == "-m" and argv[i + 1] in PACKAGE_COMMANDS:
            return argv[i + 1], argv[i + 2 :]
    raise SweepError(f"{spec.path}: the command does not run one of {PACKAGE_COMMANDS}: {shlex.join(argv)}")


# ---------------------------------------------------------------------------------------------- running
@dataclass
class TrialResult:
    """One finished (or failed) trial."""

    index: int
    params: dict[str, Any]
    status: str
    value: float | None
    seconds: float
    folder: Path
    argv: list[str] = field(default_factory=list)


def trial_metric(folder: Path, metric: str | None, goal: str, summary: str) -> float | None:
    """The metric of the newest metrics.csv under a trial folder: its last value (wandb's summary) or, with
    `summary="best"`, its best value for the goal."""
    if not metric:
        return None
    files = sorted(folder.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in files:
        values = read_metrics_csv(path, "last" if summary == "last" else goal)
        if metric in values:
            return values[metric]
    return None


def rank(results: Sequence[TrialResult], goal: str) -> list[TrialResult]:
    """Trials best first; trials without a value (failed, metric not logged, NaN) last, by index."""
    scored = [r for r in results if r.value is not None and not math.isnan(r.value)]
    rest = [r for r in results if r not in scored]
    scored.sort(key=lambda r: r.value, reverse=goal == "maximize")  # type: ignore[arg-type, return-value]
    return scored + sorted(rest, key=lambda r: r.index)


def write_results(results: Sequence[TrialResult], spec: SweepSpec, path: Path) -> Path:
    """The ranked results CSV: rank, trial, status, metric value, seconds, every parameter, run folder."""
    names = [p.name for p in spec.parameters]
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["rank", "trial", "status", spec.metric or "metric", "seconds", *names, "folder"])
        for position, result in enumerate(rank(results, spec.goal), start=1):
            value = "" if result.value is None else repr(float(result.value))
            params = [str(_plain(result.params.get(n, ""))) for n in names]
            writer.writerow(
                [
                    position,
                    result.index,
                    result.status,
                    value,
                    f"{result.seconds:.1f}",
                    *params,
                    result.folder,
                ]
            )
    return path


def run_sweep(
    path: str | Path,
    out_dir: str | Path | None = None,
    *,
    method: str | None = None,
    count: int | None = None,
    seed: int = 0,
    summary: str = "last",
    wandb_mode: str = "offline",
    timeout: float | None = None,
    echo: Callable[[str], None] = print,
) -> tuple[list[TrialResult], Path]:
    """Run a sweep file's trials one after the other, without a W&B server.

    Args:
        path: the sweep file.
        out_dir: where trial folders and `results.csv` go (default `runs/sweeps/<sweep name>`).
        method: "grid" or "random" (default: the file's).
        count: number of trials (grid: the first ones).
        seed: random seed for `random`.
        summary: "last" — the metric's last logged value (wandb's summary); "best" — its best value.
        wandb_mode: WANDB_MODE of the trials: "offline" (sync later with `wandb sync`) or "disabled".
        timeout: seconds per trial before it is killed (status "failed").
        echo: progress printer.

    Returns:
        The results, best first, and the path of the ranked CSV.
    """
    if summary not in SUMMARIES:
        raise ValueError(f"summary={summary!r}: use one of {SUMMARIES}")
    if wandb_mode not in ("offline", "disabled"):
        raise ValueError("wandb_mode must be offline or disabled: the local driver never needs a server")
    spec = load_sweep(path)
    for key in spec.ignored:
        echo(f"sweep {spec.name}: `{key}` needs the W&B server and is ignored offline")
    out = Path(out_dir) if out_dir is not None else Path("runs") / "sweeps" / spec.name
    trials = spec.trials(method, count, seed)
    results: list[TrialResult] = []
    csv_path = out / "results.csv"
    for index, params in enumerate(trials):
        folder = out / f"trial-{index:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "params.json").write_text(json.dumps({k: _plain(v) for k, v in params.items()}, indent=2))
        argv = local_command(build_command(spec, params, folder / "params.json"))
        argv.append(f"{TRIAL_ROOT_ARG}={folder}")
        env = {"WANDB_MODE": wandb_mode, "WANDB_RUN_GROUP": spec.name, "WANDB_SILENT": "true"}
        echo(
            f"[{spec.name}] trial {index + 1}/{len(trials)}: "
            + " ".join(f"{k}={v}" for k, v in params.items())
        )
        start = time.perf_counter()
        run = launch(argv, folder / "trial.log", env=env, timeout=timeout, check=False)
        value = trial_metric(folder, spec.metric, spec.goal, summary) if run.returncode == 0 else None
        status = "ok" if run.returncode == 0 else f"failed ({run.returncode})"
        if run.returncode == 0 and spec.metric and value is None:
            status = "metric not logged"
        results.append(
            TrialResult(index, dict(params), status, value, time.perf_counter() - start, folder, argv)
        )
        write_results(results, spec, csv_path)  # after every trial: an interrupted sweep keeps its results
        shown = "—" if value is None else f"{value:.6g}"
        echo(
            f"[{spec.name}] trial {index + 1}: {status}, {spec.metric} = {shown} (log: {folder / 'trial.log'})"
        )
    return rank(results, spec.goal), csv_path


def format_results(results: Sequence[TrialResult], spec: SweepSpec, top: int = 10) -> str:
    """A short ranked listing for the terminal."""
    lines = [f"{'rank':>4}  {'trial':>5}  {spec.metric or 'metric':>14}  status  parameters"]
    for position, r in enumerate(results[:top], start=1):
        value = "—" if r.value is None else f"{r.value:.6g}"
        params = " ".join(f"{k}={_plain(v)}" for k, v in r.params.items())
        lines.append(f"{position:>4}  {r.index:>5}  {value:>14}  {r.status}  {params}")
    return "\n".join(lines)


__all__ = [
    "Parameter",
    "SweepError",
    "SweepSpec",
    "TrialResult",
    "build_command",
    "cli_overrides",
    "command_args",
    "format_results",
    "load_sweep",
    "local_command",
    "parse_sweep",
    "rank",
    "run_sweep",
    "trial_metric",
    "write_results",
]
