"""Per-scale feature extractors for M³Net: timm 2D networks over slices-as-channels and MONAI 3D ResNets.

Every M³Net scale sees a nodule patch of shape `(B, 1, Z, Y, X)` (56 slices by default, see
docs/architecture.md for the axis order). The paper gives each scale its own backbone kind, so this module
hides the difference behind one interface, `ScaleBackbone`, whose forward returns `BackboneFeatures`:

- `tokens`      `(B, L, C)` — the last feature map flattened into spatial tokens (what the hierarchical
  cross-attention attends over),
- `pooled`      `(B, C)` — the globally pooled feature vector F_s of eq. (2) (what the stage-1 head reads),
- `feature_map` — the raw last-stage output, kept for Grad-CAM.

Two families:

- `Timm2DBackbone` — any timm model with the Z slices as input channels
  (`timm.create_model(name, in_chans=56, num_classes=0)`), optionally resizing the in-plane size first.
  The released M³Net code runs ConvNeXt-Base's stages at 56×56 on a 32×32 patch (bilinear upsampling before
  a 1×1 stem); `input_size=224` reaches the same stage resolution through timm's own stride-4 stem.
- `ResNet3DBackbone` — `monai.networks.nets.ResNet` with the reference code's stem: 7×7×7 convolution with
  stride (1, 2, 2) (slices are not subsampled by the stem) followed by a stride-2 max-pool, and 1×1×1
  bias-free projection shortcuts. Depths 10/18/34/50/101/152 and any channel widths (reduced widths make a
  CPU-trainable model).

`create_backbone(name, **kwargs)` picks the family by name: `resnet3d<depth>` is a MONAI 3D ResNet,
anything else must be a timm model name.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import timm
import torch.nn.functional as F
from monai.networks.nets.resnet import ResNet
from timm.models import group_parameters
from torch import Tensor, nn

__all__ = [
    "RESNET3D_DEPTHS",
    "BackboneFeatures",
    "ResNet3DBackbone",
    "ScaleBackbone",
    "Timm2DBackbone",
    "create_backbone",
]

#: depth → (MONAI block kind, blocks per stage); the torchvision/MedicalNet layouts.
RESNET3D_DEPTHS: dict[int, tuple[str, list[int]]] = {
    10: ("basic", [1, 1, 1, 1]),
    18: ("basic", [2, 2, 2, 2]),
    34: ("basic", [3, 4, 6, 3]),
    50: ("bottleneck", [3, 4, 6, 3]),
    101: ("bottleneck", [3, 4, 23, 3]),
    152: ("bottleneck", [3, 8, 36, 3]),
}


@dataclass
class BackboneFeatures:
    """What a scale backbone hands to the heads and the fusion.

    Attributes:
        tokens: `(B, L, C)` spatial tokens of the last stage (L = number of positions in the last map).
        pooled: `(B, C)` globally pooled features F_s.
        feature_map: the last stage's raw output (`(B, C, h, w)`, `(B, C, z, y, x)`, or `(B, N, C)` for
            token models), kept so Grad-CAM can hook it.
    """

    tokens: Tensor
    pooled: Tensor
    feature_map: Tensor


class ScaleBackbone(nn.Module, abc.ABC):
    """A backbone for one patch scale.

    Subclasses set `num_features` (channel width C of `tokens` and `pooled`) and `spatial_dims`
    (2 for slices-as-channels networks, 3 for volumetric ones) and list their parameters from shallow to
    deep in `parameter_groups`, which the freezing policies use ("freeze the lower layers").
    """

    num_features: int
    spatial_dims: int

    @abc.abstractmethod
    def forward(self, patch: Tensor) -> BackboneFeatures:
        """Extract features from a `(B, 1, Z, Y, X)` patch (a `(B, Z, Y, X)` patch is accepted too)."""

    @abc.abstractmethod
    def parameter_groups(self) -> list[list[nn.Parameter]]:
        """Parameters grouped stem first, then one group per stage, deepest last."""


def _as_volume(patch: Tensor, channels: int, owner: str) -> Tensor:
    """Return `(B, C, Z, Y, X)`; a 4-D `(B, Z, Y, X)` patch gets the channel axis when C == 1."""
    if patch.ndim == 4 and channels == 1:
        patch = patch.unsqueeze(1)
    if patch.ndim != 5 or patch.shape[1] != channels:
        raise ValueError(
            f"{owner}: expected a patch of shape (B, {channels}, Z, Y, X)"
            + (" or (B, Z, Y, X)" if channels == 1 else "")
            + f", got {tuple(patch.shape)}; the datamodule must stack patches as (batch, channel, z, y, x)"
        )
    return patch


class Timm2DBackbone(ScaleBackbone):
    """A timm 2D network that reads the patch's slices as image channels.

    Args:
        name: timm model name (e.g. "convnext_base", "convnext_atto", "resnet10t", "test_convnext").
        in_slices: number of slices Z in the patch; becomes the network's `in_chans`.
        input_size: resize the in-plane size to `input_size × input_size` (bilinear) before the network.
            None keeps the patch size. Small patches through stride-32 networks end in a 1×1 map (a single
            token); upsampling restores a spatial token grid — 224 gives ConvNeXt the 7×7 last map that the
            reference code's 56×56 stage input gives.
        pretrained: load timm's pretrained weights (needs them in the local timm/HF cache; timm adapts
            the first convolution to `in_slices` channels).
        **timm_kwargs: passed to `timm.create_model` (e.g. `drop_path_rate`, `img_size` for ViT/Swin).
    """

    spatial_dims = 2

    def __init__(
        self,
        name: str,
        *,
        in_slices: int = 56,
        input_size: int | None = None,
        pretrained: bool = False,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        if not timm.is_model(name):
            raise ValueError(
                f"unknown backbone {name!r}: not a timm model and not resnet3d<depth> "
                f"(depths {sorted(RESNET3D_DEPTHS)}); see timm.list_models() for 2D names"
            )
        if in_slices < 1:
            raise ValueError(f"in_slices must be >= 1, got {in_slices}")
        if input_size is not None and input_size < 1:
            raise ValueError(f"input_size must be a positive in-plane size or None, got {input_size}")
        self.name = name
        self.in_slices = in_slices
        self.input_size = input_size
        self.model = timm.create_model(
            name, pretrained=pretrained, in_chans=in_slices, num_classes=0, **timm_kwargs
        )
        self.num_features = int(self.model.num_features)
        self._channels_last = getattr(self.model, "output_fmt", "NCHW") == "NHWC"
        self._prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0))

    def forward(self, patch: Tensor) -> BackboneFeatures:
        """Run the network on the slices-as-channels image of a `(B, 1, Z, Y, X)` patch."""
        if patch.ndim == 5:
            if patch.shape[1] != 1:
                raise ValueError(
                    f"{self.name}: a 2D slices-as-channels backbone takes single-channel patches "
                    f"(B, 1, Z, Y, X), got {tuple(patch.shape)}"
                )
            patch = patch[:, 0]
        if patch.ndim != 4 or patch.shape[1] != self.in_slices:
            raise ValueError(
                f"{self.name}: expected (B, 1, {self.in_slices}, Y, X) patches, got {tuple(patch.shape)}; "
                f"set in_slices to the number of slices the datamodule crops"
            )
        if self.input_size is not None and tuple(patch.shape[-2:]) != (self.input_size, self.input_size):
            patch = F.interpolate(
                patch, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False
            )
        feature_map = self.model.forward_features(patch)
        pooled = self.model.forward_head(feature_map, pre_logits=True)
        if feature_map.ndim == 4:
            tokens = (
                feature_map.flatten(1, 2) if self._channels_last else feature_map.flatten(2).transpose(1, 2)
            )
        elif feature_map.ndim == 3:
            has_prefix = 0 < self._prefix_tokens < feature_map.shape[1]
            tokens = feature_map[:, self._prefix_tokens :] if has_prefix else feature_map
        else:
            raise RuntimeError(f"{self.name}: unsupported feature map shape {tuple(feature_map.shape)}")
        return BackboneFeatures(tokens=tokens, pooled=pooled, feature_map=feature_map)

    def parameter_groups(self) -> list[list[nn.Parameter]]:
        """timm's coarse layer grouping (stem, stages…, final norm), in depth order."""
        named = dict(self.model.named_parameters())
        groups = group_parameters(self.model, self.model.group_matcher(coarse=True))
        return [[named[n] for n in groups[k]] for k in sorted(groups)]


