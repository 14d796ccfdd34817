"""`make demo`: the CLAF pipeline end to end on synthetic LUNA16 scans, on a CPU, in minutes.

What runs (every step is the `lungdet` command a user would type, called in-process):

1. ``make_luna16``: a synthetic LUNA16 tree (default 20 small phantoms, seed 0) — reused when present;
2. stage 1 ``fit`` with ``configs/demo/claf_demo.yaml`` (the cache is built by ``prepare_data``; the split,
   60 / 10 / 30 % of the scans, is saved beside it), then ``test`` on the held-out scans;
3. stage 1 ``predict`` on the training and validation scans → candidates for stage 2;
4. stage 2 ``fit`` with ``configs/demo/mppn_demo.yaml`` on those candidates plus ``candidates_V2.csv``
   (its validation chooses the fusion weight w of ``(1 − w)·p_MPPN + w·p_stage1``, ``lungdet.fusion``),
   then ``test``: the MPPN re-scores stage 1's candidates of each held-out scan — read from step 2's
   ``test_results.csv`` (``stage1_results_csv``: the same checkpoint and settings, so the same candidates
   as a second stage-1 pass) — fused with the checkpoint's w (``test_fusion.json``, copied to the report
   as ``fusion.json``);
5. the official LUNA16 evaluation (``common.metrics.froc_io.evaluate_froc_files``, the code behind
   ``lungdata evaluate-froc``, 1000 bootstrap samples) of stage 1 alone and of both stages on the
   held-out scans;
6. a report folder: ``README.md`` (FROC table; stage 1's CPM and the two-stage CPM with the validation-chosen
   w side by side with their 95 % bootstrap intervals; sensitivity at 0.55 FP/scan, timings), ``froc.png`` and
   ``froc_stage1.png``, ``results.csv`` (LUNA16 format), ``froc.json``, candidate overlays and Grad-CAM PNGs.

``python -m lungdet.demo [--out demo_out] [--scans 20] [--seed 0]``; ``--stage1 "ARGS"`` / ``--stage2 "ARGS"``
are appended to the stage's ``lungdet`` command lines (e.g. ``--stage1 "--trainer.max_epochs 2"``).
"""

from __future__ import annotations

import os

# Before torch starts its OpenMP pool: on a busy 2-core machine, spinning worker threads make 3D
# convolutions an order of magnitude slower; passive waiting costs nothing on an idle machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from common import atomic  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STAGE1_CONFIG = REPO / "configs" / "demo" / "claf_demo.yaml"
STAGE2_CONFIG = REPO / "configs" / "demo" / "mppn_demo.yaml"
FP_RATE = 0.55
FINAL = "stage 1 + MPPN, validation-chosen fusion"


def _synth(tree: Path, scans: int, seed: int) -> None:
    """Write the synthetic LUNA16 tree unless the same one is already there."""
    manifest = tree / "synth_manifest.json"
    if manifest.is_file():
        generator = json.loads(manifest.read_text()).get("generator", {})
        if (
            generator.get("n_scans") == scans
            and generator.get("seed") == seed
            and generator.get("size") == "small"
        ):
            print(f"[demo] reusing the synthetic LUNA16 tree in {tree}")
            return
    from common.synth import make_luna16

    print(f"[demo] writing {scans} synthetic LUNA16 scans to {tree}")
    print(make_luna16(tree, n_scans=scans, seed=seed, size="small").describe())


def _lungdet(args: list[str]):
    from lungdet.cli import run_cli

    return run_cli(args)


def _evaluate(tree: Path, results: Path, seriesuids: Path, bootstrap: int):
    from common.metrics.froc_io import evaluate_froc_files

    return evaluate_froc_files(
        tree / "annotations.csv",
        tree / "annotations_excluded.csv",
        seriesuids,
        results,
        n_bootstrap=bootstrap,
    )


def _row(name: str, result) -> dict[str, Any]:
    from common.metrics.detection import sensitivity_at_fp_rate

    row: dict[str, Any] = {"system": name}
    for rate, sens in zip(result.fp_rates, result.sensitivities):
        row[f"sens@{rate:g}"] = float(sens)
    row["CPM"] = result.cpm
    if result.bootstrap is not None:
        row["CPM 95% CI"] = f"[{result.bootstrap.cpm_lower:.3f}, {result.bootstrap.cpm_upper:.3f}]"
    row[f"sens@{FP_RATE:g}"] = sensitivity_at_fp_rate(result.curve, FP_RATE)
    row["recall"] = result.counts.sensitivity
    row["candidates/scan"] = result.counts.candidates_per_scan
    return row


