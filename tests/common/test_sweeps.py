"""Sweep files in wandb's format: parameter semantics, the agent's command, CLI keys, and the offline driver.

The sweep files' swept keys are checked against the real package parsers (`--print_config` must accept the
trial's command line), and `lungdata sweep run --count 2` runs two real trials of the tiny synthetic LDFC
config with wandb offline and ranks them.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import random
from pathlib import Path

import pytest
import yaml

from common.commands import sweep as sweep_command
from common.experiments.sweeps import (
    Parameter,
    SweepError,
    build_command,
    cli_overrides,
    command_args,
    load_sweep,
    local_command,
    parse_sweep,
)

REPO = Path(__file__).resolve().parents[2]
SWEEPS = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))


def spec_of(text: str, name: str = "s.yaml"):
    return parse_sweep(yaml.safe_load(text), Path(name))


def test_agent_argument_formats_are_wandbs():
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    params = {"a.lr": 0.0003, "b": True, "c": False, "d": [5.0, 10.0], "e": "adamw", "f": None, "g": 3}
    theirs = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    ours = command_args(params)
    for key in ("args", "args_no_hyphens", "args_no_boolean_flags", "args_no_equals", "args_json"):
        assert ours[key] == theirs[key], key


def test_grid_is_wandbs_product_over_sorted_names():
    spec = spec_of(
        """
method: grid
parameters:
  z: {values: [a, b]}
  m: {min: 1, max: 3}
  q: {distribution: q_uniform, min: 0, max: 1, q: 0.5}
  k: {value: 7}
