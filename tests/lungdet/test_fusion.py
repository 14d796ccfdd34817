"""lungdet.fusion: the stage-1 weight chosen on validation scans maximises their CPM (official LUNA16 rules).

Constructed scans with one nodule each and false candidates far from it, so the CPM of every weight is known
by hand: 1 when the nodule's candidate outranks every false one in the pooled FROC, less otherwise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lungdet.fusion import FUSION_GRID, FusionChoice, ScoredScan, choose_fusion, fusion_cpm


def _scan(uid: str, stage1: list[float], mppn: list[float], nodule: bool = True) -> ScoredScan:
    """Candidate 0 sits on the scan's nodule (if any), the others 60 mm apart from it and each other."""
    n = len(stage1)
    world = np.array([[60.0 * i, 0.0, 0.0] for i in range(n)])
    return ScoredScan(
        uid=uid,
        world=world,
        mppn=torch.tensor(mppn, dtype=torch.float64),
        stage1=torch.tensor(stage1, dtype=torch.float64),
        nodules=torch.tensor([[0.0, 0.0, 0.0, 10.0]] if nodule else [], dtype=torch.float64).reshape(-1, 4),
        excluded=torch.zeros(0, 4, dtype=torch.float64),
    )


def test_stage1_better_than_the_mppn_gives_a_positive_weight():
    """The MPPN ranks both nodules below false candidates, stage 1 above: only stage-1 weight helps."""
    scans = [
        _scan("a", stage1=[0.9, 0.2, 0.1], mppn=[0.1, 0.8, 0.7]),
        _scan("b", stage1=[0.8, 0.3, 0.2], mppn=[0.2, 0.9, 0.6]),
    ]
    choice = choose_fusion(scans, preferred=0.0)
    assert choice.validation_cpm[1.0] == 1.0 and choice.validation_cpm[0.0] < 1.0
    assert choice.stage1_weight > 0 and choice.cpm == 1.0
    best = max(choice.validation_cpm.values())
    assert choice.cpm == best and choice.stage1_weight == min(
        w for w, c in choice.validation_cpm.items() if c == best
    )
    assert set(choice.validation_cpm) == set(FUSION_GRID)
    assert choice.validation_scans == 2 and choice.validation_nodules == 2


def test_mppn_best_gives_weight_zero_even_when_another_is_preferred():
    """Any stage-1 weight lifts a false candidate (MPPN 0.5, stage 1 1.0) over the nodule (0.51, 0.0)."""
    scans = [_scan("a", stage1=[0.0, 1.0], mppn=[0.51, 0.5]), _scan("b", stage1=[0.0, 1.0], mppn=[0.52, 0.5])]
    choice = choose_fusion(scans, preferred=0.5)
    assert choice.stage1_weight == 0.0 and choice.cpm == 1.0
    assert all(c < 1.0 for w, c in choice.validation_cpm.items() if w > 0)


def test_ties_go_to_the_preferred_weight_then_to_the_smaller():
    scans = [_scan("a", stage1=[0.9, 0.1], mppn=[0.9, 0.1])]  # every weight ranks the nodule first
    assert choose_fusion(scans, preferred=0.3).stage1_weight == 0.3
    assert choose_fusion(scans, preferred=0.25).validation_cpm.keys() >= {0.25, 0.2, 0.3}  # preferred scored
    only_high = [_scan("a", stage1=[0.9, 0.1], mppn=[0.0, 0.4])]  # w ≥ 0.4 rank the nodule first
    choice = choose_fusion(only_high, preferred=0.0)
    assert choice.stage1_weight == pytest.approx(0.4) and choice.cpm == 1.0


def test_without_nodules_or_stage1_scores_the_preferred_weight_is_kept_unsearched():
    empty = choose_fusion([_scan("a", stage1=[0.9, 0.1], mppn=[0.1, 0.9], nodule=False)], preferred=0.5)
    assert empty.stage1_weight == 0.5 and empty.cpm is None and list(empty.validation_cpm) == [0.5]
    unknown = _scan("a", stage1=[0.9, 0.1], mppn=[0.1, 0.9])
    unknown.stage1 = torch.full((2,), float("nan"), dtype=torch.float64)
    choice = choose_fusion([unknown], preferred=0.2)
    assert choice.stage1_weight == 0.2 and list(choice.validation_cpm) == [0.2]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        choose_fusion([unknown], preferred=1.5)


def test_cpm_counts_every_scan_and_the_choice_round_trips_through_json():
    """A scan without candidates still counts (its nodule is missed): CPM 0.5 with two scans, one found."""
    scans = [_scan("a", stage1=[0.9], mppn=[0.9]), _scan("b", stage1=[], mppn=[])]
    scans[1].world = np.zeros((0, 3))
    assert fusion_cpm(scans, 0.5) == pytest.approx(0.5)
    choice = choose_fusion(scans, preferred=0.0, epoch=3)
    assert FusionChoice.from_dict(choice.to_dict()) == choice
    assert choice.to_dict()["validation_cpm"]["0.1"] == pytest.approx(0.5) and choice.to_dict()["epoch"] == 3
