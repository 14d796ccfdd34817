"""Lung-RADS v2022 baseline category of a nodule from its type and size, and the scan's category.

Why the table is data: the thresholds are the ACR's, not ours; they live once, with their source and what
was verified against which text, in ``lungcad/data/lungrads_v2022.yaml`` (American College of Radiology,
"Lung-RADS v2022", 2022). This module only reads the table and applies it.

Only what type and size decide is derived: baseline categories 2, 3, 4A and 4B for solid, part-solid and
ground-glass (non-solid) nodules, and 1 for a scan without nodules. Categories 0 and 4X, benign
calcification / fat, perifissural / juxtapleural / airway nodules and cysts need a reader. Growth and "new"
rules need a prior scan: `followup_category` (the growth rule, data in the same YAML) belongs here too.
Research decision support, not a diagnosis.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

import yaml

__all__ = [
    "LungRADSCategory",
    "baseline_category",
    "scan_category",
    "lungrads_table",
    "followup_category",
    "TABLE_RESOURCE",
]

TABLE_RESOURCE = "lungrads_v2022.yaml"
#: Nodule types `baseline_category` knows (as `lungcad.measure` names them); "ggo"/"non-solid" are aliases.
_TYPE_ALIASES = {
    "solid": "solid",
    "part-solid": "part-solid",
    "ground-glass": "ground-glass",
    "ggo": "ground-glass",
    "non-solid": "ground-glass",
    "nonsolid": "ground-glass",
}


@dataclass(frozen=True)
class LungRADSCategory:
    """One Lung-RADS category with the ACR's descriptor and management, and the rule that fired."""

    category: str
    descriptor: str
    management: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@lru_cache(maxsize=1)
def lungrads_table() -> dict[str, Any]:
    """The parsed table (``lungcad/data/lungrads_v2022.yaml``)."""
    text = resources.files("lungcad").joinpath("data", TABLE_RESOURCE).read_text(encoding="utf-8")
    return yaml.safe_load(text)


def _make(category: str, reason: str) -> LungRADSCategory:
    entry = lungrads_table()["categories"][category]
    return LungRADSCategory(category, entry["descriptor"], entry["management"], reason)


def _interval(rules: list[dict[str, Any]], value: float) -> tuple[dict[str, Any], str]:
    """First rule with value < below_mm; returns it and the interval as text, e.g. "[6, 8)"."""
    lower = 0.0
    for rule in rules:
        upper = rule["below_mm"]
        if upper is None or value < upper:
            if upper is None:
                text = f">= {lower:g}"
            else:
                text = f"[{lower:g}, {upper:g})" if lower > 0 else f"< {upper:g}"
            return rule, text
        lower = upper
    raise AssertionError("the last rule of each list has below_mm: null")


def _round(value: float) -> float:
    return round(float(value) + 1e-9, 1)


def baseline_category(
    nodule_type: str, mean_diameter_mm: float, solid_component_mm: float | None = None
) -> LungRADSCategory:
    """Baseline Lung-RADS v2022 category of one nodule from type and mean diameter(s), in mm.

    Diameters are rounded to 0.1 mm first (the ACR reports mean diameters to one decimal), so 5.96 mm is
    6.0 mm. A part-solid nodule without a solid-component size is classed as if the component were 0 mm.

    Raises:
        ValueError: unknown type or a negative / non-finite size.
    """
    kind = _TYPE_ALIASES.get(str(nodule_type).lower())
    if kind is None:
        raise ValueError(f"unknown nodule type {nodule_type!r}; use 'solid', 'part-solid' or 'ground-glass'")
    size = float(mean_diameter_mm)
    if not size >= 0.0 or size == float("inf"):
        raise ValueError(f"mean diameter must be a finite size >= 0 mm, got {mean_diameter_mm!r}")
    size = _round(size)
    rules = lungrads_table()["baseline"]
    if kind == "part-solid":
        total = rules["part-solid"]["total"]
        if size < total[0]["below_mm"]:
            rule, text = _interval(total, size)
            return _make(rule["category"], f"part-solid, mean diameter {size:.1f} mm in {text}")
        component = _round(solid_component_mm or 0.0)
        rule, text = _interval(rules["part-solid"]["solid_component"], component)
        return _make(
            rule["category"],
            f"part-solid, mean diameter {size:.1f} mm >= {total[0]['below_mm']:g}, "
            f"solid component {component:.1f} mm in {text}",
        )
    rule, text = _interval(rules[kind], size)
    return _make(rule["category"], f"{kind}, mean diameter {size:.1f} mm in {text}")


