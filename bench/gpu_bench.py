"""GPU benchmark (`bench/gpu.sh`): CLAF whole-scan inference and training step rates, fp32 vs bf16.

On a machine with a CUDA device, in about 8 minutes at most (each part is skipped, and says so, once the
time budget is spent), this measures and writes ``bench/results_gpu.md``:

1. whole-scan two-stage CLAF inference on the 300 × 350 × 350 chest phantom (the volume of
   ``bench.lungdet_bench``; random weights at paper widths, 128³ blocks, 100 candidates scored by the MPPN),
   fp32 against ``torch.autocast(dtype=bfloat16)``, and how far the bf16 candidates are from the fp32 ones;
2. training iterations/s of the step alone (``bench.train_bench``: the paper configs at the papers' batch
   sizes on synthetic data) for lungdet stage 1 and 2, GLANCE, M³Net and the pathology classifier, with
   ``trainer.precision`` ``32-true`` and ``bf16-mixed``;
3. the whole ``lungcad analyze`` command on one synthetic scan, where the command is installed and
   ``LUNGCAD_BUNDLE`` names a model bundle (``lungcad bundle``); otherwise the part says why it was skipped.

Without CUDA it prints one line and exits 0. Run: ``bash bench/gpu.sh [--budget-s 480] [--steps 5]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
NO_CUDA = "bench/gpu.sh: no CUDA device (torch.cuda.is_available() is False); nothing measured, exit 0"


def _timed(fn: Callable[[], Any], device) -> tuple[Any, float]:
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def inference(
    rows: list[str],
    device: str = "cuda",
    shape: tuple[int, int, int] | None = None,
    widths: tuple[int, int] = (16, 32),
    block: int = 128,
    candidates: int | None = None,
) -> None:
    """Two-stage CLAF on the whole phantom scan, fp32 and bf16 autocast.

    `device`, `shape`, `widths` (stage 1, MPPN), `block` and `candidates` default to the GPU run; the test suite runs
    a miniature of it on the CPU.
    """
    import torch

    from bench.lungdet_bench import N_CANDIDATES, SHAPE_ZYX, phantom_volume
    from lungdet.data import fill_value
    from lungdet.inference import Stage1Inference, detect_scan, score_candidates
    from lungdet.models import build_candidate_net, build_mppn

    torch.manual_seed(0)
    device = torch.device(device)
    volume = phantom_volume(shape or SHAPE_ZYX).to(device)
    net = build_candidate_net("ascrm", width=widths[0]).to(device).eval()
    mppn = build_mppn(width=widths[1]).to(device).eval()
    pad = fill_value()

    def two_stage() -> tuple[torch.Tensor, torch.Tensor, float, float]:
        settings = Stage1Inference(
            block_size=block, overlap=0.25, sw_batch_size=2, score_threshold=0.0,
            max_candidates=candidates or N_CANDIDATES,
        )  # fmt: skip
        cands, t1 = _timed(lambda: detect_scan(net, volume, settings, pad_value=pad), device)
        probs, t2 = _timed(
            lambda: score_candidates(mppn, volume, cands[:, 1:4], chunk_size=64, pad_value=pad), device
        )
        return cands, probs, t1, t2

    results = {}
    for name, context in (
        ("fp32", lambda: torch.autocast(device.type, enabled=False)),
        ("bf16 autocast", lambda: torch.autocast(device.type, dtype=torch.bfloat16)),
    ):
        with context():
            two_stage()  # warm-up: cuDNN algorithm choice, allocator
            results[name] = two_stage()
    rows += [
        f"## Whole-scan two-stage CLAF inference ({' × '.join(map(str, volume.shape))} phantom, random weights, "
        "paper widths)",
        "",
        f"| path | stage 1 s | stage 2 s ({candidates or N_CANDIDATES} candidates) | total s | speed-up |",
        "| --- | --- | --- | --- | --- |",
    ]
    base = sum(results["fp32"][2:])
    for name, (_, _, t1, t2) in results.items():
        rows.append(f"| {name} | {t1:.2f} | {t2:.2f} | {t1 + t2:.2f} | {base / (t1 + t2):.2f}× |")
    fp32, bf16 = results["fp32"], results["bf16 autocast"]
    same = min(len(fp32[0]), len(bf16[0]))
    moved = (fp32[0][:same, 1:4] - bf16[0][:same, 1:4]).abs().max().item() if same else float("nan")
    score = (fp32[0][:same, 0] - bf16[0][:same, 0]).abs().max().item() if same else float("nan")
    rows += [
        "",
        f"bf16 vs fp32, candidates in rank order: {len(bf16[0])} vs {len(fp32[0])}, max |Δ position| "
        f"{moved:.2f} voxels, max |Δ stage-1 score| {score:.4f} (random weights: scores near 0.5 crowd "
        "together, so ranks swap easily; judge agreement on trained weights).",
        "",
    ]
    print("\n".join(rows[-8:]), flush=True)


def training(rows: list[str], steps: int, deadline: float) -> None:
    """Step-alone iterations/s of every model, fp32 and bf16-mixed (bench.train_bench on the GPU)."""
    import contextlib
    import io

    from bench.train_bench import DEFAULT_DATA, measure, model_setups, synthetic_data

    trees = synthetic_data(DEFAULT_DATA)
    rows += [
        f"## Training step alone (paper configs and batch sizes, synthetic data; median of {steps} steps)",
        "",
        "| model | batch | fp32 it/s | bf16-mixed it/s | bf16 speed-up | fp32 samples/s | bf16 samples/s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, (package, configs, overlay) in model_setups(trees, DEFAULT_DATA, paper_batches=True).items():
        measured: dict[str, dict[str, Any]] = {}
        for precision in ("32-true", "bf16-mixed"):
            if time.monotonic() > deadline:
                break
            with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(io.StringIO()):
                try:
                    measured[precision] = measure(
                        package, configs, overlay, Path(tmp), steps, "gpu", precision
                    )
                except Exception as err:  # one model's failure must not hide the others' numbers
                    measured[precision] = {"error": f"{type(err).__name__}: {err}".splitlines()[0][:200]}
        if not measured:
            rows.append(f"| {name} | skipped: time budget spent | | | | | |")
            continue
        fp, bf = measured.get("32-true", {}), measured.get("bf16-mixed", {})
        if "error" in fp or "error" in bf:
            rows.append(f"| {name} | failed: {fp.get('error') or bf.get('error')} | | | | | |")
            continue
        cells = [
            str(fp.get("batch", bf.get("batch", ""))),
            f"{fp['step_its']:.2f}" if fp else "skipped",
            f"{bf['step_its']:.2f}" if bf else "skipped: time budget",
            f"{bf['step_its'] / fp['step_its']:.2f}×" if fp and bf else "",
            f"{fp['step_samples_s']:.1f}" if fp else "",
            f"{bf['step_samples_s']:.1f}" if bf else "",
        ]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    rows.append("")


def analyze(rows: list[str]) -> None:
    """Wall time of `python -m lungcad analyze` on one synthetic scan, when the command and a bundle exist."""
    import importlib.util

    rows += ["## `lungcad analyze` (whole pipeline, one scan)", ""]
    if importlib.util.find_spec("lungcad.commands.analyze") is None:
        rows += ["skipped: lungcad analyze not installed", ""]
        return
    bundle = os.environ.get("LUNGCAD_BUNDLE")
    if not bundle or not Path(bundle).is_dir():
        rows += ["skipped: set LUNGCAD_BUNDLE to a model bundle folder (`lungcad bundle`) to time it", ""]
        return
    from bench.train_bench import DEFAULT_DATA, synthetic_data

    scan = sorted((synthetic_data(DEFAULT_DATA)["luna16"]).rglob("*.mhd"))[0]
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "lungcad", "analyze", str(scan), "--bundle", bundle, "--out", out],
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - start
    if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
        rows += [f"failed (exit {done.returncode}): {tail[0][:300]}", ""]
    else:
        rows += [f"{scan.name}: {seconds:.1f} s wall (process start, model loading and writing included)", ""]
    print("\n".join(rows[-2:]), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=450.0, help="stop starting new parts after this")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per model and precision")
    parser.add_argument("--out", default=str(REPO / "bench" / "results_gpu.md"))
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    started = time.monotonic()
    deadline = started + args.budget_s
    props = torch.cuda.get_device_properties(0)
    rows = [
        "# GPU benchmark results",
        "",
        f"{torch.cuda.get_device_name(0)} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}, "
        f"torch {torch.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPU cores; "
        f"run {time.strftime('%Y-%m-%d %H:%M:%S %Z')} with `bash bench/gpu.sh`. fp32 = torch defaults "
        f"(cuDNN convolutions may use TF32: {torch.backends.cudnn.allow_tf32}).",
        "",
    ]
    from common import atomic

    parts = (partial(inference, rows), partial(training, rows, args.steps, deadline), partial(analyze, rows))
    for part in parts:
        if time.monotonic() > deadline:
            rows += ["skipped: time budget spent", ""]
            continue
        try:
            part()
        except Exception as err:  # keep the other parts' numbers
            rows += [f"failed: {type(err).__name__}: {str(err).splitlines()[0][:300]}", ""]
        atomic.write_text(args.out, "\n".join(rows))
    rows.append(f"Total {time.monotonic() - started:.0f} s.")
    atomic.write_text(args.out, "\n".join(rows) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