class ResNet3DBackbone(ScaleBackbone):
    """A MONAI 3D ResNet with the reference code's anisotropic stem.

    Args:
        depth: 10, 18, 34, 50, 101 or 152.
        widths: channels of the four stages (default 64, 128, 256, 512); reduced widths give the
            CPU-trainable configurations.
        in_channels: patch channels (1 for CT).
        stem_kernel: stem convolution size (7 → 7×7×7).
        stem_stride: stem stride in (z, y, x); (1, 2, 2) keeps every slice.
        max_pool: keep the stride-2 max-pool after the stem.
    """

    spatial_dims = 3

    def __init__(
        self,
        depth: int = 18,
        *,
        widths: Sequence[int] = (64, 128, 256, 512),
        in_channels: int = 1,
        stem_kernel: int | Sequence[int] = 7,
        stem_stride: int | Sequence[int] = (1, 2, 2),
        max_pool: bool = True,
    ) -> None:
        super().__init__()
        if depth not in RESNET3D_DEPTHS:
            raise ValueError(f"resnet3d depth {depth} is not one of {sorted(RESNET3D_DEPTHS)}")
        widths = [int(w) for w in widths]
        if len(widths) != 4 or min(widths) < 1:
            raise ValueError(f"widths must be four positive stage widths, got {widths}")
        block, layers = RESNET3D_DEPTHS[depth]
        self.name = f"resnet3d{depth}"
        self.in_channels = in_channels
        self.net = ResNet(
            block,
            layers,
            widths,
            spatial_dims=3,
            n_input_channels=in_channels,
            conv1_t_size=tuple(stem_kernel) if isinstance(stem_kernel, Sequence) else stem_kernel,
            conv1_t_stride=tuple(stem_stride) if isinstance(stem_stride, Sequence) else stem_stride,
            no_max_pool=not max_pool,
            shortcut_type="B",
            feed_forward=False,
            bias_downsample=False,
        )
        self.num_features = widths[3] * (4 if block == "bottleneck" else 1)

    def forward(self, patch: Tensor) -> BackboneFeatures:
        """Run the 3D ResNet on a `(B, C, Z, Y, X)` patch up to its last stage."""
        x = _as_volume(patch, self.in_channels, self.name)
        net = self.net
        x = net.act(net.bn1(net.conv1(x)))
        if not net.no_max_pool:
            x = net.maxpool(x)
        feature_map = net.layer4(net.layer3(net.layer2(net.layer1(x))))
        pooled = feature_map.mean(dim=(2, 3, 4))
        tokens = feature_map.flatten(2).transpose(1, 2)
        return BackboneFeatures(tokens=tokens, pooled=pooled, feature_map=feature_map)

    def parameter_groups(self) -> list[list[nn.Parameter]]:
        """Stem (conv1 + bn1), then layer1…layer4."""
        net = self.net
        stem = [*net.conv1.parameters(), *net.bn1.parameters()]
        return [stem, *(list(getattr(net, f"layer{i}").parameters()) for i in range(1, 5))]


