"""Registration of a current scan to a prior scan of the same patient: rigid, then affine, on the lungs.

Why on the lungs: nodules live there, and the chest wall, arms and table move independently of them
between scans. The metric is evaluated only inside the prior's lung mask (dilated by `MASK_MARGIN_MM` so
the pleural boundary counts), both images are clipped to the lung window first so bone and contrast do
not dominate, and both are resampled to a `work_spacing_mm` isotropic grid — the accuracy needed (a few
mm, against nodule gates of ≥ 10 mm) does not need full resolution, and it keeps a LUNA16-size pair within
seconds.

Steps (SimpleITK): lung masks (`common.preprocess.lung_mask`, or given) → initial translation from the
masks' centroids (the centre of rotation is the prior lungs' centroid) → Euler3D (rigid) by regular-step
gradient descent on mean squares at 8, 4 and 2 mm (shrink 4, 2, 1 of the working grid) → affine started
from the rigid result at 4 and 2 mm. When the affine stage ends worse than the rigid one (lower lung Dice
or an implausible transform), the rigid result is kept and the fallback is reported. Mean squares suits CT-to-CT (same HU scale); nodules that changed are a small fraction of the lung.

Convention: SimpleITK registers *fixed* = prior and *moving* = current, so `transform` maps prior
physical points to current physical points (what resampling the current scan onto the prior grid needs);
`current_to_prior` applies its inverse to nodule centres.

Checks (`RegistrationResult.problems`; `converged` is False when any is fatal): lungs not found in a scan;
the optimiser stopped at its iteration limit at the finest level (warning); lung Dice after
registration below `MIN_LUNG_DICE` (fatal); rotation beyond `MAX_ROTATION_DEG`, translation beyond
`MAX_TRANSLATION_MM` beyond the lung centroids' alignment, scale outside `SCALE_RANGE`, or a reflection (fatal: implausible for two chest scans
of one patient).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from common.io import CTVolume
from common.preprocess import lung_mask

WORK_SPACING_MM = 2.0
#: Fraction of the (masked) working-grid voxels the metric samples, on a regular grid (deterministic).
SAMPLING_FRACTION = 0.5
#: Second-try floor of `lung_mask` (ml) for a field of view with little lung.
SMALL_LUNG_ML = 5.0
CROP_TO_LUNGS = False
MASK_MARGIN_MM = 8.0
WINDOW_HU = (-1000.0, 200.0)
RIGID_ITERATIONS = 200
AFFINE_ITERATIONS = 200
MIN_LUNG_DICE = 0.85
MAX_ROTATION_DEG = 20.0
#: Largest movement of the lungs' centre beyond the centroid initialisation (scanners' table origins differ
#: arbitrarily, so the translation itself is not checked, only what registration adds to the centroids').
MAX_TRANSLATION_MM = 30.0
SCALE_RANGE = (0.8, 1.25)


@dataclass
class RegistrationResult:
    """A current → prior registration and its checks.

    Attributes:
        transform: affine (composite-free) transform, prior physical points → current physical points.
        rigid: the rigid stage's result (same convention).
        metric_value: final mean-squares metric (HU², lung window) of the affine stage.
        iterations: optimiser iterations of the last level, per stage.
        stop_conditions: the optimiser's stop description, per stage.
        lung_dice_before / lung_dice_after: Dice of the prior's lung mask and the current's, resampled
            onto the prior grid, with the initial (centroid) and the final transform.
        problems: what the checks found (empty when all is well).
        converged: False when a fatal check failed; the caller must flag, never silently match.
        seconds: wall time including the lung masks.
    """

    transform: sitk.AffineTransform
    rigid: sitk.Euler3DTransform
    metric_value: float
    iterations: dict[str, int]
    stop_conditions: dict[str, str]
    lung_dice_before: float
    lung_dice_after: float
    initial_translation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    problems: list[str] = field(default_factory=list)
    converged: bool = True
    seconds: float = 0.0

    def current_to_prior(self, points_xyz: np.ndarray) -> np.ndarray:
        """Current-scan world points (N, 3) → prior-scan world points."""
        inverse = self.transform.GetInverse()
        pts = np.asarray(points_xyz, dtype=np.float64).reshape(-1, 3)
        return np.array([inverse.TransformPoint(tuple(float(v) for v in p)) for p in pts]).reshape(-1, 3)

    def prior_to_current(self, points_xyz: np.ndarray) -> np.ndarray:
        """Prior-scan world points (N, 3) → current-scan world points."""
        pts = np.asarray(points_xyz, dtype=np.float64).reshape(-1, 3)
        return np.array([self.transform.TransformPoint(tuple(float(v) for v in p)) for p in pts]).reshape(
            -1, 3
        )

    def parameters(self) -> dict[str, float | list[float]]:
        """Rotation (deg), translation (mm) and scales of the affine, for reports and checks."""
        matrix = np.asarray(self.transform.GetMatrix()).reshape(3, 3)
        u, s, vt = np.linalg.svd(matrix)
        rotation = u @ vt
        angle = math.degrees(math.acos(float(np.clip((np.trace(rotation) - 1.0) / 2.0, -1.0, 1.0))))
        centre = np.asarray(self.transform.GetCenter())
        # Displacement of the centre of rotation (the prior lungs' centroid): the translation that matters.
        moved = np.asarray(self.transform.TransformPoint(tuple(centre)))
        beyond = moved - centre - np.asarray(self.initial_translation_mm)
        return {
            "rotation_deg": round(angle, 4),
            "translation_mm": [round(float(v), 4) for v in moved - centre],
            "translation_norm_mm": round(float(np.linalg.norm(moved - centre)), 4),
            "translation_beyond_centroids_mm": round(float(np.linalg.norm(beyond)), 4),
            "scales": [round(float(v), 5) for v in s],
            "determinant": round(float(np.linalg.det(matrix)), 6),
        }

    def save(self, path: str | Path) -> Path:
        """Write the affine transform as an ITK .tfm file (readable with `sitk.ReadTransform`)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteTransform(self.transform, str(path))
        return path

    def to_dict(self) -> dict:
        return {
            "method": "SimpleITK: lung-mask centroid initialisation, Euler3D then affine, mean squares on "
            f"the lung window {list(WINDOW_HU)} HU inside the prior lungs (+{MASK_MARGIN_MM} mm), "
            f"{WORK_SPACING_MM} mm isotropic working grid, multi-resolution",
            "direction": "transform maps prior physical points to current physical points",
            "converged": self.converged,
            "problems": list(self.problems),
            "metric_value": round(float(self.metric_value), 4),
            "iterations": dict(self.iterations),
            "stop_conditions": dict(self.stop_conditions),
            "lung_dice_before": round(self.lung_dice_before, 4),
            "lung_dice_after": round(self.lung_dice_after, 4),
            "parameters": self.parameters(),
            "seconds": round(self.seconds, 3),
        }


