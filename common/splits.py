"""Patient-level data splits, written to a file that experiments reference.

Why a module of its own: every number we compare with a paper depends on which scans were trained on.
A split is therefore made once, seeded, saved as a small JSON or CSV file (one row per scan:
``uid, patient_id, part``) and loaded by every run that uses it. Splitting always happens at the patient
level — a patient's scans (the spatio-temporal dataset's follow-ups T1…Tm, the occasional second LIDC
series) all land in one part — and loading a file re-checks that, so a hand-edited or foreign split that
leaks a patient across parts is refused with the patient and the parts named.

Split kinds:

* ``ratio_split`` — train/val/test (any names) by ratios, optionally stratified by a per-patient label.
* ``kfold_split`` — k patient-disjoint folds (``fold0`` … ``fold{k-1}``), optionally stratified
  (scikit-learn ``GroupKFold``; seeded stratified dealing).
* ``luna16_subset_folds`` — the ten official LUNA16 subsets (``subset0`` … ``subset9``) as folds.
* ``claf_sixfold`` — the six-fold cross-validation of the CLAF paper (Wang et al. 2025). The paper states only
  that six folds were used ("six subsets"), not how they were formed. We form six seeded patient-level
  folds stratified by the number of nodules per patient (0, 1, 2, ≥3), so every fold holds a similar
  share of the nodules and of nodule-free scans; this choice is recorded in the split file's metadata.

A k-fold split becomes train/val/test for one experiment with :meth:`Split.fold`.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold

from common import atomic
from common.datasets.base import ScanRecord

log = logging.getLogger(__name__)

SPLIT_FORMAT = "lungcad-split/1"
CSV_COLUMNS = ("uid", "patient_id", "part")
CLAF_NUM_FOLDS = 6
LUNA16_NUM_SUBSETS = 10


class SplitError(ValueError):
    """A split that is inconsistent (patient in two parts, unknown scan, empty part, missing class)."""


@dataclass(frozen=True)
class SplitItem:
    """One scan to be split.

    Attributes:
        uid: the scan key (unique).
        patient_id: scans sharing it always land in the same part.
        label: stratum for stratified splits (class label, nodule-count bucket); None = unlabelled.
    """

    uid: str
    patient_id: str
    label: int | None = None


@dataclass(frozen=True)
class Assignment:
    """One row of a split file."""

    uid: str
    patient_id: str
    part: str


@dataclass
class Split:
    """A patient-level assignment of scans to named parts.

    Attributes:
        assignments: one entry per scan.
        meta: how the split was made (method, seed, ratios/folds, stratification); saved with JSON files.
    """

    assignments: list[Assignment]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._by_uid = {a.uid: a for a in self.assignments}
        self._parts_present = list(dict.fromkeys(a.part for a in self.assignments))

    # ----------------------------------------------------------------- queries
    @property
    def parts(self) -> list[str]:
        """Part names: the order recorded at creation (JSON files), else a canonical order.

        The canonical order puts train/val/test first and sorts the rest naturally (fold2 before fold10),
        so a CSV file gives the same fold numbering whatever its row order.
        """
        present = set(self._parts_present)
        recorded = [p for p in self.meta.get("parts", []) if p in present]
        rest = sorted(present - set(recorded), key=_part_sort_key)
        return recorded + rest

    def uids(self, part: str | Iterable[str]) -> list[str]:
        """Scan uids of one part (or several), in file order."""
        wanted = {part} if isinstance(part, str) else set(part)
        unknown = wanted - set(self.parts)
        if unknown:
            raise KeyError(f"split has no part(s) {sorted(unknown)}; its parts are {self.parts}")
        return [a.uid for a in self.assignments if a.part in wanted]

    def patients(self, part: str) -> list[str]:
        """Distinct patient ids of one part, in file order."""
        return list(dict.fromkeys(a.patient_id for a in self.assignments if a.part == part))

    def __contains__(self, uid: object) -> bool:
        return uid in self._by_uid

    def __len__(self) -> int:
        return len(self.assignments)

    def part_of(self, uid: str) -> str:
        try:
            return self._by_uid[uid].part
        except KeyError:
            raise KeyError(f"scan {uid!r} is not in this split") from None

    def counts(self) -> dict[str, dict[str, int]]:
        """Per part: number of patients and scans."""
        return {
            part: {"patients": len(self.patients(part)), "scans": len(self.uids(part))} for part in self.parts
        }

    def select(self, records: Iterable[ScanRecord], part: str | Iterable[str]) -> list[ScanRecord]:
        """The records of a dataset that belong to `part`, in dataset order."""
        wanted = set(self.uids(part))
        return [r for r in records if r.uid in wanted]

    def fold(self, index: int, with_val: bool = True) -> dict[str, list[str]]:
        """Train/val/test uids for experiment `index` of a k-fold split.

        Fold `index` is the test set; with `with_val` the next fold (cyclically) is the validation set;
        the rest is training. For LUNA16 subsets and the CLAF six folds this gives the usual rotation.
        """
        parts = self.parts
        k = len(parts)
        if k < 2:
            raise SplitError(f"a k-fold split needs at least two parts, this one has {parts}")
        if not 0 <= index < k:
            raise SplitError(f"fold index {index} out of range for a {k}-fold split ({parts})")
        test = parts[index]
        val = parts[(index + 1) % k] if with_val and k > 2 else None
        train = [p for p in parts if p not in (test, val)]
        out = {"train": self.uids(train), "test": self.uids(test)}
        out["val"] = self.uids(val) if val else []
        return out

    # ----------------------------------------------------------------- checks
    def check(self, source: str = "split") -> None:
        """Refuse duplicated scans, patients spread over several parts, and empty splits.

        Raises:
            SplitError: naming the scan or the patient and the parts involved.
        """
        if not self.assignments:
            raise SplitError(f"{source}: the split is empty (no scans assigned)")
        uid_counts = Counter(a.uid for a in self.assignments)
        dupes = [u for u, n in uid_counts.items() if n > 1]
        if dupes:
            raise SplitError(f"{source}: scan {dupes[0]!r} is listed {uid_counts[dupes[0]]} times")
        parts_of: dict[str, set[str]] = defaultdict(set)
        for a in self.assignments:
            parts_of[a.patient_id].add(a.part)
        for patient, parts in parts_of.items():
            if len(parts) > 1:
                uids = [a.uid for a in self.assignments if a.patient_id == patient]
                raise SplitError(
                    f"{source}: patient {patient!r} appears in parts {sorted(parts)} (scans {uids}); a "
                    "patient's scans must all be in one part. Regenerate it with `lungdata split make`."
                )

    def check_against(self, records: Iterable[ScanRecord], source: str = "split") -> None:
        """Check the split against a dataset: every split scan exists and patient ids agree.

        Scans of the dataset that the split does not mention are allowed (a split may cover a subset) and
        logged as a count.

        Raises:
            SplitError: on a uid the dataset does not have, or a patient id that differs from the dataset's.
        """
        by_uid = {r.uid: r for r in records}
        for a in self.assignments:
            record = by_uid.get(a.uid)
            if record is None:
                raise SplitError(
                    f"{source}: scan {a.uid!r} (part {a.part!r}) is not in the dataset; was the split made "
                    "for another dataset or root?"
                )
            if record.patient_id != a.patient_id:
                raise SplitError(
                    f"{source}: scan {a.uid!r} has patient {a.patient_id!r} in the split but "
                    f"{record.patient_id!r} in the dataset; regenerate the split"
                )
        missing = len(set(by_uid) - set(self._by_uid))
        if missing:
            log.info("%s: %d dataset scans are not in the split and will be unused", source, missing)

    def check_classes(self, labels: Mapping[str, int | None], parts: Sequence[str] | None = None) -> None:
        """Refuse a split in which a part lacks a class present in the data (SPEC §9).

        Args:
            labels: uid → class label (None entries are ignored).
            parts: parts to check; default all.
        """
        present = {v for v in labels.values() if v is not None}
        for part in parts or self.parts:
            in_part = {labels.get(u) for u in self.uids(part)} - {None}
            missing = sorted(present - in_part)
            if missing:
                raise SplitError(
                    f"part {part!r} has no sample of class(es) {missing} ({len(self.uids(part))} scans); "
                    "use a stratified split, another seed, or fewer parts"
                )

    # ----------------------------------------------------------------- I/O
    def save(self, path: str | Path) -> Path:
        """Write the split atomically as JSON (with metadata) or CSV (`uid,patient_id,part`)."""
        path = Path(path)
        self.check(str(path))
        suffix = path.suffix.lower()
        if suffix == ".json":
            payload = {
                "format": SPLIT_FORMAT,
                "meta": {**self.meta, "parts": self.parts},
                "assignments": [[a.uid, a.patient_id, a.part] for a in self.assignments],
            }
            text = json.dumps(payload, indent=1) + "\n"
        elif suffix == ".csv":
            rows = [(a.uid, a.patient_id, a.part) for a in self.assignments]
            frame = pd.DataFrame(rows, columns=CSV_COLUMNS)
            text = frame.to_csv(index=False)
        else:
            raise ValueError(f"split file {path} must end in .json or .csv")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, text)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Split:
        """Read a split file written by :meth:`save` (or by hand) and check it.

        Raises:
            FileNotFoundError: the file does not exist.
            SplitError: malformed rows (named by row number) or a patient in two parts.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"split file {path} does not exist; make one with `lungdata split make`")
        suffix = path.suffix.lower()
        if suffix == ".json":
            assignments, meta = _parse_json_split(path)
        elif suffix == ".csv":
            assignments, meta = _parse_csv_split(path), {}
        else:
            raise ValueError(f"split file {path} must end in .json or .csv")
        split = cls(assignments, meta)
        split.check(str(path))
        return split


