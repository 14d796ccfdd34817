"""GLANCE data: slice geometry, nodule masks on the cache grid, targets, augmentation alignment, sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.cache import PreprocessedCache
from common.datasets.registry import open_dataset
from lungseg.augment import SliceAugment
from lungseg.data import GlanceDataModule
from lungseg.masks import NoduleMaskStore, transfer_box_mask
from lungseg.slices import SquareBox, crop_resize, full_box, lung_box, nodule_sections, paste_back
from tests.lungseg.conftest import SIZE, make_datamodule

# ----------------------------------------------------------------------------------------- geometry


def test_square_box_maps_both_ways_like_cv2_resize() -> None:
    box = SquareBox(y0=-5, x0=10, side=40)
    points = np.array([[0.0, 10.0], [12.3, 33.7], [34.0, 49.0]])
    assert np.allclose(box.to_cache(box.to_working(points, 64), 64), points)
    # A bright 2×2 block lands where the formula says after crop + resize.
    slice_yx = np.zeros((50, 60), dtype=np.float32)
    slice_yx[20:22, 30:32] = 1.0
    work = crop_resize(slice_yx, box, 80)
    ys, xs = np.nonzero(work > 0.5)
    expected = box.to_working(np.array([[20.5, 30.5]]), 80)[0]
    assert abs(ys.mean() - expected[0]) < 0.6 and abs(xs.mean() - expected[1]) < 0.6


def test_crop_pads_with_air_and_paste_back_inverts() -> None:
    rng = np.random.default_rng(0)
    slice_yx = rng.uniform(size=(30, 40)).astype(np.float32)
    box = full_box(slice_yx.shape)
    assert box.side == 40 and box.y0 == -5
    work = crop_resize(slice_yx, box, 40, fill=-7.0)
    assert np.all(work[:5] == -7.0) and np.array_equal(work[5:35], slice_yx)
    assert np.allclose(paste_back(work, box, slice_yx.shape), slice_yx)


def test_lung_box_and_empty_mask() -> None:
    mask = np.zeros((4, 100, 120), dtype=np.uint8)
    mask[1:3, 30:50, 20:90] = 1
    box = lung_box(mask, margin_vox=5)
    assert box.side == 80 and box.y0 <= 25 and box.y0 + box.side >= 55 and box.x0 == 15
    assert lung_box(np.zeros_like(mask), 5) is None


def test_sphere_sections_without_masks() -> None:
    nodule = {"voxel_zyx": [10.0, 20.0, 30.0], "diameter_mm": 8.0, "nodule_id": "a"}
    sections = nodule_sections([nodule], (30, 50, 60), (0.5, 0.5, 1.0))
    assert sorted(sections) == list(range(7, 14))  # |z − 10| < 4 mm
    centre = sections[10][0]
    assert (centre.cy, centre.cx) == (20.0, 30.0) and centre.diameter == pytest.approx(16.0)  # 8 mm at 0.5 mm
    assert sections[13][0].diameter == pytest.approx(2 * math.sqrt(16 - 9) / 0.5)
    assert nodule_sections([{**nodule, "diameter_mm": -1.0}], (30, 50, 60), (1, 1, 1)) == {}


def test_transfer_keeps_one_slice_masks_and_volume() -> None:
    thin = np.ones((1, 5, 5), dtype=bool)
    moved = transfer_box_mask(thin, (10, 20, 20), (0.8, 0.8, 2.5), (1.0, 1.0, 1.0), (80, 100, 100))
    assert moved is not None, "a mask on one 2.5 mm slice must survive the move to 1 mm"
    zz, yy, xx = np.mgrid[:21, :21, :21]
    ball = (zz - 10) ** 2 + (yy - 10) ** 2 + (xx - 10) ** 2 <= 8**2
    moved = transfer_box_mask(ball, (5, 5, 5), (0.7, 0.7, 0.7), (1.0, 1.0, 1.0), (60, 60, 60))
    box, start = moved
    assert box.sum() == pytest.approx(ball.sum() * 0.7**3, rel=0.08)
    centre = np.array(np.nonzero(box)).mean(1) + np.array(start)
    assert np.allclose(centre, 15 * 0.7, atol=0.3)


# ----------------------------------------------------------------------------------- nodule masks


def test_nodule_masks_match_the_annotations(lidc_root, lidc_cache) -> None:
    cache = PreprocessedCache(lidc_cache)
    store = NoduleMaskStore(cache)
    adapter = open_dataset("lidc", lidc_root)
    assert store.build(adapter, "lidc") == {"built": 0, "skipped": len(cache)}, "built once, then reused"
    inside, total = 0, 0
    for uid in cache.uids:
        labels, label_of = store.load(uid)
        entry = cache.entry(uid)
        assert labels.shape == tuple(entry["shape"]) and labels.dtype == np.uint16
        record = adapter[uid]
        original_voxel = float(np.prod(entry["original_spacing"]))
        for nodule in record.nodules:
            value = label_of[nodule.nodule_id]
            consensus, _ = adapter.consensus_mask(uid, nodule)
            total += 1
            if consensus.sum() * original_voxel >= 150:  # small masks lose too much to partial volume
                # Same physical volume on the 1 mm grid as on the original grid (partial-volume error aside).
                assert (labels == value).sum() == pytest.approx(consensus.sum() * original_voxel, rel=0.25)
            zyx = np.round(
                next(n["voxel_zyx"] for n in entry["nodules"] if n["nodule_id"] == nodule.nodule_id)
            )
            inside += labels[tuple(zyx.astype(int))] == value
    assert total >= 4 and inside >= total - 1, "the annotated centre lies inside the nodule's mask"


def test_training_sample_targets_agree(fit_datamodule) -> None:
    dataset = fit_datamodule.datasets["train"]
    dataset_no_aug = type(dataset)(dataset.views, augment=None)
    i = int(np.flatnonzero(dataset_no_aug.nodule_slices)[len(dataset_no_aug.nodule_slices) // 50])
    sample = dataset_no_aug.sample(i)
    assert sample["image"].shape == sample["mask"].shape == sample["heatmap"].shape == (1, SIZE, SIZE)
    assert 0.0 <= float(sample["image"].min()) and float(sample["image"].max()) <= 1.0
    assert bool(sample["has_mask"]) and float(sample["heatmap"].max()) == 1.0
    peaks = torch.nonzero(sample["heatmap"][0] == 1.0)
    mask = sample["mask"][0]
    assert mask.sum() > 0 and any(mask[y, x] > 0 for y, x in peaks), "a heatmap peak sits on the nodule mask"


def test_training_masks_round_trip_onto_the_evaluation_reference(lidc_root, lidc_cache) -> None:
    """The seg head learns exactly the reference it is scored against, and the resize loses almost nothing.

    Training masks are the label volume's slices carried to the working image (lung box crop, resize);
    evaluation pastes working-size probabilities back onto the cache grid and compares them with the same
    label volume. A perfect working-size prediction (the training mask itself) pasted back must therefore
    give each nodule's reference again, up to the interpolation at its rim.
    """
    dm = make_datamodule(lidc_root, lidc_cache, image_size=128, lung_crop=True, augment=False)
    dm.setup("fit")
    views = [*dm.datasets["train"].views, *dm.datasets["val"].views]
    dice = []
    for view in views:
        labels = np.asarray(view.array("labels"))
        back = np.zeros(labels.shape, dtype=bool)
        for z in np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1)):
            work = view.mask_slice(int(z)).astype(np.float32)
            back[z] = paste_back(work, view.box, labels.shape[1:]) >= 0.5
        for value in np.unique(labels[labels > 0]):
            reference = labels == value
            predicted = back & (reference | (labels == 0))  # other nodules' voxels are theirs
            dice.append(2.0 * (predicted & reference).sum() / (predicted.sum() + reference.sum()))
    assert len(dice) >= 3
    assert min(dice) >= 0.85 and float(np.mean(dice)) >= 0.95, dice


def test_scan_items_carry_geometry_and_labels(fit_datamodule) -> None:
    item = fit_datamodule.datasets["val"][0]
    assert item["image"].dtype == torch.float16 and item["image"].shape[1:] == (1, SIZE, SIZE)
    assert item["image"].shape[0] == item["slices"].shape[0] <= item["shape"][0]
    assert item["labels"].shape == item["shape"] and item["has_mask"]
    assert item["nodules"].shape[1] == 4 and len(item["direction"]) == 9


def test_context_slices_become_channels(lidc_root, lidc_cache) -> None:
    dm = make_datamodule(lidc_root, lidc_cache, context_slices=1, context_step=2, augment=True)
    dm.setup("fit")
    dataset = dm.datasets["train"]
    i = int(np.flatnonzero(dataset.nodule_slices)[0])
    sample = dataset.sample(i, seed=3)
    assert sample["image"].shape == (3, SIZE, SIZE) and sample["mask"].shape == (1, SIZE, SIZE)
    view = dataset.views[int(dataset.index[i, 0])]
    z = int(dataset.index[i, 1])
    stack = view.image_stack(z, -1000.0, 400.0, 1, 2)
    assert np.array_equal(stack[1], view.image_slice(z, -1000.0, 400.0))
    assert np.array_equal(stack[2], view.image_slice(min(z + 2, view.shape[0] - 1), -1000.0, 400.0))
    edge = view.image_stack(0, -1000.0, 400.0, 1, 2)
    assert np.array_equal(edge[0], edge[1]), "context is clamped at the first slice"
    item = dm.datasets["val"][0]
    assert item["image"].shape[1] == 3


def test_detection_only_mode_has_heatmaps_but_no_masks(lidc_root, lidc_cache) -> None:
    dm = make_datamodule(lidc_root, lidc_cache, masks="none", augment=False)
    assert not dm.has_masks
    dm.setup("fit")
    dataset = dm.datasets["train"]
    i = int(np.flatnonzero(dataset.nodule_slices)[0])
    sample = dataset.sample(i)
    assert not bool(sample["has_mask"]) and float(sample["mask"].sum()) == 0.0
    assert float(sample["heatmap"].max()) == 1.0, "sphere cross-sections still give heatmap centres"
    assert dm.datasets["val"][0]["labels"] is None


def test_nodule_slices_are_oversampled(fit_datamodule) -> None:
    loader = fit_datamodule.train_dataloader()
    flags = fit_datamodule.datasets["train"].nodule_slices
    assert flags.mean() < 0.3, "few slices hold a nodule, so uniform sampling would rarely show one"
    drawn = np.fromiter(iter(loader.sampler), dtype=np.int64)
    assert len(drawn) == len(flags)
    draws = np.concatenate([drawn] + [np.fromiter(iter(loader.sampler), dtype=np.int64) for _ in range(5)])
    assert flags[draws].mean() == pytest.approx(0.5, abs=0.08)


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        GlanceDataModule(image_size=100)
    with pytest.raises(ValueError, match="masks"):
        GlanceDataModule(masks="reader1")
    with pytest.raises(ValueError, match="nodule_fraction"):
        GlanceDataModule(nodule_fraction=1.5)


# ------------------------------------------------------------------------------------ augmentation


def _planted_disk(size: int, cy: float, cx: float, radius: float) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:size, :size]
    disk = ((yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2).astype(np.uint8)
    return 0.1 + 0.7 * disk.astype(np.float32), disk


@pytest.mark.parametrize("elastic", [False, True])
def test_augmentation_keeps_image_mask_and_heatmap_aligned(elastic: bool) -> None:
    from lungseg.losses import gaussian_center_heatmap

    size, cy, cx, radius = 96, 38.0, 55.0, 9.0
    image, mask = _planted_disk(size, cy, cx, radius)
    augment = SliceAugment(size, elastic=elastic, p_affine=1.0, p_elastic=1.0 if elastic else 0.0)
    # The peak is snapped to a pixel (≤ 0.5 px) and an elastic field moves the disk's centroid a little
    # differently from its centre point (it is not rigid), hence the looser bound with elastic.
    tolerance = 1.5 if elastic else 1.0
    moved = 0.0
    for seed in range(8):
        out_image, out_mask, centres, diameters = augment(image, mask, [(cy, cx)], [2 * radius], seed)
        heatmap = gaussian_center_heatmap((size, size), centres, diameters)
        ys, xs = np.nonzero(out_mask)
        bright_y, bright_x = np.nonzero(out_image > 0.45)
        peak = np.unravel_index(np.argmax(heatmap), heatmap.shape)
        assert heatmap.max() == 1.0
        assert abs(ys.mean() - peak[0]) <= tolerance and abs(xs.mean() - peak[1]) <= tolerance, "peak on mask"
        assert abs(bright_y.mean() - ys.mean()) <= 0.6 and abs(bright_x.mean() - xs.mean()) <= 0.6
        area_diameter = 2 * math.sqrt(ys.size / math.pi)
        assert diameters[0] == pytest.approx(area_diameter, rel=0.12), "heatmap size follows the warped disk"
        moved = max(moved, math.hypot(peak[0] - cy, peak[1] - cx))
    assert moved > 1.0, "the augmentation actually moved the disk"


def test_augmentation_is_seeded() -> None:
    image, mask = _planted_disk(64, 30, 30, 6)
    augment = SliceAugment(64)
    first = augment(image, mask, [(30.0, 30.0)], [12.0], 123)
    again = augment(image, mask, [(30.0, 30.0)], [12.0], 123)
    assert np.array_equal(first[0], again[0]) and first[2] == again[2]


def test_lndb_masks_come_from_the_reader_segmentations(tmp_path) -> None:
    from common.synth.lndb import make_lndb

    make_lndb(tmp_path / "lndb", n_scans=1, seed=0)
    dm = GlanceDataModule(
        dataset="lndb", root=str(tmp_path / "lndb"), cache_dir=str(tmp_path / "cache"), image_size=SIZE
    )
    assert dm.has_masks
    dm.prepare_data()
    cache = PreprocessedCache(tmp_path / "cache")
    store = NoduleMaskStore(cache)
    (uid,) = cache.uids
    labels, label_of = store.load(uid)
    voxels = store.meta(uid)["voxels"]
    segmented = [n for n in cache.entry(uid)["nodules"] if voxels[n["nodule_id"]] > 0]
    assert segmented, "the synthetic LNDb scan has segmented nodules"
    for nodule in segmented:
        zyx = tuple(np.round(nodule["voxel_zyx"]).astype(int))
        assert labels[zyx] == label_of[nodule["nodule_id"]]
