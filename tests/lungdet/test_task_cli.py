"""`lungdet` end to end on a synthetic LUNA16 tree: the user's configs (CLAF stage 1, MPPN, a Table 9 row)
through fit / test / predict, two-stage prediction on a folder of new scans, and the errors a user meets.

The configs are the real files in configs/; a small overlay (written per test) only shrinks the networks,
crops and inference blocks and points the data at the session's synthetic tree.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from lungdet.cli import run_cli as main
from lungdet.task import CandidateTask, FPRTask

REPO = Path(__file__).resolve().parents[2]
CLAF = str(REPO / "configs" / "claf_luna16.yaml")
MPPN = str(REPO / "configs" / "mppn_luna16.yaml")
UNET = str(REPO / "configs" / "claf" / "table9_unet.yaml")


def _overlay(tmp_path: Path, tree: Path, cache: Path, stage: int, **data) -> str:
    model = (
        {"width": 4, "head_channels": 8, "block_size": 64, "overlap": 0.5, "sw_batch_size": 2}
        if stage == 1
        else {
            "width": 2,
            "chunk_size": 128,
            # an untrained stage 1 scores ~0.01 everywhere: threshold 0 keeps its 5 best per scan
            "stage1_inference": {
                "block_size": 64,
                "overlap": 0.5,
                "score_threshold": 0.0,
                "max_candidates": 5,
            },
        }
    )
    config = {
        "model": {"init_args": model},
        "data": {
            "init_args": {
                "root": str(tree),
                "cache_dir": str(cache),
                "split": "ratio",
                "ratios": [0.5, 0.25, 0.25],
                "batch_size": 2,
                "num_workers": 0,
                **({"crop_size": 32, "samples_per_epoch": 4} if stage == 1 else {"samples_per_epoch": 4}),
                **data,
            }
        },
        "trainer": {
            "default_root_dir": str(tmp_path / "runs"),
            "accelerator": "cpu",
            "devices": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
    }
    path = tmp_path / f"tiny_stage{stage}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _metrics(cli) -> pd.DataFrame:
    return pd.read_csv(Path(cli.trainer.log_dir) / "metrics.csv")


def test_print_config_needs_no_data(monkeypatch, capsys):
    monkeypatch.delenv("LUNA16_ROOT", raising=False)
    for config in (CLAF, MPPN):
        with pytest.raises(SystemExit):
            main(["fit", "--config", config, "--print_config"])
        out = capsys.readouterr().out
        assert "lungdet.task" in out and "root: null" in out


def test_missing_luna16_root_is_a_clear_error(monkeypatch, tmp_path):
    args = [
        "fit",
        "--config",
        CLAF,
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.fast_dev_run",
        "true",
    ]
    monkeypatch.delenv("LUNA16_ROOT", raising=False)
    with pytest.raises(FileNotFoundError, match="LUNA16_ROOT.*lungdata synth luna16"):
        main(args)
    monkeypatch.setenv("LUNA16_ROOT", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"nowhere.*lungdata synth luna16"):
        main(args)


@pytest.fixture(scope="module")
def stage1_checkpoint(luna_tree, luna_cache, tmp_path_factory) -> Path:
    """CLAF config: fit (fast_dev_run) — the trained task's checkpoint feeds the stage-2 tests."""
    tmp = tmp_path_factory.mktemp("claf-fit")
    tiny = _overlay(tmp, luna_tree, luna_cache.root, 1)
    cli = main(["fit", "--config", CLAF, "--config", tiny, "--trainer.fast_dev_run", "true"])
    assert cli.trainer.global_step == 1 and isinstance(cli.model, CandidateTask)
    assert cli.model.hparams.variant == "ascrm" and cli.model.hparams.width == 4
    path = tmp / "stage1.ckpt"
    cli.trainer.save_checkpoint(path)
    return path


