"""lungcad.bundle: a bundle written from four runs loads with every check; tampered copies are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import numpy as np
import pytest
import torch

import common.cache
import lungcad.bundle as bundle_module
from lungcad.bundle import BUNDLE_FILE, MODEL_KINDS, Bundle, resolve_run
from lungcad.cli import main as lungcad_main
from lungdet.fusion import ScoredScan

SCHEMA = Path(__file__).resolve().parents[2] / "lungcad" / "schemas" / "bundle.schema.json"


def _copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "copy"))


def _edit(bundle: Path, change) -> None:
    manifest = json.loads((bundle / BUNDLE_FILE).read_text())
    change(manifest)
    (bundle / BUNDLE_FILE).write_text(json.dumps(manifest))


def test_bundle_json_follows_its_schema_and_describes_every_model(tiny_bundle, tiny_bundle_env):
    manifest = json.loads((tiny_bundle / BUNDLE_FILE).read_text())
    jsonschema.validate(manifest, json.loads(SCHEMA.read_text()))
    assert set(manifest["models"]) == set(MODEL_KINDS)
    for kind, entry in manifest["models"].items():
        assert entry["task"] == MODEL_KINDS[kind] and (tiny_bundle / entry["checkpoint"]).is_file()
        assert manifest["files"][entry["checkpoint"]] == entry["sha256"]
    stage1 = manifest["models"]["stage1"]
    assert stage1["preprocessing"]["window_hu"] == [-1200.0, 600.0] and stage1["runtime"]["block_size"] == 64
    # the MPPN run's stage1_inference overrides travel with the chained stage 1 (what `lungdet test` scores)
    assert stage1["runtime"]["max_candidates"] == 3  # the stage-1 run said 4
    assert manifest["models"]["seg"]["preprocessing"]["image_size"] == 64
    assert manifest["models"]["cls"]["preprocessing"]["sizes"] == {"32": 8, "64": 12, "96": 16}
    detection = manifest["detection"]
    assert detection["fp_per_scan"] == 1.0 and detection["validation_scans"] == 1
    assert detection["validation_fp_per_scan"] <= 1.0 + 1e-9
    assert set(detection["fusion_search"]) == {f"{0.1 * k:g}" for k in range(11)}
    assert 0.0 <= detection["stage1_weight"] <= 1.0
    # the MPPN run searches (its config) but trained without validation: its test scores with the configured
    # 0.5, which is the weight the bundle prefers on ties
    assert (
        detection["run_fusion"]["fusion_search"] is True and detection["run_fusion"]["source"] == "configured"
    )
    assert detection["preferred_stage1_weight"] == detection["run_fusion"]["stage1_weight"] == 0.5
    assert "fusion_search" not in manifest["models"]["mppn"]["runtime"]
    # a run folder resolves to its newest version's checkpoint, config and run info
    source = resolve_run(tiny_bundle_env["run_stage1"].parent)
    assert (
        source.checkpoint.suffix == ".ckpt" and source.config["model"]["class_path"] == MODEL_KINDS["stage1"]
    )


def test_load_verifies_and_loads_weights_only(tiny_bundle, monkeypatch):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    bundle = Bundle.load(tiny_bundle)
    assert calls and all(flag is True for flag in calls)
    assert set(bundle.models) == set(MODEL_KINDS)
    assert all(not m.task.training for m in bundle.models.values())
    info = bundle.info()
    assert info["operating_threshold"] == bundle.operating_threshold and len(info["sha256"]) == 64


def test_tasks_are_built_without_random_init_and_hold_exactly_the_checkpoint_weights(tiny_bundle):
    """`_SkipInit` draws no random numbers while the tasks are built (the RNG state is untouched, and it is not
    without it); the loaded weights equal the checkpoints' bit for bit."""
    torch.manual_seed(0)
    before = torch.get_rng_state()
    bundle = Bundle.load(tiny_bundle)
    assert torch.equal(torch.get_rng_state(), before)
    torch.nn.Linear(8, 8)
    assert not torch.equal(torch.get_rng_state(), before), "an unpatched build draws random numbers"
    for kind, model in bundle.models.items():
        saved = torch.load(tiny_bundle / model.entry["checkpoint"], weights_only=True)["state_dict"]
        loaded = model.task.state_dict()
        assert loaded.keys() == saved.keys(), kind
        assert all(torch.equal(loaded[k], v) for k, v in saved.items()), kind


def test_a_pickled_object_in_a_checkpoint_is_refused(tiny_bundle, tmp_path):
    copy = _copy(tiny_bundle, tmp_path)
    torch.save({"state_dict": {}, "payload": Path("x")}, copy / "stage1.ckpt")
    digest = common.cache.sha256_file(copy / "stage1.ckpt")
    _edit(
        copy,
        lambda m: (m["files"].update({"stage1.ckpt": digest}), m["models"]["stage1"].update(sha256=digest)),
    )
    with pytest.raises(ValueError, match="weights_only=True"):
        Bundle.load(copy)


def test_changed_weights_are_refused_naming_the_file(tiny_bundle, tmp_path):
    copy = _copy(tiny_bundle, tmp_path)
    with open(copy / "seg.ckpt", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ValueError, match=r"bundle\.json: files\.seg\.ckpt sha256 .* was changed or damaged"):
        Bundle.load(copy)
    (copy / "seg.ckpt").unlink()
    with pytest.raises(FileNotFoundError, match=r"files\.seg\.ckpt is missing"):
        Bundle.load(copy)