_CANONICAL_PARTS = ("train", "val", "validate", "valid", "test")


def _part_sort_key(name: str) -> tuple:
    """train/val/test first, then natural order (digits compared as numbers)."""
    if name in _CANONICAL_PARTS:
        return (0, _CANONICAL_PARTS.index(name))
    return (1, tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)))


# --------------------------------------------------------------------------- items
def nodule_count_stratum(record: ScanRecord, cap: int = 3) -> int:
    """Number of nodules of a scan, capped (0, 1, 2, ≥cap) — the CLAF fold stratum."""
    return min(len(record.nodules), cap)


def max_nodule_label(record: ScanRecord) -> int | None:
    """The highest nodule label of a scan (malignant beats benign), None if no nodule is labelled."""
    labels = [n.label for n in record.nodules if n.label is not None]
    return max(labels) if labels else None


def items_from_records(
    records: Iterable[ScanRecord], stratum: Callable[[ScanRecord], int | None] | None = None
) -> list[SplitItem]:
    """Turn dataset records into split items, with an optional stratum per scan."""
    return [SplitItem(r.uid, r.patient_id, stratum(r) if stratum else None) for r in records]


def _group_patients(items: Sequence[SplitItem]) -> dict[str, list[SplitItem]]:
    if not items:
        raise SplitError("nothing to split: the dataset has no scans")
    uid_counts = Counter(i.uid for i in items)
    dupes = [u for u, n in uid_counts.items() if n > 1]
    if dupes:
        raise SplitError(f"scan uid {dupes[0]!r} occurs {uid_counts[dupes[0]]} times in the input")
    groups: dict[str, list[SplitItem]] = defaultdict(list)
    for item in items:
        groups[item.patient_id].append(item)
    return dict(sorted(groups.items()))


