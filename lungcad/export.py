"""ONNX export of the four inference networks, with a parity check against eager PyTorch.

What is exported is each network exactly as the inference code calls it (SPEC §10, issue 23 item 2):

============  =====================================================  ==========================================
model         inputs (float32)                                       dynamic axes
============  =====================================================  ==========================================
stage1        ``image`` (B, C, D, H, W), ``coords`` (B, 3, D, H, W)   batch and D, H, W (any multiple of 32)
              — one sliding-window block and its coordinate maps,
              as ``lungdet.inference.stitched_prediction`` calls it
mppn          ``large`` / ``medium`` / ``small``: the three           batch (the crop sizes are the network's)
              concentric crops (``MPPN.forward``); ensembles give
              (B, K, classes) member logits
seg           ``image`` (B, C, H, W) 2.5D slice stacks                batch only: the GCT stages resize their
              (``lungseg.inference.slice_probabilities``)            positional embeddings with a Python shape
                                                                     test, which tracing freezes at image_size
cls           ``patch_<scale>`` (B, 1, Z, s, s) per scale            batch only (patch sizes are the bundle's)
============  =====================================================  ==========================================

Opset 20: MPPN's top-down injection samples features with a 5-D ``affine_grid`` + ``grid_sample``, which
ONNX has only from opset 20 on (AffineGrid is new in 20; GridSample of opset 16–19 takes 4-D input only). A network whose operator has no ONNX
form at the requested opset is written as TorchScript (``torch.jit.trace``) instead and recorded so in
``export.json`` (``fallback="torchscript"``); at opset 20 none needs it.

Every export is checked at once: random inputs of a batch other than the traced one go through the eager
network and through onnxruntime, and the largest absolute difference of every output must stay within
``tolerance`` (1e-4) or the export is refused. The eager networks are never modified: each is deep-copied
and put in eval mode first (the TorchScript-based exporter otherwise traces in the caller's mode, and a
wrapper built in training mode would update BatchNorm statistics during the trace).
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from common import atomic
from common.cache import sha256_file

log = logging.getLogger(__name__)

__all__ = [
    "EXPORT_FILE",
    "KINDS",
    "META_KEY",
    "OPSET",
    "TOLERANCE",
    "NetSpec",
    "candidate_spec",
    "export_bundle",
    "export_network",
    "glance_spec",
    "m3net_spec",
    "mppn_spec",
    "parity",
]

#: ONNX opset (20: GridSample on 5-D input, used by the MPPN).
OPSET = 20
#: Largest allowed |eager − exported| of any output in fp32.
TOLERANCE = 1e-4
#: The model-metadata key holding the attributes the runtime modules expose (stride, crop sizes, …).
META_KEY = "lungcad"
EXPORT_FILE = "export.json"
KINDS = ("stage1", "mppn", "seg", "cls")
EXPORT_SCHEMA = "1.0"


# ------------------------------------------------------------------------------------------ wrappers
# Tensor-in, tensor-out views of the networks (the exporter takes neither dicts of outputs nor None inputs).


class _CandidateWrapper(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: Tensor, coords: Tensor | None = None) -> Tensor:
        return self.net(image, coords) if coords is not None else self.net(image)


class _MPPNWrapper(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, large: Tensor, medium: Tensor, small: Tensor) -> Tensor:
        return self.net(large, medium, small)


class _GlanceWrapper(nn.Module):
    def __init__(self, net: nn.Module, heads: Sequence[str]) -> None:
        super().__init__()
        self.net, self.heads = net, tuple(heads)

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        out = self.net(image)
        return tuple(out[k] for k in self.heads)


class _M3NetWrapper(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, *patches: Tensor) -> Tensor:
        return self.net(dict(zip(self.net.scales, patches))).logits


# ------------------------------------------------------------------------------------------ specs


@dataclass
class NetSpec:
    """How one network is exported: its tensor-only wrapper, named inputs/outputs, axes and attributes.

    ``make_inputs(batch, generator)`` draws valid random inputs (coordinate maps of a random block position
    for stage 1, images in [0, 1]); ``attributes`` are what the runtime module needs to stand in for the
    network (``lungcad.runtime``) and are stored in the ONNX file's metadata under ``META_KEY``.
    """

    kind: str
    module: nn.Module
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]
    make_inputs: Callable[[int, torch.Generator], tuple[Tensor, ...]]
    attributes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # The exporter traces in the module's own mode; a wrapper is built in training mode.
        self.module.eval().requires_grad_(False)


def _frozen(net: nn.Module) -> nn.Module:
    return copy.deepcopy(net).cpu().float().eval().requires_grad_(False)


def _first_conv_channels(net: nn.Module) -> int:
    conv = next(m for m in net.modules() if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d))
    return int(conv.in_channels)


def candidate_spec(net: nn.Module, block: int = 64) -> NetSpec:
    """Stage 1 (``CandidateNet``) on one ``block``³ window with its coordinate maps (D, H, W dynamic)."""
    from lungdet.models import coordinate_maps

    if block % 32:
        raise ValueError(f"stage-1 export block must be a multiple of 32, got {block}")
    net = _frozen(net)
    channels = _first_conv_channels(net)
    use_coords = bool(net.use_coords)

    def make_inputs(batch: int, gen: torch.Generator) -> tuple[Tensor, ...]:
        image = torch.rand(batch, channels, block, block, block, generator=gen)
        if not use_coords:
            return (image,)
        scan = torch.tensor([4 * block, 3 * block, 3 * block])
        starts = torch.randint(0, 2 * block, (batch, 3), generator=gen).double()
        return image, coordinate_maps(starts, (block,) * 3, scan)

    spatial = {0: "batch", 2: "depth", 3: "height", 4: "width"}
    names = ("image", "coords") if use_coords else ("image",)
    axes = {n: dict(spatial) for n in names}
    axes["prediction"] = {0: "batch", 1: "depth_out", 2: "height_out", 3: "width_out"}
    return NetSpec(
        "stage1",
        _CandidateWrapper(net),
        names,
        ("prediction",),
        axes,
        make_inputs,
        {
            "stride": int(net.stride),
            "num_anchors": int(net.num_anchors),
            "anchor_sizes": [float(s) for s in net.anchor_sizes],
            "use_coords": use_coords,
            "in_channels": channels,
            "size_multiple": 32,
        },
    )


def mppn_spec(net: nn.Module) -> NetSpec:
    """MPPN (or an ``MPPNEnsemble``) on its three concentric crops (batch dynamic)."""
    from lungdet.models import MPPNEnsemble, centre_crop

    net = _frozen(net)
    sizes = tuple(tuple(int(v) for v in s) for s in net.crop_sizes)
    channels = _first_conv_channels(net)
    members = len(net.members) if isinstance(net, MPPNEnsemble) else 1

    def make_inputs(batch: int, gen: torch.Generator) -> tuple[Tensor, ...]:
        large = torch.rand(batch, channels, *sizes[0], generator=gen)
        return large, centre_crop(large, sizes[1]).contiguous(), centre_crop(large, sizes[2]).contiguous()

    names = ("large", "medium", "small")
    return NetSpec(
        "mppn",
        _MPPNWrapper(net),
        names,
        ("logits",),
        {n: {0: "batch"} for n in (*names, "logits")},
        make_inputs,
        {
            "crop_sizes": [list(s) for s in sizes],
            "num_classes": int(net.num_classes),
            "members": members,
            "in_channels": channels,
        },
    )


def glance_spec(net: nn.Module, image_size: int) -> NetSpec:
    """GLANCE on (B, C, image_size, image_size) slice stacks; outputs its heads' logits (no aux heads)."""
    net = _frozen(net)
    if image_size % int(net.size_divisor):
        raise ValueError(f"GLANCE export: image_size {image_size} is not a multiple of {net.size_divisor}")
    heads = tuple(h for h in ("seg", "heatmap") if h in net.heads)
    channels = int(net.in_channels)

    def make_inputs(batch: int, gen: torch.Generator) -> tuple[Tensor, ...]:
        return (torch.rand(batch, channels, image_size, image_size, generator=gen),)

    return NetSpec(
        "seg",
        _GlanceWrapper(net, heads),
        ("image",),
        heads,
        {n: {0: "batch"} for n in ("image", *heads)},
        make_inputs,
        {"heads": list(heads), "in_channels": channels, "image_size": int(image_size)},
    )


