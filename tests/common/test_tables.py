"""The table registry: schema, reading finished runs, rendering next to the papers, planning missing runs.

Every registered table is rendered from a runs folder in which one of its rows has finished runs; the other
rows must read "not run" (never a number), reference rows "published only".
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from pathlib import Path

import pytest

from common.commands import table as table_command
from common.experiments import launch as launch_module
from common.experiments import tables as tables_module
from common.experiments.launch import check_dataset_roots, dataset_roots, merged_config, parse_overrides
from common.experiments.runs import (
    collect_run_metrics,
    find_checkpoint,
    froc_operating_points,
    read_metrics_csv,
    read_metrics_json,
)
from common.experiments.tables import (
    NOT_RUN,
    TableError,
    collect,
    dry_run_commands,
    execute_plan,
    fill_placeholders,
    list_tables,
    load_table,
    missing_plans,
    missing_prerequisites,
    parse_table,
    render_csv,
    render_markdown,
)
from common.experiments.tables import run as tables_run

REPO = Path(__file__).resolve().parents[2]
TABLES = sorted(p.stem for p in (REPO / "configs" / "tables").glob("*.yaml"))


def fake_run(
    runs: Path, name: str, stage: str, metrics: dict[str, float], version: int | None = None, ckpts=()
) -> Path:
    """A finished run version as LungCLI writes it: metrics.csv (a step row, then the values), run_info.json."""
    folder = runs / name
    existing = [int(p.name.split("_")[1]) for p in folder.glob("version_*")] if folder.is_dir() else []
    number = version if version is not None else (max(existing) + 1 if existing else 0)
    out = folder / f"version_{number}"
    out.mkdir(parents=True)
    keys = list(metrics)
    with (out / "metrics.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "step", *keys])
        writer.writerow([0, 0, *([""] * len(keys))])
        writer.writerow([0, 1, *[repr(v) for v in metrics.values()]])
    (out / "run_info.json").write_text(json.dumps({"stage": stage}))
    for ckpt in ckpts:
        (out / "checkpoints").mkdir(exist_ok=True)
        (out / "checkpoints" / ckpt).write_bytes(b"")
    return out


def write_table(tmp_path: Path, text: str, name: str = "t.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------- the registry
def test_registry_holds_the_tables_the_issue_names():
    names = set(TABLES)
    wanted = {f"glance_table{n}" for n in (1, 3, 4, 5, 6, 7)}
    wanted |= {"claf_table9", "claf_table8"} | {f"m3net_table{n}" for n in (2, 3, 4, 5, 7, 8)}
    wanted |= {"ldfc_table1", "stpd_table1"}
    assert wanted <= names
    assert len(list_tables(REPO / "configs" / "tables")) == len(TABLES)


@pytest.mark.parametrize("name", TABLES)
def test_every_table_renders_from_a_runs_folder_without_inventing_rows(name, tmp_path):
    spec = load_table(name)
    ours = [r for r in spec.rows if not r.reference]
    assert ours, f"{name} has no row of ours"
    done = ours[0]
    for plan in spec.plans(done):  # finished runs for the first row of ours only
        keys = {k for c in spec.columns if c.part == plan.part for k in (done.metric_key(c), c.std) if k}
        fake_run(tmp_path, plan.run_name, plan.eval_stage, dict.fromkeys(sorted(keys), 0.5))
    result = collect(spec, tmp_path)
    by_name = {r.row.name: r for r in result.rows}
    assert by_name[done.name].status == "done"
    for column in spec.columns:
        cell = by_name[done.name].cells[column.name]
        if column.metric and cell.expected:
            assert cell.mean == pytest.approx(0.5 * column.scale)
    for row in spec.rows:
        if row.reference:
            assert by_name[row.name].status == "published only"
            assert all(not c.values for c in by_name[row.name].cells.values())
        elif row is not done and not set(by_name[row.name].runs) & set(by_name[done.name].runs):
            assert by_name[row.name].status == NOT_RUN
            assert all(not c.values for c in by_name[row.name].cells.values())
    markdown = render_markdown(result)
    assert spec.title in markdown and markdown.count("\n| ") == len(spec.rows) + 1
    published = [v for r in spec.rows for v in r.published.values() if v is not None]
    assert published, f"{name} transcribes no published value"
    rows = list(csv.DictReader(io.StringIO(render_csv(result))))
    assert [r["row"] for r in rows] == [r.name for r in spec.rows]
    for row in rows:
        if row["status"] in (NOT_RUN, "published only"):
            assert all(row[c.name] == "" for c in spec.columns), "a row without runs shows no numbers"
        for c in spec.columns:
            paper = spec.row(row["row"]).published.get(c.name)
            assert (row[f"{c.name}_paper"] == "") == (paper is None)


@pytest.mark.parametrize("name", TABLES)
def test_table_configs_exist(name):
    spec = load_table(name)
    files = {c for p in spec.parts.values() for c in p.config} | set(spec.base)
    files |= {c for r in spec.rows for c in r.config}
    files |= {c for r in spec.rows for p in r.parts.values() if p for c in p.config}
    files |= {c for p in spec.prerequisites for c in p.config}
    missing = sorted(f for f in files if not (REPO / f).is_file())
    assert not missing, f"{name} names missing config files {missing}"


# ------------------------------------------------------------------------------------------- schema
BASIC = """
table: demo
command: lungcls
scale: 100
digits: 1
columns:
  - {name: acc, label: Acc, metric: test/acc, std: test/acc_std}
  - {name: auc, label: AUC, metric: test/roc_auc}
