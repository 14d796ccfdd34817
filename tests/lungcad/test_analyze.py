"""`lungcad analyze` and its files.

Writers are checked from a hand-built `Analysis` (a synthetic phantom, its real nodule masks as labels,
measurements and categories from `lungcad.measure` / `lungcad.lungrads`): the report validates against its
JSON Schema, the CSV columns, the NIfTI geometry round trip in SimpleITK and nibabel for identity, flipped
and oblique (also left-handed) directions, and results.csv scored by the official FROC code. The command's
plumbing (inputs, batch, resume, refusals) runs with the pipeline replaced by a stand-in that marks given or
fixed positions (milliseconds); the end-to-end runs with real models use the ``tiny_bundle`` fixture.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk

from common.dicom import write_dicom_series
from common.io import CTVolume, write_mhd, write_nifti
from common.metrics.froc_io import evaluate_froc_files
from lungcad import outputs
from lungcad.cli import main
from lungcad.commands import analyze as analyze_cmd
from tests.lungcad.stand_in import use_stand_in_models

jsonschema = pytest.importorskip("jsonschema")

PATIENT_ID = "PAT-0042-SECRET"
PATIENT_NAME = "Doe^Jane"
BIRTH_DATE = "19450317"
#: Identifying fields a real series carries (must not leak).
SOURCE_TAGS = {"0010|0010": PATIENT_NAME, "0010|0020": PATIENT_ID, "0010|0030": BIRTH_DATE}


# ------------------------------------------------------------------------------------------------ builders


@pytest.fixture(scope="module")
def phantom():
    """A small synthetic scan with at least one accepted nodule (scan 0 of seed 0)."""
    from common.synth import generate_scan

    scan = generate_scan(0, 0)
    assert scan.accepted
    return scan


def _labels(scan) -> np.ndarray:
    """uint16 labels: accepted nodule k (first reader's mask) = k."""
    labels = np.zeros(scan.image.shape, np.uint16)
    for k, finding in enumerate(scan.accepted, start=1):
        reader = finding.reader_masks[0]
        box = tuple(slice(s, s + n) for s, n in zip(reader.start, reader.mask.shape))
        labels[box][reader.mask] = k
    return labels


def _rotation_z(degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


GEOMETRIES = {
    "identity": np.eye(3),
    "flipped": np.diag([-1.0, -1.0, 1.0]),
    "oblique": _rotation_z(25)
    @ np.array([[1, 0, 0], [0, np.cos(0.3), -np.sin(0.3)], [0, np.sin(0.3), np.cos(0.3)]]),
    "left-handed": np.diag([1.0, 1.0, -1.0]) @ _rotation_z(-40),
}


def make_volume(scan, direction: np.ndarray | None = None) -> CTVolume:
    """The phantom's voxels, on its own grid or with another direction about the same origin."""
    g = scan.geometry
    d = np.asarray(g.direction, np.float64).reshape(3, 3) if direction is None else direction
    return CTVolume(scan.image, g.spacing, g.origin, d, series_uid=scan.series_uid)


def make_analysis(volume: CTVolume, labels: np.ndarray, candidates_xyz: np.ndarray | None = None):
    """An `Analysis` as the pipeline would return it, from real labels."""
    from lungcad.lungrads import baseline_category
    from lungcad.measure import measure_nodule
    from lungcad.pipeline import Analysis, Finding

    findings = []
    for k in range(1, int(labels.max()) + 1):
        m = measure_nodule(volume, labels == k)
        category = baseline_category(m.type, m.mean_diameter_mm, m.solid_component_mm)
        findings.append(Finding(k, 0.95 - 0.1 * k, 0.2 + 0.1 * k, m, category, "detected"))
    rows = [(volume.series_uid, *f.measurements.center_world_mm, f.detection_score) for f in findings]
    for j, xyz in enumerate(candidates_xyz if candidates_xyz is not None else []):
        rows.append((volume.series_uid, *xyz, 0.3 / (j + 1)))
    candidates = pd.DataFrame(rows, columns=["seriesuid", "coordX", "coordY", "coordZ", "probability"])
    timings = {s: 0.01 for s in ("read", "preprocess", "detect", "fpr", "segment", "measure", "classify")}
    bundle_info = {"name": "test", "sha256": "0" * 64, "operating_threshold": 0.5, "fusion": "mean"}
    return Analysis(volume, findings, labels, candidates, timings, bundle_info)


def validate(report: dict) -> None:
    jsonschema.Draft202012Validator(outputs.load_schema()).validate(report)


def assert_no_identifiers(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix != ".dcm":
            data = path.read_bytes()
            for secret in (
                PATIENT_ID,
                PATIENT_NAME,
                BIRTH_DATE,
            ):  # none can occur in base64 image data by chance
                assert secret.encode() not in data, f"{secret} in {path}"


# --------------------------------------------------------------------------------------------- writers


def test_outputs_of_a_hand_built_analysis(phantom, tmp_path):
    volume = make_volume(phantom)
    analysis = make_analysis(volume, _labels(phantom), phantom.negative_candidates_xyz[:5])
    scan_id = outputs.scan_id(volume, tmp_path / "x.mhd")
    assert scan_id == "x"
    paths = outputs.write_outputs(
        analysis, tmp_path / scan_id, scan_id, "mhd", parameters={"anonymize": False}
    )
    assert set(paths) == {"report.json", "nodules.csv", "results.csv", "segmentation.nii.gz"} | (
        {"report.html"} if "report.html" in paths else set()
    )
    report = json.loads(paths["report.json"].read_text())
    validate(report)
    assert report == outputs.finished_report(tmp_path / scan_id)
    assert report["scan"]["shape_zyx"] == list(volume.shape)
    assert report["mode"] == "detection" and report["summary"]["n_nodules"] == len(phantom.accepted)
    assert report["summary"]["n_candidates"] == len(phantom.accepted) + 5
    assert report["scan_category"]["category"] == max(
        (n["category"]["category"] for n in report["nodules"]), key=["1", "2", "3", "4A", "4B", "4X"].index
    )
    assert set(report["files"]) == set(paths) - {"report.json"}
    assert report["timings_s"]["write"] >= 0

    table = pd.read_csv(paths["nodules.csv"])
    assert tuple(table.columns[: len(outputs.NODULE_COLUMNS)]) == outputs.NODULE_COLUMNS
    assert len(table) == len(phantom.accepted)
    first = report["nodules"][0]
    assert table.loc[0, "center_x_mm"] == pytest.approx(first["measurements"]["center_world_mm"][0], rel=1e-5)
    assert table.loc[0, "lungrads_category"].__str__() == first["category"]["category"]
    assert table.loc[0, "volume_mm3"] == pytest.approx(first["measurements"]["volume_mm3"], rel=1e-5)

    results = pd.read_csv(paths["results.csv"], dtype={"seriesuid": str})
    assert list(results.columns) == ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
    assert (results["seriesuid"] == scan_id).all() and results["probability"].is_monotonic_decreasing


def test_report_json_is_stable_and_refuses_nan(phantom, tmp_path):
    volume = make_volume(phantom)
    analysis = make_analysis(volume, _labels(phantom))
    report = outputs.build_report(analysis, "x", "mhd")
    assert outputs.report_text(report) == outputs.report_text(json.loads(outputs.report_text(report)))
    analysis.candidates = None
    assert outputs.build_report(analysis, "x", "mhd")["summary"]["n_candidates"] == 0
    analysis.findings[0].malignancy_probability = float("nan")
    with pytest.raises(ValueError, match="malignancy_probability is nan, not a finite number"):
        outputs.build_report(analysis, "x", "mhd")
    analysis.findings[0].malignancy_probability = 0.5
    analysis.bundle_info["operating_threshold"] = float("inf")  # a bundle whose detector never fires
    report = outputs.build_report(analysis, "x", "mhd")
    assert report["bundle"]["operating_threshold"] is None
    validate({**report, "files": {}})


def test_no_nodules_gives_valid_empty_outputs(phantom, tmp_path):
    volume = make_volume(phantom)
    analysis = make_analysis(volume, np.zeros(volume.shape, np.uint16))
    paths = outputs.write_outputs(analysis, tmp_path / "s", "s", "nifti")
    report = json.loads(paths["report.json"].read_text())
    validate(report)
    assert report["nodules"] == [] and report["scan_category"]["category"] == "1"
    assert list(pd.read_csv(paths["nodules.csv"]).columns) == list(outputs.NODULE_COLUMNS)
    assert pd.read_csv(paths["results.csv"]).empty


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_segmentation_keeps_the_original_geometry(phantom, tmp_path, name):
    volume = make_volume(phantom, GEOMETRIES[name])
    labels = _labels(phantom)
    analysis = make_analysis(volume, labels)
    paths = outputs.write_outputs(analysis, tmp_path / name, name, "nifti")
    report = json.loads(paths["report.json"].read_text())

    image = sitk.ReadImage(str(paths["segmentation.nii.gz"]))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), labels)
    np.testing.assert_allclose(image.GetSpacing(), volume.spacing, atol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), volume.origin, atol=1e-4)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), volume.direction, atol=1e-5)

    # nibabel's affine maps (i, j, k) to RAS: the LPS matrix of ITK with x and y negated
    lps = np.eye(4)
    lps[:3, :3] = volume.direction @ np.diag(volume.spacing)
    lps[:3, 3] = volume.origin
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    nifti = nib.load(paths["segmentation.nii.gz"])
    np.testing.assert_allclose(nifti.affine, ras, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(nifti.dataobj).transpose(2, 1, 0), labels)

    # each label's centroid, in world mm through the file's own geometry, is the reported centre
    for nodule in report["nodules"]:
        ijk = np.argwhere(np.asarray(nifti.dataobj) == nodule["label"]).mean(axis=0)
        world_ras = nifti.affine @ np.append(ijk, 1.0)
        world_lps = world_ras[:3] * np.array([-1.0, -1.0, 1.0])
        np.testing.assert_allclose(world_lps, nodule["measurements"]["center_world_mm"], atol=0.05)
        np.testing.assert_allclose(ijk, nodule["measurements"]["center_voxel_xyz"], atol=0.05)