command: [prog, '${args}']
"""
    )
    trials = spec.trials()
    assert len(trials) == 2 * 3 * 2
    assert list(trials[0]) == ["k", "m", "q", "z"]
    assert trials[0] == {"k": 7, "m": 1, "q": 0, "z": "a"} and trials[-1] == {
        "k": 7,
        "m": 3,
        "q": 0.5,
        "z": "b",
    }
    assert len(spec.trials(count=5)) == 5
    bad = spec_of("method: grid\nparameters: {lr: {min: 0.1, max: 1.0}}\ncommand: [p, '${args}']")
    with pytest.raises(SweepError, match="cannot be gridded"):
        bad.trials()
    weighted = spec_of(
        "method: grid\nparameters: {a: {values: [1, 2], probabilities: [0.5, 0.5]}}\ncommand: [p, '${args}']"
    )
    with pytest.raises(SweepError, match="probabilities"):
        weighted.trials()


@pytest.mark.parametrize(
    "config, low, high",
    [
        ({"min": 2, "max": 5}, 2, 5),
        ({"min": 0.5, "max": 1.5}, 0.5, 1.5),
        ({"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2}, 1e-4, 1e-2),
        ({"distribution": "log_uniform", "min": -2.0, "max": 0.0}, 0.1353, 1.0),
        ({"distribution": "inv_log_uniform", "min": 0.0, "max": 2.0}, 0.1353, 1.0),
        ({"distribution": "q_log_uniform_values", "min": 1, "max": 100, "q": 1}, 1, 100),
        ({"distribution": "beta", "a": 2.0, "b": 5.0}, 0.0, 1.0),
        ({"distribution": "categorical", "values": [3, 4], "probabilities": [0.0, 1.0]}, 4, 4),
    ],
)
def test_random_draws_stay_in_their_distribution_and_repeat_with_the_seed(config, low, high):
    param = Parameter.parse("p", config, "t")
    draws = [param.sample(random.Random(s)) for s in range(200)]
    assert all(low - 1e-9 <= d <= high + 1e-9 for d in draws)
    assert draws == [param.sample(random.Random(s)) for s in range(200)]
    if config.get("q") == 1:
        assert all(isinstance(d, int) for d in draws)
    spec = spec_of(f"method: random\nparameters: {{p: {yaml.safe_dump(config, default_flow_style=True).strip()}}}\n"
                   "command: [p, '${args}']")  # fmt: skip
    assert spec.trials(count=4, seed=3) == spec.trials(count=4, seed=3)


@pytest.mark.parametrize(
    "text, message",
    [
        ("method: bayes\nmetric: {name: m, goal: maximize}\nparameters: {a: {values: [1]}}\ncommand: [p, '${args}']",
         "W&B server"),
        ("method: grid\nparameters: {a: {values: [1]}}\ncommand: [p, x]", "args"),
        ("method: grid\nfoo: 1\nparameters: {a: {values: [1]}}", "unknown key"),
        ("method: grid\nparameters: {a: {parameters: {b: {values: [1]}}}}", "nested"),
        ("method: random\nparameters: {a: {min: 0.0, max: 1.0}}\ncommand: [p, '${args}']", "--count"),
        ("method: grid\nmetric: {name: m, goal: up}\nparameters: {a: {values: [1]}}", "goal"),
        ("method: random\nparameters: {a: {distribution: log_uniform_values, min: 0, max: 1}}", "positive"),
        ("method: grid\nparameters: {a: {values: [1]}}", "no `program`"),
    ],
)  # fmt: skip
def test_sweep_files_that_cannot_run_say_why(text, message):
    with pytest.raises(SweepError, match=message):
        spec_of(text).trials()


def test_command_is_the_agents_and_runs_our_clis_through_this_interpreter(monkeypatch):
    monkeypatch.setenv("SPLIT_FILE", "splits/a.json")
    spec = spec_of(
        "program: lungseg\nmethod: grid\nparameters: {x.y: {values: [0.5]}}\n"
        "command: ['${env}', '${program}', fit, '--s=${envvar:SPLIT_FILE}', '${args}', '${args_no_hyphens}']"
    )
    argv = build_command(spec, spec.trials()[0])
    assert argv == ["/usr/bin/env", "lungseg", "fit", "--s=splits/a.json", "--x.y=0.5", "x.y=0.5"]
    local = local_command(argv)
    assert local[1:4] == ["-m", "lungseg", "fit"] and Path(local[0]).name.startswith("python")
    assert cli_overrides(spec, spec.trials()[0]) == (
        "lungseg",
        ["fit", "--s=splits/a.json", "--x.y=0.5", "x.y=0.5"],
    )


def _print_config(package: str, argv: list[str]) -> int:
    main = importlib.import_module(f"{package}.cli").main
    try:
        return int(main([*argv, "--print_config"]) or 0)  # user errors: one line, status 2
    except SystemExit as exit_:  # --print_config exits 0 after printing
        return int(exit_.code or 0)


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_parameters_are_valid_cli_keys_of_their_command(path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    spec = load_sweep(path)
    trials = spec.trials(count=3, seed=0) if spec.method == "random" else spec.trials()
    for params in trials:
        package, argv = cli_overrides(spec, params)
        assert _print_config(package, argv) == 0, (
            f"{path.name}: {package} rejects {argv}: {capsys.readouterr().err}"
        )
        printed = yaml.safe_load(capsys.readouterr().out)
        for key, value in params.items():  # the value reached the parsed config
            node = printed
            for part in key.split("."):
                node = node[part]
            assert node == value or (isinstance(value, list) and list(node) == value), key
    package, argv = cli_overrides(spec, {"model.init_args.no_such_setting": 1})
    assert _print_config(package, argv) != 0, "the parser check can fail"
    capsys.readouterr()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lungdata")
    sweep_command.register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_show_prints_the_trials(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    args = _parser().parse_args(["sweep", "show", "configs/sweeps/glance_lambda_det.yaml"])
    assert args.func(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "4 trial(s)" in lines[0] and len(lines) == 5
    assert lines[1].endswith(
        "-m lungseg fit --config configs/glance_lidc.yaml --model.init_args.loss_overrides.lambda_det=0.2"
    )


def test_sweep_run_two_trials_on_synthetic_ldfc(tmp_path, monkeypatch, capsys):
    from common.synth.ldfc import make_ldfc

    root = tmp_path / "ldfc"
    make_ldfc(root, n_scans=5, seed=0)
    monkeypatch.setenv("LDFC_ROOT", str(root))
    monkeypatch.chdir(REPO)
    out = tmp_path / "sweep"
    args = _parser().parse_args(
        ["sweep", "run", "configs/sweeps/demo_pathology_lr.yaml", "--count", "2", "--out", str(out)]
    )
    assert args.func(args) == 0, capsys.readouterr().out
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and {r["status"] for r in rows} == {"ok"}
    assert sorted(r["model.init_args.lr"] for r in rows) == ["0.001", "0.003"]
    values = [float(r["val/acc"]) for r in rows]
    assert values == sorted(values, reverse=True) and all(0.0 <= v <= 1.0 for v in values)
    assert [r["rank"] for r in rows] == ["1", "2"]
    for row in rows:
        folder = Path(row["folder"])
        assert (folder / "params.json").is_file() and list(folder.rglob("metrics.csv"))
        assert list(folder.rglob("offline-run-*")), "the trial logged to wandb offline"
    assert "val/acc" in capsys.readouterr().out
