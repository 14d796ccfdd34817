"""Parameters and FLOPs of GLANCE per component, next to the paper's complexity analysis.

The paper ("Computational complexity and efficiency") gives no absolute parameter or FLOP counts; it gives
per-component cost formulas and two claims. This module measures our model and sets it against both:

* **Measured**: ``common.complexity.count_flops`` (torch's ``FlopCounterMode``) over one forward pass
  (FLOPs = 2 × multiply–accumulates, the counter's convention), parameters by module prefix. Components: Stem, GCT, MRGAM, plain
  conv streams, CSCF, PRD (decoder), heads.
* **Paper formulas** evaluated at our configuration: grouped atrous mixer ``N · 2hw·k²C²/g`` (params
  ``N · k²C²/g``) plus the SE gate ``2C²/r``; attention ``4nd² + 2n·n_kv·d`` plus MLP ``2nd²`` per block;
  CSCF ``2hwC² + 2hwC²/r`` (params ``C² + 2C²/r``); PRD "two 3×3 convs per level with skip concat"
  ``2hw·9·(C_in·C_out + C_out²)``. As printed, the attention formula counts multiply–accumulates and a
  width-1 MLP, and the CSCF formula treats the 1×1 projection as C→C although Z = [F_g ‖ F_l] has 2C
  channels; the report shows the formulas literally so those gaps are visible rather than fitted away.
* **Claims**: CSCF adds < 3–5 % FLOPs per stage (we print CSCF / stage FLOPs for each stage), and the dual
  stream costs "close to a single strong CNN backbone" (we print GLANCE / plain U-Net FLOPs at the same
  widths — the paper's Eq. 2 ratio with our baseline U-Net as ``F_single``).

``report(...)`` is the hook the ``lungseg`` CLI calls; ``python -m lungseg.complexity --help`` runs it
stand-alone, and ``--memory`` measures peak resident memory of training steps in a fresh subprocess.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.complexity import count_flops, count_parameters
from lungseg.models.cscf import ConsensusFusion
from lungseg.models.gct import GCTStage
from lungseg.models.glance import GlanceNet, build_glance
from lungseg.models.mrgam import MRGAMStage

__all__ = [
    "ComplexityReport",
    "ComponentCost",
    "StageCost",
    "format_markdown",
    "main",
    "measure_complexity",
    "measure_training_memory",
    "report",
]

COMPONENTS: tuple[str, ...] = ("Stem", "GCT", "MRGAM", "Conv stream", "CSCF", "PRD", "Heads")


@dataclass
class ComponentCost:
    """Measured and paper-formula cost of one component (``None`` where the paper gives no formula).

    ``scoped_flops`` is our measured FLOPs restricted to what the paper's formula covers (MRGAM mixer
    blocks without the strided entry conv, transformer blocks without patch embedding, …), so it can be
    compared with ``paper_flops`` directly.
    """

    name: str
    params: int
    flops: int
    paper_params: int | None = None
    paper_flops: int | None = None
    scoped_flops: int | None = None


@dataclass
class StageCost:
    """FLOPs of one encoder stage split into streams and fusion."""

    stage: int
    resolution: tuple[int, int]
    width: int
    stream_flops: dict[str, int]
    fusion_flops: int

    @property
    def fusion_share(self) -> float:
        """CSCF FLOPs as a fraction of the stage total (streams + fusion)."""
        total = sum(self.stream_flops.values()) + self.fusion_flops
        return self.fusion_flops / total if total else 0.0


@dataclass
class ComplexityReport:
    """Everything :func:`format_markdown` prints."""

    variant: str
    image_size: int
    components: list[ComponentCost]
    stages: list[StageCost]
    total_params: int
    total_flops: int
    reference_variant: str | None = None
    reference_flops: int | None = None
    reference_encoder_flops: int | None = None
    encoder_flops: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        """Whole-network FLOPs relative to the reference (Eq. 2's F_GLANCE / F_single)."""
        return self.total_flops / self.reference_flops if self.reference_flops else None


def _component_of(name: str) -> str | None:
    """Map a parameter/module path to one of :data:`COMPONENTS` (``None`` if it belongs to none)."""
    parts = name.split(".")
    if parts[0] == "encoder":
        if parts[1] == "stem":
            return "Stem"
        if parts[1] == "fusions":
            return "CSCF"
        if parts[1] == "streams":
            kind = parts[2].split("_")[0]
            return {"gct": "GCT", "mrgam": "MRGAM", "conv": "Conv stream"}[kind]
    if parts[0] == "decoder":
        return "PRD"
    if parts[0] in ("seg_head", "heatmap_head", "aux_heads"):
        return "Heads"
    return None


def _leaf_prefixes(model: GlanceNet) -> dict[str, str]:
    """Module paths whose FLOP counts partition the model, mapped to their component.

    Containers that are only iterated (``ModuleList``/``ModuleDict``) never run ``forward`` and so have no
    FLOP entry of their own; their called children are listed instead.
    """
    enc = model.encoder
    prefixes = {"decoder": "PRD"}
    if enc.stem is not None:
        prefixes["encoder.stem"] = "Stem"
    for k in range(len(enc.widths)):
        prefixes[f"encoder.fusions.{k}"] = "CSCF"
        for name in enc.names:
            prefixes[f"encoder.streams.{name}.{k}"] = _component_of(f"encoder.streams.{name}")
    for head in ("seg_head", "heatmap_head"):
        if getattr(model, head) is not None:
            prefixes[head] = "Heads"
    for i in range(len(model.aux_heads)):
        prefixes[f"aux_heads.{i}"] = "Heads"
    return prefixes


def _paper_estimates(model: GlanceNet, image_size: int) -> dict[str, tuple[int, int]]:
    """Evaluate the paper's cost formulas at our configuration; returns ``{component: (params, flops)}``."""
    est: dict[str, list[int]] = {}
    enc = model.encoder
    for k, width in enumerate(enc.widths):
        side = image_size // (4 * 2**k)
        hw = side * side
        for name, kind in zip(enc.names, enc.kinds):
            stage = enc.streams[name][k]
            if kind == "mrgam" and isinstance(stage, MRGAMStage):
                for block in stage.blocks:
                    n_branch = len(block.branches)
                    groups = block.branches[0].conv.groups
                    conv_params = 9 * width * width // groups
                    se = 2 * width * width // 16
                    acc = est.setdefault("MRGAM", [0, 0])
                    acc[0] += n_branch * conv_params + se
                    acc[1] += n_branch * 2 * hw * conv_params + se
            elif kind == "gct" and isinstance(stage, GCTStage):
                for block in stage.blocks:
                    n, d = hw, width
                    n_kv = n // (block.attn.sr_ratio**2)
                    acc = est.setdefault("GCT", [0, 0])
                    acc[0] += 4 * d * d + 2 * d * d
                    acc[1] += 4 * n * d * d + 2 * n * n_kv * d + 2 * n * d * d
        if isinstance(enc.fusions[k], ConsensusFusion):
            acc = est.setdefault("CSCF", [0, 0])
            acc[0] += width * width + 2 * width * width // 16
            acc[1] += 2 * hw * width * width + 2 * hw * width * width // 16
    for stage, stride in zip(model.decoder.stages, model.decoder_strides):
        side = image_size // stride
        hw = side * side
        conv1 = stage.refine.conv1.conv
        c_in, c_out = conv1.in_channels, conv1.out_channels
        acc = est.setdefault("PRD", [0, 0])
        acc[0] += 9 * (c_in * c_out + c_out * c_out)
        acc[1] += 2 * hw * 9 * (c_in * c_out + c_out * c_out)
    return {k: (v[0], v[1]) for k, v in est.items()}


def _formula_scope_flops(model: GlanceNet, per_module: dict[str, int]) -> dict[str, int]:
    """Measured FLOPs of exactly the parts the paper's formulas describe (see :class:`ComponentCost`)."""
    enc = model.encoder
    scoped: dict[str, int] = {}
    for name, kind in zip(enc.names, enc.kinds):
        if kind not in ("gct", "mrgam"):
            continue
        component = "GCT" if kind == "gct" else "MRGAM"
        for k, stage in enumerate(enc.streams[name]):
            for i in range(len(stage.blocks)):
                scoped[component] = scoped.get(component, 0) + per_module.get(
                    f"encoder.streams.{name}.{k}.blocks.{i}", 0
                )
    if any(isinstance(f, ConsensusFusion) for f in enc.fusions):
        scoped["CSCF"] = sum(per_module.get(f"encoder.fusions.{k}", 0) for k in range(len(enc.widths)))
    scoped["PRD"] = per_module.get("decoder", 0)
    return scoped


def measure_complexity(
    model: GlanceNet,
    image_size: int = 512,
    variant: str = "custom",
    reference: GlanceNet | None = None,
    reference_variant: str | None = None,
) -> ComplexityReport:
    """Measure parameters and FLOPs of ``model`` per component and per encoder stage.

    Args:
        model: The network (any variant).
        image_size: Square input side (multiple of 32); FLOPs are per image (batch 1).
        variant: Name printed in the report.
        reference: Optional single-stream network to compute the Eq. 2 ratio against.
        reference_variant: Its name.
    """
    x = torch.zeros(1, model.in_channels, image_size, image_size)
    counted = count_flops(model, x)
    total_flops, per_module = counted.total, counted.by_module

    params = dict.fromkeys(COMPONENTS, 0)
    for name, p in model.named_parameters():
        component = _component_of(name)
        if component is None:
            raise RuntimeError(f"Parameter {name} belongs to no complexity component; extend _component_of.")
        params[component] += p.numel()
    flops = dict.fromkeys(COMPONENTS, 0)
    for prefix, component in _leaf_prefixes(model).items():
        flops[component] += per_module.get(prefix, 0)
    unattributed = total_flops - sum(flops.values())

    paper = _paper_estimates(model, image_size)
    scoped = _formula_scope_flops(model, per_module)
    components = [
        ComponentCost(c, params[c], flops[c], *paper.get(c, (None, None)), scoped.get(c))
        for c in COMPONENTS
        if params[c] or flops[c]
    ]

    enc = model.encoder
    stages = []
    for k, width in enumerate(enc.widths):
        side = image_size // (4 * 2**k)
        stream_flops = {name: per_module.get(f"encoder.streams.{name}.{k}", 0) for name in enc.names}
        stages.append(
            StageCost(k + 1, (side, side), width, stream_flops, per_module.get(f"encoder.fusions.{k}", 0))
        )

    encoder_flops = per_module.get("encoder", 0)
    result = ComplexityReport(
        variant=variant,
        image_size=image_size,
        components=components,
        stages=stages,
        total_params=count_parameters(model),
        total_flops=total_flops,
        encoder_flops=encoder_flops,
    )
    if unattributed:
        result.notes.append(f"{unattributed / 1e9:.3f} GFLOPs outside the listed components.")
    if reference is not None:
        ref_counted = count_flops(reference, x)
        ref_total, ref_modules = ref_counted.total, ref_counted.by_module
        result.reference_variant = reference_variant or type(reference).__name__
        result.reference_flops = ref_total
        result.reference_encoder_flops = ref_modules.get("encoder", 0)
    return result


def _fmt_m(value: int | None) -> str:
    return "—" if value is None else f"{value / 1e6:.3f}"


def _fmt_g(value: int | None) -> str:
    return "—" if value is None else f"{value / 1e9:.2f}"


def format_markdown(rep: ComplexityReport) -> str:
    """Render a :class:`ComplexityReport` as markdown tables."""
    lines = [
        f"### GLANCE complexity — variant `{rep.variant}`, input {rep.image_size}×{rep.image_size}, batch 1",
        "",
        "| component | params (M) | GFLOPs | share of FLOPs | paper-formula params (M) "
        "| GFLOPs in formula scope | paper-formula GFLOPs |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in rep.components:
        share = c.flops / rep.total_flops if rep.total_flops else 0.0
        lines.append(
            f"| {c.name} | {_fmt_m(c.params)} | {_fmt_g(c.flops)} | {share:.1%} | {_fmt_m(c.paper_params)} "
            f"| {_fmt_g(c.scoped_flops)} | {_fmt_g(c.paper_flops)} |"
        )
    lines.append(
        f"| **total** | **{_fmt_m(rep.total_params)}** | **{_fmt_g(rep.total_flops)}** | 100% | | | |"
    )
    lines += [
        "",
        "| stage | grid | width | " + " | ".join(f"{n} GFLOPs" for n in rep.stages[0].stream_flops)
        + " | fusion GFLOPs | fusion share of stage |",
        "|---|---|---:|" + "---:|" * (len(rep.stages[0].stream_flops) + 2),
    ]  # fmt: skip
    for s in rep.stages:
        streams = " | ".join(_fmt_g(v) for v in s.stream_flops.values())
        lines.append(
            f"| {s.stage} | {s.resolution[0]}×{s.resolution[1]} | {s.width} | {streams} | {_fmt_g(s.fusion_flops)} "
            f"| {s.fusion_share:.1%} |"
        )
    lines.append("")
    lines.append("Paper claim: CSCF adds < 3–5 % FLOPs per stage (column *fusion share of stage*).")
    if rep.reference_flops:
        enc_ratio = (
            rep.encoder_flops / rep.reference_encoder_flops if rep.reference_encoder_flops else float("nan")
        )
        lines.append(
            f"Eq. 2 ratio F_GLANCE / F_single with `{rep.reference_variant}` as the single stream: "
            f"{rep.ratio:.2f}× for the whole network ({_fmt_g(rep.total_flops)} vs "
            f"{_fmt_g(rep.reference_flops)} GFLOPs), {enc_ratio:.2f}× for the encoder alone."
        )
    lines += [f"Note: {n}" for n in rep.notes]
    return "\n".join(lines) + "\n"


def report(
    variant: str = "full",
    image_size: int = 512,
    reference_variant: str | None = "plain_unet",
    output: str | Path | None = None,
    **overrides: Any,
) -> str:
    """Build ``variant`` (with ``overrides``), measure it and return the markdown report.

    Args:
        variant: Preset name from :mod:`lungseg.models.variants`.
        image_size: Square input side (multiple of 32).
        reference_variant: Single-stream preset for the Eq. 2 ratio; ``None`` skips it.
        output: Optional path; the markdown is also written there.
        **overrides: ``GlanceNet`` keyword overrides applied to both networks (e.g. ``widths``).
    """
    model = build_glance(variant, **overrides)
    reference = build_glance(reference_variant, **overrides) if reference_variant else None
    text = format_markdown(
        measure_complexity(
            model, image_size, variant, reference=reference, reference_variant=reference_variant
        )
    )
    if output is not None:
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return text


def _training_steps(spec: dict[str, Any]) -> dict[str, Any]:
    """Body of the memory probe; runs inside a fresh interpreter (see :func:`measure_training_memory`)."""
    from lungseg.losses import GlanceLoss, gaussian_center_heatmap

    torch.manual_seed(0)
    torch.set_num_threads(spec["threads"])
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = build_glance(spec["variant"], gradient_checkpointing=spec["checkpointing"], **spec["overrides"])
    loss_fn = GlanceLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    size, batch = spec["image_size"], spec["batch_size"]
    x = torch.rand(batch, model.in_channels, size, size)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    mask = (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size / 16) ** 2).float()
    heat = torch.from_numpy(gaussian_center_heatmap((size, size), [(size / 2, size / 2)], [size / 8]))
    targets = {"mask": mask.expand(batch, 1, size, size), "heatmap": heat.expand(batch, 1, size, size)}
    losses = []
    for _ in range(spec["steps"]):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), targets)["loss"]
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"baseline_rss_gib": baseline_kib / 2**20, "peak_rss_gib": peak_kib / 2**20, "losses": losses}


