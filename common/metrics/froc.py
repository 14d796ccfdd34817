"""LUNA16 FROC and CPM with the official evaluation rules, vectorised.

This reproduces the numbers of the official LUNA16 script ``noduleCADEvaluationLUNA16.py`` (the
revision every recent paper uses: 100-mark cap, unknown sizes as 10 mm, missed nodules excluded
from the ROC analysis), without its per-scan Python loops. ``docs/metrics.md`` states every rule
and every place where we deliberately differ (only for inputs on which the script crashes or
returns NaN).

Pipeline:

1. :func:`match_candidates` applies the hit rules per scan and produces the pooled list of FROC
   entries the script builds (one entry per detected nodule with its best mark's probability, one
   per missed nodule, one per false positive).
2. :func:`froc_curve` turns the entries into the script's curve: scikit-learn's ``roc_curve``
   (including its dropping of collinear points) rescaled to false positives per scan and
   sensitivity over all nodules.
3. :func:`read_sensitivities` reads the seven operating points, by linear interpolation (default)
   or by the "nearest operating point at or above" rule of several published copies.
4. :func:`bootstrap_froc` resamples scans exactly as the script does (same generator, same draw
   order), so with the same seed it gives the same mean and 95% interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy import sparse

FP_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
"""The seven false-positive rates (per scan) whose mean sensitivity is the CPM."""

MAX_MARKS_PER_SCAN = 100
"""The official script keeps at most this many marks per scan (the most probable ones)."""

UNKNOWN_DIAMETER_MM = 10.0
"""Diameter used for findings whose diameter is negative (``-1`` in ``annotations_excluded.csv``)."""

MISSED_NODULE_SCORE = -1.0e9
"""Score the official script gives to missed nodules (they stay out of the ROC analysis itself)."""

BOOTSTRAP_GRID = np.linspace(0.125, 8.0, num=10000)
"""FP-rate grid on which the official script interpolates every bootstrap curve."""

Reading = Literal["interp", "nearest"]


@dataclass(frozen=True)
class FROCEntries:
    """The pooled list that the official script analyses.

    Attributes:
        scores: probability of each entry (``MISSED_NODULE_SCORE`` for missed nodules).
        is_lesion: True for nodules (detected or missed), False for false-positive marks.
        counted: False for missed nodules, which only enlarge the sensitivity denominator.
        scan: index of the entry's scan in the series list.
        n_scans: number of scans in the series list (the FP-rate denominator).
    """

    scores: np.ndarray
    is_lesion: np.ndarray
    counted: np.ndarray
    scan: np.ndarray
    n_scans: int

    @property
    def n_lesions(self) -> int:
        return int(self.is_lesion.sum())

    @property
    def n_detected(self) -> int:
        return int((self.is_lesion & self.counted).sum())

    @property
    def n_false_positives(self) -> int:
        return int((~self.is_lesion).sum())


@dataclass(frozen=True)
class MatchCounts:
    """The candidate statistics the official script writes to ``CADAnalysis.txt``."""

    n_scans: int
    n_candidates: int
    n_nodules: int
    true_positives: int
    false_positives: int
    false_negatives: int
    ignored_on_excluded: int
    ignored_double_hits: int
    removed_by_cap: int

    @property
    def sensitivity(self) -> float:
        return self.true_positives / self.n_nodules if self.n_nodules else 0.0

    @property
    def candidates_per_scan(self) -> float:
        return self.n_candidates / self.n_scans if self.n_scans else 0.0


@dataclass(frozen=True)
class FROCCurve:
    """Operating points of a FROC curve, in the script's order (increasing FP rate)."""

    fps: np.ndarray
    sensitivity: np.ndarray
    thresholds: np.ndarray


