"""Volumetry accuracy on phantoms: partial-volume volume vs voxel count, true masks vs the fallback mask.

* **Follow-up phantoms** (`lungdata synth followup`, `PATIENTS` patients × 3 time points, seed `SEED`, as
  `bench.followup_bench`): per nodule and time point, `measure_nodule` on the true mask and on the
  segmentation fallback's mask (`lungcad.pipeline.fallback_mask` at the true centre with the true
  diameter, as in `--nodules` mode where GLANCE segments nothing). Volume relative error to the
  manifest's physical volume (LIDC consensus volume on its own grid × growth³), VDT relative error of
  growing nodules whose true volume changed by ≥ 25 % (consecutive intervals, and consecutive plus first →
  last), and how many stable nodules' VDT intervals include "no growth" — for both volume definitions.
  A third source, **joint fallback**, is what `lungcad followup` uses when both analyses' masks come from
  the fallback: every interval (also first → last) registered (`lungcad.followup.registration.register`)
  and the nodule segmented at both times with one cut (`lungcad.followup.consistency.joint_fallback`,
  prior true centre, the larger true diameter).
* **LIDC-style phantoms** (`generate_scan(seed, i, "small")`, `LIDC_SCANS` scans of seed `LIDC_SEED`,
  nodules ≥ 5 mm): the fallback mask vs the consensus mask (Dice), volume relative error to the
  consensus mask's voxel volume (the phantom's recorded truth) and to the readers' mean mask volume (what
  the image draws: the nodule is rendered from the readers' mean mask), mean diameter absolute error to
  the true mask's. Then the fallback's volume error and Dice at *detection-like* centres
  (`detection_like`: moved 0.5–2 mm, diameter × 0.6–1.0) on seeds `LIDC_SEED` and `LIDC_SEED` + 1 — the
  setting `lungcad.pipeline.FALLBACK_THRESHOLD_SHARE` was chosen in (docs/measurements.md).

Run: ``python -m bench.volumetry_bench [--seed S] [--followup-only]`` (about 2 min of CPU; the registrations
are most of it).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np

PATIENTS = 6
SEED = 0
LIDC_SEED = 3
LIDC_SCANS = 30
MIN_DIAMETER_MM = 5.0


def fallback_on_grid(volume, centre_zyx: np.ndarray, diameter_mm: float) -> np.ndarray | None:
    """The fallback mask `lungcad.pipeline._segment` makes (`fallback_segment`), on the whole grid."""
    from lungcad.pipeline import fallback_segment

    found = fallback_segment(volume.array, centre_zyx, diameter_mm, np.asarray(volume.spacing)[::-1])
    return None if found is None else found[0]


def _median(values) -> float:
    return float(np.median(values)) if len(values) else float("nan")


def followup(root: Path, seed: int = SEED) -> dict[str, object]:
    from common.io import read_volume
    from common.synth.followup import make_followup, read_truth
    from lungcad.followup.consistency import joint_fallback
    from lungcad.followup.growth import interval_growth
    from lungcad.followup.registration import register
    from lungcad.measure import measure_nodule

    make_followup(root, n_patients=PATIENTS, n_times=3, seed=seed)
    truth = read_truth(root)
    sources = ("true mask", "fallback", "joint fallback")
    fields = {"partial volume": "volume_mm3", "voxel count": "voxel_volume_mm3"}
    vol_err = {(s, f): [] for s in sources for f in fields}
    dia_err = {s: [] for s in sources}
    vdt = {(s, f, c): [] for s in sources for f in fields for c in (True, False)}
    stable = {(s, f, c): [] for s in sources for f in fields for c in (True, False)}
    failed = failed_joint = 0
    for patient in truth["patients"]:
        scans = patient["scans"]
        volumes = [read_volume(root / "detection_3d" / "mhd" / f"{s['uid']}.mhd") for s in scans]
        labels = [read_volume(root / "truth_labels" / f"{s['uid']}.nii.gz").array for s in scans]
        measured: dict[tuple[str, int, int], object] = {}
        for k, nodule in enumerate(patient["nodules"]):
            for t, p in enumerate(nodule["per_time"]):
                if not p["present"]:
                    continue
                true_mask = labels[t] == k + 1
                mt = measure_nodule(volumes[t], true_mask)
                measured[("true mask", k, t)] = mt
                centre = np.asarray(p["voxel_zyx"], dtype=np.float64)
                mask = fallback_on_grid(volumes[t], centre, p["diameter_mm"])
                if mask is None:
                    failed += 1
                    continue
                mf = measure_nodule(volumes[t], mask)
                measured[("fallback", k, t)] = mf
                for s, m in (("true mask", mt), ("fallback", mf)):
                    for name, f in fields.items():
                        vol_err[(s, name)].append(getattr(m, f) / p["volume_mm3"] - 1.0)
                dia_err["fallback"].append(abs(mf.mean_diameter_mm - mt.mean_diameter_mm))
        for a, b in ((0, 1), (1, 2), (0, 2)):
            days = scans[b]["days_from_first"] - scans[a]["days_from_first"]
            registration = register(volumes[a], volumes[b])
            for k, nodule in enumerate(patient["nodules"]):
                pa, pb = nodule["per_time"][a], nodule["per_time"][b]
                pair: dict[str, tuple] = {}
                if pa["present"] and pb["present"]:
                    joint = joint_fallback(
                        volumes[a],
                        volumes[b],
                        np.asarray(pa["world_xyz"], dtype=np.float64),
                        max(pa["diameter_mm"], pb["diameter_mm"]),
                        registration.prior_to_current,
                        registration.current_to_prior,
                    )
                    if joint is None:
                        failed_joint += 1
                    else:
                        pair["joint fallback"] = (
                            measure_nodule(volumes[a], joint.prior_mask),
                            measure_nodule(volumes[b], joint.current_mask),
                        )
                for s in sources:
                    if (s, k, a) in measured and (s, k, b) in measured:
                        pair[s] = (measured[(s, k, a)], measured[(s, k, b)])
                    if s not in pair:
                        continue
                    ma, mb = pair[s]
                    for name, f in fields.items():
                        change = interval_growth(
                            getattr(ma, f), getattr(mb, f), ma.mean_diameter_mm, mb.mean_diameter_mm, days
                        )
                        for c in (True, False) if b == a + 1 else (False,):
                            if nodule["kind"] == "growing" and pb["volume_mm3"] / pa["volume_mm3"] >= 1.25:
                                v = math.inf if change.vdt_days is None else change.vdt_days
                                vdt[(s, name, c)].append(abs(v - nodule["vdt_days"]) / nodule["vdt_days"])
                            if nodule["kind"] == "stable":
                                stable[(s, name, c)].append(change.includes_no_growth)
    out: dict[str, object] = {"follow-up nodule time points": len(vol_err[("true mask", "voxel count")])}
    out["follow-up fallback found nothing"] = failed
    out["follow-up joint fallback found nothing (nodule intervals)"] = failed_joint
    for (s, name), e in vol_err.items():
        if not e:
            continue
        e = np.asarray(e)
        out[f"follow-up volume median |rel error| ({s}, {name})"] = _median(np.abs(e))
        out[f"follow-up volume signed median rel error ({s}, {name})"] = _median(e)
    out["follow-up mean diameter median abs error, fallback vs true mask (mm)"] = _median(dia_err["fallback"])
    for (s, name, c), e in vdt.items():
        which = "consecutive" if c else "consecutive + first->last"
        out[f"VDT median rel error ({s}, {name}, {which}, n={len(e)})"] = _median(e)
        ok = stable[(s, name, c)]
        out[f"stable VDT interval includes no growth ({s}, {name}, {which})"] = f"{sum(ok)}/{len(ok)}"
    return out


def detection_like(
    rng: np.random.Generator, centre_zyx: np.ndarray, diameter_mm: float, spacing_zyx: np.ndarray
) -> tuple[np.ndarray, float]:
    """A true centre and diameter as stage 1 might report them: moved 0.5–2 mm in a random direction, the
    diameter scaled by 0.6–1.0 (box regression undersizes)."""
    step = rng.normal(size=3)
    step *= rng.uniform(0.5, 2.0) / np.linalg.norm(step)
    return centre_zyx + step / spacing_zyx, diameter_mm * rng.uniform(0.6, 1.0)


def lidc_rows(seed: int = LIDC_SEED, detected: bool = False) -> list[dict[str, object]]:
    """Per nodule ≥ 5 mm of the LIDC-style phantoms of `seed`: true and fallback volumes, Dice, diameter
    error; ``detected``: the fallback at `detection_like` centres instead of the true ones."""
    from common.io import CTVolume
    from common.synth.scan import generate_scan
    from lungcad.measure import measure_nodule

    rows = []
    rng = np.random.default_rng(7)
    for index in range(LIDC_SCANS):
        scan = generate_scan(seed, index, "small")
        g = scan.geometry
        volume = CTVolume(scan.image, g.spacing, g.origin, np.asarray(g.direction).reshape(3, 3))
        voxel_mm3 = float(np.prod(g.spacing))
        for finding in scan.findings:
            if finding.category != "nodule" or finding.diameter_mm < MIN_DIAMETER_MM:
                continue
            truth = finding.consensus_mask(scan.image.shape)
            readers_mean = float(np.mean([r.mask.sum() for r in finding.reader_masks])) * voxel_mm3
            mt = measure_nodule(volume, truth)
            centre, diameter = np.asarray(finding.voxel_zyx, dtype=np.float64), finding.diameter_mm
            if detected:
                centre, diameter = detection_like(rng, centre, diameter, np.asarray(g.spacing)[::-1])
            mask = fallback_on_grid(volume, centre, diameter)
            row = {
                "location": finding.location,
                "consensus": finding.volume_mm3,
                "readers_mean": readers_mean,
                "true_pv": mt.volume_mm3,
                "true_count": mt.voxel_volume_mm3,
            }
            if mask is not None:
                mf = measure_nodule(volume, mask)
                row.update(
                    dice=2.0 * float((mask & truth).sum()) / float(mask.sum() + truth.sum()),
                    fb_pv=mf.volume_mm3,
                    fb_count=mf.voxel_volume_mm3,
                    fb_diameter_error=abs(mf.mean_diameter_mm - mt.mean_diameter_mm),
                )
            rows.append(row)
    return rows


def _pv_error(row: dict[str, object]) -> float:
    """|relative error| of the fallback's partial-volume volume against the consensus volume."""
    return abs(float(row["fb_pv"]) / float(row["consensus"]) - 1.0)


