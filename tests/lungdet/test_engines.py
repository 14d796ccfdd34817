"""Inference engines (common.engine) give the candidates and MPPN scores of the fp32 eager path."""

from __future__ import annotations

import pytest
import torch

from common.engine import ENGINES, EngineCache, describe, native_bf16, resolve
from lungdet.inference import Stage1Inference, detect_scan, score_candidates
from lungdet.models import build_candidate_net, build_mppn
from lungdet.task import CandidateTask, FPRTask

#: Largest |score difference| allowed between an engine and eager fp32 (observed: ~1e-7); boxes agree to
#: 1e-3 voxel (the decoded deltas differ in the last float digits).
SCORE_TOL = 1e-4


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_candidate_net("ascrm", width=2, head_channels=8, prior_prob=0.5).eval()


@pytest.mark.parametrize("engine", [e for e in ENGINES if e != "eager"])
def test_stage1_engines_give_the_eager_candidates(net, engine):
    torch.manual_seed(1)
    image = torch.rand(40, 45, 50)
    old = Stage1Inference(block_size=32, overlap=0.5, score_threshold=0.0, max_candidates=30)
    ref = detect_scan(net, image, old)
    got = detect_scan(net, image, old.updated({"engine": engine}))
    assert ref.shape[0] > 5
    assert got.shape == ref.shape
    assert torch.allclose(got[:, 1:], ref[:, 1:], atol=1e-3), "same boxes, same order"
    assert (got[:, 0] - ref[:, 0]).abs().max() <= SCORE_TOL


@pytest.mark.parametrize("engine", ["channels_last", "frozen", "onnxruntime"])
def test_mppn_engines_give_the_eager_probabilities(engine):
    torch.manual_seed(0)
    mppn = build_mppn(width=4).eval()
    image = torch.rand(40, 60, 60)
    centres = torch.tensor([[20.0, 30.0, 30.0], [5.0, 10.0, 50.0], [35.0, 55.0, 2.0]])
    ref = score_candidates(mppn, image, centres, chunk_size=2)
    got = score_candidates(mppn, image, centres, chunk_size=2, engine=engine)
    assert got.shape == (3,)
    assert (got - ref).abs().max() <= SCORE_TOL


def test_a_compiled_engine_follows_weight_updates(net):
    model = build_candidate_net("ascrm", width=2, head_channels=8, prior_prob=0.5).eval()
    cache = EngineCache()
    example = model.example_inputs((1, 1, 32, 32, 32))
    first = cache.get(model, "frozen", example)
    assert cache.get(model, "frozen", example) is first, "reused while the weights stay the same"
    with torch.no_grad():
        model.head[-1].bias.add_(1.0)  # an in-place update, as an optimiser step makes
    second = cache.get(model, "frozen", example)
    assert second is not first
    assert torch.allclose(second(*example), model(*example), atol=1e-5)


def test_which_path_ran_is_said_and_bad_names_are_refused():
    assert resolve("onnxruntime", "cpu") == "onnxruntime"
    assert resolve("frozen", "meta") == "eager"
    line = describe("bf16", "cpu")
    if native_bf16():
        assert line.startswith("bf16 (bf16 autocast")
    else:
        assert "no native bf16" in line and "ran fp32 eager" in line
    assert Stage1Inference(engine="frozen").engine_used().startswith("frozen (fp32")
    with pytest.raises(ValueError, match="engine must be one of"):
        Stage1Inference(engine="tensorrt")
    with pytest.raises(ValueError, match="engine must be one of"):
        FPRTask(engine="tensorrt")
    assert CandidateTask(engine="onnxruntime").inference.engine == "onnxruntime"
