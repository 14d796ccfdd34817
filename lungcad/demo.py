"""`make demo`: the CLAF demo (`lungdet.demo`), then the three models together on a scan none of them saw.

After the CLAF stages of `lungdet.demo` (synthetic LUNA16 tree, stage 1 + MPPN, official FROC, report):

1. a synthetic LIDC-IDRI tree (default 16 small phantoms, same seed; masks and malignancy ratings, which
   the LUNA16 layout lacks) — reused when present;
2. a brief GLANCE run (``configs/demo/glance_demo.yaml``) and a brief M³Net run
   (``configs/demo/m3net_demo.yaml``) on it, each the `lungseg` / `lungcls` command a user would type;
3. ``lungcad bundle`` of the four checkpoints → ``demo_out/bundle/``;
4. one held-out synthetic scan (an index past both trees) written as a DICOM CT series →
   ``demo_out/dicom/``;
5. ``lungcad analyze demo_out/dicom --bundle demo_out/bundle --out demo_out/analysis`` and the path of its
   ``report.html``.

``python -m lungcad.demo [--out demo_out] [--scans 20] [--lidc-scans 16] [--seed 0] [--skip-claf]``;
``--skip-claf`` reuses the CLAF checkpoints of an earlier run in the same folder (to re-run only the parts
added here). Every step is timed; the demo as a whole stays within 20 minutes on 2 CPU cores.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts (see lungdet.demo)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GLANCE_CONFIG = REPO / "configs" / "demo" / "glance_demo.yaml"
M3NET_CONFIG = REPO / "configs" / "demo" / "m3net_demo.yaml"


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    print(f"[demo] {name} …", flush=True)
    yield
    timings[name] = time.perf_counter() - start
    print(f"[demo] {name}: {timings[name]:.0f} s", flush=True)


def _synth_lidc(tree: Path, scans: int, seed: int) -> None:
    """Write the synthetic LIDC tree unless the same one is already there."""
    from common.synth import make_lidc, read_manifest

    if (tree / "synth_manifest.json").is_file():
        generator = read_manifest(tree).get("generator", {})
        if (
            generator.get("n_scans") == scans
            and generator.get("seed") == seed
            and generator.get("size") == "small"
        ):
            print(f"[demo] reusing the synthetic LIDC tree in {tree}")
            return
    print(f"[demo] writing {scans} synthetic LIDC-IDRI scans to {tree}")
    make_lidc(tree, n_scans=scans, seed=seed, size="small")


def _last_checkpoint(runs: Path, name: str) -> Path:
    """``last.ckpt`` of the newest ``runs/<name>/version_N`` (the run just trained)."""
    versions = sorted(
        (runs / name).glob("version_*/checkpoints/last.ckpt"),
        key=lambda p: int(p.parents[1].name.split("_")[1]),
    )
    if not versions:
        raise FileNotFoundError(f"{runs / name}: no checkpoints/last.ckpt after training {name}")
    return versions[-1]


def _claf_checkpoints(runs: Path) -> dict[str, str]:
    return {"stage1": str(_last_checkpoint(runs, "stage1")), "stage2": str(_last_checkpoint(runs, "stage2"))}


def write_held_out_dicom(folder: Path, seed: int, index: int) -> tuple[Path, str]:
    """Scan ``index`` of the synthetic dataset ``seed`` as a DICOM CT series; returns (folder, series UID).

    Carries a synthetic patient name and ID, as a real export would (they must reach no output but the DICOM
    SEG/SR); `write_dicom_series` adds the frame of reference a DICOM SEG needs.
    """
    import shutil

    from common.dicom import write_dicom_series
    from common.synth import generate_scan
    from common.synth.luna16 import scan_volume

    scan = generate_scan(seed, index)
    if folder.exists():
        shutil.rmtree(folder)
    tags = {
        "0010|0010": "Synthetic^Phantom",
        "0010|0020": scan.patient_id,
        "0008|103e": "synthetic chest CT (held out)",
    }
    write_dicom_series(
        scan_volume(scan), folder, series_uid=scan.series_uid, study_uid=scan.study_uid, tags=tags
    )
    return folder, scan.series_uid


def run_demo(
    out: str | Path = "demo_out",
    scans: int = 20,
    lidc_scans: int = 16,
    seed: int = 0,
    bootstrap: int = 1000,
    skip_claf: bool = False,
) -> dict[str, Any]:
    """The CLAF demo, then GLANCE + M³Net, the bundle and the analysis of a held-out DICOM series."""
    from lungcad.cli import main as lungcad_main
    from lungcls.cli import main as lungcls_main
    from lungseg.cli import main as lungseg_main

    out = Path(out).resolve()
    runs = out / "runs"
    timings: dict[str, float] = {}
    if skip_claf:
        checkpoints = _claf_checkpoints(runs)
        print(f"[demo] reusing the CLAF checkpoints {checkpoints['stage1']}, {checkpoints['stage2']}")
    else:
        from lungdet.demo import run_demo as claf_demo

        start = time.perf_counter()
        claf = claf_demo(out, scans, seed, bootstrap=bootstrap)
        timings["CLAF demo (lungdet.demo)"] = time.perf_counter() - start
        checkpoints = claf["checkpoints"]

    lidc = out / "lidc"
    with _timed(timings, "synthetic LIDC tree"):
        _synth_lidc(lidc, lidc_scans, seed)
    data = ["--data.init_args.root", str(lidc), "--trainer.default_root_dir", str(runs)]
    with _timed(timings, "GLANCE fit"):
        lungseg_main(
            ["fit", "--config", str(GLANCE_CONFIG), *data, "--data.init_args.cache_dir", str(out / "cache_lidc"),
             "--run_name", "glance"]
        )  # fmt: skip
    with _timed(timings, "M3Net fit"):
        lungcls_main(
            ["fit", "--config", str(M3NET_CONFIG), *data, "--data.init_args.cache_dir", str(out / "patches_lidc"),
             "--run_name", "m3net"]
        )  # fmt: skip
    bundle = out / "bundle"
    with _timed(timings, "lungcad bundle"):
        code = lungcad_main(
            ["bundle", "--stage1", checkpoints["stage1"], "--mppn", checkpoints["stage2"],
             "--seg", str(_last_checkpoint(runs, "glance")), "--cls", str(_last_checkpoint(runs, "m3net")),
             "--out", str(bundle)]
        )  # fmt: skip
        if code:
            raise SystemExit(f"[demo] lungcad bundle failed (exit status {code})")
    with _timed(timings, "held-out scan as DICOM"):
        dicom, series_uid = write_held_out_dicom(out / "dicom", seed, max(scans, lidc_scans))
    analysis = out / "analysis"
    with _timed(timings, "lungcad analyze"):
        code = lungcad_main(
            ["analyze", str(dicom), "--bundle", str(bundle), "--out", str(analysis), "--overwrite"]
        )
        if code:
            raise SystemExit(f"[demo] lungcad analyze failed (exit status {code})")
    folder = analysis / series_uid
    report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    return {"folder": folder, "report": report, "timings": timings}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out", help="working folder (default: demo_out/)")
    parser.add_argument("--scans", type=int, default=20, help="synthetic LUNA16 scans for CLAF (default 20)")
    parser.add_argument(
        "--lidc-scans", type=int, default=16, help="synthetic LIDC scans for GLANCE and M3Net"
    )
    parser.add_argument("--seed", type=int, default=0, help="synthetic-data seed")
    parser.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap samples of the CLAF evaluation"
    )
    parser.add_argument(
        "--skip-claf", action="store_true", help="reuse the CLAF checkpoints of an earlier run"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    result = run_demo(args.out, args.scans, args.lidc_scans, args.seed, args.bootstrap, args.skip_claf)
    summary = result["report"]["summary"]
    print()
    for name, seconds in result["timings"].items():
        print(f"[demo] {name:<28} {seconds:6.0f} s")
    print(
        f"[demo] held-out scan: {summary['n_nodules']} nodule(s), Lung-RADS {summary['scan_category']} "
        f"(research decision support, not a diagnosis); {time.perf_counter() - started:.0f} s in all"
    )
    html = result["folder"] / "report.html"
    print(f"[demo] report: {html if html.is_file() else result['folder'] / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
