"""Run a local copy of the official LUNA16 evaluation script, for reference numbers and timings.

The script (``evaluationScript/noduleCADEvaluationLUNA16.py`` with its ``NoduleFinding.py`` and
``tools/csvTools.py``) is not part of this repository. Point ``LUNA16_EVAL_SCRIPT`` at a copy that runs
under Python 3 (the published script is Python 2: the only edits needed are ``print(...)``,
``dict.items()`` for ``iteritems()``, and, for the figure on current matplotlib,
``plt.xscale('log', base=2)`` and ``plt.grid(visible=True, ...)``).

``run_official`` calls the script the way its own ``noduleCADEvaluation`` does (100-mark cap,
bootstrapping on) after seeding numpy's global generator, and records every FROC curve the script
computes, so that the test fixtures can also hold per-sample quantities the script only keeps
internally (the bootstrap statistics at the seven FP rates).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def official_script_path() -> Path | None:
    """The script named by ``LUNA16_EVAL_SCRIPT``, or None when unset or missing."""
    value = os.environ.get("LUNA16_EVAL_SCRIPT")
    if not value:
        return None
    path = Path(value)
    return path if path.is_file() else None


def _load(script: Path) -> Any:
    folder = str(script.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(f"_luna16_official_{abs(hash(script))}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def nearest_reading(fps: np.ndarray, sens: np.ndarray, rate: float) -> float:
    """The 'nearest operating point at or above' reading used by several published copies.

    Those copies take the last index whose FP rate has the smallest non-negative difference to the
    requested rate (they crash when the curve never reaches the rate).
    """
    diff = fps - rate
    idx = np.where(diff == diff[diff >= 0].min())[0][-1]
    return float(sens[idx])


def run_official(
    script: Path,
    annotations: Path,
    excluded: Path,
    seriesuids: Path,
    results: Path,
    out_dir: Path,
    n_bootstrap: int = 1000,
    seed: int = 0,
    record: bool = True,
) -> dict[str, Any]:
    """Evaluate one result set with the official script.

    Args:
        script: the Python-3 copy of ``noduleCADEvaluationLUNA16.py``.
        annotations, excluded, seriesuids, results: the four official inputs.
        out_dir: where the script writes its text files and figure.
        n_bootstrap: bootstrap samples (0 switches bootstrapping off).
        seed: ``np.random.seed`` applied right before the evaluation.
        record: keep every FROC curve the script computes (the first is the main curve, the others
            are the bootstrap samples in order).

    Returns:
        ``seconds`` (wall time of the evaluation alone) and the script's outputs: main curve, the
        seven sensitivities in both readings, and with bootstrapping the 10000-point mean/lower/upper
        curves plus the same statistics at the seven FP rates computed with the script's own
        ``compute_mean_ci`` on its recorded bootstrap curves.
    """
    module = _load(script)
    out_dir.mkdir(parents=True, exist_ok=True)
    curves: list[tuple[np.ndarray, np.ndarray]] = []
    original = module.computeFROC
    if record:

        def recording(*args: Any, **kwargs: Any) -> Any:
            fps, sens, thresholds = original(*args, **kwargs)
            curves.append((np.array(fps, copy=True), np.array(sens, copy=True)))
            return fps, sens, thresholds

        module.computeFROC = recording
    sink = io.StringIO()
    np.random.seed(seed)
    start = time.perf_counter()
    with contextlib.redirect_stdout(sink):
        all_nodules, uids = module.collect(str(annotations), str(excluded), str(seriesuids))
        out = module.evaluateCAD(
            uids,
            str(results),
            str(out_dir),
            all_nodules,
            results.stem,
            maxNumberOfCADMarks=100,
            performBootstrapping=n_bootstrap > 0,
            numberOfBootstrapSamples=n_bootstrap,
            confidence=0.95,
        )
    seconds = time.perf_counter() - start
    module.computeFROC = original
    import matplotlib.pyplot as plt

    plt.close("all")
    fps, sens, _thr, bs_fps, bs_mean, bs_lb, bs_ub = out
    rates = np.asarray(FP_RATES)
    report: dict[str, Any] = {
        "seconds": seconds,
        "fps": np.asarray(fps, dtype=np.float64),
        "sens": np.asarray(sens, dtype=np.float64),
        "sens_interp": np.interp(rates, fps, sens),
        "sens_nearest": np.array([nearest_reading(fps, sens, r) for r in FP_RATES]),
    }
    if n_bootstrap > 0:
        report["bootstrap_grid"] = np.asarray(bs_fps)
        report["bootstrap_mean"] = np.asarray(bs_mean)
        report["bootstrap_lower"] = np.asarray(bs_lb)
        report["bootstrap_upper"] = np.asarray(bs_ub)
        if record:
            samples = curves[1:]
            at_rates = np.zeros((len(samples), len(FP_RATES)), dtype="float32")
            for i, (f, s) in enumerate(samples):
                at_rates[i, :] = np.interp(rates, f, s)
            cpm_samples = at_rates.astype(np.float64).mean(axis=1)
            mean, lower, upper = module.compute_mean_ci(at_rates, confidence=0.95)
            report["bootstrap_points_mean"] = np.asarray(mean)
            report["bootstrap_points_lower"] = np.asarray(lower)
            report["bootstrap_points_upper"] = np.asarray(upper)
            cpm_sorted = np.sort(cpm_samples)
            pz = (1.0 - 0.95) / 2.0
            report["bootstrap_cpm_mean"] = float(cpm_samples.mean())
            report["bootstrap_cpm_lower"] = float(cpm_sorted[int(np.floor(pz * len(cpm_sorted)))])
            report["bootstrap_cpm_upper"] = float(cpm_sorted[int(np.floor((1.0 - pz) * len(cpm_sorted)))])
    analysis = (out_dir / "CADAnalysis.txt").read_text()
    report["analysis"] = analysis
    return report
