"""LUNA16 FROC rules on hand-made cases, bootstrap semantics, readings, CSV parsing and input errors."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_curve

from common.metrics.froc import (
    FP_RATES,
    MISSED_NODULE_SCORE,
    FROCCurve,
    bootstrap_froc,
    bootstrap_indices,
    evaluate_froc,
    froc_curve,
    match_candidates,
    read_sensitivities,
)
from common.metrics.froc_io import FROCInputError, evaluate_froc_files, load_froc_inputs
from common.metrics.froc_synthetic import SyntheticFROCSpec, generate_froc_case

DATA = Path(__file__).resolve().parents[1] / "data" / "froc"


def _match(cands: list[tuple], nodules: list[tuple], n_scans: int = 1, max_marks: int | None = 100):
    """cands: (scan, x, y, z, p); nodules: (scan, x, y, z, diameter, included)."""
    c = np.asarray(cands, dtype=float).reshape(-1, 5)
    n = np.asarray(nodules, dtype=float).reshape(-1, 6)
    return match_candidates(
        c[:, 0].astype(int),
        c[:, 1:4],
        c[:, 4],
        n[:, 0].astype(int),
        n[:, 1:4],
        n[:, 4],
        n[:, 5] > 0,
        n_scans,
        max_marks,
    )


# ---------------------------------------------------------------------------------------------- rules


def test_hit_requires_distance_strictly_below_radius() -> None:
    nodule = [(0, 0.0, 0.0, 0.0, 10.0, 1)]
    _, on_edge = _match([(0, 5.0, 0.0, 0.0, 0.9)], nodule)
    assert (on_edge.true_positives, on_edge.false_positives) == (0, 1)
    _, on_edge = _match([(0, 3.0, 4.0, 0.0, 0.9)], nodule)  # 3² + 4² = 5² exactly
    assert on_edge.true_positives == 0
    _, inside = _match([(0, 2.9, 4.0, 0.0, 0.9)], nodule)
    assert (inside.true_positives, inside.false_positives) == (1, 0)


def test_marks_on_excluded_findings_are_ignored_and_unknown_size_is_10mm() -> None:
    excluded = [(0, 0.0, 0.0, 0.0, -1.0, 0)]  # diameter -1 → radius 5 mm
    entries, counts = _match([(0, 4.9, 0.0, 0.0, 0.8), (0, 5.1, 0.0, 0.0, 0.7)], excluded)
    assert counts.ignored_on_excluded == 1 and counts.false_positives == 1 and counts.n_nodules == 0
    assert entries.scores.tolist() == [0.7]


def test_extra_hits_are_ignored_and_nodule_takes_highest_probability() -> None:
    nodule = [(0, 0.0, 0.0, 0.0, 8.0, 1)]
    entries, counts = _match([(0, 1, 0, 0, 0.3), (0, 0, 1, 0, 0.9), (0, 0, 0, 1, 0.5)], nodule)
    assert counts.true_positives == 1 and counts.ignored_double_hits == 2 and counts.false_positives == 0
    assert entries.scores.tolist() == [0.9] and entries.is_lesion.tolist() == [True]


def test_one_mark_inside_two_nodules_detects_both() -> None:
    nodules = [(0, 0.0, 0, 0, 10.0, 1), (0, 6.0, 0, 0, 10.0, 1)]
    entries, counts = _match([(0, 3.0, 0, 0, 0.6)], nodules)
    assert counts.true_positives == 2 and counts.n_candidates == 1 and counts.false_positives == 0
    assert sorted(entries.scores.tolist()) == [0.6, 0.6]


def test_mark_on_included_and_excluded_counts_for_the_nodule() -> None:
    findings = [(0, 0.0, 0, 0, 10.0, 1), (0, 1.0, 0, 0, 10.0, 0)]
    _, counts = _match([(0, 0.5, 0, 0, 0.6)], findings)
    assert counts.true_positives == 1 and counts.ignored_on_excluded == 0


def test_cap_keeps_marks_strictly_above_the_101st_probability() -> None:
    probs = np.linspace(0.99, 0.5, 102)
    probs[99] = probs[100]  # the 100th and 101st most probable marks tie → both dropped
    cands = [(0, 100.0 + i, 0, 0, p) for i, p in enumerate(probs)]
    _, counts = _match(cands, [])
    assert counts.n_candidates == 99 and counts.removed_by_cap == 3
    _, uncapped = _match(cands, [], max_marks=None)
    assert uncapped.n_candidates == 102


def test_missed_nodules_only_enlarge_the_denominator() -> None:
    nodules = [(0, 0.0, 0, 0, 10.0, 1), (0, 100.0, 0, 0, 10.0, 1)]
    entries, counts = _match([(0, 0.0, 0, 0, 0.9), (0, 50.0, 0, 0, 0.4)], nodules)
    assert counts.false_negatives == 1
    missed = ~entries.counted
    assert entries.scores[missed].tolist() == [MISSED_NODULE_SCORE]
    curve = froc_curve(entries)
    assert curve.sensitivity.max() == pytest.approx(0.5)


def test_scans_without_marks_count_in_the_fp_rate() -> None:
    entries, _ = _match([(0, 50.0, 0, 0, 0.4), (0, 60.0, 0, 0, 0.3)], [(1, 0, 0, 0, 10.0, 1)], n_scans=4)
    curve = froc_curve(entries)
    assert curve.fps[-1] == pytest.approx(2 / 4)


def test_no_nodule_gives_nan_and_nothing_detected_gives_zero() -> None:
    entries, _ = _match([(0, 50.0, 0, 0, 0.4)], [])
    assert np.isnan(read_sensitivities(froc_curve(entries))).all()
    entries, _ = _match([(0, 50.0, 0, 0, 0.4)], [(0, 0, 0, 0, 5.0, 1)])
    assert (read_sensitivities(froc_curve(entries)) == 0).all()


def test_curve_equals_sklearn_roc_rescaled() -> None:
    case = generate_froc_case(SyntheticFROCSpec(n_scans=12, probability_decimals=2), seed=5)
    uids = {u: i for i, u in enumerate(case.seriesuids)}
    nod = pd.concat([case.annotations.assign(inc=True), case.excluded.assign(inc=False)])
    entries, _ = match_candidates(
        case.results.seriesuid.map(uids).to_numpy(),
        case.results[["coordX", "coordY", "coordZ"]].to_numpy(),
        case.results.probability.to_numpy(),
        nod.seriesuid.map(uids).to_numpy(),
        nod[["coordX", "coordY", "coordZ"]].to_numpy(),
        nod.diameter_mm.to_numpy(),
        nod.inc.to_numpy(),
        len(uids),
    )
    c = entries.counted
    fpr, tpr, thr = roc_curve(entries.is_lesion[c], entries.scores[c])
    n_neg = (~entries.is_lesion[c]).sum()
    curve = froc_curve(entries)
    np.testing.assert_array_equal(curve.fps, fpr * n_neg / len(uids))
    np.testing.assert_array_equal(curve.sensitivity, tpr * entries.n_detected / entries.n_lesions)
    np.testing.assert_array_equal(curve.thresholds, thr)


# ---------------------------------------------------------------------------------------------- readings


def test_interp_and_nearest_readings() -> None:
    curve = FROCCurve(
        fps=np.array([0.0, 0.1, 0.1, 0.3, 1.0, 3.0]),
        sensitivity=np.array([0.0, 0.2, 0.4, 0.5, 0.7, 0.9]),
        thresholds=np.zeros(6),
    )
    interp = read_sensitivities(curve, (0.125, 1.0, 8.0), "interp")
    np.testing.assert_allclose(interp, [0.4 + 0.025 / 0.2 * 0.1, 0.7, 0.9])
    nearest = read_sensitivities(curve, (0.1, 0.125, 1.0, 8.0), "nearest")
    # 0.1 → last point at 0.1 (0.4); 0.125 → first point at or above (0.3 → 0.5); 8 → never reached → last
    np.testing.assert_allclose(nearest, [0.4, 0.5, 0.7, 0.9])
    with pytest.raises(ValueError, match="reading"):
        read_sensitivities(curve, (1.0,), "linear")


# ---------------------------------------------------------------------------------------------- bootstrap


def test_bootstrap_draws_equal_global_numpy_after_seed() -> None:
    np.random.seed(123)
    reference = np.stack([np.random.randint(37, size=37) for _ in range(5)])
    np.testing.assert_array_equal(bootstrap_indices(37, 5, seed=123), reference)


def _naive_bootstrap_values(entries, draws: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The script's procedure written plainly: concatenate sampled scans, sklearn roc_curve, np.interp."""
    out = np.zeros((draws.shape[0], points.shape[0]), dtype="float32")
    for b, draw in enumerate(draws):
        rows = np.concatenate([np.flatnonzero(entries.scan == s) for s in draw])
        lesion, counted, score = entries.is_lesion[rows], entries.counted[rows], entries.scores[rows]
        fpr, tpr, _ = roc_curve(lesion[counted], score[counted])
        n_det = float(lesion[counted].sum())
        fps = fpr * (counted.sum() - n_det) / draws.shape[1]
        sens = tpr * n_det / lesion.sum()
        out[b] = np.interp(points, fps, sens)
    return out


