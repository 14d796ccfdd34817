"""Stage-1 training loss of CLAF: focal objectness + smooth-L1 regression, OHEM, learned task weights.

The paper names the pieces — "improved binary focal loss" for classification, smooth L1 for regression,
"a dynamic weighting mechanism" joining them, and online hard-example mining — but its equations are
missing from our copy, so these are the standard forms, written down in docs/lungdet.md:

* Focal loss (Lin et al. 2017): ``FL(p_t) = -α_t (1 - p_t)^γ log p_t`` with ``p_t = p`` for positives
  and ``1 - p`` for negatives, ``α_t = α`` / ``1 - α``. torchvision's ``sigmoid_focal_loss`` computes it.
* OHEM: every positive anchor is kept; of the negatives only the ``k`` with the largest focal loss
  (equivalently the highest objectness) contribute, ``k = max(neg_pos_ratio × #positives,
  min_negatives × batch)`` capped by the number of negatives. The classification term is the sum over
  kept anchors divided by ``max(#positives, 1)`` (RetinaNet's normalisation).
* Regression: smooth L1 on the 4 deltas of positive anchors, summed over the deltas, averaged over
  positives (zero, with a gradient path, when a batch has no positives).
* Dynamic weighting: homoscedastic-uncertainty weights (Kendall, Gal & Cipolla 2018),
  ``L = Σ_i exp(-s_i) L_i + s_i`` with a learned log-variance ``s_i`` per task, so the balance between
  objectness and regression adapts during training instead of being a tuned constant. ``weighting="fixed"``
  gives ``L_cls + reg_weight × L_reg`` for ablations.

Because the weights are parameters, the Lightning task must own ``DetectionLoss`` as a submodule and
hand its parameters to the optimiser (they then travel in the checkpoint too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from lungdet.anchors import LABEL_NEGATIVE, LABEL_POSITIVE

__all__ = [
    "DetectionLoss",
    "DetectionLossOutput",
    "UncertaintyWeighting",
    "binary_focal_loss",
    "select_hard_negatives",
]


def binary_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise binary focal loss on logits (no reduction).

    Args:
        logits: raw objectness scores.
        targets: same shape, 1 for nodule anchors and 0 for background.
        alpha: weight of the positive class (``1 - alpha`` for negatives); a negative value disables it.
        gamma: focusing exponent; 0 gives (α-weighted) binary cross-entropy.
    """
    return sigmoid_focal_loss(logits, targets.to(logits.dtype), alpha=alpha, gamma=gamma, reduction="none")


def select_hard_negatives(negative_losses: Tensor, num_keep: int) -> Tensor:
    """Indices of the ``num_keep`` largest losses (the hardest negatives); all of them if fewer exist."""
    k = min(int(num_keep), negative_losses.numel())
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=negative_losses.device)
    return torch.topk(negative_losses, k, sorted=False).indices


class UncertaintyWeighting(nn.Module):
    """Learned homoscedastic-uncertainty weighting of several losses: ``Σ exp(-s_i) L_i + s_i``.

    Args:
        num_tasks: number of losses to combine.
        init_log_vars: starting ``s_i`` (0 → weight 1).
    """

    def __init__(self, num_tasks: int = 2, init_log_vars: float = 0.0) -> None:
        super().__init__()
        self.log_vars = nn.Parameter(torch.full((num_tasks,), float(init_log_vars)))

    def forward(self, losses: Tensor) -> Tensor:
        """Combine a (num_tasks,) vector of losses into one scalar."""
        return (torch.exp(-self.log_vars) * losses + self.log_vars).sum()

    @property
    def weights(self) -> Tensor:
        """Current effective weights ``exp(-s_i)`` (detached, for logging)."""
        return torch.exp(-self.log_vars.detach())


@dataclass
class DetectionLossOutput:
    """What ``DetectionLoss`` returns: the scalar to optimise and detached parts to log.

    Attributes:
        loss: total loss (backpropagate this).
        cls: focal objectness term.
        reg: smooth-L1 regression term.
        weight_cls: current weight on ``cls``.
        weight_reg: current weight on ``reg``.
        num_pos: positive anchors in the batch.
        num_neg: negatives kept by OHEM.
    """

    loss: Tensor
    cls: Tensor
    reg: Tensor
    weight_cls: Tensor
    weight_reg: Tensor
    num_pos: int
    num_neg: int

    def log_dict(self, prefix: str = "") -> dict[str, Tensor | float]:
        """Flat ``{name: value}`` for ``LightningModule.log_dict``."""
        return {
            f"{prefix}loss": self.loss.detach(),
            f"{prefix}loss_cls": self.cls.detach(),
            f"{prefix}loss_reg": self.reg.detach(),
            f"{prefix}weight_cls": self.weight_cls,
            f"{prefix}weight_reg": self.weight_reg,
            f"{prefix}num_pos": float(self.num_pos),
            f"{prefix}num_neg": float(self.num_neg),
        }


