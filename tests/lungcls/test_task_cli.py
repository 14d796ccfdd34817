"""lungcls tasks and CLI: stage 1 → stage 2 → test/predict and the pathology classifier, end to end.

The CLI runs in-process (`lungcls.cli.main`) on the session's synthetic LIDC and LDFC trees with the
`tiny` preset and 8/12/16-voxel crops, so a fit step takes about a second.
"""

from __future__ import annotations

import importlib
import inspect
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from common.cache import path_digest
from common.datasets.registry import open_dataset
from lungcls.cli import main
from lungcls.task import M3NetTask, ScaleTask
from tests.lungcls.test_data import DEPTH, SIZES

REPO = Path(__file__).resolve().parents[2]


def _config(tmp: Path, name: str, model: dict, data: dict, trainer: dict | None = None) -> Path:
    document = {
        "model": model,
        "data": data,
        "trainer": {
            "default_root_dir": str(tmp / "runs"),
            "accelerator": "cpu",
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            **(trainer or {}),
        },
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def _patch_data(lidc_tree, cache) -> dict:
    return {
        "class_path": "lungcls.data.NodulePatchDataModule",
        "init_args": {
            "root": str(lidc_tree),
            "cache_dir": str(cache),
            "patch_sizes": SIZES,
            "depth": DEPTH,
            "batch_size": 4,
            "ratios": [0.5, 0.25, 0.25],
            "stratify": False,
            "normalization": "window",
        },
    }


def _checkpoint(dirpath: Path) -> dict:
    return {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(dirpath), "filename": "best", "save_last": True},
    }


def _one_step() -> dict:
    return {"max_epochs": 1, "limit_train_batches": 1, "limit_val_batches": 1}


def _run_dir(root: Path, name: str) -> Path:
    return sorted((root / "runs" / name).glob("version_*"))[-1]


@pytest.fixture(scope="module")
def stage1_checkpoints(lidc_tree, patch_cache_dir, tmp_path_factory):
    """Stage 1 through the CLI for the three scales (one training step each), checkpoints saved."""
    tmp = tmp_path_factory.mktemp("stage1")
    paths = {}
    for scale in (32, 64, 96):
        model = {
            "class_path": "lungcls.task.ScaleTask",
            "init_args": {"scale": scale, "preset": "tiny", "in_slices": DEPTH, "n_bootstrap": 10},
        }
        trainer = {**_one_step(), "callbacks": [_checkpoint(tmp / f"s{scale}")]}
        main(
            [
                "fit",
                "--config",
                str(
                    _config(tmp, f"stage1_s{scale}", model, _patch_data(lidc_tree, patch_cache_dir), trainer)
                ),
            ]
        )
        paths[scale] = tmp / f"s{scale}" / "best.ckpt"
        assert paths[scale].is_file()
    return tmp, paths


def test_stage1_fit_fast_dev_run_and_test_report(lidc_tree, patch_cache_dir, stage1_checkpoints, tmp_path):
    tmp, paths = stage1_checkpoints
    model = {
        "class_path": "ScaleTask",
        "init_args": {"scale": 64, "preset": "tiny", "in_slices": DEPTH, "n_bootstrap": 10},
    }
    config = _config(tmp_path, "s1", model, _patch_data(lidc_tree, patch_cache_dir), {"fast_dev_run": 1})
    main(["fit", "--config", str(config)])
    main(["test", "--config", str(config), "--trainer.fast_dev_run=false", "--ckpt_path", str(paths[64])])
    run = _run_dir(tmp_path, "s1")
    report = json.loads((run / "test_metrics.json").read_text(encoding="utf-8"))
    assert set(report["metrics"]) >= {
        "acc",
        "bacc",
        "precision",
        "recall",
        "specificity",
        "f1",
        "roc_auc",
        "pr_auc",
    }
    assert {"mean", "std", "value"} <= set(report["metrics"]["acc"])
    predictions = pd.read_csv(run / "test_predictions.csv")
    assert "patient_id" not in predictions and {"key", "uid", "prob_0", "prob_1"} <= set(predictions)
    assert (run / "test_confusion_matrix.png").stat().st_size > 0
    metrics = pd.read_csv(run / "metrics.csv")
    assert {"test/roc_auc", "test/roc_auc_std", "test/acc"} <= set(metrics.columns)


