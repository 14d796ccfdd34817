"""Patient-level bootstrap intervals and paired intervals (common.metrics.intervals) on known cases."""

from __future__ import annotations

import numpy as np
import pytest

from common.metrics.classification import classification_scores
from common.metrics.froc import FP_RATES, evaluate_froc, match_candidates
from common.metrics.intervals import (
    bootstrap_patients,
    classification_statistic,
    froc_statistic,
    mean_statistic,
    paired_bootstrap_patients,
    patient_draws,
)


def _detection_case(seed: int = 0, n_scans: int = 20):
    """Random nodules and marks on `n_scans` scans: a few marks near each nodule, false marks elsewhere."""
    rng = np.random.default_rng(seed)
    nod_scan = rng.integers(0, n_scans, 40)
    nod_xyz = rng.uniform(-100, 100, (40, 3))
    near = rng.random(40) < 0.85
    fp_scan = rng.integers(0, n_scans, 150)
    cand_scan = np.concatenate((nod_scan[near], fp_scan))
    cand_xyz = np.concatenate(
        (nod_xyz[near] + rng.normal(0, 1, (near.sum(), 3)), rng.uniform(-300, 300, (150, 3)))
    )
    cand_prob = np.concatenate((rng.uniform(0.3, 1.0, near.sum()), rng.uniform(0.0, 0.8, 150)))
    return cand_scan, cand_xyz, cand_prob, nod_scan, nod_xyz, np.full(40, 8.0), np.ones(40, bool), n_scans


def test_draws_take_every_unit_of_a_drawn_patient():
    patients = ["a", "a", "b", "c", "c", "c"]
    for index in patient_draws(patients, n_samples=20, seed=1):
        drawn = np.asarray(patients)[index]
        for p, n_units in (("a", 2), ("b", 1), ("c", 3)):
            assert (drawn == p).sum() % n_units == 0
        assert len({p for p in drawn}) <= 3
        # as many patients as there are (with repeats)
        assert sum((drawn == p).sum() // k for p, k in (("a", 2), ("b", 1), ("c", 3))) == 3


def test_froc_statistic_agrees_with_evaluate_froc():
    case = _detection_case()
    result = evaluate_froc(*case)
    entries, _ = match_candidates(*case)
    values = froc_statistic(entries, fp_rates=(0.5, 4.0, 8.0))(np.arange(case[-1]))
    assert values["CPM"] == pytest.approx(result.cpm)
    assert values["sens@8"] == pytest.approx(result.sensitivities[FP_RATES.index(8.0)])
    assert values["sens@0.5"] == pytest.approx(result.sensitivities[FP_RATES.index(0.5)])


def test_froc_interval_contains_the_estimate_and_is_close_to_the_official_bootstrap():
    case = _detection_case(seed=3)
    entries, _ = match_candidates(*case)
    intervals = bootstrap_patients(np.arange(case[-1]), froc_statistic(entries), n_samples=300, seed=0)
    cpm = intervals["CPM"]
    assert cpm.lower <= cpm.value <= cpm.upper and cpm.lower < cpm.upper
    official = evaluate_froc(*case, n_bootstrap=300, seed=0, bootstrap_grid=None).bootstrap
    # same scan draws (one scan per patient here, same generator): bounds within a percentile step
    assert cpm.lower == pytest.approx(official.cpm_lower, abs=0.02)
    assert cpm.upper == pytest.approx(official.cpm_upper, abs=0.02)


def test_identical_systems_give_a_zero_paired_interval():
    case = _detection_case(seed=1)
    entries, _ = match_candidates(*case)
    stat = froc_statistic(entries)
    diff = paired_bootstrap_patients(np.arange(case[-1]), stat, stat, n_samples=100)
    assert (diff["CPM"].value, diff["CPM"].lower, diff["CPM"].upper) == (0.0, 0.0, 0.0)
    dice = np.random.default_rng(0).random(30)
    diff = paired_bootstrap_patients(
        np.arange(30) // 2, mean_statistic(dice, "dice"), mean_statistic(dice, "dice")
    )
    assert (diff["dice"].lower, diff["dice"].upper) == (0.0, 0.0)


def test_a_constant_shift_gives_a_point_interval_at_the_shift():
    dice = np.random.default_rng(1).uniform(0.3, 0.8, 40)
    patients = np.arange(40) // 3
    diff = paired_bootstrap_patients(
        patients, mean_statistic(dice + 0.1, "dice"), mean_statistic(dice, "dice")
    )
    assert diff["dice"].value == pytest.approx(0.1)
    assert diff["dice"].lower == pytest.approx(0.1) and diff["dice"].upper == pytest.approx(0.1)
    # the unpaired interval of either system is wide: pairing removes the spread of the test set
    alone = bootstrap_patients(patients, mean_statistic(dice, "dice"))["dice"]
    assert alone.upper - alone.lower > 0.05


def test_paired_interval_detects_a_real_but_noisy_improvement():
    rng = np.random.default_rng(2)
    base = rng.uniform(0.4, 0.9, 200)
    better = base + 0.03 + rng.normal(0, 0.02, 200)
    diff = paired_bootstrap_patients(np.arange(200), mean_statistic(better, "d"), mean_statistic(base, "d"))[
        "d"
    ]
    assert 0.0 < diff.lower < 0.03 < diff.upper


def test_coverage_of_the_mean_on_a_simulated_clustered_case():
    """95 % intervals over patients cover the true mean in about 95 % of repeated test sets; intervals over
    nodules, ignoring the patient, cover it less often (the reason for resampling patients)."""
    rng = np.random.default_rng(4)
    covered_patients = covered_nodules = 0
    trials = 150
    for trial in range(trials):
        effect = rng.normal(0.0, 1.0, 30)  # patient effect shared by its 4 nodules
        values = np.repeat(effect, 4) + rng.normal(0.0, 0.5, 120)
        patients = np.repeat(np.arange(30), 4)
        by_patient = bootstrap_patients(patients, mean_statistic(values, "m"), n_samples=200, seed=trial)["m"]
        by_nodule = bootstrap_patients(
            np.arange(120), mean_statistic(values, "m"), n_samples=200, seed=trial
        )["m"]
        covered_patients += by_patient.lower <= 0.0 <= by_patient.upper
        covered_nodules += by_nodule.lower <= 0.0 <= by_nodule.upper
    assert 0.87 <= covered_patients / trials <= 0.99
    assert covered_nodules < covered_patients


def test_classification_statistic_agrees_and_skips_undefined_resamples():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 60)
    p = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.2, 60), 0, 1)
    stat = classification_statistic(y, p, keys=("roc_auc", "qwk"))
    full = classification_scores(y, p)
    values = stat(np.arange(60))
    assert values["roc_auc"] == pytest.approx(full["roc_auc"]) and values["qwk"] == pytest.approx(full["qwk"])
    intervals = bootstrap_patients(np.arange(60) // 2, stat, n_samples=200)
    assert intervals["roc_auc"].lower > 0.5 and intervals["roc_auc"].upper <= 1.0
    # one positive among 20: some resamples draw no positive, their AUC is undefined and left out
    y_rare = np.zeros(20, int)
    y_rare[0] = 1
    rare = bootstrap_patients(
        np.arange(20), classification_statistic(y_rare, rng.random(20), ("roc_auc",)), 200
    )
    assert rare["roc_auc"].undefined > 0 and rare["roc_auc"].samples == 200
