"""lungcls networks: M³Net (Li et al., preprint 2025) and the 2D pathology classifier zoo (LDFC (Sci. Data 2024) and STPD (Jian et al., preprint 2024)).

Inputs follow docs/architecture.md: a nodule's nested patches are float tensors `(B, 1, Z, Y, X)` with
Z = 56 slices and Y = X = 32, 64, 96 for the micro, meso and macro scales, passed to M³Net as a mapping
`{32: x32, 64: x64, 96: x96}`.

Public API (docs/lungcls.md explains the design and the numbers):

Backbones (`lungcls.models.backbones`)
    `create_backbone(name, **kwargs) -> ScaleBackbone` — "resnet3d<depth>" (MONAI 3D ResNet, stem 7×7×7
    stride (1, 2, 2) + max-pool; `widths=` for reduced widths) or any timm model name (2D, slices as
    input channels; `in_slices=`, `input_size=`). A backbone's forward returns `BackboneFeatures(tokens
    (B, L, C), pooled (B, C), feature_map)`; `parameter_groups()` lists parameters stem → deepest stage.

Stage 1 (`lungcls.models.m3net`)
    `create_scale_classifier(scale, preset="paper", *, backbone=None, num_classes=2, dropout=0.0,
    in_slices=56) -> ScaleClassifier`; `ScaleClassifier(patch) -> ScaleOutput(logits, features)`.

Stage 2 (`lungcls.models.m3net`)
    `create_m3net(preset="paper", *, scales=None, backbones=None, num_classes=2, in_slices=56,
    branch_dropout=0.0, embed_dim=None, num_heads=None, **M3Net_kwargs) -> M3Net` with presets
    `M3NET_PRESETS`: "paper" (ConvNeXt-Base / 3D ResNet-34 / 3D ResNet-18, 184.98 M parameters),
    "small" (CPU training, 5.4 M), "tiny" (tests, 0.72 M).
    `M3Net(patches) -> M3NetOutput(logits, scale_logits, embeddings, tokens, attention, features)`.
    Options: `token_mode` "spatial" | "pooled" | "logits"; `freeze` "none" | "lower" | "all" with
    `frozen_groups`; `use_lsf` / `use_hsf` / `use_transformer` (Table 4 ablations); `scales=` subsets
    (Table 5). `load_branch_weights(scale, state_dict, prefix=...)` loads stage-1 weights;
    `trainable_parameters()` is what the optimiser should get.

Losses (`lungcls.losses`)
    `info_nce`, `covariance_alignment_loss`, `orthogonality_loss`, `nuclear_norm_loss`,
    `attention_l2_penalty`; `AlignmentLoss` (eq. 8) and `M3NetLoss(output, target) -> dict` (eq. 10 +
    fused CE + attention penalty; "loss" is the total).

Complexity (`lungcls.complexity`)
    `measure_complexity(model, input_sizes=PAPER_INPUT_SIZES) -> list[ComplexityRow]`,
    `format_complexity_table(rows)`; `python -m lungcls.complexity`.

Pathology (`lungcls.models.pathology`)
    `create_pathology_classifier(name, num_classes, *, in_chans=3, img_size=None, pretrained=False,
    drop_rate=0.0)` with `PATHOLOGY_ZOO` mapping the papers' names (ResNet, EfficientNet, ResNeXt, Res2Net,
    SE-ResNet, ViT, Inception-v4, ConvNeXt, Swin) to timm models.
"""

from lungcls.models.backbones import (
    RESNET3D_DEPTHS,
    BackboneFeatures,
    ResNet3DBackbone,
    ScaleBackbone,
    Timm2DBackbone,
    create_backbone,
)
from lungcls.models.fusion import (
    CrossAttention,
    HierarchicalFusion,
    MultiHeadAttention,
    ParallelTransformerLayer,
)
from lungcls.models.m3net import (
    FREEZE_POLICIES,
    M3NET_PRESETS,
    PAPER_SCALES,
    TOKEN_MODES,
    M3Net,
    M3NetOutput,
    M3NetPreset,
    ScaleClassifier,
    ScaleOutput,
    create_m3net,
    create_scale_classifier,
    parameter_breakdown,
)
from lungcls.models.pathology import PATHOLOGY_ZOO, create_pathology_classifier, resolve_pathology_model

__all__ = [
    "FREEZE_POLICIES",
    "M3NET_PRESETS",
    "PAPER_SCALES",
    "PATHOLOGY_ZOO",
    "RESNET3D_DEPTHS",
    "TOKEN_MODES",
    "BackboneFeatures",
    "CrossAttention",
    "HierarchicalFusion",
    "M3Net",
    "M3NetOutput",
    "M3NetPreset",
    "MultiHeadAttention",
    "ParallelTransformerLayer",
    "ResNet3DBackbone",
    "ScaleBackbone",
    "ScaleClassifier",
    "ScaleOutput",
    "Timm2DBackbone",
    "create_backbone",
    "create_m3net",
    "create_scale_classifier",
    "create_pathology_classifier",
    "parameter_breakdown",
    "resolve_pathology_model",
]
