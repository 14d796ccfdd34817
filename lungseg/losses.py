"""GLANCE training objective (paper Eqs. 9–10) and the centre-heatmap targets it needs.

    L = λseg · [Dice(Ŷ, Y) + BCE(Ŷ, Y) + w_aux · Σ_aux (Dice + BCE)(Ŷ_aux, ↓Y)] + λdet · Focal(Ĥ, H)

* Dice is Eq. 10, ``1 − (2ΣŶY + ε) / (ΣŶ + ΣY + ε)`` on sigmoid probabilities (MONAI ``DiceLoss``); by
  default the sums run over the whole batch, which keeps the term defined and stable on the many slices
  without a nodule.
* BCE is computed from logits (numerically stable).
* Deep supervision (paper: "auxiliary segmentation heads on intermediate decoder stages are supervised with
  downsampled masks using a reduced weight ×0.3"): each aux map gets the same Dice + BCE against the mask
  area-downsampled to its grid (soft targets, so nodules smaller than one coarse cell are not erased), times
  ``aux_weight`` = 0.3.
* The paper writes ``L_focal(Ĥ, H)`` on Gaussian centre heatmaps without the formula; we use the
  penalty-reduced pixel focal loss of CenterNet (Zhou et al. 2019), the standard loss for Gaussian centre
  targets: with p = σ(logit),

      −1/N_pos · Σ { (1−p)^α log p                 where H = 1 (centre pixels)
                   { (1−H)^β p^α log(1−p)          elsewhere,          α = 2, β = 4.

  Positives are exactly the pixels where the target equals 1, so targets must have their peaks at 1.0 —
  :func:`gaussian_center_heatmap` guarantees that by centring each Gaussian on a pixel.

λseg = 1, λdet = 0.3 are the paper's values (Table 7 sweeps λdet ∈ {0.2, 0.3, 0.4, 0.5}). Outputs missing
from the model (detection-only / segmentation-only rows) simply contribute no term.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

__all__ = ["GlanceLoss", "center_focal_loss", "dice_loss", "gaussian_center_heatmap"]


def dice_loss(
    logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0, batch: bool = True
) -> torch.Tensor:
    """Soft Dice loss of Eq. 10 on ``sigmoid(logits)``.

    Args:
        logits: ``B×1×H×W`` segmentation logits.
        target: ``B×1×H×W`` mask in [0, 1] (soft values allowed).
        smooth: ε added to numerator and denominator.
        batch: Sum over the whole batch (one Dice) instead of averaging per-slice Dice values.
    """
    return DiceLoss(sigmoid=True, batch=batch, smooth_nr=smooth, smooth_dr=smooth)(logits, target)


def center_focal_loss(
    logits: torch.Tensor, target: torch.Tensor, alpha: float = 2.0, beta: float = 4.0
) -> torch.Tensor:
    """Penalty-reduced pixel focal loss (CenterNet) for Gaussian centre heatmaps.

    Args:
        logits: ``B×1×H×W`` heatmap logits.
        target: ``B×1×H×W`` Gaussian heatmap in [0, 1] with value exactly 1 at every centre.
        alpha: Focusing exponent on the prediction.
        beta: Exponent of the penalty reduction ``(1 − H)^β`` around centres.

    Returns:
        The summed loss over all pixels divided by the number of centres (by 1 when there are none, so
        empty slices still teach the background).
    """
    positive = target >= 1.0
    prob = torch.sigmoid(logits)
    log_p = F.logsigmoid(logits)
    log_not_p = F.logsigmoid(-logits)
    pos_term = ((1 - prob) ** alpha * log_p)[positive].sum()
    neg_term = ((1 - target) ** beta * prob**alpha * log_not_p)[~positive].sum()
    num_pos = positive.sum().clamp(min=1)
    return -(pos_term + neg_term) / num_pos


def gaussian_center_heatmap(
    shape: tuple[int, int],
    centers: Sequence[tuple[float, float]],
    diameters: Sequence[float],
    sigma_scale: float = 1.0 / 6.0,
    min_sigma: float = 1.0,
) -> np.ndarray:
    """Render the centre-heatmap target of one slice.

    Each nodule becomes a Gaussian with σ = max(``min_sigma``, ``sigma_scale`` · diameter) — "radius
    proportional to the nodule diameter"; with the default 1/6 the Gaussian has fallen to 1% at the nodule
    rim (3σ = radius). Centres are snapped to the nearest pixel so each peak is exactly 1.0 (the focal loss
    treats those pixels as positives). Overlapping nodules combine by element-wise maximum. Centres outside
    the grid (e.g. cut off by a crop) add only their in-grid tail.

    Args:
        shape: Output ``(H, W)``.
        centers: Nodule centres ``(y, x)`` in pixels of this grid.
        diameters: Nodule diameters in pixels, same length as ``centers``.
        sigma_scale: σ per pixel of diameter.
        min_sigma: Lower bound on σ (keeps sub-pixel nodules learnable).

    Returns:
        ``float32`` array of shape ``shape`` in [0, 1].
    """
    if len(centers) != len(diameters):
        raise ValueError(f"Got {len(centers)} centres but {len(diameters)} diameters; give one per nodule.")
    height, width = shape
    heatmap = np.zeros((height, width), dtype=np.float32)
    for (cy, cx), diameter in zip(centers, diameters):
        if not (np.isfinite(cy) and np.isfinite(cx) and np.isfinite(diameter)) or diameter < 0:
            raise ValueError(f"Invalid nodule centre ({cy}, {cx}) or diameter {diameter}; need finite, ≥ 0.")
        sigma = max(min_sigma, sigma_scale * float(diameter))
        radius = int(np.ceil(3 * sigma))
        iy, ix = int(round(cy)), int(round(cx))
        y0, y1 = max(iy - radius, 0), min(iy + radius + 1, height)
        x0, x1 = max(ix - radius, 0), min(ix + radius + 1, width)
        if y0 >= y1 or x0 >= x1:
            continue
        yy = np.arange(y0, y1, dtype=np.float32)[:, None] - iy
        xx = np.arange(x0, x1, dtype=np.float32)[None, :] - ix
        blob = np.exp(-(yy**2 + xx**2) / (2 * sigma**2)).astype(np.float32)
        np.maximum(heatmap[y0:y1, x0:x1], blob, out=heatmap[y0:y1, x0:x1])
    return heatmap


def _as_bchw(name: str, tensor: Any, like: torch.Tensor) -> torch.Tensor:
    """Check a target against its prediction; accept ``B×H×W`` by adding the channel axis."""
    if not torch.is_tensor(tensor):
        raise TypeError(f"Target {name!r} must be a torch.Tensor, got {type(tensor).__name__}.")
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(1)
    if tensor.shape != like.shape:
        raise ValueError(
            f"Target {name!r} has shape {tuple(tensor.shape)} but the prediction is {tuple(like.shape)}; "
            "targets must be B×1×H×W at the input resolution."
        )
    return tensor.to(dtype=like.dtype)


class GlanceLoss(nn.Module):
    """Compound GLANCE loss over a model output dict.

    Args:
        lambda_seg: Weight of the segmentation terms (paper: 1.0).
        lambda_det: Weight of the heatmap focal term (paper: 0.3).
        aux_weight: Weight of each deep-supervision head's Dice + BCE (paper: 0.3).
        dice_smooth: ε of Eq. 10.
        dice_batch: Batch-level Dice (default) instead of the mean of per-slice Dice values.
        focal_alpha: Focal exponent α.
        focal_beta: Penalty-reduction exponent β.

    ``forward(outputs, targets)`` takes the model's dict (``"seg"``, ``"heatmap"``, ``"aux"``; any may be
    absent) and a targets mapping with ``"mask"`` (``B×1×H×W`` binary nodule mask) and ``"heatmap"``
    (``B×1×H×W`` Gaussian centres). It returns a dict with ``"loss"`` (the total, to back-propagate) and the
    unweighted terms for logging: ``"dice"``, ``"bce"``, ``"aux"`` (sum over aux heads), ``"focal"``.
    """

    def __init__(
        self,
        lambda_seg: float = 1.0,
        lambda_det: float = 0.3,
        aux_weight: float = 0.3,
        dice_smooth: float = 1.0,
        dice_batch: bool = True,
        focal_alpha: float = 2.0,
        focal_beta: float = 4.0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("lambda_seg", lambda_seg),
            ("lambda_det", lambda_det),
            ("aux_weight", aux_weight),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}.")
        self.lambda_seg = lambda_seg
        self.lambda_det = lambda_det
        self.aux_weight = aux_weight
        self.focal_alpha = focal_alpha
        self.focal_beta = focal_beta
        self.dice = DiceLoss(sigmoid=True, batch=dice_batch, smooth_nr=dice_smooth, smooth_dr=dice_smooth)

    def _seg_terms(self, logits: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dice(logits, mask), F.binary_cross_entropy_with_logits(logits, mask)

    def forward(
        self, outputs: Mapping[str, Any], targets: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Compute the total loss and its logged terms (see class docstring)."""
        terms: dict[str, torch.Tensor] = {}
        total: torch.Tensor | None = None
        # Under bf16-mixed the heads hand over bf16; Dice and focal sums over whole slices (and the Gaussian
        # targets, cast to the prediction's dtype) lose digits in bf16, so the loss runs in fp32.
        outputs = {
            key: (value.float() if torch.is_tensor(value) else [a.float() for a in value] if value else value)
            for key, value in outputs.items()
        }

        def add(value: torch.Tensor) -> None:
            nonlocal total
            total = value if total is None else total + value

        if "seg" in outputs:
            if "mask" not in targets:
                raise KeyError("The model predicts 'seg' but targets have no 'mask'; add the nodule mask.")
            mask = _as_bchw("mask", targets["mask"], outputs["seg"])
            terms["dice"], terms["bce"] = self._seg_terms(outputs["seg"], mask)
            add(self.lambda_seg * (terms["dice"] + terms["bce"]))
            aux_logits = outputs.get("aux") or []
            if aux_logits:
                aux_total = outputs["seg"].new_zeros(())
                for logits in aux_logits:
                    small = F.interpolate(mask, size=logits.shape[-2:], mode="area")
                    dice, bce = self._seg_terms(logits, small)
                    aux_total = aux_total + dice + bce
                terms["aux"] = aux_total
                add(self.lambda_seg * self.aux_weight * aux_total)
        if "heatmap" in outputs:
            if "heatmap" not in targets:
                raise KeyError("The model predicts 'heatmap' but targets have no 'heatmap'; render one with "
                               "lungseg.losses.gaussian_center_heatmap.")  # fmt: skip
            heatmap = _as_bchw("heatmap", targets["heatmap"], outputs["heatmap"])
            terms["focal"] = center_focal_loss(outputs["heatmap"], heatmap, self.focal_alpha, self.focal_beta)
            add(self.lambda_det * terms["focal"])
        if total is None:
            raise ValueError("Model outputs contain neither 'seg' nor 'heatmap'; nothing to optimise.")
        terms["loss"] = total
        return terms
