"""2D pathology / cancer-type classifiers: the timm model zoo the two pathology-dataset papers benchmark.

LDFC (Sci. Data 2024) (LDFC: benign / adenocarcinoma / squamous) and STPD (Jian et al., preprint 2024) (six pathology classes) score a set of
standard ImageNet architectures on 2D nodule images by ACC and QWK. The papers name architecture
families, not variants; `PATHOLOGY_ZOO` fixes one timm model per family (the common reference depth of
each family), and any timm model name is accepted as well:

| paper name | timm model |
| --- | --- |
| ResNet | resnet50 |
| EfficientNet | efficientnet_b0 |
| ResNeXt | resnext50_32x4d |
| Res2Net | res2net50_26w_4s |
| SE-ResNet | seresnet50 |
| ViT (Vision Transformer) | vit_base_patch16_224 |
| Inception-v4 | inception_v4 |
| ConvNeXt | convnext_tiny |
| Swin (Swin Transformer) | swin_tiny_patch4_window7_224 |

CABNet (papers 003/004) is a category-attention head from a retinal-grading paper and has no timm model; it
is not part of this zoo.

Names are matched without case, spaces, hyphens or underscores ("SE-ResNet" = "seresnet" = "se_resnet").
"""

from __future__ import annotations

import re
from typing import Any

import timm
from torch import nn

__all__ = ["PATHOLOGY_ZOO", "create_pathology_classifier", "resolve_pathology_model"]

#: the papers' architecture families → timm model names.
PATHOLOGY_ZOO: dict[str, str] = {
    "ResNet": "resnet50",
    "EfficientNet": "efficientnet_b0",
    "ResNeXt": "resnext50_32x4d",
    "Res2Net": "res2net50_26w_4s",
    "SE-ResNet": "seresnet50",
    "ViT": "vit_base_patch16_224",
    "Inception-v4": "inception_v4",
    "ConvNeXt": "convnext_tiny",
    "Swin": "swin_tiny_patch4_window7_224",
}

_ALIASES: dict[str, str] = {
    "visiontransformer": "ViT",
    "vittransformer": "ViT",
    "swintransformer": "Swin",
    "inception": "Inception-v4",
}

#: timm families whose constructors take `img_size` (their position embeddings / windows depend on it).
_SIZED_PREFIXES = ("vit_", "deit", "swin", "beit", "eva", "cait", "xcit", "flexivit")


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name).lower()


_LOOKUP = {_key(k): v for k, v in PATHOLOGY_ZOO.items()} | {a: PATHOLOGY_ZOO[f] for a, f in _ALIASES.items()}


def resolve_pathology_model(name: str) -> str:
    """Map a paper's model name (or a timm name) to a timm model name.

    Raises:
        ValueError: neither a zoo family nor a timm model.
    """
    resolved = _LOOKUP.get(_key(name))
    if resolved is not None:
        return resolved
    if timm.is_model(name):
        return name
    raise ValueError(
        f"unknown pathology classifier {name!r}: use one of {sorted(PATHOLOGY_ZOO)} or a timm model name"
    )


def create_pathology_classifier(
    name: str,
    num_classes: int,
    *,
    in_chans: int = 3,
    img_size: int | None = None,
    pretrained: bool = False,
    drop_rate: float = 0.0,
    **timm_kwargs: Any,
) -> nn.Module:
    """Build a 2D image classifier from the zoo (or any timm model).

    Args:
        name: a paper family name ("ResNet", "SE-ResNet", "Swin", …) or a timm model name.
        num_classes: 3 for LDFC (benign / adenocarcinoma / squamous), 6 for the spatio-temporal set.
        in_chans: image channels (3 for the RGB/BMP exports, 1 for raw HU windows).
        img_size: training image size; passed to the transformer families (ViT, Swin, …) whose position
            embeddings or windows depend on it; convolutional networks take any size.
        pretrained: load timm's pretrained weights (must be in the local cache; nothing is downloaded here).
        drop_rate: dropout before the classifier.
        **timm_kwargs: further `timm.create_model` keywords (e.g. `drop_path_rate`).

    Returns:
        A module mapping `(B, in_chans, H, W)` images to `(B, num_classes)` logits.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    timm_name = resolve_pathology_model(name)
    kwargs = dict(timm_kwargs)
    if img_size is not None and timm_name.startswith(_SIZED_PREFIXES):
        kwargs.setdefault("img_size", img_size)
    return timm.create_model(
        timm_name,
        pretrained=pretrained,
        num_classes=num_classes,
        in_chans=in_chans,
        drop_rate=drop_rate,
        **kwargs,
    )