def test_bootstrap_prefix_shortcut_equals_plain_procedure() -> None:
    """A set big enough that the per-sample prefix shortcut is used, against the plain procedure."""
    case = generate_froc_case(SyntheticFROCSpec(n_scans=60, marks_per_scan=60, nodules_per_scan=1.5), seed=11)
    uids = {u: i for i, u in enumerate(case.seriesuids)}
    nod = pd.concat([case.annotations.assign(inc=True), case.excluded.assign(inc=False)])
    entries, _ = match_candidates(
        case.results.seriesuid.map(uids).to_numpy(),
        case.results[["coordX", "coordY", "coordZ"]].to_numpy(),
        case.results.probability.to_numpy(),
        nod.seriesuid.map(uids).to_numpy(),
        nod[["coordX", "coordY", "coordZ"]].to_numpy(),
        nod.diameter_mm.to_numpy(),
        nod.inc.to_numpy(),
        len(uids),
    )
    n, seed = 40, 3
    grid = np.linspace(0.125, 8.0, 101)
    ours = bootstrap_froc(entries, n_samples=n, seed=seed, grid=grid)
    values = _naive_bootstrap_values(entries, bootstrap_indices(len(uids), n, seed), np.r_[FP_RATES, grid])
    srt = np.sort(values, axis=0)
    lo, hi = int(math.floor(0.025 * n)), int(math.floor(0.975 * n))
    np.testing.assert_array_equal(ours.lower, srt[lo, :7])
    np.testing.assert_array_equal(ours.upper, srt[hi, :7])
    np.testing.assert_array_equal(ours.grid_lower, srt[lo, 7:])
    np.testing.assert_array_equal(ours.grid_upper, srt[hi, 7:])
    np.testing.assert_allclose(ours.mean, srt[:, :7].mean(axis=0), rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours.cpm_mean, values[:, :7].astype(float).mean(), rtol=0, atol=1e-12)