def test_claf_config_test_and_predict(stage1_checkpoint, luna_tree, luna_cache, tmp_path):
    tiny = _overlay(tmp_path, luna_tree, luna_cache.root, 1, predict_parts=["val", "test"])
    cli = main(["test", "--config", CLAF, "--config", tiny, "--ckpt_path", str(stage1_checkpoint)])
    run = Path(cli.trainer.log_dir)
    assert (run / "test_results.csv").is_file() and (run / "test_froc.json").is_file()
    assert (run / "test_froc.png").stat().st_size > 0
    logged = _metrics(cli)
    for key in ("test/cpm", "test/sens@0.55", "test/recall", "test/candidates_per_scan", "test/sens@8"):
        assert key in logged.columns
    cli = main(["predict", "--config", CLAF, "--config", tiny, "--ckpt_path", str(stage1_checkpoint)])
    results = pd.read_csv(Path(cli.trainer.log_dir) / "results.csv")
    assert list(results.columns) == ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
    expected = set(cli.datamodule.uids["val"]) | set(cli.datamodule.uids["test"])
    assert set(results["seriesuid"]) <= expected and results["probability"].between(0, 1).all()


def test_table9_ablation_config_fit_test_predict(luna_tree, luna_cache, tmp_path):
    tiny = _overlay(tmp_path, luna_tree, luna_cache.root, 1)
    cli = main(
        ["fit", "--config", CLAF, "--config", UNET, "--config", tiny, "--trainer.fast_dev_run", "true"]
    )
    assert cli.model.hparams.variant == "unet" and cli.trainer.global_step == 1
    ckpt = tmp_path / "unet.ckpt"
    cli.trainer.save_checkpoint(ckpt)
    cli = main(["test", "--config", CLAF, "--config", UNET, "--config", tiny, "--ckpt_path", str(ckpt)])
    assert Path(cli.trainer.log_dir).parts[-2] == "table9_unet", "the row names its run folder"
    assert "test/cpm" in _metrics(cli).columns
    cli = main(["predict", "--config", CLAF, "--config", UNET, "--config", tiny, "--ckpt_path", str(ckpt)])
    assert (Path(cli.trainer.log_dir) / "results.csv").is_file()


