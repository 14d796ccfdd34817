"""Follow-up (issue 22) against longitudinal phantoms: registration error, matching F1, VDT error, timing.

* accuracy: `PATIENTS` small-preset patients with 3 time points (`lungdata synth followup`); every
  consecutive interval registered; true nodule centres of the current scan mapped into the prior and
  compared with the true prior centres; matching from the true nodule lists scored against the true
  identities; growth from analyses of the *true masks* (`lungcad.measure.measure_nodule`, so the volume
  error is the volumetry's alone, not the segmentation's), with the partial-volume volume (`volume_mm3`,
  what `lungcad followup` uses) and the voxel count (`voxel_volume_mm3`): VDT relative error on nodules
  whose true volume changed by ≥ 25 %, over consecutive intervals and over consecutive plus first → last,
  and how many stable nodules' VDT intervals include "no growth";
* time: registration + matching of one LUNA16-size pair (`--size large`, 512 × 512 × 200), wall and CPU
  seconds (CPU counts every thread; the target is ≤ 30 s on 2 cores).

Run alone: ``python -m bench.followup_bench`` (or ``python -m bench.run --only followup_bench``).
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import numpy as np

PATIENTS = 6
SEED = 0


def _accuracy(root: Path) -> dict[str, float]:
    from common.io import read_volume
    from common.synth.followup import make_followup, read_truth
    from lungcad.followup.growth import interval_growth
    from lungcad.followup.matching import match_nodules, matching_f1
    from lungcad.followup.registration import register
    from lungcad.measure import measure_nodule

    make_followup(root, n_patients=PATIENTS, n_times=3, seed=SEED)
    truth = read_truth(root)
    errors, identity, predicted, true_pairs, seconds = [], [], [], [], []
    fallbacks, converged = 0, 0
    fields = ("volume_mm3", "voxel_volume_mm3")
    vdt_errors: dict[tuple[str, bool], list[float]] = {(f, c): [] for f in fields for c in (True, False)}
    stable: dict[tuple[str, bool], list[bool]] = {(f, c): [] for f in fields for c in (True, False)}
    for patient in truth["patients"]:
        scans = patient["scans"]
        volumes = [read_volume(root / "detection_3d" / "mhd" / f"{s['uid']}.mhd") for s in scans]
        labels = [read_volume(root / "truth_labels" / f"{s['uid']}.nii.gz").array for s in scans]
        measured = {
            (k, t): measure_nodule(volumes[t], labels[t] == k + 1)
            for k, nodule in enumerate(patient["nodules"])
            for t, p in enumerate(nodule["per_time"])
            if p["present"]
        }
        for a, b in ((0, 1), (1, 2), (0, 2)):
            consecutive = b == a + 1
            days = scans[b]["days_from_first"] - scans[a]["days_from_first"]
            for k, nodule in enumerate(patient["nodules"]):
                if (k, a) not in measured or (k, b) not in measured:
                    continue
                pa, pb = nodule["per_time"][a], nodule["per_time"][b]
                ma, mb = measured[(k, a)], measured[(k, b)]
                for f in fields:
                    change = interval_growth(
                        getattr(ma, f), getattr(mb, f), ma.mean_diameter_mm, mb.mean_diameter_mm, days
                    )
                    for key in ((f, True), (f, False)) if consecutive else ((f, False),):
                        if nodule["kind"] == "growing" and pb["volume_mm3"] / pa["volume_mm3"] >= 1.25:
                            vdt = math.inf if change.vdt_days is None else change.vdt_days
                            vdt_errors[key].append(abs(vdt - nodule["vdt_days"]) / nodule["vdt_days"])
                        if nodule["kind"] == "stable":
                            stable[key].append(change.includes_no_growth)
        for a, b in ((0, 1), (1, 2)):
            result = register(volumes[a], volumes[b])
            seconds.append(result.seconds)
            converged += result.converged
            fallbacks += any("rigid result is used" in p for p in result.problems)
            prior, current = [], []
            for k, nodule in enumerate(patient["nodules"]):
                pa, pb = nodule["per_time"][a], nodule["per_time"][b]
                if pa["present"]:
                    prior.append((k, pa))
                if pb["present"]:
                    current.append((k, pb))
                if pa["present"] and pb["present"]:
                    mapped = result.current_to_prior(np.array([pb["world_xyz"]]))[0]
                    errors.append(float(np.linalg.norm(mapped - np.asarray(pa["world_xyz"]))))
                    identity.append(float(np.linalg.norm(np.subtract(pb["world_xyz"], pa["world_xyz"]))))
            mapped = result.current_to_prior(np.array([c["world_xyz"] for _, c in current]).reshape(-1, 3))
            matches = match_nodules(
                np.array([p["world_xyz"] for _, p in prior]).reshape(-1, 3),
                [p["diameter_mm"] for _, p in prior],
                mapped,
                [c["diameter_mm"] for _, c in current],
            )
            tag = (patient["patient_id"], a)
            predicted += [
                (tag, prior[m.prior_index][0], current[m.current_index][0])
                for m in matches
                if m.status == "matched"
            ]
            ids = {k for k, _ in current}
            true_pairs += [(tag, k, k) for k, _ in prior if k in ids]
    f1 = matching_f1(predicted, true_pairs)
    errors_a = np.asarray(errors)
    growth: dict[str, object] = {}
    for (f, consecutive), errs in vdt_errors.items():
        which = "consecutive" if consecutive else "consecutive + first->last"
        name = "partial volume" if f == "volume_mm3" else "voxel count"
        growth[f"VDT median relative error ({name}, true masks, growing, dV >= 25 %, {which})"] = (
            float(np.median(errs)) if errs else float("nan")
        )
        growth[f"VDT nodule-intervals ({which})"] = len(errs)
        ok = stable[(f, consecutive)]
        growth[f"stable nodules whose VDT interval includes no growth ({name}, {which})"] = (
            f"{sum(ok)}/{len(ok)}"
        )
    return {
        "intervals": len(seconds),
        "intervals converged": f"{converged}/{len(seconds)}",
        "nodule pairs": len(errors),
        "unregistered distance median mm": float(np.median(identity)),
        "registration error median mm": float(np.median(errors_a)),
        "registration error p95 mm": float(np.percentile(errors_a, 95)),
        "registration error max mm": float(errors_a.max()),
        "rigid fallbacks": fallbacks,
        "matching F1 (true lists)": f1["f1"],
        **growth,
        "registration seconds median (small preset)": float(np.median(seconds)),
    }


def _timing(root: Path) -> dict[str, float]:
    from common.io import read_volume
    from common.synth.followup import make_followup, read_truth
    from lungcad.followup.matching import match_nodules
    from lungcad.followup.registration import register

    make_followup(root, n_patients=1, n_times=2, seed=3, size="large")
    patient = read_truth(root)["patients"][0]
    prior, current = (
        read_volume(root / "detection_3d" / "mhd" / f"{s['uid']}.mhd") for s in patient["scans"]
    )
    wall, cpu = time.perf_counter(), time.process_time()
    result = register(prior, current)
    pa = [n["per_time"][0] for n in patient["nodules"] if n["per_time"][0]["present"]]
    pb = [n["per_time"][1] for n in patient["nodules"] if n["per_time"][1]["present"]]
    match_nodules(
        np.array([p["world_xyz"] for p in pa]),
        [p["diameter_mm"] for p in pa],
        result.current_to_prior(np.array([p["world_xyz"] for p in pb])),
        [p["diameter_mm"] for p in pb],
    )
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    errors = [
        float(
            np.linalg.norm(
                result.current_to_prior(np.array([n["per_time"][1]["world_xyz"]]))[0]
                - np.asarray(n["per_time"][0]["world_xyz"])
            )
        )
        for n in patient["nodules"]
        if n["per_time"][0]["present"] and n["per_time"][1]["present"]
    ]
    return {
        "LUNA16-size pair shape": "x".join(map(str, prior.shape)),
        "LUNA16-size registration + matching wall s": wall,
        "LUNA16-size registration + matching CPU s (all threads)": cpu,
        "LUNA16-size registration error max mm": max(errors),
        "LUNA16-size converged": result.converged,
    }


def run() -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        out: dict[str, object] = {}
        out.update(_accuracy(Path(tmp) / "small"))
        for key, value in out.items():
            print(f"  {key}: {value}", flush=True)
        timing = _timing(Path(tmp) / "large")
        for key, value in timing.items():
            print(f"  {key}: {value}", flush=True)
        out.update(timing)
    return out


if __name__ == "__main__":
    run()
