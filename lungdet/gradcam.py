"""Grad-CAM of the CLAF stage-1 network (CLAF (Wang et al. 2025), Fig. 8), written as PNG figures.

The candidate net has no class scores, so the score explained is the **objectness logit of one candidate**:
a crop (default 64³) is cut around the candidate from the prepared scan, the net runs on it with the
crop's coordinate channels, and the score is the largest of the A anchor logits in the output cell holding
the candidate centre. MONAI's ``GradCAM`` weights the activations of a target layer (default ``dec2``, the
last decoder block, at the output grid's resolution) by their spatially averaged gradients, keeps the
positive part and upsamples to the crop (trilinear), min-max scaled to [0, 1] per map with 1 = most
important (our own scaling: MONAI's default normaliser maps the maximum to 0).

Each PNG has the paper's three panels on the axial slice through the candidate: CT crop, Grad-CAM heat map,
overlay (with the candidate's box). ``python -m lungdet.gradcam --checkpoint STAGE1.ckpt --cache CACHE_DIR
--uid UID --out DIR`` explains the top candidates of one cached scan.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from monai.visualize import GradCAM
from torch import Tensor, nn

from lungdet.models import coordinate_maps

__all__ = [
    "ObjectnessScore",
    "crop_around",
    "gradcam_for_candidate",
    "objectness_gradcam",
    "save_gradcam_png",
]


class ObjectnessScore(nn.Module):
    """A candidate net seen as a one-output classifier: the best anchor logit of one output cell.

    Args:
        net: a ``CandidateNet``.
        cell: (z, y, x) output-grid cell to explain; None takes the highest logit of the whole grid.
    """

    def __init__(self, net: nn.Module, cell: Sequence[int] | None = None) -> None:
        super().__init__()
        self.net = net
        self.cell = None if cell is None else tuple(int(c) for c in cell)

    def forward(self, x: Tensor, coords: Tensor | None = None) -> Tensor:
        logits = self.net(x, coords)[..., 0] if coords is not None else self.net(x)[..., 0]  # (B, d, h, w, A)
        if self.cell is None:
            return logits.flatten(1).max(dim=1, keepdim=True).values
        z, y, x_ = self.cell
        return logits[:, z, y, x_].max(dim=1, keepdim=True).values


def _unit_range(cam: Tensor) -> Tensor:
    """Min-max scale each map to [0, 1] with high = important (MONAI's default normaliser maps max → 0)."""
    flat = cam.flatten(1)
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    scale = (hi - lo).clamp_min(1e-12)
    shape = (-1,) + (1,) * (cam.ndim - 1)
    return (cam - lo.view(shape)) / scale.view(shape)


def objectness_gradcam(
    net: nn.Module,
    crop: Tensor,
    coords: Tensor | None,
    cell: Sequence[int] | None = None,
    target_layer: str = "dec2",
) -> np.ndarray:
    """Grad-CAM map of one crop, (D, H, W) float32 in [0, 1].

    Args:
        net: the candidate net.
        crop: (1, 1, D, H, W) prepared crop.
        coords: (1, 3, D, H, W) coordinate channels of the crop (None for a net without them).
        cell: output cell whose objectness is explained (None: the best one).
        target_layer: name of the layer inside ``net`` whose activations are weighted.
    """
    wrapper = ObjectnessScore(net, cell)
    names = dict(net.named_modules())
    if target_layer not in names:
        raise ValueError(
            f"target_layer {target_layer!r} is not a layer of the net; e.g. dec2, dec3, encoder.1"
        )
    was_training = net.training
    requires = [p.requires_grad for p in net.parameters()]
    net.requires_grad_(True)
    try:
        cam = GradCAM(nn_module=wrapper, target_layers=f"net.{target_layer}", postprocessing=_unit_range)
        x = crop.detach().clone().requires_grad_(True)
        kwargs = {} if coords is None else {"coords": coords}
        with torch.enable_grad():
            out = cam(x, class_idx=0, **kwargs)
    finally:
        for p, r in zip(net.parameters(), requires):
            p.requires_grad_(r)
        net.train(was_training)
    return out[0, 0].detach().cpu().numpy().astype(np.float32)


def crop_around(
    image: Tensor, centre_zyx: Sequence[float], size: int, fill: float
) -> tuple[Tensor, Tensor, np.ndarray]:
    """A ``size``³ crop of a prepared scan centred on a voxel, its coordinate channels and its start.

    Returns:
        (1, 1, s, s, s) crop (padded with ``fill`` outside the scan), (1, 3, s, s, s) coordinate maps and
        the crop's first voxel (z, y, x) in the scan.
    """
    start = np.round(np.asarray(centre_zyx, dtype=np.float64)).astype(int) - size // 2
    pads, src = [], []
    for a in range(3):
        lo, hi = start[a], start[a] + size
        src.append(slice(max(lo, 0), min(hi, image.shape[a])))
        pads.append((max(-lo, 0), max(hi - image.shape[a], 0)))
    block = image[tuple(src)]
    padding = [p for pair in reversed(pads) for p in pair]
    crop = F.pad(block[None, None], padding, value=float(fill))
    coords = coordinate_maps(
        torch.as_tensor(start[None], dtype=torch.float64), (size,) * 3, torch.tensor(image.shape)
    )
    return crop, coords.to(crop), start


def gradcam_for_candidate(
    net: nn.Module,
    image: Tensor,
    centre_zyx: Sequence[float],
    *,
    crop_size: int = 64,
    fill: float = 0.0,
    target_layer: str = "dec2",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grad-CAM of one candidate of a whole prepared scan.

    Returns:
        (crop (D, H, W), cam (D, H, W), candidate centre in crop voxels).
    """
    if crop_size % 32:
        raise ValueError(f"crop_size must be a multiple of 32 (the net pools five times), got {crop_size}")
    device = next(net.parameters()).device
    crop, coords, start = crop_around(image.to(device), centre_zyx, crop_size, fill)
    centre = np.asarray(centre_zyx, dtype=np.float64) - start
    stride = int(getattr(net, "stride", 4))
    cell = np.clip((centre // stride).astype(int), 0, crop_size // stride - 1)
    use_coords = getattr(net, "use_coords", True)
    cam = objectness_gradcam(net, crop, coords if use_coords else None, cell, target_layer)
    return crop[0, 0].detach().cpu().numpy(), cam, centre


def save_gradcam_png(
    crop: np.ndarray,
    cam: np.ndarray,
    path: str | Path,
    centre: Sequence[float],
    diameter: float | None = None,
    title: str = "",
    dpi: int = 120,
) -> Path:
    """Write the three-panel figure (CT, Grad-CAM, overlay) of the axial slice through ``centre``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    z = int(np.clip(round(float(centre[0])), 0, crop.shape[0] - 1))
    fig = Figure(figsize=(9.0, 3.4))
    axes = fig.subplots(1, 3)
    axes[0].imshow(crop[z], cmap="gray", vmin=0, vmax=1)
    axes[0].set_title("CT (lung window)")
    axes[1].imshow(cam[z], cmap="jet", vmin=0, vmax=1)
    axes[1].set_title("Grad-CAM")
    axes[2].imshow(crop[z], cmap="gray", vmin=0, vmax=1)
    axes[2].imshow(cam[z], cmap="jet", vmin=0, vmax=1, alpha=0.4)
    axes[2].set_title("overlay")
    if diameter:
        half = float(diameter) / 2.0
        axes[2].add_patch(
            Rectangle((centre[2] - half, centre[1] - half), 2 * half, 2 * half, fill=False, ec="lime", lw=1)
        )
    for ax in axes:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path


def main(argv: list[str] | None = None) -> list[Path]:
    """Grad-CAM PNGs of the top stage-1 candidates of one cached scan."""
    from common.cache import PreprocessedCache
    from lungdet.scan_reader import ScanReader
    from lungdet.task import CandidateTask

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--checkpoint", required=True, type=Path, help="CandidateTask checkpoint")
    parser.add_argument("--cache", required=True, type=Path, help="preprocessed cache folder")
    parser.add_argument("--uid", required=True, help="scan uid in the cache")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--top", type=int, default=3, help="number of candidates to explain")
    parser.add_argument("--crop", type=int, default=64, help="crop side (multiple of 32)")
    parser.add_argument("--layer", default="dec2", help="target layer of the net")
    parser.add_argument("--block", type=int, default=128, help="whole-scan inference block")
    args = parser.parse_args(argv)
    task = CandidateTask.load_from_checkpoint(
        args.checkpoint, map_location="cpu", weights_only=True, block_size=args.block
    )
    task.eval()
    reader = ScanReader(PreprocessedCache(args.cache))
    task.pad_value = reader.fill_value
    image = torch.from_numpy(reader.whole(args.uid))
    written = []
    for k, (score, z, y, x, d) in enumerate(task.detect(image)[: args.top].tolist()):
        crop, cam, centre = gradcam_for_candidate(
            task.model, image, (z, y, x), crop_size=args.crop, fill=reader.fill_value, target_layer=args.layer
        )
        written.append(
            save_gradcam_png(
                crop, cam, args.out / f"gradcam_{k}.png", centre, d, f"candidate {k}, p = {score:.2f}"
            )
        )
        print(written[-1])
    return written


if __name__ == "__main__":
    main()