def m3net_spec(net: nn.Module, sizes: Mapping[int, int], depth: int) -> NetSpec:
    """M³Net on its nested patches ``patch_<scale>`` (B, 1, depth, s, s), smallest scale first."""
    net = _frozen(net)
    scales = tuple(int(s) for s in net.scales)
    missing = [s for s in scales if s not in sizes]
    if missing:
        raise ValueError(f"M³Net export needs a patch size for scales {missing}")
    shapes = {s: (1, int(depth), int(sizes[s]), int(sizes[s])) for s in scales}

    def make_inputs(batch: int, gen: torch.Generator) -> tuple[Tensor, ...]:
        return tuple(torch.rand(batch, *shapes[s], generator=gen) for s in scales)

    names = tuple(f"patch_{s}" for s in scales)
    return NetSpec(
        "cls",
        _M3NetWrapper(net),
        names,
        ("logits",),
        {n: {0: "batch"} for n in (*names, "logits")},
        make_inputs,
        {
            "scales": list(scales),
            "num_classes": int(net.num_classes),
            "patch_shapes": {str(s): list(shapes[s]) for s in scales},
        },
    )


# ------------------------------------------------------------------------------------------ export


def _write_metadata(path: Path, attributes: Mapping[str, Any]) -> None:
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(attributes, sort_keys=True)
    onnx.checker.check_model(model)
    tmp = path.with_name(f".{path.name}.tmp")
    onnx.save(model, str(tmp))
    tmp.replace(path)