def _patient_stratum(scans: Sequence[SplitItem]) -> int:
    """One stratum per patient: the highest scan label (any malignant scan makes the patient malignant)."""
    labels = [s.label for s in scans if s.label is not None]
    return max(labels) if labels else -1


def _assign(groups: Mapping[str, list[SplitItem]], part_of_patient: Mapping[str, str]) -> list[Assignment]:
    return [Assignment(s.uid, s.patient_id, part_of_patient[p]) for p, scans in groups.items() for s in scans]


# --------------------------------------------------------------------------- split makers
def ratio_split(
    items: Sequence[SplitItem],
    ratios: Mapping[str, float] | None = None,
    seed: int = 0,
    stratify: bool = False,
    require_all_classes: bool = False,
) -> Split:
    """Split patients into named parts by ratio.

    Patients are shuffled with `seed` and allotted by largest remainder, separately within each stratum
    when `stratify` is set, so class proportions carry over to every part.

    Args:
        items: scans with patient ids (and labels when stratifying).
        ratios: part name → share; normalised. Default train/val/test 0.7/0.15/0.15.
        seed: shuffling seed; the same seed and items give the same split.
        stratify: balance the per-patient label (highest scan label) across parts.
        require_all_classes: raise when a part ends up without a class present in the data.

    Raises:
        SplitError: a part with a positive ratio received no patient, or (with `require_all_classes`) a
            class is missing from a part.
    """
    ratios = dict(ratios or {"train": 0.7, "val": 0.15, "test": 0.15})
    if not ratios or any(r < 0 for r in ratios.values()) or sum(ratios.values()) <= 0:
        raise SplitError(f"ratios must be non-negative with a positive sum, got {ratios}")
    names = list(ratios)
    shares = np.array([ratios[n] for n in names], dtype=np.float64) / sum(ratios.values())
    groups = _group_patients(items)
    strata: dict[int, list[str]] = defaultdict(list)
    for patient, scans in groups.items():
        strata[_patient_stratum(scans) if stratify else 0].append(patient)

    rng = np.random.default_rng(seed)
    part_of: dict[str, str] = {}
    for stratum in sorted(strata):
        patients = list(strata[stratum])
        rng.shuffle(patients)
        counts = _largest_remainder(len(patients), shares, rng)
        start = 0
        for name, count in zip(names, counts):
            for patient in patients[start : start + count]:
                part_of[patient] = name
            start += count

    empty = [n for n, s in zip(names, shares) if s > 0 and n not in set(part_of.values())]
    if empty:
        raise SplitError(
            f"part(s) {empty} received no patient ({len(groups)} patients, ratios {ratios}); "
            "use more data, larger ratios or fewer parts"
        )
    split = Split(
        _assign(groups, part_of),
        {"method": "ratio", "seed": seed, "ratios": ratios, "stratified": stratify, "parts": names},
    )
    if require_all_classes:
        split.check_classes({i.uid: i.label for i in items})
    return split


