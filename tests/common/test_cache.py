"""Preprocessed cache: content, checksums, skip/rebuild logic, atomicity and bad-input behaviour."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from common.cache import PrepareSettings, PreprocessedCache, sha256_file
from common.datasets.base import ScanRecord
from common.datasets.luna16 import LUNA16Dataset
from common.datasets.tables import AnnotationError
from common.io import CTVolume, VolumeReadError, write_mhd
from tests.common.luna_tree import NODULE_HU, write_tiny_luna16


@pytest.fixture
def luna(tmp_path):
    return write_tiny_luna16(tmp_path / "luna", n_scans=3, n_subsets=2)


def _snapshot(root):
    """Bytes of every file under the cache (to prove a failed build changed nothing)."""
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _mtimes(cache):
    return {p: p.stat().st_mtime_ns for p in sorted(cache.root.rglob("*.npy"))}


def test_build_writes_arrays_and_a_complete_manifest(luna, tmp_path):
    records = LUNA16Dataset(luna.root).records
    cache = PreprocessedCache(tmp_path / "cache")
    report = cache.build(records, PrepareSettings())
    assert sorted(report.built) == sorted(luna.uids) and not report.skipped and not report.failed
    assert sorted(cache.uids) == sorted(luna.uids) and len(cache) == 3 and luna.uids[0] in cache
    manifest = json.loads(cache.manifest_path.read_text())
    assert manifest["format"] == "lungcad-preprocessed-cache"
    for i, uid in enumerate(luna.uids):
        image, mask, entry = cache.load(uid)
        assert isinstance(image, np.memmap) and image.dtype == np.int16 and mask.dtype == np.uint8
        assert list(image.shape) == entry["shape"] == [99, 96, 96]
        assert entry["spacing"] == [1.0, 1.0, 1.0]
        assert entry["original_shape"] == [40, 64, 64] and entry["original_spacing"] == [1.5, 1.5, 2.5]
        assert entry["patient_id"] == uid and entry["fold"] == i % 2
        np.testing.assert_allclose(entry["origin"], luna.volumes[uid].origin)
        np.testing.assert_allclose(np.reshape(entry["direction"], (3, 3)), luna.volumes[uid].direction)
        assert entry["image_sha256"] == sha256_file(cache.root / entry["image"])
        assert entry["lung_mask_sha256"] == sha256_file(cache.root / entry["lung_mask"])
        assert entry["lung_mask_source"] == "provided"
        assert set(np.unique(mask)) == {0, 1}
        assert image.min() >= -1024  # FOV padding became air
        (nodule,) = entry["nodules"]
        np.testing.assert_allclose(nodule["world_xyz"], luna.nodules[uid][0], atol=1e-5)
        assert nodule["diameter_mm"] == 8.0 and nodule["source"].endswith("annotations.csv:" + str(i + 2))
        # The voxel coordinate points into the planted nodule, flipped direction included.
        centre = tuple(int(v) for v in np.rint(nodule["voxel_zyx"]))
        assert image[centre] > NODULE_HU - 40
        assert mask[centre] == 1
        (excluded,) = entry["excluded"]
        assert excluded["diameter_mm"] == -1.0
        assert entry["inputs"][0]["path"].endswith(f"{uid}.mhd") and len(entry["input_fingerprint"]) == 64
    # No temporaries or lock left behind.
    assert not list(cache.root.rglob(".*"))


def test_rerun_skips_unchanged_scans_and_rebuilds_changed_ones(luna, tmp_path):
    records = LUNA16Dataset(luna.root).records
    cache = PreprocessedCache(tmp_path / "cache")
    cache.build(records)
    before = _mtimes(cache)
    again = cache.build(LUNA16Dataset(luna.root).records)
    assert sorted(again.skipped) == sorted(luna.uids) and not again.built
    assert _mtimes(cache) == before

    # Change the pixels of one scan (same size): only that scan is rebuilt.
    changed = luna.uids[1]
    volume = luna.volumes[changed]
    write_mhd(volume.with_array(volume.array + np.int16(1)), luna.root / "subset1" / f"{changed}.mhd")
    third = cache.build(LUNA16Dataset(luna.root).records)
    assert third.built == [changed] and len(third.skipped) == 2
    after = _mtimes(cache)
    assert [p for p in after if after[p] != before[p]] == [
        cache.root / "images" / f"{changed}.npy",
        cache.root / "lung_masks" / f"{changed}.npy",
    ]

    # New settings rebuild everything; computed masks say so.
    fourth = cache.build(LUNA16Dataset(luna.root).records, PrepareSettings(lung_mask="computed"))
    assert sorted(fourth.built) == sorted(luna.uids)
    assert {e["lung_mask_source"] for e in cache.entries.values()} == {"computed"}


def test_edited_annotations_update_the_manifest_without_rebuilding(luna, tmp_path):
    cache = PreprocessedCache(tmp_path / "cache")
    cache.build(LUNA16Dataset(luna.root).records)
    before = _mtimes(cache)
    csv = luna.root / "annotations.csv"
    csv.write_text(csv.read_text().replace(",8.0\n", ",9.5\n"))
    report = cache.build(LUNA16Dataset(luna.root).records)
    assert len(report.skipped) == 3 and _mtimes(cache) == before
    assert {e["nodules"][0]["diameter_mm"] for e in cache.entries.values()} == {9.5}


def test_resume_after_interruption_rebuilds_only_missing_work(luna, tmp_path):
    records = LUNA16Dataset(luna.root).records
    cache = PreprocessedCache(tmp_path / "cache")
    cache.build(records)
    # Simulate a build killed while writing the third scan: its entry never reached the manifest, a
    # temporary file and a stale lock of a dead process are left behind.
    manifest = json.loads(cache.manifest_path.read_text())
    lost = sorted(manifest["scans"])[2]
    del manifest["scans"][lost]
    cache.manifest_path.write_text(json.dumps(manifest))
    (cache.root / "images" / f".{lost}.npy.tmp-999999").write_bytes(b"partial")
    (cache.root / ".lock").write_text("999999999")
    before = _mtimes(cache)
    report = cache.build(records)
    assert report.built == [lost] and len(report.skipped) == 2
    changed = [p.name for p in _mtimes(cache) if _mtimes(cache)[p] != before.get(p)]
    assert sorted(changed) == [f"{lost}.npy", f"{lost}.npy"]
    assert not list(cache.root.rglob(".*"))


def test_a_live_lock_refuses_a_second_builder_after_its_wait(luna, tmp_path):
    cache = PreprocessedCache(tmp_path / "cache")
    cache.lock_wait_s = 0.0
    cache.root.mkdir()
    (cache.root / ".lock").write_text(str(os.getppid()))
    with pytest.raises(RuntimeError, match="being written by another build"):
        cache.build(LUNA16Dataset(luna.root).records)


def test_a_second_builder_waits_for_a_live_lock_and_then_builds(luna, tmp_path, caplog):
    """Two runs started together on one cache: the second waits for the first's lock instead of failing."""
    import threading

    cache = PreprocessedCache(tmp_path / "cache")
    cache.root.mkdir()
    lock = cache.root / ".lock"
    lock.write_text(str(os.getppid()))  # a live process other than this one holds it
    release = threading.Timer(1.0, lambda: lock.unlink())
    release.start()
    start = time.monotonic()
    with caplog.at_level(logging.INFO, logger="common.cache"):
        report = cache.build(LUNA16Dataset(luna.root).records)
    release.join()
    assert time.monotonic() - start >= 1.0
    assert "waiting for it" in caplog.text
    assert len(report.built) == len(LUNA16Dataset(luna.root).records) and not lock.exists()


