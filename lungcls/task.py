"""LightningModules of lungcls: M³Net stage 1 and stage 2 (and few-shot fine-tuning), pathology classifier.

All three share `ClassificationTask` (a `common.lightning.BaseTask`):

- validation logs the full metric set of `common.metrics.classification` (``val/acc``, ``val/roc_auc``,
  …) and ``val/loss`` on the whole validation set, so checkpoints can monitor any of them;
- test gathers every probability, logs each metric on the whole test set (``test/<metric>``, ``test/loss``)
  and its bootstrap std (``test/<metric>_std``), and writes the report of `lungcls.reporting` (metrics JSON
  with mean ± std, predictions CSV, confusion matrix PNG) into the run folder;
- predict writes ``predict_predictions.csv`` (class probabilities per sample, joined with the part's
  table from the datamodule — nodule key, scan uid, world centre; never a patient id).

`ScaleTask` — stage 1 (eq. 3): one scale's backbone + head with cross-entropy; the scale is a config
value, so one class trains all three branches (three runs, one checkpoint each).

`M3NetTask` — stage 2 (eqs. 4–18): builds `lungcls.models.create_m3net`, loads the three stage-1
checkpoints into its branches when fitting starts (`stage1_checkpoints`), applies the freezing policy, and
minimises `lungcls.losses.M3NetLoss` (fused CE + Σ_s CE + β L_align + λ_attn L_attn) with τ, the λ's and β
from the config; every loss term is logged. The token mode (spatial / pooled / logits) and the Table 4/5
ablations are model options. Few-shot adaptation (M³Net §4.3) is this task started from a trained stage-2
checkpoint (`init_checkpoint`) on `lungcls.data.FewShotPatchDataModule`.

`PathologyTask` — a timm classifier from the papers' zoo by name (`lungcls.models.pathology`), CE, scored
by ACC and QWK (the whole set is reported too).

Evaluation under DDP: every validation/test sample is stored with its dataset index (``batch["index"]``)
in `common.metrics.classification.ClassificationScores` and `common.metrics.unique_samples.UniqueSampleMean`,
so the samples that ``DistributedSampler`` pads in (3 images on 2 ranks are scored as 4) count once and
every number equals the single-process one. ``<stage>/loss`` is therefore the per-sample part of the
objective averaged over the set — PyTorch's weighted-mean cross-entropy for `ScaleTask` and
`PathologyTask` (their whole objective), the fused and per-scale cross-entropies for `M3NetTask` (also
logged as ``<stage>/ce_fused``, ``<stage>/ce_<scale>``). M3Net's alignment and attention terms compare the
samples of a batch with each other, so they have no per-sample value; they are logged as batch means
(``val/align``, ``val/attn``, …) and depend on how the set is cut into batches and ranks.

Checkpoint loading: stage-1 and initial checkpoints are read with ``torch.load(weights_only=True)`` and
only their ``state_dict`` is used. A stage-2 run resumed with ``--ckpt_path`` does not reload the stage-1
files (the checkpoint holds the trained branches).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MetricCollection

from common.lightning import BaseTask
from common.metrics.classification import CLASSIFICATION_KEYS, ClassificationScores
from common.metrics.unique_samples import UniqueSampleMean
from lungcls.losses import AlignmentLoss, M3NetLoss, attention_l2_penalty
from lungcls.models import create_m3net, create_pathology_classifier, create_scale_classifier
from lungcls.reporting import format_scores, prediction_table, write_classification_report

log = logging.getLogger(__name__)

__all__ = [
    "ClassificationTask",
    "EvaluationTerms",
    "M3NetTask",
    "PathologyTask",
    "ScaleTask",
    "load_state_dict",
]


class EvaluationTerms(NamedTuple):
    """What one evaluation batch contributes to the set-level numbers (module docstring).

    Attributes:
        logits: (B, C) class logits.
        per_sample: name → (B,) per-sample loss terms with ``reduction="none"``; ``"loss"`` is required.
        weights: (B,) denominators: the class weight of each target, or ones.
        batch_terms: name → scalar terms that exist only per batch (logged as batch means).
    """

    logits: Tensor
    per_sample: dict[str, Tensor]
    weights: Tensor
    batch_terms: dict[str, Tensor]


def load_state_dict(path: str | Path, what: str = "checkpoint") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """State dict and hyper-parameters of a Lightning checkpoint (or a bare state dict), weights only.

    Raises:
        FileNotFoundError: the file does not exist (the message says which run makes it).
        ValueError: the file holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} {path} does not exist; train it first or correct the path in the config"
        )
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors come in many types; name the file and the fix
        raise ValueError(f"{path}: cannot load the {what} with weights_only=True ({err})") from err
    if isinstance(data, Mapping) and "state_dict" in data:
        return dict(data["state_dict"]), dict(data.get("hyper_parameters") or {})
    if isinstance(data, Mapping) and all(isinstance(v, Tensor) for v in data.values()):
        return dict(data), {}
    raise ValueError(f"{path}: not a Lightning checkpoint or state dict (no 'state_dict' entry)")


