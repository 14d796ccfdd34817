"""Launching package CLI runs in subprocesses, and checking their data before they start.

Tables and sweeps both run `lungdet` / `lungseg` / `lungcls` sub-commands as separate processes: a crash,
a CUDA error or a leaked thread pool in one run cannot poison the next, and each run gets the same
environment a user typing the command would. Output goes to a log file beside the results; a failing run
raises with the tail of that log.

Before anything is launched, `dataset_roots` reads the run's configs (merged as LightningCLI merges them,
later files and `--key=value` overrides winning) and `check_dataset_roots` stops with a clear message when a
dataset root is unset or missing — after an hour of other rows, not a traceback from inside a datamodule.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PACKAGE_COMMANDS = ("lungdet", "lungseg", "lungcls")
LOG_TAIL_LINES = 25


def repo_root() -> Path:
    """The checkout that holds `configs/` (the parent of the `common` package)."""
    return Path(__file__).resolve().parents[2]


def resolve_path(path: str | Path, base: Path | None = None) -> Path:
    """`path` as given when it exists (relative to the working directory), else relative to `base` or the
    repository root, so `configs/…` in a table file works from any working directory."""
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    for root in (base, repo_root()):
        if root is not None and (root / path).exists():
            return root / path
    return path


def package_command(package: str) -> list[str]:
    """The argv prefix that runs a package command with this interpreter (`python -m lungseg`).

    `python -m` instead of the console script: it works in an environment that is not activated and
    always uses the interpreter (and so the installed packages) of the caller.
    """
    if package not in (*PACKAGE_COMMANDS, "lungdata"):
        raise ValueError(f"unknown command {package!r}; use one of {', '.join(PACKAGE_COMMANDS)}")
    module = "common.cli" if package == "lungdata" else package
    return [sys.executable, "-m", module]


def program_command(program: str) -> list[str]:
    """A program name from a sweep file as argv: our commands through this interpreter, others via PATH."""
    if program in (*PACKAGE_COMMANDS, "lungdata"):
        return package_command(program)
    found = shutil.which(program)
    if found is None:
        raise FileNotFoundError(f"program {program!r} is not on PATH")
    return [found]


# ----------------------------------------------------------------------------------------------- configs
def read_yaml_mapping(path: Path, error: type[Exception], what: str) -> dict[str, Any]:
    """The mapping a table or sweep file holds; an unreadable file, bad YAML or another top-level value
    raises the caller's `error`, naming the file, so both formats fail the same way.

    Args:
        path: the YAML file.
        error: the caller's exception for a bad file (`TableError`, `SweepError`).
        what: the kind of file, for the messages ("table file", "sweep file").
    """
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise error(f"{path}: cannot read the {what} ({err})") from err
    except yaml.YAMLError as err:
        raise error(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise error(f"{path}: a {what} must be a YAML mapping")
    return data


def _split_override(tokens: Sequence[str], index: int) -> tuple[str | None, Any, int]:
    """(dotted key, value, tokens consumed) of a `--key=value` or `--key value` override at `index`."""
    token = tokens[index]
    if not token.startswith("--"):
        return None, None, 1
    body = token[2:]
    if "=" in body:
        key, _, value = body.partition("=")
        return key, value, 1
    if index + 1 < len(tokens) and not tokens[index + 1].startswith("--"):
        return body, tokens[index + 1], 2
    return body, None, 1


def parse_overrides(tokens: Sequence[str]) -> dict[str, Any]:
    """Dotted key → YAML-parsed value of the `--key=value` / `--key value` overrides in `tokens`.

    `--config FILE` entries are skipped (they are files, not settings).
    """
    import yaml

    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        key, value, used = _split_override(tokens, i)
        i += used
        if key is None or key == "config":
            continue
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
        out[key] = value
    return out


def merged_config(configs: Sequence[str | Path], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The settings a stack of YAML configs plus overrides describes (later wins), unresolved.

    Interpolations (`${oc.env:…}`, `${model.init_args…}`) are resolved where they can be; one that
    cannot (an unset environment variable) leaves the raw value, which the caller treats as unknown.
    """
    from omegaconf import OmegaConf

    merged = OmegaConf.create({})
    for path in configs:
        resolved = resolve_path(path)
        if not resolved.is_file():
            raise FileNotFoundError(f"config {path} does not exist (looked in . and {repo_root()})")
        merged = OmegaConf.merge(merged, OmegaConf.load(resolved))
    for key, value in parse_overrides(overrides).items():
        OmegaConf.update(merged, key, value, force_add=True)
    try:
        return OmegaConf.to_container(merged, resolve=True)  # type: ignore[return-value]
    except Exception:  # noqa: BLE001 — unresolvable interpolation: fall back to the raw values
        return OmegaConf.to_container(merged, resolve=False)  # type: ignore[return-value]