def test_evaluate_froc_rejects_unknown_reading() -> None:
    with pytest.raises(ValueError, match="reading"):
        evaluate_froc([], np.zeros((0, 3)), [], [], np.zeros((0, 3)), [], [], 1, reading="closest")


# ---------------------------------------------------------------------------------------------- CSV input


def test_csv_numbers_parse_exactly_like_python_float() -> None:
    d = DATA / "luna_like"
    inputs = load_froc_inputs(
        d / "annotations.csv.gz",
        d / "annotations_excluded.csv.gz",
        d / "seriesuids.csv.gz",
        d / "results.csv.gz",
    )
    with gzip.open(d / "results.csv.gz", "rt") as f:
        rows = [line.rstrip("\n").split(",") for line in f][1:]
    np.testing.assert_array_equal(inputs.cand_prob, [float(r[4]) for r in rows])
    np.testing.assert_array_equal(inputs.cand_xyz[:, 0], [float(r[1]) for r in rows])


@pytest.fixture()
def small_inputs(tmp_path: Path) -> dict[str, Path]:
    case = generate_froc_case(SyntheticFROCSpec(n_scans=4, candidates_per_scan=3), seed=2, case_id=9)
    return case.write(tmp_path)


def _rewrite_results(path: Path, edit) -> None:
    lines = path.read_text().splitlines()
    edit(lines)
    path.write_text("\n".join(lines) + "\n")


