"""The stage fusion of CLAF chosen on validation scans: one rule for `lungdet fit`/`test` and `lungcad bundle`.

The two-stage score of a candidate is ``(1 − w)·p_MPPN + w·p_stage1`` (``lungdet.inference.fuse_scores``).
``choose_fusion`` takes the validation scans' candidates with both scores and picks the w of a grid
(``FUSION_GRID``: 0, 0.1, …, 1) with the highest validation CPM under the official LUNA16 rules
(``common.metrics.froc.evaluate_froc``). Ties go to the preferred weight (the run's configured
``stage1_weight``), then to the smaller w. w = 1 is stage 1's own ranking of the same candidates, so the
chosen fusion is never below stage 1 on the validation scans and on test scans only by noise (issue 21:
a fixed fusion scored the demo's two-stage detector below its own first stage).

Used by ``lungdet.task.FPRTask`` (``fusion_search: true``: chosen at every validation epoch end, saved in the
checkpoint under ``CHECKPOINT_KEY`` and used by ``lungdet test``/``predict`` of that checkpoint) and by
``lungcad.bundle`` (on the bundled models' own validation scores, preferring the run's choice on ties).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from common.metrics.froc import evaluate_froc
from common.metrics.froc_io import FROCInputs
from lungdet.inference import fuse_scores

__all__ = [
    "CHECKPOINT_KEY",
    "FUSION_GRID",
    "FusionChoice",
    "ScoredScan",
    "choose_fusion",
    "froc_inputs",
    "fusion_cpm",
]

FUSION_GRID: tuple[float, ...] = tuple(round(0.1 * k, 1) for k in range(11))
#: Where `FPRTask` keeps its validation choice in a Lightning checkpoint (plain JSON types: weights_only loads).
CHECKPOINT_KEY = "lungdet_fusion"
RULE = "(1 - w) * p_mppn + w * p_stage1"


@dataclass
class ScoredScan:
    """One scan's candidates with both stage scores and its reference findings (world mm).

    Attributes:
        uid: series UID.
        world: (K, 3) candidate centres x, y, z.
        mppn: (K,) MPPN probability.
        stage1: (K,) stage-1 score (NaN where unknown) or None.
        nodules: (N, 4) included nodules x, y, z, diameter.
        excluded: (M, 4) excluded findings.
    """

    uid: str
    world: np.ndarray
    mppn: Tensor
    stage1: Tensor | None
    nodules: Tensor
    excluded: Tensor

    @classmethod
    def from_scan(cls, scan: Mapping[str, Any], world: np.ndarray, mppn: Tensor, stage1: Tensor | None):
        """From a lungdet evaluation item (uid, nodules, excluded) and its scores, detached on the CPU."""
        return cls(
            uid=str(scan["uid"]),
            world=np.asarray(world, dtype=np.float64).reshape(-1, 3),
            mppn=mppn.detach().double().cpu().reshape(-1),
            stage1=None if stage1 is None else stage1.detach().double().cpu().reshape(-1),
            nodules=torch.as_tensor(scan["nodules"]).detach().double().cpu().reshape(-1, 4),
            excluded=torch.as_tensor(scan["excluded"]).detach().double().cpu().reshape(-1, 4),
        )

    def fused(self, weight: float) -> Tensor:
        return fuse_scores(self.mppn, self.stage1, weight).double()

    @property
    def has_stage1(self) -> bool:
        return self.stage1 is not None and bool((~torch.isnan(self.stage1)).any())


def froc_inputs(scans: Sequence[ScoredScan], weight: float) -> FROCInputs:
    """The fused marks of every scan and its findings (nodules included, excluded findings not)."""
    scores = [s.fused(weight).numpy() for s in scans]
    findings = [(i, s.nodules.numpy(), True) for i, s in enumerate(scans)]
    findings += [(i, s.excluded.numpy(), False) for i, s in enumerate(scans)]
    nod = np.concatenate([f for _, f, _ in findings] or [np.zeros((0, 4))]).reshape(-1, 4)
    return FROCInputs(
        seriesuids=[s.uid for s in scans],
        cand_scan=np.concatenate([np.full(len(p), i) for i, p in enumerate(scores)] or [[]]).astype(np.int64),
        cand_xyz=np.concatenate([s.world for s in scans] or [np.zeros((0, 3))]).reshape(-1, 3),
        cand_prob=np.concatenate(scores or [np.zeros(0)]).astype(np.float64),
        nod_scan=np.concatenate([np.full(len(f), i) for i, f, _ in findings] or [[]]).astype(np.int64),
        nod_xyz=nod[:, :3],
        nod_diameter=nod[:, 3],
        nod_included=np.concatenate([np.full(len(f), inc) for _, f, inc in findings] or [[]]).astype(bool),
        annotations_outside_list=0,
    )


def fusion_cpm(scans: Sequence[ScoredScan], weight: float) -> float:
    """CPM of the fused scores over the scans (official LUNA16 hit rules, sensitivities by interpolation)."""
    return float(evaluate_froc(*froc_inputs(scans, weight).args()).cpm)


@dataclass(frozen=True)
class FusionChoice:
    """The chosen stage-1 weight and the validation CPM of every weight tried.

    Attributes:
        stage1_weight: the chosen w.
        preferred_stage1_weight: the weight that wins ties (the run's configured one).
        validation_cpm: w → validation CPM (None: no validation nodule, CPM undefined).
        validation_scans: scans the choice saw.
        validation_nodules: included nodules on them.
        epoch: training epoch whose validation made the choice (None outside training).
    """

    stage1_weight: float
    preferred_stage1_weight: float
    validation_cpm: Mapping[float, float | None]
    validation_scans: int
    validation_nodules: int
    epoch: int | None = None

    @property
    def cpm(self) -> float | None:
        """Validation CPM of the chosen weight."""
        return self.validation_cpm.get(self.stage1_weight)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (checkpoint, test_fusion.json, bundle.json)."""
        return {
            "rule": RULE,
            "stage1_weight": float(self.stage1_weight),
            "preferred_stage1_weight": float(self.preferred_stage1_weight),
            "validation_cpm": {f"{w:g}": c for w, c in self.validation_cpm.items()},
            "chosen_validation_cpm": self.cpm,
            "validation_scans": int(self.validation_scans),
            "validation_nodules": int(self.validation_nodules),
            "epoch": self.epoch,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FusionChoice:
        return cls(
            stage1_weight=float(data["stage1_weight"]),
            preferred_stage1_weight=float(data["preferred_stage1_weight"]),
            validation_cpm={
                float(w): (None if c is None else float(c)) for w, c in data["validation_cpm"].items()
            },
            validation_scans=int(data["validation_scans"]),
            validation_nodules=int(data["validation_nodules"]),
            epoch=None if data.get("epoch") is None else int(data["epoch"]),
        )


def choose_fusion(
    scans: Sequence[ScoredScan],
    preferred: float,
    grid: Iterable[float] = FUSION_GRID,
    *,
    epoch: int | None = None,
) -> FusionChoice:
    """The weight of ``grid`` (plus ``preferred``) with the highest CPM on ``scans``.

    Ties (within 1e-12): ``preferred``, then the smaller w. Without a validation nodule (CPM undefined) or
    without any stage-1 score (every w gives the same ranking) only ``preferred`` is scored and kept.

    Raises:
        ValueError: on a weight outside [0, 1].
    """
    weights = sorted({float(w) for w in grid} | {float(preferred)})
    if any(not 0.0 <= w <= 1.0 for w in weights):
        raise ValueError(f"fusion weights must lie in [0, 1], got {weights}")
    n_nodules = int(sum(s.nodules.shape[0] for s in scans))
    if not n_nodules or not any(s.has_stage1 for s in scans):
        weights = [float(preferred)]
    cpms = {w: (fusion_cpm(scans, w) if n_nodules else None) for w in weights}
    chosen = float(preferred)
    if n_nodules:
        best = max(c for c in cpms.values() if c is not None)
        ties = [
            w for w, c in cpms.items() if c is not None and math.isclose(c, best, rel_tol=0, abs_tol=1e-12)
        ]
        chosen = chosen if chosen in ties else min(ties)
    return FusionChoice(chosen, float(preferred), cpms, len(scans), n_nodules, epoch)