def measure_training_memory(
    variant: str = "full",
    image_size: int = 512,
    batch_size: int = 8,
    steps: int = 1,
    gradient_checkpointing: bool = False,
    threads: int = 2,
    **overrides: Any,
) -> dict[str, Any]:
    """Peak resident memory (CPU) of ``steps`` AdamW training steps, measured in a fresh subprocess.

    ``ru_maxrss`` is a process-lifetime maximum, so the probe runs in its own interpreter to measure only
    this model; the result includes the interpreter and torch import (reported as ``baseline_rss_gib``).
    """
    spec = {
        "variant": variant,
        "image_size": image_size,
        "batch_size": batch_size,
        "steps": steps,
        "checkpointing": gradient_checkpointing,
        "threads": threads,
        "overrides": overrides,
    }
    code = (
        "import json, sys; from lungseg.complexity import _training_steps; "
        "print(json.dumps(_training_steps(json.loads(sys.argv[1]))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"Memory probe failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(spec)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: ``python -m lungseg.complexity [--variant full] [--size 512] [--memory]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="full", help="preset name (lungseg.models.variants)")
    parser.add_argument("--size", type=int, default=512, help="square input size, multiple of 32")
    parser.add_argument(
        "--reference", default="plain_unet", help="single-stream preset for Eq. 2; 'none' skips"
    )
    parser.add_argument("--widths", type=int, nargs="+", help="override stage widths")
    parser.add_argument("--output", help="also write the markdown here")
    parser.add_argument("--memory", action="store_true", help="measure peak RSS of training steps instead")
    parser.add_argument("--batch", type=int, default=8, help="batch size for --memory")
    parser.add_argument("--steps", type=int, default=1, help="training steps for --memory")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing for --memory")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads for --memory")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.widths:
        overrides["widths"] = tuple(args.widths)
    if args.memory:
        result = measure_training_memory(
            args.variant, args.size, args.batch, args.steps, args.checkpointing, args.threads, **overrides
        )
        print(json.dumps(result, indent=2))
        return 0
    reference = None if args.reference.lower() == "none" else args.reference
    print(report(args.variant, args.size, reference, args.output, **overrides), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