rows:
  - {name: a, label: Model A, config: [configs/x.yaml], published: {acc: 80.0, auc: 70.5}, published_std: {acc: 1.5}}
  - {name: b, label: Model B, overrides: [--model.init_args.lr=0.1], published: {acc: 81.0}}
  - {name: c, label: Theirs, reference: true, published: {acc: 90.0}}
"""


def test_collect_reads_the_eval_stage_and_renders_ours_beside_paper(tmp_path):
    spec = parse_table(__import__("yaml").safe_load(BASIC))
    runs = tmp_path / "runs"
    fake_run(runs, "demo-a", "fit", {"val/acc": 0.1, "test/acc": 0.99}, ckpts=["last.ckpt"])
    fake_run(runs, "demo-a", "test", {"test/acc": 0.8123, "test/acc_std": 0.012})
    fake_run(runs, "demo-b", "fit", {"test/acc": 0.5})  # a fit version only: not the evaluation
    result = collect(spec, runs)
    a, b, c = result.rows
    assert a.status == "partial"  # test/roc_auc was not logged
    assert a.cells["acc"].mean == pytest.approx(81.23) and a.cells["acc"].spread == pytest.approx(1.2)
    assert b.status == NOT_RUN and c.status == "published only"
    md = render_markdown(result)
    assert "| Model A | partial | 81.2 ± 1.2 / 80.0 ± 1.5 | not logged / 70.5 |" in md
    assert "| Model B | not run | not run / 81.0 | not run / — |" in md
    assert "| Theirs | published only | — / 90.0 | — / — |" in md


def test_folds_give_mean_std_and_a_paired_t_test(tmp_path):
    text = """
table: cv
command: lungdet
folds: {values: [0, 1, 2], override: '--data.init_args.fold={fold}'}
columns: [{name: fp, metric: test/fp}]
paired_test: {column: fp, reference: full}
rows:
  - {name: base, label: Base}
  - {name: full, label: Full}
