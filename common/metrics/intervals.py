"""95 % bootstrap intervals over patients, and paired intervals of a difference between two systems.

Why patients: nodules of one patient are not independent (same scanner, same reader, same anatomy), so
resampling nodules makes intervals too narrow. Every function here draws *patients* with replacement
(the draws of :func:`common.metrics.froc.bootstrap_indices`, the official LUNA16 script's generator) and
takes every unit of a drawn patient — its scans, nodules or images — as many times as the patient was drawn.

- :func:`bootstrap_patients`: the percentile interval of any statistic (a function of the drawn unit
  indices returning ``{name: value}``).
- :func:`paired_bootstrap_patients`: the interval of ``statistic_a − statistic_b`` with *the same* drawn
  patients for both systems (identical systems give [0, 0]; a constant shift c gives [c, c]).
- Statistics for the metrics the learning report uses, each agreeing with the existing metric function on
  the undrawn set: :func:`froc_statistic` (CPM and sensitivity at FP rates; units = scans),
  :func:`mean_statistic` (mean Dice over nodules; units = nodules) and :func:`classification_statistic`
  (ROC-AUC, QWK, …; units = nodules or images).

The interval is the percentile interval (2.5th, 97.5th percentile, linear interpolation); resamples in
which a statistic is undefined (NaN, e.g. an AUC with one class drawn) are left out of that statistic
and counted in ``Interval.undefined``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from common.metrics.froc import FP_RATES, FROCEntries, bootstrap_indices, froc_curve, read_sensitivities

Statistic = Callable[[np.ndarray], dict[str, float]]
"""Maps unit indices (with repeats; ``arange(n_units)`` = the full set) to named values."""


@dataclass(frozen=True)
class Interval:
    """A point estimate on the full set and its bootstrap percentile interval."""

    value: float
    lower: float
    upper: float
    confidence: float
    samples: int
    patients: int
    undefined: int = 0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.lower:.3f}, {self.upper:.3f}]"


def _units_by_patient(patients: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit indices sorted by patient, each patient's first position in that order, and its unit count."""
    _, inverse = np.unique(np.asarray(patients, dtype=object).astype(str), return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    return order, starts, counts


def patient_draws(patients: Sequence[Any], n_samples: int, seed: int = 0) -> list[np.ndarray]:
    """Per bootstrap sample, the unit indices of the drawn patients (a patient drawn k times: k copies).

    Args:
        patients: patient identifier of each unit (scan, nodule or image), any hashable printable value.
        n_samples: bootstrap samples.
        seed: seed of the patient draws (:func:`common.metrics.froc.bootstrap_indices`).
    """
    order, starts, counts = _units_by_patient(patients)
    if counts.size == 0:
        raise ValueError("no units to resample: the evaluation set is empty")
    draws = bootstrap_indices(counts.size, n_samples, seed)
    out = []
    for drawn in draws:
        sizes = counts[drawn]
        offsets = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        out.append(order[np.repeat(starts[drawn], sizes) + offsets])
    return out


def _percentile_intervals(
    full: dict[str, float], table: list[dict[str, float]], confidence: float, patients: int
) -> dict[str, Interval]:
    tail = 100.0 * (1.0 - confidence) / 2.0
    out = {}
    for key, value in full.items():
        column = np.array([row[key] for row in table], dtype=np.float64)
        finite = column[np.isfinite(column)]
        lower, upper = (
            (float(np.percentile(finite, tail)), float(np.percentile(finite, 100.0 - tail)))
            if finite.size
            else (float("nan"), float("nan"))
        )
        out[key] = Interval(
            value=float(value),
            lower=lower,
            upper=upper,
            confidence=confidence,
            samples=len(table),
            patients=patients,
            undefined=int(column.size - finite.size),
        )
    return out


def bootstrap_patients(
    patients: Sequence[Any],
    statistic: Statistic,
    n_samples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Interval]:
    """Percentile intervals of ``statistic`` over bootstrap resamples of patients.

    Args:
        patients: patient of each unit; ``statistic`` receives indices into this sequence.
        statistic: unit indices → ``{name: value}``.
        n_samples, seed, confidence: the bootstrap.
    """
    n_units = len(patients)
    draws = patient_draws(patients, n_samples, seed)
    full = statistic(np.arange(n_units))
    table = [statistic(index) for index in draws]
    return _percentile_intervals(full, table, confidence, int(np.unique(np.asarray(patients, str)).size))


def paired_bootstrap_patients(
    patients: Sequence[Any],
    statistic_a: Statistic,
    statistic_b: Statistic,
    n_samples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Interval]:
    """Intervals of ``statistic_a − statistic_b`` (keys of both), both scored on the same drawn patients.

    The two systems must be scored on the same units (the same scans, nodules or images), so that one
    draw of patients is one draw for both: the interval then reflects the difference between the
    systems, not the spread of the test set.
    """

    def difference(index: np.ndarray) -> dict[str, float]:
        a, b = statistic_a(index), statistic_b(index)
        return {key: a[key] - b[key] for key in a if key in b}

    return bootstrap_patients(patients, difference, n_samples, seed, confidence)


# --------------------------------------------------------------------------------------------------
# statistics of the project's metrics


def _rate_key(rate: float) -> str:
    return f"sens@{rate:g}"


def froc_statistic(entries: FROCEntries, fp_rates: Sequence[float] = FP_RATES) -> Statistic:
    """CPM (mean sensitivity at the seven LUNA16 FP rates) and ``sens@<rate>`` for ``fp_rates``.

    Units are the scans ``0 … entries.n_scans − 1`` (pass each scan's patient to the bootstrap); a scan
    drawn k times contributes its FROC entries k times and counts k times in the FP-rate denominator, as
    in :func:`common.metrics.froc.bootstrap_froc`. Sensitivities are read by interpolation, as
    :func:`common.metrics.froc.evaluate_froc` does by default, so the full-set values equal its numbers.
    """
    rates = tuple(sorted(set(FP_RATES) | {float(r) for r in fp_rates}))
    cpm_at = np.isin(np.asarray(rates), np.asarray(FP_RATES))
    n_scans = entries.n_scans

    def statistic(scans: np.ndarray) -> dict[str, float]:
        multiplicity = np.bincount(scans, minlength=n_scans)
        repeat = multiplicity[entries.scan]
        drawn = FROCEntries(
            scores=np.repeat(entries.scores, repeat),
            is_lesion=np.repeat(entries.is_lesion, repeat),
            counted=np.repeat(entries.counted, repeat),
            scan=np.repeat(entries.scan, repeat),
            n_scans=int(scans.size),
        )
        sens = read_sensitivities(froc_curve(drawn), rates, "interp")
        out = {"CPM": float(np.mean(sens[cpm_at]))}
        out.update({_rate_key(r): float(s) for r, s in zip(rates, sens) if r in fp_rates})
        return out

    return statistic


def mean_statistic(values: Sequence[float], name: str) -> Statistic:
    """The mean of per-unit values (e.g. per-nodule Dice); NaN units are left out, as the test loops do."""
    v = np.asarray(values, dtype=np.float64)

    def statistic(index: np.ndarray) -> dict[str, float]:
        drawn = v[index]
        drawn = drawn[np.isfinite(drawn)]
        return {name: float(drawn.mean()) if drawn.size else float("nan")}

    return statistic


def classification_statistic(
    labels: Sequence[int],
    probs: Any,
    keys: Sequence[str] = ("roc_auc", "qwk", "acc"),
    num_classes: int | None = None,
) -> Statistic:
    """Metrics of :func:`common.metrics.classification.classification_scores` (units = samples)."""
    from common.metrics.classification import classification_scores

    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)

    def statistic(index: np.ndarray) -> dict[str, float]:
        scores = classification_scores(y[index], p[index], num_classes)
        return {key: scores[key] for key in keys}

    return statistic