def test_preprocessing_that_differs_from_the_code_is_refused(tiny_bundle, tmp_path, monkeypatch):
    copy = _copy(tiny_bundle, tmp_path)
    _edit(copy, lambda m: m["models"]["stage1"]["preprocessing"].update(window_hu=[-1000.0, 400.0]))
    with pytest.raises(
        ValueError, match=r"bundle\.json: models\.stage1\.preprocessing\.window_hu\[0\] is -1000\.0"
    ):
        Bundle.load(copy)
    # the code changed since the bundle was written: a new resampling / lung-mask algorithm version
    monkeypatch.setattr(common.cache, "ALGORITHM_VERSION", 99)
    with pytest.raises(ValueError, match=r"models\.\w+\.preprocessing\.cache\.algorithm_version is 2 .* 99"):
        Bundle.load(tiny_bundle)


def test_other_schema_versions_are_refused(tiny_bundle, tmp_path):
    copy = _copy(tiny_bundle, tmp_path)
    _edit(copy, lambda m: m.update(schema_version="2.0"))
    with pytest.raises(ValueError, match=r"bundle\.json: schema_version '2\.0'"):
        Bundle.load(copy)


def test_cli_errors_are_one_line(tmp_path, capsys):
    code = lungcad_main(
        ["bundle", "--stage1", str(tmp_path / "nope"), "--mppn", "x", "--seg", "x", "--cls", "x"]
        + ["--out", str(tmp_path / "b")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "nope is neither a run folder nor a checkpoint" in err and err.count("\n") == 1


def test_fusion_weight_and_threshold_come_from_the_validation_froc(monkeypatch):
    """Two validation scans, one nodule: stage 1 ranks it first, the MPPN last. Every w ≥ 0.5 puts it first
    (CPM 1); the smallest such w wins when the run's own weight (0) is not among the best. At 0.5 FP/scan
    the threshold admits the nodule and one false positive (fused scores 0.55, 0.5 | 0.45)."""
    rows = [
        ScoredScan(
            uid="a",
            world=np.array([[0.0, 0.0, 0.0], [50.0, 0.0, 0.0], [80.0, 0.0, 0.0]]),
            stage1=torch.tensor([0.9, 0.1, 0.8], dtype=torch.float64),
            mppn=torch.tensor([0.2, 0.9, 0.1], dtype=torch.float64),
            nodules=torch.tensor([[0.0, 0.0, 0.0, 10.0]], dtype=torch.float64),
            excluded=torch.zeros(0, 4, dtype=torch.float64),
        ),
        ScoredScan(
            uid="b",
            world=np.zeros((0, 3)),
            stage1=torch.zeros(0, dtype=torch.float64),
            mppn=torch.zeros(0, dtype=torch.float64),
            nodules=torch.zeros(0, 4, dtype=torch.float64),
            excluded=torch.zeros(0, 4, dtype=torch.float64),
        ),
    ]
    monkeypatch.setattr(bundle_module, "_validation_scores", lambda bundle, data: rows)
    fake = SimpleNamespace(models={"mppn": SimpleNamespace(task=SimpleNamespace(stage1_weight=0.0))})
    point = bundle_module.choose_operating_point(fake, {}, fp_per_scan=0.5)
    assert (
        point["fusion_search"]["0"] < 1.0
        and point["fusion_search"]["0.5"] == point["fusion_search"]["1"] == 1.0
    )
    assert point["stage1_weight"] == 0.5 and point["validation_cpm"] == 1.0
    assert point["operating_threshold"] == pytest.approx(0.5) and point["validation_fp_per_scan"] == 0.5
    assert point["validation_sensitivity"] == 1.0 and point["validation_scans"] == 2
    kept = bundle_module.choose_operating_point(fake, {}, fp_per_scan=0.5, search_fusion=False)
    assert kept["stage1_weight"] == 0.0 and set(kept["fusion_search"]) == {"0"}
    # the run's own choice (here 1) wins the tie among the best weights and is what --keep-fusion keeps
    run = {"stage1_weight": 1.0, "source": "validation"}
    preferred = bundle_module.choose_operating_point(fake, {}, fp_per_scan=0.5, preferred=1.0, run_fusion=run)
    assert preferred["stage1_weight"] == 1.0 and preferred["run_fusion"] == run
    assert preferred["preferred_stage1_weight"] == 1.0 and preferred["configured_stage1_weight"] == 0.0
    kept = bundle_module.choose_operating_point(fake, {}, fp_per_scan=0.5, search_fusion=False, preferred=1.0)
    assert kept["stage1_weight"] == 1.0 and set(kept["fusion_search"]) == {"1"}


def test_the_bundle_command_wrote_the_fixture(tiny_bundle_env):
    """The session's bundle was written by `lungcad bundle` from the four run folders (conftest)."""
    manifest = json.loads((tiny_bundle_env["bundle"] / BUNDLE_FILE).read_text())
    assert manifest["name"] == "bundle" and manifest["generator"]["name"] == "lungcad"
    assert {m["source"]["run_name"] for m in manifest["models"].values()} == {
        "claf_luna16", "mppn_luna16", "glance_lidc", "cls"
    }  # fmt: skip