@dataclass
class BootstrapResult:
    """Bootstrap statistics; arrays are float32 like the script's.

    Attributes:
        n_samples, seed, confidence: how it was drawn.
        fp_rates: the FP rates of ``mean`` / ``lower`` / ``upper``.
        mean, lower, upper: per FP rate, mean and percentile bounds over the samples.
        cpm_mean, cpm_lower, cpm_upper: the same for the per-sample CPM.
        grid, grid_mean, grid_lower, grid_upper: the official 10000-point curves (None when skipped).
    """

    n_samples: int
    seed: int
    confidence: float
    fp_rates: tuple[float, ...]
    mean: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    cpm_mean: float
    cpm_lower: float
    cpm_upper: float
    grid: np.ndarray | None = None
    grid_mean: np.ndarray | None = None
    grid_lower: np.ndarray | None = None
    grid_upper: np.ndarray | None = None


@dataclass
class FROCResult:
    """Everything ``lungdata evaluate-froc`` reports."""

    counts: MatchCounts
    curve: FROCCurve
    reading: Reading
    fp_rates: tuple[float, ...]
    sensitivities: np.ndarray
    sensitivities_interp: np.ndarray
    sensitivities_nearest: np.ndarray
    bootstrap: BootstrapResult | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cpm(self) -> float:
        """Competition performance metric: the mean sensitivity at the seven FP rates."""
        return float(np.mean(self.sensitivities))

    def to_dict(self, include_curve: bool = False) -> dict[str, Any]:
        """JSON-ready summary; the operating points are added with ``include_curve``."""

        def rate_key(rate: float) -> str:
            return f"{rate:g}"

        out: dict[str, Any] = {
            "reading": self.reading,
            "cpm": self.cpm,
            "sensitivity": {rate_key(r): float(s) for r, s in zip(self.fp_rates, self.sensitivities)},
            "cpm_interp": float(np.mean(self.sensitivities_interp)),
            "cpm_nearest": float(np.mean(self.sensitivities_nearest)),
            "sensitivity_interp": {
                rate_key(r): float(s) for r, s in zip(self.fp_rates, self.sensitivities_interp)
            },
            "sensitivity_nearest": {
                rate_key(r): float(s) for r, s in zip(self.fp_rates, self.sensitivities_nearest)
            },
            "counts": {
                "scans": self.counts.n_scans,
                "candidates": self.counts.n_candidates,
                "nodules": self.counts.n_nodules,
                "true_positives": self.counts.true_positives,
                "false_positives": self.counts.false_positives,
                "false_negatives": self.counts.false_negatives,
                "ignored_on_excluded": self.counts.ignored_on_excluded,
                "ignored_double_hits": self.counts.ignored_double_hits,
                "removed_by_cap": self.counts.removed_by_cap,
                "candidate_sensitivity": self.counts.sensitivity,
                "candidates_per_scan": self.counts.candidates_per_scan,
            },
        }
        if include_curve:
            out["curve"] = {
                "fps_per_scan": self.curve.fps.tolist(),
                "sensitivity": self.curve.sensitivity.tolist(),
            }
        if self.bootstrap is not None:
            bs = self.bootstrap
            out["bootstrap"] = {
                "samples": bs.n_samples,
                "seed": bs.seed,
                "confidence": bs.confidence,
                "mean": {rate_key(r): float(v) for r, v in zip(bs.fp_rates, bs.mean)},
                "lower": {rate_key(r): float(v) for r, v in zip(bs.fp_rates, bs.lower)},
                "upper": {rate_key(r): float(v) for r, v in zip(bs.fp_rates, bs.upper)},
                "cpm_mean": bs.cpm_mean,
                "cpm_lower": bs.cpm_lower,
                "cpm_upper": bs.cpm_upper,
            }
        out.update(self.extra)
        return out


# --------------------------------------------------------------------------------------------------
# 1. matching


