"""Parameters, MACs and FLOPs of M³Net per branch (paper Table 7), counted by `common.complexity`.

Convention (`common.complexity`, torch's FlopCounterMode): matrix multiplications, convolutions and
attention products count as FLOPs = 2 × multiply-accumulates. Normalisation, activations, pooling and
resizing are not counted (they are a small fraction here). MACs below are FLOPs / 2.

The paper's "20.079 GFLOPs" is a MAC count (thop's `profile`, which counts multiply-accumulates) of the
released code's model with all three branches given a 32×32×56 patch; at the real input sizes (32/64/96
in-plane × 56 slices) the same network needs ≈ 43 GMACs. `REFERENCE_PROFILE_SIZES` reproduces that
profiling setting; docs/lungcls.md has the full reconciliation.

Counting runs one forward pass. Build the model on the meta device and nothing is computed or allocated::

    with torch.device("meta"):
        model = create_m3net("paper")
    print(format_complexity_table(measure_complexity(model)))

or from the shell: `python -m lungcls.complexity --preset paper`.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from common.complexity import count_flops, count_parameters
from lungcls.models.m3net import M3NET_PRESETS, TOKEN_MODES, M3Net, create_m3net

__all__ = [
    "PAPER_INPUT_SIZES",
    "PAPER_TABLE7",
    "REFERENCE_PROFILE_SIZES",
    "ComplexityRow",
    "format_complexity_table",
    "main",
    "m3net_complexity",
    "measure_complexity",
]

#: scale → (slices, y, x) of the nested patches the paper feeds (eq. 1).
PAPER_INPUT_SIZES: dict[int, tuple[int, int, int]] = {32: (56, 32, 32), 64: (56, 64, 64), 96: (56, 96, 96)}
#: how the paper's Table 7 number was profiled: every branch given the 32×32×56 patch.
REFERENCE_PROFILE_SIZES: dict[int, tuple[int, int, int]] = {s: (56, 32, 32) for s in (32, 64, 96)}
#: M³Net's row of paper Table 7.
PAPER_TABLE7 = {"gflops_reported": 20.079, "params_m": 184.608, "accuracy": 86.96}


@dataclass(frozen=True)
class ComplexityRow:
    """One line of the complexity table.

    Attributes:
        part: "branch 32", …, "projections", "fusion + head" or "total".
        module: what the part is (backbone name, token mode).
        input_shape: `(slices, y, x)` patch the part was fed (branches only).
        params: parameter count.
        macs: multiply-accumulates for one sample.
        flops: FLOPs for one sample (2 × MACs for the counted operations).
    """

    part: str
    module: str
    input_shape: tuple[int, int, int] | None
    params: int
    macs: int
    flops: int


def measure_complexity(
    model: M3Net, input_sizes: Mapping[int, Sequence[int]] | None = None, batch_size: int = 1
) -> list[ComplexityRow]:
    """Count parameters, MACs and FLOPs per branch, for the projections, the fusion head and in total.

    Args:
        model: the network (any device; on "meta" nothing is computed).
        input_sizes: scale → `(slices, y, x)` patch size (default `PAPER_INPUT_SIZES`).
        batch_size: samples in the counted forward pass; counts are reported per sample.

    Returns:
        One row per branch (smallest scale first), then "projections", "fusion + head", "total".
    """
    sizes = {int(k): tuple(int(d) for d in v) for k, v in (input_sizes or PAPER_INPUT_SIZES).items()}
    missing = [s for s in model.scales if s not in sizes]
    if missing:
        raise ValueError(
            f"no input size for scale(s) {missing}; give (slices, y, x) for each of {model.scales}"
        )
    if any(len(sizes[s]) != 3 for s in model.scales):
        raise ValueError(f"input sizes must be (slices, y, x) triples, got {sizes}")
    device = next(model.parameters()).device
    patches = {s: torch.zeros(batch_size, 1, *sizes[s], device=device) for s in model.scales}
    counts = count_flops(model, patches)
    rows: list[ComplexityRow] = []
    for s in model.scales:
        backbone = model.branch(s).backbone
        flops = counts.under(f"branches.{s}") // batch_size
        kind = f"{getattr(backbone, 'name', type(backbone).__name__)} ({backbone.spatial_dims}D)"
        rows.append(
            ComplexityRow(f"branch {s}", kind, sizes[s], count_parameters(model.branch(s)), flops // 2, flops)
        )
    # ModuleDicts are never called themselves, so their children carry the counts.
    proj_flops = sum(counts.under(f"projections.{s}") for s in model.scales) // batch_size
    rows.append(
        ComplexityRow(
            "projections",
            f"W_s, b_s ({model.token_mode})",
            None,
            count_parameters(model.projections),
            proj_flops // 2,
            proj_flops,
        )
    )
    head_flops = sum(counts.under(name) for name in ("fusion", "norm", "head")) // batch_size
    head_params = sum(count_parameters(m) for m in (model.fusion, model.norm, model.head))
    rows.append(
        ComplexityRow(
            "fusion + head",
            "cross-attention, transformer, MLP",
            None,
            head_params,
            head_flops // 2,
            head_flops,
        )
    )
    total = counts.total // batch_size
    rows.append(ComplexityRow("total", "M3Net", None, count_parameters(model), total // 2, total))
    return rows


def format_complexity_table(rows: Sequence[ComplexityRow]) -> str:
    """Render rows as a markdown table (parameters in millions, MACs and FLOPs in 10⁹)."""
    lines = [
        "| part | module | input (z×y×x) | params (M) | GMACs | GFLOPs |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        shape = "×".join(str(d) for d in r.input_shape) if r.input_shape else ""
        lines.append(
            f"| {r.part} | {r.module} | {shape} | {r.params / 1e6:.3f} | {r.macs / 1e9:.3f} | {r.flops / 1e9:.3f} |"
        )
    return "\n".join(lines)


def m3net_complexity(preset: str = "paper", token_mode: str = "spatial") -> dict[str, float]:
    """Parameters and MAC/FLOP counts of an M³Net preset, built on the meta device (seconds, no memory).

    A table part `{function: 'lungcls.complexity:m3net_complexity'}` (M³Net Table 7) calls it once and
    stores the result as a run version (stage "compute"), so `--from-runs` reads it like any run.

    Two input-size sets: "reference" feeds every branch the 32×32×56 patch, which is how the paper's
    profiler produced its 20.079 "GFLOPs" (thop multiply-accumulates); "paper_sizes" feeds each branch its
    real crop (32, 64, 96 in-plane × 56 slices). docs/lungcls.md explains the gap.

    Returns:
        `complexity/params_m` (millions), `complexity/gmacs_reference`, `complexity/gflops_reference`,
        `complexity/gmacs_paper_sizes`, `complexity/gflops_paper_sizes` (10⁹ per sample).
    """
    with torch.device("meta"):
        model = create_m3net(preset, token_mode=token_mode)
    out: dict[str, float] = {}
    for label, sizes in (("reference", REFERENCE_PROFILE_SIZES), ("paper_sizes", PAPER_INPUT_SIZES)):
        total = measure_complexity(model, sizes)[-1]
        out["complexity/params_m"] = total.params / 1e6
        out[f"complexity/gmacs_{label}"] = total.macs / 1e9
        out[f"complexity/gflops_{label}"] = total.flops / 1e9
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Print the complexity table of a preset at the paper's input sizes (and optionally the reference's)."""
    parser = argparse.ArgumentParser(prog="python -m lungcls.complexity", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper", choices=sorted(M3NET_PRESETS))
    parser.add_argument("--token-mode", default="spatial", choices=TOKEN_MODES)
    parser.add_argument(
        "--sizes",
        default="paper",
        choices=("paper", "reference"),
        help="paper: 32/64/96 in-plane × 56 slices; reference: every branch at 32×32×56 (how Table 7 was profiled)",
    )
    args = parser.parse_args(argv)
    with torch.device("meta"):
        model = create_m3net(args.preset, token_mode=args.token_mode)
    sizes = PAPER_INPUT_SIZES if args.sizes == "paper" else REFERENCE_PROFILE_SIZES
    rows = measure_complexity(model, sizes)
    print(f"M³Net preset {args.preset!r}, token mode {args.token_mode!r}, input sizes {args.sizes!r}")
    print(format_complexity_table(rows))
    total = rows[-1]
    print(
        f"\npaper Table 7: {PAPER_TABLE7['params_m']} M parameters, {PAPER_TABLE7['gflops_reported']} "
        f"'GFLOPs' (thop MACs, every branch at 32×32×56); here: {total.params / 1e6:.3f} M, "
        f"{total.macs / 1e9:.3f} GMACs = {total.flops / 1e9:.3f} GFLOPs"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
