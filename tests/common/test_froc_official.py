"""Our FROC against the official LUNA16 script's own outputs (tests/data/froc/*/expected.json).

Each fixture is a generated result set plus what ``noduleCADEvaluationLUNA16.py`` computed on it
(``tests/data/froc/make_fixtures.py``): its curve, the seven sensitivities in both readings, and its
bootstrap (1000 samples after ``np.random.seed(seed)``): mean / lower / upper on its 10000-point grid
and at the seven FP rates. Everything must agree to 1e-9 (in practice it is bit-identical).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.metrics.froc import FP_RATES
from common.metrics.froc_io import evaluate_froc_files

DATA = Path(__file__).resolve().parents[1] / "data" / "froc"
CASES = sorted(p.name for p in DATA.iterdir() if (p / "expected.json").is_file())
TOL = 1e-9


def _inputs(case: str) -> dict[str, Path]:
    d = DATA / case
    return {
        "annotations": d / "annotations.csv.gz",
        "excluded": d / "annotations_excluded.csv.gz",
        "seriesuids": d / "seriesuids.csv.gz",
        "results": d / "results.csv.gz",
    }


@pytest.fixture(scope="module", params=CASES)
def evaluated(request: pytest.FixtureRequest) -> tuple[dict, object]:
    case = request.param
    expected = json.loads((DATA / case / "expected.json").read_text())
    result = evaluate_froc_files(
        **_inputs(case), n_bootstrap=expected["bootstrap_samples"], seed=expected["bootstrap_seed"]
    )
    return expected, result


def test_fixture_cases_cover_the_rules() -> None:
    """The fixture set exercises every rule the issue lists (guards against a shrunken fixture set)."""
    assert {
        "basic",
        "excluded_unknown_size",
        "double_hits",
        "empty_scans",
        "cap_over_100",
        "tied_probabilities",
        "luna_like",
    } <= set(CASES)
    counts = {c: json.loads((DATA / c / "expected.json").read_text())["counts"] for c in CASES}
    assert counts["excluded_unknown_size"]["ignored_on_excluded"] > 0
    assert counts["double_hits"]["ignored_double_hits"] > 0
    assert all(c["false_negatives"] > 0 for c in counts.values())


def test_candidate_counts_match_script(evaluated: tuple[dict, object]) -> None:
    expected, result = evaluated
    got = result.to_dict()["counts"]
    for key, value in expected["counts"].items():
        assert got[key] == value, key


def test_curve_matches_script(evaluated: tuple[dict, object]) -> None:
    expected, result = evaluated
    np.testing.assert_allclose(result.curve.fps, expected["curve_fps"], rtol=0, atol=TOL)
    np.testing.assert_allclose(result.curve.sensitivity, expected["curve_sensitivity"], rtol=0, atol=TOL)


@pytest.mark.parametrize("reading", ["interp", "nearest"])
def test_seven_sensitivities_and_cpm_match_script(evaluated: tuple[dict, object], reading: str) -> None:
    expected, result = evaluated
    got = result.sensitivities_interp if reading == "interp" else result.sensitivities_nearest
    np.testing.assert_allclose(got, expected[f"sensitivity_{reading}"], rtol=0, atol=TOL)
    assert abs(float(np.mean(got)) - expected[f"cpm_{reading}"]) < TOL
    assert len(got) == len(FP_RATES)


def test_bootstrap_matches_script_with_same_seed(evaluated: tuple[dict, object]) -> None:
    expected, result = evaluated
    bs = result.bootstrap
    assert bs.n_samples == expected["bootstrap_samples"] and bs.seed == expected["bootstrap_seed"]
    for ours, theirs in (("mean", "mean"), ("lower", "lower"), ("upper", "upper")):
        np.testing.assert_allclose(
            getattr(bs, ours), expected[f"bootstrap_points_{theirs}"], rtol=0, atol=TOL
        )
    assert abs(bs.cpm_mean - expected["bootstrap_cpm_mean"]) < TOL
    assert abs(bs.cpm_lower - expected["bootstrap_cpm_lower"]) < TOL
    assert abs(bs.cpm_upper - expected["bootstrap_cpm_upper"]) < TOL
    idx = np.asarray(expected["bootstrap_grid_index"])
    np.testing.assert_allclose(bs.grid_mean[idx], expected["bootstrap_grid_mean"], rtol=0, atol=TOL)
    np.testing.assert_allclose(bs.grid_lower[idx], expected["bootstrap_grid_lower"], rtol=0, atol=TOL)
    np.testing.assert_allclose(bs.grid_upper[idx], expected["bootstrap_grid_upper"], rtol=0, atol=TOL)


def test_other_seed_gives_other_interval() -> None:
    """The seed is really used: a different seed changes the bootstrap but not the point estimates."""
    case = "basic"
    expected = json.loads((DATA / case / "expected.json").read_text())
    other = evaluate_froc_files(
        **_inputs(case), n_bootstrap=1000, seed=expected["bootstrap_seed"] + 1, bootstrap_grid=None
    )
    np.testing.assert_allclose(other.sensitivities_interp, expected["sensitivity_interp"], rtol=0, atol=TOL)
    assert not np.allclose(other.bootstrap.mean, expected["bootstrap_points_mean"], rtol=0, atol=TOL)