class ClassificationTask(BaseTask):
    """Shared validation/test/predict logic of the lungcls tasks (module docstring).

    Subclasses build `self.model` and implement `_logits(batch)`; `_loss(batch)` defaults to CE.

    Args:
        num_classes: output classes.
        class_names: names in reports (confusion matrix).
        class_weights: per-class CE weights.
        label_smoothing: CE label smoothing.
        init_checkpoint: weights (a checkpoint of the same task class) to start fitting from.
        n_bootstrap: bootstrap resamples of the test report.
        **kwargs: `BaseTask` arguments (optimizer, lr, weight_decay, scheduler, ...).
    """

    monitor = "val/loss"
    input_key = "patches"

    def __init__(
        self,
        num_classes: int = 2,
        class_names: Sequence[str] | None = None,
        class_weights: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        init_checkpoint: str | None = None,
        n_bootstrap: int = 1000,
        **kwargs: Any,
    ) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        super().__init__(**kwargs)
        weight = torch.as_tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.register_buffer("ce_weight", weight, persistent=False)
        self._predictions: list[tuple[Tensor, Tensor]] = []
        self.test_scores: dict[str, dict[str, float]] = {}

    def configure_metrics(self) -> MetricCollection:
        """Scores and per-sample loss terms keyed by dataset index (each sample once under DDP)."""
        return MetricCollection(
            {
                "scores": ClassificationScores(self.hparams.num_classes),
                "loss": UniqueSampleMean(self.sample_loss_names()),
            },
            compute_groups=False,
        )

    def sample_loss_names(self) -> tuple[str, ...]:
        """Names of the per-sample loss terms `_evaluation_terms` returns (``"loss"`` first)."""
        return ("loss",)

    # ------------------------------------------------------------------------------------- hooks
    def _logits(self, batch: Mapping[str, Any]) -> Tensor:
        raise NotImplementedError

    def _loss(self, batch: Mapping[str, Any], stage: str) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(loss, logits, loss parts to log)."""
        logits = self._logits(batch)
        loss = F.cross_entropy(
            logits.float(),
            batch["label"],
            weight=self.ce_weight,
            label_smoothing=self.hparams.label_smoothing,
        )
        return loss, logits, {}

    @staticmethod
    def _sample_ce(logits: Tensor, labels: Tensor, weight: Tensor | None, smoothing: float) -> Tensor:
        """(B,) cross-entropy terms whose sum over a set divided by Σ weight[label] is the mean CE."""
        return F.cross_entropy(
            logits.float(), labels, weight=weight, label_smoothing=smoothing, reduction="none"
        )

    @staticmethod
    def _target_weights(labels: Tensor, weight: Tensor | None) -> Tensor:
        return (
            weight[labels].float()
            if weight is not None
            else torch.ones(labels.shape[0], device=labels.device)
        )

    def _evaluation_terms(self, batch: Mapping[str, Any]) -> EvaluationTerms:
        """Per-sample CE of the task's logits (the whole objective of the single-head tasks)."""
        logits = self._logits(batch)
        labels = batch["label"]
        ce = self._sample_ce(logits, labels, self.ce_weight, self.hparams.label_smoothing)
        return EvaluationTerms(logits, {"loss": ce}, self._target_weights(labels, self.ce_weight), {})

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.init_checkpoint and not self._resuming():
            state, _ = load_state_dict(self.hparams.init_checkpoint, "init_checkpoint")
            missing, unexpected = self.load_state_dict(state, strict=False)
            if unexpected or missing:
                raise ValueError(
                    f"init_checkpoint {self.hparams.init_checkpoint} does not match {type(self).__name__}: "
                    f"missing {missing[:5]}, unexpected {unexpected[:5]}"
                )
            log.info("started from %s", self.hparams.init_checkpoint)

    def _resuming(self) -> bool:
        return self._trainer is not None and self.trainer.ckpt_path is not None

    # ------------------------------------------------------------------------------------- steps
    def _batch_size(self, batch: Mapping[str, Any]) -> int:
        return int(batch["label"].shape[0])

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        loss, _, parts = self._loss(batch, "train")
        n = self._batch_size(batch)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        for name, value in parts.items():
            self.log(f"train/{name}", value, on_step=False, on_epoch=True, batch_size=n)
        return loss

    def _evaluate(self, batch: Mapping[str, Any], stage: str) -> None:
        """Score a validation/test batch into the stage's metrics, keyed by dataset index."""
        terms = self._evaluation_terms(batch)
        metrics = self.metrics_for(stage)
        index = batch["index"]
        metrics["scores"].update(terms.logits.float().softmax(dim=1), batch["label"], index)
        metrics["loss"].update(index, terms.per_sample, terms.weights)
        n = self._batch_size(batch)
        for name, value in terms.batch_terms.items():
            self.log(f"{stage}/{name}", value, on_epoch=True, batch_size=n, sync_dist=True)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self.log_dict({k: float(v) for k, v in self.val_metrics.compute().items()})
        self.val_metrics.reset()

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _table(self, part: str) -> pd.DataFrame | None:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "table"):
            try:
                return datamodule.table(part)
            except (KeyError, AttributeError):
                return None
        return None

    def _out_dir(self) -> Path:
        return Path(self.trainer.log_dir or self.trainer.default_root_dir)

    def _class_names(self) -> list[str] | None:
        if self.hparams.class_names:
            return list(self.hparams.class_names)
        datamodule = getattr(self.trainer, "datamodule", None)
        names = getattr(datamodule, "class_names", None)
        return list(names) if names else None

    def on_test_epoch_end(self) -> None:
        indices, labels, probs = self.test_metrics["scores"].compute_samples()
        losses = {k: float(v) for k, v in self.test_metrics["loss"].compute().items()}
        self.test_metrics.reset()
        for name, value in losses.items():
            self.log(f"test/{name}", value)
        if self.trainer.is_global_zero:
            self.test_scores = write_classification_report(
                self._out_dir(),
                "test",
                probs,
                labels,
                indices,
                self._table("test"),
                self._class_names(),
                n_bootstrap=self.hparams.n_bootstrap,
                extra={"task": type(self).__name__},
            )
            log.info("test metrics (value, bootstrap mean ± std, %%):\n%s", format_scores(self.test_scores))
        else:
            from common.metrics.classification import bootstrap_classification_scores

            self.test_scores = bootstrap_classification_scores(
                labels, probs, n_samples=self.hparams.n_bootstrap, num_classes=self.hparams.num_classes
            )
        for key in CLASSIFICATION_KEYS:
            self.log(f"test/{key}", float(self.test_scores[key]["value"]))
            self.log(f"test/{key}_std", float(self.test_scores[key]["std"]))

    def predict_step(
        self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, Tensor]:
        probs = self._logits(batch).float().softmax(dim=1)
        self._predictions.append((batch["index"].cpu(), probs.cpu()))
        return {"index": batch["index"], "probs": probs}

    def on_predict_epoch_start(self) -> None:
        self._predictions = []

    def on_predict_epoch_end(self) -> None:
        if not self._predictions:
            return
        indices = torch.cat([i for i, _ in self._predictions]).numpy()
        probs = torch.cat([p for _, p in self._predictions]).numpy()
        rank = self.trainer.global_rank
        name = (
            "predict_predictions.csv"
            if self.trainer.world_size == 1
            else f"predict_predictions_rank{rank}.csv"
        )
        out = self._out_dir()
        out.mkdir(parents=True, exist_ok=True)
        prediction_table(probs, indices, self._table("predict")).to_csv(out / name, index=False)
        log.info("predictions of %d samples written to %s", len(indices), out / name)