def lidc() -> dict[str, object]:
    """The LIDC-style part (module docstring) at the true centres."""
    rows = lidc_rows()
    found = [r for r in rows if "dice" in r]
    out: dict[str, object] = {"LIDC nodules >= 5 mm": len(rows), "LIDC fallback found": len(found)}
    for ref in ("consensus", "readers_mean"):
        for col in ("true_pv", "true_count", "fb_pv", "fb_count"):
            e = np.array([r[col] / r[ref] - 1.0 for r in rows if col in r])
            out[f"LIDC volume median |rel error| {col} vs {ref}"] = _median(np.abs(e))
            out[f"LIDC volume signed median rel error {col} vs {ref}"] = _median(e)
    for loc in ("all", "isolated", "juxta-vascular", "juxta-pleural"):
        sel = [r for r in found if loc == "all" or r["location"] == loc]
        out[f"LIDC fallback Dice median ({loc}, n={len(sel)})"] = _median([r["dice"] for r in sel])
        out[f"LIDC fallback PV |rel error| vs consensus median ({loc})"] = _median(
            [_pv_error(r) for r in sel]
        )
    out["LIDC fallback mean diameter median abs error vs true mask (mm)"] = _median(
        [r["fb_diameter_error"] for r in found]
    )
    return out


def run(seed: int = SEED, followup_only: bool = False) -> dict[str, object]:
    out: dict[str, object] = {"follow-up seed": seed}
    with tempfile.TemporaryDirectory() as tmp:
        out.update(followup(Path(tmp), seed))
    if not followup_only:
        out.update(lidc())
        for lidc_seed in (LIDC_SEED, LIDC_SEED + 1):
            found = [r for r in lidc_rows(lidc_seed, detected=True) if "dice" in r]
            name = f"LIDC seed {lidc_seed}, detection-like centres: fallback"
            out[f"{name} PV |rel error| vs consensus median"] = _median([_pv_error(r) for r in found])
            out[f"{name} Dice median"] = _median([r["dice"] for r in found])
    for key, value in out.items():
        print(f"  {key}: {value:.3f}" if isinstance(value, float) else f"  {key}: {value}", flush=True)
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=SEED, help="seed of the follow-up phantoms")
    parser.add_argument("--followup-only", action="store_true", help="skip the LIDC-style phantoms")
    options = parser.parse_args()
    run(options.seed, options.followup_only)
