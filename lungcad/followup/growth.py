"""Growth of one nodule between two scans: volume change, volume doubling time (VDT) with a 95 % interval,
and the follow-up status by the Lung-RADS v2022 growth rule.

VDT = Δt · ln 2 / ln(V₂ / V₁) (Schwartz's exponential-growth formula, as used by the NELSON trial).
The volumes are the analyses' `volume_mm3`: partial-volume corrected (`lungcad.measure.partial_volume`),
so where the slices cut a small nodule moves them far less than it moves a voxel count.

The 95 % interval comes from the repeatability of volumetry on repeat scans, not from our own error: a
nodule measured twice without true change differs by up to ±27 % in volume (95 % limits of agreement of
the relative difference, automated volumetry of solid nodules > 60 mm³ on repeat low-dose CT three
months apart: Marchianò A. et al., "Pulmonary Nodules: Volume Repeatability at Multidetector CT Lung
Cancer Screening", Radiology, 2009 — the MILD trial). We read the relative difference as
(V₂ − V₁) / mean(V₁, V₂), so ±27 % is a limit on the log ratio of δ = ln((1 + 0.135) / (1 − 0.135)) = 0.272.
The true log growth over the interval then lies in ln(V₂/V₁) ± δ, and the VDT interval is
Δt · ln 2 / (ln(V₂/V₁) ± δ). When that range of log growth includes 0, "no growth" is inside the interval:
the VDT interval is unbounded (reported as [shortest plausible VDT, null]) and `includes_no_growth` is set.
The same ±25–27 % is why NELSON and the British Thoracic Society call a volume change of less than 25 %
"no growth". The number is for solid nodules; part-solid and ground-glass nodules vary more, so their
interval is too narrow (stated in docs/followup.md).

Status (Lung-RADS v2022, American College of Radiology, 2022): "growing" when the mean diameter increases
by more than 1.5 mm within 12 months (`lungcad/data/lungrads_v2022.yaml`, `growth`); for an interval longer
than 12 months the increase per 12 months (linear) is compared, and an increase > 1.5 mm over the whole
interval that stays ≤ 1.5 mm per 12 months is "growing" with `slow_growth` set. Otherwise "stable"
(`decreased` marks a mean-diameter decrease > 1.5 mm). New and resolved nodules come from the matching.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from lungcad.lungrads import lungrads_table

#: 95 % limits of agreement of the relative volume difference between repeat scans (MILD, Radiology 2009).
REPEATABILITY_RELATIVE_LOA = 0.27
REPEATABILITY_LOG_LIMIT = math.log(
    (1.0 + REPEATABILITY_RELATIVE_LOA / 2.0) / (1.0 - REPEATABILITY_RELATIVE_LOA / 2.0)
)
REPEATABILITY_SOURCE = (
    "Marchianò A. et al., 'Pulmonary Nodules: Volume Repeatability at Multidetector CT Lung Cancer Screening', "
    "Radiology, 2009 (MILD trial): 95 % limits of agreement of the relative volume difference on repeat "
    "low-dose CT, +/-27 %"
)
DAYS_PER_YEAR = 365.25
#: A 12-month interval allowing a scheduling slack of two weeks.
TWELVE_MONTHS_DAYS = 365.25 + 14.0


def growth_rule() -> tuple[float, float]:
    """(mean-diameter increase in mm, interval in months) of the Lung-RADS growth rule, from the table."""
    rule = lungrads_table()["growth"]
    return float(rule["increase_mm"]), float(rule["interval_months"])


def volume_doubling_time(v1_mm3: float, v2_mm3: float, interval_days: float) -> float:
    """Δt · ln 2 / ln(V₂/V₁) in days; +inf for no change, negative for shrinking."""
    if v1_mm3 <= 0 or v2_mm3 <= 0:
        raise ValueError(f"volumes must be > 0 mm³ for a doubling time, got {v1_mm3} and {v2_mm3}")
    ratio = math.log(v2_mm3 / v1_mm3)
    return math.inf if ratio == 0 else interval_days * math.log(2.0) / ratio


@dataclass(frozen=True)
class Growth:
    """Change of one matched nodule between a prior and a current scan (see the module docstring)."""

    interval_days: float
    prior_volume_mm3: float
    current_volume_mm3: float
    prior_mean_diameter_mm: float
    current_mean_diameter_mm: float
    volume_change_percent: float
    diameter_change_mm: float
    vdt_days: float | None  # None: no change (infinite)
    vdt_interval_days: tuple[float | None, float | None]  # None: unbounded on that side
    includes_no_growth: bool
    volume_growth_significant: bool  # growth beyond the volumetry repeatability
    lungrads_growth: bool
    slow_growth: bool
    decreased: bool
    status: str  # "growing" | "stable"

    def to_dict(self) -> dict:
        out = asdict(self)
        out["vdt_interval_days"] = list(self.vdt_interval_days)
        for key, value in out.items():
            if isinstance(value, float):
                out[key] = round(value, 3)
        out["vdt_interval_days"] = [None if v is None else round(v, 1) for v in out["vdt_interval_days"]]
        return out


def interval_growth(
    prior_volume_mm3: float,
    current_volume_mm3: float,
    prior_mean_diameter_mm: float,
    current_mean_diameter_mm: float,
    interval_days: float,
) -> Growth:
    """Growth of a matched nodule over `interval_days` (> 0).

    Raises:
        ValueError: a non-positive interval or volume.
    """
    if not interval_days > 0:
        raise ValueError(f"the interval between prior and current scan must be > 0 days, got {interval_days}")
    if prior_volume_mm3 <= 0 or current_volume_mm3 <= 0:
        raise ValueError(f"nodule volumes must be > 0 mm³, got {prior_volume_mm3} and {current_volume_mm3}")
    log_ratio = math.log(current_volume_mm3 / prior_volume_mm3)
    scale = interval_days * math.log(2.0)
    low, high = log_ratio - REPEATABILITY_LOG_LIMIT, log_ratio + REPEATABILITY_LOG_LIMIT
    includes_zero = low <= 0.0 <= high
    if includes_zero:
        interval = (scale / high if high > 0 else None, None)
    else:
        interval = (scale / high, scale / low)
    vdt = None if log_ratio == 0 else scale / log_ratio
    increase_mm, months = growth_rule()
    # Lung-RADS reports mean diameters to 0.1 mm; compare the change of the reported values.
    change = round(round(current_mean_diameter_mm, 1) - round(prior_mean_diameter_mm, 1), 1)
    per_twelve_months = (
        change
        if interval_days <= TWELVE_MONTHS_DAYS
        else change * DAYS_PER_YEAR * months / 12.0 / interval_days
    )
    lungrads_growth = per_twelve_months > increase_mm
    slow = not lungrads_growth and change > increase_mm
    return Growth(
        interval_days=float(interval_days),
        prior_volume_mm3=float(prior_volume_mm3),
        current_volume_mm3=float(current_volume_mm3),
        prior_mean_diameter_mm=float(prior_mean_diameter_mm),
        current_mean_diameter_mm=float(current_mean_diameter_mm),
        volume_change_percent=100.0 * (current_volume_mm3 / prior_volume_mm3 - 1.0),
        diameter_change_mm=change,
        vdt_days=vdt,
        vdt_interval_days=interval,
        includes_no_growth=includes_zero,
        volume_growth_significant=low > 0.0,
        lungrads_growth=lungrads_growth,
        slow_growth=slow,
        decreased=change < -increase_mm,
        status="growing" if lungrads_growth or slow else "stable",
    )
