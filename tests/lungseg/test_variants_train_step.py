"""Every table-row config (configs/glance/*.yaml over configs/glance_lidc.yaml) instantiates through the
``lungseg`` CLI parser and runs one training step and one validation step on the synthetic LIDC tree."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lungseg.cli import GlanceCLI
from lungseg.data import GlanceDataModule
from lungseg.models import get_variant
from lungseg.task import GlanceTask
from tests.lungseg.conftest import BASE_CONFIG as BASE
from tests.lungseg.conftest import REPO, SIZE, small_config_text

ROW_CONFIGS = sorted((REPO / "configs" / "glance").glob("*.yaml"))


@pytest.fixture(scope="module")
def small_config(tmp_path_factory, lidc_root, lidc_cache) -> Path:
    path = tmp_path_factory.mktemp("glance_cfg") / "small.yaml"
    path.write_text(small_config_text(lidc_root, lidc_cache, path.parent / "runs", logger=False))
    return path


def test_every_preset_has_a_row_config() -> None:
    from lungseg.models import VARIANTS

    assert sorted(p.stem for p in ROW_CONFIGS) == sorted(VARIANTS)


@pytest.mark.parametrize("config", ROW_CONFIGS, ids=lambda p: p.stem)
def test_row_config_trains_and_validates(config: Path, small_config: Path, train_batch, val_item) -> None:
    cli = GlanceCLI(
        GlanceTask,
        GlanceDataModule,
        args=["--config", str(BASE), "--config", str(config), "--config", str(small_config)],
        run=False,
    )
    task: GlanceTask = cli.model
    preset = get_variant(config.stem)
    assert task.variant.name == config.stem and cli.datamodule.image_size == task.image_size == SIZE
    heads = preset.model.get("heads", ("seg", "heatmap"))
    assert task.model.heads == tuple(heads)
    assert task.criterion.lambda_det == preset.loss.get("lambda_det", 0.3)

    optimization = task.configure_optimizers()
    optimizer = optimization["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["lr"] == 1e-4 and optimizer.param_groups[0]["weight_decay"] == 0.05
    assert optimization["lr_scheduler"]["scheduler"].T_0 == 20

    task.train()
    before = [p.detach().clone() for p in task.model.parameters()]
    terms = task.compute_loss(task(train_batch["image"]), train_batch)
    assert torch.isfinite(terms["loss"])
    assert ("dice" in terms) == ("seg" in heads) and ("focal" in terms) == ("heatmap" in heads)
    optimizer.zero_grad()
    terms["loss"].backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, task.model.parameters()))

    task.eval()
    with torch.no_grad():
        task.validation_step([val_item], 0)
    metrics = task.metrics_for("val")
    froc = metrics["froc"].compute()
    assert set(froc) >= {"cpm", "sens@1", "sens@4"} and 0.0 <= float(froc["cpm"]) <= 1.0
    if "seg" in heads:
        dice = metrics["seg"].compute()["dice"]
        assert 0.0 <= float(dice) <= 1.0
    else:
        assert not metrics["seg"].update_called
    metrics.reset()


@pytest.mark.parametrize(
    "name, dataset, masks, split",
    [
        ("glance_lidc", "lidc", True, "ratio"),
        ("glance_lndb", "lndb", True, "ratio"),
        ("glance_luna16", "luna16", False, "luna16_subsets"),
        ("glance_tianchi", "tianchi", False, "ratio"),
    ],
)
def test_dataset_configs_parse(name: str, dataset: str, masks: bool, split: str, tmp_path) -> None:
    cli = GlanceCLI(
        GlanceTask,
        GlanceDataModule,
        args=["--config", str(REPO / "configs" / f"{name}.yaml"), f"--trainer.default_root_dir={tmp_path}"],
        run=False,
    )
    dm, task = cli.datamodule, cli.model
    assert dm.dataset_name == dataset and dm.has_masks == masks and dm.split_kind == split
    assert dm.image_size == task.image_size == 512 and dm.batch_size == 8
    assert task.hparams.lr == 1e-4 and task.hparams.weight_decay == 0.05 and task.hparams.t0 == 20
    assert task.variant.name == "full"
