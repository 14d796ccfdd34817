"""Lightning tasks of CLAF: ``CandidateTask`` (stage 1) and ``FPRTask`` (stage 2, MPPN).

``CandidateTask``
    fit: crops from ``CandidateDataModule`` → coordinate maps from each crop's place in the scan → candidate
    net → anchor targets (``lungdet.anchors.assign_targets``, here so the anchor configuration lives next to
    the network whose grid it must match) → ``DetectionLoss`` (focal + smooth-L1, OHEM, learned weights;
    a submodule, so its weights are optimised and checkpointed).
    validate / test: whole-scan sliding-window inference on every scan (``lungdet.inference.detect_scan``),
    candidates → world mm → ``LUNA16FROC``; logs ``<stage>/cpm``, ``<stage>/sens@<rate>`` for the seven
    LUNA16 rates, ``<stage>/sens@0.55`` (``fp_rate``, the paper's operating point), ``<stage>/recall``
    (stage-1 recall: nodules hit by any of the ≤ 100 candidates) and ``<stage>/candidates_per_scan``.
    test also writes ``test_results.csv``, ``test_froc.json`` and ``test_froc.png`` into the run folder.
    predict: the same inference; ``results.csv`` (LUNA16 results format) in the run folder, or
    ``results_csv``.

``FPRTask``
    fit: 32×48×48 candidate crops (1 true : 3 false per epoch) → MPPN → cross-entropy (Adam, 1e-4).
    validate / test: per scan, the candidates the datamodule attached, or — when it attached none
    (``eval_candidates: stage1``, or predicting on a folder) — the candidates of the stage-1 checkpoint
    ``stage1_checkpoint`` run on the scan; MPPN probability per candidate, optionally fused with the
    stage-1 score: ``(1 − w)·p_MPPN + w·p_stage1``, w = ``stage1_weight``, or — with ``fusion_search`` —
    the w chosen on the validation scans (``lungdet.fusion.choose_fusion``, max validation CPM; logged as
    ``val/stage1_weight`` and ``val/cpm_w<w>``, saved in the checkpoint, used by test and predict of that
    checkpoint); logs AUC and accuracy over labelled candidates, the FROC of the
    re-scored candidates and sensitivity at 0.55 FP/scan, and — when the candidates carry stage-1 scores —
    the same FROC numbers for the stage-1 scores of the same candidates (``<stage>/stage1_cpm``, …) and,
    when the scores are fused, for the MPPN alone (``<stage>/mppn_cpm``, …), so one run shows what each
    stage adds; test writes ``test_results.csv``, ``test_results_stage1.csv`` (and ``_mppn``) and
    ``test_fusion.json`` (the weight used, where it came from, the validation CPM of every weight tried).
    predict writes the two-stage ``results.csv``.

Reproducibility: before every training batch the global torch/numpy/python generators are reseeded from
(``PL_GLOBAL_SEED``, epoch, batch index). Dropout then draws the same masks in epoch *e* whether the run
started at epoch 0 or resumed from an epoch-end checkpoint; the data side is made deterministic the same
way by ``lungdet.data.EpochSampler``.
"""

from __future__ import annotations

import abc
import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC

from common.lightning.task import BaseTask
from common.metrics.detection import sensitivity_at_fp_rate
from common.metrics.figures import plot_froc
from common.metrics.froc import FROCResult
from common.metrics.froc_io import write_results_csv
from common.metrics.froc_torch import LUNA16FROC, scan_key_from_uid
from lungdet.anchors import DEFAULT_ANCHOR_SIZES, anchor_grid, assign_targets_batch
from lungdet.candidates import label_candidates
from lungdet.fusion import CHECKPOINT_KEY, FusionChoice, ScoredScan, choose_fusion
from lungdet.inference import (
    Stage1Inference,
    candidates_to_world,
    detect_scan,
    fuse_scores,
    score_candidates,
)
from lungdet.losses import DetectionLoss
from lungdet.models import build_candidate_net, build_mppn, coordinate_maps
from lungdet.scan_reader import DEFAULT_FILL

