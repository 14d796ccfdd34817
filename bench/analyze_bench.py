"""Analysis benchmark: `analyze_volume` on one LUNA16-size 1 mm phantom with paper-size models (issue 20).

The scan is the chest phantom of `tests.common.chest_phantom` (the preprocessing benchmark's) at 300×350×350
voxels of 1 mm, the size of a LUNA16 scan after resampling. The bundle holds the paper-size models of
`configs/claf_luna16.yaml`, `mppn_luna16.yaml`, `glance_lidc.yaml` (512×512 slices) and `m3net_lidc.yaml`
(`paper` preset) with **untrained (random) weights**: the time of a forward pass does not depend on the
weights, and training them is not what this measures. Its detection threshold is a placeholder, so the run
has two parts:

1. detection: read → preprocess → CLAF stage 1 → MPPN on every candidate (threshold above every score);
2. the per-nodule steps (segment, measure, classify) for the 5 best candidates, given as positions —
   what a scan with 5 findings adds.

Reported: seconds per step and in all (preprocessing counted once), peak RSS of the process (`ru_maxrss`,
which includes loading the bundle), and the CPU seconds of the analysis (on a machine shared with other work the
wall time overstates what 2 free cores take; CPU time / 2 bounds it from below). Target ≤ 120 s and ≤ 6 GiB on 2 CPU cores.

Run: `python -m bench.analyze_bench [--bundle DIR]` (or `make bench`, which calls `run()`); the bundle is
written to a temporary folder unless given.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SHAPE_ZYX = (300, 350, 350)
CONFIGS = {
    "stage1": "configs/claf_luna16.yaml",
    "mppn": "configs/mppn_luna16.yaml",
    "seg": "configs/glance_lidc.yaml",
    "cls": "configs/m3net_lidc.yaml",
}
FINDINGS = 5


def _class(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(__import__(module, fromlist=[name]), name)


def paper_bundle(bundle_dir: Path) -> Path:
    """A bundle of the four paper-size models with random weights in `bundle_dir` (run folders written by hand)."""
    with tempfile.TemporaryDirectory() as tmp:
        return _paper_bundle(Path(tmp), bundle_dir)


def _paper_bundle(out: Path, bundle_dir: Path) -> Path:
    from lungcad import bundle as bundle_mod

    torch.manual_seed(0)
    sources = {}
    for kind, config_path in CONFIGS.items():
        config = yaml.safe_load((REPO / config_path).read_text(encoding="utf-8"))
        model = dict(config["model"].get("init_args") or {})
        if (
            kind == "stage1"
        ):  # random weights score below the paper's 0.1: keep max_candidates (100) per scan,
            model["score_threshold"] = 0.0  # so the MPPN and the per-nodule steps see a full candidate list
        if kind == "seg":  # linked from the datamodule by lungseg's CLI
            model.setdefault("image_size", config["data"]["init_args"].get("image_size", 512))
        task = _class(config["model"]["class_path"])(**model)
        run = out / "runs" / kind / "version_0"
        (run / "checkpoints").mkdir(parents=True, exist_ok=True)
        config["model"]["init_args"] = model
        (run / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
        torch.save(
            {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)},
            run / "checkpoints" / "last.ckpt",
        )
        sources[kind] = run
        del task

    def untrained(bundle, data, fp_per_scan, search_fusion, **_):  # no validation scans: weights are random
        return {
            **bundle_mod._placeholder_detection(bundle.manifest["models"], fp_per_scan),
            "method": "untrained",
        }

    original = bundle_mod.choose_operating_point
    bundle_mod.choose_operating_point = untrained
    try:
        bundle_mod.write_bundle(sources, bundle_dir, name="paper-size-untrained")
    finally:
        bundle_mod.choose_operating_point = original
    return bundle_dir


def _phantom():
    from common.io import CTVolume
    from tests.common.chest_phantom import chest_phantom

    phantom = chest_phantom(SHAPE_ZYX, (1.0, 1.0, 1.0), seed=0)
    return CTVolume(phantom.hu, (1.0, 1.0, 1.0), (-175.0, -175.0, -300.0), np.eye(3), "bench")


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(bundle_dir: str | Path | None = None) -> dict[str, Any]:
    """Time one analysis (module docstring); returns flat name → value for bench/results.md."""
    from lungcad.bundle import Bundle
    from lungcad.pipeline import analyze_volume

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = Path(bundle_dir or Path(tmp) / "bundle")
        if not (path / "bundle.json").is_file():
            paper_bundle(path)
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        bundle = Bundle.load(path)
        load_s = time.perf_counter() - start
    volume = _phantom()
    bundle.manifest["detection"]["operating_threshold"] = 2.0  # detection only (part 1)
    wall, cpu = time.perf_counter(), _cpu_s()
    detection = analyze_volume(volume, bundle, progress=lambda step: print(f"  {step} …", flush=True))
    best = detection.candidates.head(FINDINGS)
    given = best[["coordX", "coordY", "coordZ"]].to_numpy(np.float64)
    per_nodule = analyze_volume(volume, bundle, nodules_world_mm=given)
    wall, cpu = time.perf_counter() - wall, _cpu_s() - cpu
    steps = {k: detection.timings_s[k] for k in ("preprocess", "detect", "fpr")}
    steps.update({k: per_nodule.timings_s[k] for k in ("segment", "measure", "classify")})
    total = sum(steps.values())
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out: dict[str, Any] = {
        "scan (z, y, x) at 1 mm": "×".join(map(str, SHAPE_ZYX)),
        "models": "paper size, untrained weights",
        "torch threads": torch.get_num_threads(),
        "load average before": load_before,
        "bundle written (s)": build_s,
        "bundle loaded (s)": load_s,
        "candidates": len(detection.candidates),
        "findings analysed": len(per_nodule.findings),
    }
    out.update({f"{k} (s)": v for k, v in steps.items()})
    out["total (s), target ≤ 120"] = total
    out["wall of both calls (s)"] = wall
    out["CPU time of both calls (s)"] = cpu
    out["peak RSS (GiB), target ≤ 6"] = rss_gib
    out["load average after"] = os.getloadavg()[0]
    for key, value in out.items():
        print(f"{key:>32}: {value:.4g}" if isinstance(value, float) else f"{key:>32}: {value}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bundle",
        default=None,
        help="bundle folder: used when it holds bundle.json, else the paper-size untrained bundle is written there",
    )
    run(parser.parse_args(argv).bundle)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
