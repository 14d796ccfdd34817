"""`PartLoaderDataModule`: the one place every datamodule's loaders are built."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from common.cache import default_cache_dir, path_digest, predict_cache_dir
from common.lightning.datamodule import PartLoaderDataModule


class _Parts(PartLoaderDataModule):
    def __init__(self, n: int, batch_size: int, eval_batch_size: int | None, drop_last: bool) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.drop_last_train = drop_last
        self.num_workers = 0
        self.datasets = {p: TensorDataset(torch.arange(n)) for p in ("train", "val", "test", "predict")}


def _sizes(loader) -> list[int]:
    return [len(batch[0]) for batch in loader]


def test_eval_batch_size_applies_to_every_part_but_train():
    module = _Parts(n=7, batch_size=3, eval_batch_size=5, drop_last=False)
    assert _sizes(module.train_dataloader()) == [3, 3, 1]
    for loader in (module.val_dataloader(), module.test_dataloader(), module.predict_dataloader()):
        assert _sizes(loader) == [5, 2]
    assert _sizes(_Parts(n=7, batch_size=3, eval_batch_size=None, drop_last=False).val_dataloader()) == [
        3,
        3,
        1,
    ]


def test_drop_last_train_only_drops_a_short_last_training_batch():
    module = _Parts(n=7, batch_size=3, eval_batch_size=None, drop_last=True)
    assert _sizes(module.train_dataloader()) == [3, 3]
    assert _sizes(module.val_dataloader()) == [3, 3, 1]
    # a part smaller than one batch still yields its batch
    assert _sizes(_Parts(n=2, batch_size=3, eval_batch_size=None, drop_last=True).train_dataloader()) == [2]


def test_evaluation_parts_keep_their_order_and_training_shuffles():
    module = _Parts(n=64, batch_size=64, eval_batch_size=None, drop_last=False)
    torch.manual_seed(0)
    assert next(iter(module.val_dataloader()))[0].tolist() == list(range(64))
    assert next(iter(module.train_dataloader()))[0].tolist() != list(range(64))


def test_setup_parts_builds_what_each_stage_needs_once():
    module = _Parts(n=3, batch_size=2, eval_batch_size=None, drop_last=False)
    module.datasets = {}
    built: list[str] = []

    def dataset_for(part: str) -> TensorDataset:
        built.append(part)
        return TensorDataset(torch.zeros(1))

    module.setup_parts("fit", dataset_for)
    module.setup_parts("validate", dataset_for)
    module.setup_parts(None, dataset_for)
    module.setup_parts("test", dataset_for)
    module.setup_parts("predict", dataset_for)
    assert built == ["train", "val", "test", "predict"]
    assert sorted(module.datasets) == ["predict", "test", "train", "val"]


def test_path_digest_names_the_resolved_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    assert path_digest("a") == path_digest(tmp_path / "a") == path_digest(tmp_path / "a" / ".." / "a")
    assert len(path_digest("a")) == 8 and path_digest("a") != path_digest(tmp_path)


def test_predict_caches_are_named_by_the_default_cache_rule(tmp_path):
    """A folder of new scans is named like a dataset "predict" at that folder, beside a named cache or in
    cache/; kind and variant keep the preprocessed and the M³Net patch caches of one folder apart."""
    folder = tmp_path / "new"
    digest = path_digest(folder)
    assert predict_cache_dir(None, folder) == Path("cache") / f"predict-{digest}"
    assert predict_cache_dir(tmp_path / "c" / "luna", folder) == tmp_path / "c" / f"predict-{digest}"
    patches = predict_cache_dir(None, folder, kind="m3net", variant="140x60")
    assert patches == Path("cache") / f"m3net-predict-{digest}-140x60"
    assert patches.name == default_cache_dir("predict", folder, kind="m3net", variant="140x60").name
