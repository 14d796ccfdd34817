"""GLANCE validation counts every scan and nodule once: a scan scored again (as DDP's ``DistributedSampler``
pads the evaluation set) leaves every ``val/`` value unchanged; nodules are keyed by (scan uid, label).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lungseg.task import GlanceTask
from tests.lungseg.test_inference import NODULE, SHAPE, ReplayModel, _item, _scan_outputs


def _scans() -> list[dict]:
    """Two scans with the same predictions but different reference masks (so their Dice differ)."""
    zz, yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    dist2 = (zz - NODULE[0]) ** 2 + (yy - NODULE[1]) ** 2 + (xx - NODULE[2]) ** 2
    scans = []
    for uid, radius in (("1.2.3.4", 5.0), ("1.2.3.5", 3.5)):
        item = _item()
        item["uid"] = uid
        item["labels"] = (dist2 < radius**2).astype(np.uint16)
        scans.append(item)
    return scans


def _validate(order: list[int]) -> dict[str, float]:
    seg, heat = _scan_outputs()
    scans = _scans()
    task = GlanceTask(image_size=SHAPE[1], filter_by_mask=False)
    task.seg_supervised.fill_(True)  # the replayed segmentation stands for a trained head
    task.eval()
    for i, s in enumerate(order):
        task.model = ReplayModel(seg, heat)  # replays one scan's outputs
        with torch.no_grad():
            task.validation_step([scans[s]], i)
    values = {k: float(v) for k, v in task.stage_values("val").items()}
    assert task.metrics_for("val")["seg"].n_cases == len(set(order))
    return values


def test_a_padded_scan_is_scored_once() -> None:
    plain = _validate([0, 1])
    padded = _validate([0, 1, 0])
    assert padded == pytest.approx(plain, rel=1e-6, nan_ok=True)
    alone = _validate([0])
    assert plain["val/dice"] != pytest.approx(alone["val/dice"])  # the second scan does change the mean
