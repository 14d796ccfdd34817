"""M³Net (Li et al., preprint 2025): stage-1 single-scale classifiers and the stage-2 fused network.

Stage 1 (eq. 3): each scale s ∈ {32, 64, 96} trains `ScaleClassifier` = backbone B_s + head Φ_s alone with
cross-entropy. Stage 2 (eqs. 4, 10, 14–18): `M3Net` holds the three stage-1 classifiers as branches
(load their weights with `load_branch_weights`), projects each branch's features into a shared D-dim
latent space, Z_s = F_s W_s + b_s, fuses the projections hierarchically (`HierarchicalFusion`) and
classifies LN(Pool(H)) with a GELU MLP. Its output carries everything the stage-2 objective needs: the
fused logits, every branch's logits (Σ_s CE^(s)), the pooled embeddings Z_s (alignment losses) and the
attention weights (L2 penalty) — see `lungcls.losses.M3NetLoss`.

Token modes (what the fusion attends over):

- "spatial" (default, the paper): every position of the branch's last feature map is a token, projected
  by W_s; with the paper configuration 7×7 = 49 tokens (32-scale ConvNeXt at 224), 4×2×2 = 16 (64-scale
  ResNet-34) and 4×3×3 = 36 (96-scale ResNet-18).
- "pooled": one token per scale, the pooled F_s projected by W_s.
- "logits": one token per scale, the branch's 2-class logits projected by a 2 → D linear map, and T1 as
  joint self-attention over [Z32; Z64] — what the released reference code does.

The pooled embedding Z_s ∈ R^{B×D} the alignment losses use is the mean of a scale's projected tokens,
which equals the pooled features projected by W_s (the projection is affine).

Freezing policies (`freeze`), applied to the branches only — projections, fusion and classifier always
train:

- "none": everything trains (stage 1 → stage 2 fine-tuning end to end),
- "lower": the first `frozen_groups` parameter groups of every backbone are frozen (stem = group 0, then
  one group per stage), "preserve low-level texture and edge representations" (paper §3.2),
- "all": the branches (backbones and their stage-1 heads) are frozen and kept in eval mode — the paper's
  implementation notes ("freeze all backbone parameters, only the fusion head is optimised").

Frozen BatchNorm layers stay in eval mode while the model trains, so their running statistics keep the
stage-1 values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from common.complexity import count_parameters
from lungcls.models.backbones import BackboneFeatures, ScaleBackbone, create_backbone
from lungcls.models.fusion import HierarchicalFusion

__all__ = [
    "FREEZE_POLICIES",
    "M3NET_PRESETS",
    "PAPER_SCALES",
    "TOKEN_MODES",
    "M3Net",
    "M3NetOutput",
    "M3NetPreset",
    "ScaleClassifier",
    "ScaleOutput",
    "create_m3net",
    "create_scale_classifier",
    "parameter_breakdown",
]

TOKEN_MODES = ("spatial", "pooled", "logits")
FREEZE_POLICIES = ("none", "lower", "all")
PAPER_SCALES = (32, 64, 96)

TokenMode = Literal["spatial", "pooled", "logits"]
FreezePolicy = Literal["none", "lower", "all"]


@dataclass(frozen=True)
class M3NetPreset:
    """A named configuration: backbone specs per scale and the fusion width.

    Attributes:
        backbones: scale → `create_backbone` keyword arguments (with "name").
        embed_dim: shared latent width D.
        num_heads: attention heads in the fusion.
        description: what the preset is for.
    """

    backbones: dict[int, dict[str, Any]]
    embed_dim: int
    num_heads: int
    description: str


M3NET_PRESETS: dict[str, M3NetPreset] = {
    "paper": M3NetPreset(
        backbones={
            32: {"name": "convnext_base", "input_size": 224},
            64: {"name": "resnet3d34"},
            96: {"name": "resnet3d18"},
        },
        embed_dim=128,
        num_heads=4,
        description="paper configuration: ConvNeXt-Base (2D, 56 slices as channels) / 3D ResNet-34 / "
        "3D ResNet-18, D = 128 (184.98 M parameters)",
    ),
    "small": M3NetPreset(
        backbones={
            32: {"name": "convnext_atto", "input_size": 64},
            64: {"name": "resnet3d10", "widths": (16, 32, 64, 128)},
            96: {"name": "resnet3d10", "widths": (16, 32, 64, 128)},
        },
        embed_dim=64,
        num_heads=4,
        description="reduced widths for CPU training: ConvNeXt-Atto / two 3D ResNet-10 at 1/4 width "
        "(5.35 M parameters)",
    ),
    "tiny": M3NetPreset(
        backbones={
            32: {"name": "test_convnext", "input_size": 64},
            64: {"name": "resnet3d10", "widths": (8, 16, 32, 64)},
            96: {"name": "resnet3d10", "widths": (8, 16, 32, 64)},
        },
        embed_dim=32,
        num_heads=4,
        description="smallest working model for tests and smoke runs (timm test_convnext, 3D ResNet-10 "
        "at 1/8 width)",
    ),
}


def _preset(name: str) -> M3NetPreset:
    if name not in M3NET_PRESETS:
        raise ValueError(f"unknown M³Net preset {name!r}; choose one of {sorted(M3NET_PRESETS)}")
    return M3NET_PRESETS[name]


@dataclass
class ScaleOutput:
    """Output of a single-scale classifier.

    Attributes:
        logits: `(B, num_classes)`.
        features: the backbone's tokens, pooled features and raw feature map.
    """

    logits: Tensor
    features: BackboneFeatures


class ScaleClassifier(nn.Module):
    """Stage-1 single-scale classifier: backbone B_s and a lightweight head Φ_s (eq. 3).

    Args:
        backbone: the scale's feature extractor.
        num_classes: output classes (2: benign / malignant).
        dropout: dropout before the linear head.
    """

    def __init__(self, backbone: ScaleBackbone, num_classes: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(backbone.num_features, num_classes))

    @property
    def num_features(self) -> int:
        """Channel width C_s of the backbone features."""
        return self.backbone.num_features

    def forward(self, patch: Tensor) -> ScaleOutput:
        """Classify one scale's `(B, 1, Z, Y, X)` patch."""
        features = self.backbone(patch)
        return ScaleOutput(logits=self.head(features.pooled), features=features)