def test_results_csv_is_scored_by_the_official_evaluation(phantom, tmp_path):
    volume = make_volume(phantom)
    analysis = make_analysis(volume, _labels(phantom), phantom.negative_candidates_xyz[:3])
    paths = outputs.write_outputs(analysis, tmp_path / "scan", "scan", "mhd")
    rows = [("scan", *f.world_xyz, f.diameter_mm) for f in phantom.accepted]
    pd.DataFrame(rows, columns=["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]).to_csv(
        tmp_path / "annotations.csv", index=False
    )
    (tmp_path / "excluded.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n")
    (tmp_path / "seriesuids.csv").write_text("scan\n")
    result = evaluate_froc_files(
        tmp_path / "annotations.csv",
        tmp_path / "excluded.csv",
        tmp_path / "seriesuids.csv",
        paths["results.csv"],
        n_bootstrap=0,
    )
    assert result.counts.true_positives == len(phantom.accepted)
    assert result.counts.n_candidates == len(phantom.accepted) + 3
    assert result.cpm == pytest.approx(1.0)


def test_a_tampered_or_partial_folder_is_not_finished(phantom, tmp_path):
    volume = make_volume(phantom)
    paths = outputs.write_outputs(make_analysis(volume, _labels(phantom)), tmp_path / "s", "s", "mhd")
    assert outputs.finished_report(tmp_path / "s") is not None
    paths["nodules.csv"].write_text("edited\n")
    assert outputs.finished_report(tmp_path / "s") is None
    paths["report.json"].write_text('{"schema_version": "1.0", "files": {')
    assert outputs.finished_report(tmp_path / "s") is None
    outputs.clear_outputs(tmp_path / "s")
    assert not any((tmp_path / "s").iterdir())


def test_scan_ids(phantom, tmp_path):
    volume = make_volume(phantom)
    dicom = tmp_path / "series"
    dicom.mkdir()
    assert outputs.scan_id(volume, dicom) == phantom.series_uid
    assert outputs.scan_id(volume, tmp_path / "case 7.nii.gz") == "case_7"
    anon = outputs.scan_id(volume, dicom, anonymize=True)
    assert anon == "anon-" + hashlib.sha256(phantom.series_uid.encode()).hexdigest()[:20]
    with pytest.raises(ValueError, match="unsupported input"):
        outputs.scan_format(tmp_path / "x.png")


# ------------------------------------------------------------------------------- the command's plumbing


def _fake_analyze_volume(volume, bundle, *, nodules_world_mm=None, progress=None):
    """The pipeline's stand-in: a 3 mm ball at each given position, or at the scan centre when detecting."""
    from lungcad.lungrads import baseline_category
    from lungcad.measure import measure_nodule
    from lungcad.pipeline import Analysis, Finding

    for step in ("preprocess", "detect", "fpr", "segment", "measure", "classify"):
        if progress is not None:
            progress(step)
    given = nodules_world_mm is not None
    centres = (
        np.asarray(nodules_world_mm)[:, :3]
        if given
        else volume.voxel_to_world((np.asarray(volume.shape) - 1) / 2.0)
    )
    zz, yy, xx = np.indices(volume.shape)
    labels = np.zeros(volume.shape, np.uint16)
    findings = []
    for k, xyz in enumerate(centres, start=1):
        z, y, x = volume.world_to_voxel(xyz)[0]
        sz, sy, sx = volume.spacing[2], volume.spacing[1], volume.spacing[0]
        labels[((zz - z) * sz) ** 2 + ((yy - y) * sy) ** 2 + ((xx - x) * sx) ** 2 <= 9.0] = k
        m = measure_nodule(volume, labels == k)
        category = baseline_category(m.type, m.mean_diameter_mm, m.solid_component_mm)
        findings.append(
            Finding(k, None if given else 0.9, 0.5, m, category, "given" if given else "detected")
        )
    rows = [] if given else [(volume.series_uid, *centres[0], 0.9)]
    candidates = pd.DataFrame(rows, columns=["seriesuid", "coordX", "coordY", "coordZ", "probability"])
    info = {"name": "fake", "sha256": None}
    return Analysis(volume, findings, labels, candidates, {"detect": 0.0}, info)


@pytest.fixture
def fake_pipeline(monkeypatch, tmp_path):
    """The stand-in pipeline and an (empty) bundle folder; counts the scans it analyzed."""
    calls = []

    def fake(volume, bundle, **kwargs):
        calls.append(volume.series_uid)
        return _fake_analyze_volume(volume, bundle, **kwargs)

    use_stand_in_models(monkeypatch, fake)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "bundle.json").write_text("{}\n")
    return bundle, calls


