"""``GlanceTask``: the LightningModule that trains, evaluates and runs GLANCE (any table row).

Training (slices from :class:`lungseg.data.GlanceSliceDataset`): the loss of paper Eq. 9,
λseg·(Dice + BCE) + deep supervision ×0.3 + λdet·focal(heatmap) (:class:`lungseg.losses.GlanceLoss`, λ's
from the variant preset, then ``loss_overrides``). The segmentation terms use only the samples whose
``has_mask`` is set: LUNA16 and Tianchi slices (centre + diameter only) train the heatmap alone. A
persistent buffer ``seg_supervised`` records whether the segmentation head ever saw a mask; inference
filters heatmap peaks by the segmentation only when it did (``filter_by_mask=None``), or as forced, and
ignores a head that never did altogether (sizes from the heatmap, no mask), as for ``detection_only``.

Optimiser and schedule are the paper's by default — AdamW, lr 1e-4, weight decay 0.05,
CosineAnnealingWarmRestarts with T0 = 20 epochs — and come from the constructor (``BaseTask``), so a YAML
changes them.

Validation and test (whole scans from :class:`lungseg.data.GlanceScanDataset`): :func:`lungseg.inference.
predict_scan` gives 3D candidates and the nodule probability volume, then

* ``<stage>/dice``, ``/iou``, ``/seg_sensitivity``, ``/seg_precision``, ``/hd95`` (mm) — per nodule, 3D,
  on the cache grid, inside the nodule's bounding box + 3 voxels, other nodules' voxels left out
  (:class:`common.metrics.segmentation.SegmentationScores`); scans with masks only; each nodule is keyed by
  (scan uid, label value), so a scan that DDP's ``DistributedSampler`` pads in twice is scored once;
* ``<stage>/cpm`` and ``<stage>/sens@0.125 … sens@8`` — LUNA16 FROC (:class:`common.metrics.froc_torch.
  LUNA16FROC`, official hit rules, DDP-gathered);
* ``<stage>/precision``, ``/recall``, ``/f1``, ``/fp`` (GLANCE Table 3's FP column = 100 − precision %),
  ``/fp_per_scan`` — at the probability ``operating_threshold``, computed with the same hit rules on the
  candidates above it.

Prediction writes, under ``predict_dir`` (default ``<run folder>/predictions``): ``results.csv`` (LUNA16
format + ``diameter_mm``), ``masks/<uid>.mhd`` (or ``.nii.gz``) on the scan's original grid, and
``reference/annotations.csv``, ``annotations_excluded.csv``, ``seriesuids.csv`` for the predicted scans,
so ``lungdata evaluate-froc --results …/results.csv --annotations …/reference/annotations.csv …`` scores
the folder. Predicting a ``predict_root`` of new scans writes empty annotation files.

Checkpoints keep what defines the model (variant, overrides, working size, optimisation); the inference,
evaluation and output settings (:data:`RUN_SETTINGS`) are left out so that ``lungseg test/predict
--ckpt_path …`` takes them from its own command line and config.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import scipy.ndimage as ndi
import torch
from torchmetrics import MetricCollection

from common.lightning.task import BaseTask
from common.metrics.froc_io import write_results_csv
from common.metrics.froc_torch import LUNA16FROC, scan_key_from_uid
from common.metrics.segmentation import SegmentationScores
from common.metrics.unique_samples import sample_key
from lungseg.inference import (
    CSV_LINE_END,
    RESULT_EXTRA_COLUMNS,
    RESULT_FORMAT,
    InferenceConfig,
    ScanPrediction,
    candidate_rows,
    predict_scan,
    save_mask,
    write_reference_csvs,
)
from lungseg.losses import GlanceLoss
from lungseg.models import build_glance, get_variant

log = logging.getLogger(__name__)

__all__ = ["GlanceTask"]

MASK_FORMATS = {"mhd": ".mhd", "nifti": ".nii.gz", "none": None}
BOX_MARGIN = 3
RUN_SETTINGS = [
    "peak_threshold",
    "nms_kernel",
    "nms_radius_mm",
    "max_peaks_per_slice",
    "seg_threshold",
    "filter_by_mask",
    "mask_filter_radius",
    "heatmap_sigma_scale",
    "merge_distance_mm",
    "merge_gap",
    "min_slices",
    "max_candidates",
    "slice_batch_size",
    "flip_tta",
    "operating_threshold",
    "with_hd95",
    "predict_dir",
    "mask_format",
    "mask_grid",
]
"""Inference, evaluation and output arguments: not stored in checkpoints (LightningCLI would otherwise let
a checkpoint's values override the command line of ``test``/``predict --ckpt_path``); each command takes
them from its own config."""


class GlanceTask(BaseTask):
    """GLANCE training / evaluation / prediction.

    Args:
        variant: preset of :mod:`lungseg.models.variants` (``full``, ``detection_only``, ``wo_cscf``,
            ``weighting_uniform``, ``lambda_det_0.4`` …): model and loss configuration of one table row.
        model_overrides: ``GlanceNet`` keyword arguments that win over the preset (``widths``,
            ``gradient_checkpointing`` …).
        loss_overrides: ``GlanceLoss`` keyword arguments that win over the preset (``lambda_det`` …).
        image_size: working size; sets the GCT positional-embedding grid (must equal the datamodule's).
        context_slices: 2.5D input, ``2k + 1`` channels (must equal the datamodule's; linked by the CLI).
        optimizer, lr, weight_decay, scheduler, t0, step_size, gamma, monitor: see ``BaseTask``.
        peak_threshold, nms_kernel, nms_radius_mm, max_peaks_per_slice, seg_threshold, mask_filter_radius,
            heatmap_sigma_scale, merge_distance_mm, merge_gap, min_slices, max_candidates, slice_batch_size,
            flip_tta: inference settings, see :class:`lungseg.inference.InferenceConfig`.
        filter_by_mask: filter heatmap peaks by the segmentation (``None``: when the head was trained).
        operating_threshold: probability threshold of the precision / recall / F1 / FP metrics.
        with_hd95: compute HD95 in validation/test (MONAI; a little slower).
        predict_dir: output folder of ``predict`` (default ``<run folder>/predictions``).
        mask_format: ``"mhd"``, ``"nifti"`` or ``"none"`` for the predicted 3D masks.
        mask_grid: ``"original"`` (the input scan's grid) or ``"cache"`` (the 1 mm grid).
    """

    monitor = "val/cpm"
    monitor_mode = "max"

    def __init__(
        self,
        variant: str = "full",
        model_overrides: dict[str, Any] | None = None,
        loss_overrides: dict[str, Any] | None = None,
        image_size: int = 512,
        context_slices: int = 0,
        optimizer: str = "adamw",
        lr: float = 1e-4,
        weight_decay: float = 0.05,
        scheduler: str = "cosine_warm_restarts",
        t0: int = 20,
        step_size: int = 30,
        gamma: float = 0.1,
        monitor: str | None = None,
        peak_threshold: float = 0.1,
        nms_kernel: int = 3,
        nms_radius_mm: float = 3.0,
        max_peaks_per_slice: int = 10,
        seg_threshold: float = 0.5,
        filter_by_mask: bool | None = None,
        mask_filter_radius: int = 2,
        heatmap_sigma_scale: float = 1.0 / 6.0,
        merge_distance_mm: float = 3.0,
        merge_gap: int = 1,
        min_slices: int = 1,
        max_candidates: int = 100,
        slice_batch_size: int = 16,
        flip_tta: bool = False,
        operating_threshold: float = 0.5,
        with_hd95: bool = True,
        predict_dir: str | None = None,
        mask_format: str = "mhd",
        mask_grid: str = "original",
    ) -> None:
        self.variant = get_variant(variant)
        self.model_overrides = dict(model_overrides or {})
        self.loss_overrides = dict(loss_overrides or {})
        self.image_size = image_size
        self.context_slices = context_slices
        self.with_hd95 = with_hd95
        if mask_format not in MASK_FORMATS:
            raise ValueError(f"mask_format={mask_format!r}: choose one of {sorted(MASK_FORMATS)}")
        if mask_grid not in ("original", "cache"):
            raise ValueError(f"mask_grid={mask_grid!r}: choose 'original' or 'cache'")
        super().__init__(
            optimizer=optimizer,
            lr=lr,
            weight_decay=weight_decay,
            scheduler=scheduler,
            t0=t0,
            step_size=step_size,
            gamma=gamma,
            monitor=monitor,
            ignore=RUN_SETTINGS,
        )
        self.inference = InferenceConfig(
            peak_threshold=peak_threshold,
            nms_kernel=nms_kernel,
            nms_radius_mm=nms_radius_mm,
            max_peaks_per_slice=max_peaks_per_slice,
            seg_threshold=seg_threshold,
            filter_by_mask=True if filter_by_mask is None else filter_by_mask,
            mask_filter_radius=mask_filter_radius,
            heatmap_sigma_scale=heatmap_sigma_scale,
            merge_distance_mm=merge_distance_mm,
            merge_gap=merge_gap,
            min_slices=min_slices,
            max_candidates=max_candidates,
            slice_batch_size=slice_batch_size,
            flip_tta=flip_tta,
        )
        self.filter_by_mask = filter_by_mask
        self.operating_threshold = operating_threshold
        self.predict_dir = predict_dir
        self.mask_format = mask_format
        self.mask_grid = mask_grid
        self.register_buffer("seg_supervised", torch.tensor(False), persistent=True)
        self._predicted: list[tuple[str, Any]] = []
        self._references: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ configure_* hooks
    def configure_models(self) -> None:
        config = {
            "img_size": self.image_size,
            "in_channels": 2 * self.context_slices + 1,
            **self.model_overrides,
        }
        self.model = build_glance(self.variant.name, **config)

    def configure_losses(self) -> None:
        self.criterion = GlanceLoss(**{**self.variant.loss, **self.loss_overrides})

    def configure_metrics(self) -> MetricCollection:
        return MetricCollection(
            {
                "seg": SegmentationScores(with_hd95=self.with_hd95),
                "froc": LUNA16FROC(),
                "operating": LUNA16FROC(max_marks=None),
            },
            compute_groups=False,
        )

    # ------------------------------------------------------------------ training
    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        return self.model(x)

    def compute_loss(self, outputs: dict[str, Any], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Eq. 9 with the segmentation terms on the samples that have a nodule mask only."""
        terms: dict[str, torch.Tensor] = {}
        total: torch.Tensor | None = None
        has_mask = torch.as_tensor(batch["has_mask"], device=batch["image"].device).bool().reshape(-1)
        if "seg" in outputs and bool(has_mask.any()):
            seg_out = {
                "seg": outputs["seg"][has_mask],
                "aux": [a[has_mask] for a in outputs.get("aux") or []],
            }
            seg_terms = self.criterion(seg_out, {"mask": batch["mask"][has_mask]})
            total = seg_terms.pop("loss")
            terms.update(seg_terms)
            self.seg_supervised.fill_(True)
        if "heatmap" in outputs:
            det_terms = self.criterion({"heatmap": outputs["heatmap"]}, {"heatmap": batch["heatmap"]})
            det = det_terms.pop("loss")
            total = det if total is None else total + det
            terms.update(det_terms)
        if total is None:
            raise ValueError(
                f"variant {self.variant.name!r} predicts only a segmentation, but this batch has no nodule "
                "masks (LUNA16/Tianchi are detection-only); train a variant with a heatmap head"
            )
        terms["loss"] = total
        return terms

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        terms = self.compute_loss(self(batch["image"]), batch)
        size = int(batch["image"].shape[0])
        self.log("train/loss", terms["loss"], prog_bar=True, batch_size=size)
        self.log_dict(
            {f"train/{k}": v.detach() for k, v in terms.items() if k != "loss"},
            on_step=False,
            on_epoch=True,
            batch_size=size,
        )
        return terms["loss"]

    # ------------------------------------------------------------------ evaluation
    def predict_item(self, item: dict[str, Any]) -> ScanPrediction:
        """Inference on one scan item (model in its current mode)."""
        use_filter = self.filter_by_mask if self.filter_by_mask is not None else bool(self.seg_supervised)
        # a segmentation head that never saw a mask is not used at all (not even for sizes), unless forced
        use_seg = bool(self.seg_supervised) or use_filter
        return predict_scan(self.model, item, self.inference, filter_by_mask=use_filter, segmentation=use_seg)

    def _score(self, stage: str, item: dict[str, Any], pred: ScanPrediction) -> None:
        metrics = self.metrics_for(stage)
        key = [scan_key_from_uid(item["uid"])]
        candidates = pred.candidates.as_tensor()
        metrics["froc"].update(key, [candidates], [item["nodules"]], [item["excluded"]])
        kept = candidates[candidates[:, 3] >= self.operating_threshold]
        metrics["operating"].update(key, [kept], [item["nodules"]], [item["excluded"]])
        labels = item.get("labels")
        if labels is None or pred.probability is None:
            return
        values, preds, targets = self.nodule_boxes(labels, pred.probability >= self.inference.seg_threshold)
        if preds:
            spacing = tuple(float(v) for v in item["spacing"])
            # a nodule is (scan, label value) on every rank: a scan padded in twice is scored once
            keys = [sample_key(item["uid"], v) for v in values]
            metrics["seg"].update(preds, targets, [spacing] * len(preds), keys=keys)

    @staticmethod
    def nodule_boxes(
        labels: np.ndarray, predicted: np.ndarray
    ) -> tuple[list[int], list[np.ndarray], list[np.ndarray]]:
        """Per reference nodule: its label value and (prediction, reference) in its bounding box + margin.

        Voxels of other nodules inside the box are left out of both masks.
        """
        values, preds, targets = [], [], []
        for value, box in enumerate(ndi.find_objects(np.asarray(labels)), start=1):
            if box is None:
                continue
            grown = tuple(slice(max(s.start - BOX_MARGIN, 0), s.stop + BOX_MARGIN) for s in box)
            region = np.asarray(labels[grown])
            others = (region > 0) & (region != value)
            values.append(value)
            preds.append(np.asarray(predicted[grown], dtype=bool) & ~others)
            targets.append(region == value)
        return values, preds, targets

    def _evaluate(self, batch: list[dict[str, Any]], stage: str) -> None:
        for item in batch:
            self._score(stage, item, self.predict_item(item))

    def validation_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def stage_values(self, stage: str) -> dict[str, torch.Tensor]:
        """The epoch's segmentation, FROC and operating-point values of ``stage`` (metrics not reset)."""
        metrics = self.metrics_for(stage)
        values: dict[str, torch.Tensor] = {}
        seg = metrics["seg"]
        # Computed on every rank even without local cases: under DDP compute() gathers, and a rank whose
        # scans had no masks must take part; n_cases (all ranks) decides whether there is anything to log.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*was called before the ``update`` method.*")
            seg_values = seg.compute()
        if seg.n_cases:
            names = {"sensitivity": "seg_sensitivity", "precision": "seg_precision"}
            values.update({f"{stage}/{names.get(k, k)}": v for k, v in seg_values.items()})
        if metrics["froc"].update_called:
            values.update({f"{stage}/{k}": v for k, v in metrics["froc"].compute().items()})
            counts = metrics["operating"].compute_result().counts
            tp, fp = counts.true_positives, counts.false_positives
            precision = tp / (tp + fp) if tp + fp else 0.0
            recall = tp / counts.n_nodules if counts.n_nodules else float("nan")
            f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
            values.update(
                {
                    f"{stage}/precision": torch.tensor(precision),
                    f"{stage}/recall": torch.tensor(recall),
                    f"{stage}/f1": torch.tensor(f1),
                    f"{stage}/fp": torch.tensor(100.0 * (1.0 - precision)),
                    f"{stage}/fp_per_scan": torch.tensor(fp / max(counts.n_scans, 1)),
                }
            )
        return {k: v.float() for k, v in values.items()}

    def _log_stage(self, stage: str) -> None:
        values = self.stage_values(stage)
        if values:
            self.log_dict(values, sync_dist=False)
        self.metrics_for(stage).reset()

    def on_validation_epoch_end(self) -> None:
        self._log_stage("val")

    def on_test_epoch_end(self) -> None:
        self._log_stage("test")

    # ------------------------------------------------------------------ prediction
    @property
    def output_dir(self) -> Path:
        """Where ``predict`` writes (``predict_dir`` or ``<run folder>/predictions``)."""
        if self.predict_dir:
            return Path(self.predict_dir)
        trainer = self._trainer
        base = (trainer.log_dir or trainer.default_root_dir) if trainer is not None else "."
        return Path(base) / "predictions"

    def on_predict_epoch_start(self) -> None:
        self._predicted, self._references = [], []

    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int) -> list[dict[str, Any]]:
        summaries = []
        suffix = MASK_FORMATS[self.mask_format]
        for item in batch:
            pred = self.predict_item(item)
            self._predicted.append((pred.uid, pred.candidates))
            self._references.append({k: item[k] for k in ("uid", "nodules", "excluded")})
            mask_path = None
            mask = pred.mask(self.inference.seg_threshold)
            if suffix is not None and mask is not None:
                mask_path = save_mask(
                    mask, item, self.output_dir / "masks" / f"{pred.uid}{suffix}", self.mask_grid
                )
            summaries.append(
                {
                    "uid": pred.uid,
                    "candidates": len(pred.candidates),
                    "mask": str(mask_path) if mask_path else None,
                }
            )
        return summaries

    def on_predict_epoch_end(self) -> None:
        predicted, references = self._predicted, self._references
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, (predicted, references))
            predicted = [p for part in gathered for p in part[0]]
            references = [r for part in gathered for r in part[1]]
        if self.global_rank != 0:
            return
        out = self.output_dir
        seen: set[str] = set()
        unique = [(u, c) for u, c in predicted if not (u in seen or seen.add(u))]
        seen = set()
        refs = [r for r in references if not (r["uid"] in seen or seen.add(r["uid"]))]
        write_results_csv(
            candidate_rows(unique),
            out / "results.csv",
            extra_columns=RESULT_EXTRA_COLUMNS,
            float_format=RESULT_FORMAT,
            lineterminator=CSV_LINE_END,
        )
        write_reference_csvs(refs, out / "reference")
        log.info("GLANCE predictions for %d scans written to %s", len(unique), out)
