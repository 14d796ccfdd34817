"""lungdet inference benchmark: CLAF stage 1 + stage 2 on a whole 1 mm scan on CPU, against the machine's
matmul peak and MONAI's LUNA16 RetinaNet, all measured in the same run.

* Volume: the chest phantom (``tests.common.chest_phantom``) at 1 mm, 300 × 350 × 350 voxels (z, y, x) — the
  size of a LUNA16 scan after resampling — windowed and lung-masked as the pipeline does.
* CLAF stage 1: ``lungdet.inference.detect_scan`` with the paper's configuration (ASCRM net at width 16,
  128³ blocks, overlap 0.25, stitched 32³ outputs, threshold, NMS); stage 2: the MPPN (width 32) on 100
  candidates (the LUNA16 evaluation's cap per scan) cut from the same scan. Random weights: the work is
  the same as with trained ones.
* Achieved GFLOP/s: FLOPs from ``common.complexity.count_flops`` (a multiply-add = 2 FLOPs) × the number of
  blocks / candidates, divided by the measured time; the peak is the best of a few 4096² float32
  ``torch.matmul`` runs, measured right before.
* MONAI RetinaNet: ``monai.apps.detection`` ``RetinaNetDetector`` built as in MONAI's LUNA16 detection
  tutorial (3D ResNet-50 backbone with ``conv1_t_stride`` (2, 2, 1), FPN on layers 1–2, anchor shapes
  (6, 8, 4), (8, 6, 5), (10, 10, 6), score threshold 0.02, NMS 0.22, 100 detections), random weights,
  on the same volume (MONAI axes: x, y, z). The tutorial's inference window (512 × 512 × 208) costs about
  65 TFLOP per window — tens of minutes per scan on a 2-core CPU — so by default we time the detector's
  sliding-window inference on one window of ``monai_roi`` (default the tutorial's training patch,
  192 × 192 × 80) cut from the volume, and report the whole-volume time as that × the number of windows
  MONAI's sliding window needs for the volume at overlap 0.25 (``monai_whole_volume_s_est``);
  ``monai_full=True`` (``--monai-full``) runs and times the whole volume instead.

Run: ``python -m bench.lungdet_bench`` (``--help`` for the options), or ``run()`` from ``bench/run.py``.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import numpy as np
import torch

from common.complexity import count_flops
from lungdet.inference import Stage1Inference, detect_scan, score_candidates
from lungdet.models import build_candidate_net, build_mppn
from lungdet.scan_reader import fill_value

SHAPE_ZYX = (300, 350, 350)
MONAI_ROI_XYZ = (192, 192, 80)
N_CANDIDATES = 100


def matmul_peak_gflops(n: int = 4096, repeats: int = 3) -> float:
    """Best float32 ``torch.matmul`` rate of the machine in GFLOP/s (2n³ FLOPs per product)."""
    a, b = torch.rand(n, n), torch.rand(n, n)
    torch.matmul(a, b)  # warm-up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best / 1e9


def phantom_volume(shape: tuple[int, int, int] = SHAPE_ZYX) -> torch.Tensor:
    """The chest phantom at 1 mm, windowed to [0, 1] with the tissue fill outside the (true) lungs."""
    from common.preprocess import CLAF_WINDOW
    from tests.common.chest_phantom import chest_phantom

    phantom = chest_phantom(shape, (1.0, 1.0, 1.0), seed=0)
    lo, hi = CLAF_WINDOW
    image = np.clip((phantom.hu.astype(np.float32) - lo) / (hi - lo), 0, 1)
    image[~phantom.lungs] = fill_value()
    return torch.from_numpy(image)


def _monai_retinanet():
    """RetinaNetDetector as in MONAI's LUNA16 detection tutorial (random weights)."""
    from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
    from monai.apps.detection.networks.retinanet_network import RetinaNet, resnet_fpn_feature_extractor
    from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
    from monai.networks.nets import resnet

    returned_layers, conv1_t_stride = [1, 2], [2, 2, 1]
    anchors = AnchorGeneratorWithAnchorShape(
        feature_map_scales=[2**level for level in range(len(returned_layers) + 1)],
        base_anchor_shapes=[[6, 8, 4], [8, 6, 5], [10, 10, 6]],
    )
    backbone = resnet.ResNet(
        block=resnet.ResNetBottleneck,
        layers=[3, 4, 6, 3],
        block_inplanes=resnet.get_inplanes(),
        n_input_channels=1,
        conv1_t_stride=conv1_t_stride,
        conv1_t_size=[max(7, 2 * s + 1) for s in conv1_t_stride],
    )
    features = resnet_fpn_feature_extractor(
        backbone=backbone, spatial_dims=3, pretrained_backbone=False, trainable_backbone_layers=None,
        returned_layers=returned_layers,
    )  # fmt: skip
    size_divisible = [s * 2 * 2 ** max(returned_layers) for s in features.body.conv1.stride]
    network = RetinaNet(
        spatial_dims=3, num_classes=1, num_anchors=anchors.num_anchors_per_location()[0],
        feature_extractor=features, size_divisible=size_divisible,
    )  # fmt: skip
    detector = RetinaNetDetector(network=network, anchor_generator=anchors, debug=False)
    detector.set_box_selector_parameters(
        score_thresh=0.02, topk_candidates_per_level=1000, nms_thresh=0.22, detections_per_img=100
    )
    return detector


