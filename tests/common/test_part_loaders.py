"""`PartLoaderDataModule`: the one place every datamodule's loaders are built."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

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
