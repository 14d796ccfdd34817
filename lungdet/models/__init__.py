"""CLAF networks (Wang et al. 2025): the stage-1 candidate 3D U-Net and the stage-2 MPPN.

Public API (everything a task, datamodule, inference script or bench needs)::

    from lungdet.models import build_candidate_net, build_mppn, coordinate_maps

    # Stage 1 — variants "unet" | "unet_cbam" | "ascrm" (Table 9); width 16 ≈ the paper's 1.77 M params.
    net = build_candidate_net("ascrm", width=16)
    coords = coordinate_maps(crop_starts, (128, 128, 128), scan_shapes)   # (B, 3, 128, 128, 128)
    out = net(x, coords)                 # x (B, 1, 128, 128, 128) in [0, 1] → (B, 32, 32, 32, 3, 5)

    # Targets, loss and candidates live next to the models:
    from lungdet.anchors import anchor_grid, assign_targets_batch
    from lungdet.losses import DetectionLoss
    from lungdet.postprocess import candidates_from_prediction, nms_candidates
    anchors = anchor_grid(net.output_shape(x.shape))                      # (32, 32, 32, 3, 4) z, y, x, d
    labels, deltas = assign_targets_batch(anchors, gt_boxes_per_crop)     # boxes (N, 4) in crop voxels
    loss = DetectionLoss()(out, labels, deltas).loss                       # DetectionLoss is an nn.Module
    cands = candidates_from_prediction(out[0], anchors, offset=crop_start) # (K, 5) score, z, y, x, d

    # Stage 2 — three concentric 1 mm crops 32×48×48 / 16×24×24 / 8×12×12 per candidate.
    mppn = build_mppn(width=32, num_classes=2)
    crops = crop_candidates(volume, cands[:, 1:4])                         # (K, 1, 32, 48, 48)
    p_nodule = mppn.nodule_probability(mppn(crops))                        # medium/small cut inside

    from common.complexity import count_flops, count_parameters           # shared by the three packages
    count_flops(net, *net.example_inputs((1, 1, 128, 128, 128)), meta=True).total  # FLOPs, meta device
    build_model("claf_ascrm", width=8)                                     # registry: list_models()

Coordinate channels: the paper concatenates voxel-wise coordinate maps in the downsampling path. For a
crop they must describe where the crop lies in the *whole scan*, so the caller passes them
(``coordinate_maps(crop_start, crop_shape, scan_shape)``, values in [−1, 1] over the scan); the network
refuses to guess when they are missing. ``CandidateNet.example_inputs`` builds whole-scan maps for
shape-only uses (FLOP counting, tracing).

Architecture details, parameter counts and the choices where the paper is silent: docs/lungdet.md.
"""

from lungdet.models.blocks import (
    ASCRMBlock3d,
    CBAM3d,
    ChannelAttention3d,
    ConvBNAct3d,
    ResidualBlock3d,
    SpatialAttention3d,
    coordinate_maps,
)
from lungdet.models.candidate_net import CANDIDATE_VARIANTS, CandidateNet, build_candidate_net
from lungdet.models.mppn import (
    MPPN,
    MPPN_CROP_SIZES,
    MPPNEnsemble,
    build_mppn,
    centre_crop,
    crop_candidates,
    resample_centre,
)
from lungdet.models.registry import build_model, list_models, register_model

__all__ = [
    "ASCRMBlock3d",
    "CANDIDATE_VARIANTS",
    "CBAM3d",
    "CandidateNet",
    "ChannelAttention3d",
    "ConvBNAct3d",
    "MPPN",
    "MPPN_CROP_SIZES",
    "MPPNEnsemble",
    "ResidualBlock3d",
    "SpatialAttention3d",
    "build_candidate_net",
    "build_model",
    "build_mppn",
    "centre_crop",
    "coordinate_maps",
    "crop_candidates",
    "list_models",
    "register_model",
    "resample_centre",
]
