"""lungdet.inference: stitched sliding-window output, candidates in world mm, MPPN re-scoring, results CSV."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.metrics.froc_io import evaluate_froc_files, read_results, write_results_csv
from lungdet.inference import (
    MIRRORINGS,
    Stage1Inference,
    candidates_to_world,
    detect_scan,
    fuse_scores,
    score_candidates,
    stitched_prediction,
)
from lungdet.models import build_candidate_net, build_mppn, coordinate_maps, crop_candidates
from lungdet.scan_reader import ScanReader, fill_value
from lungdet.task import CandidateTask


class LocalNet(nn.Module):
    """A stand-in candidate net whose output per cell depends only on that cell's voxels and coordinates.

    Objectness logit = 40 · (mean intensity of the cell − 0.5) for every anchor; dz, dy, dx = the cell's mean
    coordinate channels (``coord_deltas``, to check that each block gets its own coordinates) or 0; dd = 0.
    Being local, the whole-scan result of any correct block stitching equals one pass over the whole
    (padded) scan.
    """

    stride = 4
    num_anchors = 3
    anchor_sizes = (5.0, 10.0, 20.0)
    use_coords = True

    def __init__(self, coord_deltas: bool = True) -> None:
        super().__init__()
        self.coord_deltas = coord_deltas

    def forward(self, x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        logit = 40.0 * (F.avg_pool3d(x, 4) - 0.5)  # (B, 1, d, h, w)
        c = F.avg_pool3d(coords, 4) * float(self.coord_deltas)  # (B, 3, d, h, w)
        per_anchor = torch.cat([logit, c, torch.zeros_like(logit)], dim=1)  # (B, 5, d, h, w)
        out = per_anchor[:, None].expand(-1, 3, -1, -1, -1, -1)  # (B, A, 5, d, h, w)
        return out.permute(0, 3, 4, 5, 1, 2).contiguous()


def test_stitched_blocks_equal_one_pass_over_the_scan():
    net = LocalNet()
    image = torch.rand(70, 90, 101)
    stitched = stitched_prediction(
        net, image, Stage1Inference(block_size=32, overlap=0.5, sw_batch_size=3), pad_value=0.25
    )
    padded = F.pad(image, (0, 3, 0, 2, 0, 2), value=0.25)  # to multiples of 4
    coords = coordinate_maps([0, 0, 0], padded.shape, image.shape)[None]
    direct = net(padded[None, None], coords)[0]
    assert stitched.shape == direct.shape == (18, 23, 26, 3, 5)
    assert torch.allclose(stitched, direct, atol=1e-5)


def test_block_overlap_must_keep_the_grids_aligned():
    with pytest.raises(ValueError, match="multiples of the stride"):
        stitched_prediction(LocalNet(), torch.rand(40, 40, 40), Stage1Inference(block_size=32, overlap=0.3))
    with pytest.raises(ValueError, match="multiples of 32"):
        stitched_prediction(LocalNet(), torch.rand(40, 40, 40), Stage1Inference(block_size=48, overlap=0.5))


def test_detect_scan_finds_a_planted_cube():
    image = torch.zeros(50, 60, 70)
    image[20:28, 32:40, 12:20] = 1.0  # two 4³ cells in each direction
    settings = Stage1Inference(block_size=32, overlap=0.5, sw_batch_size=1, score_threshold=0.5, nms_iou=0.1)
    cands = detect_scan(LocalNet(coord_deltas=False), image, settings)
    assert cands.shape[1] == 5 and cands.shape[0] >= 1
    centres = cands[:, 1:4]
    within = (
        (centres >= torch.tensor([18.0, 30.0, 10.0])) & (centres <= torch.tensor([29.0, 41.0, 21.0]))
    ).all(1)
    assert within.all(), f"every candidate lies on the cube, got {centres}"
    assert (cands[:-1, 0] >= cands[1:, 0]).all(), "sorted by score"


def test_stage1_settings_are_one_frozen_object_and_anchors_come_from_the_net():
    settings = Stage1Inference(block_size=[32, 64, 32], overlap=0.5, sw_batch_size=1, score_threshold=0.5)
    assert settings.block == (32, 64, 32) and settings.to_dict()["block_size"] == [32, 64, 32]
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.overlap = 0.25  # type: ignore[misc]
    with pytest.raises(ValueError, match=r"not \['block'\]"):
        settings.updated({"block": 32})
    with pytest.raises(ValueError, match="blend_mode"):
        Stage1Inference(blend_mode="max")
    task = CandidateTask(block_size=64, score_threshold=0.2, merge_factor=0.0)
    assert task.inference == Stage1Inference(block_size=64, score_threshold=0.2, merge_factor=0.0)
    assert "score_threshold" not in task.hparams and "pre_nms_top_k" not in task.hparams

    image = torch.zeros(50, 60, 70)
    image[20:28, 32:40, 12:20] = 1.0
    settings = Stage1Inference(block_size=32, overlap=0.5, sw_batch_size=1, score_threshold=0.5)
    small, large = LocalNet(coord_deltas=False), LocalNet(coord_deltas=False)
    large.anchor_sizes = (10.0, 20.0, 40.0)
    sizes_small = set(detect_scan(small, image, settings)[:, 4].tolist())
    sizes_large = set(detect_scan(large, image, settings)[:, 4].tolist())
    assert sizes_small <= {5.0, 10.0, 20.0} and sizes_large <= {10.0, 20.0, 40.0}
    assert sizes_small != sizes_large


def test_real_candidate_net_on_a_whole_scan_keeps_candidates_inside():
    torch.manual_seed(0)
    net = build_candidate_net("ascrm", width=2, head_channels=8, prior_prob=0.5).eval()
    image = torch.rand(40, 45, 50)
    settings = Stage1Inference(
        block_size=32, overlap=0.5, sw_batch_size=1, score_threshold=0.0, max_candidates=20
    )
    cands = detect_scan(net, image, settings)
    assert 0 < cands.shape[0] <= 20
    assert (cands[:, 1:4] >= -0.5).all() and (cands[:, 1:4] <= torch.tensor(image.shape) - 0.5).all()


def test_voxel_to_world_uses_the_manifest_geometry(luna_cache):
    """Each cached nodule's voxel position converts back to its annotated world position (flipped scans too)."""
    directions = set()
    for uid in luna_cache.uids:
        entry = luna_cache.entry(uid)
        directions.add(tuple(entry["direction"]))
        for finding in entry["nodules"] + entry["excluded"]:
            world = candidates_to_world(np.array([finding["voxel_zyx"]]), entry)
            np.testing.assert_allclose(world[0], finding["world_xyz"], atol=1e-6)
    assert len(directions) == 2, "the fixture has an identity and a flipped scan"
    assert candidates_to_world(np.zeros((0, 3)), entry).shape == (0, 3)


