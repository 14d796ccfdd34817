"""LUNA16FROC (torchmetrics) equals the numpy evaluation and survives sampler padding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common.metrics.froc import evaluate_froc
from common.metrics.froc_io import FROCInputs, load_froc_inputs
from common.metrics.froc_torch import LUNA16FROC, scan_key_from_uid

CASE = Path(__file__).resolve().parents[1] / "data" / "froc" / "empty_scans"


def load_case() -> FROCInputs:
    return load_froc_inputs(
        CASE / "annotations.csv.gz",
        CASE / "annotations_excluded.csv.gz",
        CASE / "seriesuids.csv.gz",
        CASE / "results.csv.gz",
    )


def per_scan(inp: FROCInputs, scans: list[int]) -> tuple[list, list, list]:
    """Per-scan tensors the way a validation step would produce them."""
    cands, nods, excl = [], [], []
    for s in scans:
        c = inp.cand_scan == s
        cands.append(torch.from_numpy(np.column_stack((inp.cand_xyz[c], inp.cand_prob[c]))))
        for inc, out in ((True, nods), (False, excl)):
            m = (inp.nod_scan == s) & (inp.nod_included == inc)
            out.append(torch.from_numpy(np.column_stack((inp.nod_xyz[m], inp.nod_diameter[m]))))
    return cands, nods, excl


def reference(inp: FROCInputs, reading: str = "interp"):
    return evaluate_froc(
        inp.cand_scan,
        inp.cand_xyz,
        inp.cand_prob,
        inp.nod_scan,
        inp.nod_xyz,
        inp.nod_diameter,
        inp.nod_included,
        len(inp.seriesuids),
        reading=reading,
    )


@pytest.mark.parametrize("reading", ["interp", "nearest"])
def test_metric_equals_numpy_evaluation(reading: str) -> None:
    inp = load_case()
    metric = LUNA16FROC(reading=reading)
    scans = list(range(len(inp.seriesuids)))
    for start in range(0, len(scans), 3):
        batch = scans[start : start + 3]
        metric.update(batch, *per_scan(inp, batch))
    out = metric.compute()
    ref = reference(inp, reading)
    assert float(out["cpm"]) == pytest.approx(ref.cpm, abs=1e-6)
    for rate, sens in zip(ref.fp_rates, ref.sensitivities):
        assert float(out[f"sens@{rate:g}"]) == pytest.approx(sens, abs=1e-6)
    np.testing.assert_array_equal(metric.compute_result().sensitivities, ref.sensitivities)


def test_duplicate_scan_submissions_count_once() -> None:
    inp = load_case()
    scans = list(range(len(inp.seriesuids)))
    metric = LUNA16FROC()
    metric.update(scans, *per_scan(inp, scans))
    # DistributedSampler padding repeats scans; the repeat must not add marks or nodules.
    metric.update(scans[:4], *per_scan(inp, scans[:4]))
    result = metric.compute_result()
    ref = reference(inp)
    assert result.counts.n_scans == ref.counts.n_scans
    assert result.counts.n_candidates == ref.counts.n_candidates
    np.testing.assert_array_equal(result.sensitivities, ref.sensitivities)


def test_reset_and_bad_input() -> None:
    metric = LUNA16FROC()
    metric.update([1], [torch.tensor([[0.0, 0.0, 0.0, 0.9]])], [torch.tensor([[0.0, 0.0, 0.0, 6.0]])])
    assert float(metric.compute()["cpm"]) == pytest.approx(1.0)
    metric.reset()
    metric.update([1], [torch.zeros(0, 4)], [torch.tensor([[0.0, 0.0, 0.0, 6.0]])])
    assert float(metric.compute()["cpm"]) == 0.0
    with pytest.raises(ValueError, match="shape"):
        metric.update([2], [torch.zeros(3, 3)], [torch.zeros(0, 4)])
    with pytest.raises(ValueError, match="NaN"):
        metric.update([2], [torch.tensor([[float("nan"), 0, 0, 0.5]])], [torch.zeros(0, 4)])
    with pytest.raises(ValueError, match="one of each per scan"):
        metric.update([2, 3], [torch.zeros(0, 4)], [torch.zeros(0, 4)])


def test_scan_key_from_uid_is_stable() -> None:
    key = scan_key_from_uid("1.3.6.1.4.1.99999.1.1000")
    assert key == scan_key_from_uid("1.3.6.1.4.1.99999.1.1000")
    assert 0 <= key < 2**62 and key != scan_key_from_uid("1.3.6.1.4.1.99999.1.1001")
