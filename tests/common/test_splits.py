"""Patient-level splits: determinism, no leakage, file round trips, refusal of leaking files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.datasets.base import Nodule, ScanRecord
from common.splits import (
    Split,
    SplitError,
    SplitItem,
    claf_sixfold,
    items_from_records,
    kfold_split,
    luna16_subset_folds,
    max_nodule_label,
    ratio_split,
)


def _records(n_patients: int = 30, scans_per_patient: int = 2) -> list[ScanRecord]:
    """Patients with follow-up scans; every third patient has a malignant (label 1) nodule."""
    out = []
    for p in range(n_patients):
        for t in range(scans_per_patient):
            label = 1 if p % 3 == 0 else 0
            nodules = [Nodule((0.0, 0.0, 0.0), 6.0, label=label) for _ in range(p % 4)]
            out.append(ScanRecord(f"P{p:03d}_T{t + 1}", f"P{p:03d}", Path("x.mhd"), nodules, fold=p % 10))
    return out


def _patients_per_part(split: Split) -> dict[str, set[str]]:
    return {part: set(split.patients(part)) for part in split.parts}


def _assert_disjoint(split: Split) -> None:
    seen: dict[str, str] = {}
    for a in split.assignments:
        assert seen.setdefault(a.patient_id, a.part) == a.part, f"patient {a.patient_id} in two parts"


def test_ratio_split_is_patient_level_and_deterministic():
    items = items_from_records(_records())
    a = ratio_split(items, seed=7)
    b = ratio_split(items, seed=7)
    c = ratio_split(items, seed=8)
    assert a.assignments == b.assignments
    assert a.assignments != c.assignments
    _assert_disjoint(a)
    counts = a.counts()
    assert counts["train"]["patients"] == 21  # 0.7 of 30
    assert {counts["val"]["patients"], counts["test"]["patients"]} == {4, 5}
    assert sum(c["scans"] for c in counts.values()) == 60


def test_stratified_ratio_split_keeps_class_proportions():
    records = _records(60, 1)
    items = items_from_records(records, max_nodule_label)
    split = ratio_split(items, {"train": 0.5, "test": 0.5}, seed=1, stratify=True, require_all_classes=True)
    labels = {i.uid: i.label for i in items}
    for label in (None, 0, 1):
        total = sum(v == label for v in labels.values())
        for part in split.parts:
            in_part = sum(labels[u] == label for u in split.uids(part))
            assert abs(in_part - total / 2) <= 0.5, (label, part, in_part, total)  # exact within a stratum


def test_ratio_split_refuses_empty_part_and_missing_class():
    items = [SplitItem("a", "p1"), SplitItem("b", "p2")]
    with pytest.raises(SplitError, match="received no patient"):
        ratio_split(items, {"train": 0.8, "val": 0.1, "test": 0.1})
    items = [SplitItem(f"s{i}", f"p{i}", 1 if i == 0 else 0) for i in range(10)]
    with pytest.raises(SplitError, match="no sample of class"):
        ratio_split(items, {"train": 0.5, "test": 0.5}, stratify=True, require_all_classes=True)


@pytest.mark.parametrize("stratify", [False, True])
def test_kfold_split_covers_every_patient_once(stratify):
    items = items_from_records(_records(), max_nodule_label)
    split = kfold_split(items, k=5, seed=3, stratify=stratify)
    _assert_disjoint(split)
    assert split.parts == [f"fold{i}" for i in range(5)]
    assert sum(len(split.patients(p)) for p in split.parts) == 30
    assert split.assignments == kfold_split(items, k=5, seed=3, stratify=stratify).assignments
    fold = split.fold(2)
    assert set(fold["test"]) == set(split.uids("fold2"))
    assert set(fold["val"]) == set(split.uids("fold3"))
    assert len(fold["train"]) + len(fold["val"]) + len(fold["test"]) == 60
    assert not set(fold["train"]) & (set(fold["val"]) | set(fold["test"]))


def test_kfold_needs_enough_patients():
    with pytest.raises(SplitError, match="at least 6 patients"):
        kfold_split([SplitItem(f"s{i}", f"p{i}") for i in range(4)], k=6)


def test_claf_sixfold_balances_nodules():
    records = _records(60, 1)
    split = claf_sixfold(records, seed=0)
    assert len(split.parts) == 6 and split.meta["method"] == "claf-6fold"
    nodules = {r.uid: len(r.nodules) for r in records}
    per_fold = [sum(nodules[u] for u in split.uids(p)) for p in split.parts]
    assert max(per_fold) - min(per_fold) <= 4, per_fold  # 90 nodules over 6 folds of 10 patients


def test_stratified_kfold_with_strata_smaller_than_k():
    records = _records(6, 1)  # strata of 1-2 patients each, fewer than the six folds
    split = claf_sixfold(records, seed=1)
    assert [len(split.patients(p)) for p in split.parts] == [1] * 6
    assert split.assignments == claf_sixfold(records, seed=1).assignments


def test_luna16_subset_folds_and_patient_conflicts():
    records = [ScanRecord(f"u{i}", f"u{i}", Path("x"), fold=i % 10) for i in range(20)]
    split = luna16_subset_folds(records)
    assert split.part_of("u13") == "subset3"
    leaky = [*records, ScanRecord("u99", "u1", Path("x"), fold=5)]
    with pytest.raises(SplitError, match="patient 'u1' has scans in subsets \\[1, 5\\]"):
        luna16_subset_folds(leaky)
    merged = luna16_subset_folds(leaky, on_conflict="merge")
    assert merged.part_of("u99") == "subset1"
    with pytest.raises(SplitError, match="no LUNA16 subset"):
        luna16_subset_folds([ScanRecord("u", "u", Path("x"))])


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_round_trip(tmp_path, suffix):
    records = _records()
    split = kfold_split(items_from_records(records), k=3, seed=0)
    path = split.save(tmp_path / f"split{suffix}")
    loaded = Split.load(path)
    assert loaded.assignments == split.assignments
    assert loaded.parts == split.parts
    loaded.check_against(records)


def test_load_refuses_patient_in_two_parts(tmp_path):
    path = tmp_path / "split.csv"
    path.write_text("uid,patient_id,part\nP1_T1,P1,train\nP1_T2,P1,test\nP2_T1,P2,test\n")
    with pytest.raises(SplitError, match=r"patient 'P1' appears in parts \['test', 'train'\]"):
        Split.load(path)


def test_load_names_bad_rows_and_columns(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("uid,patient_id,part\nA,P1,train\nB,,test\n")
    with pytest.raises(SplitError, match="line 3"):
        Split.load(bad)
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("uid,part\nA,train\n")
    with pytest.raises(SplitError, match="patient_id"):
        Split.load(nocol)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text(json.dumps({"assignments": [["A", "P1", "train"], ["B", "P2"]]}))
    with pytest.raises(SplitError, match="assignment 1"):
        Split.load(bad_json)
    with pytest.raises(FileNotFoundError, match="lungdata split make"):
        Split.load(tmp_path / "missing.json")


def test_check_against_dataset(tmp_path):
    records = _records(5, 1)
    split = ratio_split(items_from_records(records), {"train": 0.6, "test": 0.4})
    with pytest.raises(SplitError, match="not in the dataset"):
        split.check_against(records[1:])
    renamed = [ScanRecord(r.uid, "other", r.image_path) for r in records]
    with pytest.raises(SplitError, match="patient"):
        split.check_against(renamed)