def _cap_marks(cand_scan: np.ndarray, cand_prob: np.ndarray, n_scans: int, max_marks: int) -> np.ndarray:
    """Boolean mask of the marks the official cap keeps.

    The script sorts a scan's probabilities in decreasing order, takes the (max+1)-th as threshold
    and keeps the marks *strictly* above it, so marks tied with the threshold are all dropped and a
    scan can keep fewer than ``max_marks``.
    """
    keep = np.ones(cand_scan.shape[0], dtype=bool)
    counts = np.bincount(cand_scan, minlength=n_scans)
    over = np.flatnonzero(counts > max_marks)
    if over.size == 0:
        return keep
    order = np.lexsort((-cand_prob, cand_scan))
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    threshold = np.full(n_scans, -np.inf)
    threshold[over] = cand_prob[order[starts[over] + max_marks]]
    affected = counts[cand_scan] > max_marks
    keep[affected] = cand_prob[affected] > threshold[cand_scan[affected]]
    return keep


def match_candidates(
    cand_scan: np.ndarray,
    cand_xyz: np.ndarray,
    cand_prob: np.ndarray,
    nod_scan: np.ndarray,
    nod_xyz: np.ndarray,
    nod_diameter: np.ndarray,
    nod_included: np.ndarray,
    n_scans: int,
    max_marks: int | None = MAX_MARKS_PER_SCAN,
) -> tuple[FROCEntries, MatchCounts]:
    """Apply the LUNA16 hit rules to all scans at once.

    Rules (as in the official script): a mark hits a finding when its squared world distance to
    the finding's centre is strictly below the squared radius (negative diameters mean 10 mm);
    marks that hit an included nodule are consumed by it (several marks on one nodule: the nodule
    takes the highest probability, the others are ignored; a mark inside two included nodules
    detects both); marks that hit only excluded findings are ignored; all other marks are false
    positives; a nodule without a hit is missed. Before matching, scans with more than
    ``max_marks`` marks keep only those strictly more probable than the (max_marks+1)-th.

    Args:
        cand_scan: (N,) scan index of each mark, in ``[0, n_scans)``.
        cand_xyz: (N, 3) world coordinates (x, y, z) in mm.
        cand_prob: (N,) probabilities.
        nod_scan: (M,) scan index of each finding.
        nod_xyz: (M, 3) world coordinates of the finding centres.
        nod_diameter: (M,) diameters in mm (negative → 10 mm).
        nod_included: (M,) True for nodules that count, False for excluded findings.
        n_scans: number of scans evaluated (scans without marks or findings still count).
        max_marks: the per-scan cap; None or 0 disables it.

    Returns:
        The pooled FROC entries and the candidate statistics.
    """
    cand_scan = np.asarray(cand_scan, dtype=np.int64)
    cand_xyz = np.asarray(cand_xyz, dtype=np.float64).reshape(-1, 3)
    cand_prob = np.asarray(cand_prob, dtype=np.float64)
    nod_scan = np.asarray(nod_scan, dtype=np.int64)
    nod_xyz = np.asarray(nod_xyz, dtype=np.float64).reshape(-1, 3)
    nod_diameter = np.asarray(nod_diameter, dtype=np.float64)
    nod_included = np.asarray(nod_included, dtype=bool)
    for name, arr in (("candidate", cand_scan), ("nodule", nod_scan)):
        if arr.size and (arr.min() < 0 or arr.max() >= n_scans):
            raise ValueError(f"{name} scan index outside [0, {n_scans}); every scan must be in the list")

    n_before_cap = cand_scan.shape[0]
    if max_marks:
        keep = _cap_marks(cand_scan, cand_prob, n_scans, max_marks)
        cand_scan, cand_xyz, cand_prob = cand_scan[keep], cand_xyz[keep], cand_prob[keep]
    removed_by_cap = n_before_cap - cand_scan.shape[0]

    # Pair every finding with every mark of its scan (marks grouped by scan).
    order = np.argsort(cand_scan, kind="stable")
    cand_scan, cand_xyz, cand_prob = cand_scan[order], cand_xyz[order], cand_prob[order]
    counts = np.bincount(cand_scan, minlength=n_scans)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    per_nod = counts[nod_scan]
    pair_nod = np.repeat(np.arange(nod_scan.shape[0]), per_nod)
    offsets = np.arange(pair_nod.shape[0]) - np.repeat(np.cumsum(per_nod) - per_nod, per_nod)
    pair_cand = starts[nod_scan][pair_nod] + offsets

    diameter = np.where(nod_diameter < 0.0, UNKNOWN_DIAMETER_MM, nod_diameter)
    radius_sq = (diameter / 2.0) ** 2
    d = nod_xyz[pair_nod] - cand_xyz[pair_cand]
    dist_sq = d[:, 0] ** 2 + d[:, 1] ** 2 + d[:, 2] ** 2
    hit = dist_sq < radius_sq[pair_nod]
    hit_nod, hit_cand = pair_nod[hit], pair_cand[hit]
    hit_incl = nod_included[hit_nod]

    n_cand = cand_scan.shape[0]
    on_included = np.zeros(n_cand, dtype=bool)
    on_included[hit_cand[hit_incl]] = True
    on_excluded = np.zeros(n_cand, dtype=bool)
    on_excluded[hit_cand[~hit_incl]] = True
    ignored_on_excluded = int((on_excluded & ~on_included).sum())
    false_positive = ~(on_included | on_excluded)

    n_nod = nod_scan.shape[0]
    hits_per_nod = np.bincount(hit_nod[hit_incl], minlength=n_nod)
    best = np.full(n_nod, -np.inf)
    np.maximum.at(best, hit_nod[hit_incl], cand_prob[hit_cand[hit_incl]])
    found = nod_included & (hits_per_nod > 0)
    missed = nod_included & (hits_per_nod == 0)
    ignored_double = int(np.maximum(hits_per_nod[nod_included] - 1, 0).sum())

    scores = np.concatenate(
        (best[found], np.full(int(missed.sum()), MISSED_NODULE_SCORE), cand_prob[false_positive])
    )
    n_found, n_missed, n_fp = int(found.sum()), int(missed.sum()), int(false_positive.sum())
    entries = FROCEntries(
        scores=scores,
        is_lesion=np.concatenate((np.ones(n_found + n_missed, bool), np.zeros(n_fp, bool))),
        counted=np.concatenate((np.ones(n_found, bool), np.zeros(n_missed, bool), np.ones(n_fp, bool))),
        scan=np.concatenate((nod_scan[found], nod_scan[missed], cand_scan[false_positive])),
        n_scans=n_scans,
    )
    stats = MatchCounts(
        n_scans=n_scans,
        n_candidates=n_cand,
        n_nodules=int(nod_included.sum()),
        true_positives=n_found,
        false_positives=n_fp,
        false_negatives=n_missed,
        ignored_on_excluded=ignored_on_excluded,
        ignored_double_hits=ignored_double,
        removed_by_cap=removed_by_cap,
    )
    return entries, stats


