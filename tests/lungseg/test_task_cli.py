"""``lungseg`` end to end on the synthetic LIDC tree: fit (fast_dev_run and one short epoch), test, predict,
``lungdata evaluate-froc`` on the prediction folder, checkpoint reload, detection-only data, complexity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from common.cache import PreprocessedCache
from common.cli import main as lungdata
from common.io import read_volume
from lungseg.cli import main as lungseg
from lungseg.cli import model_from_configs
from lungseg.task import GlanceTask
from tests.lungseg.conftest import BASE_CONFIG, REPO, SIZE, SMALL_MODEL, make_datamodule, small_config_text


@pytest.fixture(scope="module")
def cli_config(tmp_path_factory, lidc_root, lidc_cache) -> Path:
    path = tmp_path_factory.mktemp("glance_cli") / "tiny.yaml"
    path.write_text(small_config_text(lidc_root, lidc_cache, path.parent / "runs", logger=True))
    return path


def _args(config: Path, *extra: str) -> list[str]:
    return ["--config", str(BASE_CONFIG), "--config", str(config), *extra]


@pytest.fixture(scope="module")
def trained_run(cli_config: Path) -> Path:
    """One short epoch: 2 training batches, then validation on the validation scan; returns the run folder."""
    args = _args(cli_config, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--run_name=short")
    assert lungseg(["fit", *args]) == 0
    runs = sorted((cli_config.parent / "runs" / "short").glob("version_*"))
    return runs[-1]


def test_fit_fast_dev_run(cli_config: Path) -> None:
    assert lungseg(["fit", *_args(cli_config, "--trainer.fast_dev_run=1", "--run_name=devrun")]) == 0


def test_fit_logs_validation_metrics_and_saves_the_run(trained_run: Path) -> None:
    assert (trained_run / "checkpoints" / "last.ckpt").is_file()
    config = (trained_run / "config.yaml").read_text()
    assert "lungseg.task.GlanceTask" in config and f"image_size: {SIZE}" in config
    metrics = pd.read_csv(trained_run / "metrics.csv")
    for name in ("val/dice", "val/iou", "val/seg_sensitivity", "val/cpm", "val/sens@4", "val/precision",
                 "val/recall", "val/f1", "val/fp", "train/dice", "train/focal"):  # fmt: skip
        assert name in metrics.columns, name
    assert metrics["val/cpm"].dropna().between(0, 1).all()


def test_checkpoint_reloads_on_the_concrete_class(trained_run: Path) -> None:
    task = GlanceTask.load_from_checkpoint(trained_run / "checkpoints" / "last.ckpt", weights_only=False)
    assert task.variant.name == "full" and task.hparams.model_overrides["widths"] == SMALL_MODEL["widths"]
    assert bool(task.seg_supervised), "LIDC slices trained the segmentation head"
    assert task.image_size == SIZE


def test_test_and_predict_write_scorable_outputs(
    cli_config: Path, trained_run: Path, lidc_cache: Path
) -> None:
    ckpt = str(trained_run / "checkpoints" / "last.ckpt")
    assert lungseg(["test", *_args(cli_config, "--ckpt_path", ckpt, "--run_name=tested")]) == 0
    tested = sorted((cli_config.parent / "runs" / "tested").glob("version_*"))[-1]
    metrics = pd.read_csv(tested / "metrics.csv")
    assert {"test/dice", "test/cpm", "test/f1", "test/fp"} <= set(metrics.columns)

    out = cli_config.parent / "predictions"
    args = _args(
        cli_config, "--ckpt_path", ckpt, f"--model.init_args.predict_dir={out}", "--run_name=predicted"
    )
    assert lungseg(["predict", *args]) == 0
    results = pd.read_csv(out / "results.csv")
    assert list(results.columns) == ["seriesuid", "coordX", "coordY", "coordZ", "probability", "diameter_mm"]
    uids = (out / "reference" / "seriesuids.csv").read_text().split()
    assert len(uids) == 1 and set(results["seriesuid"]) <= set(uids)
    mask_path = out / "masks" / f"{uids[0]}.mhd"
    mask = read_volume(mask_path)
    entry = PreprocessedCache(lidc_cache).entry(uids[0])
    assert list(mask.shape) == entry["original_shape"], "masks are written on the scan's own grid"
    assert np.allclose(mask.spacing, entry["original_spacing"]) and np.allclose(mask.origin, entry["origin"])
    assert set(np.unique(mask.array)) <= {0, 1}

    froc_dir = out / "froc"
    code = lungdata(
        [
            "evaluate-froc",
            "--annotations", str(out / "reference" / "annotations.csv"),
            "--excluded", str(out / "reference" / "annotations_excluded.csv"),
            "--seriesuids", str(out / "reference" / "seriesuids.csv"),
            "--results", str(out / "results.csv"),
            "--bootstrap", "0",
            "--out", str(froc_dir),
        ]
    )  # fmt: skip
    assert code == 0
    froc = json.loads((froc_dir / "froc.json").read_text())
    assert froc["counts"]["scans"] == 1 and froc["counts"]["nodules"] == len(entry["nodules"])


def test_detection_only_data_trains_the_heatmap_alone(lidc_root: Path, lidc_cache: Path) -> None:
    dm = make_datamodule(lidc_root, lidc_cache, masks="none", augment=False)
    dm.setup("fit")
    dataset = dm.datasets["train"]
    positives = [int(i) for i in np.flatnonzero(dataset.nodule_slices)[:2]]
    batch = torch.utils.data.default_collate([dataset.sample(i) for i in positives])
    task = GlanceTask(image_size=SIZE, model_overrides=SMALL_MODEL)
    terms = task.compute_loss(task(batch["image"]), batch)
    assert set(terms) == {"focal", "loss"}, "no segmentation terms without masks"
    assert not bool(task.seg_supervised)
    with pytest.raises(ValueError, match="detection-only"):
        GlanceTask(variant="segmentation_only", image_size=SIZE, model_overrides=SMALL_MODEL).compute_loss(
            {"seg": torch.zeros(2, 1, SIZE, SIZE)}, batch
        )


def test_complexity_command(capsys) -> None:
    variant, overrides = model_from_configs([BASE_CONFIG, REPO / "configs" / "glance" / "wo_cscf.yaml"])
    assert variant == "wo_cscf" and overrides["img_size"] == 512
    assert lungseg(["complexity", "--config", str(BASE_CONFIG), "--size", "64", "--reference", "none"]) == 0
    text = capsys.readouterr().out
    for row in ("| GCT |", "| MRGAM |", "| CSCF |", "| PRD |", "| Heads |", "**total**"):
        assert row in text, row
    assert "input 64×64" in text
    lungseg(["complexity", "--variant", "plain_unet", "--size", "64", "--reference", "none"])
    assert "| GCT |" not in capsys.readouterr().out  # the 512×512 report runs in the slow suite
