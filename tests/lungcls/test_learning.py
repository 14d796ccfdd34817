"""Slow learning checks of the lungcls pipeline (`make test-slow`; numbers are printed with -s).

They are the M³Net and pathology parts of `make learning-report` (`lungcls.learning`: recipes, data and
splits there), asserting what their 95 % intervals over patients can carry (issue 21):

1. M³Net on synthetic LIDC-IDRI (≥ 150 held-out nodules of held-out patients): ROC-AUC lower bound ≥ 0.70.
   The paired M³Net − best-single-scale interval is printed (and reported), not asserted. Measured on a
   clean clone: 0.779 [0.703, 0.844] — at the floor's edge (three earlier recipes missed it by 0.002–0.043;
   docs/journal/2026-12-07-m3net.md).
2. The pathology classifier on the synthetic LDFC classification images: QWK lower bound > 0.
"""

from __future__ import annotations

import pytest

from common.experiments.learning_report import failed_checks
from lungcls.learning import run_m3net, run_pathology

pytestmark = pytest.mark.slow


def _print(scored: dict) -> None:
    print()
    for row in scored["metrics"] + scored["comparisons"]:
        print(
            f"{row['system']:28s} {row['metric']:8s} {row['value']:.3f} [{row['lower']:.3f}, {row['upper']:.3f}]"
        )
    print(
        f"wall time {scored['wall_time_s'] / 60:.1f} min",
        {k: round(v) for k, v in scored["timings_s"].items()},
    )


def _assert_checks(scored: dict) -> None:
    failed = failed_checks(scored)
    assert not failed, "; ".join(failed)


def test_m3net_learning_report_part_bounds(tmp_path):
    scored = run_m3net(tmp_path / "m3net", docs=None)
    _print(scored)
    _assert_checks(scored)


def test_pathology_learning_report_part_bounds(tmp_path):
    scored = run_pathology(tmp_path / "pathology", docs=None)
    _print(scored)
    _assert_checks(scored)