# --------------------------------------------------------------------------------------------------
# 2. curve


@dataclass(frozen=True)
class _SortedGroups:
    """Counted entries sorted by decreasing score and grouped by distinct score."""

    group_of_entry: np.ndarray  # group index of each counted entry (sorted order)
    thresholds: np.ndarray  # distinct scores, decreasing
    entry_lesion: np.ndarray  # is_lesion of each counted entry (sorted order)
    entry_scan: np.ndarray  # scan of each counted entry (sorted order)


def _sort_groups(entries: FROCEntries) -> _SortedGroups:
    idx = np.flatnonzero(entries.counted)
    scores = entries.scores[idx]
    # Same ordering as scikit-learn: stable ascending sort, reversed.
    order = idx[np.argsort(scores, kind="mergesort")[::-1]]
    sorted_scores = entries.scores[order]
    new_group = np.concatenate(([True], np.diff(sorted_scores) != 0)) if order.size else np.zeros(0, bool)
    group = np.cumsum(new_group) - 1
    return _SortedGroups(
        group_of_entry=group,
        thresholds=sorted_scores[new_group],
        entry_lesion=entries.is_lesion[order],
        entry_scan=entries.scan[order],
    )


def _froc_from_group_counts(
    tp: np.ndarray,
    fp: np.ndarray,
    thresholds: np.ndarray | None,
    n_lesions: float,
    n_images: int,
) -> FROCCurve:
    """The script's ``computeFROC`` given per-threshold TP/FP counts (decreasing thresholds).

    Mirrors scikit-learn's ``roc_curve`` (cumulative counts, collinear points dropped, a (0, 0)
    point prepended) and the script's rescaling, operation for operation, so the floats are the
    script's to the last bit. ``thresholds`` may be None when only the curve is needed.
    """
    present = (tp + fp) > 0
    tps = np.cumsum(tp[present])
    fps = np.cumsum(fp[present])
    if thresholds is not None:
        thresholds = thresholds[present]
    if fps.shape[0] > 2:
        keep = np.empty(fps.shape[0], dtype=bool)
        keep[0] = keep[-1] = True
        np.logical_or(np.diff(fps, 2) != 0, np.diff(tps, 2) != 0, out=keep[1:-1])
        tps, fps = tps[keep], fps[keep]
        if thresholds is not None:
            thresholds = thresholds[keep]
    tps = np.concatenate(([0.0], tps))
    fps = np.concatenate(([0.0], fps))
    if thresholds is not None:
        thresholds = np.concatenate(([np.inf], thresholds))
    n_detected = tps[-1]
    n_negative = fps[-1]
    if n_lesions <= 0:
        # No nodule in the evaluated scans: sensitivity is undefined.
        sens = np.full(tps.shape, np.nan)
    elif n_detected <= 0:
        # The script divides by zero here and returns NaN; nothing was detected, so 0 is the truth.
        sens = np.zeros(tps.shape)
    else:
        sens = tps / n_detected
        sens *= n_detected
        sens /= n_lesions
    if n_negative <= 0:
        # The script's border case: no false positive at all, every operating point at 0 FP/scan.
        fps_out = np.zeros(fps.shape)
    else:
        fps_out = fps / n_negative
        fps_out *= n_negative
        fps_out /= n_images
    return FROCCurve(fps=fps_out, sensitivity=sens, thresholds=thresholds)