def _shape(tensor: Tensor, axes: Mapping[int, str]) -> list[int | str]:
    return [axes.get(i, int(n)) for i, n in enumerate(tensor.shape)]


def parity(spec: NetSpec, path: Path, *, batch: int = 3, seed: int = 0) -> dict[str, float]:
    """Max |eager − exported| of every output on random inputs of `batch` (fp32)."""
    from lungcad.runtime import ExportedRunner

    gen = torch.Generator().manual_seed(seed)
    inputs = spec.make_inputs(batch, gen)
    with torch.no_grad():
        eager = spec.module(*inputs)
    eager = eager if isinstance(eager, tuple | list) else (eager,)
    got = ExportedRunner(path).run(dict(zip(spec.input_names, inputs)))
    return {
        name: float((g.double() - e.double()).abs().max()) if e.numel() else 0.0
        for name, g, e in zip(spec.output_names, got, eager)
    }


def export_network(
    spec: NetSpec,
    out: str | Path,
    *,
    opset: int = OPSET,
    tolerance: float = TOLERANCE,
    trace_batch: int = 2,
    check_batch: int = 3,
) -> dict[str, Any]:
    """Write `spec` as ONNX (TorchScript where an operator has no ONNX form) and check parity.

    Args:
        spec: from ``candidate_spec`` / ``mppn_spec`` / ``glance_spec`` / ``m3net_spec``.
        out: file path without or with suffix; ``.onnx`` (or ``.pt`` for the TorchScript fallback) is used.
        opset: ONNX opset.
        tolerance: largest allowed |eager − exported| of any output.
        trace_batch: batch of the example inputs the exporter traces.
        check_batch: batch of the parity inputs (≠ trace_batch, so the dynamic batch axis is exercised).

    Returns:
        The model's ``export.json`` entry: file, format, inputs/outputs with shapes (dynamic axes by
        name), attributes, parity.

    Raises:
        ValueError: when an output differs by more than `tolerance`.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    example = spec.make_inputs(trace_batch, torch.Generator().manual_seed(1))
    path = out.with_suffix(".onnx")
    fallback = None
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings on Python shape checks, deprecation notices
            torch.onnx.export(
                spec.module,
                example,
                str(path),
                input_names=list(spec.input_names),
                output_names=list(spec.output_names),
                dynamic_axes=spec.dynamic_axes,
                opset_version=opset,
                dynamo=False,
            )
        _write_metadata(path, spec.attributes)
        fmt = "onnx"
    except torch.onnx.errors.UnsupportedOperatorError as err:
        path.unlink(missing_ok=True)
        fallback = f"torchscript: {str(err).splitlines()[0]}"
        log.warning("%s: no ONNX form at opset %d (%s); writing TorchScript", spec.kind, opset, err)
        path = out.with_suffix(".pt")
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(spec.module, example, check_trace=False)
        traced.save(str(path), _extra_files={f"{META_KEY}.json": json.dumps(spec.attributes)})
        fmt = "torchscript"
    diffs = parity(spec, path, batch=check_batch)
    worst = max(diffs.values(), default=0.0)
    if not worst <= tolerance:
        raise ValueError(
            f"{path}: exported {spec.kind} differs from eager PyTorch by {worst:.3g} (> {tolerance:g}) on "
            f"random inputs; not usable — report the network configuration"
        )
    axes = spec.dynamic_axes
    eager_out = spec.module(*example)
    eager_out = eager_out if isinstance(eager_out, tuple | list) else (eager_out,)
    return {
        "file": path.name,
        "format": fmt,
        "fallback": fallback,
        "sha256": sha256_file(path),
        "inputs": [
            {"name": n, "shape": _shape(t, axes.get(n, {}))} for n, t in zip(spec.input_names, example)
        ],
        "outputs": [
            {"name": n, "shape": _shape(t, axes.get(n, {}))} for n, t in zip(spec.output_names, eager_out)
        ],
        "attributes": spec.attributes,
        "parity": {"batch": check_batch, "max_abs_diff": diffs, "tolerance": tolerance},
    }


def bundle_specs(bundle: Any, *, stage1_block: int = 64) -> dict[str, NetSpec]:
    """The four specs of a loaded ``lungcad.bundle.Bundle`` (shapes from its recorded preprocessing)."""
    models = bundle.models
    seg_pre, cls_pre = models["seg"].preprocessing, models["cls"].preprocessing
    return {
        "stage1": candidate_spec(models["stage1"].task.model, block=stage1_block),
        "mppn": mppn_spec(models["mppn"].task.model),
        "seg": glance_spec(models["seg"].task.model, int(seg_pre["image_size"])),
        "cls": m3net_spec(
            models["cls"].task.model,
            {int(k): int(v) for k, v in cls_pre["sizes"].items()},
            int(cls_pre["depth"]),
        ),
    }


def versions() -> dict[str, str]:
    """Versions of the exporter and runtime packages (recorded in export.json)."""
    out = {"torch": torch.__version__}
    for name in ("onnx", "onnxruntime"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def export_bundle(
    bundle: Any,
    out: str | Path,
    *,
    opset: int = OPSET,
    tolerance: float = TOLERANCE,
    stage1_block: int = 64,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Export the four networks of a loaded bundle to `out` and write ``export.json``.

    Returns:
        The path of export.json.
    """
    say = progress or (lambda line: log.info("%s", line))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    entries = {}
    for kind, spec in bundle_specs(bundle, stage1_block=stage1_block).items():
        say(f"{kind}: exporting")
        entries[kind] = export_network(spec, out / kind, opset=opset, tolerance=tolerance)
        worst = max(entries[kind]["parity"]["max_abs_diff"].values(), default=0.0)
        say(f"{kind}: {entries[kind]['file']} ({entries[kind]['format']}), max |eager − export| {worst:.2e}")
    document = {
        "schema_version": EXPORT_SCHEMA,
        "format": "onnx",
        "opset": opset,
        "versions": versions(),
        "bundle": {"path": str(Path(bundle.path).resolve()), "sha256": bundle.sha256},
        "tolerance": tolerance,
        "models": entries,
    }
    return atomic.write_json(out / EXPORT_FILE, document, indent=2)


def max_parity(document: Mapping[str, Any]) -> float:
    """The largest parity difference over all models of an export.json document."""
    return float(
        np.max([v for m in document["models"].values() for v in m["parity"]["max_abs_diff"].values()])
    )
