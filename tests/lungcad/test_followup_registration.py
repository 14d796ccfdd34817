"""Registration and matching on longitudinal phantoms, against the truth manifest (issue 22 acceptance:
registered nodule centres median ≤ 2 mm, 95th percentile ≤ 4 mm; matching from the true lists F1 ≥ 0.98),
and the checks that flag a registration that did not converge."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from common.io import read_volume
from common.synth.followup import make_followup, read_truth
from lungcad.followup.matching import gate_mm, match_nodules, matching_f1
from lungcad.followup.registration import register


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Every (first, later) pair of 2 phantom patients with 3 time points, registered once."""
    root = tmp_path_factory.mktemp("fu")
    make_followup(root, n_patients=2, n_times=3, seed=11)
    truth = read_truth(root)
    out = []
    for patient in truth["patients"]:
        scans = patient["scans"]
        volumes = [read_volume(root / "detection_3d" / "mhd" / f"{s['uid']}.mhd") for s in scans]
        for a, b in ((0, 1), (1, 2)):
            result = register(volumes[a], volumes[b])
            out.append((patient, a, b, result, volumes[a], volumes[b]))
    return root, out


def test_registration_brings_true_centres_together(pairs, tmp_path):
    _, items = pairs
    errors, unregistered = [], []
    for patient, a, b, result, _, _ in items:
        assert result.converged, result.problems
        assert result.lung_dice_after >= result.lung_dice_before - 0.01
        for nodule in patient["nodules"]:
            pa, pb = nodule["per_time"][a], nodule["per_time"][b]
            if pa["present"] and pb["present"]:
                mapped = result.current_to_prior(np.array([pb["world_xyz"]]))[0]
                errors.append(float(np.linalg.norm(mapped - np.asarray(pa["world_xyz"]))))
                unregistered.append(float(np.linalg.norm(np.subtract(pb["world_xyz"], pa["world_xyz"]))))
    errors = np.asarray(errors)
    assert len(errors) >= 10
    assert np.median(errors) <= 2.0, errors
    assert np.percentile(errors, 95) <= 4.0, errors
    # The transform is saved and reads back as the same mapping.
    result = items[0][3]
    path = result.save(tmp_path / "current_to_prior.tfm")
    back = sitk.ReadTransform(str(path))
    point = (10.0, -20.0, -150.0)
    assert np.allclose(back.TransformPoint(point), result.transform.TransformPoint(point), atol=1e-6)


def test_matching_from_true_lists(pairs):
    _, items = pairs
    predicted, truth_pairs = [], []
    for k, (patient, a, b, result, _, _) in enumerate(items):
        prior = [
            (i, n["per_time"][a]) for i, n in enumerate(patient["nodules"]) if n["per_time"][a]["present"]
        ]
        current = [
            (i, n["per_time"][b]) for i, n in enumerate(patient["nodules"]) if n["per_time"][b]["present"]
        ]
        mapped = result.current_to_prior(np.array([c["world_xyz"] for _, c in current]))
        matches = match_nodules(
            np.array([p["world_xyz"] for _, p in prior]),
            np.array([p["diameter_mm"] for _, p in prior]),
            mapped,
            np.array([c["diameter_mm"] for _, c in current]),
        )
        for m in matches:
            if m.status == "matched":
                predicted.append((k, prior[m.prior_index][0], current[m.current_index][0]))
        ids_b = {i for i, _ in current}
        truth_pairs += [(k, i, i) for i, _ in prior if i in ids_b]
    scores = matching_f1(predicted, truth_pairs)
    assert scores["f1"] >= 0.98, scores


def test_matching_gate_and_unmatched():
    assert gate_mm(4.0, 5.0) == 10.0 and gate_mm(8.0, 12.0) == 18.0
    prior = np.array([[0.0, 0.0, 0.0], [50.0, 0.0, 0.0]])
    current = np.array([[1.0, 0.0, 0.0], [0.0, 40.0, 0.0]])
    matches = match_nodules(prior, [5.0, 5.0], current, [5.0, 5.0])
    assert [(m.prior_index, m.current_index, m.status) for m in matches] == [
        (0, 0, "matched"),
        (1, None, "resolved"),
        (None, 1, "new"),
    ]
    # A far pair inside neither gate is never forced, even when it is the only option.
    assert [m.status for m in match_nodules(prior[:1], [5.0], current[1:], [5.0])] == ["resolved", "new"]


def test_registration_failure_is_flagged(pairs):
    _, items = pairs
    _, _, _, _, prior, current = items[0]
    # The current scan turned a quarter round in-plane without its header saying so: never plausible.
    turned = current.with_array(np.ascontiguousarray(np.rot90(current.array, k=1, axes=(1, 2))))
    result = register(prior, turned)
    assert not result.converged and result.problems
    # No lungs in one scan: flagged, not silently registered.
    empty = register(prior, current, current_lungs=np.zeros(current.shape, np.uint8))
    assert not empty.converged
    assert any("no lungs" in p for p in empty.problems)