"""
    spec = parse_table(__import__("yaml").safe_load(text))
    runs = tmp_path
    for fold, (base, full) in enumerate([(1.2, 0.5), (1.4, 0.6), (1.3, 0.8)]):
        fake_run(runs, f"cv-base-fold{fold}", "test", {"test/fp": base})
        if fold < 2:
            fake_run(runs, f"cv-full-fold{fold}", "test", {"test/fp": full})
    result = collect(spec, runs)
    base, full = result.rows
    assert base.cells["fp"].mean == pytest.approx(1.3) and base.cells["fp"].spread == pytest.approx(0.1)
    assert full.status == "partial" and len(full.cells["fp"].values) == 2
    from scipy.stats import ttest_rel

    assert base.p_value == pytest.approx(ttest_rel([1.2, 1.4], [0.5, 0.6]).pvalue)
    md = render_markdown(result)
    assert "(2/3 folds)" in md and "paired t over folds" in md


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"bogus": 1}, "unknown key"),
        ({"command": "lungfoo"}, "command"),
        ({"stages": ["test", "fit"]}, "stages"),
        ({"rows": [{"name": "a", "published": {"nope": 1}}]}, "column 'nope'"),
        ({"rows": [{"name": "a", "reference": True, "config": ["x.yaml"]}]}, "reference"),
        ({"rows": [{"name": "a"}, {"name": "a"}]}, "unique"),
        ({"columns": [{"name": "acc", "part": "elsewhere"}]}, "part 'elsewhere'"),
        ({"paired_test": {"column": "acc", "reference": "a"}}, "folds"),
    ],
)
def test_schema_errors_name_the_file_and_the_fix(patch, message):
    data = {**__import__("yaml").safe_load(BASIC), **patch}
    with pytest.raises(TableError, match=message) as err:
        parse_table(data, Path("configs/tables/demo.yaml"))
    assert "demo.yaml" in str(err.value)


def test_include_takes_a_package_run_table_and_detects_cycles(tmp_path):
    (tmp_path / "pkg.yaml").write_text(
        "table: pkg\ncommand: lungcls\nbase: configs/m3net_lidc.yaml\ncolumns: {acc: test/acc}\n"
        "rows:\n- {name: a, overrides: ['--x=1'], published: {acc: 86.96}}\n"
    )
    path = write_table(tmp_path, "include: pkg.yaml\ntitle: T\nscale: 100\n", "reg.yaml")
    spec = load_table(path)
    assert spec.name == "pkg" and spec.base == ("configs/m3net_lidc.yaml",) and spec.columns[0].scale == 100
    assert spec.plans(spec.rows[0])[0].run_name == "pkg-a"
    write_table(tmp_path, "include: cyc2.yaml\n", "cyc1.yaml")
    write_table(tmp_path, "include: cyc1.yaml\n", "cyc2.yaml")
    with pytest.raises(TableError, match="cycle"):
        load_table(tmp_path / "cyc1.yaml")


# ---------------------------------------------------------------------------------------- run reading
def test_metrics_csv_summary_and_best(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(
        "epoch,step,val/cpm,train/loss,val/recall\n0,1,0.5,,nan\n0,2,,0.9,\n1,3,0.7,,\n2,4,0.6,nan,\n"
    )
    values = read_metrics_csv(path)
    assert values["val/cpm"] == 0.6 and values["train/loss"] == 0.9 and math.isnan(values["val/recall"])
    assert read_metrics_csv(path, "maximize")["val/cpm"] == 0.7
    assert read_metrics_csv(path, "minimize")["val/cpm"] == 0.5


def test_lungcls_json_report_becomes_stage_keys(tmp_path):
    path = tmp_path / "test_metrics.json"
    path.write_text(
        json.dumps({"stage": "test", "metrics": {"acc": {"value": 0.8, "std": 0.01, "mean": 0.79}}})
    )
    assert read_metrics_json(path) == {"test/acc": 0.8, "test/acc_std": 0.01}


def test_newest_version_of_the_asked_stage_wins(tmp_path):
    fake_run(tmp_path, "r", "validate", {"val/dice": 0.4})
    fake_run(tmp_path, "r", "fit", {"val/dice": 0.9})
    fake_run(tmp_path, "r", "validate", {"val/dice": 0.6})
    assert collect_run_metrics(tmp_path, "r", ["val/dice"], stage="validate").values == {"val/dice": 0.6}
    assert collect_run_metrics(tmp_path, "r", ["val/dice"], stage="fit").values == {"val/dice": 0.9}


def test_find_checkpoint_prefers_best_then_the_single_monitored_one(tmp_path):
    assert find_checkpoint(tmp_path / "none") is None
    fake_run(tmp_path, "a", "fit", {}, ckpts=["epoch=003.ckpt", "last.ckpt"])
    fake_run(tmp_path, "a", "test", {})
    version = tmp_path / "a" / "version_0" / "checkpoints"
    assert find_checkpoint(tmp_path / "a") == version / "epoch=003.ckpt"
    assert find_checkpoint(tmp_path / "a", "last") == version / "last.ckpt"
    fake_run(tmp_path, "b", "fit", {}, ckpts=["best.ckpt", "last.ckpt", "epoch=001.ckpt"])
    assert find_checkpoint(tmp_path / "b").name == "best.ckpt"


def test_froc_operating_points_from_the_curve(tmp_path):
    report = {
        "curve": {"fps_per_scan": [0.1, 0.5, 0.6, 2.0], "sensitivity": [0.5, 0.8, 0.9, 0.95]},
        "counts": {"nodules": 100, "scans": 10},
    }
    path = tmp_path / "test_froc.json"
    path.write_text(json.dumps(report))
    points = froc_operating_points(path)
    assert points["fps@sens0.9"] == 0.6
    # at 0.55 FP/scan: the point (0.5, 0.8): 80 hits, 5 false positives
    assert points["recall@0.55fps"] == 0.8
    assert points["precision@0.55fps"] == pytest.approx(80 / 85)
    assert points["fp@0.55fps"] == pytest.approx(100 * 5 / 85)
    assert points["f1@1fps"] == pytest.approx(2 * (90 / 96) * 0.9 / (90 / 96 + 0.9))
    out = fake_run(tmp_path / "runs", "claf", "test", {"test/cpm": 0.8})
    (out / "test_froc.json").write_text(json.dumps(report))
    assert collect_run_metrics(tmp_path / "runs", "claf", ["test/fps@sens0.9"]).values == {
        "test/fps@sens0.9": 0.6
    }


# ------------------------------------------------------------------------------------------- running
def test_placeholders_fill_folds_runs_and_checkpoints_but_not_yaml_braces(tmp_path):
    fake_run(tmp_path, "s1-fold2", "fit", {}, ckpts=["best.ckpt"])
    text = "--m.ckpt={ckpt:s1-fold{fold}} --x={runs}/c.csv --b={name: resnet3d18}"
    filled = fill_placeholders(text, tmp_path, fold=2)
    assert f"--m.ckpt={tmp_path}/s1-fold2/version_0/checkpoints/best.ckpt" in filled
    assert f"--x={tmp_path}/c.csv" in filled and "{name: resnet3d18}" in filled
    with pytest.raises(RuntimeError, match="no checkpoint"):
        fill_placeholders("{ckpt:absent}", tmp_path)
    assert "<best checkpoint of absent>" in fill_placeholders("{ckpt:absent}", tmp_path, strict=False)


def test_overrides_and_dataset_roots_are_checked_before_running(tmp_path, monkeypatch):
    assert parse_overrides(["--a.b=1", "--c", "[1, 2]", "--config", "x.yaml", "--flag"]) == {
        "a.b": 1,
        "c": [1, 2],
        "flag": None,
    }
    config = merged_config([REPO / "configs" / "glance_luna16.yaml"], ["--data.init_args.fold=3"])
    assert config["data"]["init_args"]["fold"] == 3
    needs = dataset_roots(config)
    assert [(n.dataset, n.root) for n in needs] == [("luna16", None)]
    monkeypatch.delenv("LUNA16_ROOT", raising=False)
    with pytest.raises(FileNotFoundError, match=r"LUNA16_ROOT.*lungdata synth luna16"):
        check_dataset_roots(needs, "row x")
    monkeypatch.setenv("LUNA16_ROOT", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_dataset_roots(needs, "row x")
    monkeypatch.setenv("LUNA16_ROOT", str(tmp_path))
    check_dataset_roots(needs, "row x")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lungdata")
    table_command.register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_render_command_stops_on_a_missing_root_and_reads_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("LUNA16_ROOT", raising=False)
    monkeypatch.delenv("TIANCHI_ROOT", raising=False)
    args = _parser().parse_args(["table", "render", "glance_table5", "--runs-dir", str(tmp_path / "runs")])
    with pytest.raises(FileNotFoundError, match=r"cannot run the missing rows:(.|\n)*TIANCHI_ROOT"):
        args.func(args)
    assert not (tmp_path / "runs").exists(), "nothing ran"
    fake_run(tmp_path / "runs", "glance-full-luna16", "test", {"test/precision": 0.9, "test/recall": 0.8})
    args = _parser().parse_args(["table", "render", "glance_table5", "--from-runs", str(tmp_path / "runs")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "| Full GLANCE (GCT+MRGAM+CSCF) | partial | 90.0 / 92.3 | 80.0 / 94.1 | not logged / 93.2 |" in out
    assert (tmp_path / "runs" / "tables" / "glance_table5.csv").is_file()
    args = _parser().parse_args(["table", "render", "claf_table9", "--dry-run", "--runs-dir", str(tmp_path)])
    assert args.func(args) == 0
    lines = capsys.readouterr().out.splitlines()
    unet = (
        "-m lungdet fit --config configs/claf_luna16.yaml --config configs/claf/table9_unet.yaml "
        f"--data.init_args.fold=0 --run_name=claf-unet-fold0 --trainer.default_root_dir={tmp_path}"
    )
    assert any(line.endswith(unet) for line in lines)
    assert any(" predict " in line and "candidates.csv" in line for line in lines)


def _arg(argv, key: str) -> str:
    return next(a.split("=", 1)[1] for a in argv if a.startswith(f"{key}="))


def _pretend_to_run(argv) -> None:
    """What a launched fit / predict / test leaves behind: its run folder, a checkpoint, candidates."""
    stage, name = argv[3], _arg(argv, "--run_name")
    if stage == "predict":
        Path(_arg(argv, "--model.init_args.results_csv")).write_text("seriesuid\n")
    root = Path(_arg(argv, "--trainer.default_root_dir"))
    fake_run(root, name, stage, {"test/recall": 0.9}, ckpts=["best.ckpt"] if stage == "fit" else ())


def test_execute_plan_fits_once_then_evaluates_the_chosen_checkpoint(tmp_path, monkeypatch):
    calls: list[list[str]] = []

    def fake_launch(argv, log, env=None, cwd=None, timeout=None, check=True):
        calls.append(list(argv))
        _pretend_to_run(argv)

    monkeypatch.setattr(tables_run, "launch", fake_launch)
    monkeypatch.setattr(launch_module, "launch", fake_launch)
    spec = load_table("claf_table9")
    plans = [p for p in missing_plans(spec, tmp_path, ["ascrm_mppn"]) if p.fold == 0]
    prerequisites = missing_prerequisites(spec, plans, tmp_path)
    assert [(p.name, p.stage) for p in prerequisites] == [
        ("claf-ascrm-fold0", "fit"),
        ("claf-ascrm-fold0", "predict"),
    ]
    for prerequisite in prerequisites:
        tables_module.execute_prerequisite(prerequisite, tmp_path, echo=lambda _: None)
    for plan in plans:
        execute_plan(plan, tmp_path, echo=lambda _: None)
    assert [c[3] for c in calls] == ["fit", "predict", "fit", "test"]
    stage1 = f"{tmp_path}/claf-ascrm-fold0/version_0/checkpoints/best.ckpt"
    assert f"--ckpt_path={stage1}" in calls[1]
    assert f"--model.init_args.stage1_checkpoint={stage1}" in calls[2]
    assert calls[3][-1] == f"--ckpt_path={tmp_path}/claf-mppn-fold0/version_0/checkpoints/best.ckpt"
    assert all(p.fold != 0 for p in missing_plans(spec, tmp_path, ["ascrm_mppn"]))
    assert missing_prerequisites(spec, plans, tmp_path) == []
    execute_plan(plans[0], tmp_path, echo=lambda _: None)  # fit is not repeated when a checkpoint exists
    assert [c[3] for c in calls[4:]] == ["test"]


def test_function_parts_are_stored_as_runs(tmp_path, monkeypatch):
    module = type(sys)("fake_measures")
    module.count = lambda scale=1: {"complexity/params_m": 1.5 * scale}
    monkeypatch.setitem(sys.modules, "fake_measures", module)
    text = """
