"""Longitudinal phantoms (`lungdata synth followup`): layout, determinism, and the truth manifest's own
consistency (poses move the nodules, growth follows the drawn VDT, kinds appear and vanish as stated)."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from common.cli import main as lungdata
from common.datasets.spatiotemporal import SpatioTemporalDataset
from common.io import read_volume
from common.synth.followup import (
    LUNG_SCALE_RANGE,
    MAX_ROTATION_DEG,
    MAX_SHIFT_MM,
    PATIENT_TABLE,
    VDT_RANGE_DAYS,
    read_truth,
)


def _digest(root):
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        out[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("followup")
    assert (
        lungdata(["synth", "followup", "--out", str(root), "--patients", "1", "--times", "3", "--seed", "5"])
        == 0
    )
    return root


def test_same_seed_same_bytes(tree, tmp_path):
    again = tmp_path / "again"
    assert (
        lungdata(["synth", "followup", "--out", str(again), "--patients", "1", "--times", "3", "--seed", "5"])
        == 0
    )
    assert _digest(tree) == _digest(again)


def test_layout_reads_with_the_spatiotemporal_adapter(tree):
    records = SpatioTemporalDataset(tree, patient_table=PATIENT_TABLE).records
    truth = read_truth(tree)["patients"][0]
    assert [r.uid for r in records] == ["P0001_T1", "P0001_T2", "P0001_T3"]
    assert {r.patient_id for r in records} == {"P0001"}
    assert [r.extras["time_point"] for r in records] == [1, 2, 3]
    for k, record in enumerate(records):
        present = [n for n in truth["nodules"] if n["per_time"][k]["present"]]
        assert len(record.nodules) == len(present)
    dates = [s["scan_date"] for s in truth["scans"]]
    assert dates == sorted(dates)
    volume = read_volume(tree / "detection_3d" / "mhd" / "P0001_T2.mhd")
    assert volume.shape == tuple(truth["geometry"]["shape_zyx"])


def test_truth_is_consistent(tree):
    truth = read_truth(tree)["patients"][0]
    kinds = {n["kind"] for n in truth["nodules"]}
    assert {"stable", "growing", "new", "resolved"} <= kinds
    poses = [s["pose"] for s in truth["scans"]]
    days = [s["days_from_first"] for s in truth["scans"]]
    assert poses[0]["shift_norm_mm"] == 0 and poses[0]["rotation_deg"] == 0
    for pose in poses[1:]:
        assert pose["shift_norm_mm"] <= MAX_SHIFT_MM and pose["rotation_deg"] <= MAX_ROTATION_DEG
        assert LUNG_SCALE_RANGE[0] <= pose["lung_scale"] <= LUNG_SCALE_RANGE[1]
    for nodule in truth["nodules"]:
        times = nodule["per_time"]
        present = [t["present"] for t in times]
        if nodule["kind"] == "new":
            assert not present[0] and present[-1]
        elif nodule["kind"] == "resolved":
            assert present[0] and not present[-1]
        else:
            assert all(present)
        if nodule["kind"] == "growing":
            assert VDT_RANGE_DAYS[0] <= nodule["vdt_days"] <= VDT_RANGE_DAYS[1]
            expected = 2.0 ** ((days[-1] - days[0]) / nodule["vdt_days"])
            assert times[-1]["volume_mm3"] / times[0]["volume_mm3"] == pytest.approx(expected, rel=1e-3)
        elif nodule["kind"] == "stable":
            assert len({t["volume_mm3"] for t in times}) == 1
        # The pose maps the first-scan centre onto each later centre (to within a voxel of rounding).
        for k in range(1, len(times)):
            if present[0] and present[k]:
                pose = poses[k]
                m = np.asarray(pose["matrix"])
                pivot = np.asarray(pose["pivot_mm"])
                moved = m @ (np.asarray(times[0]["world_xyz"]) - pivot) + pivot + np.asarray(pose["shift_mm"])
                assert np.linalg.norm(moved - np.asarray(times[k]["world_xyz"])) < 2.0


def test_nodules_are_visible_where_the_truth_says(tree):
    truth = read_truth(tree)["patients"][0]
    for k, scan in enumerate(truth["scans"]):
        volume = read_volume(tree / "detection_3d" / "mhd" / f"{scan['uid']}.mhd")
        for nodule in truth["nodules"]:
            record = nodule["per_time"][k]
            if not record["present"] or nodule["texture"] == "ggo":
                continue
            z, y, x = (int(round(v)) for v in volume.world_to_voxel(record["world_xyz"])[0])
            core = volume.array[z, y - 1 : y + 2, x - 1 : x + 2].astype(float).mean()
            assert core > -500.0, (nodule["nodule_id"], scan["uid"], core)
    assert math.isfinite(truth["scans"][-1]["pose"]["lung_scale"])
