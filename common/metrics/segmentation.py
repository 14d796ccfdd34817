"""Segmentation metrics for binary nodule masks, 2D or 3D, with physical spacing.

Per case (one predicted and one reference mask of the same shape):

- Dice = 2|P∩T| / (|P| + |T|), IoU = |P∩T| / |P∪T|, sensitivity = |P∩T| / |T|, precision = |P∩T| / |P|;
- HD95 in mm: MONAI's ``compute_hausdorff_distance`` (percentile 95, symmetric: the larger of the two
  directed 95th percentiles of boundary-to-boundary distances), with the voxel spacing.

Axis convention (docs/architecture.md): arrays are (z, y, x) or (y, x); ``spacing`` is given as
(x, y, z) or (x, y), like every spacing in this project, and is reversed here into array order for
MONAI. Getting this wrong silently changes HD95 on anisotropic scans, so the tests check it.

Empty masks (documented in docs/metrics.md):

================  ========  ========  ===========  ===========  =======
reference / pred  Dice      IoU       sensitivity  precision    HD95
================  ========  ========  ===========  ===========  =======
both empty        1         1         NaN          NaN          0
only pred empty   0         0         0            NaN          NaN
only ref empty    0         0         NaN          0            NaN
================  ========  ========  ===========  ===========  =======

NaN means "undefined for this case"; :func:`aggregate_segmentation_scores` averages over the cases
where a metric is defined and reports how many were not.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from common.metrics.unique_samples import UniqueSampleMetric

SEGMENTATION_KEYS = ("dice", "iou", "sensitivity", "precision", "hd95")


def _as_bool(mask: Any, what: str) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    arr = np.asarray(mask)
    if arr.ndim not in (2, 3):
        raise ValueError(f"{what} mask must be 2D (y, x) or 3D (z, y, x); got shape {arr.shape}")
    return arr.astype(bool)


def _array_spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    sp = tuple(float(s) for s in spacing)
    if len(sp) != ndim:
        raise ValueError(
            f"spacing {sp} has {len(sp)} values for a {ndim}D mask; give (x, y) for 2D or (x, y, z) for 3D"
        )
    if not all(np.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing {sp} must be positive and finite (mm per voxel)")
    return sp[::-1]


def hd95(pred: Any, target: Any, spacing: Sequence[float] | None = None, percentile: float = 95.0) -> float:
    """Symmetric percentile Hausdorff distance in mm (MONAI), with the empty-mask conventions above.

    Args:
        pred, target: binary masks, (y, x) or (z, y, x).
        spacing: voxel size as (x, y) or (x, y, z) in mm; None means 1 mm.
        percentile: 95 for HD95, 100 for the plain Hausdorff distance.
    """
    from monai.metrics import compute_hausdorff_distance

    p, t = _as_bool(pred, "predicted"), _as_bool(target, "reference")
    if p.shape != t.shape:
        raise ValueError(f"predicted mask {p.shape} and reference mask {t.shape} differ in shape")
    has_p, has_t = bool(p.any()), bool(t.any())
    if not has_p and not has_t:
        return 0.0
    if has_p != has_t:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        value = compute_hausdorff_distance(
            torch.from_numpy(p[None, None].astype(np.float32)),
            torch.from_numpy(t[None, None].astype(np.float32)),
            include_background=True,
            percentile=percentile,
            spacing=list(_array_spacing(spacing, p.ndim)),
        )
    return float(value.reshape(-1)[0])


def segmentation_scores(
    pred: Any, target: Any, spacing: Sequence[float] | None = None, with_hd95: bool = True
) -> dict[str, float]:
    """Dice, IoU, sensitivity, precision and (optionally) HD95 in mm for one case."""
    p, t = _as_bool(pred, "predicted"), _as_bool(target, "reference")
    if p.shape != t.shape:
        raise ValueError(f"predicted mask {p.shape} and reference mask {t.shape} differ in shape")
    _array_spacing(spacing, p.ndim)
    inter = float(np.count_nonzero(p & t))
    n_p, n_t = float(np.count_nonzero(p)), float(np.count_nonzero(t))
    union = n_p + n_t - inter
    nan = float("nan")
    scores = {
        "dice": 1.0 if n_p + n_t == 0 else 2.0 * inter / (n_p + n_t),
        "iou": 1.0 if union == 0 else inter / union,
        "sensitivity": nan if n_t == 0 else inter / n_t,
        "precision": nan if n_p == 0 else inter / n_p,
    }
    if with_hd95:
        scores["hd95"] = hd95(p, t, spacing)
    return scores


def aggregate_segmentation_scores(cases: Iterable[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over the cases where it is defined, plus ``<metric>_undefined`` counts."""
    rows = list(cases)
    out: dict[str, float] = {"cases": float(len(rows))}
    for key in SEGMENTATION_KEYS:
        values = np.array([r[key] for r in rows if key in r], dtype=np.float64)
        if values.size == 0:
            continue
        defined = np.isfinite(values)
        out[key] = float(values[defined].mean()) if defined.any() else float("nan")
        out[f"{key}_std"] = float(values[defined].std()) if defined.any() else float("nan")
        out[f"{key}_undefined"] = float((~defined).sum())
    return out