table: eff
command: lungcls
parts: {complexity: {function: 'fake_measures:count', args: {scale: 2}}, lidc: {config: [configs/m3net_lidc.yaml]}}
columns: [{name: params, part: complexity, metric: complexity/params_m}, {name: acc, part: lidc, metric: test/acc}]
rows: [{name: ours, published: {params: 3.0}}]
"""
    spec = parse_table(__import__("yaml").safe_load(text))
    plan = next(p for p in spec.plans(spec.rows[0]) if p.function)
    assert dry_run_commands([plan], tmp_path)[0].startswith("fake_measures:count")
    execute_plan(plan, tmp_path, echo=lambda _: None)
    row = collect(spec, tmp_path).rows[0]
    assert row.cells["params"].mean == 3.0 and row.status == "partial"
    assert "| ours | partial | 3.00 / 3.00 | not run / — |" in render_markdown(collect(spec, tmp_path))


def test_extra_configs_can_target_one_command():
    extra = ["all.yaml", "lungseg:seg.yaml", "lungdet:det.yaml"]
    assert tables_module.configs_for("lungseg", extra) == ["all.yaml", "seg.yaml"]
    assert tables_module.configs_for("lungcls", extra) == ["all.yaml"]
    by_config = ["mppn_luna16:small.yaml"]
    assert tables_module.configs_for("lungdet", by_config, ["configs/mppn_luna16.yaml"]) == ["small.yaml"]
    assert tables_module.configs_for("lungdet", by_config, ["configs/claf_luna16.yaml"]) == []


def _print_config(package: str, argv: list[str]) -> tuple[int, str]:
    import contextlib
    import importlib

    err = io.StringIO()
    main = importlib.import_module(f"{package}.cli").main
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            main([*argv, "--print_config"])
    except SystemExit as exit_:
        return int(exit_.code or 0), err.getvalue()
    return 0, err.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("name", TABLES)
def test_every_run_a_table_launches_parses_with_its_cli(name, tmp_path, monkeypatch):
    """Each row's (and prerequisite's) command line is accepted by the package's LightningCLI parser."""
    monkeypatch.chdir(REPO)
    spec = load_table(name)
    first_fold = spec.folds.values[0] if spec.folds else None
    commands = [
        (p.command, p.argv("fit", tmp_path, strict=False)[3:])
        for row in spec.rows
        for p in spec.plans(row)
        if not p.function and p.fold in (None, first_fold)
    ]
    commands += [
        (p.command, p.for_fold(first_fold, spec.folds).argv(tmp_path, strict=False)[3:])
        for p in spec.prerequisites
    ]
    for package, argv in commands:
        code, err = _print_config(package, argv)
        assert code == 0, f"{name}: `{package} {' '.join(argv)}` does not parse:\n{err[-2000:]}"


