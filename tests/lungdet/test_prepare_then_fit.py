"""The README's sequence: `lungdata prepare luna16 --root …` builds the cache that `lungdet fit` then finds.

Both commands are read from README.md, so the test follows the documentation; `lungdet fit` is built
without training (`run=False`) and its datamodule's `prepare_data()` must leave the prepared cache as is.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from common.cache import PreprocessedCache
from common.cli import main as lungdata
from lungdet.cli import run_cli

REPO = Path(__file__).resolve().parents[2]


def readme_command(prefix: str) -> list[str]:
    """The first README line that starts with `prefix`, without its comment, as arguments."""
    for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines():
        if line.startswith(prefix):
            return shlex.split(line.split("#", 1)[0])
    raise AssertionError(f"README.md has no line starting with {prefix!r}")


def test_lungdet_fit_finds_the_cache_lungdata_prepare_built(luna_tree, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LUNA16_ROOT", str(luna_tree))
    prepare = [
        str(luna_tree) if a == "$LUNA16_ROOT" else a for a in readme_command("lungdata prepare luna16")
    ]
    assert lungdata(prepare[1:]) == 0
    manifests = list(tmp_path.glob("cache/*/manifest.json"))
    assert len(manifests) == 1, f"prepare wrote {manifests}"
    cache = manifests[0].parent
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file() and p.name != ".lock"}

    fit = readme_command("lungdet fit     --config configs/claf_luna16.yaml")
    fit = [str(REPO / a) if a.startswith("configs/") else a for a in fit]
    cli = run_cli([*fit[2:], "--trainer.logger=false"], run=False)  # run=False takes no subcommand
    datamodule = cli.datamodule
    assert datamodule.cache_dir.resolve() == cache.resolve()
    datamodule.prepare_data()  # what `fit` does first: an unchanged cache is left alone
    after = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file() and p.name != ".lock"}
    assert {p: t for p, t in after.items() if p in before} == before
    assert set(PreprocessedCache(cache).uids) == set(datamodule.open_dataset().uids)