def _hold_build_lock(root: str, out: str, barrier) -> None:
    """Child process: take the build lock, record when it held it (and what the lock file said), let go."""
    cache = PreprocessedCache(root)
    # fault injection: each builder pauses right after the lock file appears (created or linked), the
    # moment a rival reading it would find it without a pid if the pid were written only afterwards
    real_open, real_link = os.open, os.link

    def slow_open(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        if flags & os.O_EXCL:
            time.sleep(0.2)
        return fd

    def slow_link(*args, **kwargs):
        real_link(*args, **kwargs)
        time.sleep(0.2)

    os.open, os.link = slow_open, slow_link
    barrier.wait()
    with cache._lock():
        start = time.monotonic()
        seen = (cache.root / ".lock").read_text()
        time.sleep(0.3)
        Path(out).write_text(json.dumps([start, time.monotonic(), seen, os.getpid()]))


def test_builders_racing_for_a_dead_lock_hold_it_one_at_a_time(tmp_path):
    """Four builders find the lock of a killed build at once: one takes it over, the others wait their turn."""
    import multiprocessing

    root = tmp_path / "cache"
    root.mkdir()
    (root / ".lock").write_text("999999999")  # a killed build's pid
    context = multiprocessing.get_context("fork")
    outs = [tmp_path / f"held-{i}.json" for i in range(4)]
    barrier = context.Barrier(len(outs))
    workers = [context.Process(target=_hold_build_lock, args=(str(root), str(o), barrier)) for o in outs]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    spans = sorted(json.loads(o.read_text()) for o in outs)
    for (_, end, *_), (start, *_) in zip(spans, spans[1:]):
        assert start >= end, spans  # never two holders at once
    assert all(seen == str(pid) for _, _, seen, pid in spans)  # the lock names its holder from the start
    assert not list(root.glob(".lock*"))


def _corrupt_truncated(root, uid, subset):
    raw = root / subset / f"{uid}.raw"
    raw.write_bytes(raw.read_bytes()[:1000])
    return rf"{uid}\.raw: size mismatch, expected 327680 bytes .* 1000 bytes"


def _corrupt_missing(root, uid, subset):
    (root / subset / f"{uid}.raw").unlink()
    return rf"{uid}\.mhd: ElementDataFile {uid}\.raw not found"


def _corrupt_zero_spacing(root, uid, subset):
    header = root / subset / f"{uid}.mhd"
    header.write_text(
        header.read_text().replace("ElementSpacing = 1.5 1.5 2.5", "ElementSpacing = 1.5 0 2.5")
    )
    return rf"{uid}\.mhd: invalid voxel spacing"


@pytest.mark.parametrize("corrupt", [_corrupt_truncated, _corrupt_missing, _corrupt_zero_spacing])
def test_bad_scan_fails_clearly_and_leaves_the_cache_intact(luna, tmp_path, corrupt):
    cache = PreprocessedCache(tmp_path / "cache")
    cache.build(LUNA16Dataset(luna.root).records)
    records = LUNA16Dataset(luna.root).records  # indexed before the damage, as a long prepare run would be
    snapshot = _snapshot(cache.root)
    bad = luna.uids[1]
    pattern = corrupt(luna.root, bad, "subset1")
    # Make the bad scan need a rebuild and put a good one to rebuild before it.
    good = luna.uids[0]
    write_mhd(luna.volumes[good].with_array(luna.volumes[good].array + np.int16(2)), records[0].image_path)
    with pytest.raises((VolumeReadError, FileNotFoundError), match=pattern):
        cache.build(records)
    after = _snapshot(cache.root)
    # Everything about the bad scan is as before; the good scan that came first was rebuilt and recorded.
    for name in (f"images/{bad}.npy", f"lung_masks/{bad}.npy"):
        assert after[Path(name)] == snapshot[Path(name)]
    old_manifest = json.loads(snapshot[Path("manifest.json")])["scans"]
    new_manifest = json.loads(after[Path("manifest.json")])["scans"]
    assert new_manifest[bad] == old_manifest[bad]
    assert new_manifest[good]["image_sha256"] != old_manifest[good]["image_sha256"]
    assert not list(cache.root.rglob(".*"))
    # Lenient mode logs the bad scan and finishes the others.
    report = cache.build(records, strict=False)
    assert list(report.failed) == [bad] and bad in cache


def test_nan_voxels_and_unreadable_dicom_fail_per_scan(tmp_path):
    nan = np.zeros((8, 16, 16), dtype=np.float32)
    nan[3, 4, 5] = np.nan
    nan_path = write_mhd(CTVolume(nan, (1, 1, 1), (0, 0, 0), np.eye(3)), tmp_path / "in" / "nan.mhd")
    junk = tmp_path / "in" / "dicom"
    junk.mkdir()
    (junk / "IM0001.dcm").write_bytes(b"garbage" * 50)
    good = CTVolume(np.full((8, 16, 16), -1000, np.int16), (2, 2, 2), (0, 0, 0), np.eye(3))
    good_path = write_mhd(good, tmp_path / "in" / "good.mhd")
    records = [
        ScanRecord("good", "p1", good_path),
        ScanRecord("nan", "p2", nan_path),
        ScanRecord("dicom", "p3", junk),
    ]
    cache = PreprocessedCache(tmp_path / "cache")
    with pytest.raises(VolumeReadError, match=r"nan\.mhd: 1 voxel\(s\) are NaN"):
        cache.build(records)
    assert cache.uids == ["good"]
    with pytest.raises(VolumeReadError, match=r"dicom: no readable DICOM series"):
        cache.build([records[0], records[2]])
    report = cache.build(records, strict=False)
    assert report.skipped == ["good"] and sorted(report.failed) == ["dicom", "nan"]
    assert cache.uids == ["good"]
    image, mask, entry = cache.load("good")
    assert entry["lung_mask_source"] == "computed" and mask.sum() == 0


def test_annotation_outside_its_volume_is_an_error_naming_the_row(luna, tmp_path):
    uid = luna.uids[0]
    with open(luna.root / "annotations.csv", "a") as fh:
        fh.write(f"{uid},900.0,0.0,-100.0,6.0\n")
    cache = PreprocessedCache(tmp_path / "cache")
    with pytest.raises(
        AnnotationError, match=rf"annotations\.csv:5: finding at world \(900\.0.*outside scan {uid}"
    ):
        cache.build(LUNA16Dataset(luna.root).records)
    assert uid not in cache
    cache.build(LUNA16Dataset(luna.root, strict=False).records, strict=False)
    assert len(cache.entry(uid)["nodules"]) == 1


def test_load_verifies_checksums_and_reports_missing_scans(luna, tmp_path):
    cache = PreprocessedCache(tmp_path / "cache")
    cache.build(LUNA16Dataset(luna.root, subsets=[1]).records)
    uid = luna.uids[1]
    image, _, _ = cache.load(uid, mmap=False, verify=True)
    assert not isinstance(image, np.memmap)
    path = cache.root / "images" / f"{uid}.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum differs"):
        cache.load(uid, verify=True)
    with pytest.raises(KeyError, match="not in the cache"):
        cache.load(luna.uids[0])
    # A damaged array file is noticed by the next build and rebuilt.
    path.write_bytes(b"not an npy file")
    assert cache.build(LUNA16Dataset(luna.root, subsets=[1]).records).built == [uid]


