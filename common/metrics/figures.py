"""Metric figures written as PNG files into run folders (FROC curve, confusion matrix).

Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot): no global backend is
switched, nothing needs a display, and nothing stays registered after the call, so validation loops
that plot every epoch do not leak figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator

from common.metrics.froc import FP_RATES, FROCResult


def plot_froc(result: FROCResult, path: str | Path, label: str = "CAD system", dpi: int = 150) -> Path:
    """FROC curve on a log-2 FP axis from 1/8 to 8 FP/scan, as the LUNA16 figure.

    Draws the curve (linear interpolation between operating points, as the official figure), the
    seven sensitivities of the chosen reading as markers, and, when bootstrapped, the mean curve
    (dashed) and the 95% band.

    Args:
        result: an evaluated FROC.
        path: PNG file to write (folders are created).
        label: legend name of the system.
        dpi: resolution.

    Returns:
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fps_itp = np.linspace(FP_RATES[0], FP_RATES[-1], num=10001)
    sens_itp = np.interp(fps_itp, result.curve.fps, result.curve.sensitivity)
    fig = Figure(figsize=(6.0, 4.5))
    ax = fig.subplots()
    ax.plot(fps_itp, sens_itp, color="tab:blue", lw=2, label=f"{label} (CPM {result.cpm:.3f})")
    ax.plot(
        result.fp_rates,
        result.sensitivities,
        "o",
        color="tab:blue",
        ms=4,
        label=f"{result.reading} reading",
    )
    bs = result.bootstrap
    if bs is not None and bs.grid is not None:
        ax.plot(bs.grid, bs.grid_mean, color="tab:blue", ls="--", lw=1, label="bootstrap mean")
        ax.fill_between(
            bs.grid,
            bs.grid_lower,
            bs.grid_upper,
            color="tab:blue",
            alpha=0.15,
            label=f"{int(round(bs.confidence * 100))}% CI ({bs.n_samples} samples)",
        )
    ax.set_xscale("log", base=2)
    ax.set_xlim(FP_RATES[0], FP_RATES[-1])
    ax.set_ylim(0.0, 1.0)
    ax.xaxis.set_major_locator(FixedLocator(list(FP_RATES)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels(["1/8", "1/4", "1/2", "1", "2", "4", "8"])
    ax.set_yticks(np.arange(0.0, 1.01, 0.1))
    ax.set_xlabel("Average number of false positives per scan")
    ax.set_ylabel("Sensitivity")
    ax.set_title("FROC")
    ax.grid(True, which="both", alpha=0.4)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path


def plot_confusion_matrix(
    matrix: np.ndarray, path: str | Path, class_names: Sequence[str] | None = None, dpi: int = 150
) -> Path:
    """Confusion matrix (rows: truth, columns: prediction) with counts and row percentages."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    matrix = np.asarray(matrix)
    n = matrix.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    fig = Figure(figsize=(1.2 * n + 2.5, 1.2 * n + 2.0))
    ax = fig.subplots()
    ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                f"{matrix[i, j]}\n{share[i, j]:.0%}",
                ha="center",
                va="center",
                color="white" if share[i, j] > 0.5 else "black",
                fontsize=8,
            )
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path
