"""Per-sample de-duplication of evaluation metrics: keys, tokens, weighted means, and two gloo ranks.

The two-process test pads like ``DistributedSampler`` (rank 1 repeats sample 0) and leaves rank 1
without any segmentation case — the state torchmetrics fills with a ``float32`` empty tensor unless the
metric seeds typed ones — and requires every metric to equal the single-process value.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.metrics.classification import ClassificationScores, classification_scores
from common.metrics.froc_torch import scan_key_from_uid
from common.metrics.segmentation import SegmentationScores, aggregate_segmentation_scores, segmentation_scores
from common.metrics.unique_samples import UniqueSampleMean, first_per_key, sample_key
from tests.common.gloo import gloo_group, run_ranks

N, C = 7, 3


def _samples() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(4)
    labels = np.array([0, 1, 2, 0, 1, 2, 1])
    logits = rng.normal(size=(N, C))
    logits[np.arange(N), labels] += 1.0
    return labels, logits, np.array([1.0, 2.0, 0.5])


def _masks(i: int) -> tuple[np.ndarray, np.ndarray]:
    """Prediction and reference of segmentation case i (cases 0..2), all different."""
    t = np.zeros((6, 10, 10), dtype=bool)
    t[1:5, 2:7, 2:7] = True
    p = np.zeros_like(t)
    p[1:5, 2 + i : 7 + i, 2:7] = True
    return p, t


def test_first_per_key_keeps_the_smallest_token_in_key_order() -> None:
    keys = np.array([5, 3, 5, 9, 3])
    tokens = np.array([10, 11, 2, 7, 1])
    assert first_per_key(keys, tokens).tolist() == [4, 2, 3]
    with pytest.raises(ValueError, match="token"):
        first_per_key(keys, tokens[:2])


def test_sample_key_is_stable_and_separates_parts() -> None:
    uid = "1.3.6.1.4.1.14519.5.2.1.6279.6001.100225287222365663678666836860"
    assert sample_key(uid) == scan_key_from_uid(uid)
    assert sample_key(uid, 1) != sample_key(uid, 2) and sample_key("a", "bc") != sample_key("ab", "c")
    assert 0 <= sample_key(uid, 7) < 2**62
    with pytest.raises(ValueError, match="part"):
        sample_key()


def test_weighted_sample_mean_equals_the_mean_loss_and_ignores_duplicates() -> None:
    labels, logits, weight = _samples()
    y, z, w = torch.from_numpy(labels), torch.from_numpy(logits).float(), torch.from_numpy(weight).float()
    expected = F.cross_entropy(z, y, weight=w, label_smoothing=0.1)
    per_sample = F.cross_entropy(z, y, weight=w, label_smoothing=0.1, reduction="none")
    metric = UniqueSampleMean(("loss", "double"))
    for part in (np.arange(0, 4), np.arange(4, 7), np.array([0, 5])):  # the last batch is padding
        idx = torch.from_numpy(part)
        metric.update(idx, {"loss": per_sample[idx], "double": 2 * per_sample[idx]}, w[y[idx]])
    out = metric.compute()
    assert float(out["loss"]) == pytest.approx(float(expected), rel=1e-6)
    assert float(out["double"]) == pytest.approx(2 * float(expected), rel=1e-6)
    with pytest.raises(ValueError, match="lack"):
        metric.update(torch.arange(2), {"loss": torch.ones(2)})
    with pytest.raises(ValueError, match=">= 0"):
        metric.update(torch.tensor([-1, 0]), {"loss": torch.ones(2), "double": torch.ones(2)})
    keyless = UniqueSampleMean()
    keyless.update(None, torch.ones(2))
    keyless.update(None, torch.zeros(2))
    assert float(keyless.compute()["value"]) == pytest.approx(0.5)  # without keys nothing is merged


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    with gloo_group(rank, world, port):
        labels, logits, _ = _samples()
        probs = torch.from_numpy(logits).softmax(1)
        mine = list(range(rank, N, world)) + ([0] if rank == 1 else [])  # 7 on 2 ranks: 0 padded in
        scores, mean, seg = ClassificationScores(C), UniqueSampleMean(), SegmentationScores(with_hd95=False)
        for start in range(0, len(mine), 3):
            idx = torch.tensor(mine[start : start + 3])
            scores.update(probs[idx], torch.from_numpy(labels)[idx], idx)
            mean.update(idx, idx.double())
        if rank == 0:  # rank 1 has no segmentation case at all; case 1 arrives twice
            cases = [0, 1, 2, 1]
            seg.update(*zip(*[_masks(i) for i in cases]), keys=[sample_key("scan", i) for i in cases])
        out = {f"cls/{k}": float(v) for k, v in scores.compute().items()}
        out["mean"] = float(mean.compute()["value"])
        out.update({f"seg/{k}": float(v) for k, v in seg.compute().items()})
        out["seg/n_cases"] = seg.n_cases
        out["keys"] = scores.compute_samples()[0].tolist()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))


def test_two_gloo_ranks_with_padding_and_an_empty_rank_equal_one_process(tmp_path: Path) -> None:
    run_ranks(_worker, tmp_path)
    labels, logits, _ = _samples()
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = {f"cls/{k}": v for k, v in classification_scores(labels, probs, C).items()}
    expected["mean"] = float(np.mean(np.arange(N)))
    agg = aggregate_segmentation_scores(segmentation_scores(*_masks(i), with_hd95=False) for i in range(3))
    expected.update({f"seg/{k}": agg[k] for k in ("dice", "iou", "sensitivity", "precision")})
    expected["seg/n_cases"] = 3
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got.pop("keys") == list(range(N))
        assert got == pytest.approx(expected, rel=1e-6), rank