def test_stage2_loads_stage1_fits_tests_with_gradcam_and_predicts(
    lidc_tree, patch_cache_dir, stage1_checkpoints, tmp_path
):
    _, paths = stage1_checkpoints
    model = {
        "class_path": "lungcls.task.M3NetTask",
        "init_args": {
            "preset": "tiny",
            "in_slices": DEPTH,
            "freeze": "lower",
            "frozen_groups": 2,
            "stage1_checkpoints": {s: str(p) for s, p in paths.items()},
            "n_bootstrap": 10,
        },
    }
    trainer = {
        **_one_step(),
        "callbacks": [
            _checkpoint(tmp_path / "s2"),
            {"class_path": "lungcls.gradcam.GradCAMExport", "init_args": {"num_samples": 2}},
        ],
    }
    config = _config(tmp_path, "s2", model, _patch_data(lidc_tree, patch_cache_dir), trainer)
    main(["fit", "--config", str(config)])
    fit_metrics = pd.read_csv(_run_dir(tmp_path, "s2") / "metrics.csv")
    for term in (
        "train/ce_fused",
        "train/ce_32",
        "train/nce_32_64",
        "train/cov",
        "train/orth",
        "train/nuc",
        "train/attn",
        "val/roc_auc",
    ):
        assert term in fit_metrics.columns, term
    checkpoint = tmp_path / "s2" / "best.ckpt"
    main(["test", "--config", str(config), "--ckpt_path", str(checkpoint)])
    run = _run_dir(tmp_path, "s2")
    assert len(list((run / "gradcam").glob("*.png"))) == 2
    assert (run / "test_metrics.json").is_file()
    main(["predict", "--config", str(config), "--ckpt_path", str(checkpoint)])
    predictions = pd.read_csv(_run_dir(tmp_path, "s2") / "predict_predictions.csv")
    assert len(predictions) > 0 and predictions[["prob_0", "prob_1"]].sum(axis=1).round(5).eq(1).all()
    # new scans: a folder of scans and a LUNA16-style list of centres (what `lungdet predict` writes)
    nodules = pd.read_csv(patch_cache_dir / "nodules.csv").head(2)
    centres = nodules.rename(
        columns={"uid": "seriesuid", "world_x": "coordX", "world_y": "coordY", "world_z": "coordZ"}
    )
    csv = tmp_path / "candidates.csv"
    centres[["seriesuid", "coordX", "coordY", "coordZ"]].assign(probability=0.9).to_csv(csv, index=False)
    main(
        ["predict", "--config", str(config), "--ckpt_path", str(checkpoint)]
        + [f"--data.init_args.predict_root={lidc_tree}", f"--data.init_args.predict_csv={csv}"]
    )
    new_scans = pd.read_csv(_run_dir(tmp_path, "s2") / "predict_predictions.csv")
    assert list(new_scans["uid"]) == list(nodules["uid"]) and "prob_1" in new_scans
    # few-shot adaptation from the stage-2 checkpoint: 1 target pair + 1 replayed source pair
    fewshot_model = {
        "class_path": "M3NetTask",
        "init_args": {**model["init_args"], "init_checkpoint": str(checkpoint)},
    }
    fewshot_model["init_args"].pop("stage1_checkpoints")
    fewshot_data = _patch_data(lidc_tree, patch_cache_dir)
    fewshot_data["class_path"] = "lungcls.data.FewShotPatchDataModule"
    fewshot_data["init_args"].update(
        {
            "pairs": 1,
            "replay_pairs": 1,
            "source_root": str(lidc_tree),
            "source_cache_dir": str(patch_cache_dir),
        }
    )
    main(
        [
            "fit",
            "--config",
            str(_config(tmp_path, "fewshot", fewshot_model, fewshot_data, {"fast_dev_run": 1})),
        ]
    )
    # the stage-2 checkpoint loads on the concrete class with the branches it trained
    restored = M3NetTask.load_from_checkpoint(checkpoint, map_location="cpu")
    assert restored.model.freeze == "lower"


