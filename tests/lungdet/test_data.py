"""lungdet.data: prepared scans, stage-1 crops (geometry of scaling/flips, coordinates, determinism),
stage-2 candidate tables and 1:3 crops, and the datamodules on a synthetic LUNA16 tree."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from common.datasets.luna16 import LUNA16Dataset
from common.preprocess import CLAF_WINDOW
from lungdet.candidates import candidate_table
from lungdet.data import (
    CandidateCropDataset,
    CandidateDataModule,
    EpochSampler,
    FPRCropDataset,
    FPRDataModule,
    ScanDataset,
)
from lungdet.models import coordinate_maps, crop_candidates
from lungdet.scan_reader import ScanReader, dilate_mask, fill_value


@pytest.fixture(scope="module")
def reader(luna_cache) -> ScanReader:
    return ScanReader(luna_cache, lung_margin=3)


def _prepared_by_hand(image: np.ndarray, mask: np.ndarray, margin: int, outside_hu: float) -> np.ndarray:
    inside = ndimage.binary_dilation(mask > 0, structure=np.ones((3, 3, 3), bool), iterations=margin)
    hu = np.where(inside, image.astype(np.float32), outside_hu)
    lo, hi = CLAF_WINDOW
    return np.clip((hu - lo) / (hi - lo), 0, 1).astype(np.float32)


def test_prepared_scan_is_windowed_masked_and_padded_with_the_fill(reader, luna_cache):
    uid = luna_cache.uids[0]
    image, mask, _ = luna_cache.load(uid)
    expected = _prepared_by_hand(np.asarray(image), np.asarray(mask), 3, 0.0)
    whole = reader.whole(uid)
    np.testing.assert_allclose(whole, expected, atol=1e-6)
    assert 0.0 < float((whole == np.float32(fill_value())).mean()) < 1.0
    # a box sticking out of the scan: the overlap equals the whole scan, the rest is the fill value
    box = reader.region(uid, (-4, 10, image.shape[2] - 8), (16, 16, 16))
    np.testing.assert_allclose(box[4:, :, :8], whole[:12, 10:26, -8:], atol=1e-6)
    assert np.all(box[:4] == np.float32(fill_value())) and np.all(box[:, :, 8:] == np.float32(fill_value()))
    assert fill_value() == pytest.approx(1200 / 1800)


def test_cube_dilation_equals_iterated_binary_dilation():
    rng = np.random.default_rng(0)
    mask = rng.random((20, 21, 22)) > 0.97
    ours = dilate_mask(mask, 2)
    ref = ndimage.binary_dilation(mask, structure=np.ones((3, 3, 3), bool), iterations=2)
    assert np.array_equal(ours, ref)


@pytest.fixture(scope="module")
def crops(reader, luna_cache) -> CandidateCropDataset:
    return CandidateCropDataset(
        reader, luna_cache.uids, (32, 32, 32), 64, pos_fraction=0.5, pos_margin=6, seed=1
    )


def test_crop_voxels_are_the_scan_sampled_at_the_planned_positions(reader, luna_cache):
    """Scaled, unflipped crop voxel i must equal the prepared scan trilinearly sampled at origin + i / s."""
    crops = CandidateCropDataset(reader, luna_cache.uids, (32, 32, 32), 8, pos_margin=6, flip=False, seed=1)
    checked = 0
    for index in range(6):
        plan = crops.plan((index, 0))
        sample = crops[(index, 0)]
        uid, origin, scale = plan["uid"], plan["origin"], plan["scale"]
        whole = reader.whole(uid)
        grid = np.stack(
            np.meshgrid(*[origin[a] + np.arange(32) / scale for a in range(3)], indexing="ij"), axis=0
        )
        inside = np.all([(grid[a] >= 0) & (grid[a] <= whole.shape[a] - 1) for a in range(3)], axis=0)
        expected = ndimage.map_coordinates(whole, grid.reshape(3, -1), order=1).reshape(32, 32, 32)
        got = sample["image"][0].numpy()
        np.testing.assert_allclose(got[inside], expected[inside], atol=1e-5)
        # boxes: a nodule's scan position maps to origin + box / s
        nodules = crops.nodules[uid]
        np.testing.assert_allclose(
            origin + sample["boxes"][:, :3].numpy().astype(np.float64) / scale, nodules[:, 3:6], atol=1e-4
        )
        np.testing.assert_allclose(sample["boxes"][:, 3].numpy(), nodules[:, 6] * scale, rtol=1e-5)
        checked += 1
    assert checked >= 3


def test_positive_crops_hold_their_nodule_inside_the_margin(crops):
    positives = 0
    for index in range(64):
        plan = crops.plan((index, 2))
        if not plan["positive"]:
            continue
        positives += 1
        boxes = crops[(index, 2)]["boxes"]
        inside = ((boxes[:, :3] >= 6 - 1e-4) & (boxes[:, :3] <= 32 - 1 - 6 + 1e-4)).all(dim=1)
        assert bool(inside.any()), f"sample {index}: no nodule inside the margin, boxes {boxes}"
    assert 16 <= positives <= 48, "pos_fraction 0.5 of 64 samples"


def test_flip_mirrors_image_boxes_and_coordinates(reader, luna_cache):
    plain = CandidateCropDataset(reader, luna_cache.uids, (32, 32, 32), 8, flip=False, seed=4)
    flipped = CandidateCropDataset(reader, luna_cache.uids, (32, 32, 32), 8, flip=True, seed=4)
    for index in range(8):
        plan = flipped.plan((index, 0))
        if not plan["flips"].any():
            continue
        a, b = plain[(index, 0)], flipped[(index, 0)]
        axes = [int(k) + 1 for k in np.flatnonzero(plan["flips"])]
        assert torch.equal(b["image"], torch.flip(a["image"], axes))
        for k in np.flatnonzero(plan["flips"]):
            assert torch.allclose(b["boxes"][:, k], 31 - a["boxes"][:, k])
        # coordinates of the flipped crop = the crop of the mirrored patient: −(original, flipped)
        ca = coordinate_maps(a["start"], (32, 32, 32), a["scan_shape"])
        cb = coordinate_maps(b["start"], (32, 32, 32), b["scan_shape"])
        for k in range(3):
            if plan["flips"][k]:
                assert torch.allclose(cb[k], -torch.flip(ca[k], [k]), atol=1e-5)
            else:
                assert torch.allclose(cb[k], ca[k], atol=1e-6)
        return
    pytest.fail("no flipped sample among the first 8")


def test_samples_depend_only_on_seed_epoch_and_index(crops, reader, luna_cache):
    again = CandidateCropDataset(
        reader, luna_cache.uids, (32, 32, 32), 64, pos_fraction=0.5, pos_margin=6, seed=1
    )
    a, b = crops[(5, 3)], again[(5, 3)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["boxes"], b["boxes"])
    assert not torch.equal(crops[(5, 4)]["image"], a["image"])
    s1, s2 = EpochSampler(64, seed=7), EpochSampler(64, seed=7)
    s1.set_epoch(2), s2.set_epoch(2)
    order = list(s1)
    assert (
        order == list(s2) and sorted(i for i, _ in order) == list(range(64)) and {e for _, e in order} == {2}
    )
    s2.set_epoch(3)
    assert [i for i, _ in s2] != [i for i, _ in order]


def test_epoch_sampler_shares_an_epoch_between_ranks():
    shares = []
    for rank in range(2):
        sampler = EpochSampler(10, seed=0)
        sampler.num_replicas, sampler.rank = 2, rank
        sampler.num_samples, sampler.total_size = 5, 10
        shares.append([i for i, _ in sampler])
    assert sorted(shares[0] + shares[1]) == list(range(10))


def test_candidate_labels_follow_the_luna16_hit_rule(reader, luna_cache, luna_tree):
    listed = LUNA16Dataset(luna_tree).candidates()
    table = candidate_table(reader, luna_cache.uids, dataset_candidates=listed)
    assert len(table) == len(listed)
    merged = table.merge(listed, on=["seriesuid", "coordX", "coordY", "coordZ"])
    # the generator's class 1 = jittered around an accepted nodule, inside its radius
    assert (merged.loc[merged["class"] == 1, "label"] == 1).all()
    assert (merged.loc[(merged["class"] == 0) & ~merged["ignore"], "label"] == 0).all()
    assert merged["ignore"].any(), "the synthetic list has candidates on excluded findings"
    # voxel positions are the world positions on the cached grid (flipped scans included)
    for uid, frame in table.groupby("seriesuid"):
        from lungdet.inference import candidates_to_world

        world = candidates_to_world(frame[["vz", "vy", "vx"]].to_numpy(), reader.entry(uid))
        np.testing.assert_allclose(world, frame[["coordX", "coordY", "coordZ"]].to_numpy(), atol=1e-6)


def test_stage1_results_csv_becomes_candidates_with_scores(reader, luna_cache, tmp_path):
    uid = luna_cache.uids[1]
    nodule = reader.entry(uid)["nodules"][0]
    csv = tmp_path / "stage1.csv"
    pd.DataFrame(
        [[uid, *nodule["world_xyz"], 0.9], [uid, nodule["world_xyz"][0] + 30, *nodule["world_xyz"][1:], 0.2]],
        columns=["seriesuid", "coordX", "coordY", "coordZ", "probability"],
    ).to_csv(csv, index=False)
    table = candidate_table(reader, [uid], csv_paths=[csv])
    assert table["stage1"].tolist() == [0.9, 0.2] and table["label"].tolist() == [1, 0]
    bad = tmp_path / "bad.csv"
    bad.write_text("seriesuid,coordX,coordY,coordZ,probability\nabc,1,2,oops,0.5\n")
    with pytest.raises(ValueError, match="bad.csv"):
        candidate_table(reader, [uid], csv_paths=[bad])


def test_fpr_crops_keep_one_true_to_three_false(reader, luna_cache, luna_tree):
    table = candidate_table(reader, luna_cache.uids, dataset_candidates=LUNA16Dataset(luna_tree).candidates())
    data = FPRCropDataset(reader, table, samples_per_epoch=40, max_shift=0, flip=False, rotate=False, seed=0)
    labels = [int(data[(i, 1)]["label"]) for i in range(40)]
    assert labels == [1, 0, 0, 0] * 10
    # without augmentation a crop is exactly crop_candidates on the prepared scan
    sample = data[(0, 1)]
    rng = np.random.default_rng([0, 1, 0])
    uid, *centre = data.positives[int(rng.integers(len(data.positives)))]
    expected = crop_candidates(torch.from_numpy(reader.whole(uid)), [centre], pad_value=fill_value())
    assert torch.allclose(sample["image"], expected[0])
    rotating = FPRCropDataset(
        reader, table, samples_per_epoch=8, max_shift=0, flip=False, rotate=True, seed=0
    )
    rotated = rotating[(0, 1)]["image"][0]
    assert any(torch.equal(torch.rot90(sample["image"][0], k, (1, 2)), rotated) for k in range(4))


def test_fpr_false_crops_come_from_stage1_candidates_in_the_given_share(
    reader, luna_cache, luna_tree, tmp_path
):
    uid = luna_cache.uids[1]
    nodule = reader.entry(uid)["nodules"][0]
    csv = tmp_path / "stage1.csv"
    pd.DataFrame(
        [[uid, nodule["world_xyz"][0] + 30, *nodule["world_xyz"][1:], 0.4]],
        columns=["seriesuid", "coordX", "coordY", "coordZ", "probability"],
    ).to_csv(csv, index=False)
    dataset = LUNA16Dataset(luna_tree).candidates()
    table = candidate_table(reader, luna_cache.uids, csv_paths=[csv], dataset_candidates=dataset)
    proposed = table[table["stage1"].notna()]
    assert len(proposed) == 1 and len(table) > 10

    hard = crop_candidates(
        torch.from_numpy(reader.whole(uid)),
        proposed[["vz", "vy", "vx"]].to_numpy(float),
        pad_value=fill_value(),
    )[0]

    def false_centres(fraction: float) -> list[bool]:
        """For each false crop of an epoch: is it the stage-1 false candidate?"""
        data = FPRCropDataset(
            reader, table, samples_per_epoch=80, max_shift=0, flip=False, rotate=False, seed=0,
            stage1_negative_fraction=fraction,
        )  # fmt: skip
        return [torch.equal(data[(i, 2)]["image"], hard) for i in range(80) if i % 4]

    assert all(false_centres(1.0))
    share = np.mean(false_centres(0.5))
    assert 0.3 < share < 0.7
    assert np.mean(false_centres(0.0)) < 0.1
    with pytest.raises(ValueError, match="stage1_negative_fraction"):
        FPRCropDataset(reader, table, stage1_negative_fraction=1.5)


def test_fpr_training_needs_both_classes(reader, luna_cache, luna_tree):
    table = candidate_table(reader, luna_cache.uids, dataset_candidates=LUNA16Dataset(luna_tree).candidates())
    with pytest.raises(ValueError, match="true and false candidates"):
        FPRCropDataset(reader, table[table["label"] == 0])


def test_datamodules_build_parts_and_batches(luna_tree, luna_cache):
    common = {
        "root": str(luna_tree),
        "cache_dir": str(luna_cache.root),
        "split": "ratio",
        "ratios": (0.5, 0.25, 0.25),
    }
    dm = CandidateDataModule(crop_size=32, samples_per_epoch=4, batch_size=2, lung_margin=3, **common)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 1, 32, 32, 32) and len(batch["boxes"]) == 2
    assert batch["start"].dtype == torch.float64 and batch["scan_shape"].shape == (2, 3)
    scans = next(iter(dm.val_dataloader()))
    assert isinstance(scans, list) and scans[0]["image"].ndim == 3 and scans[0]["nodules"].shape[1] == 4
    assert isinstance(dm.datasets["val"], ScanDataset)

    fpr = FPRDataModule(samples_per_epoch=8, batch_size=4, lung_margin=3, **common)
    fpr.prepare_data()
    fpr.setup("fit")
    batch = next(iter(fpr.train_dataloader()))
    assert batch["image"].shape == (4, 1, 32, 48, 48) and set(batch["label"].tolist()) <= {0, 1}
    val = fpr.datasets["val"][0]
    assert val["candidates"].shape[1] == 3 and val["labels"].shape == val["stage1"].shape
    assert torch.isnan(val["stage1"]).all(), "candidates_V2 carries no stage-1 score"
    stage1 = FPRDataModule(eval_candidates="stage1", **common)
    stage1.prepare_data()
    stage1.setup("validate")
    assert "candidates" not in stage1.datasets["val"][0]


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="multiples of 32"):
        CandidateDataModule(crop_size=48)
    with pytest.raises(ValueError, match="no candidate source"):
        FPRDataModule(dataset_candidates=False)
    with pytest.raises(ValueError, match="eval_candidates"):
        FPRDataModule(eval_candidates="all")
