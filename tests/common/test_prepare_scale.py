"""`lungdata prepare` at scale: `--workers N` and `--shard I/N` (run concurrently) write the very bytes one
plain process writes, each scan by exactly one shard, with the manifest merged from all of them."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from common.cache import PreprocessedCache, parse_shard, shard_records
from common.cli import main
from common.datasets.luna16 import LUNA16Dataset
from tests.common.luna_tree import write_tiny_luna16


@pytest.fixture(scope="module")
def luna(tmp_path_factory):
    return write_tiny_luna16(tmp_path_factory.mktemp("luna") / "luna", n_scans=5, n_subsets=2)


@pytest.fixture(scope="module")
def reference(luna, tmp_path_factory) -> Path:
    """The cache of one plain `lungdata prepare` run."""
    out = tmp_path_factory.mktemp("one") / "cache"
    assert main(["prepare", "luna16", "--root", str(luna.root), "--out", str(out)]) == 0
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _prepare(argv: list[str]) -> int:
    return main(argv)


def test_workers_2_writes_the_same_bytes_as_workers_1(luna, reference, tmp_path):
    out = tmp_path / "cache"
    assert main(["prepare", "luna16", "--root", str(luna.root), "--out", str(out), "--workers", "2"]) == 0
    assert _files(out) == _files(reference)


def test_two_concurrent_shards_give_the_cache_of_one_process(luna, reference, tmp_path, capsys):
    out = tmp_path / "cache"
    argv = ["prepare", "luna16", "--root", str(luna.root), "--out", str(out), "--shard"]
    # two processes at the same time, as a SLURM array would run them on one shared folder
    with multiprocessing.get_context("fork").Pool(2) as pool:
        assert pool.map(_prepare, [[*argv, "0/2"], [*argv, "1/2"]]) == [0, 0]
    files = _files(out)
    assert files == _files(reference)
    assert not [name for name in files if Path(name).name.startswith(".")]  # no lock or temporary left
    # each scan was written by exactly one shard; a rerun of either shard finds its scans up to date
    assert main([*argv, "1/2"]) == 0
    assert "0 built, 2 up to date, 0 failed" in capsys.readouterr().out


def test_a_shard_alone_adds_its_scans_to_an_existing_manifest(luna, reference, tmp_path, capsys):
    out = tmp_path / "cache"
    argv = ["prepare", "luna16", "--root", str(luna.root), "--out", str(out), "--shard"]
    assert main([*argv, "2/3"]) == 0
    text = capsys.readouterr().out
    assert "(shard 2/3): 1 built" in text and "1 of 5 scans of the dataset are in the cache so far" in text
    assert main([*argv, "0/3"]) == 0 and main([*argv, "1/3"]) == 0
    assert "5 of 5 scans" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text()) == json.loads(
        (reference / "manifest.json").read_text()
    )


def test_shards_partition_the_scans_whatever_their_order(luna):
    records = LUNA16Dataset(luna.root).records
    shards = [shard_records(records, i, 3) for i in range(3)]
    again = [shard_records(list(reversed(records)), i, 3) for i in range(3)]
    assert [[r.uid for r in s] for s in shards] == [[r.uid for r in s] for s in again]
    assert sorted(r.uid for s in shards for r in s) == sorted(luna.uids)
    assert parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(ValueError, match="give I/N with 0 <= I < N"):
            parse_shard(bad)


def test_bad_shard_and_workers_are_one_line_errors(luna, tmp_path, capsys):
    base = ["prepare", "luna16", "--root", str(luna.root), "--out", str(tmp_path / "c")]
    assert main([*base, "--shard", "2/2"]) == 2
    assert "--shard '2/2': give I/N" in capsys.readouterr().err
    assert main([*base, "--workers", "0"]) == 2
    assert "--workers 0: give at least 1" in capsys.readouterr().err
    assert not PreprocessedCache(tmp_path / "c").manifest_path.exists()


def test_a_scan_is_resampled_with_a_fixed_blas_thread_count(luna, tmp_path, monkeypatch):
    """float32 matrix products round differently with another thread count, so every build — and
    `prepare_volume`, what `lungcad analyze` runs — resamples with the same one."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from common import preprocess
    from common.cache import SCAN_BLAS_THREADS, PrepareSettings, prepare_volume

    seen = []
    resample = preprocess.resample_isotropic

    def spy(*args, **kwargs):
        seen.append({pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"})
        return resample(*args, **kwargs)

    monkeypatch.setattr(preprocess, "resample_isotropic", spy)
    records = LUNA16Dataset(luna.root).records[:1]
    with threadpool_limits(limits=2):
        PreprocessedCache(tmp_path / "cache").build(records)
        prepare_volume(luna.volumes[records[0].uid], PrepareSettings())
    assert seen == [{SCAN_BLAS_THREADS}, {SCAN_BLAS_THREADS}]