def test_missing_column_names_file_and_column(small_inputs: dict[str, Path]) -> None:
    _rewrite_results(
        small_inputs["results"], lambda lines: lines.__setitem__(0, "seriesuid,coordX,coordY,coordZ,prob")
    )
    with pytest.raises(FROCInputError, match=r"results\.csv: results file lacks column\(s\) probability"):
        evaluate_froc_files(**small_inputs, n_bootstrap=0)


def test_non_numeric_probability_names_row_and_line(small_inputs: dict[str, Path]) -> None:
    def edit(lines: list[str]) -> None:
        parts = lines[3].split(",")
        parts[4] = "high"
        lines[3] = ",".join(parts)

    _rewrite_results(small_inputs["results"], edit)
    with pytest.raises(
        FROCInputError, match=r"results\.csv: not a number in column 'probability' at row 3 \(line 4\)"
    ):
        evaluate_froc_files(**small_inputs, n_bootstrap=0)


def test_nan_coordinate_is_rejected(small_inputs: dict[str, Path]) -> None:
    def edit(lines: list[str]) -> None:
        parts = lines[2].split(",")
        parts[2] = "nan"
        lines[2] = ",".join(parts)

    _rewrite_results(small_inputs["results"], edit)
    with pytest.raises(FROCInputError, match=r"NaN or infinite value in column 'coordY' at row 2 \(line 3\)"):
        evaluate_froc_files(**small_inputs, n_bootstrap=0)


def test_blank_lines_keep_line_numbers_right(small_inputs: dict[str, Path]) -> None:
    def edit(lines: list[str]) -> None:
        lines.insert(1, "")
        parts = lines[3].split(",")
        parts[1] = ""
        lines[3] = ",".join(parts)

    _rewrite_results(small_inputs["results"], edit)
    with pytest.raises(FROCInputError, match=r"column 'coordX' at row 3 \(line 4\)"):
        evaluate_froc_files(**small_inputs, n_bootstrap=0)


def test_unknown_seriesuid_in_results(small_inputs: dict[str, Path]) -> None:
    def edit(lines: list[str]) -> None:
        lines.append("1.2.3.4.not.listed,1,2,3,0.5")

    _rewrite_results(small_inputs["results"], edit)
    with pytest.raises(FROCInputError, match=r"series UID not in the series list .*1\.2\.3\.4\.not\.listed"):
        evaluate_froc_files(**small_inputs, n_bootstrap=0)
    ignored = evaluate_froc_files(**small_inputs, n_bootstrap=0, ignore_unlisted=True)
    assert ignored.counts.n_candidates == len(small_inputs["results"].read_text().splitlines()) - 2


def test_series_list_problems(small_inputs: dict[str, Path]) -> None:
    uids = small_inputs["seriesuids"].read_text().split()
    small_inputs["seriesuids"].write_text("\n".join(uids + [uids[0]]) + "\n")
    with pytest.raises(FROCInputError, match="listed twice"):
        evaluate_froc_files(**small_inputs, n_bootstrap=0)
    small_inputs["seriesuids"].write_text("")
    with pytest.raises(FROCInputError, match="series list is empty"):
        evaluate_froc_files(**small_inputs, n_bootstrap=0)


def test_missing_and_empty_files(small_inputs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(FROCInputError, match="annotations file not found"):
        evaluate_froc_files(**{**small_inputs, "annotations": tmp_path / "nope.csv"}, n_bootstrap=0)
    small_inputs["excluded"].write_text("")
    with pytest.raises(FROCInputError, match="excluded annotations file is empty"):
        evaluate_froc_files(**small_inputs, n_bootstrap=0)


def test_annotations_of_unlisted_scans_are_ignored(small_inputs: dict[str, Path]) -> None:
    base = evaluate_froc_files(**small_inputs, n_bootstrap=0)
    with small_inputs["annotations"].open("a") as f:
        f.write("9.9.9.unlisted,1.0,2.0,3.0,5.0\n")
    more = evaluate_froc_files(**small_inputs, n_bootstrap=0)
    assert more.extra["annotations_outside_list"] == 1
    np.testing.assert_array_equal(more.sensitivities, base.sensitivities)
