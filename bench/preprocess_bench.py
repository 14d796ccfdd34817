"""Preprocessing benchmark: our 1 mm B-spline resampling + lung mask against SimpleITK's B-spline `Resample`.

The scan is the synthetic chest phantom at the size of a typical LUNA16 scan: 512×512×300 int16 at
(0.7, 0.7, 1.25) mm, resampled to 1 mm (358×358×375). SimpleITK resamples it with `sitkBSpline` onto the
same output grid (same origin and direction); we run exactly what `lungdata prepare` runs per scan,
`resample_isotropic` (int16 out) followed by `lung_mask`. The values must agree: the 99th percentile of
|ours − SimpleITK| over the interior (2 voxels off every face) must be ≤ 1 HU, which includes our rounding
to int16.

Run: `python -m bench.preprocess_bench` (or `make bench`, which calls `run()`).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import SimpleITK as sitk
from threadpoolctl import threadpool_info

from common.io import CTVolume
from common.preprocess import clip_hu, lung_mask, resample_isotropic

SHAPE_ZYX = (300, 512, 512)
SPACING_XYZ = (0.7, 0.7, 1.25)
TARGET_MM = 1.0


def _phantom(shape: tuple[int, int, int], spacing: tuple[float, float, float]):
    # tests/ holds the phantom so that the unit tests and this benchmark share one definition.
    from tests.common.chest_phantom import chest_phantom

    return chest_phantom(shape, spacing, seed=0)


def run(shape: tuple[int, int, int] = SHAPE_ZYX, repeats: int = 3) -> dict[str, float | int | str]:
    """Time SimpleITK's B-spline Resample and our resampling + lung mask on one scan; check value agreement.

    Args:
        shape: input (z, y, x) voxels at (0.7, 0.7, 1.25) mm.
        repeats: our pipeline runs this many times (median reported; SimpleITK runs once, it takes long).

    Returns:
        Flat name → value: timings in seconds, the speed-up, value agreement in HU and the lung-mask Dice.
    """
    t = time.perf_counter()
    phantom = _phantom(shape, SPACING_XYZ)
    origin = tuple(-0.5 * n * s for n, s in zip(shape[::-1], SPACING_XYZ))
    volume = CTVolume(clip_hu(phantom.hu), SPACING_XYZ, origin, np.eye(3), series_uid="bench")
    print(f"phantom {shape} built in {time.perf_counter() - t:.1f} s")

    ours_resample, ours_mask, ours_total = [], [], []
    resampled = mask = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        resampled = resample_isotropic(volume, TARGET_MM)
        t1 = time.perf_counter()
        mask = lung_mask(resampled)
        t2 = time.perf_counter()
        ours_resample.append(t1 - t0)
        ours_mask.append(t2 - t1)
        ours_total.append(t2 - t0)
    print(
        f"ours: resample {statistics.median(ours_resample):.2f} s + lung mask {statistics.median(ours_mask):.2f} s"
        f" = {statistics.median(ours_total):.2f} s (median of {repeats}; first run {ours_total[0]:.2f} s)"
    )

    img = volume.to_sitk()
    size = resampled.size_xyz
    t0 = time.perf_counter()
    reference = sitk.Resample(
        img, size, sitk.Transform(), sitk.sitkBSpline, img.GetOrigin(), (TARGET_MM,) * 3, img.GetDirection(),
        -1024.0, sitk.sitkFloat32,
    )  # fmt: skip
    sitk_s = time.perf_counter() - t0
    print(f"SimpleITK B-spline Resample alone: {sitk_s:.2f} s")

    ref = sitk.GetArrayFromImage(reference)
    interior = (slice(2, -2),) * 3
    diff = np.abs(resampled.array[interior].astype(np.float32) - ref[interior])
    p99 = float(np.percentile(diff, 99))
    # Dice against the phantom's lungs brought to the 1 mm grid with SimpleITK nearest neighbour.
    truth_img = sitk.GetImageFromArray(phantom.lungs.astype(np.uint8))
    truth_img.CopyInformation(img)
    truth = sitk.GetArrayFromImage(
        sitk.Resample(
            truth_img, size, sitk.Transform(), sitk.sitkNearestNeighbor, img.GetOrigin(), (TARGET_MM,) * 3
        )
    ).astype(bool)
    predicted = mask.astype(bool)
    dice = 2.0 * np.count_nonzero(predicted & truth) / (np.count_nonzero(predicted) + np.count_nonzero(truth))
    speedup = sitk_s / statistics.median(ours_total)
    print(
        f"speed-up {speedup:.1f}x; interior |ours - SimpleITK|: p99 {p99:.3f} HU, max {float(diff.max()):.3f} HU; "
        f"lung Dice {dice:.4f}"
    )
    return {
        "input_shape_zyx": "x".join(map(str, shape)),
        "output_shape_zyx": "x".join(map(str, resampled.shape)),
        "threads_sitk": sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(),
        "threads_blas": max(
            (pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"), default=0
        ),
        "sitk_bspline_resample_s": sitk_s,
        "ours_resample_s": statistics.median(ours_resample),
        "ours_lung_mask_s": statistics.median(ours_mask),
        "ours_total_s": statistics.median(ours_total),
        "ours_total_first_run_s": ours_total[0],
        "speedup_vs_sitk_resample": speedup,
        "interior_p99_abs_diff_hu": p99,
        "interior_max_abs_diff_hu": float(diff.max()),
        "lung_mask_dice": dice,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results = run(repeats=args.repeats)
    for key, value in results.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