def _monai_windows(shape_xyz: tuple[int, ...], roi: tuple[int, ...], overlap: float = 0.25) -> int:
    """Windows MONAI's sliding window places over a volume (its own ``dense_patch_slices``)."""
    from monai.data.utils import dense_patch_slices

    size = tuple(max(n, r) for n, r in zip(shape_xyz, roi))
    interval = tuple(r if n == r else max(int(r * (1 - overlap)), 1) for n, r in zip(size, roi))
    return len(dense_patch_slices(size, roi, interval))


def time_monai_retinanet(
    volume_zyx: torch.Tensor, roi_xyz: tuple[int, int, int] = MONAI_ROI_XYZ, full: bool = False
) -> dict[str, Any]:
    """Time the MONAI LUNA16 RetinaNet on the volume (see the module docstring for ``full``)."""
    detector = _monai_retinanet()
    detector.eval()
    x = volume_zyx.permute(2, 1, 0).contiguous()[None]  # (1, X, Y, Z): MONAI's LUNA16 axes
    roi = tuple(int(r) for r in roi_xyz)
    detector.set_sliding_window_inferer(
        roi_size=list(roi), overlap=0.25, sw_batch_size=1, mode="constant", device="cpu"
    )
    out: dict[str, Any] = {"monai_roi": "x".join(map(str, roi))}
    windows = _monai_windows(tuple(x.shape[1:]), roi)
    out["monai_windows"] = windows
    if full:
        start = time.perf_counter()
        with torch.no_grad():
            detector([x], use_inferer=True)
        out["monai_whole_volume_s"] = time.perf_counter() - start
        return out
    sub = x[:, : roi[0], : roi[1], : roi[2]].contiguous()
    with torch.no_grad():
        start = time.perf_counter()
        detector([sub], use_inferer=True)
        per_window = time.perf_counter() - start
    out["monai_window_s"] = per_window
    out["monai_whole_volume_s_est"] = per_window * windows
    return out


