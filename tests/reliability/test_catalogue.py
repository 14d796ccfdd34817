"""The bad-input catalogue (issue 19, SPEC §9): one row per kind of bad input a new user meets.

Every row runs a real command (in-process where it can, as a subprocess where it must be killed) on a
copy of one tiny synthetic tree with one thing broken, and asserts: the exit code; one error line that
names the file (and row, line or key where there is one); no traceback; and that what was already on
disk — the cache, the run folder, the output folder the command would write — is byte-identical after.
Rows that succeed with a warning (exit 0) check the warning and that their output is valid instead.

`ROWS` is also the table in docs/reliability.md: `test_docs_table_is_the_catalogue` fails when they
differ; `python -m tests.reliability.test_catalogue` rewrites the table.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.lungcad.stand_in import use_stand_in_models

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "reliability.md"
CLAF = REPO / "configs" / "claf_luna16.yaml"
BEGIN, END = "<!-- catalogue:begin -->", "<!-- catalogue:end -->"


@dataclass(frozen=True)
class Row:
    """One bad input: what it is, the command, the exit code and what the user sees."""

    id: str
    bad_input: str
    command: str
    exit_code: int
    behaviour: str
    marks: tuple = ()


ROWS: tuple[Row, ...] = (
    Row("raw-truncated", "`.raw` cut short", "lungdata prepare", 2,
        "names the `.raw`, expected and actual bytes; re-download"),
    Row("raw-missing", "`.raw` missing beside its `.mhd`", "lungdata prepare", 2,
        "names the `.mhd` and the missing data file"),
    Row("zero-spacing", "`ElementSpacing = 0 …`", "lungdata prepare", 2,
        "names the `.mhd`: spacing must be finite and > 0"),
    Row("nan-voxels", "NaN voxels (float data)", "lungdata prepare", 2,
        "names the `.mhd` and the count of NaN/inf voxels"),
    Row("dimsize-size-mismatch", "`DimSize` whose voxel count does not fit the `.raw`", "lungdata prepare", 2,
        "names the `.raw`: size mismatch for the header's DimSize"),
    Row("dimsize-permuted", "`DimSize` permuted, same byte count", "lungdata prepare", 2,
        "names the `.mhd`: DimSize looks permuted (rows/slices do not continue); nothing cached"),
    Row("dimsize-permuted-lenient", "the same, with `--lenient`", "lungdata prepare --lenient", 0,
        "the scan is reported failed and not cached; the others are built"),
    Row("missing-column", "annotations CSV without `diameter_mm`", "lungdata prepare", 2,
        "names the CSV and the column; says `--columns ROLE=NAME` / `--data.init_args.columns`"),
    Row("unknown-series-uid", "annotation row of a series that is not in the tree", "lungdata prepare", 2,
        "names the CSV and line; says `--lenient` skips such rows"),
    Row("unknown-series-uid-froc", "annotation of a series not in the series list",
        "lungdata evaluate-froc", 0,
        "numbers as the official script (row left out); one warning with the count and first rows"),
    Row("annotation-outside", "annotation centre outside its scan", "lungdata prepare", 2,
        "names the CSV and line, the scan and voxel; says `--lenient` skips such rows"),
    Row("annotation-outside-froc", "annotation outside its scan's volume", "lungdata evaluate-froc", 0,
        "numbers as the official script (a miss); one warning with the count and first rows"),
    Row("header-only-froc", "header-only annotations CSV", "lungdata evaluate-froc", 0,
        "warning: sensitivities and CPM undefined; `froc.json` valid JSON with `null`, never `NaN`"),
    Row("header-only-prepare", "header-only annotations CSV", "lungdata prepare", 0,
        "warning: no nodules in any scan; the cache serves prediction"),
    Row("header-only-fit", "a dataset with no nodules", "lungdet fit", 2,
        "names the cache: the detector needs annotated nodules"),
    Row("empty-csv-froc", "0-byte annotations CSV", "lungdata evaluate-froc", 2,
        "names the CSV: empty, needs a header"),
    Row("empty-csv-prepare", "0-byte annotations CSV", "lungdata prepare", 2,
        "names the CSV: empty, expected header"),
    Row("non-numeric-probability", "`probability` = `abc` in a results CSV", "lungdata evaluate-froc", 2,
        "names the results CSV, row, line, column and value"),
    Row("kill-9-then-rerun", "`kill -9` during prepare, rerun at once (owner still a zombie)",
        "lungdata prepare", 0,
        "the dead build's lock is taken over; finished scans skipped; arrays identical to a clean build"),
    Row("concurrent-prepare", "a second prepare while one is running", "lungdata prepare", 2,
        "names the cache and the running build's pid; cache untouched"),
    Row("config-typo-cli", "`--model.init_args.widht 8`", "lungdet fit", 2,
        "one line: the key, 'on the command line', did you mean width?"),
    Row("config-typo-yaml", "`widht: 8` in a YAML config", "lungdet fit", 2,
        "one line: the key, the YAML file and line, did you mean width?"),
    Row("checkpoint-missing", "`--ckpt_path` to a file that does not exist", "lungdet test", 2,
        "names the path, before any cache is built or `version_N/` made"),
    Row("checkpoint-random-bytes", "`--ckpt_path` to random bytes", "lungdet test", 2,
        "names the path: not a readable checkpoint; never suggests `weights_only=False`"),
    Row("checkpoint-truncated", "`--ckpt_path` to a checkpoint cut in half", "lungdet test", 2,
        "names the path: not a readable checkpoint; nothing left behind"),
    Row("stage1-results-missing", "`--data.init_args.stage1_results_csv` to a file that does not exist",
        "lungdet fit", 2, "one line: the path, the option, and `lungdet test` of stage 1 (or leave it out)"),
    Row("empty-data-root", "`--root` an empty folder", "lungdata prepare", 2,
        "names the root and the `lungdata synth` command that makes a stand-in"),
    Row("dicom-truncated-slice", "one DICOM slice file cut to half", "lungdata prepare", 2,
        "names the series folder and the slice file"),
    Row("predict-junk-file", "a non-image `.mhd` in a predict folder", "lungdet predict", 2,
        "names the file and `--data.init_args.lenient true` that skips it"),
    Row("analyze-not-ct", "a DICOM folder whose only series is MR", "lungcad analyze", 2,
        "names the folder and the MR series: lungcad analyses CT scans only"),
    Row("analyze-one-slice", "a DICOM series of one slice", "lungcad analyze", 2,
        "names the folder, the series and the slice file: a 3D scan needs the whole series"),
    Row("analyze-two-series", "a folder with a thick (6 slices) and a thin (12 slices) CT series",
        "lungcad analyze", 0,
        "not an error: the thin one is analysed (rule: axial, most slices, thinnest spacing), the choice "
        "and the other series logged"),
    Row("analyze-mixed-orientation", "one series whose slices have two orientations", "lungcad analyze", 2,
        "names the folder, the series and the two slice files; says `--series-uid`"),
    Row("analyze-gantry-tilt", "`GantryDetectorTilt` 15°", "lungcad analyze", 2,
        "names the folder, the series, the tilt and the slice file"),
    Row("analyze-missing-slice", "a slice missing from the middle of a series", "lungcad analyze", 2,
        "names the folder, the series and the slices around the gap; says `--dicom-tolerance MM`"),
    Row("analyze-bundle-tampered", "a bundle weights file changed after `lungcad bundle`", "lungcad analyze", 2,
        "names `bundle.json` and `files.<name>`: sha256 differs, rebuild or re-copy the bundle"),
    Row("analyze-bundle-file-missing", "a bundle weights file deleted", "lungcad analyze", 2,
        "names `bundle.json` and `files.<name>`: missing, copy the whole bundle folder"),
    Row("analyze-nodules-non-numeric", "`--nodules` CSV with `coordX` = `abc`", "lungcad analyze", 2,
        "names the CSV, row, line, column and value"),
    Row("analyze-nodules-outside", "`--nodules` CSV row outside its scan", "lungcad analyze", 2,
        "names the CSV, row and line: world mm (x, y, z) in the scan's own frame"),
)  # fmt: skip


# ------------------------------------------------------------------------------------------- helpers


def tree_digest(path: Path) -> dict[str, str] | None:
    """relative path → SHA-256 of every file under `path` (None when it does not exist)."""
    if not path.exists():
        return None
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@dataclass
class Case:
    """What one row runs and checks."""

    cli: str  # "lungdata", "lungdet" or "lungcad"
    argv: list[str]
    needles: list[str]
    protect: list[Path] = field(default_factory=list)
    check: Callable[[str], None] | None = None  # extra check, given stdout + stderr + log
    patch: Callable[[pytest.MonkeyPatch], None] | None = None  # stand-ins set before the command runs


@dataclass
class World:
    """The module's pristine inputs: a tiny LUNA16 tree, its cache, a results CSV, a DICOM series."""

    tree: Path
    cache: Path
    uids: list[str]
    results: Path
    froc_out: Path
    dicom: Path
    dicom_cache: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    from common.cli import main
    from common.dicom import write_dicom_series
    from common.io import CTVolume
    from tests.common.chest_phantom import chest_phantom
    from tests.common.luna_tree import write_tiny_luna16

    base = tmp_path_factory.mktemp("catalogue")
    luna = write_tiny_luna16(base / "luna16", n_scans=3, n_subsets=2)
    assert main(["prepare", "luna16", "--root", str(luna.root), "--out", str(base / "cache")]) == 0
    rows = ["seriesuid,coordX,coordY,coordZ,probability"]
    for uid, (xyz, _) in luna.nodules.items():
        rows.append(f"{uid},{xyz[0]},{xyz[1]},{xyz[2]},0.9")
        rows.append(f"{uid},{xyz[0] + 30},{xyz[1]},{xyz[2]},0.2")
    results = base / "results.csv"
    results.write_text("\n".join(rows) + "\n")
    froc_out = base / "froc"
    assert main(_froc_argv(luna.root, luna.root / "annotations.csv", results, froc_out)) == 0
    phantom = chest_phantom((24, 48, 48), (1.5, 1.5, 2.0), noise_hu=10.0, seed=1)
    dicom = base / "dicom" / "series1"
    write_dicom_series(CTVolume(phantom.hu, (1.5, 1.5, 2.0), (0, 0, 0), np.eye(3)), dicom)
    dicom_cache = base / "dicom_cache"
    assert main(["prepare", "folder", "--root", str(dicom.parent), "--out", str(dicom_cache)]) == 0
    return World(luna.root, base / "cache", luna.uids, results, froc_out, dicom, dicom_cache)