def _largest_remainder(n: int, shares: np.ndarray, rng: np.random.Generator) -> list[int]:
    """Integer counts summing to n, proportional to shares; remainder ties broken by a seeded draw."""
    exact = shares * n
    counts = np.floor(exact).astype(int)
    remainder = n - int(counts.sum())
    if remainder:
        frac = exact - counts
        order = np.lexsort((rng.random(len(shares)), -frac))
        counts[order[:remainder]] += 1
    return counts.tolist()


def kfold_split(
    items: Sequence[SplitItem],
    k: int = 5,
    seed: int = 0,
    stratify: bool = False,
    part_prefix: str = "fold",
) -> Split:
    """Split patients into `k` disjoint folds named ``{part_prefix}0`` … ``{part_prefix}{k-1}``.

    Without stratification, scikit-learn's shuffled ``GroupKFold`` over the scans with the patients as
    groups (so folds also hold similar numbers of scans). With stratification, patients are shuffled within
    their stratum and dealt to the folds in turn, one stratum after the other, which keeps every stratum
    spread evenly even when a stratum has fewer patients than folds (where scikit-learn's
    ``StratifiedGroupKFold`` refuses). Both are seeded: the same seed gives the same folds.

    Raises:
        SplitError: fewer patients than folds.
    """
    if k < 2:
        raise SplitError(f"k-fold needs k >= 2, got {k}")
    groups = _group_patients(items)
    if len(groups) < k:
        raise SplitError(f"{k}-fold split needs at least {k} patients, the data has {len(groups)}")
    patients = list(groups)
    part_of: dict[str, str] = {}
    if stratify:
        rng = np.random.default_rng(seed)
        by_stratum: dict[int, list[str]] = defaultdict(list)
        for patient in patients:
            by_stratum[_patient_stratum(groups[patient])].append(patient)
        turn = int(rng.integers(k))
        for stratum in sorted(by_stratum):
            members = by_stratum[stratum]
            for i in rng.permutation(len(members)):
                part_of[members[i]] = f"{part_prefix}{turn % k}"
                turn += 1
    else:
        scans = [(number, patient) for number, patient in enumerate(patients) for _ in groups[patient]]
        group_index = np.array([number for number, _ in scans])
        folds = GroupKFold(n_splits=k, shuffle=True, random_state=seed).split(group_index, groups=group_index)
        for fold_index, (_, test_index) in enumerate(folds):
            for i in test_index:
                part_of[scans[i][1]] = f"{part_prefix}{fold_index}"
    names = [f"{part_prefix}{i}" for i in range(k)]
    return Split(
        _assign(groups, part_of),
        {"method": "kfold", "k": k, "seed": seed, "stratified": stratify, "parts": names},
    )


def claf_sixfold(records: Sequence[ScanRecord], seed: int = 0) -> Split:
    """The CLAF paper's six-fold cross-validation (CLAF (Wang et al. 2025), "six subsets").

    The paper does not say how the six folds were drawn. We use seeded patient-level folds stratified by
    the nodule count per patient (0, 1, 2, ≥3) so nodules and nodule-free scans spread evenly.
    """
    split = kfold_split(
        items_from_records(records, nodule_count_stratum), k=CLAF_NUM_FOLDS, seed=seed, stratify=True
    )
    split.meta.update(
        {
            "method": "claf-6fold",
            "stratum": "nodules per patient (0, 1, 2, >=3)",
            "note": "CLAF (Wang et al. 2025) gives no fold construction; seeded patient-level folds, nodule-balanced",
        }
    )
    return split


