"""Lung-RADS v2022 baseline categories: every threshold of the table just below, at and above, the scan
category, and the table file itself (shipped as package data, with its source)."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from lungcad.lungrads import LungRADSCategory, baseline_category, lungrads_table, scan_category

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
