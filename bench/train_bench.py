"""Training throughput: per model, samples/s of the data loader alone and of the training step alone.

SPEC §8: the data pipeline must never be the bottleneck. For each model — lungdet stage 1 (CLAF) and stage 2
(MPPN), lungseg (GLANCE), lungcls (M³Net, pathology classifier) — the real config in ``configs/`` (paper
widths, crop and image sizes, augmentation) runs a few training steps on synthetic data with
``num_workers=0``, and a callback times, for every batch after the first, the loader's work (from the end of
one step to the start of the next: fetching, cropping, augmenting, collating) and the step (forward,
loss, backward, optimiser). Both are reported as samples/s, and ``loader_over_step`` is their ratio: ≥ 2
means one loader process feeds the step twice over on this machine, so ``num_workers`` processes on a GPU
machine leave the GPU waiting for nothing as long as the GPU step is less than 2 × num_workers times
faster than this CPU step. Batch sizes are smaller than the papers' (CPU time); the per-sample rates of
loader and step both scale with the batch, so the ratio does not depend on it much.

Synthetic data (``medium`` phantoms: 128 × 256² voxels, ≈ 200 × 190² at 1 mm, so a 128³ crop fits) are
written once under ``--data`` (default ``bench/out/train_data``) and reused.

Run: ``python -m bench.train_bench [--only lungdet_stage1 ...] [--steps 3]``, or ``run()`` from ``make bench``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import Callback, Trainer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "bench" / "out" / "train_data"
N_SCANS = 4


class StepTimer(Callback):
    """Per batch: seconds in the training step, and seconds between the previous step and this one."""

    def __init__(self) -> None:
        self.step_s: list[float] = []
        self.load_s: list[float] = []
        self.sizes: list[int] = []
        self._end: float | None = None
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        _sync(pl_module)
        self._start = time.perf_counter()
        if self._end is not None:
            self.load_s.append(self._start - self._end)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _sync(pl_module)
        self._end = time.perf_counter()
        self.step_s.append(self._end - self._start)
        self.sizes.append(_batch_size(batch))


def _sync(module) -> None:
    """Wait for queued GPU work, so that a step's time is the step's and not its launch's."""
    import torch

    if module.device.type == "cuda":
        torch.cuda.synchronize(module.device)


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict):
        for key in ("label", "image", "patches"):
            if key in batch:
                value = batch[key]
                value = next(iter(value.values())) if isinstance(value, dict) else value
                return int(value.shape[0]) if hasattr(value, "shape") else len(value)
    raise TypeError(f"cannot tell the batch size of a {type(batch).__name__}")


# ---------------------------------------------------------------------------------------------- data
def synthetic_data(root: Path) -> dict[str, Path]:
    """The synthetic trees (written once): LUNA16 and LIDC at `medium` size, LDFC at `small`."""
    from common.synth import make_lidc, make_luna16
    from common.synth.ldfc import make_ldfc

    trees = {"luna16": root / "luna16", "lidc": root / "lidc", "ldfc": root / "ldfc"}
    makers: dict[str, Callable[[Path], Any]] = {
        "luna16": lambda p: make_luna16(p, n_scans=N_SCANS, seed=0, size="medium"),
        "lidc": lambda p: make_lidc(p, n_scans=N_SCANS, seed=0, size="medium"),
        "ldfc": lambda p: make_ldfc(p, n_scans=5, seed=0),
    }
    for name, path in trees.items():
        if not (path / ".complete").is_file():
            print(f"writing synthetic {name} under {path} (once)", flush=True)
            makers[name](path)
            (path / ".complete").touch()
    return trees


def _trainer_settings(run_dir: Path) -> dict[str, Any]:
    return {
        "default_root_dir": str(run_dir),
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
    }


def _split(ratios=(0.5, 0.25, 0.25)) -> dict[str, Any]:
    return {"split": "ratio", "ratios": list(ratios)}


#: CPU batch sizes (the papers': 4, 32, 8, 32, 16); `model_setups(paper_batches=True)` keeps the papers'.
CPU_BATCH = {
    "lungdet_stage1": 2,
    "lungdet_stage2": 32,
    "lungseg_glance": 2,
    "lungcls_m3net": 4,
    "lungcls_pathology": 4,
}