def froc_curve(entries: FROCEntries) -> FROCCurve:
    """The FROC curve of the official script (``computeFROC``) for pooled entries."""
    groups = _sort_groups(entries)
    n_groups = groups.thresholds.shape[0]
    lesion = groups.entry_lesion.astype(np.float64)
    tp = np.bincount(groups.group_of_entry, weights=lesion, minlength=n_groups)
    fp = np.bincount(groups.group_of_entry, weights=1.0 - lesion, minlength=n_groups)
    return _froc_from_group_counts(tp, fp, groups.thresholds, float(entries.n_lesions), entries.n_scans)


# --------------------------------------------------------------------------------------------------
# 3. reading the operating points


def read_sensitivities(
    curve: FROCCurve, fp_rates: tuple[float, ...] = FP_RATES, reading: Reading = "interp"
) -> np.ndarray:
    """Sensitivities at the given FP rates.

    Args:
        curve: a FROC curve (FP rates increasing).
        fp_rates: where to read.
        reading: ``"interp"``: linear interpolation between operating points (``np.interp``, as
            the script does for its plotted curve and its bootstrap). ``"nearest"``: the operating
            point with the smallest FP rate at or above the requested one (the last such point, so
            the highest sensitivity at that FP rate), as several published copies of the script
            read it; where the curve never reaches the rate, its last point (those copies crash).

    Returns:
        float64 array, one sensitivity per rate.
    """
    rates = np.asarray(fp_rates, dtype=np.float64)
    if reading == "interp":
        return np.interp(rates, curve.fps, curve.sensitivity)
    if reading != "nearest":
        raise ValueError(f"reading must be 'interp' or 'nearest', got {reading!r}")
    out = np.empty(rates.shape[0])
    for i, rate in enumerate(rates):
        diff = curve.fps - rate
        above = diff >= 0
        if not above.any():
            out[i] = curve.sensitivity[-1]
            continue
        idx = np.flatnonzero(diff == diff[above].min())[-1]
        out[i] = curve.sensitivity[idx]
    return out


