"""Exported networks (``lungcad.export``) as drop-in modules for the inference code.

Each class stands in for the torch network the pipeline already calls, with the same call and the same
attributes, so ``lungdet.inference``, ``lungseg.inference`` and ``lungcad.pipeline`` run unchanged on
onnxruntime (one code path, two runtimes):

- ``OnnxCandidateNet`` — ``forward(x, coords)``, ``stride``, ``num_anchors``, ``anchor_sizes``,
  ``use_coords`` (what ``stitched_prediction`` / ``detect_scan`` read);
- ``OnnxMPPN`` — ``forward(large, medium=None, small=None)``, ``crop_sizes``, ``num_classes``,
  ``nodule_probability`` (what ``score_candidates`` reads; ensembles average their members);
- ``OnnxGlance`` — ``forward(x) -> {"seg", "heatmap"}`` (what ``slice_probabilities`` reads);
- ``OnnxM3Net`` — ``forward(patches) -> .logits`` (what the pipeline's malignancy step reads).

The attributes come from the exported file itself (its metadata), so a module needs nothing but the path.
Inputs are moved to the CPU as float32 for onnxruntime and the outputs are returned on the input's device.
Each module holds one empty parameter so that ``next(model.parameters()).device`` works as for the torch
networks. ``use_exported_models(bundle, folder)`` swaps a loaded bundle's networks for the exported ones
after checking that the export was made from this very bundle.

A model written as TorchScript (the exporter's fallback for an operator without ONNX form) is run by
``torch.jit.load`` behind the same interface.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "ExportedRunner",
    "OnnxCandidateNet",
    "OnnxGlance",
    "OnnxM3Net",
    "OnnxMPPN",
    "load_exported",
    "use_exported_models",
]


class ExportedRunner:
    """One exported file (ONNX through onnxruntime's CPU provider, or TorchScript), run on named tensors."""

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        from lungcad.export import META_KEY

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} does not exist; run `lungcad export --bundle B` first")
        if self.path.suffix == ".pt":
            extra = {f"{META_KEY}.json": ""}
            self._script = torch.jit.load(str(self.path), map_location="cpu", _extra_files=extra)
            self._session = None
            self.attributes = json.loads(extra[f"{META_KEY}.json"] or "{}")
            return
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        self._session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self._script = None
        meta = self._session.get_modelmeta().custom_metadata_map
        self.attributes = json.loads(meta.get(META_KEY, "{}"))
        self.input_names = [i.name for i in self._session.get_inputs()]

    def run(self, feeds: Mapping[str, Tensor]) -> list[Tensor]:
        """Outputs in export order, float32, on the device of the first input."""
        device = next(iter(feeds.values())).device
        cpu = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in feeds.items()}
        if self._script is not None:
            with torch.no_grad():
                out = self._script(*cpu.values())
            outs = list(out) if isinstance(out, tuple | list) else [out]
        else:
            arrays = self._session.run(None, {k: v.numpy() for k, v in cpu.items() if k in self.input_names})
            outs = [torch.from_numpy(a) for a in arrays]
        return [o.to(device) for o in outs]


class _ExportedModule(nn.Module):
    """Base: the runner, its attributes, and an empty parameter that tells callers the device.

    ``exported = True`` tells the inference code (``lungdet.inference``'s engines) to run it as it is.
    """

    exported = True

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        super().__init__()
        self.runner = ExportedRunner(path, threads=threads)
        self.attributes = self.runner.attributes
        self.device_anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

    def extra_repr(self) -> str:
        return f"path={self.runner.path}"


class OnnxCandidateNet(_ExportedModule):
    """CLAF stage 1 on onnxruntime; ``forward(x, coords)`` → (B, D/4, H/4, W/4, A, 5) like ``CandidateNet``."""

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        super().__init__(path, threads=threads)
        a = self.attributes
        self.stride = int(a["stride"])
        self.num_anchors = int(a["num_anchors"])
        self.anchor_sizes = tuple(float(s) for s in a["anchor_sizes"])
        self.use_coords = bool(a["use_coords"])

    def forward(self, x: Tensor, coords: Tensor | None = None) -> Tensor:
        if self.use_coords and coords is None:
            raise ValueError("this stage-1 network was exported with coordinate maps: pass coords")
        feeds = {"image": x, "coords": coords} if self.use_coords else {"image": x}
        return self.runner.run(feeds)[0]


