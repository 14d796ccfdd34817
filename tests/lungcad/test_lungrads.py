"""Lung-RADS v2022 baseline categories: every threshold of the table just below, at and above, the scan
category, and the table file itself (shipped as package data, with its source)."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from lungcad.lungrads import (
    LungRADSCategory,
    baseline_category,
    followup_category,
    is_growth,
    lungrads_table,
    scan_category,
)

# (type, mean diameter, solid component, expected category). "Below" is 0.1 mm under the threshold: the
# resolution at which the ACR asks for mean diameters.
BOUNDARIES = [
    # solid: 2 < 6 ≤ 3 < 8 ≤ 4A < 15 ≤ 4B
    ("solid", 0.0, None, "2"),
    ("solid", 5.9, None, "2"),
    ("solid", 6.0, None, "3"),
    ("solid", 6.1, None, "3"),
    ("solid", 7.9, None, "3"),
    ("solid", 8.0, None, "4A"),
    ("solid", 8.1, None, "4A"),
    ("solid", 14.9, None, "4A"),
    ("solid", 15.0, None, "4B"),
    ("solid", 15.1, None, "4B"),
    # part-solid: total < 6 → 2 whatever the component; else component 3 < 6 ≤ 4A < 8 ≤ 4B
    ("part-solid", 5.9, 2.0, "2"),
    ("part-solid", 5.9, 5.9, "2"),
    ("part-solid", 6.0, 2.0, "3"),
    ("part-solid", 6.1, 2.0, "3"),
    ("part-solid", 12.0, 5.9, "3"),
    ("part-solid", 12.0, 6.0, "4A"),
    ("part-solid", 12.0, 6.1, "4A"),
    ("part-solid", 12.0, 7.9, "4A"),
    ("part-solid", 12.0, 8.0, "4B"),
    ("part-solid", 12.0, 8.1, "4B"),
    ("part-solid", 6.0, None, "3"),  # no component size: classed as a 0 mm component
    # ground-glass (non-solid): 2 < 30 ≤ 3
    ("ground-glass", 5.0, None, "2"),
    ("ground-glass", 29.9, None, "2"),
    ("ground-glass", 30.0, None, "3"),
    ("ground-glass", 30.1, None, "3"),
]


@pytest.mark.parametrize("kind, diameter, component, expected", BOUNDARIES)
def test_every_table_boundary(kind, diameter, component, expected):
    result = baseline_category(kind, diameter, component)
    assert result.category == expected, result.reason
    assert kind in result.reason and f"{diameter:.1f} mm" in result.reason


def test_diameters_are_compared_at_a_tenth_of_a_millimetre():
    assert baseline_category("solid", 5.95).category == "3"  # reported as 6.0 mm
    assert baseline_category("solid", 5.94).category == "2"  # reported as 5.9 mm
    assert baseline_category("part-solid", 10.0, 7.96).category == "4B"


def test_type_aliases_and_errors():
    assert baseline_category("ggo", 31.0).category == "3"
    assert baseline_category("non-solid", 10.0).category == "2"
    with pytest.raises(ValueError, match="unknown nodule type"):
        baseline_category("cystic", 10.0)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="mean diameter"):
            baseline_category("solid", bad)


def test_descriptor_and_management_per_category():
    table = lungrads_table()
    for expected, (kind, d, c) in {
        "2": ("solid", 4.0, None),
        "3": ("solid", 7.0, None),
        "4A": ("solid", 9.0, None),
        "4B": ("solid", 20.0, None),
    }.items():
        result = baseline_category(kind, d, c)
        assert result.descriptor == table["categories"][expected]["descriptor"]
        assert result.management == table["categories"][expected]["management"]
    assert "6-month" in baseline_category("solid", 7.0).management
    assert "3-month" in baseline_category("solid", 9.0).management


def test_scan_category_is_the_highest():
    assert scan_category([]).category == "1"
    assert scan_category([]).descriptor == "Negative"
    found = [
        baseline_category("solid", 4.0),
        baseline_category("part-solid", 9.0, 6.5),
        baseline_category("solid", 7.0),
    ]
    worst = scan_category(found)
    assert worst.category == "4A" and "highest of 3 nodules" in worst.reason
    assert scan_category([baseline_category("ground-glass", 40.0)]).category == "3"
    assert scan_category([baseline_category("solid", 3.0), baseline_category("solid", 16.0)]).category == "4B"


def test_to_dict_is_json_ready():
    data = baseline_category("solid", 7.2).to_dict()
    assert json.loads(json.dumps(data)) == data
    assert set(data) == set(LungRADSCategory.__dataclass_fields__)
    assert data["reason"] == "solid, mean diameter 7.2 mm in [6, 8)"


def test_table_is_package_data_with_its_source():
    path = resources.files("lungcad").joinpath("data", "lungrads_v2022.yaml")
    assert path.is_file()
    table = lungrads_table()
    assert table["document"] == "Lung-RADS v2022"
    assert table["publisher"] == "American College of Radiology" and table["year"] == 2022
    assert "Verification" in path.read_text(encoding="utf-8")
    assert table["growth"] == {"increase_mm": 1.5, "interval_months": 12}
    # Every list ends with an open interval and its limits increase.
    baseline = table["baseline"]
    for rules in (baseline["solid"], baseline["ground-glass"], baseline["part-solid"]["solid_component"]):
        limits = [r["below_mm"] for r in rules]
        assert limits[-1] is None and limits[:-1] == sorted(limits[:-1])


# ------------------------------------------------------------------------------------------ follow-up
def test_growth_rule_boundary():
    assert not is_growth(6.0, 7.5)  # +1.5 mm is not growth ("more than 1.5 mm")
    assert is_growth(6.0, 7.6)
    assert is_growth(6.04, 7.56)  # compared at 0.1 mm: 6.0 → 7.6
    assert not is_growth(6.05, 7.54)  # 6.1 → 7.5
    assert not is_growth(8.0, 6.0)


FOLLOWUP = [
    # (type, now, component now, prior, prior component, expected)
    ("solid", 3.9, None, None, None, "2"),  # new < 4
    ("solid", 4.0, None, None, None, "3"),  # new 4 to < 6
    ("solid", 5.9, None, None, None, "3"),
    ("solid", 6.0, None, None, None, "4A"),  # new 6 to < 8
    ("solid", 7.9, None, None, None, "4A"),
    ("solid", 8.0, None, None, None, "4B"),  # new ≥ 8
    ("solid", 5.6, None, 4.0, None, "4A"),  # growing (+1.6) < 8
    ("solid", 5.5, None, 4.0, None, "2"),  # +1.5: stable, size rule
    ("solid", 7.9, None, 6.3, None, "4A"),
    ("solid", 8.0, None, 6.4, None, "4B"),  # growing ≥ 8
    ("solid", 16.0, None, 15.8, None, "4B"),  # stable, size rule ≥ 15
    ("solid", 9.0, None, 9.0, None, "4A"),  # stable: size category kept (stepped management: reader)
    ("part-solid", 5.9, 2.0, None, None, "3"),  # new < 6 mm total
    ("part-solid", 6.0, 2.0, None, None, "3"),  # new ≥ 6: baseline rule, component < 6
    ("part-solid", 9.0, 6.5, None, None, "4A"),
    ("part-solid", 9.0, 3.9, 9.0, None, "4A"),  # new solid component < 4 in a known nodule
    ("part-solid", 9.0, 4.0, 9.0, None, "4B"),  # new solid component ≥ 4
    ("part-solid", 9.0, 3.6, 9.0, 2.0, "4A"),  # growing component (+1.6) < 4
    ("part-solid", 9.0, 4.1, 9.0, 2.5, "4B"),  # growing component ≥ 4
    ("part-solid", 9.0, 3.5, 9.0, 2.0, "3"),  # +1.5: not growing, baseline rule
    ("part-solid", 12.0, 8.0, 12.0, 8.0, "4B"),  # stable, size rule
    ("ground-glass", 29.9, None, None, None, "2"),  # new < 30
    ("ground-glass", 30.0, None, None, None, "3"),  # new ≥ 30
    ("ground-glass", 35.0, None, 25.0, None, "2"),  # seen before: 2 at any size
]


@pytest.mark.parametrize("kind, now, comp, prior, prior_comp, expected", FOLLOWUP)
def test_followup_rules(kind, now, comp, prior, prior_comp, expected):
    result = followup_category(
        kind, now, comp, prior_mean_diameter_mm=prior, prior_solid_component_mm=prior_comp, interval_months=12
    )
    assert result.category == expected, result.reason
    if prior is None:
        assert result.reason.startswith("new")