def scan_category(categories: Sequence[LungRADSCategory]) -> LungRADSCategory:
    """The scan's category: the highest of its nodules' categories; "1" (negative) when there are none."""
    if not categories:
        return _make("1", "no lung nodules")
    order = lungrads_table()["order"]
    worst = max(categories, key=lambda c: order.index(c.category))
    n = len(categories)
    return LungRADSCategory(
        worst.category,
        worst.descriptor,
        worst.management,
        f"highest of {n} nodule{'s' if n != 1 else ''}: {worst.reason}",
    )


def _rank(category: str) -> int:
    return lungrads_table()["order"].index(category)


FOLLOWUP_STATUSES = ("new", "growing", "stable")


def followup_category(
    status: str,
    nodule_type: str,
    mean_diameter_mm: float,
    solid_component_mm: float | None = None,
    *,
    prior_category: str | None = None,
    interval_days: float | None = None,
    slow_growth: bool = False,
) -> LungRADSCategory:
    """Lung-RADS v2022 category of a nodule on a follow-up scan, with the prior taken into account.

    `status` is the nodule's follow-up status ("new", "growing" or "stable"; a resolved nodule has no
    category). New and growing nodules take the table's "new" / "growing" lines (never below their
    baseline size category); a stable (or decreased) nodule takes the stepped-management line when its
    prior category and the interval allow, else the higher of its prior category and its current baseline
    size category ("size thresholds apply": crossing one reclassifies even without growth). `slow_growth`
    (growth over several rounds, never > 1.5 mm within 12 months) puts a solid / part-solid nodule in 4B.

    Raises:
        ValueError: unknown status or type (from `baseline_category`), or an unknown prior category.
    """
    if status not in FOLLOWUP_STATUSES:
        raise ValueError(f"unknown follow-up status {status!r}; use one of {FOLLOWUP_STATUSES}")
    order = lungrads_table()["order"]
    if prior_category is not None and prior_category not in order:
        raise ValueError(f"unknown prior Lung-RADS category {prior_category!r}; use one of {order}")
    baseline = baseline_category(nodule_type, mean_diameter_mm, solid_component_mm)
    kind = _TYPE_ALIASES[str(nodule_type).lower()]
    rules = lungrads_table()["followup"]
    size = _round(mean_diameter_mm)
    component = _round(solid_component_mm or 0.0)
    if status in ("new", "growing"):
        table = rules[status]
        if kind == "part-solid":
            total = table["part-solid"].get("total")
            if total and size < total[0]["below_mm"]:
                rule, text = _interval(total, size)
                reason = f"{status} part-solid, mean diameter {size:.1f} mm in {text}"
            else:
                rule, text = _interval(table["part-solid"]["solid_component"], component)
                reason = f"{status} part-solid, solid component {component:.1f} mm in {text}"
        else:
            rule, text = _interval(table[kind], size)
            reason = f"{status} {kind}, mean diameter {size:.1f} mm in {text}"
        category = rule["category"]
        if slow_growth and status == "growing" and kind != "ground-glass":
            category = rules["slow_growth_category"]
            reason = f"slowly growing {kind} over more than 12 months (mean diameter {size:.1f} mm)"
        if _rank(baseline.category) > _rank(category):
            return _make(baseline.category, f"{reason}; baseline size rule higher: {baseline.reason}")
        return _make(category, reason)
    # stable or decreased
    if prior_category is None:
        return _make(baseline.category, f"stable; no prior category: {baseline.reason}")
    if _rank(baseline.category) > _rank(prior_category):
        return _make(baseline.category, f"stable, but crossed a size threshold: {baseline.reason}")
    for rule in rules["stepped"]:
        if (
            prior_category == rule["prior"]
            and interval_days is not None
            and interval_days >= rule["min_interval_days"]
        ):
            return _make(rule["category"], f"{rule['text']} ({interval_days:.0f} days)")
    return _make(prior_category, f"stable; prior category {prior_category} kept ({baseline.reason})")