class ScaleTask(ClassificationTask):
    """M³Net stage 1: one scale's backbone + head Φ_s trained alone with cross-entropy (eq. 3).

    Args:
        scale: which patch of the batch to read (the datamodule's scale key, e.g. 32).
        preset: "paper", "small" or "tiny" (`lungcls.models.M3NET_PRESETS`).
        backbone: `create_backbone` spec with "name", replacing the preset's (Table 2 backbones).
        dropout: dropout before the head.
        in_slices: slices per patch.
        **kwargs: `ClassificationTask` / `BaseTask` arguments; the paper's optimiser is the default.
    """

    def __init__(
        self,
        scale: int = 32,
        preset: str = "paper",
        backbone: dict[str, Any] | None = None,
        dropout: float = 0.0,
        in_slices: int = 56,
        optimizer: str = "adamw",
        lr: float = 1e-4,
        weight_decay: float = 1e-5,
        scheduler: str = "cosine",
        **kwargs: Any,
    ) -> None:
        super().__init__(optimizer=optimizer, lr=lr, weight_decay=weight_decay, scheduler=scheduler, **kwargs)

    def configure_models(self) -> None:
        hp = self.hparams
        self.model = create_scale_classifier(
            int(hp.scale),
            hp.preset,
            backbone=hp.backbone,
            num_classes=hp.num_classes,
            dropout=hp.dropout,
            in_slices=hp.in_slices,
        )

    def _patch(self, batch: Mapping[str, Any]) -> Tensor:
        patches = batch["patches"]
        scale = int(self.hparams.scale)
        patch = patches.get(scale, patches.get(str(scale)))
        if patch is None:
            raise KeyError(
                f"the batch has no {scale}-scale patch (scales {sorted(patches)}); set data scales to include {scale}"
            )
        return patch

    def _logits(self, batch: Mapping[str, Any]) -> Tensor:
        return self.model(self._patch(batch)).logits

    def forward(self, patch: Tensor) -> Tensor:
        """Logits of one scale's `(B, 1, Z, Y, X)` patch."""
        return self.model(patch).logits