@pytest.fixture(scope="module")
def small_volume():
    """A 24-slice crop of the phantom (fast to write as DICOM)."""
    from common.synth import generate_scan

    scan = generate_scan(0, 1)
    g = scan.geometry
    return CTVolume(
        scan.image[20:44, 40:120, 40:120].copy(), g.spacing, g.origin, g.direction, scan.series_uid
    )


def _tree(tmp_path: Path, volume: CTVolume) -> Path:
    """A batch folder: one MHD, one NIfTI, one DICOM series (with identifiers in its headers), nested."""
    batch = tmp_path / "batch"
    write_mhd(volume, batch / "a" / "scan_mhd.mhd")
    write_nifti(
        CTVolume(volume.array, volume.spacing, volume.origin, volume.direction), batch / "scan_nii.nii.gz"
    )
    write_dicom_series(
        volume, batch / "b" / "patient" / "series", series_uid="1.2.826.0.1.3680043.8.498.1", tags=SOURCE_TAGS
    )
    return batch


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_batch_run_resumes_and_skips_finished_scans(fake_pipeline, small_volume, tmp_path, capsys):
    bundle, calls = fake_pipeline
    batch = _tree(tmp_path, small_volume)
    out = batch / "out"  # inside the batch folder: must not be taken for input on the second run
    assert main(["analyze", str(batch), "--bundle", str(bundle), "--out", str(out)]) == 0
    assert len(calls) == 3
    ids = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert ids == sorted(["1.2.826.0.1.3680043.8.498.1", "scan_mhd", "scan_nii"])
    for scan_id in ids:
        report = outputs.finished_report(out / scan_id)
        validate(report)
    dicom_report = outputs.finished_report(out / "1.2.826.0.1.3680043.8.498.1")
    assert dicom_report["scan"]["format"] == "dicom"
    assert dicom_report["scan"]["acquisition"]["Modality"] == "CT"
    assert {"seg.dcm", "sr.dcm", "report.html"} <= set(dicom_report["files"])
    seg = pydicom.dcmread(out / "1.2.826.0.1.3680043.8.498.1" / "seg.dcm")
    assert seg.Modality == "SEG" and seg.PatientID == PATIENT_ID  # DICOM objects keep the patient module
    batch_results = pd.read_csv(out / "results.csv", dtype={"seriesuid": str})
    assert sorted(batch_results["seriesuid"]) == ids
    assert len(pd.read_csv(out / "nodules.csv")) == 3
    assert_no_identifiers(out)
    before = _files(out)

    time.sleep(0.01)
    assert main(["analyze", str(batch), "--bundle", str(bundle), "--out", str(out)]) == 0
    assert len(calls) == 3, "finished scans must be skipped"
    assert _files(out) == before
    assert "skipped" in capsys.readouterr().out

    # a partial folder (report.json missing) is redone, the others stay
    (out / "scan_nii" / "report.json").unlink()
    assert main(["analyze", str(batch), "--bundle", str(bundle), "--out", str(out)]) == 0
    assert len(calls) == 4
    assert outputs.finished_report(out / "scan_nii") is not None

    # --overwrite redoes all; other options on a finished folder are refused
    assert main(["analyze", str(batch), "--bundle", str(bundle), "--out", str(out), "--overwrite"]) == 0
    assert len(calls) == 7
    assert (
        main(
            [
                "analyze",
                str(batch / "a" / "scan_mhd.mhd"),
                "--bundle",
                str(bundle),
                "--out",
                str(out),
                "--anonymize",
            ]
        )
        == 0
    )
    assert len(calls) == 8  # an anonymized id is another folder
    series = batch / "b" / "patient" / "series"
    assert main(["analyze", str(series), "--bundle", str(bundle), "--out", str(out), "--anonymize"]) == 0
    (anon,) = [p for p in out.glob("anon-*") if outputs.finished_report(p)["scan"]["format"] == "dicom"]
    for name in ("seg.dcm", "sr.dcm"):
        data = (anon / name).read_bytes()
        assert PATIENT_ID.encode() not in data and PATIENT_NAME.encode() not in data, name
    csv = tmp_path / "given.csv"
    csv.write_text("seriesuid,coordX,coordY,coordZ\n")
    assert (
        main(
            [
                "analyze",
                str(batch / "a" / "scan_mhd.mhd"),
                "--bundle",
                str(bundle),
                "--out",
                str(out),
                "--nodules",
                str(csv),
            ]
        )
        == 2
    )
    assert "other options (nodules_csv" in capsys.readouterr().err