def luna16_subset_folds(records: Sequence[ScanRecord], on_conflict: str = "error") -> Split:
    """The ten official LUNA16 subsets as folds ``subset0`` … ``subset9`` (from `ScanRecord.fold`).

    Args:
        records: LUNA16 records whose `fold` is the subset index.
        on_conflict: what to do when one patient's scans sit in different subsets (possible when patient
            ids come from LIDC, which has a few patients with two series): "error" refuses, "merge" moves
            all of that patient's scans to its lowest-numbered subset (a documented deviation from the
            official folds, logged).

    Raises:
        SplitError: a record without a subset index, or a patient in two subsets with on_conflict="error".
    """
    if on_conflict not in ("error", "merge"):
        raise ValueError(f"on_conflict must be 'error' or 'merge', got {on_conflict!r}")
    if not records:
        raise SplitError("nothing to split: the dataset has no scans")
    subset_of: dict[str, set[int]] = defaultdict(set)
    for r in records:
        if r.fold is None:
            raise SplitError(
                f"scan {r.uid!r} has no LUNA16 subset (expected under subset0…subset9); the official folds "
                "need the subset folders"
            )
        subset_of[r.patient_id].add(int(r.fold))
    moved = 0
    assignments = []
    for r in records:
        subsets = subset_of[r.patient_id]
        if len(subsets) > 1:
            if on_conflict == "error":
                raise SplitError(
                    f"patient {r.patient_id!r} has scans in subsets {sorted(subsets)}; pass "
                    "on_conflict='merge' (CLI: --merge-patients) to keep each patient in one fold"
                )
            moved += int(r.fold) != min(subsets)
        assignments.append(Assignment(r.uid, r.patient_id, f"subset{min(subsets)}"))
    if moved:
        log.warning("moved %d scans to their patient's lowest LUNA16 subset to avoid patient leakage", moved)
    names = [f"subset{i}" for i in range(LUNA16_NUM_SUBSETS)]
    return Split(assignments, {"method": "luna16-subsets", "merged_scans": moved, "parts": names})


# --------------------------------------------------------------------------- file parsing
def _parse_json_split(path: Path) -> tuple[list[Assignment], dict[str, Any]]:
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SplitError(f"split file {path} is not valid JSON: {err}") from None
    if not isinstance(payload, dict) or "assignments" not in payload:
        raise SplitError(f"split file {path} has no 'assignments' list (format {SPLIT_FORMAT})")
    assignments = []
    for row_number, row in enumerate(payload["assignments"]):
        if isinstance(row, dict):
            row = [row.get(c) for c in CSV_COLUMNS]
        if not isinstance(row, list) or len(row) != 3 or not all(isinstance(v, str) and v for v in row):
            raise SplitError(
                f"split file {path}, assignment {row_number}: expected [uid, patient_id, part], got {row!r}"
            )
        assignments.append(Assignment(*row))
    return assignments, dict(payload.get("meta") or {})


def _parse_csv_split(path: Path) -> list[Assignment]:
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise SplitError(f"split file {path} is empty; expected columns {','.join(CSV_COLUMNS)}") from None
    missing = [c for c in CSV_COLUMNS if c not in frame.columns]
    if missing:
        raise SplitError(f"split file {path} lacks column(s) {missing}; expected {','.join(CSV_COLUMNS)}")
    assignments = []
    for row_number, row in enumerate(frame[list(CSV_COLUMNS)].itertuples(index=False), start=2):
        values = [str(v).strip() for v in row]
        if not all(values):
            raise SplitError(f"split file {path}, line {row_number}: empty uid, patient_id or part")
        assignments.append(Assignment(*values))
    return assignments


def describe(split: Split) -> str:
    """A short human-readable table of patients and scans per part."""
    counts = split.counts()
    width = max(len(p) for p in counts) if counts else 4
    lines = [f"{'part':<{width}}  patients  scans"]
    lines += [f"{p:<{width}}  {c['patients']:>8}  {c['scans']:>5}" for p, c in counts.items()]
    total_p = sum(c["patients"] for c in counts.values())
    total_s = sum(c["scans"] for c in counts.values())
    lines.append(f"{'total':<{width}}  {total_p:>8}  {total_s:>5}")
    meta = {k: v for k, v in split.meta.items() if k != "parts"}
    if meta:
        lines.append("meta: " + json.dumps(meta, sort_keys=True))
    return "\n".join(lines)


__all__ = [
    "Assignment",
    "CLAF_NUM_FOLDS",
    "Split",
    "SplitError",
    "SplitItem",
    "claf_sixfold",
    "describe",
    "items_from_records",
    "kfold_split",
    "luna16_subset_folds",
    "max_nodule_label",
    "nodule_count_stratum",
    "ratio_split",
]