def test_mppn_config_fit_test_and_two_stage_predict(
    stage1_checkpoint, luna_tree, luna_cache, tmp_path, monkeypatch
):
    tiny = _overlay(tmp_path, luna_tree, luna_cache.root, 2)
    cli = main(["fit", "--config", MPPN, "--config", tiny, "--trainer.fast_dev_run", "true"])
    assert isinstance(cli.model, FPRTask) and cli.trainer.global_step == 1
    mppn_ckpt = tmp_path / "mppn.ckpt"
    cli.trainer.save_checkpoint(mppn_ckpt)
    assert not any(k.startswith("_stage1") for k in torch.load(mppn_ckpt, weights_only=False)["state_dict"])

    # test, both stages: stage 1 runs on the test scans, the MPPN re-scores its candidates
    base = ["--config", MPPN, "--config", tiny, "--ckpt_path", str(mppn_ckpt)]
    base += ["--model.init_args.stage1_checkpoint", str(stage1_checkpoint)]
    cli = main(["test", *base, "--data.init_args.eval_candidates", "stage1"])
    assert {"test/cpm", "test/sens@0.55", "test/stage1_cpm"} <= set(_metrics(cli).columns)
    assert (Path(cli.trainer.log_dir) / "test_results.csv").is_file()
    stage1_rows = pd.read_csv(Path(cli.trainer.log_dir) / "test_results_stage1.csv")
    final_rows = pd.read_csv(Path(cli.trainer.log_dir) / "test_results.csv")
    assert len(final_rows) == len(stage1_rows) == 5 * len(cli.datamodule.uids["test"])
    assert (
        (final_rows[["coordX", "coordY", "coordZ"]] == stage1_rows[["coordX", "coordY", "coordZ"]])
        .all()
        .all()
    )

    # the same test from the stage-1 checkpoint's own `lungdet test` list: same candidates, no second pass
    stage1_tiny = _overlay(tmp_path, luna_tree, luna_cache.root, 1)
    stage1_cli = main(
        ["test", "--config", CLAF, "--config", stage1_tiny, "--ckpt_path", str(stage1_checkpoint),
         "--model.init_args.score_threshold", "0", "--model.init_args.max_candidates", "20"]
    )  # fmt: skip
    listed = Path(stage1_cli.trainer.log_dir) / "test_results.csv"
    assert set(pd.read_csv(listed)["seriesuid"]) == set(cli.datamodule.uids["test"])
    calls = []
    monkeypatch.setattr(CandidateTask, "detect", lambda self, image: calls.append(1) or 1 / 0)
    reused = main(
        ["test", *base, "--data.init_args.eval_candidates", "stage1",
         "--data.init_args.stage1_results_csv", str(listed)]
    )  # fmt: skip
    assert not calls, "no scan ran stage 1 again"
    for name in ("test_results.csv", "test_results_stage1.csv"):
        again = pd.read_csv(Path(reused.trainer.log_dir) / name)
        first = pd.read_csv(Path(cli.trainer.log_dir) / name)
        assert len(again) == len(first) == 5 * len(cli.datamodule.uids["test"])
        pd.testing.assert_frame_equal(again, first, check_exact=False, rtol=0, atol=1e-6)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="eval_candidates stage1"):
        main(["test", *base, "--data.init_args.stage1_results_csv", str(listed)])

    # predict on a folder of new scans: no LUNA16 root needed, results CSV of the two-stage pipeline
    monkeypatch.delenv("LUNA16_ROOT", raising=False)
    folder = luna_tree / "subset0"
    out = tmp_path / "new_scans_results.csv"
    data = ["--data.init_args.root", "null", "--data.init_args.cache_dir", str(tmp_path / "cache" / "x")]
    data += ["--data.init_args.predict_root", str(folder)]
    main(["predict", *base, *data, "--model.init_args.results_csv", str(out)])
    results = pd.read_csv(out)
    assert list(results.columns) == ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
    assert set(results["seriesuid"]) == {p.stem for p in folder.glob("*.mhd")} and len(results) == 5
    assert results["probability"].between(0, 1).all()


def test_mppn_ensemble_by_config_fits_checkpoints_and_tests(
    stage1_checkpoint, luna_tree, luna_cache, tmp_path
):
    from lungdet.models import MPPNEnsemble

    tiny = _overlay(tmp_path, luna_tree, luna_cache.root, 2)
    members = ["--model.init_args.members", "2"]
    cli = main(["fit", "--config", MPPN, "--config", tiny, *members, "--trainer.fast_dev_run", "true"])
    assert isinstance(cli.model.model, MPPNEnsemble) and cli.trainer.global_step == 1
    ckpt = tmp_path / "ensemble.ckpt"
    cli.trainer.save_checkpoint(ckpt)
    loaded = FPRTask.load_from_checkpoint(ckpt, weights_only=True)
    assert isinstance(loaded.model, MPPNEnsemble) and len(loaded.model.members) == 2
    base = ["--config", MPPN, "--config", tiny, "--ckpt_path", str(ckpt)]
    base += ["--model.init_args.stage1_checkpoint", str(stage1_checkpoint)]
    cli = main(["test", *base, *members, "--data.init_args.eval_candidates", "stage1"])
    final = pd.read_csv(Path(cli.trainer.log_dir) / "test_results.csv")
    assert len(final) == 5 * len(cli.datamodule.uids["test"]) and final["probability"].between(0, 1).all()


def test_stage2_without_stage1_checkpoint_says_what_to_set(luna_tree, luna_cache, tmp_path):
    tiny = _overlay(tmp_path, luna_tree, luna_cache.root, 2, eval_candidates="stage1")
    with pytest.raises(ValueError, match="stage1_checkpoint"):
        main(["test", "--config", MPPN, "--config", tiny])