def cpm(sensitivities: np.ndarray) -> float:
    """Competition performance metric: mean of the sensitivities at the seven FP rates."""
    return float(np.mean(sensitivities))


# --------------------------------------------------------------------------------------------------
# 4. bootstrap


def bootstrap_indices(n_scans: int, n_samples: int, seed: int) -> np.ndarray:
    """Scan indices drawn with replacement, exactly as the official script draws them.

    The script calls ``np.random.randint(n, size=n)`` once per sample on numpy's global generator
    (a legacy ``RandomState``). ``RandomState(seed)`` consumed in the same order gives the same
    draws as ``np.random.seed(seed)`` followed by the script.
    """
    rng = np.random.RandomState(seed)
    draws = np.zeros((n_samples, n_scans), dtype=np.int64)
    for i in range(n_samples):
        draws[i] = rng.randint(n_scans, size=n_scans)
    return draws


def _mean_ci(values32: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The script's ``compute_mean_ci``: per column, sort, float32 mean, floor-index percentiles."""
    n = values32.shape[0]
    srt = np.sort(values32, axis=0)
    cols = np.ascontiguousarray(srt.T)
    pz = (1.0 - confidence) / 2.0
    lo_idx = int(math.floor(pz * n))
    hi_idx = int(math.floor((1.0 - pz) * n))
    # Row means of a C-contiguous float32 array sum each row pairwise exactly as the script's
    # np.average over one sorted column does (bit for bit: see the official-fixture tests).
    mean = cols.mean(axis=1).astype("float32")
    return mean, cols[:, lo_idx].copy(), cols[:, hi_idx].copy()


def _prefix_curve(
    tp: np.ndarray,
    fp: np.ndarray,
    n_detected: float,
    n_negative: float,
    n_lesions: float,
    n_images: int,
    limit: float,
) -> tuple[np.ndarray, np.ndarray] | None:
    """The part of a sample's curve that interpolation at FP rates <= ``limit`` can see.

    ``tp``/``fp`` are the counts of the first (highest) thresholds only. Interpolation at rates up
    to ``limit`` uses the kept points up to the first kept point beyond ``limit``; whether a point is
    kept (scikit-learn drops collinear ones) depends on its two neighbours, so the prefix is enough
    when such a point exists and its right neighbour is inside the prefix. Returns None otherwise
    (the caller then uses all thresholds).
    """
    if n_negative <= 0 or n_lesions <= 0 or n_detected <= 0:
        return None
    present = (tp + fp) > 0
    tps = np.cumsum(tp[present])
    fps = np.cumsum(fp[present])
    m = fps.shape[0]
    if m < 3:
        return None
    fps_known = fps[: m - 1] / n_negative
    fps_known *= n_negative
    fps_known /= n_images
    beyond = int(np.searchsorted(fps_known, limit, side="right"))
    if beyond >= m - 1:
        return None
    keep = np.empty(m - 1, dtype=bool)
    keep[0] = True
    np.logical_or(np.diff(fps, 2) != 0, np.diff(tps, 2) != 0, out=keep[1:])
    after = np.flatnonzero(keep[beyond:])
    if after.size == 0:
        return None
    last = beyond + int(after[0])
    kept = np.flatnonzero(keep[: last + 1])
    xp = np.concatenate(([0.0], fps_known[kept]))
    yp = np.empty(kept.shape[0] + 1)
    yp[0] = 0.0
    yp[1:] = tps[kept] / n_detected
    yp[1:] *= n_detected
    yp[1:] /= n_lesions
    return xp, yp


def bootstrap_froc(
    entries: FROCEntries,
    n_samples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    fp_rates: tuple[float, ...] = FP_RATES,
    grid: np.ndarray | None = BOOTSTRAP_GRID,
    chunk: int = 64,
) -> BootstrapResult:
    """Bootstrap over scans, with the official script's draws and statistics.

    Each sample draws ``n_scans`` scans with replacement; a scan drawn k times contributes its
    entries k times. Each sample's FROC curve is interpolated at ``fp_rates`` (and at ``grid``,
    the script's 10000-point curve) into float32, and per point the mean and the
    ``floor(p·n)``-th sorted values are reported, as the script does. The CPM interval comes from
    the per-sample CPM (mean of its seven float32 sensitivities).

    Instead of concatenating scans per sample, the entries are sorted once and a sample's
    per-threshold counts are a sparse (threshold × scan) count matrix times the sample's scan
    multiplicities; only the highest thresholds, those that reach the largest requested FP rate,
    are expanded per sample (see :func:`_prefix_curve`).

    Args:
        entries: from :func:`match_candidates`.
        n_samples: bootstrap samples (the script uses 1000).
        seed: seed of the legacy numpy generator; the script gives the same result after
            ``np.random.seed(seed)``.
        confidence: width of the interval (0.95 → 2.5th and 97.5th percentile as the script picks them).
        fp_rates: where to report per-point statistics.
        grid: FP rates of the full mean/CI curves (None to skip them).
        chunk: samples processed per sparse product.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be at least 1, got {n_samples}")
    groups = _sort_groups(entries)
    n_groups = groups.thresholds.shape[0]
    n_scans = entries.n_scans
    lesion = groups.entry_lesion
    tp_mat = sparse.csr_matrix(
        (np.ones(int(lesion.sum())), (groups.group_of_entry[lesion], groups.entry_scan[lesion])),
        shape=(n_groups, n_scans),
    )
    fp_mat = sparse.csr_matrix(
        (np.ones(int((~lesion).sum())), (groups.group_of_entry[~lesion], groups.entry_scan[~lesion])),
        shape=(n_groups, n_scans),
    )
    lesions_per_scan = np.bincount(entries.scan[entries.is_lesion], minlength=n_scans).astype(np.float64)
    detected_per_scan = np.asarray(tp_mat.sum(axis=0)).ravel()
    negatives_per_scan = np.asarray(fp_mat.sum(axis=0)).ravel()

    rates = np.asarray(fp_rates, dtype=np.float64)
    points = rates if grid is None else np.concatenate((rates, np.asarray(grid, dtype=np.float64)))
    limit = float(points.max()) if points.size else 0.0
    # Thresholds expanded per sample: a margin over what the whole set needs to pass `limit` (a
    # sample that needs more falls back to all thresholds).
    fp_cum = np.cumsum(np.asarray(fp_mat.sum(axis=1)).ravel())
    prefix = min(n_groups, int(np.searchsorted(fp_cum, 1.25 * limit * n_scans + 64.0)) + 64)
    tp_head, fp_head = tp_mat[:prefix], fp_mat[:prefix]

    values = np.zeros((n_samples, points.shape[0]), dtype="float32")
    draws = bootstrap_indices(n_scans, n_samples, seed)
    for start in range(0, n_samples, chunk):
        block = draws[start : start + chunk]
        flat = (block + (np.arange(block.shape[0]) * n_scans)[:, None]).ravel()
        mult = np.bincount(flat, minlength=block.size).reshape(block.shape).astype(np.float64)
        # (samples × thresholds), C-contiguous so that each sample's row is read sequentially.
        tp_block = np.ascontiguousarray((tp_head @ mult.T).T)
        fp_block = np.ascontiguousarray((fp_head @ mult.T).T)
        lesions = lesions_per_scan[block].sum(axis=1)
        detected = detected_per_scan[block].sum(axis=1)
        negatives = negatives_per_scan[block].sum(axis=1)
        for j in range(block.shape[0]):
            part = None
            if prefix < n_groups:
                part = _prefix_curve(
                    tp_block[j], fp_block[j], detected[j], negatives[j], lesions[j], n_scans, limit
                )
            if part is None:
                tp_full = tp_block[j] if prefix == n_groups else tp_mat @ mult[j]
                fp_full = fp_block[j] if prefix == n_groups else fp_mat @ mult[j]
                curve = _froc_from_group_counts(tp_full, fp_full, None, float(lesions[j]), n_scans)
                part = (curve.fps, curve.sensitivity)
            values[start + j] = np.interp(points, part[0], part[1])

    at_rates = values[:, : rates.shape[0]]
    mean, lower, upper = _mean_ci(at_rates, confidence)
    cpm_samples = at_rates.astype(np.float64).mean(axis=1)
    cpm_sorted = np.sort(cpm_samples)
    pz = (1.0 - confidence) / 2.0
    result = BootstrapResult(
        n_samples=n_samples,
        seed=seed,
        confidence=confidence,
        fp_rates=tuple(float(r) for r in rates),
        mean=mean,
        lower=lower,
        upper=upper,
        cpm_mean=float(cpm_samples.mean()),
        cpm_lower=float(cpm_sorted[int(math.floor(pz * n_samples))]),
        cpm_upper=float(cpm_sorted[int(math.floor((1.0 - pz) * n_samples))]),
    )
    if grid is not None:
        g_mean, g_lower, g_upper = _mean_ci(values[:, rates.shape[0] :], confidence)
        result.grid = np.asarray(grid, dtype=np.float64)
        result.grid_mean, result.grid_lower, result.grid_upper = g_mean, g_lower, g_upper
    return result


# --------------------------------------------------------------------------------------------------
# all together


def evaluate_froc(
    cand_scan: np.ndarray,
    cand_xyz: np.ndarray,
    cand_prob: np.ndarray,
    nod_scan: np.ndarray,
    nod_xyz: np.ndarray,
    nod_diameter: np.ndarray,
    nod_included: np.ndarray,
    n_scans: int,
    reading: Reading = "interp",
    n_bootstrap: int = 0,
    seed: int = 0,
    bootstrap_grid: np.ndarray | None = BOOTSTRAP_GRID,
    max_marks: int | None = MAX_MARKS_PER_SCAN,
    fp_rates: tuple[float, ...] = FP_RATES,
) -> FROCResult:
    """Match, build the curve, read the seven sensitivities and (optionally) bootstrap.

    Arguments are those of :func:`match_candidates`, :func:`read_sensitivities` and
    :func:`bootstrap_froc`; ``n_bootstrap=0`` skips the bootstrap.
    """
    if reading not in ("interp", "nearest"):
        raise ValueError(f"reading must be 'interp' or 'nearest', got {reading!r}")
    entries, stats = match_candidates(
        cand_scan, cand_xyz, cand_prob, nod_scan, nod_xyz, nod_diameter, nod_included, n_scans, max_marks
    )
    curve = froc_curve(entries)
    interp = read_sensitivities(curve, fp_rates, "interp")
    nearest = read_sensitivities(curve, fp_rates, "nearest")
    result = FROCResult(
        counts=stats,
        curve=curve,
        reading=reading,
        fp_rates=tuple(fp_rates),
        sensitivities=interp if reading == "interp" else nearest,
        sensitivities_interp=interp,
        sensitivities_nearest=nearest,
    )
    if n_bootstrap > 0:
        result.bootstrap = bootstrap_froc(
            entries, n_samples=n_bootstrap, seed=seed, fp_rates=fp_rates, grid=bootstrap_grid
        )
    return result