def test_predict_on_a_folder_of_new_scans_needs_no_training_root(
    lidc_tree, patch_cache_dir, stage1_checkpoints, tmp_path, monkeypatch, capsys
):
    """`lungcls predict` on a folder of two new scans and their centres: no LIDC root, no training cache;
    the patches are cached where `common.cache.predict_cache_dir` says (under `cache/` of the working folder)."""
    _, paths = stage1_checkpoints
    known = {r.uid: r.image_path for r in open_dataset("folder", lidc_tree).records}
    nodules = pd.read_csv(patch_cache_dir / "nodules.csv", dtype={"uid": str})
    uids = list(dict.fromkeys(nodules["uid"]))[:2]
    folder = tmp_path / "new_scans"
    for i, uid in enumerate(uids):  # the DICOM series of two scans, alone in a new folder
        shutil.copytree(known[uid], folder / f"scan{i}")
    centres = nodules[nodules["uid"].isin(uids)].rename(
        columns={"uid": "seriesuid", "world_x": "coordX", "world_y": "coordY", "world_z": "coordZ"}
    )
    csv = tmp_path / "candidates.csv"
    centres[["seriesuid", "coordX", "coordY", "coordZ"]].to_csv(csv, index=False)
    data = _patch_data(lidc_tree, patch_cache_dir)
    data["init_args"].update(
        {"root": None, "cache_dir": None, "predict_root": str(folder), "predict_csv": str(csv)}
    )
    model = {"class_path": "ScaleTask", "init_args": {"scale": 64, "preset": "tiny", "in_slices": DEPTH}}
    config = _config(tmp_path, "new_scans", model, data)
    monkeypatch.delenv("LIDC_ROOT", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    rc = main(["predict", "--config", str(config), "--ckpt_path", str(paths[64])])
    assert rc == 0, capsys.readouterr().err.strip().splitlines()[-1:]  # e.g. "no lidc root: set LIDC_ROOT"
    predictions = pd.read_csv(_run_dir(tmp_path, "new_scans") / "predict_predictions.csv", dtype={"uid": str})
    assert list(predictions["uid"]) == list(centres["seriesuid"])
    assert predictions[["prob_0", "prob_1"]].sum(axis=1).round(5).eq(1).all()
    caches = [p.name for p in (work / "cache").iterdir()]
    assert len(caches) == 1 and caches[0].startswith(f"m3net-predict-{path_digest(folder)}-"), caches
    assert len(pd.read_csv(work / "cache" / caches[0] / "nodules.csv")) == len(centres)


def test_stage1_weights_land_in_the_branches_and_freezing_reaches_the_optimizer(stage1_checkpoints):
    _, paths = stage1_checkpoints
    task = M3NetTask(
        preset="tiny", in_slices=DEPTH, freeze="all", stage1_checkpoints={s: str(p) for s, p in paths.items()}
    )
    task.load_stage1(task.hparams.stage1_checkpoints)
    stage1 = ScaleTask.load_from_checkpoint(paths[96], map_location="cpu")
    for name, value in stage1.model.state_dict().items():
        torch.testing.assert_close(task.model.branch(96).state_dict()[name], value)
    optimizer = task.configure_optimizers()["optimizer"]
    optimised = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in optimised for p in task.model.branches.parameters())
    assert all(id(p) in optimised for p in task.model.fusion.parameters())


def test_wrong_stage1_checkpoint_is_refused(stage1_checkpoints, tmp_path):
    _, paths = stage1_checkpoints
    task = M3NetTask(preset="tiny", in_slices=DEPTH)
    with pytest.raises(ValueError, match="trained for scale 32, not 64"):
        task.load_stage1({64: str(paths[32])})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        task.load_stage1({64: str(tmp_path / "missing.ckpt")})