def run(
    shape: tuple[int, int, int] = SHAPE_ZYX,
    width: int = 16,
    mppn_width: int = 32,
    block_size: int = 128,
    candidates: int = N_CANDIDATES,
    monai: bool = True,
    monai_roi: tuple[int, int, int] = MONAI_ROI_XYZ,
    monai_full: bool = False,
) -> dict[str, Any]:
    """Time CLAF's two stages and MONAI's RetinaNet on one whole 1 mm scan on CPU.

    Returns:
        Flat name → value: seconds, GFLOP, achieved GFLOP/s, matmul peak, fractions of peak, MONAI times.
    """
    torch.manual_seed(0)
    results: dict[str, Any] = {"threads": torch.get_num_threads(), "volume_zyx": "x".join(map(str, shape))}
    peak = matmul_peak_gflops()
    results["matmul_peak_gflops"] = peak
    print(f"matmul peak {peak:.1f} GFLOP/s ({torch.get_num_threads()} threads)", flush=True)

    volume = phantom_volume(shape)
    net = build_candidate_net("ascrm", width=width).eval()
    mppn = build_mppn(width=mppn_width).eval()
    seen: list[int] = []
    with torch.no_grad():
        warm = volume[:block_size, :block_size, :block_size]
        detect_scan(net, warm, Stage1Inference(block_size=block_size, sw_batch_size=1))  # warm-up
        hook = net.register_forward_hook(lambda module, args, output: seen.append(int(args[0].shape[0])))
        start = time.perf_counter()
        settings = Stage1Inference(block_size=block_size, overlap=0.25, sw_batch_size=2)
        detect_scan(net, volume, settings, pad_value=fill_value())
        t1 = time.perf_counter() - start
        hook.remove()
    blocks = sum(seen)
    flops1 = blocks * count_flops(net, *net.example_inputs((1, 1, *(block_size,) * 3)), meta=True).total
    results.update(
        stage1_s=t1, stage1_blocks=blocks, stage1_gflop=flops1 / 1e9, stage1_gflops=flops1 / t1 / 1e9,
        stage1_fraction_of_peak=flops1 / t1 / 1e9 / peak,
    )  # fmt: skip
    print(f"stage 1: {blocks} blocks of {block_size}³, {flops1 / 1e9:.0f} GFLOP in {t1:.1f} s", flush=True)

    rng = np.random.default_rng(0)
    centres = torch.as_tensor(
        rng.uniform([20, 40, 40], np.asarray(shape) - [20, 40, 40], size=(candidates, 3))
    )
    with torch.no_grad():
        score_candidates(mppn, volume, centres[:4], chunk_size=4)  # warm-up
        start = time.perf_counter()
        score_candidates(mppn, volume, centres, chunk_size=32, pad_value=fill_value())
        t2 = time.perf_counter() - start
    flops2 = candidates * count_flops(mppn, *mppn.example_inputs((1, 1, 32, 48, 48)), meta=True).total
    results.update(
        stage2_s=t2, stage2_candidates=candidates, stage2_gflop=flops2 / 1e9, stage2_gflops=flops2 / t2 / 1e9,
        stage2_fraction_of_peak=flops2 / t2 / 1e9 / peak, claf_total_s=t1 + t2,
    )  # fmt: skip
    print(f"stage 2: {candidates} candidates, {flops2 / 1e9:.0f} GFLOP in {t2:.1f} s", flush=True)

    if monai:
        monai_out = time_monai_retinanet(volume, monai_roi, monai_full)
        results.update(monai_out)
        whole = monai_out.get("monai_whole_volume_s", monai_out.get("monai_whole_volume_s_est"))
        results["monai_over_claf"] = whole / (t1 + t2)
        print(f"MONAI RetinaNet: {monai_out}", flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=SHAPE_ZYX, help="volume z y x (1 mm voxels)")
    parser.add_argument("--width", type=int, default=16, help="stage-1 width (16 = the paper's size)")
    parser.add_argument("--mppn-width", type=int, default=32, help="MPPN width")
    parser.add_argument("--block", type=int, default=128, help="stage-1 inference block")
    parser.add_argument("--candidates", type=int, default=N_CANDIDATES, help="stage-2 candidates")
    parser.add_argument("--no-monai", action="store_true", help="skip MONAI RetinaNet")
    parser.add_argument("--monai-roi", type=int, nargs=3, default=MONAI_ROI_XYZ, help="MONAI window x y z")
    parser.add_argument("--monai-full", action="store_true", help="run MONAI over the whole volume")
    args = parser.parse_args(argv)
    results = run(
        tuple(args.shape), args.width, args.mppn_width, args.block, args.candidates, not args.no_monai,
        tuple(args.monai_roi), args.monai_full,
    )  # fmt: skip
    for key, value in results.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    main()
