"""lungcls data: crop geometry, the native-resolution patch cache, splits, augmentation, few-shot, pathology."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from common.datasets.registry import open_dataset
from common.io import read_volume
from lungcls.data import (
    FewShotPatchDataModule,
    NodulePatchDataModule,
    PatchAugmentation,
    normalize_hu,
)
from lungcls.patches import AIR_HU, PatchCache, PatchSettings, context_for, crop_block, nested_crops
from lungcls.pathology_data import PathologyImageDataModule

SIZES = {32: 8, 64: 12, 96: 16}
DEPTH = 8


def small_datamodule(root, cache, **kwargs) -> NodulePatchDataModule:
    """The reduced crops every lungcls test uses (8/12/16 in-plane × 8 slices)."""
    kwargs.setdefault("ratios", (0.5, 0.25, 0.25))
    kwargs.setdefault("stratify", False)
    return NodulePatchDataModule(
        root=str(root), cache_dir=str(cache), patch_sizes=SIZES, depth=DEPTH, batch_size=4, **kwargs
    )


# ------------------------------------------------------------------------------------------ geometry
def test_crop_block_centres_the_rounded_centroid_and_pads_with_air():
    array = np.arange(10 * 12 * 14, dtype=np.int16).reshape(10, 12, 14)
    block, offset = crop_block(array, (5.4, 6.6, 7.0), (4, 4, 4), boundary="pad")
    assert block[2, 2, 2] == array[5, 7, 7] and offset.tolist() == [0, 0, 0]
    edge, _ = crop_block(array, (0.0, 0.0, 0.0), (4, 4, 4), boundary="pad")
    assert edge[2, 2, 2] == array[0, 0, 0] and (edge[:2] == AIR_HU).all()


def test_shift_boundary_stays_inside_and_records_the_offset():
    array = np.arange(10 * 12 * 14, dtype=np.int16).reshape(10, 12, 14)
    block, offset = crop_block(array, (1.0, 1.0, 12.0), (4, 6, 6), boundary="shift")
    assert (block != AIR_HU).all(), "a block that fits the scan is moved inside it"
    centre = np.array(block.shape) // 2 + offset
    assert block[tuple(centre)] == array[1, 1, 12], "the offset points at the nodule voxel"
    crops = nested_crops(block, {1: 2}, 2, offset)
    assert crops[1].shape == (2, 2, 2)


def test_nested_crops_are_concentric_and_checked():
    block = np.random.default_rng(0).normal(size=(12, 20, 20))
    crops = nested_crops(block, {32: 4, 64: 8, 96: 12}, 6)
    assert {k: v.shape for k, v in crops.items()} == {32: (6, 4, 4), 64: (6, 8, 8), 96: (6, 12, 12)}
    np.testing.assert_array_equal(crops[96][:, 4:8, 4:8], crops[32])
    np.testing.assert_array_equal(crops[96][:, 2:10, 2:10], crops[64])
    with pytest.raises(ValueError, match="do not fit"):
        nested_crops(block, {96: 24}, 6)


def test_context_leaves_room_for_rotation_and_shift():
    context, depth = context_for(96, 56, rotation=True, max_shift=2, z_margin=2)
    assert context >= 96 * 2**0.5 + 4 and context % 2 == 0 and depth == 60


def test_augmentation_keeps_the_nodule_at_the_centre_of_every_scale():
    block = np.full((12, 40, 40), -800.0, dtype=np.float32)
    centre = np.array([6, 26, 14])  # off-centre nodule: rotation must carry it along
    block[:, 25:28, 13:16] = 300.0
    augment = PatchAugmentation(
        flip_p=1.0, affine_p=1.0, perspective_p=0.0, tps_p=0.0, max_shift=0, z_shift=0
    )
    for seed in range(5):
        warped, moved = augment(block, centre, seed)
        crops = nested_crops(
            warped, {32: 6, 96: 14}, 6, np.rint(moved - np.array(warped.shape) // 2).astype(int)
        )
        assert crops[32][3, 3, 3] > 0, f"seed {seed}: the bright nodule left the centre of the small crop"
        np.testing.assert_array_equal(crops[96][:, 4:10, 4:10], crops[32])


def test_normalize_hu_options():
    hu = np.array([-2000.0, -1000.0, -300.0, 400.0, 1000.0])
    np.testing.assert_array_equal(normalize_hu(hu, "none", (-1000, 400)), hu.astype(np.float32))
    np.testing.assert_allclose(normalize_hu(hu, "window", (-1000, 400)), [0, 0, 0.5, 1, 1])
    with pytest.raises(ValueError, match="normalization"):
        normalize_hu(hu, "zscore", (-1000, 400))


# ------------------------------------------------------------------------------------------ cache
def test_patch_cache_reads_native_resolution_at_the_reader_averaged_centroid(lidc_tree, patch_cache_dir):
    cache = PatchCache(patch_cache_dir)
    table = cache.table
    records = open_dataset("lidc", lidc_tree).records
    assert len(table) == sum(len(r.nodules) for r in records)
    row = table.iloc[0]
    record = next(r for r in records if r.uid == row["uid"])
    nodule = next(n for n in record.nodules if str(n.nodule_id) == row["nodule_id"])
    np.testing.assert_allclose(
        [row["centre_z"], row["centre_y"], row["centre_x"]], nodule.extras["voxel_zyx"], atol=0.01
    )
    volume = read_volume(record.image_path, record.series_uid)
    assert row["spacing_z"] == pytest.approx(volume.spacing[2]) and row["spacing_z"] > 1.0, "not resampled"
    block = cache.load(row["key"])
    settings = cache.settings()
    assert (
        block.shape == (settings.context_depth, settings.context, settings.context)
        and block.dtype == np.int16
    )
    centre = np.array(block.shape) // 2 + np.array([row["offset_z"], row["offset_y"], row["offset_x"]])
    voxel = np.floor(np.array(nodule.extras["voxel_zyx"]) + 0.5).astype(int)
    assert block[tuple(centre)] == volume.array[tuple(voxel)], "native HU at the centroid voxel"


def test_patch_cache_rebuild_reads_only_what_changed(lidc_tree, tmp_path):
    records = open_dataset("lidc", lidc_tree).records[:2]
    reads = []

    def read(record):
        reads.append(record.uid)
        return read_volume(record.image_path, record.series_uid)

    cache = PatchCache(tmp_path)
    settings = PatchSettings(context=20, context_depth=10)
    first = cache.build(records, settings, read_fn=read)
    assert len(reads) == 2
    cache.build(records, settings, read_fn=read)
    assert len(reads) == 2, "an unchanged dataset reads no scan"
    (tmp_path / "patches" / first.iloc[0]["file"]).unlink()
    cache.build(records, settings, read_fn=read)
    assert reads[2:] == [first.iloc[0]["uid"]], "a missing patch re-reads its scan only"
    cache.build(records, PatchSettings(context=24, context_depth=10), read_fn=read)
    assert len(reads) == 5, "new settings re-crop everything"
    manifest = json.loads((tmp_path / "patch_manifest.json").read_text(encoding="utf-8"))
    assert manifest["settings"]["context"] == 24


def test_unreadable_scan_is_named_or_skipped(lidc_tree, tmp_path):
    records = open_dataset("lidc", lidc_tree).records[:2]

    def broken(record):
        raise ValueError("truncated pixel data")

    with pytest.raises(ValueError, match=f"{records[0].image_path}.*truncated"):
        PatchCache(tmp_path / "a").build(records, PatchSettings(20, 10), read_fn=broken)
    table = PatchCache(tmp_path / "b").build(records, PatchSettings(20, 10), read_fn=broken, strict=False)
    assert table.empty


def test_missing_root_names_the_environment_variable(monkeypatch, tmp_path):
    monkeypatch.delenv("LIDC_ROOT", raising=False)
    with pytest.raises(FileNotFoundError, match="LIDC_ROOT.*lungdata synth lidc"):
        NodulePatchDataModule(root=None).prepare_data()


# ------------------------------------------------------------------------------------------ datamodule
def test_patient_level_split_is_saved_and_batches_are_nested(lidc_tree, patch_cache_dir):
    dm = small_datamodule(lidc_tree, patch_cache_dir, normalization="window")
    dm.setup("fit")
    dm.setup("test")
    patients = {p: set(dm.table(p)["patient_id"]) for p in ("train", "val", "test")}
    assert not patients["train"] & patients["test"] and not patients["train"] & patients["val"]
    assert (patch_cache_dir / "split_patient_seed0.json").is_file()
    again = small_datamodule(lidc_tree, patch_cache_dir)
    again.setup("test")
    assert list(again.table("test")["key"]) == list(dm.table("test")["key"]), "the saved split is reused"
    batch = next(iter(dm.train_dataloader()))
    assert {k: tuple(v.shape) for k, v in batch["patches"].items()} == {
        32: (4, 1, 8, 8, 8),
        64: (4, 1, 8, 12, 12),
        96: (4, 1, 8, 16, 16),
    }
    assert batch["label"].dtype == torch.long and 0.0 <= float(batch["patches"][96].min())
    assert float(batch["patches"][96].max()) <= 1.0
    val = next(iter(dm.val_dataloader()))
    np.testing.assert_array_equal(
        val["patches"][96][:, :, :, 4:12, 4:12], val["patches"][64][:, :, :, 2:10, 2:10]
    )


def test_nodule_level_split_and_native_hu(lidc_tree, patch_cache_dir):
    dm = small_datamodule(lidc_tree, patch_cache_dir, split_level="nodule", augment=False)
    dm.setup("test")
    keys = {p: set(dm.table(p)["key"]) for p in ("train", "val", "test")}
    assert sum(map(len, keys.values())) == len(dm.labelled_table()) and not keys["train"] & keys["test"]
    sample = dm.datasets["test"][0]
    assert float(sample["patches"][96].min()) < -500.0, "normalization none keeps HU"


def test_few_shot_pairs_replay_and_disjoint_test_patients(lidc_tree, patch_cache_dir):
    dm = FewShotPatchDataModule(
        root=str(lidc_tree),
        cache_dir=str(patch_cache_dir),
        source_root=str(lidc_tree),
        source_cache_dir=str(patch_cache_dir),
        patch_sizes=SIZES,
        depth=DEPTH,
        pairs=1,
        replay_pairs=1,
        ratios=(0.5, 0.25, 0.25),
        stratify=False,
        batch_size=4,
    )
    dm.setup("fit")
    dm.setup("test")
    finetune, test = dm.tables["train"], dm.table("test")
    assert sorted((finetune["label"] > 0).astype(int)) == [0, 1]
    assert sorted((dm.tables["replay"]["label"] > 0).astype(int)) == [0, 1]
    assert not set(finetune["patient_id"]) & set(test["patient_id"])
    assert len(dm.datasets["train"]) == 4 and len(dm.table("train")) == 4
    with pytest.raises(ValueError, match="needs 50 positive"):
        FewShotPatchDataModule(
            root=str(lidc_tree), cache_dir=str(patch_cache_dir), patch_sizes=SIZES, depth=DEPTH, pairs=50
        ).setup("fit")


# ------------------------------------------------------------------------------------------ pathology
def test_pathology_images_patient_level_validation_and_tensors(ldfc_tree, tmp_path):
    dm = PathologyImageDataModule(
        root=str(ldfc_tree), img_size=32, in_chans=3, val_fraction=0.3, batch_size=4
    )
    dm.setup("fit")
    dm.setup("test")
    assert dm.num_classes == 3 and dm.class_names[0] == "benign"
    train_patients = {s.patient_id for s in dm.samples["train"]}
    assert train_patients and not train_patients & {s.patient_id for s in dm.samples["val"]}
    assert len(dm.samples["test"]) == 3
    batch = next(iter(dm.train_dataloader()))
    assert tuple(batch["image"].shape) == (4, 3, 32, 32) and batch["image"].abs().max() <= 1.0
    folder = tmp_path / "new"
    folder.mkdir()
    (folder / "a.bmp").write_bytes(
        next((ldfc_tree / "BMP_classification" / "test").rglob("*.bmp")).read_bytes()
    )
    pred = PathologyImageDataModule(root=str(ldfc_tree), img_size=32, predict_root=str(folder))
    pred.setup("predict")
    assert len(pred.datasets["predict"]) == 1


def test_pathology_crop_is_centred_on_the_annotated_nodule(ldfc_tree):
    import json

    manifest = json.loads((ldfc_tree / "synth_manifest.json").read_text())
    centres = {
        (s["uid"], k): tuple(n["voxel_zyx"][1:])
        for s in manifest["scans"]
        for k, n in enumerate(s["nodules"])
    }
    dm = PathologyImageDataModule(root=str(ldfc_tree), img_size=16, val_fraction=0.0, crop=8, batch_size=4)
    dm.setup("fit")
    for sample in dm.samples["train"] + dm.samples["test"]:
        scan, _z, k = sample.path.stem.split("_")
        # the voxel table stores the box centre, within a voxel of the mask centroid the manifest gives
        assert np.allclose(dm.centres[sample.path], centres[(scan, int(k))], atol=1.5)
    ds = dm.datasets["train"]
    crop = ds.cropped(0)
    y, x = (round(v) for v in dm.centres[ds.samples[0].path])
    assert crop.shape == (8, 8) and np.array_equal(crop[3:5, 3:5], ds.image(0)[y - 1 : y + 1, x - 1 : x + 1])
    assert tuple(next(iter(dm.train_dataloader()))["image"].shape) == (4, 3, 16, 16)