class M3NetTask(ClassificationTask):
    """M³Net stage 2 (and few-shot fine-tuning): three branches, alignment losses, hierarchical fusion.

    Args:
        preset: "paper", "small" or "tiny".
        scales: the fused scales (a subset gives the Table 5 ablations).
        backbones: scale → backbone spec overriding the preset.
        in_slices: slices per patch.
        embed_dim: latent width D (default: the preset's).
        num_heads: fusion attention heads (default: the preset's).
        token_mode: "spatial" (paper), "pooled", or "logits" (released reference code).
        freeze: "none", "lower" (first `frozen_groups` backbone groups) or "all" (the paper's
            implementation notes: only the fusion head trains).
        frozen_groups: groups frozen under "lower".
        use_lsf / use_hsf / use_transformer: fusion stages (Table 4 ablations).
        branch_dropout: dropout before each branch head.
        fusion: further `M3Net` keywords (num_layers, ffn_ratio, attn_dropout, dropout, head_dropout,
            first_stage, cross_residual, learnable_temperature).
        stage1_checkpoints: scale → stage-1 `ScaleTask` checkpoint loaded into that branch when fitting
            starts (not when resuming).
        beta: β, weight of L_align (0: no alignment).
        temperature: InfoNCE τ.
        lambda_nce: InfoNCE weight of every scale pair.
        lambda_cov / lambda_orth / lambda_nuc: covariance, orthogonality, nuclear-norm weights (0 switches a
            term off: Table 8).
        orth_normalize: batch-normalised orthogonality term (`lungcls.losses.AlignmentLoss`).
        symmetric_nce: average both InfoNCE directions.
        lambda_attn: weight of the attention L2 penalty (eq. 17).
        fused_weight / scale_weight: weights of the fused CE and the summed per-scale CEs.
        **kwargs: `ClassificationTask` / `BaseTask` arguments.
    """

    def __init__(
        self,
        preset: str = "paper",
        scales: Sequence[int] = (32, 64, 96),
        backbones: dict[int, dict[str, Any]] | None = None,
        in_slices: int = 56,
        embed_dim: int | None = None,
        num_heads: int | None = None,
        token_mode: str = "spatial",
        freeze: str = "none",
        frozen_groups: int = 3,
        use_lsf: bool = True,
        use_hsf: bool = True,
        use_transformer: bool = True,
        branch_dropout: float = 0.0,
        fusion: dict[str, Any] | None = None,
        stage1_checkpoints: dict[int, str] | None = None,
        beta: float = 0.1,
        temperature: float = 0.1,
        lambda_nce: float = 1.0,
        lambda_cov: float = 1.0,
        lambda_orth: float = 1e-4,
        lambda_nuc: float = 1e-2,
        orth_normalize: bool = True,
        symmetric_nce: bool = False,
        lambda_attn: float = 1e-3,
        fused_weight: float = 1.0,
        scale_weight: float = 1.0,
        optimizer: str = "adamw",
        lr: float = 1e-4,
        weight_decay: float = 1e-5,
        scheduler: str = "cosine",
        **kwargs: Any,
    ) -> None:
        super().__init__(optimizer=optimizer, lr=lr, weight_decay=weight_decay, scheduler=scheduler, **kwargs)

    def configure_models(self) -> None:
        hp = self.hparams
        self.model = create_m3net(
            hp.preset,
            scales=[int(s) for s in hp.scales],
            backbones={int(k): v for k, v in (hp.backbones or {}).items()} or None,
            num_classes=hp.num_classes,
            in_slices=hp.in_slices,
            branch_dropout=hp.branch_dropout,
            embed_dim=hp.embed_dim,
            num_heads=hp.num_heads,
            token_mode=hp.token_mode,
            freeze=hp.freeze,
            frozen_groups=hp.frozen_groups,
            use_lsf=hp.use_lsf,
            use_hsf=hp.use_hsf,
            use_transformer=hp.use_transformer,
            **dict(hp.fusion or {}),
        )

    def configure_losses(self) -> None:
        hp = self.hparams
        self.criterion = M3NetLoss(
            beta=hp.beta,
            lambda_attn=hp.lambda_attn,
            fused_weight=hp.fused_weight,
            scale_weight=hp.scale_weight,
            alignment=AlignmentLoss(
                temperature=hp.temperature,
                lambda_nce=hp.lambda_nce,
                lambda_cov=hp.lambda_cov,
                lambda_orth=hp.lambda_orth,
                lambda_nuc=hp.lambda_nuc,
                symmetric_nce=hp.symmetric_nce,
                orth_normalize=hp.orth_normalize,
            ),
            class_weights=hp.class_weights,
            label_smoothing=hp.label_smoothing,
        )

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.stage1_checkpoints and not self._resuming():
            self.load_stage1(self.hparams.stage1_checkpoints)
        super().setup(stage)

    def load_stage1(self, checkpoints: Mapping[int, str]) -> None:
        """Load stage-1 `ScaleTask` checkpoints into the branches (scale → path)."""
        for key, path in checkpoints.items():
            scale = int(key)
            if scale not in self.model.scales:
                raise ValueError(
                    f"stage1_checkpoints names scale {scale}, but the model fuses {self.model.scales}"
                )
            state, hparams = load_state_dict(path, f"stage-1 checkpoint of scale {scale}")
            trained = hparams.get("scale")
            if trained is not None and int(trained) != scale:
                raise ValueError(
                    f"{path} was trained for scale {trained}, not {scale}; check stage1_checkpoints"
                )
            self.model.load_branch_weights(scale, state, prefix="model.")
            log.info("branch %d: stage-1 weights from %s", scale, path)
        # Loading replaced parameters in place; re-apply the policy so frozen BatchNorms stay in eval mode.
        self.model.set_freeze_policy(self.model.freeze, self.model.frozen_groups)

    def forward(self, patches: Mapping[int, Tensor]):
        """`M3NetOutput` of nested patches (scale → `(B, 1, Z, s, s)`)."""
        return self.model(patches)

    def _logits(self, batch: Mapping[str, Any]) -> Tensor:
        return self.model(batch["patches"]).logits

    def _loss(self, batch: Mapping[str, Any], stage: str) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        output = self.model(batch["patches"])
        parts = self.criterion(output, batch["label"])
        loss = parts.pop("loss")
        return loss, output.logits, {k: v.detach() for k, v in parts.items()}

    def sample_loss_names(self) -> tuple[str, ...]:
        return ("loss", "ce_fused", *(f"ce_{int(s)}" for s in self.hparams.scales))

    def _evaluation_terms(self, batch: Mapping[str, Any]) -> EvaluationTerms:
        """Per-sample fused and per-scale CEs (their weighted sum is ``loss``); alignment/attention per batch."""
        output = self.model(batch["patches"])
        labels = batch["label"]
        crit = self.criterion
        per_sample = {
            "ce_fused": self._sample_ce(output.logits, labels, crit.class_weights, crit.label_smoothing)
        }
        loss = crit.fused_weight * per_sample["ce_fused"]
        for scale, logits in output.scale_logits.items():
            per_sample[f"ce_{int(scale)}"] = self._sample_ce(
                logits, labels, crit.class_weights, crit.label_smoothing
            )
            loss = loss + crit.scale_weight * per_sample[f"ce_{int(scale)}"]
        per_sample["loss"] = loss
        batch_terms: dict[str, Tensor] = {}
        if crit.beta:
            batch_terms.update({k: v.detach() for k, v in crit.alignment(output.embeddings).items()})
        if crit.lambda_attn and output.attention:
            batch_terms["attn"] = attention_l2_penalty(output.attention).detach()
        return EvaluationTerms(
            output.logits, per_sample, self._target_weights(labels, crit.class_weights), batch_terms
        )


