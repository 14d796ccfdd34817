"""GLANCE inference: peaks + NMS, mask filter, 3D merging, world coordinates, CSV and mask outputs.

A replay model returns hand-made outputs for a hand-made scan: a 10 mm spherical nodule (segmentation and
heatmap agree) and a vessel-like tube along z that excites the heatmap but not the segmentation — the false
positive the paper's mask filter is meant to remove.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from common.io import CTVolume, read_volume
from common.metrics.froc_io import evaluate_froc_files, write_results_csv
from lungseg.inference import (
    CSV_LINE_END,
    RESULT_EXTRA_COLUMNS,
    RESULT_FORMAT,
    SLICE_FLIPS,
    InferenceConfig,
    SliceDetections,
    candidate_rows,
    find_peaks,
    merge_detections,
    predict_scan,
    save_mask,
    slice_probabilities,
    voxel_to_world,
    write_reference_csvs,
)
from lungseg.losses import gaussian_center_heatmap

SHAPE = (20, 64, 64)
NODULE = (10.0, 30.0, 40.0)  # cache voxel (z, y, x), radius 5 voxels = 5 mm
RADIUS = 5.0
VESSEL = (10.0, 12.0)  # (y, x) of a tube from slice 3 to 16
DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
ORIGIN = (30.0, 20.0, -100.0)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


def _scan_outputs() -> tuple[np.ndarray, np.ndarray]:
    """Per-slice (segmentation probability, heatmap probability) of the hand-made scan."""
    yy, xx = np.mgrid[: SHAPE[1], : SHAPE[2]]
    seg = np.zeros(SHAPE, dtype=np.float32)
    heat = np.zeros(SHAPE, dtype=np.float32)
    cz, cy, cx = NODULE
    for z in range(SHAPE[0]):
        chord_sq = RADIUS**2 - (z - cz) ** 2
        if chord_sq > 0:
            r = math.sqrt(chord_sq)
            seg[z] = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r**2) * 0.95
            heat[z] = 0.9 * gaussian_center_heatmap(SHAPE[1:], [(cy, cx)], [2 * r])
        if 3 <= z <= 16:
            heat[z] = np.maximum(heat[z], 0.7 * gaussian_center_heatmap(SHAPE[1:], [VESSEL], [4.0]))
    return seg, heat


class ReplayModel(nn.Module):
    """Returns the stored outputs chunk by chunk, in the order ``predict_scan`` asks for slices."""

    def __init__(self, seg: np.ndarray | None, heat: np.ndarray | None) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.seg = None if seg is None else torch.from_numpy(_logit(seg))[:, None]
        self.heat = None if heat is None else torch.from_numpy(_logit(heat))[:, None]
        self.position = 0

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        chunk = slice(self.position, self.position + x.shape[0])
        self.position += x.shape[0]
        out = {}
        if self.seg is not None:
            out["seg"] = self.seg[chunk]
        if self.heat is not None:
            out["heatmap"] = self.heat[chunk]
        return out


def _item() -> dict:
    cz, cy, cx = NODULE
    world = voxel_to_world(np.array([NODULE]), ORIGIN, (1.0, 1.0, 1.0), DIRECTION)[0]
    return {
        "uid": "1.2.3.4",
        "image": torch.zeros(SHAPE[0], 1, SHAPE[1], SHAPE[2], dtype=torch.float16),
        "slices": torch.arange(SHAPE[0]),
        "box": (0, 0, SHAPE[1]),
        "image_size": SHAPE[1],
        "shape": SHAPE,
        "spacing": (1.0, 1.0, 1.0),
        "origin": ORIGIN,
        "direction": DIRECTION,
        "original_shape": (10, 32, 32),
        "original_spacing": (2.0, 2.0, 2.0),
        "nodules": torch.tensor([[*world, 2 * RADIUS]], dtype=torch.float64),
        "excluded": torch.zeros(0, 4, dtype=torch.float64),
    }


def test_voxel_to_world_follows_the_direction_matrix() -> None:
    volume = CTVolume(np.zeros(SHAPE, np.int16), (0.7, 0.8, 2.5), ORIGIN, np.asarray(DIRECTION).reshape(3, 3))
    points = np.array([[0.0, 0.0, 0.0], [3.5, 10.25, 60.0]])
    assert np.allclose(
        voxel_to_world(points, ORIGIN, (0.7, 0.8, 2.5), DIRECTION), volume.voxel_to_world(points)
    )


def test_find_peaks_threshold_topk_and_plateau_nms() -> None:
    heat = np.zeros((32, 32), np.float32)
    heat += 0.9 * gaussian_center_heatmap((32, 32), [(8, 8)], [6])
    heat = np.maximum(heat, 0.5 * gaussian_center_heatmap((32, 32), [(20, 24)], [6]))
    heat[28, 2:4] = 0.3  # a two-pixel plateau: both pixels are max-pool maxima
    peaks = find_peaks(torch.from_numpy(heat)[None, None], threshold=0.2, kernel=3, max_peaks=10)[0]
    assert peaks[:2, :2].tolist() == [[8, 8], [20, 24]] and peaks[0, 2] == pytest.approx(0.9)
    assert len(peaks) == 4
    assert len(find_peaks(torch.from_numpy(heat)[None, None], 0.2, 3, 10, min_distance=2.0)[0]) == 3
    assert len(find_peaks(torch.from_numpy(heat)[None, None], 0.6, 3, 10)[0]) == 1
    assert len(find_peaks(torch.from_numpy(heat)[None, None], 0.2, 3, 1)[0]) == 1


def test_merge_links_neighbouring_slices_only() -> None:
    zyx = np.array([[5, 10, 10], [6, 10.5, 10], [7, 11, 10.5], [9, 11, 11], [6, 30, 30], [20, 10, 10]], float)
    detections = SliceDetections(zyx, np.array([0.5, 0.9, 0.6, 0.4, 0.8, 0.7]), np.full(6, 4.0))
    groups = merge_detections(detections, (1.0, 1.0, 1.0), merge_distance_mm=3.0, merge_gap=1)
    assert sorted(map(sorted, (g.tolist() for g in groups))) == [[0, 1, 2, 3], [4], [5]]
    groups = merge_detections(detections, (1.0, 1.0, 1.0), merge_distance_mm=3.0, merge_gap=0)
    assert sorted(map(sorted, (g.tolist() for g in groups))) == [[0, 1, 2], [3], [4], [5]]
    assert len(merge_detections(detections, (1.0, 1.0, 1.0), merge_gap=1, min_slices=2)) == 1


def test_mask_filter_keeps_the_nodule_and_drops_the_vessel() -> None:
    seg, heat = _scan_outputs()
    cfg = InferenceConfig(slice_batch_size=7)
    pred = predict_scan(ReplayModel(seg, heat), _item(), cfg, filter_by_mask=True)
    assert len(pred.candidates) == 1
    expected = voxel_to_world(np.array([NODULE]), ORIGIN, (1.0, 1.0, 1.0), DIRECTION)[0]
    assert np.allclose(pred.candidates.world_xyz[0], expected, atol=0.3)
    assert pred.candidates.diameter_mm[0] == pytest.approx(2 * RADIUS, rel=0.1)
    assert pred.candidates.probability[0] == pytest.approx(0.9, abs=1e-3)
    assert pred.candidates.n_slices[0] == 9
    assert pred.probability.shape == SHAPE and pred.mask().sum() == (seg > 0.5).sum()

    unfiltered = predict_scan(ReplayModel(seg, heat), _item(), cfg, filter_by_mask=False)
    assert len(unfiltered.candidates) == 2, "without the filter the vessel tube becomes a candidate"
    vessel = unfiltered.candidates.zyx[1]
    assert np.allclose(vessel[1:], VESSEL, atol=0.1) and unfiltered.candidates.n_slices[1] == 14


def test_single_head_variants() -> None:
    seg, heat = _scan_outputs()
    seg_only = predict_scan(ReplayModel(seg, None), _item(), InferenceConfig())
    assert len(seg_only.candidates) == 1 and seg_only.candidates.probability[0] == pytest.approx(
        0.95, abs=1e-3
    )
    det_only = predict_scan(ReplayModel(None, heat), _item(), InferenceConfig())
    assert det_only.probability is None and det_only.mask() is None
    assert len(det_only.candidates) == 2
    # Size read back from the heatmap: σ = d / 6 at half maximum.
    assert det_only.candidates.diameter_mm[0] == pytest.approx(2 * RADIUS, rel=0.2)


def test_untrained_segmentation_head_is_ignored() -> None:
    """A head that never saw a mask (LUNA16 / Tianchi training) must not size or merge the detections."""
    from lungseg.task import GlanceTask

    _, heat = _scan_outputs()
    noise = np.full(SHAPE, 0.55, dtype=np.float32)  # an untrained head drifting just above 0.5 everywhere
    used = predict_scan(ReplayModel(noise, heat), _item(), InferenceConfig(), filter_by_mask=False)
    assert len(used.candidates) == 1, "slice-wide components make every detection ~70 mm: all merge"
    ignored = predict_scan(
        ReplayModel(noise, heat), _item(), InferenceConfig(), filter_by_mask=False, segmentation=False
    )
    assert ignored.probability is None and len(ignored.candidates) == 2
    assert ignored.candidates.diameter_mm[0] == pytest.approx(2 * RADIUS, rel=0.2)
    expected = voxel_to_world(np.array([NODULE]), ORIGIN, (1.0, 1.0, 1.0), DIRECTION)[0]
    assert np.allclose(ignored.candidates.world_xyz[0], expected, atol=0.3)

    task = GlanceTask(image_size=SHAPE[1])  # filter_by_mask=None: follow seg_supervised
    task.model = ReplayModel(noise, heat)
    pred = task.predict_item(_item())
    assert pred.probability is None and len(pred.candidates) == 2
    task.model, task.seg_supervised = ReplayModel(noise, heat), torch.tensor(True)
    assert task.predict_item(_item()).probability is not None


def test_outputs_are_scored_by_the_luna16_evaluation(tmp_path) -> None:
    seg, heat = _scan_outputs()
    item = _item()
    unfiltered = predict_scan(ReplayModel(seg, heat), item, InferenceConfig(), filter_by_mask=False)
    results = write_results_csv(
        candidate_rows([(item["uid"], unfiltered.candidates)]),
        tmp_path / "results.csv",
        extra_columns=RESULT_EXTRA_COLUMNS,
        float_format=RESULT_FORMAT,
        lineterminator=CSV_LINE_END,
    )
    refs = write_reference_csvs([item], tmp_path / "reference")
    assert results.read_text().splitlines()[0] == "seriesuid,coordX,coordY,coordZ,probability,diameter_mm"
    result = evaluate_froc_files(
        refs["annotations"], refs["excluded"], refs["seriesuids"], results, n_bootstrap=0
    )
    assert result.counts.true_positives == 1 and result.counts.false_positives == 1
    assert result.cpm == pytest.approx(1.0)


def test_masks_are_written_on_the_original_grid(tmp_path) -> None:
    seg, heat = _scan_outputs()
    item = _item()
    pred = predict_scan(ReplayModel(seg, heat), item, InferenceConfig())
    for name, grid in (("mask.mhd", "original"), ("mask.nii.gz", "cache")):
        path = save_mask(pred.mask(), item, tmp_path / name, grid=grid)
        volume = read_volume(path)
        assert np.allclose(volume.origin, ORIGIN, atol=1e-4)
        assert np.allclose(volume.direction.ravel(), DIRECTION)
        if grid == "original":
            assert volume.shape == item["original_shape"] and volume.spacing == (2.0, 2.0, 2.0)
            assert volume.array.sum() * 8 == pytest.approx(4 / 3 * math.pi * RADIUS**3, rel=0.35)
            centre_world = volume.voxel_to_world(np.argwhere(volume.array > 0).mean(0))[0]
        else:
            assert volume.shape == SHAPE and np.array_equal(volume.array, pred.mask())
            centre_world = volume.voxel_to_world(np.argwhere(volume.array > 0).mean(0))[0]
        expected = voxel_to_world(np.array([NODULE]), ORIGIN, (1.0, 1.0, 1.0), DIRECTION)[0]
        assert np.allclose(centre_world, expected, atol=1.0)
    with pytest.raises(ValueError, match="grid"):
        save_mask(pred.mask(), item, tmp_path / "x.mhd", grid="native")


def test_bad_inference_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="nms_kernel"):
        InferenceConfig(nms_kernel=4)
    with pytest.raises(ValueError, match="threshold"):
        InferenceConfig(seg_threshold=1.0)


@pytest.mark.parametrize("threshold", [0.5, 0.8])
def test_task_metrics_match_common_metrics(threshold: float) -> None:
    from common.metrics.detection import operating_point
    from common.metrics.froc import evaluate_froc, match_candidates
    from lungseg.task import GlanceTask

    seg, heat = _scan_outputs()
    item = _item()
    zz, yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    item["labels"] = (
        ((zz - NODULE[0]) ** 2 + (yy - NODULE[1]) ** 2 + (xx - NODULE[2]) ** 2) < RADIUS**2
    ).astype(np.uint16)
    task = GlanceTask(image_size=SHAPE[1], filter_by_mask=False, operating_threshold=threshold)
    task.model = ReplayModel(seg, heat)
    task.seg_supervised.fill_(True)  # the replayed segmentation stands for a trained head
    task.eval()
    task.validation_step([item], 0)
    values = task.stage_values("val")

    pred = predict_scan(ReplayModel(seg, heat), item, InferenceConfig(), filter_by_mask=False)
    nodules = item["nodules"].numpy()
    args = (
        np.zeros(len(pred.candidates), int), pred.candidates.world_xyz, pred.candidates.probability,
        np.zeros(1, int), nodules[:, :3], nodules[:, 3], np.ones(1, bool), 1,
    )  # fmt: skip
    entries, _ = match_candidates(*args)
    expected = operating_point(entries, threshold)
    assert float(values["val/precision"]) == pytest.approx(expected.precision)
    assert float(values["val/recall"]) == pytest.approx(expected.recall)
    assert float(values["val/f1"]) == pytest.approx(expected.f1)
    assert float(values["val/fp"]) == pytest.approx(expected.fp_column, abs=1e-4)
    assert float(values["val/cpm"]) == pytest.approx(evaluate_froc(*args).cpm)
    # One reference nodule, scored in its box: Dice of the thresholded probability against the labels.
    predicted, reference = seg > 0.5, item["labels"] > 0
    dice = 2 * (predicted & reference).sum() / (predicted.sum() + reference.sum())
    assert float(values["val/dice"]) == pytest.approx(dice, abs=1e-6) and dice > 0.9
    assert float(values["val/hd95"]) >= 0.0


class _Lopsided(torch.nn.Module):
    """Seg and heatmap logits that depend on the position in the slice (not flip-equivariant)."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        ramp = torch.linspace(-2, 2, x.shape[-1]).expand_as(x[:, :1])
        return {"seg": x[:, :1] * 3 + ramp, "heatmap": x[:, :1] - ramp.transpose(-1, -2)}


def test_flip_tta_averages_the_four_flipped_predictions():
    torch.manual_seed(0)
    model, chunk = _Lopsided(), torch.rand(2, 3, 8, 8)
    seg, heat = slice_probabilities(model, chunk)
    out = model(chunk)
    assert torch.equal(seg, torch.sigmoid(out["seg"])) and torch.equal(heat, torch.sigmoid(out["heatmap"]))
    seg_tta, heat_tta = slice_probabilities(model, chunk, flip_tta=True)
    for key, got in (("seg", seg_tta), ("heatmap", heat_tta)):
        views = [torch.sigmoid(model(torch.flip(chunk, a) if a else chunk)[key]) for a in SLICE_FLIPS]
        by_hand = torch.stack([torch.flip(v, a) if a else v for v, a in zip(views, SLICE_FLIPS)]).mean(0)
        assert torch.allclose(got, by_hand, atol=1e-6)
        assert not torch.allclose(got, torch.sigmoid(out[key]), atol=1e-3)
    only_seg = slice_probabilities(lambda x: {"seg": model(x)["seg"]}, chunk, flip_tta=True)
    assert only_seg[1] is None and torch.allclose(only_seg[0], seg_tta)
