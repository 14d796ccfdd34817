"""Lung-RADS v2022 baseline category of a nodule from its type and size, and the scan's category.

Why the table is data: the thresholds are the ACR's, not ours; they live once, with their source and what
was verified against which text, in ``lungcad/data/lungrads_v2022.yaml`` (American College of Radiology,
"Lung-RADS v2022", 2022). This module only reads the table and applies it.

Only what type and size decide is derived: baseline categories 2, 3, 4A and 4B for solid, part-solid and
ground-glass (non-solid) nodules, and 1 for a scan without nodules. Categories 0 and 4X, benign
calcification / fat, perifissural / juxtapleural / airway nodules and cysts need a reader. Growth and "new"
rules need a prior scan: `followup_category` applies the table's "new" and "growing" clauses and the v2022
growth rule (`is_growth`), data in the same YAML.
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
    "followup_category",
    "is_growth",
    "stepped_category",
    "lungrads_table",
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
    """First rule with value < below_mm; returns it and its interval as text, e.g. "[6, 8)", "[15, inf)"."""
    lower = 0.0
    for rule in rules:
        upper = rule["below_mm"]
        if upper is None or value < upper:
            return rule, f"[{lower:g}, {'inf' if upper is None else f'{upper:g}'})"
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


def is_growth(prior_mean_diameter_mm: float, mean_diameter_mm: float) -> bool:
    """Lung-RADS v2022 growth: the mean diameter (to 0.1 mm) increased by more than 1.5 mm.

    The ACR states it for a 12-month interval; judging the interval is the caller's (see
    `followup_category`).
    """
    increase = _round(mean_diameter_mm) - _round(prior_mean_diameter_mm)
    return increase > float(lungrads_table()["growth"]["increase_mm"]) + 1e-9


def _higher(a: LungRADSCategory, b: LungRADSCategory) -> LungRADSCategory:
    order = lungrads_table()["order"]
    return a if order.index(a.category) >= order.index(b.category) else b


def followup_category(
    nodule_type: str,
    mean_diameter_mm: float,
    solid_component_mm: float | None = None,
    *,
    prior_mean_diameter_mm: float | None,
    prior_solid_component_mm: float | None = None,
    interval_months: float | None = None,
) -> LungRADSCategory:
    """Lung-RADS category of a nodule on a follow-up scan, given its size on the prior scan.

    Args:
        nodule_type, mean_diameter_mm, solid_component_mm: the nodule now (as for `baseline_category`).
        prior_mean_diameter_mm: its mean diameter on the prior scan; None = a new nodule (absent before).
        prior_solid_component_mm: the prior solid component; None = none (a part-solid nodule whose
            component was absent before has a *new* solid component).
        interval_months: time between the scans, reported in the reason. The ACR's growth rule is stated
            for 12 months; growth over a longer interval is still counted as growth (v2022 also calls slow
            growth of solid and part-solid nodules suspicious), which errs towards the higher category.

    Rules (data: ``followup`` in the YAML): new and growing nodules by the table's "new" / "growing"
    clauses, never below the baseline size rule (size thresholds also apply to enlarging nodules); a
    ground-glass nodule seen before is category 2 at any size ("unchanged or slowly growing"). A stable
    nodule keeps its size category: v2022's stepped management of stable category 3 / 4A nodules needs
    the prior category and its management and is left to the reader.
    """
    size = baseline_category(nodule_type, mean_diameter_mm, solid_component_mm)
    kind = _TYPE_ALIASES[str(nodule_type).lower()]
    rules = lungrads_table()["followup"][kind]
    current = _round(mean_diameter_mm)
    when = f" over {interval_months:g} months" if interval_months is not None else ""
    if prior_mean_diameter_mm is None:
        if kind == "part-solid":
            rule, text = _interval(rules["new_total"], current)
            if rule["category"] is None:
                return _make(size.category, f"new {size.reason}")
            return _make(rule["category"], f"new part-solid, mean diameter {current:.1f} mm in {text}")
        rule, text = _interval(rules["new"], current)
        return _higher(_make(rule["category"], f"new {kind}, mean diameter {current:.1f} mm in {text}"), size)
    prior = _round(prior_mean_diameter_mm)
    change = f"mean diameter {prior:.1f} -> {current:.1f} mm{when}"
    if kind == "ground-glass":
        return _make(rules["seen_before"][0]["category"], f"ground-glass seen before, {change}")
    if kind == "solid":
        if is_growth(prior, current):
            rule, text = _interval(rules["growing"], current)
            return _higher(_make(rule["category"], f"growing solid, {change}, now in {text}"), size)
        return _make(size.category, f"stable solid ({change}); size rule: {size.reason}")
    component = _round(solid_component_mm or 0.0)
    if prior_solid_component_mm is None and component > 0.0:
        status = "new solid component"
    elif prior_solid_component_mm is not None and is_growth(prior_solid_component_mm, component):
        status = f"growing solid component ({_round(prior_solid_component_mm):.1f} -> {component:.1f} mm)"
    else:
        return _make(
            size.category, f"part-solid without a new or growing solid component ({change}); {size.reason}"
        )
    rule, text = _interval(rules["new_or_growing_solid_component"], component)
    return _higher(_make(rule["category"], f"part-solid, {status}{when}, component in {text}"), size)


def stepped_category(
    category: LungRADSCategory, *, prior_category: str | None, interval_days: float | None
) -> LungRADSCategory:
    """v2022 stepped management for a nodule that is stable or decreased (``stepped_management`` in the
    YAML): a prior category 3 becomes 2 after ≥ 6 months, a prior 4A becomes 3 after ≥ 3 months.

    `category` is the nodule's follow-up category (`followup_category`); it is returned unchanged when no
    step applies, or when the nodule now sits in a higher size category than its prior one (size thresholds
    apply: crossing one is reclassified by size, not stepped down).
    """
    order = lungrads_table()["order"]
    if prior_category is None or interval_days is None:
        return category
    if prior_category not in order:
        raise ValueError(f"unknown prior Lung-RADS category {prior_category!r}; use one of {order}")
    if order.index(category.category) > order.index(prior_category):
        return category
    for rule in lungrads_table()["stepped_management"]:
        if prior_category == rule["prior"] and interval_days >= rule["min_interval_days"]:
            return _make(rule["category"], f"{rule['text']} ({interval_days:.0f} days); {category.reason}")
    return category