def test_given_nodules_mode(fake_pipeline, small_volume, tmp_path, monkeypatch):
    bundle, calls = fake_pipeline
    import lungcad.pipeline

    given_rows = []
    fake = lungcad.pipeline.analyze_volume

    def recording(volume, bundle, **kwargs):
        given_rows.append(kwargs["nodules_world_mm"])
        return fake(volume, bundle, **kwargs)

    monkeypatch.setattr(lungcad.pipeline, "analyze_volume", recording)
    scan = tmp_path / "in" / "case.mhd"
    write_mhd(small_volume, scan)
    centre = small_volume.voxel_to_world((np.asarray(small_volume.shape) - 1) / 2.0)[0]
    other = centre + np.array([5.0, -4.0, 3.0])
    csv = tmp_path / "given.csv"
    pd.DataFrame(
        [("case", *centre, 6.0), ("elsewhere", 0.0, 0.0, 0.0, 5.0), ("case", *other, 4.0)],
        columns=["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"],
    ).to_csv(csv, index=False)
    out = tmp_path / "out"
    assert (
        main(["analyze", str(scan), "--bundle", str(bundle), "--out", str(out), "--nodules", str(csv)]) == 0
    )
    report = outputs.finished_report(out / "case")
    validate(report)
    assert report["mode"] == "given-nodules" and report["parameters"]["nodules_csv"] == "given.csv"
    assert [n["source"] for n in report["nodules"]] == ["given", "given"]
    assert report["nodules"][0]["detection_score"] is None
    assert given_rows[-1].shape == (2, 4) and given_rows[-1][:, 3].tolist() == [
        6.0,
        4.0,
    ]  # diameters passed on
    for nodule, xyz in zip(report["nodules"], (centre, other)):
        assert np.linalg.norm(np.subtract(nodule["measurements"]["center_world_mm"], xyz)) < 1.5


