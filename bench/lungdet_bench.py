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


def matmul_peak_gflops(n: int = 4096, repeats: int = 3, dtype: torch.dtype = torch.float32) -> float:
    """Best ``torch.matmul`` rate of the machine in GFLOP/s (2n³ FLOPs per product), float32 by default."""
    a, b = torch.rand(n, n).to(dtype), torch.rand(n, n).to(dtype)
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


#: Engines timed on the whole scan (``common.engine``); "eager" (fp32 PyTorch) is the before.
ENGINES_TIMED = ("eager", "channels_last", "frozen", "onnxruntime", "bf16")
#: Old stage-1 block settings (the paper's: 128³ blocks, overlap 0.25) and alternatives with less halo.
OLD_BLOCKS = (128, 0.25)
BLOCK_CHOICES = ((128, 0.125), (160, 0.2))


def matmul_peak_bf16_gflops(n: int = 4096, repeats: int = 3) -> float | None:
    """Best bfloat16 ``torch.matmul`` rate where the CPU has native bf16 (``common.engine.native_bf16``)."""
    from common.engine import native_bf16

    if not native_bf16():
        return None
    return matmul_peak_gflops(n, repeats, torch.bfloat16)


def stage1_blocks(shape: tuple[int, ...], block: int, overlap: float, stride: int = 4) -> int:
    """Blocks the sliding window runs over a scan (the padding of ``stitched_prediction``, MONAI's grid)."""
    padded = tuple(max(block, -(-n // stride) * stride) for n in shape)
    return _monai_windows(padded, (block,) * 3, overlap)


def time_stage1(
    net: torch.nn.Module, volume: torch.Tensor, settings: Stage1Inference
) -> tuple[float, torch.Tensor]:
    """Seconds of one whole-scan ``detect_scan`` (after a warm-up block that compiles the engine)."""
    b = settings.block[0]
    detect_scan(net, volume[:b, :b, :b].contiguous(), settings.updated({"sw_batch_size": 1}))
    if settings.sw_batch_size != 1:  # frozen engines compile per input shape: warm the batch shape too
        warm = volume[:b, :b, :b].repeat(1, 1, settings.sw_batch_size)
        detect_scan(net, warm, settings.updated({"overlap": 0.0}))
    start = time.perf_counter()
    cands = detect_scan(net, volume, settings, pad_value=fill_value())
    return time.perf_counter() - start, cands


def same_candidates(ref: torch.Tensor, got: torch.Tensor) -> tuple[bool, float]:
    """(same boxes to 1e-3 voxel, max |score difference| between a box's two scores) of two candidate lists.

    Order-free: the lists are compared sorted by position, because candidates whose scores differ by less
    than the engines' rounding (random weights give many near-ties) may trade places in the score order.
    """
    if ref.shape != got.shape:
        return False, math.inf
    if ref.numel() == 0:
        return True, 0.0

    def by_position(c: torch.Tensor) -> torch.Tensor:
        keys = c[:, 1:].double().cpu().numpy().round(2)
        return c[np.lexsort(keys.T[::-1])]

    ref, got = by_position(ref), by_position(got)
    same = bool(torch.allclose(ref[:, 1:], got[:, 1:], atol=1e-3))
    return same, float((ref[:, 0] - got[:, 0]).abs().max())


def run(
    shape: tuple[int, int, int] = SHAPE_ZYX,
    width: int = 16,
    mppn_width: int = 32,
    block_size: int = OLD_BLOCKS[0],
    candidates: int = N_CANDIDATES,
    monai: bool = True,
    monai_roi: tuple[int, int, int] = MONAI_ROI_XYZ,
    monai_full: bool = False,
    engines: tuple[str, ...] = ENGINES_TIMED,
    block_choices: tuple[tuple[int, float], ...] = BLOCK_CHOICES,
) -> dict[str, Any]:
    """Time CLAF's two stages (each engine; old and alternative blocks) and MONAI's RetinaNet on one scan.

    Returns:
        Flat name → value: seconds, GFLOP, achieved GFLOP/s, matmul peak, fractions of peak, which path ran,
        speed-ups over fp32 eager with the old blocks, and whether the candidates equal eager's.
    """
    from common.engine import describe

    torch.manual_seed(0)
    results: dict[str, Any] = {"threads": torch.get_num_threads(), "volume_zyx": "x".join(map(str, shape))}
    peak = matmul_peak_gflops()
    results["matmul_peak_gflops"] = peak
    peak_bf16 = matmul_peak_bf16_gflops()
    results["matmul_peak_bf16_gflops"] = peak_bf16 if peak_bf16 is not None else "no native bf16"
    print(f"matmul peak {peak:.1f} GFLOP/s fp32, bf16 {results['matmul_peak_bf16_gflops']}", flush=True)

    volume = phantom_volume(shape)
    net = build_candidate_net("ascrm", width=width).eval()
    mppn = build_mppn(width=mppn_width).eval()
    # random weights score below any useful threshold: keep the 100 best anchors so the lists compare
    old = Stage1Inference(block_size=block_size, overlap=OLD_BLOCKS[1], sw_batch_size=2, score_threshold=0.0)

    def flops_per_block(block: int) -> float:
        return count_flops(net, *net.example_inputs((1, 1, block, block, block)), meta=True).total

    def record(name: str, settings: Stage1Inference, ref: torch.Tensor | None) -> tuple[float, torch.Tensor]:
        t, cands = time_stage1(net, volume, settings)
        b = settings.block[0]
        blocks = stage1_blocks(shape, b, settings.overlap)
        flops = blocks * flops_per_block(b)
        results[f"stage1_{name}_path"] = describe(settings.engine, "cpu")
        results[f"stage1_{name}_s"] = t
        results[f"stage1_{name}_blocks"] = blocks
        results[f"stage1_{name}_gflops"] = flops / t / 1e9
        results[f"stage1_{name}_fraction_of_peak"] = flops / t / 1e9 / peak
        if ref is not None:
            same, diff = same_candidates(ref, cands)
            results[f"stage1_{name}_same_boxes_as_eager"] = same
            results[f"stage1_{name}_max_score_diff"] = diff
        print(f"stage 1 {name}: {blocks} blocks of {b}³, {flops / 1e9:.0f} GFLOP in {t:.1f} s "
              f"({results[f'stage1_{name}_path']})", flush=True)  # fmt: skip
        return t, cands

    t_eager, ref = record("eager", old, None)
    results.update(stage1_s=t_eager, stage1_blocks=results["stage1_eager_blocks"])
    results["stage1_gflop"] = (
        stage1_blocks(shape, block_size, OLD_BLOCKS[1]) * flops_per_block(block_size) / 1e9
    )
    results["stage1_gflops"] = results["stage1_eager_gflops"]
    results["stage1_fraction_of_peak"] = results["stage1_eager_fraction_of_peak"]
    times = {"eager": t_eager}
    for engine in engines:
        if engine == "eager":
            continue
        t, _ = record(engine, old.updated({"engine": engine}), ref)
        times[engine] = t
        results[f"stage1_{engine}_speedup"] = t_eager / t
    exact = [e for e in times if e == "eager" or results.get(f"stage1_{e}_max_score_diff", 1.0) <= 1e-4]
    fastest = min(exact, key=times.__getitem__)
    results["stage1_fastest_exact_engine"] = fastest
    results["stage1_fastest_exact_speedup"] = t_eager / times[fastest]
    for b, overlap in block_choices:  # less halo, fastest exact engine; the scores move (CBAM pools a block)
        name = f"{fastest}_block{b}_overlap{overlap:g}"
        t, _ = record(name, old.updated({"engine": fastest, "block_size": b, "overlap": overlap}), ref)
        results[f"stage1_{name}_speedup"] = t_eager / t

    rng = np.random.default_rng(0)
    margin = np.minimum([20, 40, 40], np.asarray(shape) // 4)  # small volumes (smoke runs) too
    centres = torch.as_tensor(rng.uniform(margin, np.asarray(shape) - margin, size=(candidates, 3)))
    flops2 = candidates * count_flops(mppn, *mppn.example_inputs((1, 1, 32, 48, 48)), meta=True).total
    results.update(stage2_candidates=candidates, stage2_gflop=flops2 / 1e9)
    ref2 = None
    for engine in ("eager", fastest):
        for chunk in (32, 100) if engine == "eager" else (32,):
            score_candidates(mppn, volume, centres[:4], chunk_size=4, engine=engine)  # warm-up / compile
            start = time.perf_counter()
            probs = score_candidates(
                mppn, volume, centres, chunk_size=chunk, pad_value=fill_value(), engine=engine
            )
            t2 = time.perf_counter() - start
            key = f"stage2_{engine}_chunk{chunk}"
            results[f"{key}_s"] = t2
            results[f"{key}_fraction_of_peak"] = flops2 / t2 / 1e9 / peak
            if ref2 is None:
                ref2 = probs
                results.update(
                    stage2_s=t2,
                    stage2_gflops=flops2 / t2 / 1e9,
                    stage2_fraction_of_peak=flops2 / t2 / 1e9 / peak,
                )
            else:
                results[f"{key}_max_prob_diff"] = float((probs - ref2).abs().max())
            print(
                f"stage 2 {key}: {candidates} candidates, {flops2 / 1e9:.0f} GFLOP in {t2:.1f} s", flush=True
            )
    best2 = min(results[f"stage2_{e}_chunk32_s"] for e in ("eager", fastest))
    results["claf_total_before_s"] = t_eager + results["stage2_eager_chunk32_s"]
    results["claf_total_after_s"] = times[fastest] + best2
    results["claf_total_s"] = results["claf_total_before_s"]

    if monai:
        monai_out = time_monai_retinanet(volume, monai_roi, monai_full)
        results.update(monai_out)
        whole = monai_out.get("monai_whole_volume_s", monai_out.get("monai_whole_volume_s_est"))
        results["monai_over_claf"] = whole / results["claf_total_before_s"]
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
    parser.add_argument("--engines", nargs="+", default=list(ENGINES_TIMED), help="stage-1 engines to time")
    parser.add_argument("--no-block-choices", action="store_true", help="skip the alternative block sizes")
    args = parser.parse_args(argv)
    results = run(
        tuple(args.shape), args.width, args.mppn_width, args.block, args.candidates, not args.no_monai,
        tuple(args.monai_roi), args.monai_full, tuple(args.engines),
        () if args.no_block_choices else BLOCK_CHOICES,
    )  # fmt: skip
    for key, value in results.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    main()
