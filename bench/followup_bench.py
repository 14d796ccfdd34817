"""Follow-up (issue 22) against longitudinal phantoms: registration error, matching F1, VDT error, timing.

* accuracy: `PATIENTS` small-preset patients with 3 time points (`lungdata synth followup`); every
  consecutive interval registered; true nodule centres of the current scan mapped into the prior and
  compared with the true prior centres; matching from the true nodule lists scored against the true
  identities; growth from analyses of the *true masks* (`lungcad.measure.measure_nodule`, so the volume
  error is the voxel grid's partial volume only — an upper bound for what a trained bundle can reach):
  VDT relative error on nodules whose true volume changed by ≥ 25 %, and how many stable nodules' VDT
  intervals include "no growth";
* time: registration + matching of one LUNA16-size pair (`--size large`, 512 × 512 × 200), wall and CPU
  seconds (CPU counts every thread; the target is ≤ 30 s on 2 cores).

Run alone: ``python -m bench.followup_bench`` (or ``python -m bench.run --only followup_bench``).
"""

from __future__ import annotations

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
    vdt_errors, stable_ok, stable_n, fallbacks, converged = [], 0, 0, 0, 0
    for patient in truth["patients"]:
        scans = patient["scans"]
        volumes = [read_volume(root / "detection_3d" / "mhd" / f"{s['uid']}.mhd") for s in scans]
        labels = [read_volume(root / "truth_labels" / f"{s['uid']}.nii.gz").array for s in scans]
        for a, b in ((0, 1), (1, 2)):
            result = register(volumes[a], volumes[b])
            seconds.append(result.seconds)
            converged += result.converged
            fallbacks += any("rigid result is used" in p for p in result.problems)
            days = scans[b]["days_from_first"] - scans[a]["days_from_first"]
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
                    ma = measure_nodule(volumes[a], labels[a] == k + 1)
                    mb = measure_nodule(volumes[b], labels[b] == k + 1)
                    change = interval_growth(
                        ma.volume_mm3, mb.volume_mm3, ma.mean_diameter_mm, mb.mean_diameter_mm, days
                    )
                    if nodule["kind"] == "growing" and pb["volume_mm3"] / pa["volume_mm3"] >= 1.25:
                        vdt_errors.append(abs(change.vdt_days - nodule["vdt_days"]) / nodule["vdt_days"])
                    if nodule["kind"] == "stable":
                        stable_n += 1
                        stable_ok += change.includes_no_growth
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
        "VDT median relative error (true masks, growing, dV >= 25 %)": float(np.median(vdt_errors))
        if vdt_errors
        else float("nan"),
        "VDT nodules": len(vdt_errors),
        "stable nodules whose VDT interval includes no growth": f"{stable_ok}/{stable_n}",
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
