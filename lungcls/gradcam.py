"""Grad-CAM per scale for M³Net and its stage-1 branches (paper Fig. 5), as PNG files.

Grad-CAM (Selvaraju et al.) weights the channels of a layer's activation A by the spatial mean of the
gradient of the class score, sums, and keeps the positive part: CAM = ReLU(Σ_c mean(∂y/∂A_c) · A_c). Here
the layer is each branch's last feature map (`BackboneFeatures.feature_map`), the score is the fused
logit of the target class (stage 2) or the branch's own logit (stage 1), so one backward pass gives a
map per scale. 3D branches give a `(z, y, x)` map, upsampled trilinearly to the patch; the 2D
slices-as-channels branch gives an in-plane map, upsampled bilinearly and shared by every slice.

The gradient must reach the feature maps even when the backbones are frozen (stage 2 with
``freeze="all"``), so the input patches are made to require gradients. Lightning runs test and predict
under inference mode; the computation leaves it explicitly.

`save_gradcam_png` draws, per nodule, one panel per scale: the patch slice where the CAM peaks ("the
model's peak attention", as the paper's figure shows), in a lung window, with the CAM overlaid.
`GradCAMExport` is the callback that does this for the first test nodules of a run and writes
``gradcam/<nodule>.png`` into the run folder.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from matplotlib.figure import Figure
from torch import Tensor

from lungcls.models import M3Net, ScaleClassifier
from lungcls.models.backbones import BackboneFeatures

log = logging.getLogger(__name__)

__all__ = ["GradCAMExport", "grad_cam", "save_gradcam_png"]


def _channels_first(feature_map: Tensor, backbone: Any) -> Tensor:
    if feature_map.ndim == 4 and getattr(backbone, "_channels_last", False):
        return feature_map.permute(0, 3, 1, 2)
    if feature_map.ndim not in (4, 5):
        raise ValueError(
            f"Grad-CAM needs a spatial feature map (B, C, h, w) or (B, C, z, y, x); "
            f"{getattr(backbone, 'name', type(backbone).__name__)} gives {tuple(feature_map.shape)}"
        )
    return feature_map


def _cam(feature_map: Tensor, grad: Tensor, out_shape: Sequence[int]) -> Tensor:
    """ReLU(Σ_c mean(grad_c) A_c) resized to `out_shape` (z, y, x), scaled to [0, 1] per sample."""
    dims = tuple(range(2, feature_map.ndim))
    weights = grad.mean(dim=dims, keepdim=True)
    cam = F.relu((weights * feature_map).sum(dim=1, keepdim=True)).float()
    z, y, x = (int(v) for v in out_shape)
    if cam.ndim == 5:
        cam = F.interpolate(cam, size=(z, y, x), mode="trilinear", align_corners=False)[:, 0]
    else:
        cam = F.interpolate(cam, size=(y, x), mode="bilinear", align_corners=False)[:, 0]
        cam = cam.unsqueeze(1).expand(-1, z, -1, -1)
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12)
    return cam / peak.view(-1, 1, 1, 1)


def grad_cam(
    model: M3Net | ScaleClassifier,
    patches: Mapping[int, Tensor] | Tensor,
    target: int | Tensor | None = None,
    scale: int | None = None,
) -> tuple[dict[int, Tensor], Tensor]:
    """Grad-CAM maps per scale.

    Args:
        model: a stage-2 `M3Net` or a stage-1 `ScaleClassifier`.
        patches: scale → `(B, 1, Z, s, s)` (M3Net), or one `(B, 1, Z, s, s)` patch (ScaleClassifier).
        target: class whose score is explained: an int, a `(B,)` tensor, or None for the predicted class.
        scale: the scale key of a single-scale model (default 0).

    Returns:
        (maps, logits): scale → `(B, Z, s, s)` CAM in [0, 1], and the logits.
    """
    was_training = model.training
    model.eval()
    with torch.inference_mode(False), torch.enable_grad():
        if isinstance(model, M3Net):
            inputs = {int(k): v.detach().clone().float().requires_grad_(True) for k, v in patches.items()}
            out = model(inputs)
            logits = out.logits
            features: dict[int, BackboneFeatures] = out.features
            backbones = {s: model.branch(s).backbone for s in model.scales}
            shapes = {s: inputs[s].shape[-3:] for s in model.scales}
        else:
            key = 0 if scale is None else int(scale)
            tensor = patches if isinstance(patches, Tensor) else patches[key]
            inputs = {key: tensor.detach().clone().float().requires_grad_(True)}
            out = model(inputs[key])
            logits = out.logits
            features = {key: out.features}
            backbones = {key: model.backbone}
            shapes = {key: inputs[key].shape[-3:]}
        maps = {s: _channels_first(f.feature_map, backbones[s]) for s, f in features.items()}
        if target is None:
            chosen = logits.argmax(dim=1)
        elif isinstance(target, Tensor):
            chosen = target.to(logits.device).long()
        else:
            chosen = torch.full((logits.shape[0],), int(target), device=logits.device, dtype=torch.long)
        score = logits.gather(1, chosen[:, None]).sum()
        grads = torch.autograd.grad(score, list(maps.values()), allow_unused=True)
        cams = {}
        for (s, fmap), grad in zip(maps.items(), grads):
            if grad is None:
                raise RuntimeError(
                    f"the {s}-scale branch does not reach the explained score; nothing to show"
                )
            cams[s] = _cam(fmap.detach(), grad.detach(), shapes[s]).cpu()
    model.train(was_training)
    return cams, logits.detach()


def save_gradcam_png(
    path: str | Path,
    patches: Mapping[int, np.ndarray],
    cams: Mapping[int, np.ndarray],
    title: str = "",
    window: tuple[float, float] = (-1000.0, 400.0),
    dpi: int = 120,
) -> Path:
    """One nodule's Grad-CAM, a panel per scale at the slice of peak attention.

    Args:
        path: PNG to write.
        patches: scale → `(Z, s, s)` patch in HU (or already in [0, 1]).
        cams: scale → `(Z, s, s)` CAM in [0, 1].
        title: figure title (e.g. label and prediction).
        window: HU display window (ignored for patches already in [0, 1]).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scales = sorted(cams)
    fig = Figure(figsize=(3.0 * len(scales), 3.3))
    axes = fig.subplots(1, len(scales), squeeze=False)[0]
    for ax, s in zip(axes, scales):
        cam = np.asarray(cams[s], dtype=np.float32)
        image = np.asarray(patches[s], dtype=np.float32)
        z = int(np.argmax(cam.reshape(cam.shape[0], -1).max(axis=1)))
        lo, hi = (0.0, 1.0) if image.min() >= 0.0 and image.max() <= 1.0 else window
        ax.imshow(np.clip((image[z] - lo) / (hi - lo), 0, 1), cmap="gray", vmin=0, vmax=1)
        ax.imshow(cam[z], cmap="jet", alpha=0.4, vmin=0, vmax=1)
        ax.set_title(f"scale {s}, slice {z}", fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path


class GradCAMExport(Callback):
    """Write Grad-CAM PNGs of the first `num_samples` test nodules into ``<run>/gradcam/``.

    Works with `lungcls.task.M3NetTask` (a panel per fused scale) and `ScaleTask` (its one scale).

    Args:
        num_samples: nodules to draw.
        target: class to explain (None: the predicted class).
        folder: sub-folder of the run folder.
    """

    def __init__(self, num_samples: int = 8, target: int | None = None, folder: str = "gradcam") -> None:
        super().__init__()
        self.num_samples = int(num_samples)
        self.target = target
        self.folder = folder
        self._done = 0
        self.written: list[Path] = []

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._done = 0
        self.written = []

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._done >= self.num_samples or not trainer.is_global_zero:
            return
        model = pl_module.model
        patches = batch["patches"]
        if isinstance(model, M3Net):
            cams, logits = grad_cam(model, patches, self.target)
            shown = {s: patches[s] for s in model.scales}
        else:
            scale = int(pl_module.hparams.scale)
            cams, logits = grad_cam(model, patches[scale], self.target, scale=scale)
            shown = {scale: patches[scale]}
        table = pl_module._table("test") if hasattr(pl_module, "_table") else None
        out_dir = Path(trainer.log_dir or trainer.default_root_dir) / self.folder
        preds = logits.argmax(dim=1)
        for b in range(logits.shape[0]):
            if self._done >= self.num_samples:
                break
            index = int(batch["index"][b])
            name = str(table.iloc[index]["key"]) if table is not None and "key" in table else f"sample{index}"
            name = re.sub(r"[^A-Za-z0-9._-]+", "-", name)
            title = f"label {int(batch['label'][b])}, predicted {int(preds[b])}"
            self.written.append(
                save_gradcam_png(
                    out_dir / f"{name}.png",
                    {s: v[b, 0].detach().float().cpu().numpy() for s, v in shown.items()},
                    {s: c[b].numpy() for s, c in cams.items()},
                    title,
                )
            )
            self._done += 1
        if self._done >= self.num_samples:
            log.info("Grad-CAM of %d nodules written to %s", self._done, out_dir)
