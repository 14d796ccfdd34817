"""Acceptance checks of `lungcad analyze` (issue 20) that need a trained bundle, on phantoms none saw.

One recipe, shared by the slow tests (`tests/lungcad/test_analyze_learning.py`) and this script, which writes
the numbers to the journal:

1. **Bundle**: the CLAF stages exactly as `make demo` trains them (`lungdet.demo.run_demo`, shortened by
   `STAGE1_ARGS` / `STAGE2_ARGS`), brief GLANCE and M³Net runs with the demo configs
   (`configs/demo/glance_demo.yaml`, `m3net_demo.yaml`), then `lungcad bundle` of the four run folders.
   Two deliberate differences from the demo: the LUNA16 tree's provided lung masks are removed before
   training, so the cache computes lung masks as `analyze` must (a new scan has none; with the provided
   masks the two paths differ by the mask, not by code), and the LIDC tree for GLANCE / M³Net has seed
   ``seed + 1``, so the CLAF test scans (same phantoms as the LIDC tree of the same seed) are held out from
   every model.
2. **No drift**: `lungcad analyze` on the CLAF test scans (batch mode over their `.mhd` files) → its
   `results.csv` files scored by `lungdata evaluate-froc`'s code; `lungdet test` of the same checkpoints
   with the bundle's fusion weight → same scoring; the two CPMs must be equal.
3. **Measurements**: each phantom nodule ≥ 5 mm (generator diameter) of those scans and of
   ``MEASURE_SCANS`` more held-out phantoms (seed ``seed + MEASURE_SEED_OFFSET``, analysed in memory), its
   truth measured with `lungcad.measure.measure_nodule` on the phantom's true (consensus) mask; a finding
   whose centre lies within the nodule's radius detects it. Volume relative error, mean-diameter absolute
   error (to the true mask's and to the generator's diameter) and type, for the detected nodules and, as a
   segmentation-only reference, for all of them given by position (`--nodules` mode); 95 % intervals by
   resampling scans.
4. **Geometry**: the held-out phantom of the largest nodule ≥ 5 mm that item 2's analysis detected, stored
   as is, with flipped x/y, and with an oblique direction matrix (`.mhd`); `lungcad analyze` must report it
   within 1.5 mm of
   the known world centre (world mm, and the voxel centre converted with the spacing), and the NIfTI label
   read back with SimpleITK must cover that world position.
5. **Follow-up** (issue 22): `FOLLOWUP_PATIENTS` longitudinal phantom patients × 3 time points
   (`lungdata synth followup`, seed ``seed + 2``, none seen in training), each through the dataset form of
   `lungcad followup` with the bundle (analyses, registration, matching, growth), scored against the truth
   manifest by `lungcad.followup.evaluation`: matching F1 for nodules ≥ 5 mm found at both times, VDT median
   relative error on those whose volume changed by ≥ 25 %, stable nodules whose VDT interval includes
   "no growth".

``python -m lungcad.learning --out learning_out/analyze [--docs docs]``; steps whose outputs exist are
reused (`--retrain` starts over).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts (see lungdet.demo)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from common import atomic  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCANS = 10  # CLAF tree: 60 / 10 / 30 % → 6 train, 1 validation, 3 test scans
LIDC_SCANS = 8
SEED = 0
#: `make demo` trains 8 epochs of 512 (stage 1) / 256 (MPPN) samples; shortened for a loaded 2-core machine.
STAGE1_ARGS = ["--trainer.max_epochs", "3", "--data.init_args.samples_per_epoch", "256",
               "--trainer.check_val_every_n_epoch", "100"]  # fmt: skip
STAGE2_ARGS = ["--trainer.max_epochs", "3", "--data.init_args.samples_per_epoch", "192"]
GLANCE_ARGS = ["--trainer.max_epochs", "2"]
M3NET_ARGS = ["--trainer.max_epochs", "1"]
MIN_DIAMETER_MM = 5.0
#: Held-out phantoms (seed ``seed + MEASURE_SEED_OFFSET``) added to the CLAF test scans for the measurement
#: check; seeds 3 and 4 chose `lungcad.pipeline.FALLBACK_THRESHOLD_SHARE`, so they are not used here.
MEASURE_SCANS = 12
MEASURE_SEED_OFFSET = 5
FOLLOWUP_PATIENTS = 6
TYPES = ("solid", "part-solid", "ground-glass")
PHANTOM_TYPE = {"solid": "solid", "part-solid": "part-solid", "ggo": "ground-glass"}
#: An oblique direction: 20° about z then 10° about x (columns: world direction of the index axes).
_A, _B = np.deg2rad(20.0), np.deg2rad(10.0)
OBLIQUE = np.array([[1, 0, 0], [0, np.cos(_B), -np.sin(_B)], [0, np.sin(_B), np.cos(_B)]]) @ np.array(
    [[np.cos(_A), -np.sin(_A), 0], [np.sin(_A), np.cos(_A), 0], [0, 0, 1]]
)


def _run_dir(ckpt: str | Path) -> Path:
    return Path(ckpt).parents[1]  # runs/<name>/version_N/checkpoints/last.ckpt → version_N


def _newest_run(runs: Path, name: str) -> Path | None:
    found = sorted((runs / name).glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return _run_dir(found[-1]) if found else None


# ------------------------------------------------------------------------------------------------- recipe
def build(
    out: str | Path, scans: int = SCANS, lidc_scans: int = LIDC_SCANS, seed: int = SEED
) -> dict[str, Any]:
    """Train (or reuse) the four models and the bundle under `out`; returns paths, test uids and timings."""
    from common.synth import make_lidc, tree_matches
    from lungcad.cli import main as lungcad_main
    from lungcls.cli import main as lungcls_main
    from lungdet import demo as claf
    from lungseg.cli import main as lungseg_main

    out = Path(out).resolve()
    env_file = out / "env.json"
    if (out / "bundle" / "bundle.json").is_file() and env_file.is_file():
        return json.loads(env_file.read_text(encoding="utf-8"))
    timings: dict[str, float] = {}
    tree, runs = out / "luna16", out / "runs"

    start = time.perf_counter()
    claf._synth(tree, scans, seed)
    shutil.rmtree(tree / "seg-lungs-LUNA16", ignore_errors=True)  # module docstring, item 1
    result = claf.run_demo(out, scans, seed, STAGE1_ARGS, STAGE2_ARGS, bootstrap=0, figures=False)
    timings["CLAF (lungdet.demo, shortened)"] = time.perf_counter() - start

    lidc = out / "lidc"
    start = time.perf_counter()
    if not tree_matches(lidc, n_scans=lidc_scans, seed=seed + 1, size="small"):
        make_lidc(lidc, n_scans=lidc_scans, seed=seed + 1, size="small")
        for stale in ("cache_lidc", "patches_lidc"):  # split files and patches of the old tree
            shutil.rmtree(out / stale, ignore_errors=True)
    data = ["--data.init_args.root", str(lidc), "--trainer.default_root_dir", str(runs)]
    lungseg_main(
        ["fit", "--config", str(REPO / "configs/demo/glance_demo.yaml"), *data,
         "--data.init_args.cache_dir", str(out / "cache_lidc"), "--run_name", "glance", *GLANCE_ARGS]
    )  # fmt: skip
    timings["GLANCE fit"] = time.perf_counter() - start
    start = time.perf_counter()
    lungcls_main(
        ["fit", "--config", str(REPO / "configs/demo/m3net_demo.yaml"), *data,
         "--data.init_args.cache_dir", str(out / "patches_lidc"), "--run_name", "m3net", *M3NET_ARGS]
    )  # fmt: skip
    timings["M3Net fit"] = time.perf_counter() - start

    sources = {
        "stage1": _run_dir(result["checkpoints"]["stage1"]),
        "mppn": _run_dir(result["checkpoints"]["stage2"]),
        "seg": _newest_run(runs, "glance"),
        "cls": _newest_run(runs, "m3net"),
    }
    start = time.perf_counter()
    code = lungcad_main(["bundle", *[f"--{k}={v}" for k, v in sources.items()], "--out", str(out / "bundle")])
    if code:
        raise RuntimeError(f"lungcad bundle failed with exit status {code}")
    timings["lungcad bundle"] = time.perf_counter() - start
    env = {
        "out": str(out),
        "tree": str(tree),
        "cache": str(out / "cache"),
        "runs": str(runs),
        "bundle": str(out / "bundle"),
        "checkpoints": {k: str(v) for k, v in result["checkpoints"].items()},
        "test_uids": list(result["test_uids"]),
        "scans": scans,
        "lidc_scans": lidc_scans,
        "seed": seed,
        "demo_cpm": float(result["evaluated"][claf.FINAL].cpm),
        "timings_s": timings,
    }
    atomic.write_json(env_file, env, indent=2)
    return env


def _scan_paths(tree: Path, uids: list[str]) -> dict[str, Path]:
    return {uid: next(tree.glob(f"subset*/{uid}.mhd")) for uid in uids}


def analyze_folder(files: dict[str, Path], bundle: Path, folder: Path, out: Path) -> dict[str, dict]:
    """`lungcad analyze` in batch mode over links to `files` (name → .mhd); returns name → report.json."""
    from lungcad.cli import main as lungcad_main

    folder.mkdir(parents=True, exist_ok=True)
    for name, path in files.items():
        for src in (path, path.with_suffix(".raw"), path.with_suffix(".zraw")):
            dst = folder / f"{name}{src.suffix}"
            if src.is_file() and not dst.exists():
                dst.symlink_to(src)
    code = lungcad_main(["analyze", str(folder), "--bundle", str(bundle), "--out", str(out)])
    if code:
        raise RuntimeError(f"lungcad analyze {folder} failed with exit status {code}")
    return {n: json.loads((out / n / "report.json").read_text(encoding="utf-8")) for n in files}


# ------------------------------------------------------------------------------------------------ checks
def check_drift(env: dict[str, Any]) -> dict[str, Any]:
    """CPM of `lungcad analyze`'s results.csv files and of `lungdet test` (same checkpoints and fusion)."""
    import pandas as pd

    from common.metrics.froc_io import evaluate_froc_files
    from lungcad.bundle import Bundle
    from lungdet import demo as claf

    out, tree, uids = Path(env["out"]), Path(env["tree"]), env["test_uids"]
    weight = Bundle.load(env["bundle"]).stage1_weight
    start = time.perf_counter()
    reports = analyze_folder(_scan_paths(tree, uids), Path(env["bundle"]), out / "held_out", out / "analysis")
    analyze_s = time.perf_counter() - start
    frames = [pd.read_csv(out / "analysis" / uid / "results.csv") for uid in uids]
    atomic.write_csv(out / "results_analyze.csv", pd.concat(frames, ignore_index=True))

    start = time.perf_counter()
    common = ["--data.init_args.root", str(tree), "--data.init_args.cache_dir", env["cache"],
              "--trainer.default_root_dir", env["runs"]]  # fmt: skip
    cli = claf._lungdet(
        ["test", "--config", str(claf.STAGE2_CONFIG), *common, "--run_name", "stage2_same_fusion",
         "--data.init_args.candidates_csv", str(Path(env["runs"]) / "stage1_train_val_candidates.csv"),
         "--model.init_args.stage1_checkpoint", env["checkpoints"]["stage1"],
         "--model.init_args.stage1_weight", str(weight), "--model.init_args.fusion_search", "false", *STAGE2_ARGS, "--ckpt_path", env["checkpoints"]["stage2"]]
    )  # fmt: skip
    test_s = time.perf_counter() - start
    shutil.copy(Path(cli.trainer.log_dir) / "test_results.csv", out / "results_lungdet_test.csv")
    seriesuids = out / "seriesuids_test.csv"
    atomic.write_text(seriesuids, "".join(f"{u}\n" for u in uids))
    scored = {
        name: evaluate_froc_files(tree / "annotations.csv", tree / "annotations_excluded.csv", seriesuids,
                                  out / f"results_{name}.csv", n_bootstrap=0)
        for name in ("analyze", "lungdet_test")
    }  # fmt: skip
    a = pd.read_csv(out / "results_analyze.csv").sort_values(["seriesuid", "probability"], ascending=False)
    b = pd.read_csv(out / "results_lungdet_test.csv").sort_values(
        ["seriesuid", "probability"], ascending=False
    )
    same_rows = len(a) == len(b)
    return {
        "stage1_weight": weight,
        "cpm_analyze": scored["analyze"].cpm,
        "cpm_lungdet_test": scored["lungdet_test"].cpm,
        "sensitivities_analyze": [float(s) for s in scored["analyze"].sensitivities],
        "sensitivities_lungdet_test": [float(s) for s in scored["lungdet_test"].sensitivities],
        "candidates": [len(a), len(b)],
        "max_abs_probability_difference": (
            float(np.max(np.abs(a["probability"].to_numpy() - b["probability"].to_numpy())))
            if same_rows and len(a)
            else None
        ),
        "n_nodules": scored["analyze"].counts.n_nodules,
        "analyze_s": analyze_s,
        "lungdet_test_s": test_s,
        "reports": {uid: reports[uid] for uid in uids},
    }


