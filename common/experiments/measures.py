"""Deterministic measurements a table can show beside trained runs (table parts with `function:`).

These count, they do not train: a table part `{function: common.experiments.measures:m3net_complexity}` is
called once and its result stored as a run version (stage "compute"), so `--from-runs` reads it like any
run. The package is imported only when the function is called.
"""

from __future__ import annotations


def m3net_complexity(preset: str = "paper", token_mode: str = "spatial") -> dict[str, float]:
    """Parameters and MAC/FLOP counts of an M³Net preset, built on the meta device (seconds, no memory).

    Two input-size sets: "reference" feeds every branch the 32×32×56 patch, which is how the paper's
    profiler produced its 20.079 "GFLOPs" (thop multiply-accumulates); "paper_sizes" feeds each branch its
    real crop (32, 64, 96 in-plane × 56 slices). docs/lungcls.md explains the gap.

    Returns:
        `complexity/params_m` (millions), `complexity/gmacs_reference`, `complexity/gflops_reference`,
        `complexity/gmacs_paper_sizes`, `complexity/gflops_paper_sizes` (10⁹ per sample).
    """
    import torch

    from lungcls.complexity import PAPER_INPUT_SIZES, REFERENCE_PROFILE_SIZES, measure_complexity
    from lungcls.models import create_m3net

    with torch.device("meta"):
        model = create_m3net(preset, token_mode=token_mode)
    out: dict[str, float] = {}
    for label, sizes in (("reference", REFERENCE_PROFILE_SIZES), ("paper_sizes", PAPER_INPUT_SIZES)):
        total = measure_complexity(model, sizes)[-1]
        out["complexity/params_m"] = total.params / 1e6
        out[f"complexity/gmacs_{label}"] = total.macs / 1e9
        out[f"complexity/gflops_{label}"] = total.flops / 1e9
    return out


__all__ = ["m3net_complexity"]
