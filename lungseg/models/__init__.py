"""GLANCE networks for 2D nodule segmentation + centre-heatmap detection (GLANCE, npj Digit. Med. 2025).

Public API (everything a task, datamodule or CLI needs)::

    from lungseg.models import build_glance, GlanceNet, VARIANTS, get_variant, variant_names

    model = build_glance()                          # full GLANCE, paper configuration, 512×512 default
    model = build_glance("wo_cscf")                 # any table row by name (Tables 1, 4/5, 6, 7)
    model = build_glance("full", widths=(32, 64, 128, 256), gradient_checkpointing=True)  # overrides win

    out = model(x)                                  # x: B×1×H×W lung-windowed [0, 1], H, W multiples of 32
    out["seg"]        # B×1×H×W nodule logits            (absent for "detection_only")
    out["heatmap"]    # B×1×H×W centre-heatmap logits    (absent for "segmentation_only")
    out["aux"]        # [B×1×H/4×W/4, B×1×H/8×W/8, B×1×H/16×W/16] deep-supervision logits (with "seg")

    from lungseg.losses import GlanceLoss, gaussian_center_heatmap
    loss_fn = GlanceLoss(**get_variant("lambda_det_0.4").loss)   # λseg(Dice+BCE) + 0.3·aux + λdet·focal
    terms = loss_fn(out, {"mask": mask, "heatmap": heatmap})     # terms["loss"] to back-propagate

Modules: :mod:`.gct` (global stream), :mod:`.mrgam` (local stream, six branch weightings),
:mod:`.cscf` (consensus fusion), :mod:`.decoder` (pyramid refinement decoder), :mod:`.baselines` (plain conv
stream for the ablation rows), :mod:`.glance` (assembly, heads, :func:`build_glance`), :mod:`.variants`
(named presets). Parameter/FLOP report: :mod:`lungseg.complexity`. Design notes: ``docs/lungseg.md``.
"""

from lungseg.models.baselines import PlainConvStage
from lungseg.models.cscf import ConsensusFusion, LateFusion
from lungseg.models.decoder import DecoderStage, PyramidRefinementDecoder
from lungseg.models.gct import GCTBlock, GCTStage, PatchEmbed, SpatialReductionAttention
from lungseg.models.glance import FUSIONS, HEADS, STREAM_KINDS, DualStreamEncoder, GlanceNet, build_glance
from lungseg.models.mrgam import MRGAM_WEIGHTINGS, MRGAMBlock, MRGAMStage
from lungseg.models.variants import TABLE_ROWS, VARIANTS, Variant, get_variant, variant_names

__all__ = [
    "FUSIONS",
    "HEADS",
    "MRGAM_WEIGHTINGS",
    "STREAM_KINDS",
    "TABLE_ROWS",
    "VARIANTS",
    "ConsensusFusion",
    "DecoderStage",
    "DualStreamEncoder",
    "GCTBlock",
    "GCTStage",
    "GlanceNet",
    "LateFusion",
    "MRGAMBlock",
    "MRGAMStage",
    "PatchEmbed",
    "PlainConvStage",
    "PyramidRefinementDecoder",
    "SpatialReductionAttention",
    "Variant",
    "build_glance",
    "get_variant",
    "variant_names",
]