def test_fusion_chosen_in_fit_validation_travels_in_the_checkpoint_and_test_scores_with_it(
    stage1_checkpoint, luna_tree, luna_cache, tmp_path
):
    """`fusion_search` (the MPPN config's default): fit's validation chooses w, the checkpoint keeps it,
    `lungdet test --ckpt_path` scores with it and writes it to test_fusion.json; `fusion_search false`
    gives the configured weight back."""
    from lungdet.fusion import CHECKPOINT_KEY, FUSION_GRID

    tiny = _overlay(tmp_path, luna_tree, luna_cache.root, 2, eval_candidates="stage1")
    two_stage = [
        "--config",
        MPPN,
        "--config",
        tiny,
        "--model.init_args.stage1_checkpoint",
        str(stage1_checkpoint),
    ]
    one_step = (
        "--trainer.max_epochs 1 --trainer.limit_train_batches 1 --trainer.num_sanity_val_steps 0".split()
    )
    cli = main(["fit", *two_stage, *one_step])
    choice = cli.model.fusion
    assert cli.model.fusion_search and choice is not None and choice.validation_scans == 1
    logged = _metrics(cli)
    assert logged["val/stage1_weight"].dropna().iloc[-1] == pytest.approx(choice.stage1_weight)
    # every weight of the grid was scored on the validation scan's nodules; the choice is their best
    assert choice.validation_nodules > 0 and set(choice.validation_cpm) == set(FUSION_GRID)
    assert choice.cpm == max(choice.validation_cpm.values())
    assert logged["val/cpm"].dropna().iloc[-1] == pytest.approx(choice.cpm)
    assert logged["val/cpm_w1"].dropna().iloc[-1] == pytest.approx(logged["val/stage1_cpm"].dropna().iloc[-1])
    ckpt = tmp_path / "mppn.ckpt"  # the run's own last.ckpt (ModelCheckpoint of the config), copied
    ckpt.write_bytes(Path(cli.trainer.checkpoint_callback.last_model_path).read_bytes())
    saved = torch.load(ckpt, weights_only=True)
    assert saved[CHECKPOINT_KEY] == choice.to_dict() and saved[CHECKPOINT_KEY]["epoch"] == 0

    # a checkpoint whose validation chose 0.7: test must score 0.3·p_MPPN + 0.7·p_stage1, not the config's 0
    saved[CHECKPOINT_KEY]["stage1_weight"] = 0.7
    torch.save(saved, ckpt)
    cli = main(["test", *two_stage, "--ckpt_path", str(ckpt)])
    run = Path(cli.trainer.log_dir)
    info = json.loads((run / "test_fusion.json").read_text())
    assert (
        info["stage1_weight"] == 0.7
        and info["source"] == "validation"
        and info["configured_stage1_weight"] == 0
    )
    assert info["validation"]["validation_scans"] == 1
    assert _metrics(cli)["test/stage1_weight"].dropna().iloc[-1] == pytest.approx(0.7)  # logged as float32
    final, stage1, mppn = (pd.read_csv(run / f"test_results{s}.csv") for s in ("", "_stage1", "_mppn"))
    assert len(final) == len(stage1) == len(mppn) > 0
    expected = 0.3 * mppn["probability"] + 0.7 * stage1["probability"]
    assert final["probability"].to_numpy() == pytest.approx(expected.to_numpy(), abs=1e-6)

    cli = main(["test", *two_stage, "--ckpt_path", str(ckpt), "--model.init_args.fusion_search", "false"])
    info = json.loads((Path(cli.trainer.log_dir) / "test_fusion.json").read_text())
    assert info["stage1_weight"] == 0.0 and info["source"] == "configured"
    assert not (Path(cli.trainer.log_dir) / "test_results_mppn.csv").exists()
