"""Optimal one-to-one matching of prior and current nodules after registration, gated by size.

Rule: the cost of pairing prior nodule i with current nodule j is the distance (mm) between i's centre
and j's centre mapped into the prior scan by the registration; the assignment minimising the total cost
is found with `scipy.optimize.linear_sum_assignment` (Hungarian method), and an assigned pair is kept only
when its distance is within the gate

    gate = max(GATE_MIN_MM, GATE_DIAMETER_FACTOR × the larger of the two diameters)  (10 mm, 1.5 ×).

Why this gate: 10 mm covers registration error (a few mm) plus the centroid shift of an irregular nodule
that grows; 1.5 × diameter lets a large nodule's centroid move within its own extent. Pairs outside the
gate are never forced: the prior nodule is "resolved", the current one "new". Unmatched nodules are
reported, never silently paired.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

GATE_MIN_MM = 10.0
GATE_DIAMETER_FACTOR = 1.5
GATE_RULE = f"max({GATE_MIN_MM:g} mm, {GATE_DIAMETER_FACTOR:g} x larger diameter)"
_INFEASIBLE = 1e9


@dataclass(frozen=True)
class Match:
    """One row of the matching: a pair, or a nodule seen only on one scan."""

    prior_index: int | None
    current_index: int | None
    distance_mm: float | None
    gate_mm: float | None

    @property
    def status(self) -> str:
        """ "matched", "new" (current only) or "resolved" (prior only)."""
        if self.prior_index is None:
            return "new"
        if self.current_index is None:
            return "resolved"
        return "matched"


def gate_mm(prior_diameter_mm: float, current_diameter_mm: float) -> float:
    """The largest distance at which two nodules may be the same one (see the module docstring)."""
    return max(GATE_MIN_MM, GATE_DIAMETER_FACTOR * max(float(prior_diameter_mm), float(current_diameter_mm)))


def match_nodules(
    prior_xyz: np.ndarray,
    prior_diameter_mm: np.ndarray,
    current_in_prior_xyz: np.ndarray,
    current_diameter_mm: np.ndarray,
) -> list[Match]:
    """Match nodules; all centres in the prior scan's world mm (current ones already registered).

    Returns:
        The matched pairs (in prior order), then resolved prior nodules, then new current nodules.
    """
    prior = np.asarray(prior_xyz, dtype=np.float64).reshape(-1, 3)
    current = np.asarray(current_in_prior_xyz, dtype=np.float64).reshape(-1, 3)
    d_prior = np.asarray(prior_diameter_mm, dtype=np.float64).reshape(-1)
    d_current = np.asarray(current_diameter_mm, dtype=np.float64).reshape(-1)
    if len(d_prior) != len(prior) or len(d_current) != len(current):
        raise ValueError("one diameter per nodule is needed for the matching gate")
    matches: list[Match] = []
    used_prior: set[int] = set()
    used_current: set[int] = set()
    if len(prior) and len(current):
        distance = np.linalg.norm(prior[:, None, :] - current[None, :, :], axis=-1)
        gates = np.maximum(
            GATE_MIN_MM, GATE_DIAMETER_FACTOR * np.maximum(d_prior[:, None], d_current[None, :])
        )
        cost = np.where(distance <= gates, distance, _INFEASIBLE)
        rows, cols = linear_sum_assignment(cost)
        for i, j in zip(rows, cols):
            if cost[i, j] >= _INFEASIBLE:
                continue
            matches.append(Match(int(i), int(j), float(distance[i, j]), float(gates[i, j])))
            used_prior.add(int(i))
            used_current.add(int(j))
    matches.sort(key=lambda m: m.prior_index)
    matches += [Match(i, None, None, None) for i in range(len(prior)) if i not in used_prior]
    matches += [Match(None, j, None, None) for j in range(len(current)) if j not in used_current]
    return matches


def matching_f1(predicted: list[tuple[int, int]], truth: list[tuple[int, int]]) -> dict[str, float]:
    """Precision, recall and F1 of predicted (prior, current) pairs against the true pairs."""
    predicted_set, truth_set = set(predicted), set(truth)
    hits = len(predicted_set & truth_set)
    precision = hits / len(predicted_set) if predicted_set else 1.0
    recall = hits / len(truth_set) if truth_set else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "n_true": len(truth_set),
        "n_predicted": len(predicted_set),
    }