@dataclass(frozen=True)
class DatasetNeed:
    """A dataset a run reads: adapter name and configured root (None: the adapter's environment variable)."""

    dataset: str
    root: str | None
    setting: str


def dataset_roots(config: Mapping[str, Any]) -> list[DatasetNeed]:
    """The datasets a merged config's datamodule reads (`data.init_args.dataset` / `root`, and the
    few-shot `source_*` / `target_*` pairs), as far as the config says."""
    data = config.get("data") or {}
    args = data.get("init_args") if isinstance(data, Mapping) else None
    if not isinstance(args, Mapping):
        return []
    needs = []
    for prefix in ("", "source_", "target_"):
        name = args.get(f"{prefix}dataset")
        if isinstance(name, str) and name:
            root = args.get(f"{prefix}root")
            unset = root is None or str(root).strip() in ("", "null", "None", "~")
            needs.append(DatasetNeed(name, None if unset else str(root), f"data.init_args.{prefix}root"))
    return needs


def check_dataset_roots(needs: Iterable[DatasetNeed], context: str) -> None:
    """Raise FileNotFoundError naming the variable, the path and the `lungdata synth` stand-in when a
    dataset root is unset or does not exist. Datasets unknown to the registry are left to the run."""
    from common.datasets.registry import DATASETS, dataset_class, resolve_root

    for need in needs:
        if need.dataset not in DATASETS:
            continue
        env_var = getattr(dataset_class(need.dataset), "env_var", None)
        root = need.root
        if root is not None and "${" in root:
            root = None  # an unresolved interpolation: fall back to the environment variable
        try:
            path = resolve_root(need.dataset, root)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{context}: {err}") from None
        if not path.exists():
            where = f"{need.setting}={need.root}" if root else f"{env_var}={path}"
            raise FileNotFoundError(
                f"{context}: the {need.dataset} root {path} does not exist ({where}); point it at your copy of "
                f"the dataset, or make a synthetic stand-in with `lungdata synth {need.dataset} --out DIR`"
            )


# ----------------------------------------------------------------------------------------------- running
@dataclass
class LaunchResult:
    """How a launched command ended."""

    argv: list[str]
    returncode: int
    seconds: float
    log: Path


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def launch(
    argv: Sequence[str],
    log: str | Path,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float | None = None,
    check: bool = True,
) -> LaunchResult:
    """Run `argv` to completion with stdout+stderr in `log`.

    Args:
        argv: the command.
        log: log file (parent folders are created; appended to, so a resumed table keeps its history).
        env: extra environment variables on top of this process's environment.
        cwd: working directory (default: the current one).
        timeout: seconds before the run is killed.
        check: raise RuntimeError (with the log's tail) on a non-zero exit status.
    """
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    environment = dict(os.environ)
    # Idle OpenMP threads sleep instead of spinning: on a CPU shared with other runs, spinning threads
    # make 3D convolutions an order of magnitude slower (measured: 4.4 s vs 0.5 s per CLAF step on 2
    # cores); on an idle machine or a GPU run the difference is nil. An explicit setting wins.
    environment.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    environment.update(env or {})
    start = time.perf_counter()
    with log.open("a", encoding="utf-8", errors="replace") as handle:
        handle.write(f"$ {' '.join(argv)}\n")
        handle.flush()
        try:
            proc = subprocess.run(
                list(argv),
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=environment,
                cwd=cwd,
                timeout=timeout,
                check=False,
            )
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = -9
            handle.write(f"\n[killed after {timeout} s]\n")
    result = LaunchResult(list(argv), code, time.perf_counter() - start, log)
    if check and code != 0:
        raise RuntimeError(
            f"command failed with exit status {code} (log: {log}):\n  {' '.join(argv)}\n--- last lines ---\n"
            f"{_tail(log)}"
        )
    return result


__all__ = [
    "DatasetNeed",
    "LaunchResult",
    "PACKAGE_COMMANDS",
    "check_dataset_roots",
    "dataset_roots",
    "launch",
    "merged_config",
    "package_command",
    "parse_overrides",
    "program_command",
    "repo_root",
    "resolve_path",
]
