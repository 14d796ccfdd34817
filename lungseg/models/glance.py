"""GLANCE: dual-stream encoder (DiSCo) + CSCF + pyramid refinement decoder + dual heads (paper Figs. 2–4).

Data flow for a ``B×1×H×W`` lung-windowed slice (H, W multiples of 32), default widths ``(64, 128, 256, 512)``:

::

    image ─┬─ GCT stage 1 (k4 s4 patch embed + pos. embed) ─────────┐
           └─ stem (H, H/2) ─ MRGAM stage 1 (stride 2 → H/4) ───────┴─ CSCF → F_c^(1)  (H/4)
    F_c^(1) ─┬─ GCT stage 2 (k3 s2) ──┐
             └─ MRGAM stage 2 (s2) ───┴─ CSCF → F_c^(2)  (H/8)      … up to F_c^(4) at H/32
    PRD: F_c^(4) → ↑ ‖ F_c^(3) → R → ↑ ‖ F_c^(2) → R → ↑ ‖ F_c^(1) → R → ↑ ‖ stem/2 → R → ↑ ‖ stem → R
    heads: 1×1 → segmentation logits (H×W), 1×1 → centre-heatmap logits (H×W), 1×1 aux heads at H/4..H/16

The paper's decoder ends at the stride-4 pyramid level ``D^(1)`` yet predicts ``H×W`` maps; we add two
light full/half-resolution skips from a convolutional stem so the last two ×2 steps are refined rather than
interpolated (``full_resolution_decoder=False`` instead up-samples the stride-4 logits bilinearly).

Every ablation row is a constructor configuration (``streams`` × ``fusion`` × MRGAM ``weighting`` ×
``heads``); the named presets live in :mod:`lungseg.models.variants` and :func:`build_glance` applies them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lungseg.models.baselines import PlainConvStage
from lungseg.models.blocks import ImageStem
from lungseg.models.cscf import ConsensusFusion, LateFusion
from lungseg.models.decoder import PyramidRefinementDecoder
from lungseg.models.gct import GCTStage
from lungseg.models.mrgam import MRGAM_WEIGHTINGS, MRGAMStage

__all__ = ["FUSIONS", "HEADS", "STREAM_KINDS", "DualStreamEncoder", "GlanceNet", "build_glance"]

STREAM_KINDS: tuple[str, ...] = ("gct", "mrgam", "conv")
FUSIONS: tuple[str, ...] = ("cscf", "none")
HEADS: tuple[str, ...] = ("seg", "heatmap")


def _set_prior(head: nn.Conv2d | None, prior: float | None) -> None:
    """Start a logit head at probability ``prior`` everywhere (bias = logit of the prior); None: leave it."""
    if head is not None and prior is not None:
        nn.init.constant_(head.bias, math.log(prior / (1 - prior)))


def _per_stage(name: str, value: int | Sequence[int], num_stages: int) -> tuple[int, ...]:
    """Broadcast an int to all stages or check a per-stage sequence has one entry per stage."""
    if isinstance(value, int):
        return (value,) * num_stages
    values = tuple(int(v) for v in value)
    if len(values) != num_stages:
        raise ValueError(f"{name} has {len(values)} entries but the encoder has {num_stages} stages.")
    return values


def _stream_names(streams: Sequence[str]) -> list[str]:
    """Unique module names for the streams: the kind, suffixed ``_2``, ``_3`` … when repeated."""
    names, seen = [], {}
    for kind in streams:
        seen[kind] = seen.get(kind, 0) + 1
        names.append(kind if seen[kind] == 1 else f"{kind}_{seen[kind]}")
    return names


class DualStreamEncoder(nn.Module):
    """DiSCo: parallel streams at matched resolutions, fused at every scale.

    Args:
        in_channels: Image channels.
        widths: Channels ``C_k`` per stage (stage ``k`` has stride ``4·2^(k-1)``).
        streams: Stream kinds, each one of :data:`STREAM_KINDS`; GLANCE is ``("gct", "mrgam")``.
        fusion: ``"cscf"`` (consensus map feeds both streams' next stage and the decoder) or ``"none"``
            (independent streams, decoder skip = concatenation).
        stem_channels: Widths of the stride-1/stride-2 stem (entry of the convolutional streams and
            high-resolution decoder skips).
        build_stem: Build the stem even when no convolutional stream needs it (the decoder does).
        gct_depths, gct_heads, gct_sr_ratios, gct_mlp_ratio, gct_patch_kernel: GCT stream shape.
        img_size: Working size the stage-1 positional embedding is learned at.
        drop_path_rate: Maximum stochastic depth over GCT blocks (linearly increasing).
        mrgam_depths, mrgam_dilations, mrgam_groups, mrgam_weighting: MRGAM stream shape.
        conv_depths: Units per plain conv stage (baseline streams).
        se_reduction: Squeeze-excitation ratio in CSCF and the MRGAM gates.
        gradient_checkpointing: Recompute stage activations in backward to save memory.
    """

    def __init__(
        self,
        in_channels: int = 1,
        widths: Sequence[int] = (64, 128, 256, 512),
        streams: Sequence[str] = ("gct", "mrgam"),
        fusion: str = "cscf",
        stem_channels: tuple[int, int] = (16, 32),
        build_stem: bool = True,
        gct_depths: int | Sequence[int] = 2,
        gct_heads: int | Sequence[int] = (1, 2, 4, 8),
        gct_sr_ratios: int | Sequence[int] = (8, 4, 1, 1),
        gct_mlp_ratio: float = 4.0,
        gct_patch_kernel: int = 4,
        img_size: int = 512,
        drop_path_rate: float = 0.0,
        mrgam_depths: int | Sequence[int] = 2,
        mrgam_dilations: Sequence[int] = (1, 3, 5),
        mrgam_groups: int | Sequence[int] = 4,
        mrgam_weighting: str = "global_local",
        conv_depths: int | Sequence[int] = 2,
        se_reduction: int = 16,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        num_stages = len(widths)
        if num_stages < 2:
            raise ValueError(f"The encoder needs at least 2 stages, got widths={widths}.")
        streams = tuple(streams)
        if not streams:
            raise ValueError("The encoder needs at least one stream.")
        unknown = [s for s in streams if s not in STREAM_KINDS]
        if unknown:
            raise ValueError(f"Unknown stream kind(s) {unknown}; choose from {STREAM_KINDS}.")
        if fusion not in FUSIONS:
            raise ValueError(f"Unknown fusion {fusion!r}; choose from {FUSIONS}.")
        if mrgam_weighting not in MRGAM_WEIGHTINGS:
            raise ValueError(f"Unknown MRGAM weighting {mrgam_weighting!r}; choose from {MRGAM_WEIGHTINGS}.")
        if img_size % 32 != 0:
            raise ValueError(f"img_size must be a multiple of 32, got {img_size}.")

        self.widths = widths
        self.kinds = streams
        self.names = _stream_names(streams)
        self.fusion_mode = fusion
        self.gradient_checkpointing = gradient_checkpointing
        gct_depths = _per_stage("gct_depths", gct_depths, num_stages)
        gct_heads = _per_stage("gct_heads", gct_heads, num_stages)
        gct_sr_ratios = _per_stage("gct_sr_ratios", gct_sr_ratios, num_stages)
        mrgam_depths = _per_stage("mrgam_depths", mrgam_depths, num_stages)
        mrgam_groups = _per_stage("mrgam_groups", mrgam_groups, num_stages)
        conv_depths = _per_stage("conv_depths", conv_depths, num_stages)
        has_gct = "gct" in streams

        needs_stem = build_stem or any(kind != "gct" for kind in streams)
        self.stem = ImageStem(in_channels, stem_channels) if needs_stem else None

        drop_rates = torch.linspace(0, drop_path_rate, sum(gct_depths)).tolist()
        self.streams = nn.ModuleDict()
        for name, kind in zip(self.names, streams):
            stages = nn.ModuleList()
            for k, width in enumerate(widths):
                if kind == "gct":
                    start = sum(gct_depths[:k])
                    stages.append(
                        GCTStage(
                            in_channels if k == 0 else widths[k - 1],
                            width,
                            depth=gct_depths[k],
                            num_heads=gct_heads[k],
                            sr_ratio=gct_sr_ratios[k],
                            mlp_ratio=gct_mlp_ratio,
                            patch_kernel=gct_patch_kernel if k == 0 else 3,
                            patch_stride=4 if k == 0 else 2,
                            pos_embed_size=(img_size // 4, img_size // 4) if k == 0 else None,
                            drop_path=drop_rates[start : start + gct_depths[k]],
                        )
                    )
                    continue
                stage_in = stem_channels[1] if k == 0 else widths[k - 1]
                if kind == "mrgam":
                    stages.append(
                        MRGAMStage(
                            stage_in,
                            width,
                            depth=mrgam_depths[k],
                            dilations=tuple(mrgam_dilations),
                            groups=mrgam_groups[k],
                            weighting=mrgam_weighting,
                            context_channels=width if has_gct else None,
                            reduction=se_reduction,
                        )
                    )
                else:
                    stages.append(PlainConvStage(stage_in, width, depth=conv_depths[k]))
            self.streams[name] = stages

        self.fusions = nn.ModuleList(
            ConsensusFusion(w, len(streams), se_reduction)
            if fusion == "cscf"
            else LateFusion(w, len(streams))
            for w in widths
        )
        # GCT streams run first so their same-stage maps can condition the MRGAM gates.
        self._order = sorted(range(len(streams)), key=lambda i: streams[i] != "gct")

    @property
    def skip_channels(self) -> tuple[int, ...]:
        """Width of each stage's decoder skip (fine → coarse)."""
        return tuple(f.out_channels for f in self.fusions)

    @property
    def stem_channels(self) -> tuple[int, int] | None:
        """Stem widths (stride 1, stride 2) or ``None`` without a stem."""
        return None if self.stem is None else self.stem.out_channels

    def _run(self, module: nn.Module, *args: Any) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def forward(self, x: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, list[torch.Tensor]]:
        """Encode an image batch.

        Returns:
            ``(stem_maps, skips)``: the stride-1/stride-2 stem maps (``None`` without a stem) and the fused
            map of every stage ordered fine → coarse (``skips[-1]`` is the bottleneck).
        """
        stem_maps = self._run(self.stem, x) if self.stem is not None else None
        previous: list[torch.Tensor | None] = [None] * len(self.kinds)
        skips: list[torch.Tensor] = []
        for k in range(len(self.widths)):
            outputs: list[torch.Tensor | None] = [None] * len(self.kinds)
            context = None
            for i in self._order:
                kind, stage = self.kinds[i], self.streams[self.names[i]][k]
                if k == 0:
                    source = x if kind == "gct" else stem_maps[1]
                else:
                    source = previous[i]
                if kind == "mrgam":
                    outputs[i] = self._run(stage, source, context)
                else:
                    outputs[i] = self._run(stage, source)
                if kind == "gct" and context is None:
                    context = outputs[i]
            fused = self._run(self.fusions[k], outputs)
            skips.append(fused)
            previous = [fused] * len(self.kinds) if self.fusion_mode == "cscf" else outputs
        return stem_maps, skips


class GlanceNet(nn.Module):
    """The complete GLANCE network (or any ablation row) with segmentation / heatmap / deep-supervision heads.

    Input: ``B×in_channels×H×W`` lung-windowed slices in [0, 1]; ``H`` and ``W`` must be multiples of
    ``4·2^(L-1)`` (32 for the default four stages).

    Output: a dict with

    * ``"seg"`` — ``B×1×H×W`` nodule logits (only if ``"seg"`` in ``heads``),
    * ``"heatmap"`` — ``B×1×H×W`` centre-heatmap logits (only if ``"heatmap"`` in ``heads``),
    * ``"aux"`` — list of ``B×1×h×w`` deep-supervision segmentation logits at the strides in
      :attr:`aux_strides`, finest first (present when ``"seg"`` is a head and deep supervision is on).

    All outputs are logits; apply ``torch.sigmoid`` for probabilities.

    Args:
        in_channels: Image channels (1; more for 2.5D slice stacks).
        widths: Channels per encoder stage; the decoder mirrors them.
        streams: Encoder stream kinds, see :data:`STREAM_KINDS`.
        fusion: ``"cscf"`` or ``"none"``, see :class:`DualStreamEncoder`.
        heads: Which prediction heads to build, subset of ``("seg", "heatmap")``.
        deep_supervision: Build auxiliary segmentation heads on intermediate decoder stages.
        deep_supervision_strides: Strides of the decoder stages that get an aux head; ``None`` = every
            intermediate pyramid stage with stride ≥ 4 (4, 8, 16 by default).
        full_resolution_decoder: Decode down to stride 1 through the stem skips (default) or stop at
            stride 4 and up-sample the logits.
        stem_channels: Stem widths at stride 1 and 2.
        decoder_channels: Decoder stage widths fine → coarse; default = stem widths + ``widths[:-1]``.
        upsample, residual_decoder, skip_gate: PRD options, see :class:`DecoderStage`.
        heatmap_prior: Initial heatmap probability, set through the heatmap head's bias so the focal loss
            starts from a background level instead of 0.5 everywhere. CenterNet uses 0.1 at stride 4; our
            heatmap is at full resolution (16× more background pixels per centre), where 0.1 makes the
            initial focal term ≈ 280 per 512² slice and swamps the segmentation loss, so we default to
            0.01 (initial focal ≈ 5, background share ≈ 0.3).
        seg_prior: Initial nodule probability of the segmentation head, set through its bias like
            ``heatmap_prior``; ``None`` (default) keeps PyTorch's initialisation (probability ≈ 0.5).
        gradient_checkpointing: Trade compute for memory in encoder stages and decoder blocks.
        **encoder_kwargs: Forwarded to :class:`DualStreamEncoder` (GCT/MRGAM/conv shapes, ``img_size``…).
    """

    def __init__(
        self,
        in_channels: int = 1,
        widths: Sequence[int] = (64, 128, 256, 512),
        streams: Sequence[str] = ("gct", "mrgam"),
        fusion: str = "cscf",
        heads: Sequence[str] = HEADS,
        deep_supervision: bool = True,
        deep_supervision_strides: Sequence[int] | None = None,
        full_resolution_decoder: bool = True,
        stem_channels: tuple[int, int] = (16, 32),
        decoder_channels: Sequence[int] | None = None,
        upsample: str = "bilinear",
        residual_decoder: bool = True,
        skip_gate: bool = False,
        heatmap_prior: float = 0.01,
        seg_prior: float | None = None,
        gradient_checkpointing: bool = False,
        **encoder_kwargs: Any,
    ) -> None:
        super().__init__()
        heads = tuple(heads)
        if not heads or any(h not in HEADS for h in heads):
            raise ValueError(f"heads must be a non-empty subset of {HEADS}, got {heads}.")
        if not 0.0 < heatmap_prior < 1.0:
            raise ValueError(f"heatmap_prior must lie in (0, 1), got {heatmap_prior}.")
        if seg_prior is not None and not 0.0 < seg_prior < 1.0:
            raise ValueError(f"seg_prior must lie in (0, 1), got {seg_prior}.")
        self.in_channels = in_channels
        self.heads = heads
        self.full_resolution_decoder = full_resolution_decoder
        self.encoder = DualStreamEncoder(
            in_channels,
            widths,
            streams,
            fusion,
            stem_channels=tuple(stem_channels),
            build_stem=full_resolution_decoder,
            gradient_checkpointing=gradient_checkpointing,
            **encoder_kwargs,
        )
        num_stages = len(self.encoder.widths)
        self.size_divisor = 4 * 2 ** (num_stages - 1)

        skip_channels = list(self.encoder.skip_channels[:-1])
        strides = [4 * 2**k for k in range(num_stages - 1)]
        default_decoder = list(self.encoder.widths[:-1])
        if full_resolution_decoder:
            skip_channels = list(self.encoder.stem_channels) + skip_channels
            strides = [1, 2] + strides
            default_decoder = list(stem_channels) + default_decoder
        decoder_channels = list(decoder_channels) if decoder_channels is not None else default_decoder
        self.decoder = PyramidRefinementDecoder(
            self.encoder.skip_channels[-1],
            skip_channels,
            decoder_channels,
            upsample,
            residual_decoder,
            skip_gate,
        )
        self.decoder_strides = tuple(strides)
        self._checkpoint_decoder = gradient_checkpointing

        final_channels = decoder_channels[0]
        self.seg_head = nn.Conv2d(final_channels, 1, 1) if "seg" in heads else None
        self.heatmap_head = nn.Conv2d(final_channels, 1, 1) if "heatmap" in heads else None
        _set_prior(self.heatmap_head, heatmap_prior)
        _set_prior(self.seg_head, seg_prior)

        intermediate = strides[1:]
        if deep_supervision_strides is None:
            aux_strides = tuple(s for s in intermediate if s >= 4)
        else:
            aux_strides = tuple(int(s) for s in deep_supervision_strides)
            bad = [s for s in aux_strides if s not in intermediate]
            if bad:
                raise ValueError(
                    f"deep_supervision_strides {bad} are not intermediate decoder strides {intermediate}."
                )
        self.aux_strides: tuple[int, ...] = aux_strides if (deep_supervision and "seg" in heads) else ()
        self.aux_heads = nn.ModuleList(
            nn.Conv2d(decoder_channels[strides.index(s)], 1, 1) for s in self.aux_strides
        )

    def _checkpoint_fn(self) -> Callable[..., torch.Tensor] | None:
        if self._checkpoint_decoder and torch.is_grad_enabled():
            return lambda module, *args: checkpoint(module, *args, use_reentrant=False)
        return None

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ``ValueError`` that says how to fix a wrongly shaped input batch."""
        if x.ndim != 4:
            raise ValueError(f"GLANCE expects a B×C×H×W batch, got shape {tuple(x.shape)}.")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"GLANCE was built for {self.in_channels} input channel(s) but got {x.shape[1]}; "
                "set in_channels or feed lung-windowed single-channel slices."
            )
        h, w = x.shape[-2:]
        if h % self.size_divisor or w % self.size_divisor:
            raise ValueError(
                f"Input size {h}×{w} is not a multiple of {self.size_divisor}; resize or pad slices "
                f"(e.g. to 512×512) before the model."
            )

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        """Predict logits for a ``B×C×H×W`` batch; see the class docstring for the output keys."""
        self.check_input(x)
        stem_maps, skips = self.encoder(x)
        decoder_skips = list(skips[:-1])
        if self.full_resolution_decoder:
            decoder_skips = list(stem_maps) + decoder_skips
        features = self.decoder(skips[-1], decoder_skips, self._checkpoint_fn())
        final = features[0]
        out: dict[str, Any] = {}
        if self.seg_head is not None:
            out["seg"] = self._to_input_size(self.seg_head(final), x)
        if self.heatmap_head is not None:
            out["heatmap"] = self._to_input_size(self.heatmap_head(final), x)
        if self.aux_strides:
            out["aux"] = [
                head(features[self.decoder_strides.index(s)])
                for head, s in zip(self.aux_heads, self.aux_strides)
            ]
        return out

    @staticmethod
    def _to_input_size(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if logits.shape[-2:] == x.shape[-2:]:
            return logits
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def build_glance(variant: str | None = None, **config: Any) -> GlanceNet:
    """Build GLANCE or one of its table rows.

    Args:
        variant: Name of a preset in :data:`lungseg.models.variants.VARIANTS` (e.g. ``"full"``,
            ``"wo_cscf"``, ``"weighting_uniform"``); ``None`` means the defaults of :class:`GlanceNet`
            (= the full model).
        **config: :class:`GlanceNet` keyword arguments; they override the preset (e.g. ``widths``).

    Returns:
        The constructed network.
    """
    from lungseg.models.variants import get_variant

    params: dict[str, Any] = {}
    if variant is not None:
        params.update(get_variant(variant).model)
    params.update(config)
    return GlanceNet(**params)