class DetectionLoss(nn.Module):
    """Stage-1 loss on the candidate net's raw output and ``assign_targets_batch`` targets.

    Args:
        focal_alpha: focal-loss positive weight α.
        focal_gamma: focal-loss exponent γ.
        smooth_l1_beta: transition point of the smooth-L1 loss.
        neg_pos_ratio: OHEM negatives kept per positive.
        min_negatives: OHEM negatives kept per crop at least (crops without nodules still teach background).
        weighting: ``"uncertainty"`` (learned, the paper's dynamic weighting) or ``"fixed"``.
        reg_weight: regression weight for ``weighting="fixed"``.
    """

    def __init__(
        self,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        smooth_l1_beta: float = 1.0,
        neg_pos_ratio: float = 3.0,
        min_negatives: int = 16,
        weighting: str = "uncertainty",
        reg_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if weighting not in ("uncertainty", "fixed"):
            raise ValueError(f"weighting must be 'uncertainty' or 'fixed', got {weighting!r}")
        if neg_pos_ratio < 0 or min_negatives < 0:
            raise ValueError("neg_pos_ratio and min_negatives must be non-negative")
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.smooth_l1_beta = smooth_l1_beta
        self.neg_pos_ratio = neg_pos_ratio
        self.min_negatives = min_negatives
        self.weighting = weighting
        self.reg_weight = reg_weight
        self.task_weights = UncertaintyWeighting(2) if weighting == "uncertainty" else None

    def forward(self, prediction: Tensor, labels: Tensor, deltas: Tensor) -> DetectionLossOutput:
        """Compute the loss.

        Args:
            prediction: (B, D, H, W, A, 5) network output (objectness logit, dz, dy, dx, dd).
            labels: (B, D, H, W, A) anchor labels, 1 / 0 / −1 (ignore).
            deltas: (B, D, H, W, A, 4) regression targets.

        Raises:
            ValueError: when the shapes do not line up.
        """
        if (
            prediction.shape[-1] != 5
            or prediction.shape[:-1] != labels.shape
            or deltas.shape[:-1] != labels.shape
        ):
            raise ValueError(
                f"DetectionLoss shapes disagree: prediction {tuple(prediction.shape)} (…, 5), labels "
                f"{tuple(labels.shape)}, deltas {tuple(deltas.shape)} (…, 4)"
            )
        # Under bf16-mixed the network hands over bf16; the focal sums over ~10⁵ anchors and the regression
        # targets would lose digits in bf16, so the loss runs in fp32 (exact upcast, no cost worth noting).
        prediction = prediction.float()
        batch = prediction.shape[0]
        logits = prediction[..., 0].reshape(-1)
        flat_labels = labels.reshape(-1)
        pos = flat_labels == LABEL_POSITIVE
        neg = flat_labels == LABEL_NEGATIVE
        num_pos = int(pos.sum())

        pos_logits = logits[pos]
        neg_logits = logits[neg]
        pos_loss = binary_focal_loss(
            pos_logits, torch.ones_like(pos_logits), self.focal_alpha, self.focal_gamma
        )
        neg_loss = binary_focal_loss(
            neg_logits, torch.zeros_like(neg_logits), self.focal_alpha, self.focal_gamma
        )
        num_keep = max(int(round(self.neg_pos_ratio * num_pos)), self.min_negatives * batch)
        hard = select_hard_negatives(neg_loss.detach(), num_keep)
        cls = (pos_loss.sum() + neg_loss[hard].sum()) / max(num_pos, 1)

        if num_pos:
            reg_pred = prediction[..., 1:].reshape(-1, 4)[pos]
            reg_true = deltas.reshape(-1, 4)[pos].to(reg_pred.dtype)
            reg = F.smooth_l1_loss(reg_pred, reg_true, beta=self.smooth_l1_beta, reduction="sum") / num_pos
        else:
            reg = prediction[..., 1:].sum() * 0.0  # keeps every output in the graph (DDP needs that)

        if self.task_weights is not None:
            total = self.task_weights(torch.stack([cls, reg]))
            w_cls, w_reg = self.task_weights.weights
        else:
            total = cls + self.reg_weight * reg
            w_cls = torch.ones((), device=cls.device)
            w_reg = torch.full((), float(self.reg_weight), device=cls.device)
        return DetectionLossOutput(
            loss=total,
            cls=cls.detach(),
            reg=reg.detach(),
            weight_cls=w_cls,
            weight_reg=w_reg,
            num_pos=num_pos,
            num_neg=int(hard.numel()),
        )