@dataclass
class M3NetOutput:
    """Everything one stage-2 forward produces.

    Attributes:
        logits: fused prediction `(B, num_classes)`.
        scale_logits: scale → that branch's head logits `(B, num_classes)` (for Σ_s CE^(s)).
        embeddings: scale → pooled latent Z_s `(B, D)` (for the alignment losses).
        tokens: scale → projected tokens `(B, L_s, D)`.
        attention: attention weights `(B, heads, Lq, Lk)` of every attention, stage I first.
        features: scale → the branch's backbone features (Grad-CAM hooks the feature maps).
    """

    logits: Tensor
    scale_logits: dict[int, Tensor]
    embeddings: dict[int, Tensor]
    tokens: dict[int, Tensor]
    attention: list[Tensor] = field(default_factory=list)
    features: dict[int, BackboneFeatures] = field(default_factory=dict)


class M3Net(nn.Module):
    """Stage-2 M³Net: scale branches, latent projections, hierarchical fusion, classifier.

    Args:
        branches: scale (in-plane patch size) → stage-1 classifier. One to three scales; they are fused
            smallest first (micro → meso → macro).
        num_classes: fused output classes.
        embed_dim: shared latent width D of the projections Z_s.
        token_mode: "spatial", "pooled" or "logits" (module docstring).
        num_heads: attention heads.
        num_layers: transformer layers of fusion stage III.
        ffn_ratio: transformer FFN width multiple.
        attn_dropout: dropout on attention weights.
        dropout: dropout inside the transformer layers.
        head_dropout: dropout between the two classifier layers.
        use_lsf: fusion stage I (T1); Table 4 ablation.
        use_hsf: fusion stage II (T2); Table 4 ablation.
        use_transformer: fusion stage III; Table 4 ablation.
        first_stage: "cross" (paper) or "joint" (reference code); None picks "joint" for the "logits"
            token mode and "cross" otherwise.
        cross_residual: residual connection in the cross-attention stages.
        learnable_temperature: per-head attention temperature τ_h (eq. 13).
        freeze: "none", "lower" or "all" (module docstring).
        frozen_groups: backbone parameter groups frozen under "lower" (3 = stem and the first two stages).
    """

    def __init__(
        self,
        branches: Mapping[int, ScaleClassifier],
        *,
        num_classes: int = 2,
        embed_dim: int = 128,
        token_mode: TokenMode = "spatial",
        num_heads: int = 4,
        num_layers: int = 2,
        ffn_ratio: float = 2.0,
        attn_dropout: float = 0.1,
        dropout: float = 0.2,
        head_dropout: float = 0.3,
        use_lsf: bool = True,
        use_hsf: bool = True,
        use_transformer: bool = True,
        first_stage: Literal["cross", "joint"] | None = None,
        cross_residual: bool = True,
        learnable_temperature: bool = False,
        freeze: FreezePolicy = "none",
        frozen_groups: int = 3,
    ) -> None:
        super().__init__()
        if token_mode not in TOKEN_MODES:
            raise ValueError(f"token_mode must be one of {TOKEN_MODES}, got {token_mode!r}")
        if not 1 <= len(branches) <= 3:
            raise ValueError(f"M³Net takes 1 to 3 scale branches, got {len(branches)}")
        self.scales: tuple[int, ...] = tuple(sorted(int(s) for s in branches))
        self.token_mode = token_mode
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.branches = nn.ModuleDict({str(s): branches[s] for s in self.scales})
        self.projections = nn.ModuleDict(
            {
                str(s): nn.Linear(
                    branch.num_classes if token_mode == "logits" else branch.num_features, embed_dim
                )
                for s, branch in ((s, branches[s]) for s in self.scales)
            }
        )
        self.fusion = HierarchicalFusion(
            embed_dim,
            len(self.scales),
            num_heads=num_heads,
            num_layers=num_layers,
            ffn_ratio=ffn_ratio,
            attn_dropout=attn_dropout,
            dropout=dropout,
            use_lsf=use_lsf,
            use_hsf=use_hsf,
            use_transformer=use_transformer,
            first_stage=first_stage or ("joint" if token_mode == "logits" else "cross"),
            cross_residual=cross_residual,
            learnable_temperature=learnable_temperature,
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Sequential(
            nn.Linear(embed_dim, embed_dim // 2),
            nn.GELU(),
            nn.Dropout(head_dropout),
            nn.Linear(embed_dim // 2, num_classes),
        )
        self.freeze = freeze
        self.frozen_groups = frozen_groups
        self.set_freeze_policy(freeze, frozen_groups)

    # ----------------------------------------------------------------------------------------- freezing
    def set_freeze_policy(self, policy: FreezePolicy, frozen_groups: int | None = None) -> None:
        """(Re)apply a freezing policy to the branches; everything outside the branches stays trainable.

        Args:
            policy: "none", "lower" or "all".
            frozen_groups: groups frozen under "lower" (default: the value given at construction).
        """
        if policy not in FREEZE_POLICIES:
            raise ValueError(f"freeze must be one of {FREEZE_POLICIES}, got {policy!r}")
        frozen_groups = self.frozen_groups if frozen_groups is None else frozen_groups
        self.requires_grad_(True)
        for scale in self.scales:
            branch = self.branch(scale)
            if policy == "all":
                branch.requires_grad_(False)
            elif policy == "lower":
                groups = branch.backbone.parameter_groups()
                if not 0 <= frozen_groups <= len(groups):
                    raise ValueError(
                        f"frozen_groups={frozen_groups} but the {scale}-scale backbone has {len(groups)} "
                        f"parameter groups (stem + stages); choose 0..{len(groups)}"
                    )
                for group in groups[:frozen_groups]:
                    for p in group:
                        p.requires_grad_(False)
        self.freeze = policy
        self.frozen_groups = frozen_groups
        self.train(self.training)

    def train(self, mode: bool = True) -> M3Net:
        """Switch train/eval mode, keeping frozen branches and frozen BatchNorm layers in eval mode."""
        super().train(mode)
        if mode:
            for scale in self.scales:
                branch = self.branch(scale)
                if self.freeze == "all":
                    branch.eval()
                    continue
                for module in branch.modules():
                    params = list(module.parameters(recurse=False))
                    if isinstance(module, _BatchNorm) and params and not any(p.requires_grad for p in params):
                        module.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimiser should see under the current freezing policy."""
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------------------ helpers
    def branch(self, scale: int) -> ScaleClassifier:
        """The stage-1 classifier of one scale."""
        return self.branches[str(scale)]  # type: ignore[return-value]

    def load_branch_weights(
        self, scale: int, state_dict: Mapping[str, Tensor], prefix: str = "", strict: bool = True
    ) -> None:
        """Load a stage-1 `ScaleClassifier` state dict into one branch.

        Args:
            scale: which branch.
            state_dict: the stage-1 weights (e.g. a Lightning checkpoint's "state_dict").
            prefix: keep only keys starting with this prefix and strip it (e.g. "model." for a task
                that stores its classifier as `self.model`).
            strict: require an exact key match.

        Raises:
            ValueError: nothing in `state_dict` carries `prefix`.
        """
        if prefix:
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
            if not state_dict:
                raise ValueError(f"no key of the {scale}-scale stage-1 state dict starts with {prefix!r}")
        self.branch(scale).load_state_dict(state_dict, strict=strict)

    def _tokens(self, scale: int, out: ScaleOutput) -> Tensor:
        projection = self.projections[str(scale)]
        if self.token_mode == "spatial":
            return projection(out.features.tokens)
        if self.token_mode == "pooled":
            return projection(out.features.pooled).unsqueeze(1)
        return projection(out.logits).unsqueeze(1)

    def forward(self, patches: Mapping[int, Tensor]) -> M3NetOutput:
        """Classify a nodule from its nested patches.

        Args:
            patches: scale → `(B, 1, Z, s, s)` patch for every scale of the model (extra keys are
                ignored; keys may be ints or their strings).

        Returns:
            `M3NetOutput`.
        """
        by_scale = {int(k): v for k, v in patches.items()}
        missing = [s for s in self.scales if s not in by_scale]
        if missing:
            raise KeyError(f"M³Net needs patches for scales {list(self.scales)}; missing {missing}")
        scale_logits: dict[int, Tensor] = {}
        embeddings: dict[int, Tensor] = {}
        tokens: dict[int, Tensor] = {}
        features: dict[int, BackboneFeatures] = {}
        for scale in self.scales:
            out = self.branch(scale)(by_scale[scale])
            scale_logits[scale] = out.logits
            features[scale] = out.features
            tokens[scale] = self._tokens(scale, out)
            embeddings[scale] = tokens[scale].mean(dim=1)
        fused, attention = self.fusion([tokens[s] for s in self.scales])
        logits = self.head(self.norm(fused.mean(dim=1)))
        return M3NetOutput(
            logits=logits,
            scale_logits=scale_logits,
            embeddings=embeddings,
            tokens=tokens,
            attention=attention,
            features=features,
        )


def _backbone_spec(preset: str, scale: int, override: Mapping[str, Any] | None) -> dict[str, Any]:
    spec = dict(override) if override is not None else dict(_preset(preset).backbones.get(scale, {}))
    if "name" not in spec:
        raise ValueError(
            f"no backbone for scale {scale}: preset {preset!r} covers scales "
            f"{sorted(_preset(preset).backbones)}; pass backbones={{{scale}: {{'name': ...}}}}"
        )
    return spec


def _build_backbone(spec: Mapping[str, Any], in_slices: int) -> ScaleBackbone:
    kwargs = dict(spec)
    name = kwargs.pop("name")
    if not str(name).lower().startswith("resnet3d"):
        kwargs.setdefault("in_slices", in_slices)
    return create_backbone(name, **kwargs)


def create_scale_classifier(
    scale: int,
    preset: str = "paper",
    *,
    backbone: Mapping[str, Any] | None = None,
    num_classes: int = 2,
    dropout: float = 0.0,
    in_slices: int = 56,
) -> ScaleClassifier:
    """Build the stage-1 classifier of one scale.

    Args:
        scale: in-plane patch size (32, 64 or 96 in the presets).
        preset: "paper", "small" or "tiny" — where the backbone spec comes from.
        backbone: `create_backbone` keywords with "name", replacing the preset's spec for this scale.
        num_classes: output classes.
        dropout: dropout before the head.
        in_slices: slices per patch (2D backbones read them as channels).
    """
    spec = _backbone_spec(preset, scale, backbone)
    return ScaleClassifier(_build_backbone(spec, in_slices), num_classes=num_classes, dropout=dropout)


def create_m3net(
    preset: str = "paper",
    *,
    scales: Sequence[int] | None = None,
    backbones: Mapping[int, Mapping[str, Any]] | None = None,
    num_classes: int = 2,
    in_slices: int = 56,
    branch_dropout: float = 0.0,
    embed_dim: int | None = None,
    num_heads: int | None = None,
    **kwargs: Any,
) -> M3Net:
    """Build a stage-2 M³Net from a preset.

    Args:
        preset: "paper" (ConvNeXt-Base / ResNet-34 / ResNet-18), "small" (CPU training) or "tiny" (tests).
        scales: the scales to use (default: all of the preset's); a subset gives the Table 5 ablations.
        backbones: scale → backbone spec overriding the preset (any timm name or resnet3d<depth>).
        num_classes: output classes.
        in_slices: slices per patch.
        branch_dropout: dropout before each stage-1 head.
        embed_dim: latent width D (default: the preset's).
        num_heads: attention heads (default: the preset's).
        **kwargs: further `M3Net` keywords (token_mode, freeze, frozen_groups, use_lsf, …).
    """
    spec = _preset(preset)
    chosen = tuple(scales) if scales is not None else tuple(sorted(spec.backbones))
    overrides = {int(k): v for k, v in (backbones or {}).items()}
    branches = {
        int(s): create_scale_classifier(
            int(s),
            preset,
            backbone=overrides.get(int(s)),
            num_classes=num_classes,
            dropout=branch_dropout,
            in_slices=in_slices,
        )
        for s in chosen
    }
    return M3Net(
        branches,
        num_classes=num_classes,
        embed_dim=embed_dim if embed_dim is not None else spec.embed_dim,
        num_heads=num_heads if num_heads is not None else spec.num_heads,
        **kwargs,
    )


def parameter_breakdown(model: M3Net) -> dict[str, int]:
    """Parameters per part: one entry per branch ("branch32", …), "projections", "fusion_head", "total"."""
    parts = {f"branch{s}": count_parameters(model.branch(s)) for s in model.scales}
    parts["projections"] = count_parameters(model.projections)
    parts["fusion_head"] = sum(count_parameters(m) for m in (model.fusion, model.norm, model.head))
    parts["total"] = count_parameters(model)
    return parts
