"""`lungdata prepare`: end to end on a tiny LUNA16 tree, errors, and resuming after the process is killed."""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.cli import main
from common.datasets.luna16 import LUNA16Dataset
from common.datasets.registry import DATASETS, dataset_class, register_dataset
from tests.common.luna_tree import write_tiny_luna16

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def luna(tmp_path):
    return write_tiny_luna16(tmp_path / "luna", n_scans=3, n_subsets=2)


def test_prepare_builds_then_skips(luna, tmp_path, capsys):
    out = tmp_path / "cache"
    assert main(["prepare", "luna16", "--root", str(luna.root), "--out", str(out)]) == 0
    assert "3 built, 0 up to date, 0 failed" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["scans"]) == sorted(luna.uids)
    assert main(["prepare", "luna16", "--root", str(luna.root), "--out", str(out)]) == 0
    assert "0 built, 3 up to date, 0 failed" in capsys.readouterr().out


def test_prepare_options_and_root_from_environment(luna, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LUNA16_ROOT", str(luna.root))
    out = tmp_path / "cache"
    argv = [
        "prepare",
        "luna16",
        "--out",
        str(out),
        "--spacing",
        "2",
        "--lung-mask",
        "computed",
        "--order",
        "1",
    ]
    assert main(argv) == 0
    entry = next(iter(json.loads((out / "manifest.json").read_text())["scans"].values()))
    assert entry["spacing"] == [2.0, 2.0, 2.0] and entry["shape"] == [50, 48, 48]
    assert entry["lung_mask_source"] == "computed" and entry["settings"]["order"] == 1
    assert main(["prepare", "luna16", "--out", str(out), "--spacing", "1", "2"]) == 2
    assert "--spacing takes one value or three" in capsys.readouterr().err


def test_prepare_errors_name_the_problem(luna, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("LUNA16_ROOT", raising=False)
    assert main(["prepare", "luna16", "--out", str(tmp_path / "c")]) == 2
    assert "set LUNA16_ROOT" in capsys.readouterr().err
    assert main(["prepare", "luna16", "--root", str(tmp_path / "missing"), "--out", str(tmp_path / "c")]) == 2
    assert "lungdata synth luna16" in capsys.readouterr().err
    with open(luna.root / "annotations.csv", "a") as fh:
        fh.write("9.9.9,1,2,3,4\n")
    assert main(["prepare", "luna16", "--root", str(luna.root), "--out", str(tmp_path / "c")]) == 2
    assert "annotations.csv, line 5: seriesuid '9.9.9' has no scan" in capsys.readouterr().err
    assert not (tmp_path / "c" / "manifest.json").exists()
    argv = ["prepare", "luna16", "--root", str(luna.root), "--out", str(tmp_path / "c"), "--lenient"]
    assert main(argv) == 0
    assert "3 built" in capsys.readouterr().out


def test_a_bad_scan_stops_strict_runs_and_is_skipped_by_lenient_runs(luna, tmp_path, capsys):
    bad = luna.uids[2]
    raw = luna.root / "subset0" / f"{bad}.raw"
    raw.write_bytes(raw.read_bytes()[:-4])
    out = tmp_path / "cache"
    assert main(["prepare", "luna16", "--root", str(luna.root), "--out", str(out)]) == 2
    assert f"{bad}.raw: size mismatch" in capsys.readouterr().err
    assert main(["prepare", "luna16", "--root", str(luna.root), "--out", str(out), "--lenient"]) == 0
    printed = capsys.readouterr().out
    # The strict run had finished the scan before the bad one; the lenient run keeps it and does the rest.
    assert "1 built, 1 up to date, 1 failed" in printed and f"failed {bad}: " in printed
    assert bad not in json.loads((out / "manifest.json").read_text())["scans"]


def test_registry():
    assert dataset_class("luna16") is LUNA16Dataset
    for name in DATASETS:  # every registered adapter imports and takes (root, strict=...)
        cls = dataset_class(name)
        assert cls.name == name and "strict" in inspect.signature(cls).parameters
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        dataset_class("nope")
    register_dataset("luna16_alias", "common.datasets.luna16:LUNA16Dataset")
    try:
        assert dataset_class("luna16_alias") is LUNA16Dataset
    finally:
        del DATASETS["luna16_alias"]


# A `lungdata prepare` whose reader sleeps before every scan, so it can be killed between scans.
SLOW_PREPARE = """
import sys, time
import common.io
_read = common.io.read_volume
def slow_read(*args, **kwargs):
    time.sleep(2.0)
    return _read(*args, **kwargs)
common.io.read_volume = slow_read
from common.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _scans_in_manifest(path: Path) -> dict:
    try:
        return json.loads(path.read_text())["scans"]
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def test_killed_prepare_resumes_without_redoing_finished_scans(luna, tmp_path):
    out = tmp_path / "cache"
    argv = ["prepare", "luna16", "--root", str(luna.root), "--out", str(out)]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_PREPARE, *argv], cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + 120
        while not _scans_in_manifest(out / "manifest.json"):
            assert proc.poll() is None, "prepare ended before it could be interrupted"
            assert time.monotonic() < deadline, "no scan was written in time"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = _scans_in_manifest(out / "manifest.json")
    assert 1 <= len(done) < 3
    finished = {
        uid: [(out / entry[key]).stat().st_mtime_ns for key in ("image", "lung_mask")]
        for uid, entry in done.items()
    }
    result = subprocess.run(
        [sys.executable, "-m", "common.cli", *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert f"{3 - len(done)} built, {len(done)} up to date, 0 failed" in result.stdout, (
        result.stdout + result.stderr
    )
    manifest = _scans_in_manifest(out / "manifest.json")
    assert sorted(manifest) == sorted(luna.uids)
    for uid, mtimes in finished.items():
        assert [(out / manifest[uid][key]).stat().st_mtime_ns for key in ("image", "lung_mask")] == mtimes
        assert manifest[uid]["image_sha256"] == done[uid]["image_sha256"]
    assert not list(out.rglob(".*"))