def test_parallel_build_gives_the_same_arrays(luna, tmp_path):
    records = LUNA16Dataset(luna.root).records
    serial = PreprocessedCache(tmp_path / "serial")
    serial.build(records)
    parallel = PreprocessedCache(tmp_path / "parallel")
    report = parallel.build(records, workers=2)
    assert sorted(report.built) == sorted(luna.uids)
    for uid in luna.uids:
        assert parallel.entry(uid)["image_sha256"] == serial.entry(uid)["image_sha256"]
        assert parallel.entry(uid)["lung_mask_sha256"] == serial.entry(uid)["lung_mask_sha256"]


def test_settings_and_uid_validation(tmp_path):
    with pytest.raises(ValueError, match="lung_mask"):
        PrepareSettings(lung_mask="magic")
    with pytest.raises(ValueError, match="spacing"):
        PrepareSettings(spacing=(1.0, 0.0, 1.0))
    assert PrepareSettings().digest() == PrepareSettings(spacing=(1, 1, 1)).digest()
    assert PrepareSettings().digest() != PrepareSettings(spacing=(0.8, 0.8, 0.8)).digest()
    record = ScanRecord("../evil", "p", tmp_path / "x.mhd")
    with pytest.raises(ValueError, match="cannot name a cache file"):
        PreprocessedCache(tmp_path / "cache").build([record])
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