def _work_image(image: sitk.Image, spacing: float, interpolator: int, default: float) -> sitk.Image:
    """Resample onto an isotropic grid covering the same physical box (same origin and direction).

    Images are first block-averaged (`BinShrink`, integer factors up to the new spacing): that is the
    anti-aliasing, and it costs far less than a Gaussian on a full-resolution 512 × 512 × 300 scan.
    """
    old_spacing = np.asarray(image.GetSpacing())
    size = np.asarray(image.GetSize())
    new_size = [max(1, int(math.ceil(n * s / spacing))) for n, s in zip(size, old_spacing)]
    origin, direction = image.GetOrigin(), image.GetDirection()
    if interpolator != sitk.sitkNearestNeighbor:
        factors = [max(1, int(spacing / s)) for s in old_spacing]
        if max(factors) > 1:
            image = sitk.BinShrink(image, factors)
    return sitk.Resample(
        image,
        new_size,
        sitk.Transform(),
        interpolator,
        origin,
        (spacing, spacing, spacing),
        direction,
        default,
        image.GetPixelID(),
    )


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * float(np.logical_and(a, b).sum()) / total if total else 0.0


def _bounding_box(mask: sitk.Image, margin: int) -> tuple[list[int], list[int]] | None:
    """(size, index) of the mask's bounding box grown by `margin` voxels, clipped to the image."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    if 1 not in stats.GetLabels():
        return None
    x, y, z, sx, sy, sz = stats.GetBoundingBox(1)
    lo = np.maximum(np.array([x, y, z]) - margin, 0)
    hi = np.minimum(np.array([x + sx, y + sy, z + sz]) + margin, np.asarray(mask.GetSize()))
    return [int(v) for v in hi - lo], [int(v) for v in lo]


def _centroid(mask: sitk.Image) -> np.ndarray | None:
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    if 1 not in stats.GetLabels():
        return None
    return np.asarray(stats.GetCentroid(1))


def _warped_dice(fixed_mask: sitk.Image, moving_mask: sitk.Image, transform: sitk.Transform) -> float:
    warped = sitk.Resample(moving_mask, fixed_mask, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return _dice(sitk.GetArrayViewFromImage(fixed_mask) > 0, sitk.GetArrayViewFromImage(warped) > 0)


def _method(
    iterations: int, shrink: list[int], sigmas: list[float], mask: sitk.Image, learning_rate: float = 2.0
) -> sitk.ImageRegistrationMethod:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMeanSquares()
    method.SetMetricFixedMask(mask)
    method.SetMetricSamplingStrategy(method.REGULAR)
    method.SetMetricSamplingPercentage(SAMPLING_FRACTION, seed=1)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=learning_rate, minStep=1e-3, numberOfIterations=iterations, relaxationFactor=0.6,
        gradientMagnitudeTolerance=1e-6,
    )  # fmt: skip
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(shrink)
    method.SetSmoothingSigmasPerLevel(sigmas)
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return method


def register(
    prior: CTVolume,
    current: CTVolume,
    *,
    prior_lungs: np.ndarray | None = None,
    current_lungs: np.ndarray | None = None,
    work_spacing_mm: float = WORK_SPACING_MM,
) -> RegistrationResult:
    """Register `current` to `prior` (see the module docstring); never raises on a poor result — it
    returns `converged=False` with the reasons, which the caller must report."""
    start = time.perf_counter()
    problems: list[str] = []
    fatal = False
    masks = []
    for name, volume, given in (("prior", prior, prior_lungs), ("current", current, current_lungs)):
        mask = given if given is not None else lung_mask(volume)
        if given is None and not np.any(mask):
            # lung_mask refuses air regions under 20 ml (bowel gas, a sliver of lung): a scan whose field of
            # view holds only part of small lungs gets a second try with a lower floor before being flagged.
            mask = lung_mask(volume, min_lung_ml=SMALL_LUNG_ML)
            if np.any(mask):
                problems.append(f"the {name} lungs are small (< 20 ml in the field of view); masked anyway")
        mask = np.asarray(mask, dtype=np.uint8)
        if mask.shape != volume.shape:
            raise ValueError(f"the {name} lung mask has shape {mask.shape}, the scan {volume.shape}")
        if not mask.any():
            problems.append(f"no lungs found in the {name} scan; registered on the whole image")
            fatal = True
            mask = np.ones(volume.shape, dtype=np.uint8)
        masks.append(volume.with_array(mask).to_sitk())

    images = []
    for volume in (prior, current):
        image = sitk.Cast(volume.to_sitk(), sitk.sitkFloat32)
        image = sitk.Clamp(image, sitk.sitkFloat32, *WINDOW_HU)
        images.append(_work_image(image, work_spacing_mm, sitk.sitkLinear, WINDOW_HU[0]))
    work_masks = [_work_image(m, work_spacing_mm, sitk.sitkNearestNeighbor, 0) for m in masks]
    fixed, moving = images
    fixed_mask, moving_mask = work_masks
    radius = max(1, int(round(MASK_MARGIN_MM / work_spacing_mm)))
    # The metric only samples the prior's lungs: crop the prior to them (+ margin) so the pyramid does
    # not smooth and shrink the whole field of view at every level.
    box = _bounding_box(fixed_mask, 2 * radius) if CROP_TO_LUNGS else None
    if box is not None:
        fixed = sitk.RegionOfInterest(fixed, *box)
        fixed_mask = sitk.RegionOfInterest(fixed_mask, *box)
    metric_mask = sitk.BinaryDilate(fixed_mask, [radius] * 3)

    centre_fixed = _centroid(fixed_mask)
    centre_moving = _centroid(moving_mask)
    rigid = sitk.Euler3DTransform()
    if centre_fixed is not None and centre_moving is not None:
        rigid.SetCenter(tuple(float(v) for v in centre_fixed))
        rigid.SetTranslation(tuple(float(v) for v in centre_moving - centre_fixed))
    dice_before = _warped_dice(work_masks[0], moving_mask, rigid)
    initial_translation = tuple(float(v) for v in rigid.GetTranslation())

    iterations, stops = {}, {}
    method = _method(RIGID_ITERATIONS, [4, 2, 1], [4.0, 2.0, 0.0], metric_mask)
    method.SetInitialTransform(rigid, inPlace=True)
    method.Execute(fixed, moving)
    iterations["rigid"] = int(method.GetOptimizerIteration())
    stops["rigid"] = method.GetOptimizerStopConditionDescription()

    affine = sitk.AffineTransform(3)
    affine.SetCenter(rigid.GetCenter())
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    method = _method(AFFINE_ITERATIONS, [2, 1], [2.0, 0.0], metric_mask, learning_rate=1.0)
    method.SetInitialTransform(affine, inPlace=True)
    method.Execute(fixed, moving)
    iterations["affine"] = int(method.GetOptimizerIteration())
    stops["affine"] = method.GetOptimizerStopConditionDescription()
    metric_value = float(method.GetMetricValue())

    def checked(transform: sitk.AffineTransform, stages: tuple[str, ...]) -> RegistrationResult:
        result = RegistrationResult(
            transform=transform,
            rigid=rigid,
            metric_value=metric_value,
            iterations=iterations,
            stop_conditions=stops,
            lung_dice_before=dice_before,
            lung_dice_after=_warped_dice(work_masks[0], moving_mask, transform),
            initial_translation_mm=initial_translation,
        )
        result.problems = list(problems)
        for stage in stages:
            limit = RIGID_ITERATIONS if stage == "rigid" else AFFINE_ITERATIONS
            if iterations[stage] >= limit:
                result.problems.append(
                    f"{stage} stage stopped at its iteration limit ({limit}) at the finest level"
                )
        result.converged = not (fatal or _implausible(result))
        return result

    final = checked(affine, ("rigid", "affine"))
    if not final.converged or final.lung_dice_after < final.lung_dice_before:
        # The affine stage made things worse (it has 12 degrees of freedom and can run off where the lungs
        # changed shape): fall back to the rigid result, and say so.
        as_affine = sitk.AffineTransform(3)
        as_affine.SetCenter(rigid.GetCenter())
        as_affine.SetMatrix(rigid.GetMatrix())
        as_affine.SetTranslation(rigid.GetTranslation())
        fallback = checked(as_affine, ("rigid",))
        if fallback.converged and fallback.lung_dice_after > final.lung_dice_after:
            fallback.problems.append(
                f"affine stage rejected (lung Dice {final.lung_dice_after:.3f}; "
                f"{'; '.join(p for p in final.problems if p not in problems) or 'worse than rigid'}); "
                "the rigid result is used"
            )
            final = fallback
    final.seconds = time.perf_counter() - start
    return final


def _implausible(result: RegistrationResult) -> bool:
    """Append to `result.problems` what makes it implausible; True when anything does."""
    params = result.parameters()
    found = []
    if not math.isfinite(result.metric_value):
        found.append("the metric is not finite (no overlap between the scans)")
    if result.lung_dice_after < MIN_LUNG_DICE:
        found.append(f"lung Dice after registration {result.lung_dice_after:.3f} < {MIN_LUNG_DICE}")
    if params["rotation_deg"] > MAX_ROTATION_DEG:
        found.append(f"implausible rotation {params['rotation_deg']:.1f}° > {MAX_ROTATION_DEG}°")
    if params["translation_beyond_centroids_mm"] > MAX_TRANSLATION_MM:
        found.append(
            f"implausible translation: {params['translation_beyond_centroids_mm']:.1f} mm beyond the lung "
            f"centroids' alignment > {MAX_TRANSLATION_MM} mm"
        )
    if min(params["scales"]) < SCALE_RANGE[0] or max(params["scales"]) > SCALE_RANGE[1]:
        found.append(f"implausible scale {params['scales']} outside {list(SCALE_RANGE)}")
    if params["determinant"] <= 0:
        found.append("the transform is a reflection")
    result.problems += found
    return bool(found)


def resample_to_prior(
    current: CTVolume, prior: CTVolume, result: RegistrationResult, default: float = -1000.0
) -> np.ndarray:
    """The current scan on the prior's grid through the registration (for side-by-side crops)."""
    image = sitk.Resample(
        current.to_sitk(), prior.to_sitk(), result.transform, sitk.sitkLinear, default, sitk.sitkInt16
    )
    return sitk.GetArrayFromImage(image)


def resample_labels_to_prior(
    labels: np.ndarray, current: CTVolume, prior: CTVolume, result: RegistrationResult
) -> np.ndarray:
    """A label array of the current scan on the prior's grid (nearest neighbour)."""
    image = current.with_array(np.asarray(labels, dtype=np.uint16)).to_sitk()
    warped = sitk.Resample(
        image, prior.to_sitk(), result.transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16
    )
    return sitk.GetArrayFromImage(warped)