def create_backbone(name: str, **kwargs: Any) -> ScaleBackbone:
    """Build a scale backbone by name.

    Args:
        name: `resnet3d<depth>` (e.g. "resnet3d34") for a MONAI 3D ResNet, otherwise a timm model name.
        **kwargs: the chosen class's keyword arguments (`ResNet3DBackbone` or `Timm2DBackbone`).

    Returns:
        The backbone module.

    Raises:
        ValueError: unknown name or depth.
        TypeError: a keyword the chosen family does not take (e.g. `widths` for a timm model).
    """
    if name.lower().startswith("resnet3d"):
        suffix = name[len("resnet3d") :].lstrip("_-")
        if not suffix.isdigit():
            raise ValueError(f"backbone {name!r}: write resnet3d<depth>, depth in {sorted(RESNET3D_DEPTHS)}")
        bad = {"in_slices", "input_size", "pretrained"} & kwargs.keys()
        if bad:
            raise TypeError(
                f"backbone {name!r} is a 3D ResNet; {sorted(bad)} apply to timm 2D backbones only"
            )
        return ResNet3DBackbone(int(suffix), **kwargs)
    bad = {"widths", "stem_kernel", "stem_stride", "max_pool", "in_channels"} & kwargs.keys()
    if bad:
        raise TypeError(f"backbone {name!r} is a timm 2D model; {sorted(bad)} apply to resnet3d<depth> only")
    return Timm2DBackbone(name, **kwargs)