def _cpm_with_interval(result) -> str:
    if result.bootstrap is None:
        return f"{result.cpm:.3f}"
    return f"{result.cpm:.3f} [{result.bootstrap.cpm_lower:.3f}, {result.bootstrap.cpm_upper:.3f}]"


def _headline(evaluated: dict[str, Any], fusion: dict[str, Any], bootstrap: int) -> list[str]:
    """Stage 1 and the two-stage score side by side (CPM, 95 % interval), and how w was chosen."""
    final, stage1 = evaluated[FINAL], evaluated["stage 1 (CLAF candidate net)"]
    same = evaluated["stage 1 scores, stage-2 candidates"]
    interval = f" [95 % bootstrap interval over scans, {bootstrap} samples]" if bootstrap else ""
    lines = [
        f"| CPM{interval} | stage 1 (100 candidates/scan) | stage 1, stage-2 candidates | both stages (w = "
        f"{fusion['stage1_weight']:g}) |",
        "| --- | --- | --- | --- |",
        f"| held-out scans | {_cpm_with_interval(stage1)} | {_cpm_with_interval(same)} | "
        f"**{_cpm_with_interval(final)}** |",
        "",
    ]
    validation = fusion.get("validation")
    if fusion["source"] == "validation" and validation:
        tried = ", ".join(
            f"{w}: {c:.3f}" if c is not None else f"{w}: –" for w, c in validation["validation_cpm"].items()
        )
        chosen = validation["chosen_validation_cpm"]
        searched = len(validation["validation_cpm"]) > 1
        lines.append(
            f"Fusion {'chosen' if searched else 'kept'} on the MPPN run's validation scans "
            f"(scans: {validation['validation_scans']}, nodules: {validation['validation_nodules']}, "
            f"epoch {validation['epoch']}): w = {fusion['stage1_weight']:g} in (1 − w)·p_MPPN + w·p_stage1, "
            "validation CPM "
            + (f"{chosen:.3f}" if chosen is not None else "undefined (no nodule)")
            + (
                f" (ties go to the configured {fusion['configured_stage1_weight']:g}, then to the smaller w). "
                f"Validation CPM per w: {tried}."
                if searched
                else " (only the configured w was scored: no validation nodule or no stage-1 score)."
            )
        )
    else:
        lines.append(
            f"Fusion: the configured w = {fusion['stage1_weight']:g} (no validation choice in the checkpoint: "
            "`fusion_search` off or no validation epoch)."
        )
    return lines