def _froc_argv(root: Path, annotations: Path, results: Path, out: Path) -> list[str]:
    return [
        "evaluate-froc",
        "--annotations", str(annotations),
        "--excluded", str(root / "annotations_excluded.csv"),
        "--seriesuids", str(root / "seriesuids.csv"),
        "--results", str(results),
        "--out", str(out),
        "--bootstrap", "20",
    ]  # fmt: skip


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _header(tree: Path, uid: str) -> Path:
    return next(tree.glob(f"subset*/{uid}.mhd"))


def _edit_header(header: Path, key: str, value: str) -> None:
    text = re.sub(rf"^{key} = .*$", f"{key} = {value}", header.read_text(), flags=re.M)
    header.write_text(text)


def _prepare(tree: Path, out: Path, *extra: str) -> list[str]:
    return ["prepare", "luna16", "--root", str(tree), "--out", str(out), *extra]


def _lungdet_overlay(tmp: Path, tree: Path, name: str = "tiny") -> Path:
    config = {
        "model": {"init_args": {"width": 4, "head_channels": 8, "block_size": 64, "overlap": 0.5}},
        "data": {
            "init_args": {
                "root": str(tree),
                "cache_dir": str(tmp / "new_cache"),
                "split": "ratio",
                "ratios": [0.34, 0.33, 0.33],
                "batch_size": 1,
                "num_workers": 0,
                "crop_size": 32,
                "samples_per_epoch": 2,
            }
        },
        "trainer": {
            "default_root_dir": str(tmp / "runs"),
            "accelerator": "cpu",
            "devices": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _old_run(tmp: Path) -> Path:
    """A run folder from an earlier command, which a failing command must leave as it is."""
    run = tmp / "runs" / "claf_luna16" / "version_0"
    run.mkdir(parents=True)
    (run / "metrics.csv").write_text("epoch,step\n0,1\n")
    return tmp / "runs"


# --------------------------------------------------------------------------------------- the rows


def case(row_id: str, w: World, tmp: Path) -> Case:  # noqa: C901  (one branch per row, read as a table)
    uid = w.uids[0]
    cache = _copy(w.cache, tmp / "cache")  # the cache a previous good run left
    if row_id == "raw-truncated":
        tree = _copy(w.tree, tmp / "L")
        raw = _header(tree, uid).with_suffix(".raw")
        raw.write_bytes(raw.read_bytes()[: raw.stat().st_size // 2])
        return Case("lungdata", _prepare(tree, cache), [str(raw), "size mismatch"], [cache])
    if row_id == "raw-missing":
        tree = _copy(w.tree, tmp / "L")
        header = _header(tree, uid)
        header.with_suffix(".raw").unlink()
        return Case("lungdata", _prepare(tree, cache), [str(header), ".raw", "missing"], [cache])
    if row_id == "zero-spacing":
        tree = _copy(w.tree, tmp / "L")
        header = _header(tree, uid)
        _edit_header(header, "ElementSpacing", "0 1.5 2.5")
        return Case("lungdata", _prepare(tree, cache), [str(header), "spacing"], [cache])
    if row_id == "nan-voxels":
        tree = _copy(w.tree, tmp / "L")
        header = _header(tree, uid)
        raw = header.with_suffix(".raw")
        data = np.fromfile(raw, dtype="<i2").astype("<f4")
        data[100:110] = np.nan
        data.tofile(raw)
        _edit_header(header, "ElementType", "MET_FLOAT")
        return Case("lungdata", _prepare(tree, cache), [str(header), "NaN"], [cache])
    if row_id == "dimsize-size-mismatch":
        tree = _copy(w.tree, tmp / "L")
        header = _header(tree, uid)
        _edit_header(header, "DimSize", "64 64 39")
        raw = header.with_suffix(".raw")
        return Case("lungdata", _prepare(tree, cache), [str(raw), "size mismatch", "DimSize"], [cache])
    if row_id in ("dimsize-permuted", "dimsize-permuted-lenient"):
        tree = _copy(w.tree, tmp / "L")
        header = _header(tree, uid)
        _edit_header(header, "DimSize", "64 40 64")
        if row_id == "dimsize-permuted":
            return Case("lungdata", _prepare(tree, cache), [str(header), "DimSize", "permuted"], [cache])

        def not_cached(_: str) -> None:
            scans = json.loads((tmp / "fresh" / "manifest.json").read_text())["scans"]
            assert uid not in scans and len(scans) == len(w.uids) - 1

        needles = [uid, "failed", "permuted"]
        return Case("lungdata", _prepare(tree, tmp / "fresh", "--lenient"), needles, [tree], not_cached)
    if row_id == "missing-column":
        tree = _copy(w.tree, tmp / "L")
        csv = tree / "annotations.csv"
        lines = [",".join(line.split(",")[:4]) for line in csv.read_text().splitlines()]
        csv.write_text("\n".join(lines) + "\n")
        needles = [str(csv), "diameter_mm", "--columns", "--data.init_args.columns"]
        return Case("lungdata", _prepare(tree, cache), needles, [cache])
    if row_id == "unknown-series-uid":
        tree = _copy(w.tree, tmp / "L")
        csv = tree / "annotations.csv"
        csv.write_text(csv.read_text() + "1.2.3.999,1,2,3,6\n")
        needles = [str(csv), "line 5", "1.2.3.999", "--lenient"]
        return Case("lungdata", _prepare(tree, cache), needles, [cache])
    if row_id == "annotation-outside":
        tree = _copy(w.tree, tmp / "L")
        csv = tree / "annotations.csv"
        csv.write_text(csv.read_text() + f"{uid},500,500,500,6\n")
        needles = [f"{csv}:5", "outside", "--lenient"]
        return Case("lungdata", _prepare(tree, cache), needles, [cache])
    if row_id in ("unknown-series-uid-froc", "annotation-outside-froc"):
        tree = _copy(w.tree, tmp / "L")
        csv = tree / "annotations.csv"
        extra = "1.2.3.999,1,2,3,6\n" if row_id == "unknown-series-uid-froc" else f"{uid},500,500,500,6\n"
        csv.write_text(csv.read_text() + extra)
        out = tmp / "froc"
        reference = json.loads((w.froc_out / "froc.json").read_text())

        def same_numbers(_: str) -> None:
            result = json.loads((out / "froc.json").read_text())
            expected_nodules = reference["counts"]["nodules"] + (row_id == "annotation-outside-froc")
            assert result["counts"]["nodules"] == expected_nodules
            if row_id == "unknown-series-uid-froc":
                assert result["cpm"] == reference["cpm"]

        word = "not in the series list" if row_id == "unknown-series-uid-froc" else "outside"
        needles = [str(csv), "1 annotation", word, "line 5"]
        return Case("lungdata", _froc_argv(tree, csv, w.results, out), needles, [tree], same_numbers)
    if row_id == "header-only-froc":
        csv = tmp / "annotations.csv"
        csv.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n")
        out = tmp / "froc"

        def valid_json(_: str) -> None:
            text = (out / "froc.json").read_text()
            assert "NaN" not in text and "Infinity" not in text
            result = json.loads(text)
            assert result["cpm"] is None and all(v is None for v in result["sensitivity"].values())

        needles = [str(csv), "no nodules", "undefined"]
        return Case("lungdata", _froc_argv(w.tree, csv, w.results, out), needles, [w.froc_out], valid_json)
    if row_id == "header-only-prepare":
        tree = _copy(w.tree, tmp / "L")
        (tree / "annotations.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n")
        return Case("lungdata", _prepare(tree, tmp / "fresh"), ["warning", "no nodules", str(tree)], [tree])
    if row_id == "header-only-fit":
        tree = _copy(w.tree, tmp / "L")
        (tree / "annotations.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n")
        runs = _old_run(tmp)
        argv = ["fit", "--config", str(CLAF), "--config", str(_lungdet_overlay(tmp, tree))]
        argv += ["--trainer.fast_dev_run", "true"]
        needles = ["no nodules", str(tmp / "new_cache"), "annotations"]
        return Case("lungdet", argv, needles, [tree, runs / "claf_luna16" / "version_0"])
    if row_id == "empty-csv-froc":
        csv = tmp / "annotations.csv"
        csv.write_text("")
        out = _copy(w.froc_out, tmp / "froc")
        return Case("lungdata", _froc_argv(w.tree, csv, w.results, out), [str(csv), "empty"], [out])
    if row_id == "empty-csv-prepare":
        tree = _copy(w.tree, tmp / "L")
        csv = tree / "annotations.csv"
        csv.write_text("")
        return Case("lungdata", _prepare(tree, cache), [str(csv), "empty"], [cache])
    if row_id == "non-numeric-probability":
        results = tmp / "results.csv"
        lines = w.results.read_text().splitlines()
        lines[2] = ",".join(lines[2].split(",")[:4] + ["abc"])
        results.write_text("\n".join(lines) + "\n")
        out = _copy(w.froc_out, tmp / "froc")
        needles = [str(results), "row 2", "line 3", "probability", "abc"]
        argv = _froc_argv(w.tree, w.tree / "annotations.csv", results, out)
        return Case("lungdata", argv, needles, [out])
    if row_id == "config-typo-cli":
        runs = _old_run(tmp)
        argv = ["fit", "--config", str(CLAF), "--config", str(_lungdet_overlay(tmp, w.tree))]
        argv += ["--model.init_args.widht", "8"]
        needles = ["model.init_args.widht", "on the command line", "did you mean width?"]
        return Case("lungdet", argv, needles, [runs, w.tree])
    if row_id == "config-typo-yaml":
        runs = _old_run(tmp)
        typo = tmp / "typo.yaml"
        typo.write_text("# my settings\nmodel:\n  init_args:\n    widht: 8\n")
        argv = ["fit", "--config", str(CLAF), "--config", str(_lungdet_overlay(tmp, w.tree))]
        argv += ["--config", str(typo)]
        needles = ["model.init_args.widht", f"{typo}:4", "did you mean width?"]
        return Case("lungdet", argv, needles, [runs, w.tree])
    if row_id.startswith("checkpoint-"):
        import torch

        runs = _old_run(tmp)
        ckpt = tmp / "model.ckpt"
        if row_id == "checkpoint-random-bytes":
            ckpt.write_bytes(np.random.default_rng(0).bytes(4096))
        elif row_id == "checkpoint-truncated":
            torch.save({"state_dict": {"w": torch.zeros(64, 64)}, "hyper_parameters": {}}, ckpt)
            ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
        argv = ["test", "--config", str(CLAF), "--config", str(_lungdet_overlay(tmp, w.tree))]
        argv += ["--ckpt_path", str(ckpt)]

        def nothing_made(text: str) -> None:
            assert not (tmp / "new_cache").exists(), "no cache is built before the checkpoint is checked"
            assert "weights_only=False" not in text

        return Case("lungdet", argv, [str(ckpt), "--ckpt_path"], [runs, w.tree], nothing_made)
    if row_id == "stage1-results-missing":
        runs = _old_run(tmp)
        missing = tmp / "stage1_test_results.csv"
        argv = ["fit", "--config", str(REPO / "configs" / "mppn_luna16.yaml")]
        argv += ["--data.init_args.root", str(w.tree), "--data.init_args.cache_dir", str(tmp / "new_cache")]
        argv += [
            "--data.init_args.eval_candidates",
            "stage1",
            "--data.init_args.stage1_results_csv",
            str(missing),
        ]
        needles = [str(missing), "--data.init_args.stage1_results_csv", "lungdet test"]
        return Case("lungdet", argv, needles, [runs, w.tree])
    if row_id == "empty-data-root":
        empty = tmp / "empty"
        empty.mkdir()
        return Case("lungdata", _prepare(empty, cache), [str(empty), "lungdata synth luna16"], [cache])
    if row_id == "dicom-truncated-slice":
        series = _copy(w.dicom, tmp / "dicom" / "series1")
        bad = series / "slice_0010.dcm"
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
        out = _copy(w.dicom_cache, tmp / "dicom_cache")
        argv = ["prepare", "folder", "--root", str(series.parent), "--out", str(out)]
        return Case("lungdata", argv, [str(series), "slice_0010.dcm"], [out])
    if row_id == "predict-junk-file":
        folder = _copy(w.tree / "subset0", tmp / "new_scans")
        junk = folder / "notes.mhd"
        junk.write_text("these are my notes, not a scan\n")
        argv = ["predict", "--config", str(CLAF), "--config", str(_lungdet_overlay(tmp, w.tree))]
        argv += ["--data.init_args.predict_root", str(folder)]
        return Case("lungdet", argv, [str(junk), "--data.init_args.lenient true"], [folder])
    if row_id.startswith("analyze-"):
        return analyze_case(row_id, w, tmp)
    raise KeyError(row_id)


# ------------------------------------------------------------------------------------ lungcad analyze
# Every refusal below comes before any model is loaded (`lungcad.commands.analyze`: the --nodules CSV is
# read first, then the scan is read and checked, then the bundle is loaded and verified, checksums before
# weights), so the rows need no trained bundle: the input rows pass an empty bundle folder, the bundle rows
# a bundle.json whose one listed file is tampered or gone (the real `Bundle.load` refuses it), and the one
# row that succeeds (two series, one picked) runs with the models stood in for (nothing is detected).


def _analyze_series(folder: Path, uid: str, n: int = 8, spacing_z: float = 2.0, tags=None) -> list[Path]:
    """A small CT series (n slices of 24×24) written by common.io."""
    from common.dicom import write_dicom_series
    from common.io import CTVolume

    rng = np.random.default_rng(n)
    array = rng.integers(-1000, 200, (n, 24, 24)).astype(np.int16)
    volume = CTVolume(array, (1.5, 1.5, spacing_z), (-18.0, -18.0, -40.0), np.eye(3))
    return write_dicom_series(volume, folder, series_uid=uid, tags=tags)


def _stub_bundle(folder: Path, weights: bytes = b"weights") -> Path:
    """A bundle.json (the format `Bundle.load` reads) listing one file with its sha256."""
    from lungcad.bundle import BUNDLE_FILE, FORMAT, SCHEMA_VERSION

    folder.mkdir(parents=True)
    (folder / "stage1.ckpt").write_bytes(weights)
    files = {"stage1.ckpt": hashlib.sha256(weights).hexdigest()}
    manifest = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "files": files, "models": {}}
    (folder / BUNDLE_FILE).write_text(json.dumps(manifest))
    return folder


def _no_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stand in for the bundle and the models: the scan is read, chosen and written, nothing is detected."""
    import pandas as pd

    from lungcad.pipeline import Analysis

    def nothing_found(volume, bundle, **kwargs):
        candidates = pd.DataFrame(columns=["seriesuid", "coordX", "coordY", "coordZ", "probability"])
        labels = np.zeros(volume.shape, np.uint16)
        return Analysis(volume, [], labels, candidates, {}, {"name": "stand-in", "sha256": None})

    use_stand_in_models(monkeypatch, nothing_found)


def analyze_case(row_id: str, w: World, tmp: Path) -> Case:
    """The `lungcad analyze` rows: OUT holds an earlier scan's results, which must stay as they are."""
    import pydicom

    out = tmp / "out"
    (out / "earlier").mkdir(parents=True)
    (out / "earlier" / "report.json").write_text('{"earlier": true}\n')
    bundle = tmp / "bundle"
    bundle.mkdir()
    series = tmp / "dicom" / "series"
    uid = "1.2.826.0.1.3680043.8.498.19"

    def argv(*extra: str, source: Path = series) -> list[str]:
        return ["analyze", str(source), "--bundle", str(bundle), "--out", str(out), *extra]

    if row_id == "analyze-not-ct":
        _analyze_series(series, uid, tags={"0008|0060": "MR", "0008|0016": "1.2.840.10008.5.1.4.1.1.4"})
        return Case("lungcad", argv(), [str(series), f"MR series {uid}", "CT scans only"], [out])
    if row_id == "analyze-one-slice":
        _analyze_series(series, uid, n=1)
        return Case("lungcad", argv(), [str(series), uid, "slice_0000.dcm", "single slice"], [out])
    if row_id == "analyze-two-series":
        thick, thin = f"{uid}.1", f"{uid}.2"
        for name, n, dz in ((thick, 6, 4.0), (thin, 12, 2.0)):
            for k, f in enumerate(_analyze_series(tmp / name, name, n=n, spacing_z=dz)):
                series.mkdir(parents=True, exist_ok=True)
                f.rename(series / f"{name[-1]}_{k:04d}.dcm")

        def chose_thin(text: str) -> None:
            report = json.loads((out / thin / "report.json").read_text())
            assert report["scan"]["id"] == thin and report["scan"]["shape_zyx"][0] == 12
            assert {p.name for p in out.iterdir()} == {"earlier", thin}
            assert f"not chosen: CT series {thick}" in text

        needles = [f"chose CT series {thin}", "rule: axial, most slices, thinnest spacing"]
        return Case("lungcad", argv(), needles, [out / "earlier"], chose_thin, _no_models)
    if row_id == "analyze-mixed-orientation":
        files = _analyze_series(series, uid)
        ds = pydicom.dcmread(files[5])
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # a coronal slice inside the axial series
        ds.save_as(files[5])
        needles = [str(series), uid, "mixed orientations", "slice_0005.dcm", "--series-uid"]
        return Case("lungcad", argv(), needles, [out])
    if row_id == "analyze-gantry-tilt":
        _analyze_series(series, uid, tags={"0018|1120": "15"})
        needles = [str(series), uid, "gantry tilt 15 degrees", "slice_0000.dcm"]
        return Case("lungcad", argv(), needles, [out])
    if row_id == "analyze-missing-slice":
        _analyze_series(series, uid)[4].unlink()
        needles = [str(series), uid, "slice_0003.dcm -> slice_0005.dcm", "--dicom-tolerance MM"]
        return Case("lungcad", argv(), needles, [out])
    if row_id in ("analyze-bundle-tampered", "analyze-bundle-file-missing"):
        bundle.rmdir()
        _stub_bundle(bundle)
        weights = bundle / "stage1.ckpt"
        if row_id == "analyze-bundle-tampered":
            weights.write_bytes(b"weightz")
            needles = [str(bundle / "bundle.json"), "files.stage1.ckpt sha256", "re-copy"]
        else:
            weights.unlink()
            needles = [str(bundle / "bundle.json"), "files.stage1.ckpt is missing"]
        return Case("lungcad", argv(source=w.dicom), needles, [out, bundle])
    if row_id in ("analyze-nodules-non-numeric", "analyze-nodules-outside"):
        _analyze_series(series, uid)
        csv = tmp / "nodules.csv"
        if row_id == "analyze-nodules-non-numeric":
            csv.write_text(f"seriesuid,coordX,coordY,coordZ\n{uid},0,0,-35\n{uid},abc,0,-35\n")
            needles = [str(csv), "row 2", "line 3", "coordX", "abc"]
        else:
            csv.write_text(f"seriesuid,coordX,coordY,coordZ\n{uid},0,0,-35\n{uid},0,0,500\n")
            needles = [str(csv), "row 2 (line 3)", "outside its scan"]
        return Case("lungcad", argv("--nodules", str(csv)), needles, [out])
    raise KeyError(row_id)


# --------------------------------------------------------------------------------------- running


def _run(cli: str, argv: list[str]) -> int:
    if cli == "lungdata":
        from common.cli import main

        return main(argv)
    import logging

    if cli == "lungcad":
        from lungcad.cli import main
    else:
        from lungdet.cli import main

    # Stream handlers made during an earlier test (Lightning's on import, `lungdata`'s basicConfig) hold
    # that test's captured stderr, closed since: point them at this test's.
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if type(handler) is logging.StreamHandler:
                handler.stream = sys.stderr  # not setStream(): it flushes the closed one
    return main(argv)


def _check_output(row: Row, rc: int, out: str, err: str, log: str, needles: list[str]) -> None:
    assert "Traceback" not in err, f"traceback on stderr:\n{err}"
    assert rc == row.exit_code, (
        f"exit {rc}, expected {row.exit_code}\nstdout:\n{out}\nstderr:\n{err}\nlog:\n{log}"
    )
    if row.exit_code:
        lines = [line for line in err.splitlines() if "error:" in line]
        assert len(lines) == 1, f"expected one error line on stderr, got:\n{err}"
        message = lines[0]
    else:
        message = "\n".join([out, err, log])
    for needle in needles:
        assert needle in message, f"{needle!r} not in the message:\n{message}"


KILL_ROWS = ("kill-9-then-rerun", "concurrent-prepare")


@pytest.mark.parametrize(
    "row", [pytest.param(r, id=r.id, marks=r.marks) for r in ROWS if r.id not in KILL_ROWS]
)
def test_bad_input(row: Row, world: World, tmp_path, capsys, caplog, monkeypatch) -> None:
    import logging

    caplog.set_level(logging.INFO)
    c = case(row.id, world, tmp_path)
    if c.patch:
        c.patch(monkeypatch)
    before = {p: tree_digest(p) for p in c.protect}
    capsys.readouterr()
    rc = _run(c.cli, c.argv)
    captured = capsys.readouterr()
    _check_output(row, rc, captured.out, captured.err, caplog.text, c.needles)
    if row.exit_code == 0:
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) <= 1, f"warned more than once: {[r.getMessage() for r in warnings]}"
    for path, digest in before.items():
        assert tree_digest(path) == digest, f"{path} changed"
    if c.check:
        c.check("\n".join([captured.out, captured.err, caplog.text]))


# ---------------------------------------------------------------- kill -9 and a concurrent build

_SLOW_PREPARE = """
import sys, time
import common.cache as cache
real, calls = cache.preprocess_scan, []
def slow(*args, **kwargs):
    calls.append(1)
    if len(calls) > 1:
        time.sleep(120)  # killed here: the first scan is in the manifest, the second not begun
    return real(*args, **kwargs)
cache.preprocess_scan = slow
from common.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return "gone"


@pytest.fixture(scope="module")
def killed_build(world: World, tmp_path_factory) -> dict:
    """One real build, killed with SIGKILL mid-way: a second build meanwhile, a rerun at once after."""
    from common.cli import main

    out = tmp_path_factory.mktemp("killed") / "cache"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    argv = _prepare(world.tree, out)
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_PREPARE, *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    result: dict = {}
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            manifest = out / "manifest.json"
            if manifest.is_file() and json.loads(manifest.read_text())["scans"]:
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        else:
            pytest.fail("the build never recorded its first scan")
        before = tree_digest(out)
        result["concurrent"] = (_run_captured(main, argv), before, tree_digest(out), proc.pid)
        proc.kill()  # SIGKILL, not waited for: the pid stays a zombie until wait()
        deadline = time.monotonic() + 10
        while _state(proc.pid) not in ("Z", "gone") and time.monotonic() < deadline:
            time.sleep(0.01)
        result["zombie"] = _state(proc.pid) == "Z"
        result["rerun"] = (_run_captured(main, argv), None, None, proc.pid)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    result["out"] = out
    return result


def _run_captured(main, argv: list[str]) -> tuple[int, str, str]:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id) for r in ROWS if r.id in KILL_ROWS])
def test_killed_and_concurrent_prepare(row: Row, world: World, killed_build: dict) -> None:
    out = killed_build["out"]
    if row.id == "concurrent-prepare":
        (rc, stdout, stderr), before, after, pid = killed_build["concurrent"]
        _check_output(row, rc, stdout, stderr, "", [str(out), f"pid {pid}"])
        assert after == before, "the refused build changed the cache"
        return
    assert killed_build["zombie"], "the killed build was not a zombie when the rerun started"
    (rc, stdout, stderr), _, _, _ = killed_build["rerun"]
    _check_output(row, rc, stdout, stderr, "", ["1 up to date", f"{len(world.uids) - 1} built"])
    clean = json.loads((world.cache / "manifest.json").read_text())["scans"]
    resumed = json.loads((out / "manifest.json").read_text())["scans"]
    assert sorted(resumed) == sorted(clean)
    for uid in clean:
        for key in ("image_sha256", "lung_mask_sha256", "nodules", "shape"):
            assert resumed[uid][key] == clean[uid][key], (uid, key)
    assert not (out / ".lock").exists()


# ------------------------------------------------------------------------------------------ docs


def render_table() -> str:
    """The catalogue as the markdown table of docs/reliability.md."""
    lines = ["| # | bad input | command | exit | what the user gets |", "|---|---|---|---|---|"]
    for i, row in enumerate(ROWS, start=1):
        lines.append(f"| {i} | {row.bad_input} | `{row.command}` | {row.exit_code} | {row.behaviour} |")
    return "\n".join(lines)


def _doc_table(text: str) -> str:
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def test_docs_table_is_the_catalogue() -> None:
    assert _doc_table(DOC.read_text(encoding="utf-8")) == render_table(), (
        "docs/reliability.md differs from ROWS; run `python -m tests.reliability.test_catalogue`"
    )


def write_doc() -> None:
    text = DOC.read_text(encoding="utf-8")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    DOC.write_text(f"{head}{BEGIN}\n{render_table()}\n{END}{tail}", encoding="utf-8")


def test_columns_flag_maps_renamed_columns(world: World, tmp_path, capsys) -> None:
    """The fix the missing-column row names works: `--columns ROLE=NAME` reads a renamed header."""
    from common.cli import main

    tree = _copy(world.tree, tmp_path / "L")
    for name in ("annotations.csv", "annotations_excluded.csv"):  # one set of names for both tables
        csv = tree / name
        csv.write_text(csv.read_text().replace("diameter_mm", "d_mm", 1))
    out = tmp_path / "cache"
    assert main(_prepare(tree, out, "--columns", "diameter=d_mm")) == 0, capsys.readouterr().err
    scans = json.loads((out / "manifest.json").read_text())["scans"]
    assert all(len(entry["nodules"]) == 1 for entry in scans.values())


if __name__ == "__main__":
    write_doc()
