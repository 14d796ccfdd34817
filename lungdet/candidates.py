"""Stage-2 candidates: the LUNA16 hit rule per candidate and the labelled candidate table.

Candidates come from stage-1 results CSVs (LUNA16 results format) and/or the dataset's own candidate list
(LUNA16 ``candidates_V2.csv``); label 1 when the candidate lies within the radius of an annotated nodule
(the LUNA16 hit rule); candidates on excluded findings are marked ``ignore`` (dropped from training and from
AUC/accuracy; the FROC ignores them too).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from common.cache import entry_geometry
from common.metrics.froc_io import read_results
from lungdet.scan_reader import ScanReader, finding_array, sized_diameters

log = logging.getLogger(__name__)

__all__ = ["CANDIDATE_COLUMNS", "candidate_table", "label_candidates"]


CANDIDATE_COLUMNS = ["seriesuid", "coordX", "coordY", "coordZ", "vz", "vy", "vx", "stage1", "label", "ignore"]


def label_candidates(
    world_xyz: np.ndarray, nodules: np.ndarray, excluded: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """LUNA16 hit rule per candidate: label 1 inside a nodule's sphere; ``ignore`` on excluded findings only.

    Args:
        world_xyz: (K, 3) candidate positions, world mm.
        nodules: (n, 4) world x, y, z + diameter of the annotated nodules.
        excluded: (m, 4) excluded findings (diameter ≤ 0 → 10 mm).

    Returns:
        ``labels`` (K,) int64 and ``ignore`` (K,) bool.
    """

    def hits(findings: np.ndarray) -> np.ndarray:
        if findings.size == 0 or world_xyz.size == 0:
            return np.zeros(world_xyz.shape[0], dtype=bool)
        dist = np.linalg.norm(world_xyz[:, None, :] - findings[None, :, :3], axis=-1)
        return (dist < sized_diameters(findings[:, 3])[None, :] / 2.0).any(axis=1)

    positive = hits(nodules)
    return positive.astype(np.int64), hits(excluded) & ~positive


def candidate_table(
    reader: ScanReader,
    uids: Sequence[str],
    csv_paths: Sequence[str | Path] = (),
    dataset_candidates: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Candidates of the given scans from stage-1 results CSVs and/or a dataset candidate list, labelled.

    Args:
        reader: prepared-scan reader (geometry and annotations of the cached scans).
        uids: scans to keep (rows of other scans are dropped).
        csv_paths: LUNA16 results CSVs (seriesuid, coordX, coordY, coordZ, probability); the probability
            becomes the ``stage1`` score.
        dataset_candidates: a frame with seriesuid, coordX, coordY, coordZ (e.g. ``LUNA16Dataset.candidates()``);
            its ``stage1`` score is NaN.

    Returns:
        Columns seriesuid, coordX, coordY, coordZ (world mm), vz, vy, vx (voxels of the cached grid), stage1,
        label, ignore. Candidates outside their scan's volume are dropped (counted in the log).
    """
    wanted = set(uids)
    frames = []
    for path in csv_paths:
        frame = read_results(path)
        frames.append(frame.rename(columns={"probability": "stage1"}))
    if dataset_candidates is not None:
        frames.append(dataset_candidates.assign(stage1=np.nan))
    if not frames:
        return pd.DataFrame(columns=CANDIDATE_COLUMNS)
    table = pd.concat(
        [f[["seriesuid", "coordX", "coordY", "coordZ", "stage1"]] for f in frames], ignore_index=True
    )
    table = table[table["seriesuid"].isin(wanted)].reset_index(drop=True)
    parts = []
    dropped = 0
    for uid, frame in table.groupby("seriesuid", sort=True):
        entry = reader.entry(str(uid))
        geo = entry_geometry(entry)
        world = frame[["coordX", "coordY", "coordZ"]].to_numpy(np.float64)
        vox = geo.world_to_voxel(world).reshape(-1, 3)
        inside = np.array([geo.contains(v) for v in vox], dtype=bool)
        dropped += int((~inside).sum())
        labels, ignore = label_candidates(
            world, finding_array(entry, "nodules"), finding_array(entry, "excluded")
        )
        frame = frame.assign(vz=vox[:, 0], vy=vox[:, 1], vx=vox[:, 2], label=labels, ignore=ignore)
        parts.append(frame[inside])
    if dropped:
        log.warning("%d candidate(s) lie outside their scan's volume and were dropped", dropped)
    if not parts:
        return pd.DataFrame(columns=CANDIDATE_COLUMNS)
    return pd.concat(parts, ignore_index=True)[CANDIDATE_COLUMNS]