def test_mppn_scores_equal_the_network_on_crops(luna_cache):
    torch.manual_seed(0)
    mppn = build_mppn(width=2).eval()
    reader = ScanReader(luna_cache)
    image = torch.from_numpy(reader.whole(luna_cache.uids[0]))
    centres = torch.tensor([[10.0, 20.0, 30.0], [0.0, 0.0, 0.0], [40.0, 50.5, 60.2]])
    got = score_candidates(mppn, image, centres, chunk_size=2, pad_value=fill_value())
    with torch.no_grad():
        expected = mppn.nodule_probability(mppn(crop_candidates(image, centres, pad_value=fill_value())))
    assert torch.allclose(got, expected, atol=1e-6)
    assert score_candidates(mppn, image, torch.zeros(0, 3)).shape == (0,)


class LopsidedScorer(nn.Module):
    """A stand-in MPPN whose probability depends on which half of the crop is brighter (not mirror-invariant)."""

    crop_sizes = ((32, 48, 48),)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        left = crops[..., :16, :24, :24].mean((1, 2, 3, 4))
        return torch.stack([torch.zeros_like(left), 20 * (left - crops.mean((1, 2, 3, 4)))], dim=1)

    def nodule_probability(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(1)[:, 1]


def test_mirror_tta_is_the_mean_over_the_eight_mirrored_crops(luna_cache):
    scorer = LopsidedScorer()
    image = torch.from_numpy(ScanReader(luna_cache).whole(luna_cache.uids[0]))
    centres = torch.tensor([[20.0, 40.0, 50.0], [30.0, 60.0, 70.0]])
    plain = score_candidates(scorer, image, centres, pad_value=fill_value())
    mirrored = score_candidates(scorer, image, centres, chunk_size=1, pad_value=fill_value(), mirror=True)
    crops = crop_candidates(image, centres, pad_value=fill_value())
    by_hand = torch.stack([scorer.nodule_probability(scorer(torch.flip(crops, axes))) for axes in MIRRORINGS])
    assert len(set(MIRRORINGS)) == 8 and () in MIRRORINGS
    assert torch.allclose(mirrored, by_hand.mean(0), atol=1e-6)
    assert not torch.allclose(mirrored, plain, atol=1e-3)


def test_score_fusion():
    p = torch.tensor([0.2, 0.8, 0.5])
    s1 = torch.tensor([1.0, 0.0, float("nan")])
    assert torch.allclose(fuse_scores(p, s1, 0.25), torch.tensor([0.4, 0.6, 0.5]))
    assert fuse_scores(p, None, 0.5) is p and fuse_scores(p, s1, 0.0) is p
    with pytest.raises(ValueError, match="stage1_weight"):
        fuse_scores(p, s1, 1.5)


def test_results_csv_is_what_the_official_evaluation_reads(luna_tree, luna_cache, tmp_path):
    rows = []
    for uid in luna_cache.uids:
        for finding in luna_cache.entry(uid)["nodules"]:
            rows.append((uid, *finding["world_xyz"], 0.9))
        rows.append((uid, 0.0, 0.0, 0.0, 0.1))
    path = write_results_csv(rows, tmp_path / "sub" / "results.csv")
    frame = read_results(path)
    assert list(frame.columns) == ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
    assert len(frame) == len(rows)
    result = evaluate_froc_files(
        luna_tree / "annotations.csv",
        luna_tree / "annotations_excluded.csv",
        luna_tree / "seriesuids.csv",
        path,
        n_bootstrap=0,
    )
    assert result.counts.sensitivity == 1.0 and result.cpm == pytest.approx(1.0)
    with pytest.raises(ValueError, match="missing"):
        write_results_csv(pd.DataFrame({"seriesuid": ["a"]}), tmp_path / "x.csv")


def test_gradcam_of_one_candidate_is_written_as_png(luna_cache, tmp_path):
    from lungdet.gradcam import ObjectnessScore, gradcam_for_candidate, save_gradcam_png

    torch.manual_seed(0)
    net = build_candidate_net("ascrm", width=2, head_channels=8).eval()
    reader = ScanReader(luna_cache)
    uid = luna_cache.uids[0]
    nodule = luna_cache.entry(uid)["nodules"][0]
    image = torch.from_numpy(reader.whole(uid))
    crop, cam, centre = gradcam_for_candidate(
        net, image, nodule["voxel_zyx"], crop_size=32, fill=fill_value()
    )
    assert crop.shape == cam.shape == (32, 32, 32)
    assert cam.min() >= 0.0 and cam.max() == pytest.approx(1.0)
    np.testing.assert_allclose(centre, np.asarray(nodule["voxel_zyx"]) - (np.round(nodule["voxel_zyx"]) - 16))
    # the explained score is the best anchor logit of the candidate's cell
    x = torch.from_numpy(crop)[None, None]
    coords = coordinate_maps(
        torch.tensor([[0.0, 0.0, 0.0]]), (32, 32, 32), torch.tensor([[32.0, 32.0, 32.0]])
    )
    with torch.no_grad():
        score = ObjectnessScore(net, (3, 4, 5))(x, coords)
        assert torch.allclose(score[0, 0], net(x, coords)[0, 3, 4, 5, :, 0].max())
    png = save_gradcam_png(crop, cam, tmp_path / "cam.png", centre, nodule["diameter_mm"], "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="target_layer"):
        gradcam_for_candidate(net, image, nodule["voxel_zyx"], crop_size=32, target_layer="nope")