def _truth(seed: int, index: int) -> tuple[Any, Any, list[dict[str, Any]]]:
    """The phantom, its volume and per nodule: finding, true (consensus) mask and its measurements."""
    from common.io import CTVolume
    from common.synth.scan import generate_scan
    from lungcad.measure import measure_nodule

    scan = generate_scan(seed, index, "small")
    g = scan.geometry
    volume = CTVolume(scan.image, g.spacing, g.origin, np.asarray(g.direction).reshape(3, 3), scan.series_uid)
    nodules = []
    for finding in scan.findings:
        if finding.category != "nodule":
            continue
        mask = finding.consensus_mask(scan.image.shape)  # the phantom's consensus, as its volume_mm3 counts
        nodules.append({"finding": finding, "mask": mask, "truth": measure_nodule(volume, mask)})
    return scan, volume, nodules


def _errors(rows: list[dict[str, Any]]) -> dict[str, Any]:
    if not rows:
        return {"n": 0}
    vol = np.array([r["volume_rel_error"] for r in rows])
    dia = np.array([r["diameter_abs_error_mm"] for r in rows])
    gen = np.array([r["diameter_abs_error_vs_generator_mm"] for r in rows])
    table = Counter((r["type_true"], r["type_measured"]) for r in rows)
    return {
        "n": len(rows),
        "scans": len({r["seriesuid"] for r in rows}),
        "intervals": _intervals(rows),
        "volume_median_abs_rel_error": float(np.median(np.abs(vol))),
        "volume_median_rel_error": float(np.median(vol)),
        "voxel_volume_median_abs_rel_error": float(
            np.median(
                [abs(r["voxel_volume_rel_error"]) for r in rows if r["voxel_volume_rel_error"] is not None]
            )
        )
        if any(r["voxel_volume_rel_error"] is not None for r in rows)
        else None,
        "diameter_median_abs_error_mm": float(np.median(dia)),
        "diameter_median_abs_error_vs_generator_mm": float(np.median(gen)),
        "type_agreement": sum(v for (t, m), v in table.items() if t == m) / len(rows),
        "confusion": {t: {m: table[(t, m)] for m in TYPES} for t in TYPES},
        "rows": rows,
    }


