"""Validation/test numbers count every sample once: a batch that repeats samples (as DDP's
``DistributedSampler`` pads evaluation sets) leaves every ``val/`` value unchanged, and ``val/loss`` is the
weighted-mean loss over the whole set rather than a mean of batch means.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from common.metrics.classification import CLASSIFICATION_KEYS
from lungcls.task import M3NetTask, PathologyTask

N = 7
DEPTH = 8
SIZES = {32: 12, 64: 12, 96: 16}


def _pathology_batches(parts: list[list[int]]) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(N, 3, 32, 32, generator=gen)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 1])
    return [{"image": images[p], "label": labels[p], "index": torch.tensor(p)} for p in parts]


def _m3net_batches(parts: list[list[int]]) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    patches = {s: torch.randn(N, 1, DEPTH, n, n, generator=gen) for s, n in SIZES.items()}
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 1])
    return [
        {"patches": {s: v[p] for s, v in patches.items()}, "label": labels[p], "index": torch.tensor(p)}
        for p in parts
    ]


def _validate(task, batches: list[dict]) -> dict[str, float]:
    task.eval()
    with torch.no_grad():
        for i, batch in enumerate(batches):
            task.validation_step(batch, i)
    values = {k: float(v) for k, v in task.val_metrics.compute().items()}
    task.val_metrics.reset()
    return values


def test_pathology_validation_ignores_padded_repeats_and_loss_is_the_set_mean() -> None:
    torch.manual_seed(0)
    task = PathologyTask(
        model_name="test_resnet",
        num_classes=3,
        img_size=32,
        class_weights=[1.0, 2.0, 0.5],
        label_smoothing=0.1,
    )
    plain = _validate(task, _pathology_batches([[0, 1, 2, 3], [4, 5, 6]]))
    padded = _validate(task, _pathology_batches([[0, 2, 4, 6], [1, 3, 5, 0]]))  # 7 on 2 ranks, in one process
    assert set(plain) == {"val/loss", *(f"val/{k}" for k in CLASSIFICATION_KEYS)}
    assert padded == pytest.approx(plain, rel=1e-6, nan_ok=True)
    (whole,) = _pathology_batches([list(range(N))])
    with torch.no_grad():
        expected = F.cross_entropy(
            task(whole["image"]), whole["label"], weight=torch.tensor([1.0, 2.0, 0.5]), label_smoothing=0.1
        )
    assert plain["val/loss"] == pytest.approx(float(expected), rel=1e-5)
    assert 0.0 <= plain["val/acc"] <= 1.0


def test_m3net_validation_loss_is_the_per_sample_objective_once_per_sample() -> None:
    torch.manual_seed(0)
    task = M3NetTask(preset="tiny", in_slices=DEPTH, fused_weight=1.0, scale_weight=0.5)
    plain = _validate(task, _m3net_batches([[0, 1, 2, 3], [4, 5, 6]]))
    padded = _validate(task, _m3net_batches([[0, 2, 4, 6], [1, 3, 5, 0]]))
    per_sample = {k: v for k, v in plain.items() if k == "val/loss" or k.startswith("val/ce_")}
    assert set(per_sample) == {"val/loss", "val/ce_fused", "val/ce_32", "val/ce_64", "val/ce_96"}
    assert {k: padded[k] for k in per_sample} == pytest.approx(per_sample, rel=1e-5)
    assert plain["val/loss"] == pytest.approx(
        plain["val/ce_fused"] + 0.5 * sum(plain[f"val/ce_{s}"] for s in SIZES), rel=1e-5
    )
    (whole,) = _m3net_batches([list(range(N))])
    with torch.no_grad():
        fused = F.cross_entropy(task(whole["patches"]).logits, whole["label"])
    assert plain["val/ce_fused"] == pytest.approx(float(fused), rel=1e-5)
