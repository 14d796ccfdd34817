"""Anchors, target assignment, losses and post-processing of the CLAF stage 1, against hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from lungdet.anchors import (
    LABEL_IGNORE,
    LABEL_NEGATIVE,
    LABEL_POSITIVE,
    anchor_grid,
    assign_targets,
    assign_targets_batch,
    cube_iou,
    decode_boxes,
    encode_boxes,
)
from lungdet.losses import DetectionLoss, UncertaintyWeighting, binary_focal_loss, select_hard_negatives
from lungdet.postprocess import candidates_from_batch, candidates_from_prediction, nms_candidates

GRID = (16, 16, 16)  # the prediction grid of a 64³ crop


@pytest.fixture(scope="module")
def anchors() -> torch.Tensor:
    return anchor_grid(GRID)


def cell_centre(i: int) -> float:
    return 4 * i + 1.5


# ---------------------------------------------------------------------------------------------- anchors


def test_anchor_grid_centres_and_sizes(anchors):
    assert anchors.shape == (*GRID, 3, 4)
    assert anchors[0, 0, 0, 0].tolist() == [1.5, 1.5, 1.5, 5.0]
    assert anchors[2, 5, 7, 2].tolist() == [9.5, 21.5, 29.5, 20.0]
    assert anchors[..., 3].unique().tolist() == [5.0, 10.0, 20.0]


def test_cube_iou_hand_cases():
    a = torch.tensor([[0.0, 0.0, 0.0, 10.0]])
    b = torch.tensor(
        [[5.0, 0.0, 0.0, 10.0], [0.0, 0.0, 0.0, 10.0], [20.0, 0.0, 0.0, 10.0], [0.0, 0.0, 0.0, 5.0]]
    )
    iou = cube_iou(a, b)[0]
    # half overlap along z: 500 / (1000 + 1000 - 500); identical; disjoint; nested 125 / 1000
    assert iou.tolist() == pytest.approx([1 / 3, 1.0, 0.0, 0.125], abs=1e-6)


def test_encode_hand_values_and_roundtrip():
    box = torch.tensor([10.0, 20.0, 30.0, 8.0])
    anchor = torch.tensor([9.5, 17.5, 29.5, 10.0])
    assert encode_boxes(box, anchor).tolist() == pytest.approx([0.05, 0.25, 0.05, math.log(0.8)], abs=1e-6)
    gen = torch.Generator().manual_seed(0)
    boxes = torch.rand(50, 4, generator=gen) * 60 + 3
    anchors_ = torch.rand(50, 4, generator=gen) * 60 + 3
    torch.testing.assert_close(decode_boxes(encode_boxes(boxes, anchors_), anchors_), boxes)


# ----------------------------------------------------------------------------------- target assignment


def test_nodule_on_a_cell_centre_gets_exactly_the_matching_anchor(anchors):
    z, y, x = cell_centre(6), cell_centre(8), cell_centre(10)
    t = assign_targets(anchors, torch.tensor([[z, y, x, 10.0]]))
    pos = torch.nonzero(t.labels == LABEL_POSITIVE).tolist()
    assert pos == [[6, 8, 10, 1]]  # the 10 mm anchor, IoU 1; a 4-voxel shift gives 600/1400 < 0.5
    assert t.deltas[6, 8, 10, 1].tolist() == pytest.approx([0.0, 0.0, 0.0, 0.0], abs=1e-6)
    assert t.matched[6, 8, 10, 1] == 0
    # same cell, 5 mm and 20 mm anchors: IoU 0.125 → neither positive nor negative
    assert t.labels[6, 8, 10, 0] == LABEL_IGNORE and t.labels[6, 8, 10, 2] == LABEL_IGNORE
    # a 4-voxel shift of the 10 mm anchor: IoU 0.43 → ignored; far away → negative
    assert t.labels[7, 8, 10, 1] == LABEL_IGNORE
    assert t.labels[0, 0, 0, 1] == LABEL_NEGATIVE and t.labels[15, 15, 15, 2] == LABEL_NEGATIVE
    assert bool((t.deltas[t.labels != LABEL_POSITIVE] == 0).all())


def test_off_centre_nodule_regression_target(anchors):
    # 12 mm nodule one voxel below cell (6, 8, 10): 10 mm anchor inside it, IoU 1000 / 1728 = 0.579
    z, y, x = cell_centre(6) + 1.0, cell_centre(8), cell_centre(10)
    t = assign_targets(anchors, torch.tensor([[z, y, x, 12.0]]))
    pos = torch.nonzero(t.labels == LABEL_POSITIVE).tolist()
    assert pos == [[6, 8, 10, 1]]
    assert t.deltas[6, 8, 10, 1].tolist() == pytest.approx([0.1, 0.0, 0.0, math.log(1.2)], abs=1e-6)
    # the neighbour one cell down overlaps 8 voxels in z: 800 / 1928 = 0.41 → ignore, not positive
    assert t.labels[7, 8, 10, 1] == LABEL_IGNORE


def test_small_nodule_positive_only_through_best_match(anchors):
    box = torch.tensor([[cell_centre(3), cell_centre(3), cell_centre(3), 3.0]])  # best IoU 27/125 = 0.216
    forced = assign_targets(anchors, box)
    assert torch.nonzero(forced.labels == LABEL_POSITIVE).tolist() == [[3, 3, 3, 0]]
    strict = assign_targets(anchors, box, match_best=False)
    assert int((strict.labels == LABEL_POSITIVE).sum()) == 0
    assert strict.labels[3, 3, 3, 0] == LABEL_IGNORE


def test_two_nodules_each_anchor_regresses_to_its_own(anchors):
    boxes = torch.tensor([[cell_centre(2), cell_centre(2), cell_centre(2), 10.0], [50.0, 50.0, 50.0, 20.0]])
    t = assign_targets(anchors, boxes)
    assert t.matched[2, 2, 2, 1] == 0
    pos2 = t.labels[..., 2] == LABEL_POSITIVE
    assert bool(pos2.any()) and bool((t.matched[..., 2][pos2] == 1).all())
    anchors_pos = anchors[t.labels == LABEL_POSITIVE]
    decoded = decode_boxes(t.deltas[t.labels == LABEL_POSITIVE], anchors_pos)
    torch.testing.assert_close(decoded, boxes[t.matched[t.labels == LABEL_POSITIVE]])


def test_ignore_boxes_and_empty_crops(anchors):
    empty = assign_targets(anchors, torch.zeros(0, 4))
    assert bool((empty.labels == LABEL_NEGATIVE).all())
    ign = torch.tensor([[cell_centre(5), cell_centre(5), cell_centre(5), 10.0]])
    t = assign_targets(anchors, torch.zeros(0, 4), ignore_boxes=ign)
    assert t.labels[5, 5, 5, 1] == LABEL_IGNORE and t.labels[12, 12, 12, 1] == LABEL_NEGATIVE
    assert int((t.labels == LABEL_POSITIVE).sum()) == 0
    labels, deltas = assign_targets_batch(anchors, [torch.zeros(0, 4), ign], [None, None])
    assert labels.shape == (2, *GRID, 3) and deltas.shape == (2, *GRID, 3, 4)
    assert labels[1, 5, 5, 5, 1] == LABEL_POSITIVE


def test_bad_boxes_raise_a_clear_error(anchors):
    with pytest.raises(ValueError, match="positive diameter"):
        assign_targets(anchors, torch.tensor([[10.0, 10.0, 10.0, -1.0]]))
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        assign_targets(anchors, torch.tensor([10.0, 10.0, 10.0]).reshape(1, 3))
    with pytest.raises(ValueError, match="neg_iou"):
        assign_targets(anchors, torch.zeros(0, 4), pos_iou=0.1, neg_iou=0.2)


# ---------------------------------------------------------------------------------------------- losses


def test_focal_loss_equals_the_formula():
    logits = torch.tensor([-3.0, -0.5, 0.0, 0.7, 2.5, 4.0])
    targets = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    alpha, gamma = 0.25, 2.0
    p = torch.sigmoid(logits)
    expected = torch.where(
        targets == 1,
        -alpha * (1 - p) ** gamma * torch.log(p),
        -(1 - alpha) * p**gamma * torch.log(1 - p),
    )
    torch.testing.assert_close(binary_focal_loss(logits, targets, alpha, gamma), expected)
    # γ = 0 and no α reduces to binary cross-entropy
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    torch.testing.assert_close(binary_focal_loss(logits, targets, alpha=-1, gamma=0.0), bce)


def test_select_hard_negatives_picks_the_largest_losses():
    losses = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.05])
    assert sorted(select_hard_negatives(losses, 2).tolist()) == [1, 3]
    assert sorted(select_hard_negatives(losses, 10).tolist()) == [0, 1, 2, 3, 4]
    assert select_hard_negatives(losses, 0).numel() == 0


def _toy_batch():
    """One crop, 2×2×2 grid, 1 anchor: a positive, an ignored anchor and six negatives."""
    pred = torch.zeros(1, 2, 2, 2, 1, 5)
    labels = torch.zeros(1, 2, 2, 2, 1, dtype=torch.int8)
    deltas = torch.zeros(1, 2, 2, 2, 1, 4)
    neg_logits = [-4.0, -1.0, 2.0, -2.0, 1.0, -3.0]
    cells = [(0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0)]
    for (z, y, x), v in zip(cells, neg_logits):
        pred[0, z, y, x, 0, 0] = v
    pred[0, 0, 0, 0, 0] = torch.tensor([0.5, 0.2, -0.1, 0.0, 3.0])
    labels[0, 0, 0, 0, 0] = LABEL_POSITIVE
    deltas[0, 0, 0, 0, 0] = torch.tensor([0.0, 0.0, 0.5, 0.1])
    pred[0, 1, 1, 1, 0, 0] = 9.0  # the ignored anchor: the highest logit, must never count
    labels[0, 1, 1, 1, 0] = LABEL_IGNORE
    return pred.requires_grad_(True), labels, deltas


def test_detection_loss_ohem_and_regression_by_hand():
    pred, labels, deltas = _toy_batch()
    loss_fn = DetectionLoss(neg_pos_ratio=2.0, min_negatives=0, weighting="fixed", reg_weight=1.0)
    out = loss_fn(pred, labels, deltas)
    assert out.num_pos == 1 and out.num_neg == 2  # 2 negatives per positive
    # OHEM keeps the two highest-scoring negatives (logits 2.0 and 1.0)
    expected_cls = (
        binary_focal_loss(torch.tensor([0.5]), torch.tensor([1.0])).sum()
        + binary_focal_loss(torch.tensor([2.0, 1.0]), torch.zeros(2)).sum()
    )
    torch.testing.assert_close(out.cls, expected_cls)
    # smooth L1 (β = 1) of (0.2, -0.1, -0.5, 2.9): 0.02 + 0.005 + 0.125 + 2.4
    assert float(out.reg) == pytest.approx(0.02 + 0.005 + 0.125 + 2.4, abs=1e-6)
    torch.testing.assert_close(out.loss, expected_cls + out.reg)
    out.loss.backward()
    obj_grad = pred.grad[0, ..., 0, 0]
    assert obj_grad[0, 1, 1] != 0 and obj_grad[1, 0, 1] != 0  # the mined negatives
    assert obj_grad[0, 0, 1] == 0 and obj_grad[1, 1, 0] == 0  # easy negatives left out
    assert obj_grad[1, 1, 1] == 0  # ignored anchor


def test_uncertainty_weighting_is_learned():
    pred, labels, deltas = _toy_batch()
    loss_fn = DetectionLoss(neg_pos_ratio=2.0, min_negatives=0)
    with torch.no_grad():
        loss_fn.task_weights.log_vars.copy_(torch.tensor([math.log(2.0), 0.0]))
    out = loss_fn(pred, labels, deltas)
    torch.testing.assert_close(out.loss, out.cls / 2 + math.log(2.0) + out.reg)
    assert float(out.weight_cls) == pytest.approx(0.5)
    out.loss.backward()
    assert loss_fn.task_weights.log_vars.grad is not None
    assert bool((loss_fn.task_weights.log_vars.grad != 0).all())
    assert set(out.log_dict("train/")) >= {"train/loss", "train/loss_cls", "train/weight_reg"}
    w = UncertaintyWeighting(2)
    assert float(w(torch.tensor([1.5, 2.0])).detach()) == pytest.approx(3.5)


def test_no_positive_crop_still_trains_background():
    pred = torch.randn(2, 4, 4, 4, 3, 5, requires_grad=True)
    labels = torch.zeros(2, 4, 4, 4, 3, dtype=torch.int8)
    out = DetectionLoss(min_negatives=5)(pred, labels, torch.zeros(2, 4, 4, 4, 3, 4))
    assert out.num_pos == 0 and out.num_neg == 10 and float(out.reg) == 0.0
    out.loss.backward()
    assert pred.grad is not None and bool(torch.isfinite(pred.grad).all())


def test_loss_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes disagree"):
        DetectionLoss()(
            torch.zeros(1, 2, 2, 2, 3, 5), torch.zeros(1, 2, 2, 2, 2), torch.zeros(1, 2, 2, 2, 3, 4)
        )


# --------------------------------------------------------------------------------------- post-processing


def test_nms_removes_overlaps_by_threshold():
    cands = torch.tensor(
        [
            [0.8, 11.0, 10.0, 10.0, 10.0],  # IoU with the first: 900 / 1100 = 0.82
            [0.9, 10.0, 10.0, 10.0, 10.0],
            [0.7, 40.0, 40.0, 40.0, 10.0],
            [0.6, 15.0, 10.0, 10.0, 10.0],  # IoU with the best: 500 / 1500 = 0.33
        ]
    )
    kept = nms_candidates(cands, iou_threshold=0.1)
    assert kept[:, 0].tolist() == pytest.approx([0.9, 0.7])
    kept = nms_candidates(cands, iou_threshold=0.5)
    assert kept[:, 0].tolist() == pytest.approx([0.9, 0.7, 0.6])
    kept = nms_candidates(cands, iou_threshold=0.9)
    assert kept[:, 0].tolist() == pytest.approx([0.9, 0.8, 0.7, 0.6])
    assert nms_candidates(torch.zeros(0, 5)).shape == (0, 5)


def test_perfect_prediction_recovers_the_planted_nodule(anchors):
    nodule = torch.tensor([[27.0, 33.0, 40.0, 11.0]])
    t = assign_targets(anchors, nodule)
    pred = torch.full((*GRID, 3, 5), 0.0)
    pred[..., 0] = -8.0
    pos = t.labels == LABEL_POSITIVE
    pred[..., 0][pos] = 6.0
    pred[..., 1:][pos] = t.deltas[pos]
    cands = candidates_from_prediction(pred, anchors, score_threshold=0.5, nms_iou=0.1, offset=(100, 0, -5))
    assert cands.shape == (1, 5)  # several positive anchors decode to the same box; NMS keeps one
    assert float(cands[0, 0]) == pytest.approx(torch.sigmoid(torch.tensor(6.0)).item())
    assert cands[0, 1:].tolist() == pytest.approx([127.0, 33.0, 35.0, 11.0], abs=1e-4)
    batch = candidates_from_batch(torch.stack([pred, pred]), anchors, offsets=[(0, 0, 0), (1, 1, 1)])
    assert len(batch) == 2 and batch[1][0, 1:4].tolist() == pytest.approx([28.0, 34.0, 41.0], abs=1e-4)
    assert candidates_from_prediction(pred, anchors, score_threshold=0.9999).shape == (0, 5)
