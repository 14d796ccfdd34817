"""`lungcad followup` end to end on longitudinal phantoms, with analyses made from the true nodule masks
(`followup_helpers`): identity of matches against the truth, statuses, VDT, the JSON Schema, CSV, the HTML
in headless Chromium, the dataset form over three time points, and the refusals / flags for bad input."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from common.dicom import write_dicom_series
from common.io import read_volume, write_mhd
from common.synth.followup import make_followup, read_truth
from lungcad.cli import main
from lungcad.followup.report import SCHEMA_PATH
from lungcad.outputs import SCHEMA_PATH as REPORT_SCHEMA_PATH
from tests.lungcad.chromium import CHROMIUM, SKIP_REASON, dump_dom
from tests.lungcad.followup_helpers import write_truth_analysis
from tests.lungcad.stand_in import use_stand_in_models

jsonschema = pytest.importorskip("jsonschema")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("fu")
    make_followup(root, n_patients=2, n_times=3, seed=21)
    truth = read_truth(root)
    index = {}
    for patient in truth["patients"]:
        for scan in patient["scans"]:
            _, index[scan["uid"]] = write_truth_analysis(root, scan["uid"], root / "analyses")
    return root, truth, index


def _args(root, prior, current, out, *extra):
    return [
        "followup",
        str(root / "analyses" / prior),
        str(root / "analyses" / current),
        "--prior-scan",
        str(root / "detection_3d" / "mhd" / f"{prior}.mhd"),
        "--current-scan",
        str(root / "detection_3d" / "mhd" / f"{current}.mhd"),
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def pair(tree, tmp_path_factory):
    root, truth, index = tree
    out = tmp_path_factory.mktemp("pair")
    assert main(_args(root, "P0001_T1", "P0001_T3", out, "--patient-table", str(root / "patients.csv"))) == 0
    return out, json.loads((out / "followup.json").read_text())


def test_pair_matches_the_truth(tree, pair):
    root, truth, index = tree
    out, doc = pair
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))
    validator.validate(doc)
    report = json.loads((root / "analyses" / "P0001_T1" / "report.json").read_text())
    jsonschema.Draft202012Validator(json.loads(REPORT_SCHEMA_PATH.read_text())).validate(report)
    assert doc["patient_check"] == {"method": "patient-table", "same_patient": True}
    patient = truth["patients"][0]
    kinds = {n + 1: item["kind"] for n, item in enumerate(patient["nodules"])}
    slots = {int(item["nodule_id"].split("-N")[1]): item for item in patient["nodules"]}
    (interval,) = doc["intervals"]
    assert interval["registration"]["converged"] and not doc["flags"]
    assert (out / interval["registration"]["transform_file"]).is_file()
    for n in interval["nodules"]:
        p = index["P0001_T1"].get(n["prior"]["index"]) if n["prior"] else None
        c = index["P0001_T3"].get(n["current"]["index"]) if n["current"] else None
        if n["status"] in ("stable", "growing"):
            assert p == c, n  # the same true nodule on both scans
            if kinds[p] == "stable":
                assert n["growth"]["includes_no_growth"], n
            if kinds[p] == "growing":
                assert n["growth"]["vdt_days"] > 0
                true_vdt = slots[p]["vdt_days"]
                lo, hi = n["growth"]["vdt_interval_days"]
                assert lo < true_vdt * 2.5
        elif n["status"] == "new":
            assert not patient["nodules"][c - 1]["per_time"][0]["present"]
        elif n["status"] == "resolved":
            assert not patient["nodules"][p - 1]["per_time"][2]["present"]
    rows = list(csv.DictReader((out / "followup.csv").open()))
    assert len(rows) == len(interval["nodules"])
    assert {r["status"] for r in rows} >= {"new", "resolved"}


def test_html_opens_in_chromium(pair, tmp_path):
    out, _ = pair
    page = (out / "followup.html").read_text()
    assert "data:image/png;base64," in page and "http://" not in page and "https://" not in page
    if CHROMIUM is None:
        pytest.skip(SKIP_REASON)
    dom = dump_dom(out / "followup.html", tmp_path)
    assert 'data-ready="1"' in dom and "Size over time" in dom


def test_dataset_form_three_time_points(tree, tmp_path):
    root, truth, index = tree
    out = tmp_path / "ds"
    code = main(
        ["followup", "--dataset", "spatiotemporal", "--root", str(root), "--patient", "P0002",
         "--analyses", str(root / "analyses"), "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    doc = json.loads((out / "followup.json").read_text())
    assert [s["id"] for s in doc["scans"]] == ["P0002_T1", "P0002_T2", "P0002_T3"]
    assert len(doc["intervals"]) == 2 and doc["patient_check"]["method"] == "dataset-table"
    # A nodule seen at all three times keeps one track through both intervals.
    assert any(len(t["points"]) == 3 for t in doc["tracks"])
    for t in doc["tracks"]:
        truths = {index[p["scan"]][p["index"]] for p in t["points"]}
        assert len(truths) == 1, t


def test_bad_input(tree, tmp_path, capsys):
    root, truth, index = tree
    table = str(root / "patients.csv")
    # Two patients (the dataset table says so): refused, one line, exit 2.
    assert main(_args(root, "P0001_T1", "P0002_T2", tmp_path / "a", "--patient-table", table)) == 2
    assert "different patients" in capsys.readouterr().err
    # Current dated before prior.
    assert main(_args(root, "P0001_T3", "P0001_T1", tmp_path / "b", "--patient-table", table)) == 2
    assert "dated before" in capsys.readouterr().err
    # No dates at all for MHD input.
    assert main(_args(root, "P0001_T1", "P0001_T2", tmp_path / "c")) == 2
    assert "no date" in capsys.readouterr().err
    # An analyze folder without its image.
    assert main(["followup", str(root / "analyses" / "P0001_T1"), str(root / "analyses" / "P0001_T2"),
                 "--out", str(tmp_path / "d")]) == 2  # fmt: skip
    assert "--prior-scan" in capsys.readouterr().err


def test_dicom_patients_differ(tree, tmp_path, capsys):
    root, truth, index = tree
    folders = []
    for uid, patient in (("P0001_T1", "PAT-A"), ("P0001_T2", "PAT-B")):
        volume = read_volume(root / "detection_3d" / "mhd" / f"{uid}.mhd")
        folder = tmp_path / uid
        write_dicom_series(volume, folder, tags={"0010|0020": patient, "0008|0020": "20200101"})
        folders.append(folder)
    code = main(
        ["followup", str(root / "analyses" / "P0001_T1"), str(root / "analyses" / "P0001_T2"),
         "--prior-scan", str(folders[0]), "--current-scan", str(folders[1]), "--out", str(tmp_path / "o")]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "different patients" in err and "PAT-" not in err


def test_registration_failure_is_flagged(tree, tmp_path):
    root, truth, index = tree
    volume = read_volume(root / "detection_3d" / "mhd" / "P0001_T2.mhd")
    turned = volume.with_array(np.ascontiguousarray(np.rot90(volume.array, k=1, axes=(1, 2))))
    scan = write_mhd(turned, tmp_path / "P0001_T2.mhd")
    args = _args(
        root, "P0001_T1", "P0001_T2", tmp_path / "out", "--patient-table", str(root / "patients.csv")
    )
    args[args.index("--current-scan") + 1] = str(scan)
    assert main(args) == 3
    doc = json.loads((tmp_path / "out" / "followup.json").read_text())
    assert doc["flags"] and not doc["intervals"][0]["registration"]["converged"]
    assert {n["status"] for n in doc["intervals"][0]["nodules"]} == {"unassessed"}


def test_scans_are_analysed_when_needed(tree, tmp_path, monkeypatch):
    """PRIOR / CURRENT as raw scans: analyze's Analyzer runs once per scan (here with a stand-in pipeline
    that segments the true masks), and a second run reuses the finished analyses."""
    import pandas as pd

    from lungcad.lungrads import baseline_category
    from lungcad.measure import measure_nodule
    from lungcad.pipeline import Analysis, Finding

    root, truth, index = tree
    calls = []

    def fake(volume, bundle, *, nodules_world_mm=None, progress=None):
        calls.append(volume.source.name)
        uid = volume.source.name.removesuffix(".mhd")
        truth_labels = read_volume(root / "truth_labels" / f"{uid}.nii.gz").array
        labels = np.zeros(volume.shape, np.uint16)
        findings = []
        for k, value in enumerate(sorted(int(v) for v in np.unique(truth_labels) if v), start=1):
            labels[truth_labels == value] = k
            m = measure_nodule(volume, truth_labels == value)
            category = baseline_category(m.type, m.mean_diameter_mm, m.solid_component_mm)
            findings.append(Finding(k, 0.9, 0.5, m, category, "detected"))
        rows = [(uid, *f.measurements.center_world_mm, 0.9) for f in findings]
        candidates = pd.DataFrame(rows, columns=["seriesuid", "coordX", "coordY", "coordZ", "probability"])
        return Analysis(
            volume, findings, labels, candidates, {"detect": 0.0}, {"name": "fake", "sha256": None}
        )

    use_stand_in_models(monkeypatch, fake)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "bundle.json").write_text("{}\n")
    scans = [str(root / "detection_3d" / "mhd" / f"{uid}.mhd") for uid in ("P0001_T1", "P0001_T2")]
    table = str(root / "patients.csv")
    out = tmp_path / "out"
    args = ["followup", *scans, "--bundle", str(bundle), "--out", str(out), "--patient-table", table]
    assert main(args) == 0
    assert sorted(calls) == ["P0001_T1.mhd", "P0001_T2.mhd"]
    assert (out / "analyses" / "P0001_T1" / "report.json").is_file()
    doc = json.loads((out / "followup.json").read_text())
    assert doc["intervals"][0]["registration"]["converged"]
    assert main(args) == 0 and len(calls) == 2  # finished analyses are reused
    # Without a bundle, a scan that has no analysis is a one-line error.
    assert main(["followup", *scans, "--out", str(tmp_path / "nb"), "--patient-table", table]) == 2


@pytest.mark.slow
def test_followup_with_the_tiny_bundle(tree, tiny_bundle, tmp_path):
    """Raw phantom scans through the real pipeline (the session's tiny, barely trained bundle): the plumbing
    end to end — analyses written, registration, a valid followup.json. Its nodule numbers mean nothing."""
    root, truth, index = tree
    scans = [str(root / "detection_3d" / "mhd" / f"{uid}.mhd") for uid in ("P0001_T1", "P0001_T2")]
    out = tmp_path / "out"
    code = main(
        ["followup", *scans, "--bundle", str(tiny_bundle), "--out", str(out), "--patient-table",
         str(root / "patients.csv")]
    )  # fmt: skip
    assert code in (0, 3)
    doc = json.loads((out / "followup.json").read_text())
    jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text())).validate(doc)
    assert (out / "analyses" / "P0001_T1" / "report.json").is_file()
    assert doc["intervals"][0]["registration"]["converged"]