@pytest.mark.parametrize(
    "text, match",
    [
        ("seriesuid,coordX,coordY\ncase,1,2\n", "lacks column"),
        ("seriesuid,coordX,coordY,coordZ\ncase,1,2,3\ncase,1,abc,3\n", r"row 2 \(line 3\)"),
        ("seriesuid,coordX,coordY,coordZ\ncase,1,nan,3\n", r"row 1 \(line 2\)"),
        ("seriesuid,coordX,coordY,coordZ\ncase,1,2,3\ncase,5000,0,0\n", r"row 2 \(line 3\).*outside"),
    ],
)
def test_bad_nodule_rows_are_one_line_errors(fake_pipeline, small_volume, tmp_path, capsys, text, match):
    bundle, _ = fake_pipeline
    scan = tmp_path / "case.mhd"
    small = CTVolume(small_volume.array, small_volume.spacing, (0.0, 0.0, 0.0), np.eye(3))
    write_mhd(small, scan)
    csv = tmp_path / "given.csv"
    csv.write_text(text)
    assert (
        main(
            [
                "analyze",
                str(scan),
                "--bundle",
                str(bundle),
                "--out",
                str(tmp_path / "o"),
                "--nodules",
                str(csv),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(csv) in err
    import re

    assert re.search(match, err), err


def test_bad_inputs_are_one_line_errors(fake_pipeline, small_volume, tmp_path, capsys):
    bundle, calls = fake_pipeline
    scan = tmp_path / "case.mhd"
    write_mhd(small_volume, scan)
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "outfile").write_text("x")
    from pydicom.data import get_testdata_file  # DICOM files no one here wrote

    for name in ("CT_small.dcm", "MR_small.dcm"):
        (tmp_path / name[:2]).mkdir()
        (tmp_path / name[:2] / name).write_bytes(Path(get_testdata_file(name)).read_bytes())
    cases = [
        ([str(tmp_path / "CT")], "single slice"),
        ([str(tmp_path / "MR")], "CT"),
        ([str(tmp_path / "missing.mhd")], "no such file"),
        ([str(tmp_path / "notes.txt")], "unsupported input"),
        ([str(tmp_path / "empty")], "no scans found"),
        ([str(scan), "--series-uid", "1.2.3"], "--series-uid"),
        ([str(scan), "--out", str(tmp_path / "outfile")], "--out is a file"),
        ([str(scan), "--bundle", str(tmp_path / "nobundle")], "bundle folder not found"),
        ([str(scan), "--nodules", str(tmp_path / "none.csv")], "--nodules file not found"),
    ]
    for extra, match in cases:
        argv = ["analyze", *extra]
        if "--bundle" not in extra:
            argv += ["--bundle", str(bundle)]
        if "--out" not in extra:
            argv += ["--out", str(tmp_path / "out")]
        assert main(argv) == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err, (extra, err)
    assert calls == []


def test_a_failing_scan_does_not_stop_a_batch(fake_pipeline, small_volume, tmp_path, capsys):
    bundle, calls = fake_pipeline
    batch = tmp_path / "batch"
    write_mhd(small_volume, batch / "good.mhd")
    (batch / "bad.mhd").write_text("ObjectType = Image\n")
    assert main(["analyze", str(batch), "--bundle", str(bundle), "--out", str(tmp_path / "out")]) == 2
    assert "1 of 2 scans failed" in capsys.readouterr().err
    assert outputs.finished_report(tmp_path / "out" / "good") is not None


def test_find_inputs_tells_a_dicom_folder_from_a_batch(small_volume, tmp_path):
    series = tmp_path / "series"
    write_dicom_series(small_volume, series)
    assert analyze_cmd.find_inputs(series) == ([series], False)
    batch = _tree(tmp_path, small_volume)
    (batch / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")  # a CD export's index: the root stays a batch
    found, is_batch = analyze_cmd.find_inputs(batch)
    assert is_batch and [p.relative_to(batch).as_posix() for p in found] == [
        "a/scan_mhd.mhd", "b/patient/series", "scan_nii.nii.gz"
    ]  # fmt: skip


# --------------------------------------------------------------------- end to end with trained models


@pytest.fixture
def bundle_dir(tiny_bundle):
    """The four tiny models of tests/lungcad/conftest.py, bundled."""
    return Path(tiny_bundle)


@pytest.fixture(scope="module")
def e2e_phantom():
    """A whole small phantom (lungs, so the lung mask works) with at least one accepted nodule."""
    from common.synth import generate_scan

    scan = generate_scan(0, 2)
    assert scan.accepted
    return scan


def test_end_to_end_detection_on_a_dicom_series(bundle_dir, e2e_phantom, tmp_path):
    """Detection through the real models once (stage 1 dominates the run time; MHD and NIfTI go through the
    same pipeline in the --nodules tests below), then resume."""
    volume = make_volume(e2e_phantom)
    series = tmp_path / "in" / "patient" / "series"
    write_dicom_series(volume, series, series_uid="1.2.826.0.1.3680043.8.498.7", tags=SOURCE_TAGS)
    out = tmp_path / "out"
    assert main(["analyze", str(series), "--bundle", str(bundle_dir), "--out", str(out)]) == 0
    folder = out / "1.2.826.0.1.3680043.8.498.7"
    report = outputs.finished_report(folder)
    validate(report)
    assert report["mode"] == "detection" and report["bundle"]["sha256"] == outputs.sha256(
        bundle_dir / "bundle.json"
    )
    assert set(report["timings_s"]) >= {
        "read",
        "preprocess",
        "detect",
        "fpr",
        "segment",
        "measure",
        "classify",
        "write",
    }
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "segmentation.nii.gz")))
    assert labels.shape == volume.shape and labels.max() == len(report["nodules"])
    assert len(pd.read_csv(folder / "results.csv")) == report["summary"]["n_candidates"]
    assert ("seg.dcm" in report["files"]) == bool(report["nodules"])
    assert_no_identifiers(out)
    before = _files(folder)
    # the parent folder is a batch holding this series: found finished from its headers, skipped
    assert main(["analyze", str(tmp_path / "in"), "--bundle", str(bundle_dir), "--out", str(out)]) == 0
    assert _files(folder) == before
    assert (out / "results.csv").read_bytes() == (folder / "results.csv").read_bytes()