def test_pathology_fit_test_predict_from_cli(ldfc_tree, tmp_path):
    model = {
        "class_path": "lungcls.task.PathologyTask",
        "init_args": {"model_name": "test_resnet", "num_classes": 3, "img_size": 32, "n_bootstrap": 10},
    }
    data = {
        "class_path": "lungcls.pathology_data.PathologyImageDataModule",
        "init_args": {
            "dataset": "ldfc",
            "root": str(ldfc_tree),
            "img_size": 32,
            "batch_size": 4,
            "val_fraction": 0.25,
        },
    }
    trainer = {**_one_step(), "callbacks": [_checkpoint(tmp_path / "p")]}
    config = _config(tmp_path, "path", model, data, trainer)
    main(["fit", "--config", str(config), "--trainer.fast_dev_run=true"])
    main(["fit", "--config", str(config)])
    main(["test", "--config", str(config), "--ckpt_path", str(tmp_path / "p" / "best.ckpt")])
    report = json.loads((_run_dir(tmp_path, "path") / "test_metrics.json").read_text(encoding="utf-8"))
    assert {"acc", "qwk"} <= set(report["metrics"]) and report["n_samples"] == 3
    main(["predict", "--config", str(config), "--ckpt_path", str(tmp_path / "p" / "best.ckpt")])
    predictions = pd.read_csv(_run_dir(tmp_path, "path") / "predict_predictions.csv")
    assert len(predictions) == 3 and {"file", "prob_2"} <= set(predictions)


def test_complexity_subcommand_prints_and_writes_table7(tmp_path, capsys):
    config = tmp_path / "t7.yaml"
    config.write_text("presets: [tiny]\ntoken_modes: [spatial]\nsizes: [paper]\n")
    assert main(["complexity", "--config", str(config), "--out", str(tmp_path / "t7.md")]) == 0
    out = capsys.readouterr().out
    assert "| branch 96 |" in out and "184.608" in out
    assert "preset tiny" in (tmp_path / "t7.md").read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------ config files
def _init_args(class_path: str) -> set[str]:
    module, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            names |= {
                p for p in inspect.signature(klass.__init__).parameters if p not in ("self", "args", "kwargs")
            }
    return names


def test_pathology_datamodule_takes_the_adapter_parameters_and_no_cache_ones():
    """Its root/predict/loader parameters come from `AdapterDataModule` (not re-declared); no cache, no split file."""
    from lungcls.pathology_data import PathologyImageDataModule

    inherited = {"root", "predict_root", "seed", "num_workers", "lenient", "dataset_kwargs"}
    assert inherited <= _init_args("lungcls.pathology_data.PathologyImageDataModule")
    assert not inherited & set(inspect.signature(PathologyImageDataModule.__init__).parameters)
    cache_only = {"cache_dir", "split_file", "ratios", "columns", "spacing", "split", "fold"}
    assert not cache_only & _init_args("lungcls.pathology_data.PathologyImageDataModule")


CONFIGS = sorted(
    [
        *REPO.glob("configs/m3net/*.yaml"),
        REPO / "configs/m3net_lidc.yaml",
        *REPO.glob("configs/pathology_*.yaml"),
    ]
)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_files_name_real_classes_and_arguments(path):
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    if "rows" in document:  # a run table: its base config and every override must exist
        base = yaml.safe_load((REPO / document["base"]).read_text(encoding="utf-8"))
        for row in document["rows"]:
            for override in row["overrides"]:
                key, _, value = override.removeprefix("--").partition("=")
                section, _, arg = key.partition(".init_args.")
                assert arg in _init_args(base[section]["class_path"]), f"{path.name} row {row['name']}: {key}"
                yaml.safe_load(value)
            assert set(row["published"]) <= set(document["columns"])
        return
    if "presets" in document:  # the efficiency report
        from lungcls.models import M3NET_PRESETS

        assert set(document["presets"]) <= set(M3NET_PRESETS)
        return
    for section in ("model", "data"):
        spec = document[section]
        assert set(spec["init_args"]) <= _init_args(spec["class_path"]), f"{path.name}: {section}"
