"""Growth: VDT and its repeatability interval, the Lung-RADS growth rule, and the follow-up category."""

from __future__ import annotations

import math

import pytest

from lungcad.followup.growth import REPEATABILITY_LOG_LIMIT, interval_growth, volume_doubling_time
from lungcad.lungrads import baseline_category, followup_category, stepped_category


def test_vdt_formula():
    assert volume_doubling_time(100.0, 200.0, 180.0) == pytest.approx(180.0)
    assert volume_doubling_time(100.0, 400.0, 180.0) == pytest.approx(90.0)
    assert volume_doubling_time(100.0, 100.0, 180.0) == math.inf
    assert volume_doubling_time(200.0, 100.0, 180.0) == pytest.approx(-180.0)
    with pytest.raises(ValueError):
        volume_doubling_time(0.0, 100.0, 10.0)


def test_interval_from_repeatability():
    # ±27 % relative difference (MILD) as a limit on ln(V2/V1).
    assert REPEATABILITY_LOG_LIMIT == pytest.approx(math.log(1.135 / 0.865))
    doubled = interval_growth(100.0, 200.0, 5.8, 7.3, 180.0)
    lo, hi = doubled.vdt_interval_days
    assert lo < doubled.vdt_days < hi
    assert lo == pytest.approx(180 * math.log(2) / (math.log(2) + REPEATABILITY_LOG_LIMIT))
    assert not doubled.includes_no_growth and doubled.volume_growth_significant
    # +20 % is within repeatability: "no growth" is inside the interval, which is unbounded above.
    small = interval_growth(100.0, 120.0, 6.0, 6.3, 180.0)
    assert (
        small.includes_no_growth
        and small.vdt_interval_days[1] is None
        and not small.volume_growth_significant
    )
    assert small.status == "stable"
    with pytest.raises(ValueError, match="interval"):
        interval_growth(100.0, 120.0, 6.0, 6.3, 0.0)


def test_lungrads_growth_rule():
    # > 1.5 mm mean-diameter increase within 12 months, compared at 0.1 mm.
    assert interval_growth(100, 200, 5.8, 7.3, 180).status == "stable"  # exactly 1.5 mm: not growth
    assert interval_growth(100, 200, 5.8, 7.4, 180).status == "growing"
    slow = interval_growth(100, 200, 5.0, 7.0, 730)  # 2 mm over two years = 1 mm per 12 months
    assert slow.status == "growing" and slow.slow_growth and not slow.lungrads_growth
    assert interval_growth(100, 50, 8.0, 6.0, 180).decreased


def test_followup_category_and_stepped_management():
    # measure's rules for new / growing nodules (lungcad.lungrads.followup_category).
    assert followup_category("solid", 5.0, prior_mean_diameter_mm=None).category == "3"
    assert followup_category("solid", 9.0, prior_mean_diameter_mm=7.0).category == "4B"
    # Stepped management (v2022), appended for follow-up: 3 stable at 6 months -> 2; 4A stable at 3 months -> 3.
    stable7 = followup_category("solid", 7.0, prior_mean_diameter_mm=7.0)
    assert stable7.category == "3"
    assert stepped_category(stable7, prior_category="3", interval_days=180).category == "2"
    assert stepped_category(stable7, prior_category="3", interval_days=60).category == "3"
    stable9 = followup_category("solid", 9.0, prior_mean_diameter_mm=9.0)
    assert stepped_category(stable9, prior_category="4A", interval_days=90).category == "3"
    # Crossing a size threshold is reclassified by size, not stepped down.
    crossed = followup_category("solid", 8.1, prior_mean_diameter_mm=7.9)
    assert stepped_category(crossed, prior_category="3", interval_days=180).category == "4A"
    assert (
        stepped_category(baseline_category("solid", 5.0), prior_category=None, interval_days=300).category
        == "2"
    )
    with pytest.raises(ValueError):
        stepped_category(stable7, prior_category="9", interval_days=10)