log = logging.getLogger(__name__)

__all__ = ["STAGE1_RUNTIME", "STAGE2_RUNTIME", "CandidateTask", "FPRTask"]

#: Inference and reporting options of stage 1: the fields of `Stage1Inference` plus the reporting ones. They
#: are run-time choices, not part of the trained model, so they stay out of the checkpoint's hyperparameters:
#: LightningCLI re-applies a checkpoint's hyperparameters over the command line, and
#: `lungdet test --ckpt_path … --model.init_args.score_threshold 0.05` must win.
STAGE1_RUNTIME = (*Stage1Inference.field_names(), "fp_rate", "results_csv")
#: The same for stage 2 (which stage-1 checkpoint to chain, how to fuse, where to write).
STAGE2_RUNTIME = (
    "stage1_checkpoint",
    "stage1_inference",
    "stage1_weight",
    "fusion_search",
    "chunk_size",
    "mirror_tta",
    "engine",
    "fp_rate",
    "results_csv",
)


def _reseed_for_batch(epoch: int, batch_idx: int) -> None:
    """Seed the global generators from (run seed, epoch, batch): dropout masks then depend on nothing else.

    Per batch rather than per epoch because Lightning draws from the global generator when it creates a
    data-loader iterator, and a resumed run creates its first iterator at a different moment.
    """
    base = int(os.environ.get("PL_GLOBAL_SEED", 0))
    seed = int(np.random.SeedSequence([base, int(epoch), int(batch_idx)]).generate_state(1)[0])
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


class _DetectionTaskMixin(abc.ABC):
    """FROC bookkeeping shared by both stages: per-stage metrics, per-scan rows, epoch-end logging, files.

    Scores come in *kinds*: ``""`` for a task's final output, ``"stage1"`` for the stage-1 scores of the
    same candidates and ``"mppn"`` for the MPPN probability alone when it is fused with them (``FPRTask``
    records all it has, so a test run shows what each stage contributes on identical marks).
    """

    _KINDS = ("", "stage1", "mppn")
    monitor = "val/cpm"
    monitor_mode = "max"

    @abc.abstractmethod
    def _eval_step(self, scans: list[dict[str, Any]], stage: str) -> None:
        """Score the scans of one batch and record them for `stage` ("val", "test" or "predict")."""

    def validation_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int) -> int:
        self._eval_step(batch, "predict")
        return len(batch)

    def _init_detection_state(self) -> None:
        self.froc = nn.ModuleDict(
            {_key(stage, kind): LUNA16FROC() for stage in ("val", "test") for kind in self._KINDS}
        )
        self._rows: dict[str, list[tuple[str, float, float, float, float]]] = {
            _key(stage, kind): [] for stage in ("val", "test", "predict") for kind in self._KINDS
        }

    def _sync_pad_value(self) -> None:
        """Pad scans and crops with the datamodule's fill value (what the networks saw outside the scan)."""
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "fill_value"):
            self.pad_value = float(dm.fill_value)

    def on_fit_start(self) -> None:
        self._sync_pad_value()

    def on_validation_start(self) -> None:
        self._sync_pad_value()

    def on_test_start(self) -> None:
        self._sync_pad_value()

    def on_predict_start(self) -> None:
        self._sync_pad_value()

    def _record_scan(
        self, stage: str, scan: dict[str, Any], world: np.ndarray, scores: Tensor, kind: str = ""
    ) -> None:
        """Add one scan's candidates to the FROC (val/test) and to the rows written to CSV."""
        probs = scores.detach().double().cpu().numpy().reshape(-1)
        rows = [(scan["uid"], float(x), float(y), float(z), float(p)) for (x, y, z), p in zip(world, probs)]
        self._rows[_key(stage, kind)].extend(rows)
        if stage == "predict":
            return
        marks = torch.as_tensor(np.concatenate([world.reshape(-1, 3), probs[:, None]], axis=1))
        self.froc[_key(stage, kind)].update(
            [scan_key_from_uid(scan["uid"])], [marks], [scan["nodules"].cpu()], [scan["excluded"].cpu()]
        )

    def _run_dir(self) -> Path:
        trainer = self.trainer
        return Path(trainer.log_dir or trainer.default_root_dir)

    def _gather_rows(self, key: str) -> list[tuple[str, float, float, float, float]]:
        rows = self._rows[key]
        self._rows[key] = []
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        return rows

    def _log_froc(self, stage: str, kind: str = "") -> FROCResult | None:
        metric = self.froc[_key(stage, kind)]
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not distributed and not metric.scan_key:
            return None
        result = metric.compute_result()
        metric.reset()
        prefix = f"{stage}/{kind + '_' if kind else ''}"
        op = sensitivity_at_fp_rate(result.curve, self.fp_rate)
        values = {f"{prefix}cpm": result.cpm, f"{prefix}sens@{self.fp_rate:g}": op}
        for rate, sens in zip(result.fp_rates, result.sensitivities):
            values[f"{prefix}sens@{rate:g}"] = float(sens)
        values[f"{prefix}recall"] = result.counts.sensitivity
        values[f"{prefix}candidates_per_scan"] = result.counts.candidates_per_scan
        self.log_dict({k: float(v) for k, v in values.items()}, sync_dist=False)
        result.extra[f"sensitivity_at_{self.fp_rate:g}_fp_per_scan"] = op
        return result

    def _write_test_outputs(self, result: FROCResult | None, name: str, kind: str = "") -> None:
        rows = self._gather_rows(_key("test", kind))
        if self.trainer.global_rank != 0 or (kind and result is None and not rows):
            return
        run = self._run_dir()
        suffix = f"_{kind}" if kind else ""
        write_results_csv(rows, run / f"test_results{suffix}.csv")
        if result is not None:
            (run / f"test_froc{suffix}.json").write_text(
                json.dumps(result.to_dict(include_curve=True), indent=2)
            )
            plot_froc(result, run / f"test_froc{suffix}.png", label=name)
        log.info("test results written to %s", run)

    def _write_predictions(self) -> None:
        rows = self._gather_rows("predict")
        for kind in self._KINDS[1:]:
            self._rows[_key("predict", kind)] = []
        if self.trainer.global_rank != 0:
            return
        path = Path(self.results_csv) if self.results_csv else self._run_dir() / "results.csv"
        write_results_csv(rows, path)
        self.results_path = path
        log.info("wrote %d candidates to %s", len(rows), path)
        print(f"lungdet: results written to {path}")