class SegmentationScores(UniqueSampleMetric):
    """Per-case Dice / IoU / sensitivity / precision / HD95 accumulated across batches and ranks.

    Each ``update`` scores its cases on the spot and stores one row per case with the case's key, so the
    epoch value is the mean over the distinct cases of all ranks, NaN-aware as in
    :func:`aggregate_segmentation_scores`. A case that ``DistributedSampler`` padded in (the same scan
    scored on two ranks) carries the same key twice and counts once (:mod:`common.metrics.unique_samples`);
    without keys every row is a case of its own. HD95 runs on CPU through MONAI; switch it off for cheap
    per-epoch validation with ``with_hd95=False``. After ``compute()``, :attr:`n_cases` is the number of
    distinct cases it averaged (the same on every rank).

    Args:
        with_hd95: compute HD95 (mm) as well.
        threshold: probabilities above this are foreground when float maps are passed.
    """

    higher_is_better = True

    def __init__(self, with_hd95: bool = True, threshold: float = 0.5, **kwargs: Any) -> None:
        super().__init__(width=len(SEGMENTATION_KEYS), **kwargs)
        self.with_hd95 = with_hd95
        self.threshold = threshold
        self.n_cases = 0

    def update(
        self,
        preds: Any,
        targets: Any,
        spacings: Sequence[Sequence[float]] | None = None,
        keys: Sequence[int] | torch.Tensor | None = None,
    ) -> None:
        """Score a batch: ``preds``/``targets`` (B, [Z,] Y, X) masks or probability maps.

        Args:
            preds: predictions; floats are thresholded at ``threshold``.
            targets: reference masks.
            spacings: per case (x, y[, z]) in mm, or None for 1 mm.
            keys: per case a non-negative integer naming it on every rank (e.g.
                ``sample_key(uid, nodule_label)``), or None: no de-duplication.
        """
        n = len(preds)
        if len(targets) != n or (spacings is not None and len(spacings) != n):
            raise ValueError(
                f"got {n} predictions, {len(targets)} references"
                + ("" if spacings is None else f" and {len(spacings)} spacings")
                + "; pass one of each per case"
            )
        rows = []
        for i in range(n):
            p = preds[i]
            if isinstance(p, torch.Tensor):
                p = p.detach().cpu().numpy()
            p = np.asarray(p)
            if p.dtype.kind == "f":
                p = p > self.threshold
            s = segmentation_scores(
                p, targets[i], None if spacings is None else spacings[i], with_hd95=self.with_hd95
            )
            rows.append([s.get(k, float("nan")) for k in SEGMENTATION_KEYS])
        self._add(keys, torch.tensor(rows, dtype=torch.float64).reshape(-1, len(SEGMENTATION_KEYS)))

    def compute(self) -> dict[str, torch.Tensor]:
        """Mean of each metric over the distinct cases where it is defined (NaN when there are none)."""
        _, rows = self.unique_samples()
        self.n_cases = int(rows.shape[0])
        keys = SEGMENTATION_KEYS if self.with_hd95 else SEGMENTATION_KEYS[:-1]
        agg = aggregate_segmentation_scores({k: r[j] for j, k in enumerate(keys)} for r in rows)
        return {k: torch.tensor(agg.get(k, float("nan")), dtype=torch.float32) for k in keys}