def model_setups(
    trees: dict[str, Path], work: Path, paper_batches: bool = False
) -> dict[str, tuple[str, list[str], dict[str, Any]]]:
    """name → (package, config files, overlay): the paper's config with the synthetic data.

    CPU (default): `CPU_BATCH` and ``num_workers=0`` (the loader's own rate); `paper_batches`: the configs'
    batch sizes and workers (the GPU benchmark).
    """
    setups = {
        "lungdet_stage1": (
            "lungdet",
            ["configs/claf_luna16.yaml"],
            {"data": {"init_args": {"root": str(trees["luna16"]), "cache_dir": str(work / "luna16_cache"),
                                    **_split(), "batch_size": 2, "num_workers": 0, "samples_per_epoch": 64}}},
        ),
        "lungdet_stage2": (
            "lungdet",
            ["configs/mppn_luna16.yaml"],
            {"data": {"init_args": {"root": str(trees["luna16"]), "cache_dir": str(work / "luna16_cache"),
                                    **_split(), "batch_size": 32, "num_workers": 0, "samples_per_epoch": 512}}},
        ),
        "lungseg_glance": (
            "lungseg",
            ["configs/glance_lidc.yaml"],
            {"data": {"init_args": {"root": str(trees["lidc"]), "cache_dir": str(work / "lidc_cache"),
                                    "ratios": [0.5, 0.25, 0.25], "batch_size": 2, "num_workers": 0}}},
        ),
        "lungcls_m3net": (
            "lungcls",
            ["configs/m3net_lidc.yaml"],
            # random stage-1 weights: the step costs the same as with the paper's trained branches
            {"model": {"init_args": {"stage1_checkpoints": None}},
             "data": {"init_args": {"root": str(trees["lidc"]), "cache_dir": str(work / "patch_cache"),
                                    "ratios": [0.5, 0.25, 0.25], "stratify": False, "batch_size": 4,
                                    "num_workers": 0}}},
        ),
        "lungcls_pathology": (
            "lungcls",
            ["configs/pathology_ldfc.yaml"],
            {"data": {"init_args": {"root": str(trees["ldfc"]), "val_fraction": 0.25, "batch_size": 4,
                                    "num_workers": 0}}},
        ),
    }  # fmt: skip
    for name, (_, _, overlay) in setups.items():
        args = overlay["data"]["init_args"]
        if paper_batches:
            del args["batch_size"], args["num_workers"]
        else:
            args["batch_size"] = CPU_BATCH[name]
    return setups


def _cli(package: str, args: list[str]):
    if package == "lungdet":
        from lungdet.cli import run_cli

        return run_cli(args, run=False)
    if package == "lungseg":
        from lungseg.cli import GlanceCLI
        from lungseg.data import GlanceDataModule
        from lungseg.task import GlanceTask

        return GlanceCLI(GlanceTask, GlanceDataModule, package="lungseg", args=args, run=False)
    from common.lightning.cli import LungCLI
    from lungcls.task import ClassificationTask

    return LungCLI(ClassificationTask, None, package="lungcls", args=args, run=False)


def measure(
    package: str,
    configs: list[str],
    overlay: dict[str, Any],
    work: Path,
    steps: int,
    accelerator: str = "cpu",
    precision: str = "32-true",
) -> dict[str, Any]:
    """Build the config's task + datamodule, train 1 + `steps` batches, and time loader and step."""
    cli_trainer = {"default_root_dir": str(work / "runs"), "accelerator": "cpu", "devices": 1}
    overlay = {**overlay, "trainer": cli_trainer}
    overlay_path = work / f"overlay_{package}_{len(list(work.glob('overlay_*')))}.yaml"
    overlay_path.write_text(yaml.safe_dump(overlay))
    args = [a for c in configs for a in ("--config", str(REPO / c))] + ["--config", str(overlay_path)]
    cli = _cli(package, args)
    timer = StepTimer()
    trainer = Trainer(
        **{**_trainer_settings(work / "runs"), "accelerator": accelerator, "precision": precision},
        max_steps=steps + 1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    trainer.fit(cli.model, datamodule=cli.datamodule)
    step_s, load_s, sizes = timer.step_s[1:], timer.load_s, timer.sizes[1:]  # the first batch warms up
    if not step_s or not load_s:
        raise RuntimeError(f"{package}: the loader gave fewer than 2 batches; raise samples_per_epoch")
    batch = statistics.median(sizes)
    loader = batch / statistics.median(load_s)
    step = batch / statistics.median(step_s)
    return {
        "batch": int(batch),
        "loader_samples_s": loader,
        "step_samples_s": step,
        "loader_over_step": loader / step,
        "step_its": 1.0 / statistics.median(step_s),
    }


def run(
    only: list[str] | None = None, steps: int = 3, data: str | Path | None = None, threads: int | None = None
) -> dict[str, Any]:
    """Loader-vs-step samples/s of every model (flat name → value for bench/results.md)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    os.environ.setdefault("WANDB_MODE", "disabled")
    trees = synthetic_data(Path(data) if data else DEFAULT_DATA)
    work_root = Path(data) if data else DEFAULT_DATA
    results: dict[str, Any] = {"threads": torch.get_num_threads(), "timed_steps": steps}
    for name, (package, configs, overlay) in model_setups(trees, work_root).items():
        if only and name not in only:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            # caches stay under the data folder (built once), run folders in the temporary one
            start = time.perf_counter()
            try:
                with contextlib.redirect_stderr(io.StringIO()):
                    row = measure(package, configs, overlay, work, steps)
            except Exception as err:  # one model's failure must not hide the others' numbers
                results[f"{name}_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                print(f"{name}: FAILED {results[f'{name}_error']}", flush=True)
                continue
        for key, value in row.items():
            results[f"{name}_{key}"] = value
        print(
            f"{name}: batch {row['batch']}, loader {row['loader_samples_s']:.2f} samples/s, step "
            f"{row['step_samples_s']:.2f} samples/s, loader/step {row['loader_over_step']:.1f} "
            f"({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="model names (lungdet_stage1, lungdet_stage2, lungseg_glance, "
                        "lungcls_m3net, lungcls_pathology)")  # fmt: skip
    parser.add_argument(
        "--steps", type=int, default=3, help="timed training steps per model (after 1 warm-up)"
    )
    parser.add_argument(
        "--data", default=None, help=f"synthetic data + caches folder (default {DEFAULT_DATA})"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    for key, value in run(args.only, args.steps, args.data, args.threads).items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    main()