def _key(stage: str, kind: str = "") -> str:
    return f"{stage}_{kind}" if kind else stage


class CandidateTask(_DetectionTaskMixin, BaseTask):
    """Stage 1: the anchor-based 3D candidate network (see the module docstring).

    Args:
        variant: encoder variant of Table 9: "unet", "unet_cbam" or "ascrm" (CLAF).
        width: base channel count (16 ≈ the paper's 1.77 M parameters).
        use_coords: concatenate coordinate channels.
        block_depth: conv layers per encoder block.
        decoder_depth: conv layers per decoder block.
        head_channels: head width.
        dropout: head dropout.
        anchor_sizes: anchor diameters (mm = voxels at 1 mm).
        focal_alpha: focal-loss α.
        focal_gamma: focal-loss γ.
        neg_pos_ratio: OHEM negatives kept per positive anchor.
        min_negatives: OHEM negatives kept per crop at least.
        loss_weighting: "uncertainty" (learned, the paper's dynamic weighting) or "fixed".
        pos_iou: anchor IoU above which an anchor is positive.
        neg_iou: anchor IoU below which an anchor is negative.
        block_size: whole-scan inference block (paper: 128).
        overlap: block overlap fraction.
        sw_batch_size: blocks per forward pass at inference.
        blend_mode: "constant" or "gaussian" blending of overlapping blocks.
        score_threshold: minimum objectness of a candidate.
        nms_iou: 3D NMS threshold (cube IoU).
        merge_factor: centre-distance NMS radius in candidate diameters (0: off).
        max_candidates: candidates kept per scan (LUNA16 evaluates at most 100).
        pre_nms_top_k: best-scoring anchors that enter the NMS.
        engine: how the network runs on a CPU (``Stage1Inference.engine``; "eager" is fp32 PyTorch).
        fp_rate: operating point reported as ``<stage>/sens@<fp_rate>`` (paper: 0.55 FP/scan).
        results_csv: where ``predict`` writes its CSV (default ``<run folder>/results.csv``).
        **kwargs: ``BaseTask`` optimisation arguments (optimizer, lr, weight_decay, scheduler, ...).

    The inference arguments (``block_size`` … ``engine``) keep their flat config keys and become one
    ``Stage1Inference`` (``self.inference``), the only thing ``detect`` hands on. They and the reporting
    arguments (``STAGE1_RUNTIME``) are not saved as hyperparameters: give them in the config of every run
    that evaluates or predicts.
    """

    def __init__(
        self,
        variant: str = "ascrm",
        width: int = 16,
        use_coords: bool = True,
        block_depth: int = 2,
        decoder_depth: int = 2,
        head_channels: int = 64,
        dropout: float = 0.2,
        anchor_sizes: tuple[float, ...] = DEFAULT_ANCHOR_SIZES,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        neg_pos_ratio: float = 3.0,
        min_negatives: int = 16,
        loss_weighting: str = "uncertainty",
        pos_iou: float = 0.5,
        neg_iou: float = 0.02,
        block_size: int = 128,
        overlap: float = 0.25,
        sw_batch_size: int = 2,
        blend_mode: str = "constant",
        score_threshold: float = 0.1,
        nms_iou: float = 0.1,
        merge_factor: float = 1.0,
        max_candidates: int = 100,
        pre_nms_top_k: int = 5000,
        engine: str = "eager",
        fp_rate: float = 0.55,
        results_csv: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(ignore=list(STAGE1_RUNTIME), **kwargs)
        self.inference = Stage1Inference(
            block_size=block_size,
            overlap=overlap,
            sw_batch_size=sw_batch_size,
            blend_mode=blend_mode,
            score_threshold=score_threshold,
            nms_iou=nms_iou,
            merge_factor=merge_factor,
            max_candidates=max_candidates,
            pre_nms_top_k=pre_nms_top_k,
            engine=engine,
        )
        self.fp_rate = fp_rate
        self.results_csv = results_csv
        self._init_detection_state()
        self._anchors: dict[tuple[int, ...], Tensor] = {}
        self.pad_value = DEFAULT_FILL

    def configure_models(self) -> None:
        hp = self.hparams
        self.model = build_candidate_net(
            hp.variant,
            width=hp.width,
            use_coords=hp.use_coords,
            block_depth=hp.block_depth,
            decoder_depth=hp.decoder_depth,
            head_channels=hp.head_channels,
            dropout=hp.dropout,
            anchor_sizes=tuple(hp.anchor_sizes),
        )

    def configure_losses(self) -> None:
        hp = self.hparams
        self.criterion = DetectionLoss(
            focal_alpha=hp.focal_alpha,
            focal_gamma=hp.focal_gamma,
            neg_pos_ratio=hp.neg_pos_ratio,
            min_negatives=hp.min_negatives,
            weighting=hp.loss_weighting,
        )

    # ---------------------------------------------------------------------------------------- training
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        _reseed_for_batch(self.current_epoch, batch_idx)

    def anchors_for(self, grid_shape: tuple[int, ...], device: torch.device) -> Tensor:
        """The anchor grid of a prediction grid (cached per shape)."""
        key = tuple(int(s) for s in grid_shape)
        if key not in self._anchors:
            self._anchors[key] = anchor_grid(key, self.model.stride, tuple(self.hparams.anchor_sizes))
        return self._anchors[key].to(device)

    def coords_for(self, batch: dict[str, Any], images: Tensor) -> Tensor | None:
        if not self.hparams.use_coords:
            return None
        return coordinate_maps(
            batch["start"], images.shape[-3:], batch["scan_shape"], dtype=images.dtype, device=images.device
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        images = batch["image"]
        out = self.model(images, self.coords_for(batch, images))
        anchors = self.anchors_for(out.shape[1:4], out.device)
        labels, deltas = assign_targets_batch(
            anchors,
            [b.to(out.device) for b in batch["boxes"]],
            [b.to(out.device) for b in batch["ignore"]],
            pos_iou=self.hparams.pos_iou,
            neg_iou=self.hparams.neg_iou,
        )
        result = self.criterion(out, labels, deltas)
        self.log_dict(result.log_dict("train/"), batch_size=images.shape[0], prog_bar=False)
        return result.loss

    # ------------------------------------------------------------------------------------- evaluation
    def detect(self, image: Tensor) -> Tensor:
        """Stage-1 candidates (score, z, y, x, d) of one prepared scan with this task's inference settings."""
        was_training = self.model.training
        self.model.eval()
        try:
            return detect_scan(self.model, image, self.inference, pad_value=self.pad_value)
        finally:
            self.model.train(was_training)

    def _eval_step(self, scans: list[dict[str, Any]], stage: str) -> None:
        for scan in scans:
            cands = self.detect(scan["image"])
            world = candidates_to_world(cands[:, 1:4], scan["entry"])
            self._record_scan(stage, scan, world, cands[:, 0])

    def on_validation_epoch_end(self) -> None:
        self._rows["val"] = []
        self._log_froc("val")

    def on_test_epoch_end(self) -> None:
        self._write_test_outputs(self._log_froc("test"), f"CLAF stage 1 ({self.hparams.variant})")

    def on_predict_epoch_end(self) -> None:
        self._write_predictions()


class FPRTask(_DetectionTaskMixin, BaseTask):
    """Stage 2: MPPN false-positive reduction, and the two-stage pipeline at evaluation/prediction time.

    Args:
        width: MPPN first-stage channels (32 ≈ 2.7 M parameters).
        num_classes: 2 (softmax cross-entropy, the paper) or 1 (a single logit with BCE).
        block_depth: conv layers per residual stage.
        dropout: dropout before the classifier.
        members: 1 = the paper's single MPPN; K ≥ 2 = a deep ensemble of K independently initialised MPPNs
            trained side by side on the same batches, scored by their mean probability (K× the stage-2
            cost; not in the paper, see ``lungdet.models.mppn.MPPNEnsemble``).
        stage1_checkpoint: a ``CandidateTask`` checkpoint; used whenever a scan comes without candidates
            (two-stage evaluation, prediction on new scans).
        stage1_inference: stage-1 inference options for the chained checkpoint (fields of
            ``Stage1Inference``, e.g. ``{block_size: 128, score_threshold: 0.05}``); the defaults otherwise.
        stage1_weight: final score = (1 − w)·p_MPPN + w·p_stage1 (0 = MPPN only, the paper); with
            ``fusion_search`` the weight preferred on ties.
        fusion_search: choose w on the validation scans at every validation epoch end (max validation CPM
            over ``lungdet.fusion.FUSION_GRID``), keep the choice in the checkpoint and score test and
            predict with it; false: always ``stage1_weight`` (reproducing the paper: false with 0).
        chunk_size: candidates per MPPN forward pass at evaluation.
        mirror_tta: score each candidate as the mean MPPN probability over its 8 mirrored crops (test-time
            augmentation, 8× the stage-2 compute; not in the paper).
        engine: how the MPPN runs on a CPU (``lungdet.inference.Stage1Inference.engine``; "eager" is fp32
            PyTorch).
        fp_rate: operating point reported as ``<stage>/sens@<fp_rate>``.
        results_csv: where ``predict`` writes its CSV (default ``<run folder>/results.csv``).
        optimizer: optimiser name (paper: Adam).
        lr: learning rate (paper: 1e-4).
        **kwargs: other ``BaseTask`` arguments.
    """

    def __init__(
        self,
        width: int = 32,
        num_classes: int = 2,
        block_depth: int = 2,
        dropout: float = 0.5,
        members: int = 1,
        stage1_checkpoint: str | None = None,
        stage1_inference: dict[str, Any] | None = None,
        stage1_weight: float = 0.0,
        fusion_search: bool = False,
        chunk_size: int = 64,
        mirror_tta: bool = False,
        engine: str = "eager",
        fp_rate: float = 0.55,
        results_csv: str | None = None,
        optimizer: str = "adam",
        lr: float = 1e-4,
        **kwargs: Any,
    ) -> None:
        if not 0.0 <= stage1_weight <= 1.0:
            raise ValueError(f"stage1_weight must lie in [0, 1], got {stage1_weight}")
        Stage1Inference().updated(stage1_inference)  # names and values checked before any training
        super().__init__(optimizer=optimizer, lr=lr, ignore=list(STAGE2_RUNTIME), **kwargs)
        self.stage1_checkpoint = stage1_checkpoint
        self.stage1_inference = dict(stage1_inference or {})
        self.stage1_weight = stage1_weight
        self.fusion_search = bool(fusion_search)
        #: the validation choice (this run's last validation, or the checkpoint's); None before either
        self.fusion: FusionChoice | None = None
        self._val_scans: list[ScoredScan] = []
        self.chunk_size = chunk_size
        self.mirror_tta = mirror_tta
        Stage1Inference(engine=engine)  # the same engine names; refused here before any training
        self.engine = engine
        self.fp_rate = fp_rate
        self.results_csv = results_csv
        self._init_detection_state()
        self._stage1: CandidateTask | None = None
        self.pad_value = DEFAULT_FILL

    def configure_models(self) -> None:
        hp = self.hparams
        self.model = build_mppn(
            width=hp.width,
            num_classes=hp.num_classes,
            block_depth=hp.block_depth,
            dropout=hp.dropout,
            members=hp.members,
        )

    def configure_metrics(self) -> MetricCollection:
        return MetricCollection({"auc": BinaryAUROC(), "acc": BinaryAccuracy()})

    # ---------------------------------------------------------------------------------------- stage 1
    @property
    def stage1(self) -> CandidateTask:
        """The stage-1 task from ``stage1_checkpoint`` (loaded once, frozen, not part of this state dict)."""
        if self._stage1 is None:
            path = self.stage1_checkpoint
            if not path:
                raise ValueError(
                    "this scan comes without candidates, so stage 1 must run: set model.init_args.stage1_checkpoint "
                    "to a CandidateTask checkpoint (e.g. `--model.init_args.stage1_checkpoint runs/.../last.ckpt`)"
                )
            if not Path(path).is_file():
                raise FileNotFoundError(f"stage1_checkpoint {path} does not exist; train stage 1 first")
            task = CandidateTask.load_from_checkpoint(
                path, map_location=self.device, weights_only=True, **self.stage1_inference
            )
            task.eval().requires_grad_(False)
            task.pad_value = self.pad_value
            self._check_stage1_preprocessing(path)
            object.__setattr__(
                self, "_stage1", task
            )  # not a submodule: stays out of checkpoints and the optimiser
        assert self._stage1 is not None
        self._stage1.to(self.device)
        return self._stage1

    def _check_stage1_preprocessing(self, path: str) -> None:
        """Refuse a stage-1 checkpoint trained on differently prepared scans (window, mask, fill)."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or not hasattr(dm, "preprocessing"):
            return
        saved = (
            torch.load(path, map_location="cpu", weights_only=False).get("datamodule_hyper_parameters") or {}
        )
        ours = dm.preprocessing()
        for key in ("window", "mask_outside_lung", "outside_hu", "lung_margin", "spacing"):
            if key in saved:
                theirs = list(saved[key]) if isinstance(saved[key], tuple | list) else saved[key]
                if theirs != ours[key]:
                    raise ValueError(
                        f"{path} was trained with {key}={theirs} but this datamodule prepares scans with "
                        f"{key}={ours[key]}; use the same preprocessing for both stages"
                    )

    # ---------------------------------------------------------------------------------------- training
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        _reseed_for_batch(self.current_epoch, batch_idx)

    def _loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        logits = logits.float()  # bf16-mixed: the loss in fp32
        if logits.ndim == 3:  # (B, K, C) of an ensemble: the mean of the members' losses
            k = logits.shape[1]
            return self._loss(logits.flatten(0, 1), labels.repeat_interleave(k))
        if self.hparams.num_classes == 1:
            return F.binary_cross_entropy_with_logits(logits[:, 0], labels.to(logits.dtype))
        return F.cross_entropy(logits, labels)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        logits = self.model(batch["image"])
        loss = self._loss(logits, batch["label"])
        probs = self.model.nodule_probability(logits.detach())
        self.train_metrics["acc"].update(probs, batch["label"])
        self.log("train/loss", loss, batch_size=logits.shape[0])
        self.log(
            "train/acc", self.train_metrics["acc"], on_step=False, on_epoch=True, batch_size=logits.shape[0]
        )
        return loss

    # ------------------------------------------------------------------------------------- evaluation
    def _sync_pad_value(self) -> None:
        super()._sync_pad_value()
        if self._stage1 is not None:
            self._stage1.pad_value = self.pad_value

    def _candidates(self, scan: dict[str, Any]) -> tuple[Tensor, np.ndarray, Tensor | None]:
        """(voxel zyx, world xyz, stage-1 score or None) of a scan: attached ones, else stage 1's."""
        if "candidates" in scan:
            centres, world, stage1 = (
                scan["candidates"],
                scan["candidates_world"].cpu().numpy(),
                scan["stage1"],
            )
            if scan.get("stage1_list"):  # its own stage-1 list: keep what detect() would keep
                settings = self.stage1.inference
                order = torch.argsort(-stage1, stable=True)
                order = order[stage1[order] >= settings.score_threshold]
                if settings.max_candidates >= 0:
                    order = order[: settings.max_candidates]
                centres, world, stage1 = centres[order], world[order.numpy()], stage1[order]
            return centres, world, stage1
        cands = self.stage1.detect(scan["image"])
        return cands[:, 1:4], candidates_to_world(cands[:, 1:4], scan["entry"]), cands[:, 0]

    def score(self, scan: dict[str, Any]) -> tuple[np.ndarray, Tensor, Tensor, Tensor | None]:
        """Final candidates of one scan: world xyz, final (fused) score, MPPN probability, stage-1 score."""
        centres, world, stage1 = self._candidates(scan)
        was_training = self.model.training
        self.model.eval()
        try:
            p = score_candidates(
                self.model,
                scan["image"],
                centres,
                chunk_size=self.chunk_size,
                pad_value=self.pad_value,
                mirror=self.mirror_tta,
                engine=self.engine,
            )
        finally:
            self.model.train(was_training)
        return world, fuse_scores(p, stage1, self.fusion_weight), p, stage1

    @property
    def fusion_weight(self) -> float:
        """The stage-1 weight scored with: the validation choice under ``fusion_search``, else ``stage1_weight``."""
        if self.fusion_search and self.fusion is not None:
            return self.fusion.stage1_weight
        return self.stage1_weight

    def _searching(self, stage: str) -> bool:
        return stage == "val" and self.fusion_search

    def _eval_step(self, scans: list[dict[str, Any]], stage: str) -> None:
        for scan in scans:
            world, final, p, stage1 = self.score(scan)
            if self._searching(stage):  # the final score waits for the epoch's choice of w
                self._val_scans.append(ScoredScan.from_scan(scan, world, p, stage1))
            else:
                self._record_scan(stage, scan, world, final)
            if stage == "predict":
                continue
            if stage1 is not None and not bool(torch.isnan(stage1).any()):
                self._record_scan(stage, scan, world, stage1, kind="stage1")
                if self.fusion_weight > 0 or self._searching(stage):
                    self._record_scan(stage, scan, world, p, kind="mppn")
            if "labels" in scan:
                labels, ignore = scan["labels"], scan["ignore"].to(torch.bool)
            else:  # stage-1 candidates: label them with the same LUNA16 hit rule as the datamodule
                lab, ign = label_candidates(
                    world, scan["nodules"].cpu().numpy(), scan["excluded"].cpu().numpy()
                )
                labels, ignore = torch.from_numpy(lab), torch.from_numpy(ign)
            keep = ~ignore.to(p.device)
            if bool(keep.any()):
                target = labels.to(p.device)[keep]
                self.metrics_for(stage).update(p[keep], target)
                loss = F.binary_cross_entropy(p[keep].clamp(1e-6, 1 - 1e-6), target.to(p.dtype))
                self.log(f"{stage}/loss", loss, batch_size=int(keep.sum()))

    def _log_classification(self, stage: str) -> None:
        metrics = self.metrics_for(stage)
        if metrics["auc"].update_count:
            self.log_dict({k: float(v) for k, v in metrics.compute().items()})
        metrics.reset()

    def _choose_fusion(self) -> None:
        """Choose w on this epoch's validation scans (all ranks), then score them with it as ``val/…``."""
        scans, self._val_scans = self._val_scans, []
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, scans)
            unique = {s.uid: s for part in reversed(gathered) for s in part}  # sampler padding repeats scans
            scans = list(unique.values())
        if not scans:
            return
        choice = choose_fusion(scans, self.stage1_weight, epoch=int(self.current_epoch))
        if not self.trainer.sanity_checking:  # a sanity check sees a batch or two: not a choice to keep
            self.fusion = choice
        values = {"val/stage1_weight": choice.stage1_weight}
        values.update({f"val/cpm_w{w:g}": c for w, c in choice.validation_cpm.items() if c is not None})
        self.log_dict({k: float(v) for k, v in values.items()}, sync_dist=False)
        for scan in scans:
            item = {"uid": scan.uid, "nodules": scan.nodules, "excluded": scan.excluded}
            self._record_scan("val", item, scan.world, scan.fused(choice.stage1_weight))

    def on_validation_epoch_end(self) -> None:
        if self.fusion_search:
            self._choose_fusion()
        self._log_classification("val")
        self._log_froc("val")
        self._log_froc("val", "stage1")
        if self.fusion_search or self.fusion_weight > 0:
            self._log_froc("val", "mppn")
        for kind in self._KINDS:
            self._rows[_key("val", kind)] = []

    def on_test_epoch_end(self) -> None:
        self._log_classification("test")
        self._write_fusion()
        self._write_test_outputs(self._log_froc("test"), "CLAF stage 1 + MPPN")
        self._write_test_outputs(self._log_froc("test", "stage1"), "CLAF stage 1 (same candidates)", "stage1")
        if self.fusion_weight > 0:
            self._write_test_outputs(self._log_froc("test", "mppn"), "MPPN alone (same candidates)", "mppn")

    def fusion_info(self) -> dict[str, Any]:
        """Which fusion this task scores with and why (``test_fusion.json``)."""
        searched = self.fusion_search and self.fusion is not None
        return {
            "stage1_weight": float(self.fusion_weight),
            "source": "validation" if searched else "configured",
            "fusion_search": self.fusion_search,
            "configured_stage1_weight": float(self.stage1_weight),
            "validation": self.fusion.to_dict() if self.fusion is not None else None,
        }

    def _write_fusion(self) -> None:
        self.log("test/stage1_weight", float(self.fusion_weight), sync_dist=False)
        if self.trainer.global_rank == 0:
            path = self._run_dir() / "test_fusion.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.fusion_info(), indent=2))

    def on_test_start(self) -> None:
        super().on_test_start()
        self._warn_without_choice()

    def on_predict_start(self) -> None:
        super().on_predict_start()
        self._warn_without_choice()

    def _warn_without_choice(self) -> None:
        if self.fusion_search and self.fusion is None:
            log.warning(
                "fusion_search is on but this checkpoint holds no validation choice (trained without validation "
                "or before fusion_search existed): scoring with stage1_weight %g",
                self.stage1_weight,
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.fusion is not None:
            checkpoint[CHECKPOINT_KEY] = self.fusion.to_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY)
        self.fusion = FusionChoice.from_dict(saved) if saved else None

    def on_predict_epoch_end(self) -> None:
        self._write_predictions()
