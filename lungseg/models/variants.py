"""Named presets for every GLANCE table row (paper Tables 1, 4, 5, 6, 7).

Each :class:`Variant` holds the :class:`~lungseg.models.glance.GlanceNet` keyword arguments (``model``)
and the :class:`~lungseg.losses.GlanceLoss` keyword arguments (``loss``) that differ from the defaults, so a
table file or a config only names a row: ``build_glance("wo_cscf")``, ``GlanceLoss(**get_variant(n).loss)``.
Everything else (widths, depths, input size) stays a free override.

How the ablation rows map onto streams and fusion. All rows share the stem, the pyramid refinement
decoder and the heads; "plain conv" is :class:`~lungseg.models.baselines.PlainConvStage` (dense U-Net
stage). The paper's footnote fixes the two starred rows; for the others we read "w/o X" as removing that
component and keeping the rest, which makes all ten rows distinct:

=====================  ==========================  =======  ============================================
key                    streams                     fusion   paper row (Tables 4/5)
=====================  ==========================  =======  ============================================
full                   gct + mrgam                 cscf     Full GLANCE (GCT+MRGAM+CSCF)
wo_cscf                gct + mrgam                 none     w/o CSCF (no cross-scale fusion)
wo_mrgam               gct                         cscf     w/o MRGAM (no atrous conv branch)
wo_gct                 mrgam                       cscf     w/o GCT (no transformer branch)
two_local_streams      mrgam + mrgam               cscf     w/o GCT, w/ CSCF (two local streams)*
conv_plus_transformer  gct + conv                  cscf     w/o MRGAM, w/ CSCF (conv + transformer)*
single_mrgam           mrgam                       none     w/o GCT & w/o CSCF (MRGAM only)
single_gct             gct                         none     w/o MRGAM & w/o CSCF (GCT only)
dual_plain             conv + conv                 cscf     w/o GCT & w/o MRGAM (dual plain encoders)
plain_unet             conv                        none     baseline U-Net
=====================  ==========================  =======  ============================================

With one stream, CSCF is its single-input form (gated residual 1×1 refinement, see
:mod:`lungseg.models.cscf`). MRGAM streams without a GCT partner gate on local statistics only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["TABLE_ROWS", "VARIANTS", "Variant", "get_variant", "variant_names"]

#: λdet values of the paper's Table 7 sensitivity analysis (0.3 is the paper's choice).
LAMBDA_DET_SWEEP: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5)


@dataclass(frozen=True)
class Variant:
    """One table row.

    Attributes:
        name: Preset key.
        tables: Paper tables the row appears in (``"table1"``, ``"table4"`` …).
        row: The row's label in the paper.
        model: ``GlanceNet`` keyword arguments of the row.
        loss: ``GlanceLoss`` keyword arguments of the row.
    """

    name: str
    tables: tuple[str, ...]
    row: str
    model: Mapping[str, Any] = field(default_factory=dict)
    loss: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", MappingProxyType(dict(self.model)))
        object.__setattr__(self, "loss", MappingProxyType(dict(self.loss)))


_ABLATION = ("table4", "table5")

_ROWS: list[Variant] = [
    Variant("full", ("table1", *_ABLATION, "table6", "table7"), "Full GLANCE (GCT+MRGAM+CSCF)"),
    Variant("detection_only", ("table1",), "Detection-only", model={"heads": ("heatmap",)}),
    Variant("segmentation_only", ("table1",), "Segmentation-only", model={"heads": ("seg",)}),
    Variant("wo_cscf", _ABLATION, "w/o CSCF (no cross-scale fusion)", model={"fusion": "none"}),
    Variant("wo_mrgam", _ABLATION, "w/o MRGAM (no atrous conv branch)", model={"streams": ("gct",)}),
    Variant("wo_gct", _ABLATION, "w/o GCT (no transformer branch)", model={"streams": ("mrgam",)}),
    Variant(
        "two_local_streams",
        _ABLATION,
        "w/o GCT, w/ CSCF (two local streams)",
        model={"streams": ("mrgam", "mrgam")},
    ),
    Variant(
        "conv_plus_transformer",
        _ABLATION,
        "w/o MRGAM, w/ CSCF (conv + transformer)",
        model={"streams": ("gct", "conv")},
    ),
    Variant(
        "single_mrgam",
        _ABLATION,
        "w/o GCT & w/o CSCF (MRGAM only)",
        model={"streams": ("mrgam",), "fusion": "none"},
    ),
    Variant(
        "single_gct",
        _ABLATION,
        "w/o MRGAM & w/o CSCF (GCT only)",
        model={"streams": ("gct",), "fusion": "none"},
    ),
    Variant(
        "dual_plain",
        _ABLATION,
        "w/o GCT & w/o MRGAM (dual plain encoders)",
        model={"streams": ("conv", "conv")},
    ),
    Variant("plain_unet", _ABLATION, "baseline U-Net", model={"streams": ("conv",), "fusion": "none"}),
    Variant("weighting_global_local", ("table6",), "Global+Local softmax (ours)"),
    Variant("weighting_uniform", ("table6",), "Uniform (1/N)", model={"mrgam_weighting": "uniform"}),
    Variant("weighting_local_se", ("table6",), "Local-SE only", model={"mrgam_weighting": "local_se"}),
    Variant("weighting_static", ("table6",), "Static scalars (learned)", model={"mrgam_weighting": "static"}),
    Variant(
        "weighting_conv1x1", ("table6",), "1×1-Conv mixing (no gating)", model={"mrgam_weighting": "conv1x1"}
    ),
    Variant(
        "weighting_attention",
        ("table6",),
        "Scaled dot-product attention",
        model={"mrgam_weighting": "attention"},
    ),
    *(
        Variant(
            f"lambda_det_{value}",
            ("table7",),
            f"λdet = {value}" + (" (ours)" if value == 0.3 else ""),
            loss={"lambda_det": value},
        )
        for value in LAMBDA_DET_SWEEP
    ),
]

#: Every preset by name. ``weighting_global_local`` and ``lambda_det_0.3`` equal ``full`` (the paper lists
#: its own configuration as a row of Tables 6 and 7) and exist so each table can be rendered by row name.
VARIANTS: Mapping[str, Variant] = MappingProxyType({v.name: v for v in _ROWS})

_ABLATION_ROWS: tuple[str, ...] = (
    "full",
    "wo_cscf",
    "wo_mrgam",
    "wo_gct",
    "two_local_streams",
    "conv_plus_transformer",
    "single_mrgam",
    "single_gct",
    "dual_plain",
    "plain_unet",
)

#: Ordered row names per paper table, as printed in the paper (Tables 4 and 5 share their rows).
TABLE_ROWS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "table1": ("detection_only", "segmentation_only", "full"),
        "table4": _ABLATION_ROWS,
        "table5": _ABLATION_ROWS,
        "table6": (
            "weighting_global_local",
            "weighting_uniform",
            "weighting_local_se",
            "weighting_static",
            "weighting_conv1x1",
            "weighting_attention",
        ),
        "table7": tuple(f"lambda_det_{v}" for v in LAMBDA_DET_SWEEP),
    }
)


def get_variant(name: str) -> Variant:
    """Return the preset called ``name`` or raise a ``KeyError`` listing the valid names."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise KeyError(f"Unknown GLANCE variant {name!r}; valid names: {', '.join(VARIANTS)}.") from None


def variant_names(table: str | None = None) -> tuple[str, ...]:
    """All preset names, or the rows of one paper table (``"table1"``, ``"table4"`` … ``"table7"``)."""
    if table is None:
        return tuple(VARIANTS)
    if table not in TABLE_ROWS:
        raise KeyError(f"Unknown table {table!r}; choose one of {', '.join(TABLE_ROWS)}.")
    return TABLE_ROWS[table]