class PathologyTask(ClassificationTask):
    """2D cancer-type / pathology classification with a timm model from the papers' zoo.

    Args:
        model_name: a paper family ("ResNet", "EfficientNet", "ResNeXt", "Res2Net", "SE-ResNet", "ViT",
            "Inception-v4", "ConvNeXt", "Swin") or any timm model name.
        num_classes: 3 (LDFC) or 6 (spatio-temporal).
        in_chans: image channels.
        img_size: input size (given to the transformer families).
        pretrained: timm pretrained weights (from the local cache only).
        drop_rate: dropout before the classifier.
        model_kwargs: further `timm.create_model` keywords.
        **kwargs: `ClassificationTask` / `BaseTask` arguments.
    """

    input_key = "image"

    def __init__(
        self,
        model_name: str = "ResNet",
        num_classes: int = 3,
        in_chans: int = 3,
        img_size: int | None = 224,
        pretrained: bool = False,
        drop_rate: float = 0.0,
        model_kwargs: dict[str, Any] | None = None,
        optimizer: str = "adamw",
        lr: float = 1e-4,
        weight_decay: float = 1e-4,
        scheduler: str = "cosine",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            num_classes=num_classes,
            optimizer=optimizer,
            lr=lr,
            weight_decay=weight_decay,
            scheduler=scheduler,
            **kwargs,
        )

    def configure_models(self) -> None:
        hp = self.hparams
        self.model = create_pathology_classifier(
            hp.model_name,
            hp.num_classes,
            in_chans=hp.in_chans,
            img_size=hp.img_size,
            pretrained=hp.pretrained,
            drop_rate=hp.drop_rate,
            **dict(hp.model_kwargs or {}),
        )

    def forward(self, image: Tensor) -> Tensor:
        return self.model(image)

    def _logits(self, batch: Mapping[str, Any]) -> Tensor:
        return self.model(batch["image"])
