"""The cache-backed base datamodule: cache built once, split saved and reused, parts never share a patient."""

from __future__ import annotations

import json

import pytest
from torch.utils.data import Dataset

from common.lightning.datamodule import CacheDataModule
from common.synth import make_luna16


class UidDataset(Dataset):
    def __init__(self, uids):
        self.uids = list(uids)

    def __len__(self):
        return len(self.uids)

    def __getitem__(self, i):
        return self.uids[i]


class UidDataModule(CacheDataModule):
    def build_dataset(self, part, uids, cache):
        return UidDataset(uids)


@pytest.fixture(scope="module")
def luna_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("luna16")
    make_luna16(root, n_scans=4, seed=3, size="small")
    return root


def test_cache_split_and_parts(luna_tree, tmp_path):
    dm = UidDataModule(
        root=str(luna_tree), cache_dir=str(tmp_path / "cache"), split="ratio", ratios=(0.5, 0.25, 0.25)
    )
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    parts = {k: set(v) for k, v in dm.uids.items()}
    assert sum(len(v) for v in parts.values()) == 4
    assert not (parts["train"] & parts["test"]) and not (parts["train"] & parts["val"])
    split_file = tmp_path / "cache" / "split_ratio_seed0.json"
    assert split_file.is_file()
    # a second module reuses the saved split and the built cache
    manifest_before = (tmp_path / "cache" / "manifest.json").read_text()
    again = UidDataModule(root=str(luna_tree), cache_dir=str(tmp_path / "cache"), split="ratio", seed=0)
    again.prepare_data()
    again.setup("fit")
    assert again.uids == dm.uids
    assert json.loads((tmp_path / "cache" / "manifest.json").read_text()) == json.loads(manifest_before)
    assert len(dm.train_dataloader().dataset) == len(parts["train"])


def test_luna16_subset_folds_rotate(luna_tree, tmp_path):
    dm = UidDataModule(root=str(luna_tree), cache_dir=str(tmp_path / "cache"), split="luna16_subsets", fold=1)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.uids["test"]) >= 1 and len(dm.uids["val"]) >= 1
    assert not set(dm.uids["test"]) & set(dm.uids["train"])


def test_missing_root_names_the_environment_variable(monkeypatch):
    monkeypatch.delenv("LUNA16_ROOT", raising=False)
    dm = UidDataModule(root=None)
    with pytest.raises(FileNotFoundError, match="LUNA16_ROOT.*lungdata synth luna16"):
        dm.prepare_data()


def test_predict_folder_of_scans(luna_tree, tmp_path):
    dm = UidDataModule(
        root=str(luna_tree), cache_dir=str(tmp_path / "cache"), predict_root=str(luna_tree / "subset0")
    )
    dm.prepare_data()
    dm.setup("predict")
    assert len(dm.datasets["predict"]) == len(list((luna_tree / "subset0").glob("*.mhd")))