class OnnxMPPN(_ExportedModule):
    """MPPN (or ensemble) on onnxruntime: logits from the three concentric crops, P(nodule) from logits."""

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        super().__init__(path, threads=threads)
        a = self.attributes
        self.crop_sizes = tuple(tuple(int(v) for v in s) for s in a["crop_sizes"])
        self.num_classes = int(a["num_classes"])
        self.members = int(a["members"])

    def forward(self, large: Tensor, medium: Tensor | None = None, small: Tensor | None = None) -> Tensor:
        from lungdet.models import centre_crop

        if large.ndim != 5 or tuple(large.shape[-3:]) != self.crop_sizes[0]:
            raise ValueError(
                f"MPPN expects large crops (B, C, {self.crop_sizes[0]}), got {tuple(large.shape)}"
            )
        medium = centre_crop(large, self.crop_sizes[1]) if medium is None else medium
        small = centre_crop(large, self.crop_sizes[2]) if small is None else small
        return self.runner.run({"large": large, "medium": medium, "small": small})[0]

    def nodule_probability(self, logits: Tensor) -> Tensor:
        """The torch networks' own rule: ``MPPN.nodule_probability``, averaged over ensemble members."""
        from lungdet.models import MPPN

        if self.members > 1:
            return torch.stack(
                [MPPN.nodule_probability(self, logits[:, k]) for k in range(logits.shape[1])]  # type: ignore[arg-type]
            ).mean(0)
        return MPPN.nodule_probability(self, logits)  # type: ignore[arg-type]


class OnnxGlance(_ExportedModule):
    """GLANCE on onnxruntime: ``forward(x)`` → ``{"seg": …, "heatmap": …}`` logits (the exported heads)."""

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        super().__init__(path, threads=threads)
        self.heads = tuple(self.attributes["heads"])
        self.in_channels = int(self.attributes["in_channels"])
        self.image_size = int(self.attributes["image_size"])

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(
                f"exported GLANCE takes (B, {self.in_channels}, {self.image_size}, {self.image_size}) slices, "
                f"got {tuple(x.shape)}"
            )
        return dict(zip(self.heads, self.runner.run({"image": x})))


@dataclass
class OnnxM3NetOutput:
    """The part of ``M3NetOutput`` inference reads."""

    logits: Tensor


class OnnxM3Net(_ExportedModule):
    """M³Net on onnxruntime: ``forward({scale: patch})`` → an output with ``.logits``."""

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        super().__init__(path, threads=threads)
        self.scales = tuple(int(s) for s in self.attributes["scales"])
        self.num_classes = int(self.attributes["num_classes"])

    def forward(self, patches: Mapping[int | str, Tensor]) -> OnnxM3NetOutput:
        by_scale = {int(k): v for k, v in patches.items()}
        missing = [s for s in self.scales if s not in by_scale]
        if missing:
            raise KeyError(f"M³Net needs patches for scales {list(self.scales)}; missing {missing}")
        return OnnxM3NetOutput(self.runner.run({f"patch_{s}": by_scale[s] for s in self.scales})[0])


MODULES: dict[str, type[_ExportedModule]] = {
    "stage1": OnnxCandidateNet,
    "mppn": OnnxMPPN,
    "seg": OnnxGlance,
    "cls": OnnxM3Net,
}


def read_export(folder: str | Path) -> dict[str, Any]:
    """``export.json`` of an export folder (one-line errors naming the file and the fix)."""
    from lungcad.export import EXPORT_FILE

    path = Path(folder) / EXPORT_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; run `lungcad export --bundle B --format onnx --out {folder}`"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def load_exported(
    folder: str | Path, kinds: Sequence[str] | None = None, *, threads: int | None = None
) -> dict[str, nn.Module]:
    """The exported modules of a folder written by ``lungcad export`` (all four by default)."""
    from common.cache import sha256_file

    folder = Path(folder)
    document = read_export(folder)
    out = {}
    for kind in kinds or tuple(MODULES):
        entry = document["models"].get(kind)
        if entry is None:
            raise ValueError(f"{folder / 'export.json'}: no model {kind!r}; re-run `lungcad export`")
        path = folder / entry["file"]
        if path.is_file() and sha256_file(path) != entry["sha256"]:
            raise ValueError(f"{path}: sha256 differs from export.json; re-run `lungcad export`")
        out[kind] = MODULES[kind](path, threads=threads).eval()
    return out


def use_exported_models(bundle: Any, folder: str | Path, *, threads: int | None = None) -> Any:
    """Replace the networks of a loaded bundle's tasks by the exported ones (same bundle, checked)."""
    document = read_export(folder)
    if document.get("bundle", {}).get("sha256") != bundle.sha256:
        raise ValueError(
            f"{Path(folder) / 'export.json'} was exported from another bundle (bundle.json sha256 "
            f"{str(document.get('bundle', {}).get('sha256'))[:12]}…, this one {bundle.sha256[:12]}…); "
            f"re-run `lungcad export --bundle {bundle.path}`"
        )
    for kind, module in load_exported(folder, threads=threads).items():
        bundle.models[kind].task.model = module
    return bundle