def test_a_row_can_point_at_a_finished_runs_metrics_file(tmp_path):
    report = tmp_path / "elsewhere" / "test_metrics.json"
    report.parent.mkdir()
    report.write_text(json.dumps({"stage": "test", "metrics": {"acc": {"value": 0.9, "std": 0.02}}}))
    data = __import__("yaml").safe_load(BASIC)
    data["rows"][1]["metrics"] = str(report)
    spec = parse_table(data)
    assert missing_plans(spec, tmp_path / "runs", ["b"]) == [], "a row with a metrics file runs nothing"
    row = collect(spec, tmp_path / "runs").rows[1]
    assert row.cells["acc"].mean == pytest.approx(90.0) and row.cells["acc"].spread == pytest.approx(2.0)
    assert row.status == "partial" and row.cells["auc"].runs_present == 1


def test_a_metric_logged_as_nan_reads_nan_not_missing(tmp_path):
    spec = parse_table(__import__("yaml").safe_load(BASIC))
    fake_run(tmp_path, "demo-a", "test", {"test/acc": math.nan, "test/roc_auc": 0.7})
    md = render_markdown(collect(spec, tmp_path))
    assert "| Model A | partial | nan / 80.0 ± 1.5 | 70.0 / 70.5 |" in md


def test_lungdata_table_render_passes_overrides_to_every_run(tmp_path, monkeypatch, capsys):
    from common.cli import main

    monkeypatch.chdir(REPO)
    argv = [
        "table",
        "render",
        "glance_table7",
        "--dry-run",
        "--runs-dir",
        str(tmp_path),
        "--rows",
        "lambda_0.2",
    ]
    assert (
        main([*argv, "--override", "trainer.max_epochs=5", "--override=--data.init_args.batch_size=2"]) == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(
        "--trainer.max_epochs=5 --data.init_args.batch_size=2 --run_name=" in x for x in lines
    )
    assert " validate " in lines[1]
    assert main([*argv, "--override", "trainer.max_epochs"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_a_crashed_run_is_not_a_finished_one(tmp_path):
    spec = parse_table(__import__("yaml").safe_load(BASIC))
    (tmp_path / "demo-a" / "version_0").mkdir(parents=True)  # crashed before logging or saving its config
    assert [p.row for p in missing_plans(spec, tmp_path, ["a"])] == ["a"]
    assert collect(spec, tmp_path).rows[0].status == NOT_RUN


def test_a_failed_run_does_not_stop_the_table(tmp_path, monkeypatch):
    def failing_launch(argv, log, env=None, cwd=None, timeout=None, check=True):
        name = next(a.split("=", 1)[1] for a in argv if a.startswith("--run_name="))
        if name == "demo-a":
            raise RuntimeError("command failed with exit status 1")
        fake_run(tmp_path, name, argv[3], {"test/acc": 0.7}, ckpts=["best.ckpt"] if argv[3] == "fit" else ())

    monkeypatch.setattr(tables_run, "launch", failing_launch)
    monkeypatch.setattr(tables_run, "check_plans_data", lambda *a, **k: None)
    path = write_table(tmp_path, BASIC.replace("configs/x.yaml", "configs/m3net_lidc.yaml"))
    result, failures = tables_module.render_table(path, tmp_path, echo=lambda _: None)
    assert len(failures) == 1 and "row 'a'" in failures[0]
    assert [r.status for r in result.rows] == [NOT_RUN, "partial", "published only"]
    with pytest.raises(RuntimeError):
        tables_module.render_table(path, tmp_path / "again", keep_going=False, echo=lambda _: None)


def test_render_runs_two_at_once_after_their_prerequisites(tmp_path, monkeypatch):
    """`--jobs 2` on GLANCE Table 3: each MPPN run after its dataset's stage 1 fit and predict, one thread
    per run; a failed stage 1 skips its MPPN row while the other runs go on."""
    import threading

    calls: list[tuple[str, str, dict]] = []
    lock = threading.Lock()

    def fake_launch(argv, log, env=None, cwd=None, timeout=None, check=True):
        stage, name = argv[3], _arg(argv, "--run_name")
        with lock:
            calls.append((name, stage, dict(env or {})))
        if name == "claf-ascrm-tianchi" and stage == "fit":
            raise RuntimeError("command failed with exit status 1")
        _pretend_to_run(argv)

    monkeypatch.setattr(tables_run, "launch", fake_launch)
    monkeypatch.setattr(tables_run, "check_plans_data", lambda *a, **k: None)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    _, failures = tables_module.render_table("glance_table3", tmp_path, jobs=2, echo=lambda _: None)
    order = [(n, s) for n, s, _ in calls]
    assert order.index(("claf-ascrm-fold0", "predict")) > order.index(("claf-ascrm-fold0", "fit"))
    mppn = [i for i, (n, _) in enumerate(order) if n.startswith("claf-mppn")]
    assert mppn and min(mppn) > order.index(("claf-ascrm-fold0", "predict"))
    assert ("claf-ascrm-tianchi", "predict") not in order  # its fit failed
    assert {n for n, _ in order if n.startswith("glance")} == {"glance-full-luna16", "glance-full-tianchi"}
    assert all(e.get("OMP_NUM_THREADS") == "1" for _, _, e in calls)
    assert failures[0].startswith("prerequisite claf-ascrm-tianchi (fit)")
    assert any("not run because prerequisite claf-ascrm-tianchi (fit) failed" in f for f in failures)