def _intervals(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    """95 % bootstrap intervals (scans resampled: a scan's nodules share its noise and anatomy) of the three
    checked statistics."""
    from common.metrics.intervals import bootstrap_patients

    vol = np.abs([r["volume_rel_error"] for r in rows])
    dia = np.array([r["diameter_abs_error_mm"] for r in rows])
    agree = np.array([r["type_true"] == r["type_measured"] for r in rows], dtype=np.float64)

    def statistic(i: np.ndarray) -> dict[str, float]:
        return {
            "volume": float(np.median(vol[i])),
            "diameter": float(np.median(dia[i])),
            "type": float(agree[i].mean()),
        }

    found = bootstrap_patients([r["seriesuid"] for r in rows], statistic, n_samples=1000)
    return {k: [v.lower, v.upper] for k, v in found.items()}


def _row(uid: str, nodule: dict[str, Any], m: dict[str, Any], how: str) -> dict[str, Any]:
    truth, finding = nodule["truth"], nodule["finding"]
    return {
        "seriesuid": uid,
        "generator_diameter_mm": finding.diameter_mm,
        # The phantom's recorded truth: its consensus mask's voxel volume.
        "true_volume_mm3": truth.voxel_volume_mm3,
        "volume_mm3": m["volume_mm3"],
        "volume_rel_error": m["volume_mm3"] / truth.voxel_volume_mm3 - 1.0,
        "voxel_volume_mm3": m.get("voxel_volume_mm3"),
        "voxel_volume_rel_error": (
            m["voxel_volume_mm3"] / truth.voxel_volume_mm3 - 1.0 if "voxel_volume_mm3" in m else None
        ),
        "true_mean_diameter_mm": truth.mean_diameter_mm,
        "mean_diameter_mm": m["mean_diameter_mm"],
        "diameter_abs_error_mm": abs(m["mean_diameter_mm"] - truth.mean_diameter_mm),
        "diameter_abs_error_vs_generator_mm": abs(m["mean_diameter_mm"] - finding.diameter_mm),
        "type_true": PHANTOM_TYPE[finding.texture],
        "type_true_mask": truth.type,
        "type_measured": m["type"],
        "segmentation": how,
        "centre_error_mm": float(np.linalg.norm(np.subtract(m["center_world_mm"], finding.world_xyz))),
    }


def _match(
    uid: str, nodules: list[dict[str, Any]], found: list[dict[str, Any]], detected: list, missed: list
) -> None:
    """Rows of `detected` / `missed` for one scan: a finding whose centre lies within a nodule's radius."""
    for nodule in nodules:
        centre = np.asarray(nodule["finding"].world_xyz)
        dist = [np.linalg.norm(np.subtract(f["measurements"]["center_world_mm"], centre)) for f in found]
        hit = int(np.argmin(dist)) if dist and min(dist) <= nodule["finding"].diameter_mm / 2 else None
        if hit is None:
            missed.append({"seriesuid": uid, "diameter_mm": nodule["finding"].diameter_mm})
        else:
            detected.append(_row(uid, nodule, found[hit]["measurements"], found[hit].get("segmentation", "")))


def _given(
    uid: str, volume: Any, nodules: list[dict[str, Any]], bundle: Any, given: list, slices: list
) -> None:
    """Rows of `given`: the scan's nodules analysed at their true centres (``--nodules`` mode)."""
    from lungcad.pipeline import analyze_volume

    if nodules:
        positions = np.array([[*n["finding"].world_xyz, n["finding"].diameter_mm] for n in nodules])
        analysis = analyze_volume(volume, bundle, nodules_world_mm=positions)
        slices.append(analysis.glance_slices)
        for nodule, f in zip(nodules, analysis.findings):
            given.append(_row(uid, nodule, f.measurements.to_dict(), f.segmentation))


def check_measurements(
    env: dict[str, Any], reports: dict[str, dict], extra_scans: int = MEASURE_SCANS
) -> dict[str, Any]:
    """Measurement errors of detected nodules ≥ 5 mm and of given positions (module docstring, item 3).

    The scans: the CLAF test scans (their findings from `analyze`'s reports) and `extra_scans` more held-out
    phantoms of seed ``seed + MEASURE_SEED_OFFSET`` (their findings from `analyze_volume`, the function
    `lungcad analyze` runs, on the phantom in memory): three test scans hold too few nodules ≥ 5 mm for a
    median.
    """
    from common.synth import read_manifest
    from lungcad.bundle import Bundle
    from lungcad.pipeline import analyze_volume

    bundle = Bundle.load(env["bundle"])
    index = {s["seriesuid"]: s["index"] for s in read_manifest(env["tree"])["scans"]}
    detected: list[dict[str, Any]] = []
    given: list[dict[str, Any]] = []
    missed: list[dict[str, Any]] = []
    slices: list[tuple[int, int]] = []  # GLANCE slices run / of the full spans, per analysis
    for uid in env["test_uids"]:
        _, volume, nodules = _truth(env["seed"], index[uid])
        nodules = [n for n in nodules if n["finding"].diameter_mm >= MIN_DIAMETER_MM]
        _match(uid, nodules, reports[uid]["nodules"], detected, missed)
        _given(uid, volume, nodules, bundle, given, slices)
    for k in range(extra_scans):
        scan, volume, nodules = _truth(env["seed"] + MEASURE_SEED_OFFSET, k)
        nodules = [n for n in nodules if n["finding"].diameter_mm >= MIN_DIAMETER_MM]
        analysis = analyze_volume(volume, bundle)
        slices.append(analysis.glance_slices)
        found = [
            {"measurements": f.measurements.to_dict(), "segmentation": f.segmentation}
            for f in analysis.findings
        ]
        _match(scan.series_uid, nodules, found, detected, missed)
        _given(scan.series_uid, volume, nodules, bundle, given, slices)
    run, full = (int(v) for v in np.sum(slices, axis=0)) if slices else (0, 0)
    return {
        "scans": len(env["test_uids"]) + extra_scans,
        "detected": _errors(detected),
        "given": _errors(given),
        "missed": missed,
        "glance_slices": {"run": run, "full_spans": full},
    }


def geometry_variants(seed: int, index: int, finding_id: str | None = None) -> tuple[dict[str, Any], dict]:
    """Phantom `index` as stored, flipped in x/y and oblique: name → (CTVolume, true world xyz, stored zyx),
    and the nodule (`finding_id`, else the largest)."""
    from common.io import CTVolume

    _, volume, nodules = _truth(seed, index)
    pick = [n for n in nodules if n["finding"].finding_id == finding_id] or nodules
    nodule = max(pick, key=lambda n: n["finding"].diameter_mm)
    zyx = np.asarray(nodule["finding"].voxel_zyx)
    shape = np.asarray(volume.shape)
    flipped_origin = volume.voxel_to_world(np.array([0, shape[1] - 1, shape[2] - 1], float)).reshape(3)
    flipped = CTVolume(
        np.ascontiguousarray(volume.array[:, ::-1, ::-1]), volume.spacing, tuple(flipped_origin),
        np.asarray(volume.direction) @ np.diag([-1.0, -1.0, 1.0]), volume.series_uid,
    )  # fmt: skip
    oblique = CTVolume(volume.array, volume.spacing, volume.origin, OBLIQUE, volume.series_uid)
    variants = {
        "as_stored": (volume, zyx),
        "flipped": (flipped, np.array([zyx[0], shape[1] - 1 - zyx[1], shape[2] - 1 - zyx[2]])),
        "oblique": (oblique, zyx),
    }
    return {k: (v, v.voxel_to_world(z).reshape(3), z) for k, (v, z) in variants.items()}, nodule


def _detected_nodule(env: dict[str, Any]) -> tuple[int, str]:
    """(phantom index, finding id) of the largest nodule ≥ 5 mm that `analyze` detected on the held-out
    scans (check_drift's reports): the geometry check needs a nodule detection finds, whatever the detector's
    sensitivity."""
    from common.synth import read_manifest

    out = Path(env["out"])
    index = {s["seriesuid"]: s["index"] for s in read_manifest(env["tree"])["scans"]}
    best: tuple[float, int, str] | None = None
    for uid in env["test_uids"]:
        found = json.loads((out / "analysis" / uid / "report.json").read_text(encoding="utf-8"))["nodules"]
        for n in _truth(env["seed"], index[uid])[2]:
            f = n["finding"]
            dist = [
                np.linalg.norm(np.subtract(x["measurements"]["center_world_mm"], f.world_xyz)) for x in found
            ]
            if f.diameter_mm >= MIN_DIAMETER_MM and dist and min(dist) <= f.diameter_mm / 2:
                best = max(best or (0.0, 0, ""), (f.diameter_mm, index[uid], f.finding_id))
    if best is None:
        raise RuntimeError("analyze detected no nodule >= 5 mm on the held-out scans; no geometry check")
    return best[1], best[2]


def check_geometry(env: dict[str, Any]) -> dict[str, Any]:
    """`lungcad analyze` on the three variants of one held-out phantom; distances and label overlay."""
    import SimpleITK as sitk

    from common.io import write_mhd

    out = Path(env["out"])
    index, finding_id = _detected_nodule(env)
    variants, nodule = geometry_variants(env["seed"], index, finding_id)
    files = {}
    for name, (volume, _, _) in variants.items():
        files[name] = write_mhd(volume, out / f"geometry_scans_{index}" / f"{name}.mhd")
    reports = analyze_folder(
        files, Path(env["bundle"]), out / f"geometry_in_{index}", out / f"geometry_{index}"
    )
    result: dict[str, Any] = {"index": index, "diameter_mm": nodule["finding"].diameter_mm, "variants": {}}
    for name, (volume, world, zyx) in variants.items():
        found = reports[name]["nodules"]
        row: dict[str, Any] = {"direction": np.asarray(volume.direction).round(4).tolist(), "found": False}
        if found:
            dist = [np.linalg.norm(np.subtract(f["measurements"]["center_world_mm"], world)) for f in found]
            f = found[int(np.argmin(dist))]
            m = f["measurements"]
            voxel_mm = (np.asarray(m["center_voxel_xyz"])[::-1] - zyx) * np.asarray(volume.spacing)[::-1]
            labels = sitk.ReadImage(str(out / f"geometry_{index}" / name / "segmentation.nii.gz"))
            ijk = labels.TransformPhysicalPointToIndex(tuple(float(v) for v in world))
            row.update(
                found=bool(min(dist) <= nodule["finding"].diameter_mm / 2),
                detection_score=f["detection_score"],
                world_error_mm=float(min(dist)),
                voxel_error_mm=float(np.linalg.norm(voxel_mm)),
                voxel_error_voxels=float(np.linalg.norm(np.asarray(m["center_voxel_xyz"])[::-1] - zyx)),
                label_at_truth=int(labels[ijk]),
                label=int(f["label"]),
            )
        result["variants"][name] = row
    return result


# ------------------------------------------------------------------------------------------------- report
def check_followup(env: dict[str, Any], patients: int = FOLLOWUP_PATIENTS) -> dict[str, Any]:
    """`lungcad followup --dataset spatiotemporal` per phantom patient with the bundle, scored on the truth."""
    from common.synth.followup import make_followup, read_truth
    from lungcad.cli import main as lungcad_main
    from lungcad.followup.evaluation import score_followup, score_patient

    out = Path(env["out"])
    tree, runs = out / "followup", out / "followup_runs"
    if not (tree / "patients.csv").is_file():
        make_followup(tree, n_patients=patients, n_times=3, seed=int(env["seed"]) + 2)
    truth = read_truth(tree)
    start, parts, flagged = time.perf_counter(), [], 0
    for patient in truth["patients"]:
        pid = patient["patient_id"]
        folder = runs / pid
        args = ["followup", "--dataset", "spatiotemporal", "--root", str(tree), "--patient", pid]
        code = lungcad_main([*args, "--bundle", env["bundle"], "--out", str(folder)])
        if code not in (0, 3):  # 3: a flagged interval (still scored: its nodules are "unassessed")
            raise RuntimeError(f"lungcad followup of {pid} failed with exit status {code}")
        flagged += code == 3
        document = json.loads((folder / "followup.json").read_text(encoding="utf-8"))
        reports = {
            s["uid"]: json.loads((folder / "analyses" / s["uid"] / "report.json").read_text(encoding="utf-8"))
            for s in patient["scans"]
        }
        parts.append(score_patient(document, patient, reports, min_diameter_mm=MIN_DIAMETER_MM))
    return {
        **score_followup(parts),
        "patients": len(parts),
        "flagged_patients": flagged,
        "seconds": time.perf_counter() - start,
    }


def _confusion_md(confusion: dict[str, dict[str, int]]) -> list[str]:
    lines = ["| phantom type ↓ / measured → | " + " | ".join(TYPES) + " |", "| --- |" + " --- |" * len(TYPES)]
    lines += [f"| {t} | " + " | ".join(str(confusion[t][m]) for m in TYPES) + " |" for t in TYPES]
    return lines


def _voxel_note(e: dict[str, Any]) -> str:
    value = e.get("voxel_volume_median_abs_rel_error")
    return "" if value is None else f"; the mask's voxel count: {100 * value:.1f} %"


def _errors_md(name: str, e: dict[str, Any]) -> list[str]:
    if not e.get("n"):
        return [f"**{name}**: no nodules.", ""]
    ci = e["intervals"]
    return [
        f"**{name}** ({e['n']} nodules ≥ {MIN_DIAMETER_MM:g} mm in {e['scans']} scans; 95 % intervals over 1000 "
        f"scan resamples): volume median |relative error| **{100 * e['volume_median_abs_rel_error']:.1f} %** "
        f"[{100 * ci['volume'][0]:.1f}, {100 * ci['volume'][1]:.1f}] (target ≤ 15 %; signed median "
        f"{100 * e['volume_median_rel_error']:+.1f} %; partial-volume corrected, to the consensus mask's voxel "
        f"volume{_voxel_note(e)}), mean-diameter median absolute error "
        f"**{e['diameter_median_abs_error_mm']:.2f} mm** [{ci['diameter'][0]:.2f}, {ci['diameter'][1]:.2f}] to "
        f"the true mask's (target ≤ 1.0 mm), {e['diameter_median_abs_error_vs_generator_mm']:.2f} mm to the "
        f"generator's recorded diameter; type agreement **{100 * e['type_agreement']:.0f} %** "
        f"[{100 * ci['type'][0]:.0f}, {100 * ci['type'][1]:.0f}] (target ≥ 80 %). Masks made by: "
        + ", ".join(f"{k} {v}" for k, v in Counter(r["segmentation"] for r in e["rows"]).items())
        + ".",
        "",
        *_confusion_md(e["confusion"]),
        "",
    ]


def markdown(env: dict[str, Any], results: dict[str, Any]) -> str:
    d, m, g = results["drift"], results["measurements"], results["geometry"]
    load = results["load"]
    missed = ", ".join(f"{x['diameter_mm']:.1f} mm" for x in m["missed"]) or "none"
    lines = [
        "# `lungcad analyze` accuracy on held-out phantoms (issue 20)",
        "",
        f"Run {results['date']} on {results['machine']}; load average before / after "
        f"{load[0]:.1f} / {load[1]:.1f} on {os.cpu_count()} cores shared with other sessions; wall time "
        f"{results['wall_s']:.0f} s of the checks (training and bundling, run before them or reused: "
        f"{sum(env['timings_s'].values()):.0f} s). Recipe and code: `lungcad/learning.py` (`python -m lungcad.learning --out "
        "learning_out/analyze --docs docs`), checked by `pytest -m slow tests/lungcad/test_analyze_learning.py`.",
        "",
        f"Bundle: CLAF stage 1 + MPPN as `make demo` trains them but shortened ({' '.join(STAGE1_ARGS)} / "
        f"{' '.join(STAGE2_ARGS)}) on {env['scans']} synthetic LUNA16 phantoms (seed {env['seed']}, lung masks "
        f"computed), GLANCE ({' '.join(GLANCE_ARGS)}) and M³Net ({' '.join(M3NET_ARGS)}) with the demo configs "
        f"on {env['lidc_scans']} synthetic LIDC phantoms of seed {env['seed'] + 1}; `lungcad bundle` chose "
        f"stage1_weight {d['stage1_weight']:g}. Held-out scans: the CLAF test split, {len(env['test_uids'])} "
        f"scans with {d['n_nodules']} annotated nodules, and for the measurement check {MEASURE_SCANS} more "
        f"phantoms of seed {env['seed'] + MEASURE_SEED_OFFSET} (`analyze_volume`, detection at the bundle's "
        "threshold). These are demo-size models trained minutes on a CPU: the detection numbers show the "
        "pipeline, not a detector.",
        "",
        "Step times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in env["timings_s"].items()) + ".",
        "",
        "## Same pipeline, no drift",
        "",
        f"`lungcad analyze` (batch over the held-out `.mhd` files, {d['analyze_s']:.0f} s) → `results.csv` "
        f"scored by `lungdata evaluate-froc`'s code: CPM **{d['cpm_analyze']:.6f}**; `lungdet test` with the same "
        f"checkpoints and the bundle's fusion ({d['lungdet_test_s']:.0f} s): CPM **{d['cpm_lungdet_test']:.6f}** — "
        f"{'equal' if d['cpm_analyze'] == d['cpm_lungdet_test'] else 'DIFFERENT'}. Candidates "
        f"{d['candidates'][0]} / {d['candidates'][1]}, largest probability difference "
        f"{d['max_abs_probability_difference']}. (`make demo`'s own two-stage test, fusion 0.5 from its config: "
        f"CPM {env['demo_cpm']:.3f}.)",
        "",
        "## Measurement accuracy",
        "",
        "Truth: `lungcad.measure.measure_nodule` on the phantom's true mask (readers' consensus, the mask the "
        "phantom was drawn from). A nodule is detected when a reported nodule's centre lies within its "
        "radius.",
        "",
        *_errors_md("Detected nodules", m["detected"]),
        f"Missed nodules ≥ {MIN_DIAMETER_MM:g} mm at the operating threshold: {len(m['missed'])} ({missed}).",
        f"GLANCE slices run by these analyses (`analyze_volume`, first spans grown where needed): "
        f"{m['glance_slices']['run']}, against {m['glance_slices']['full_spans']} for the full spans alone.",
        "",
        *_errors_md("Given positions (`--nodules` mode, segmentation and measurement alone)", m["given"]),
        "## Geometry",
        "",
        f"Held-out phantom {g['index']} (seed {env['seed']}; CLAF test scan), the largest nodule detected there "
        f"({g['diameter_mm']:.1f} mm), stored three ways (`.mhd`) and analysed again by `lungcad analyze` with "
        "detection at the bundle's threshold:",
        "",
        "| storage | found | score | world error (mm) | voxel centre error (mm / voxels) | NIfTI label at truth |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in g["variants"].items():
        if "world_error_mm" not in r:
            lines.append(f"| {name} | no nodule reported | | | | |")
            continue
        lines.append(
            f"| {name} | {'yes' if r['found'] else 'no'} | {r['detection_score']:.3f} | {r['world_error_mm']:.2f} | "
            f"{r['voxel_error_mm']:.2f} / {r['voxel_error_voxels']:.2f} | {r['label_at_truth']} (finding "
            f"{r['label']}) |"
        )
    lines.append("")
    f = results.get("followup")
    if f:
        m_ = f["matching"]
        vdt = "n/a" if f["vdt_median_relative_error"] is None else f"{f['vdt_median_relative_error']:.3f}"
        lines += [
            "## Follow-up with this bundle (issue 22)",
            "",
            f"{f['patients']} longitudinal phantom patients × 3 time points (`lungdata synth followup`, seed "
            f"{env['seed'] + 2}), each through `lungcad followup --dataset spatiotemporal` with the bundle "
            f"({f['seconds']:.0f} s: six analyses per patient, two registrations, matching, growth; "
            f"{f['flagged_patients']} patient(s) with a flagged interval). Scored by "
            "`lungcad.followup.evaluation` against the truth manifest:",
            "",
            "| measure | value |",
            "| --- | --- |",
            f"| nodule intervals judged (≥ {MIN_DIAMETER_MM:g} mm, present and found at both times) | "
            f"{f['judged_nodule_intervals']} |",
            f"| matching precision / recall / F1 | {m_['precision']:.3f} / {m_['recall']:.3f} / {m_['f1']:.3f} |",
            f"| VDT median relative error (growing, ΔV ≥ 25 %, matched) | {vdt} over {f['vdt_nodules']} |",
            f"| stable nodules whose VDT interval includes no growth | {f['stable_including_no_growth']} / "
            f"{f['stable_nodules']} |",
            "",
        ]
    return "\n".join(lines)


def run(out: str | Path, docs: str | Path | None = None) -> dict[str, Any]:
    """Build (or reuse) the bundle, run the three checks, write results.json and the journal page."""
    started = time.perf_counter()
    load0 = os.getloadavg()[0]
    env = build(out)
    drift = check_drift(env)
    measurements = check_measurements(env, drift.pop("reports"))
    geometry = check_geometry(env)
    followup = check_followup(env)
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
        "load": [load0, os.getloadavg()[0]],
        "wall_s": time.perf_counter() - started,
        "drift": drift,
        "measurements": measurements,
        "geometry": geometry,
        "followup": followup,
    }
    atomic.write_text(Path(out) / "results.json", json.dumps(results, indent=2, default=str))
    if docs is not None:
        # one page per run (its date and time): a later run never overwrites notes written beside an earlier one
        stamp = time.strftime("%Y-%m-%d-%H%M", time.gmtime())
        page = Path(docs) / "journal" / f"{stamp}-analyze-accuracy.md"
        atomic.write_text(page, markdown(env, results))
        print(f"[learning] wrote {page}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="learning_out/analyze", help="working folder")
    parser.add_argument("--docs", default=None, help="docs folder to write journal/…-analyze-accuracy.md to")
    parser.add_argument("--retrain", action="store_true", help="remove the working folder first")
    args = parser.parse_args(argv)
    if args.retrain:
        shutil.rmtree(args.out, ignore_errors=True)
    results = run(args.out, args.docs)
    print(json.dumps({k: v for k, v in results.items() if k != "measurements"}, indent=1, default=str)[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
