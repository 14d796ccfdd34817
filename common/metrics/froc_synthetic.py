"""Synthetic LUNA16-style evaluation inputs: annotations, excluded findings, series list, CAD results.

The FROC code must be checked against the official LUNA16 evaluation script on inputs that exercise
every rule of that script (candidates on excluded findings, findings of unknown size, several marks on
one nodule, one mark on two touching nodules, scans without marks, scans with more than 100 marks,
tied probabilities). Real LUNA16 results cannot be shipped, so this module generates such inputs,
deterministically from a seed, in exactly the official CSV layouts. The fixtures in
``tests/data/froc/`` and ``bench/froc_bench.py`` are built with it.

Series UIDs are made up (``1.3.6.1.4.1.99999.<case>.<n>``); no real identifier is ever produced.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.datasets.tables import ANNOTATION_COLUMNS
from common.metrics.froc_io import (
    EVALUATION_FILES,
    RESULT_COLUMNS,
    write_annotations_csv,
    write_results_csv,
    write_seriesuids,
)


@dataclass(frozen=True)
class SyntheticFROCSpec:
    """Knobs of one generated result set.

    Attributes:
        n_scans: scans in the series list.
        nodules_per_scan: mean number of included nodules per scan (Poisson).
        excluded_per_scan: mean number of excluded findings per scan (Poisson).
        unknown_size_fraction: share of excluded findings written with diameter -1 (the official
            script then uses a 10 mm diameter for them).
        candidates_per_scan: false-positive marks per scan (before hits are added); an int gives that
            exact count, a pair ``(lo, hi)`` draws uniformly.
        detect_rate: probability that an included nodule receives at least one mark.
        extra_hit_rate: probability of each further mark on an already detected nodule (double hits).
        excluded_hit_rate: probability that an excluded finding receives a mark.
        touching_pairs: number of nodule pairs placed so close that one mark hits both.
        empty_scan_fraction: share of scans that get no marks at all (absent from the results file).
        probability_decimals: probabilities are rounded to this many decimals (fewer → more ties).
        overfull_scans: number of scans that receive 100-160 marks (exercises the 100-mark cap).
        coordinate_decimals: coordinates are rounded to this many decimals (keeps files small).
        marks_per_scan: when set, false positives fill every non-empty scan up to exactly this many
            marks (hits included), overriding ``candidates_per_scan``.
    """

    n_scans: int = 20
    nodules_per_scan: float = 1.3
    excluded_per_scan: float = 1.5
    unknown_size_fraction: float = 0.3
    candidates_per_scan: int | tuple[int, int] = (5, 30)
    detect_rate: float = 0.85
    extra_hit_rate: float = 0.3
    excluded_hit_rate: float = 0.6
    touching_pairs: int = 0
    empty_scan_fraction: float = 0.0
    probability_decimals: int = 6
    overfull_scans: int = 0
    coordinate_decimals: int = 4
    marks_per_scan: int | None = None


@dataclass
class SyntheticFROCCase:
    """The four evaluation inputs of one generated result set, as DataFrames / list."""

    annotations: pd.DataFrame
    excluded: pd.DataFrame
    seriesuids: list[str]
    results: pd.DataFrame

    def write(self, folder: str | Path) -> dict[str, Path]:
        """Write the four files in the official layouts and return their paths.

        ``seriesuids.csv`` has no header (as distributed with LUNA16); the other three have one.
        Floats are written in shortest round-trip form, so every reader parses the same numbers.
        """
        folder = Path(folder)
        paths = {key: folder / name for key, name in EVALUATION_FILES.items()}
        write_annotations_csv(self.annotations, paths["annotations"], float_format=None)
        write_annotations_csv(self.excluded, paths["excluded"], float_format=None)
        write_seriesuids(self.seriesuids, paths["seriesuids"])
        write_results_csv(self.results, paths["results"], float_format=None)
        return paths


def _random_unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _count(rng: np.random.Generator, spec: int | tuple[int, int]) -> int:
    if isinstance(spec, int):
        return spec
    return int(rng.integers(spec[0], spec[1] + 1))


def generate_froc_case(spec: SyntheticFROCSpec, seed: int, case_id: int = 0) -> SyntheticFROCCase:
    """Generate one LUNA16-style result set.

    Args:
        spec: what the set should contain.
        seed: seed of the numpy Generator; the same (spec, seed) always gives the same files.
        case_id: goes into the made-up series UIDs so different cases never share a UID.

    Returns:
        The annotations, excluded findings, series list and results.
    """
    rng = np.random.default_rng(seed)
    uids = [f"1.3.6.1.4.1.99999.{case_id}.{1000 + i}" for i in range(spec.n_scans)]
    ann_rows: list[tuple] = []
    exc_rows: list[tuple] = []
    res_rows: list[tuple] = []
    overfull = set(rng.choice(spec.n_scans, size=min(spec.overfull_scans, spec.n_scans), replace=False))
    pairs_left = spec.touching_pairs

    for s, uid in enumerate(uids):
        centre_box_lo = np.array([-150.0, -200.0, -300.0])
        centre_box_hi = np.array([150.0, 100.0, -50.0])
        n_nod = int(rng.poisson(spec.nodules_per_scan))
        nod_xyz = rng.uniform(centre_box_lo, centre_box_hi, size=(n_nod, 3))
        nod_d = np.clip(rng.lognormal(np.log(7.0), 0.5, size=n_nod), 3.0, 32.0)
        if pairs_left > 0 and n_nod >= 1:
            # A second nodule touching the first: centres closer than both radii, so a mark between
            # them lies inside both spheres.
            d2 = float(np.clip(nod_d[0] * rng.uniform(0.8, 1.2), 3.0, 32.0))
            offset = _random_unit_vectors(rng, 1)[0] * 0.45 * min(nod_d[0], d2)
            nod_xyz = np.vstack([nod_xyz, nod_xyz[0] + offset])
            nod_d = np.append(nod_d, d2)
            n_nod += 1
            pairs_left -= 1
            res_rows.append((uid, *(nod_xyz[0] + offset / 2), float(rng.uniform(0.5, 1.0))))
        for xyz, d in zip(nod_xyz, nod_d):
            ann_rows.append((uid, *xyz, float(d)))

        n_exc = int(rng.poisson(spec.excluded_per_scan))
        exc_xyz = rng.uniform(centre_box_lo, centre_box_hi, size=(n_exc, 3))
        exc_d = np.where(
            rng.random(n_exc) < spec.unknown_size_fraction, -1.0, rng.uniform(1.0, 6.0, size=n_exc)
        )
        for xyz, d in zip(exc_xyz, exc_d):
            exc_rows.append((uid, *xyz, float(d)))

        if rng.random() < spec.empty_scan_fraction:
            continue
        n_before = len(res_rows)
        # Hits on included nodules: inside the sphere, several per nodule sometimes.
        for xyz, d in zip(nod_xyz, nod_d):
            if rng.random() >= spec.detect_rate:
                continue
            n_hits = 1
            while rng.random() < spec.extra_hit_rate and n_hits < 4:
                n_hits += 1
            dist = rng.uniform(0.0, 0.95 * d / 2, size=n_hits)
            pts = xyz + _random_unit_vectors(rng, n_hits) * dist[:, None]
            probs = rng.beta(5.0, 1.5, size=n_hits)
            res_rows.extend((uid, *p, float(q)) for p, q in zip(pts, probs))
        # Marks on excluded findings (radius 5 mm when the diameter is unknown).
        for xyz, d in zip(exc_xyz, exc_d):
            if rng.random() >= spec.excluded_hit_rate:
                continue
            radius = 5.0 if d < 0 else d / 2
            p = xyz + _random_unit_vectors(rng, 1)[0] * rng.uniform(0.0, 0.95 * radius)
            res_rows.append((uid, *p, float(rng.beta(2.0, 2.0))))
        # False positives anywhere in the chest.
        if s in overfull:
            n_fp = int(rng.integers(100, 161))
        elif spec.marks_per_scan is not None:
            n_fp = max(0, spec.marks_per_scan - (len(res_rows) - n_before))
        else:
            n_fp = _count(rng, spec.candidates_per_scan)
        fp_xyz = rng.uniform(centre_box_lo, centre_box_hi, size=(n_fp, 3))
        fp_p = rng.beta(1.2, 4.0, size=n_fp)
        res_rows.extend((uid, *p, float(q)) for p, q in zip(fp_xyz, fp_p))

    results = pd.DataFrame(res_rows, columns=RESULT_COLUMNS)
    results["probability"] = results["probability"].round(spec.probability_decimals)
    annotations = pd.DataFrame(ann_rows, columns=ANNOTATION_COLUMNS)
    excluded = pd.DataFrame(exc_rows, columns=ANNOTATION_COLUMNS)
    for frame in (results, annotations, excluded):
        frame[["coordX", "coordY", "coordZ"]] = frame[["coordX", "coordY", "coordZ"]].round(
            spec.coordinate_decimals
        )
    for frame in (annotations, excluded):
        frame["diameter_mm"] = frame["diameter_mm"].round(spec.coordinate_decimals)
    # Shuffle so that the file order carries no information (the official script must not depend on it).
    results = results.iloc[rng.permutation(len(results))].reset_index(drop=True)
    return SyntheticFROCCase(
        annotations=annotations,
        excluded=excluded,
        seriesuids=uids,
        results=results,
    )


def luna16_scale_spec() -> SyntheticFROCSpec:
    """The benchmark size: 888 scans, about 1186 nodules, exactly 100 marks per scan on average."""
    return SyntheticFROCSpec(
        n_scans=888,
        nodules_per_scan=1186 / 888,
        excluded_per_scan=1.5,
        marks_per_scan=100,
        detect_rate=0.95,
        extra_hit_rate=0.3,
        excluded_hit_rate=0.5,
        probability_decimals=6,
    )