def _markdown(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "| " + " | ".join("---" for _ in keys) + " |"]
    for row in rows:
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _figures(
    report: Path, cache_dir: Path, results: pd.DataFrame, stage1_ckpt: str, n: int = 4
) -> list[Path]:
    """Overlays of the best-scoring candidates (true and false) and Grad-CAM of a few nodules."""
    import torch

    from common.cache import PreprocessedCache, entry_geometry
    from lungdet.candidates import label_candidates
    from lungdet.figures import save_candidate_overlay
    from lungdet.gradcam import gradcam_for_candidate, save_gradcam_png
    from lungdet.scan_reader import ScanReader, finding_array
    from lungdet.task import CandidateTask

    reader = ScanReader(PreprocessedCache(cache_dir))
    written: list[Path] = []
    results = results.sort_values("probability", ascending=False)
    shown = {"TP": 0, "FP": 0}
    for _, row in results.iterrows():
        entry = reader.entry(row["seriesuid"])
        world = row[["coordX", "coordY", "coordZ"]].to_numpy(np.float64)[None]
        label, ignore = label_candidates(
            world, finding_array(entry, "nodules"), finding_array(entry, "excluded")
        )
        if ignore[0]:
            continue
        kind = "TP" if label[0] else "FP"
        if shown[kind] >= n // 2:
            continue
        shown[kind] += 1
        zyx = entry_geometry(entry).world_to_voxel(world[0])
        nodules = finding_array(entry, "nodules", space="voxel")
        path = report / "candidates" / f"{kind.lower()}_{shown[kind]}.png"
        written.append(
            save_candidate_overlay(
                reader.whole(row["seriesuid"]),
                zyx,
                path,
                probability=float(row["probability"]),
                nodules_zyx_d=nodules,
                title=f"{kind}, p = {row['probability']:.3f} (green: annotation)",
            )  # fmt: skip
        )
        if all(v >= n // 2 for v in shown.values()):
            break

    task = CandidateTask.load_from_checkpoint(stage1_ckpt, map_location="cpu", weights_only=True)
    task.eval()
    k = 0
    for uid in results["seriesuid"].unique():
        entry = reader.entry(uid)
        image = torch.from_numpy(reader.whole(uid))
        for finding in entry["nodules"]:
            crop, cam, centre = gradcam_for_candidate(
                task.model, image, finding["voxel_zyx"], crop_size=64, fill=reader.fill_value
            )
            title = f"Grad-CAM (dec2), nodule {finding['diameter_mm']:.1f} mm"
            written.append(
                save_gradcam_png(
                    crop, cam, report / "gradcam" / f"nodule_{k}.png", centre, finding["diameter_mm"], title
                )
            )
            k += 1
            if k >= 2:
                return written
    return written


def run_demo(
    out: str | Path = "demo_out",
    scans: int = 20,
    seed: int = 0,
    stage1_args: Sequence[str] = (),
    stage2_args: Sequence[str] = (),
    bootstrap: int = 1000,
    figures: bool = True,
) -> dict[str, Any]:
    """Run the whole demo; returns the report folder, the FROC rows, the step timings and the checkpoints.

    Args:
        out: working folder (tree, cache, runs, report).
        scans: synthetic scans to generate.
        seed: synthetic-data seed.
        stage1_args: extra arguments for the stage-1 command lines (fit, test, predict).
        stage2_args: extra arguments for the stage-2 command lines (fit, test).
        bootstrap: bootstrap samples of the official evaluation.
        figures: write overlays and Grad-CAM PNGs.
    """
    out = Path(out).resolve()
    tree, cache, runs, report = out / "luna16", out / "cache", out / "runs", out / "report"
    report.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def timed(name: str):
        class _Timer:
            def __enter__(self):
                self.start = time.perf_counter()
                print(f"[demo] {name} …", flush=True)

            def __exit__(self, *exc):
                timings[name] = time.perf_counter() - self.start
                print(f"[demo] {name}: {timings[name]:.0f} s", flush=True)

        return _Timer()

    common = [
        "--data.init_args.root", str(tree), "--data.init_args.cache_dir", str(cache),
        "--trainer.default_root_dir", str(runs),
    ]  # fmt: skip
    stage1 = ["--config", str(STAGE1_CONFIG), *common, "--run_name", "stage1"]
    stage2 = ["--config", str(STAGE2_CONFIG), *common, "--run_name", "stage2"]

    with timed("synthetic data"):
        _synth(tree, scans, seed)
    with timed("stage 1 fit (incl. preprocessing)"):
        cli = _lungdet(["fit", *stage1, *stage1_args])
        stage1_ckpt = cli.trainer.checkpoint_callback.last_model_path
        test_uids = list(cli.datamodule.uids["test"])
    with timed("stage 1 test"):
        cli = _lungdet(["test", *stage1, *stage1_args, "--ckpt_path", stage1_ckpt])
        shutil.copy(Path(cli.trainer.log_dir) / "test_results.csv", report / "results_stage1.csv")
    candidates = runs / "stage1_train_val_candidates.csv"
    with timed("stage 1 predict (training candidates for stage 2)"):
        _lungdet(
            ["predict", *stage1, *stage1_args, "--ckpt_path", stage1_ckpt,
             "--data.init_args.predict_parts", "[train,val]", "--model.init_args.results_csv", str(candidates)]
        )  # fmt: skip
    two_stage = [
        "--data.init_args.candidates_csv", str(candidates), "--model.init_args.stage1_checkpoint", stage1_ckpt,
    ]  # fmt: skip
    with timed("stage 2 fit"):
        cli = _lungdet(["fit", *stage2, *two_stage, *stage2_args])
        stage2_ckpt = cli.trainer.checkpoint_callback.last_model_path
    with timed("two-stage test"):
        # the stage-1 test's list (same checkpoint and inference settings, 100 ≥ 32 candidates per scan)
        # stands in for a second stage-1 pass over the test scans
        reuse = ["--data.init_args.stage1_results_csv", str(report / "results_stage1.csv")]
        cli = _lungdet(["test", *stage2, *two_stage, *reuse, *stage2_args, "--ckpt_path", stage2_ckpt])
        run = Path(cli.trainer.log_dir)
        shutil.copy(run / "test_results.csv", report / "results.csv")
        shutil.copy(run / "test_fusion.json", report / "fusion.json")
        shutil.copy(run / "test_results_stage1.csv", report / "results_stage1_same_candidates.csv")
        if (run / "test_results_mppn.csv").is_file():
            shutil.copy(run / "test_results_mppn.csv", report / "results_mppn_alone.csv")

    from common.metrics.figures import plot_froc

    with timed("official evaluation"):
        seriesuids = report / "seriesuids_test.csv"
        atomic.write_text(seriesuids, "".join(f"{u}\n" for u in test_uids))
        evaluated = {
            "stage 1 (CLAF candidate net)": _evaluate(
                tree, report / "results_stage1.csv", seriesuids, bootstrap
            ),
            "stage 1 scores, stage-2 candidates": _evaluate(
                tree, report / "results_stage1_same_candidates.csv", seriesuids, bootstrap
            ),
        }
        if (report / "results_mppn_alone.csv").is_file():
            evaluated["MPPN alone, stage-2 candidates"] = _evaluate(
                tree, report / "results_mppn_alone.csv", seriesuids, bootstrap
            )
        evaluated[FINAL] = _evaluate(tree, report / "results.csv", seriesuids, bootstrap)
        rows = [_row(name, result) for name, result in evaluated.items()]
        final = evaluated[FINAL]
        plot_froc(final, report / "froc.png", label="CLAF stage 1 + MPPN")
        plot_froc(evaluated["stage 1 (CLAF candidate net)"], report / "froc_stage1.png", label="CLAF stage 1")
        atomic.write_text(
            report / "froc.json",
            json.dumps({name: r.to_dict(include_curve=True) for name, r in evaluated.items()}, indent=2),
        )
        atomic.write_csv(report / "froc_table.csv", pd.DataFrame(rows))
    if figures:
        with timed("figures"):
            _figures(report, cache, pd.read_csv(report / "results.csv"), stage1_ckpt)

    counts = final.counts
    fusion = json.loads((report / "fusion.json").read_text())
    text = [
        "# lungdet demo — CLAF on synthetic LUNA16 scans",
        "",
        f"{scans} synthetic scans (seed {seed}); held-out test scans: {len(test_uids)} with {counts.n_nodules} "
        "nodules. Official LUNA16 rules (`lungdata evaluate-froc`), sensitivities by interpolation, "
        f"{bootstrap} bootstrap samples over scans.",
        "",
        _markdown(rows),
        "",
        *_headline(evaluated, fusion, bootstrap),
        "",
        f"Sensitivity at {FP_RATE:g} FP/scan of both stages: {rows[-1][f'sens@{FP_RATE:g}']:.3f} (the paper "
        "reports CPM 0.878 and 0.900 at 0.55 FP/scan on real LUNA16 — synthetic phantoms are not comparable, "
        "this run shows the pipeline works).",
        "",
        "Rows: stage 1 alone (its 100 best candidates per scan); the stage-1 scores and the MPPN probabilities "
        "of the candidates stage 2 re-scores (the 32 best of stage 1 per scan); the final score "
        "(1 − w)·p_MPPN + w·p_stage1 with the w the MPPN run chose on its validation scans "
        "(`fusion_search` in `configs/demo/mppn_demo.yaml`; w = 1 is stage 1's own ranking, so on the "
        "validation scans the fusion is never below stage 1 on these candidates).",
        "",
        "Files: `results.csv` (LUNA16 results format), `results_stage1.csv`, `fusion.json` (the chosen w and "
        "the validation CPM of every w), `froc.png`, `froc_stage1.png`, `froc.json`, `froc_table.csv`, "
        "`candidates/*.png` (green: annotation, yellow: candidate), `gradcam/*.png`.",
        "",
        "| step | seconds |",
        "| --- | --- |",
        *[f"| {name} | {seconds:.0f} |" for name, seconds in timings.items()],
        f"| total | {sum(timings.values()):.0f} |",
        "",
    ]
    atomic.write_text(report / "README.md", "\n".join(text))
    return {
        "report": report,
        "rows": rows,
        "timings": timings,
        "evaluated": evaluated,
        "test_uids": test_uids,
        "checkpoints": {"stage1": stage1_ckpt, "stage2": stage2_ckpt},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out", help="working folder (default: demo_out/)")
    parser.add_argument("--scans", type=int, default=20, help="synthetic scans (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic-data seed")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap samples of the evaluation")
    parser.add_argument(
        "--stage1", default="", help='extra stage-1 CLI arguments, e.g. "--trainer.max_epochs 2"'
    )
    parser.add_argument("--stage2", default="", help="extra stage-2 CLI arguments")
    args = parser.parse_args(argv)
    stage1, stage2 = shlex.split(args.stage1), shlex.split(args.stage2)
    started = time.perf_counter()
    result = run_demo(args.out, args.scans, args.seed, stage1, stage2, args.bootstrap)
    row = result["rows"][-1]
    print()
    print(_markdown(result["rows"]))
    print()
    print(
        f"[demo] CPM {row['CPM']:.3f}, sensitivity at {FP_RATE:g} FP/scan {row[f'sens@{FP_RATE:g}']:.3f} "
        f"on {len(result['test_uids'])} held-out synthetic scans; {time.perf_counter() - started:.0f} s in all"
    )
    print(f"[demo] report: {result['report']}/README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