@pytest.mark.parametrize("name, fmt", [("oblique", "dicom"), ("flipped", "mhd"), ("left-handed", "nifti")])
def test_given_nodule_lands_where_it_is_in_any_geometry(bundle_dir, e2e_phantom, tmp_path, name, fmt):
    """A nodule at a known world position (--nodules) is reported within 1.5 mm, in world mm and in voxels,
    and its NIfTI labels (and DICOM SEG) overlay it in the source geometry."""
    volume = make_volume(e2e_phantom, GEOMETRIES[name])
    finding = e2e_phantom.accepted[0]
    voxel_zyx = np.asarray(finding.voxel_zyx)
    world = volume.voxel_to_world(voxel_zyx)[0]
    inputs = tmp_path / "in"
    if fmt == "dicom":
        path = inputs / "series"
        write_dicom_series(volume, path, series_uid="1.2.826.0.1.3680043.8.498.8", tags=SOURCE_TAGS)
        key = "1.2.826.0.1.3680043.8.498.8"
    else:
        path = inputs / ("case.mhd" if fmt == "mhd" else "case.nii.gz")
        (write_mhd if fmt == "mhd" else write_nifti)(volume, path)
        key = "case"
    csv = tmp_path / "marks.csv"
    pd.DataFrame(
        [(key, *world, finding.diameter_mm)],
        columns=["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"],
    ).to_csv(csv, index=False)
    out = tmp_path / "out"
    assert (
        main(["analyze", str(path), "--bundle", str(bundle_dir), "--out", str(out), "--nodules", str(csv)])
        == 0
    )
    report = outputs.finished_report(out / key)
    validate(report)
    (nodule,) = report["nodules"]
    m = nodule["measurements"]
    assert np.linalg.norm(np.subtract(m["center_world_mm"], world)) <= 1.5
    offset_vox = np.subtract(m["center_voxel_xyz"], voxel_zyx[::-1])
    assert np.linalg.norm(offset_vox * np.asarray(volume.spacing)) <= 1.5

    nifti = sitk.ReadImage(str(out / key / "segmentation.nii.gz"))
    labels = sitk.GetArrayFromImage(nifti)
    centre = tuple(int(round(v)) for v in voxel_zyx)
    if fmt != "dicom":  # a left-handed DICOM reads back reversed in z (common.dicom.write_dicom_series)
        assert labels[centre] == 1
        np.testing.assert_allclose(np.reshape(nifti.GetDirection(), (3, 3)), volume.direction, atol=1e-5)
    ijk = np.argwhere(labels == 1).mean(axis=0)[::-1]
    assert (
        np.linalg.norm(np.asarray(nifti.TransformContinuousIndexToPhysicalPoint(ijk.tolist())) - world) <= 1.5
    )
    if fmt == "dicom":
        import highdicom as hd

        seg = hd.seg.segread(out / key / "seg.dcm")
        datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(path.iterdir())]
        datasets.sort(
            key=lambda ds: float(
                np.dot(ds.ImagePositionPatient, np.cross(*np.reshape(ds.ImageOrientationPatient, (2, 3))))
            )
        )
        back = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[ds.SOPInstanceUID for ds in datasets], combine_segments=True
        )
        np.testing.assert_array_equal(back, labels)


def test_demo_writes_its_held_out_scan_as_one_dicom_series(tmp_path):
    from lungcad.demo import write_held_out_dicom
    from lungcad.dicom_input import read_dicom_ct

    folder, uid = write_held_out_dicom(tmp_path / "dicom", seed=0, index=20)
    assert analyze_cmd.find_inputs(folder) == ([folder], False)
    volume, datasets = read_dicom_ct(folder)
    assert volume.series_uid == uid and len(datasets) == volume.shape[0]
    assert datasets[0].FrameOfReferenceUID and datasets[0].PatientName == "Synthetic^Phantom"
