"""The demo report's headline: stage 1 and the validation-chosen fusion side by side, with intervals."""

from __future__ import annotations

import numpy as np

from common.metrics.froc import evaluate_froc
from lungdet.demo import FINAL, _headline
from lungdet.fusion import ScoredScan, choose_fusion


def _result(hit_prob: float):
    """4 scans, one nodule each, hit by a mark of probability `hit_prob`; two false marks per scan at 0.5."""
    rng = np.random.default_rng(0)
    cand_scan = np.repeat(np.arange(4), 3)
    cand_xyz = np.concatenate([[[0, 0, 0], [50, 0, 0], [90, 0, 0]] for _ in range(4)]).astype(float)
    cand_prob = np.tile([hit_prob, 0.5, 0.5], 4) + rng.uniform(0, 1e-3, 12)
    return evaluate_froc(
        cand_scan, cand_xyz, cand_prob, np.arange(4), np.zeros((4, 3)), np.full(4, 10.0), np.ones(4, bool),
        n_scans=4, n_bootstrap=50,
    )  # fmt: skip


def test_headline_shows_both_cpms_with_intervals_and_the_chosen_weight():
    import torch

    scans = [
        ScoredScan("a", np.array([[0.0, 0, 0], [50, 0, 0]]), torch.tensor([0.1, 0.9]).double(),
                   torch.tensor([0.9, 0.1]).double(), torch.tensor([[0.0, 0, 0, 10]]).double(), torch.zeros(0, 4).double())
    ]  # fmt: skip
    choice = choose_fusion(scans, preferred=0.0)
    fusion = {"stage1_weight": choice.stage1_weight, "source": "validation", "configured_stage1_weight": 0.0}
    fusion["validation"] = choice.to_dict()
    stage1, final = _result(0.2), _result(0.9)
    evaluated = {
        "stage 1 (CLAF candidate net)": stage1,
        "stage 1 scores, stage-2 candidates": stage1,
        FINAL: final,
    }
    text = "\n".join(_headline(evaluated, fusion, 50))
    bs1, bsf = stage1.bootstrap, final.bootstrap
    assert f"{stage1.cpm:.3f} [{bs1.cpm_lower:.3f}, {bs1.cpm_upper:.3f}]" in text
    assert f"**{final.cpm:.3f} [{bsf.cpm_lower:.3f}, {bsf.cpm_upper:.3f}]**" in text
    assert final.cpm > stage1.cpm and f"both stages (w = {choice.stage1_weight:g})" in text
    assert (
        choice.stage1_weight == 0.6
        and "validation CPM 1.000" in text
        and f"0: {choice.validation_cpm[0.0]:.3f}, 0.1:" in text
    )
    fusion = {
        "stage1_weight": 0.5,
        "source": "configured",
        "configured_stage1_weight": 0.5,
        "validation": None,
    }
    assert "the configured w = 0.5" in "\n".join(_headline(evaluated, fusion, 0))
