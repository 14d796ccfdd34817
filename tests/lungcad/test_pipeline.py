"""lungcad.pipeline: in-memory preprocessing equals the cache, detection and given-nodule analysis on phantoms."""

from __future__ import annotations

import numpy as np
import pytest

from common.cache import PreprocessedCache
from common.datasets.registry import open_dataset
from common.io import CTVolume, read_volume
from lungcad.bundle import Bundle
from lungcad.pipeline import Analysis, analyze_volume, claf_view, prepare_scan
from lungdet.scan_reader import ScanReader

#: A solid 8 mm nodule at this continuous voxel (z, y, x) of the phantom (not on a voxel centre).
NODULE_ZYX = (24.3, 40.6, 37.4)
NODULE_DIAMETER_MM = 8.0


def phantom(direction: np.ndarray | None = None) -> CTVolume:
    """A chest phantom: air around a 40 HU body with two −850 HU lungs and one solid 8 mm nodule.

    Anisotropic voxels (0.7 × 0.7 × 1.25 mm) and, by default, a direction that flips x and y (the LIDC
    orientation), so any world/voxel mix-up moves the reported centre.
    """
    spacing = np.array([0.7, 0.7, 1.25])  # x, y, z
    shape = (48, 96, 128)
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    mm = [z * spacing[2], y * spacing[1], x * spacing[0]]
    array = np.full(shape, -1000.0)
    body = ((mm[1] - 33.6) / 31) ** 2 + ((mm[2] - 44.8) / 42) ** 2 <= 1
    array[body] = 40.0
    for cx in (26.0, 63.6):
        lung = ((mm[1] - 33.6) / 24) ** 2 + ((mm[2] - cx) / 15) ** 2 + ((mm[0] - 30) / 26) ** 2 <= 1
        array[lung] = -850.0
    centre_mm = np.array(NODULE_ZYX) * spacing[::-1]
    nodule = sum(((m - c) ** 2 for m, c in zip(mm, centre_mm))) <= (NODULE_DIAMETER_MM / 2) ** 2
    array[nodule] = 20.0
    direction = np.diag([-1.0, -1.0, 1.0]) if direction is None else direction
    return CTVolume(array.astype(np.int16), tuple(spacing), (120.0, 80.0, -200.0), direction, "phantom")


@pytest.fixture(scope="module")
def bundle(tiny_bundle) -> Bundle:
    return Bundle.load(tiny_bundle)


def test_in_memory_preprocessing_equals_the_cache(tiny_bundle_env, bundle):
    """The arrays analysis prepares in memory are the cached ones, and so is what CLAF sees of them."""
    cache = PreprocessedCache(tiny_bundle_env["cache"])
    record = open_dataset("lidc", str(tiny_bundle_env["tree"])).records[0]
    volume = read_volume(record.image_path, series_uid=record.series_uid)
    pre = bundle.models["stage1"].preprocessing
    scan = prepare_scan(volume, pre["cache"], uid=record.uid)
    image, mask, entry = cache.load(record.uid)
    assert entry["lung_mask_source"] == "computed"
    np.testing.assert_array_equal(scan.image, image)
    np.testing.assert_array_equal(scan.lung_mask, mask)
    for key in ("shape", "spacing", "origin", "direction"):
        np.testing.assert_allclose(scan.entry[key], entry[key])
    reader = ScanReader(
        cache, tuple(pre["window_hu"]), pre["mask_outside_lung"], pre["outside_hu"], pre["lung_margin"]
    )
    np.testing.assert_array_equal(claf_view(scan, pre), reader.whole(record.uid))


def _check_labels(analysis: Analysis) -> None:
    labels = analysis.labels
    assert labels.shape == analysis.volume.shape and labels.dtype == np.uint16
    assert set(np.unique(labels)) - {0} == {f.index for f in analysis.findings}
    for finding in analysis.findings:
        centre = np.asarray(finding.measurements.center_voxel_xyz)[::-1]
        voxels = np.argwhere(labels == finding.index)
        assert np.min(np.linalg.norm(voxels - centre, axis=1)) <= 1.0, (
            "the label overlays the finding's centre"
        )
        world = analysis.volume.voxel_to_world(centre).reshape(3)
        np.testing.assert_allclose(world, finding.measurements.center_world_mm, atol=1e-6)


def test_detection_mode_labels_overlay_the_findings(bundle, monkeypatch):
    volume = phantom()
    steps = []
    # The tiny models score near chance: take every candidate (threshold 0) so findings exist to check.
    monkeypatch.setitem(bundle.manifest["detection"], "operating_threshold", 0.0)
    analysis = analyze_volume(volume, bundle, progress=steps.append)
    assert {"preprocess", "detect", "fpr"} <= set(steps)
    assert set(analysis.timings_s) == {
        "read",
        "preprocess",
        "detect",
        "fpr",
        "segment",
        "measure",
        "classify",
    }
    # the MPPN run's stage1_inference caps stage 1 at 3 candidates
    assert 1 <= len(analysis.candidates) <= 3 and len(analysis.findings) >= 1
    assert list(analysis.candidates.columns[:5]) == ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
    scores = [f.detection_score for f in analysis.findings]
    assert scores == sorted(scores, reverse=True)
    for finding in analysis.findings:
        assert finding.source == "detected" and 0.0 <= finding.malignancy_probability <= 1.0
        assert finding.segmentation in ("glance", "hu-threshold", "sphere")
        assert finding.category.category in ("2", "3", "4A", "4B")
    _check_labels(analysis)
    assert analysis.bundle_info["operating_threshold"] == 0.0


@pytest.mark.parametrize("direction", [None, np.eye(3)], ids=["flipped", "identity"])
def test_given_nodule_is_reported_at_its_centre(bundle, direction):
    volume = phantom(direction)
    truth = volume.voxel_to_world(np.array(NODULE_ZYX)).reshape(3)
    given = np.array([[*(truth + [1.0, -0.8, 0.6]), 0.0]])  # a reader's click, 1.4 mm off; size unknown
    analysis = analyze_volume(volume, bundle, nodules_world_mm=given)
    assert analysis.timings_s["detect"] == 0.0 and analysis.candidates.empty
    (finding,) = analysis.findings
    assert finding.source == "given" and finding.detection_score is None
    m = finding.measurements
    assert np.linalg.norm(np.asarray(m.center_world_mm) - truth) <= 1.5
    centre_voxel = np.asarray(m.center_voxel_xyz)[::-1]
    assert np.linalg.norm((centre_voxel - NODULE_ZYX) * np.array([1.25, 0.7, 0.7])) <= 1.5
    assert m.type == "solid" and abs(m.mean_diameter_mm - NODULE_DIAMETER_MM) <= 1.5
    _check_labels(analysis)
    with pytest.raises(ValueError, match="outside the scan"):
        analyze_volume(volume, bundle, nodules_world_mm=np.array([[1e4, 0.0, 0.0]]))


def test_candidates_equal_the_lungdet_two_stage_path_on_a_cached_scan(tiny_bundle_env, bundle, monkeypatch):
    """What `analyze` scores for a scan is what `lungdet test` scores for it from the cache (FPRTask.score
    on the ScanReader view, stage 1 chained, the bundle's fusion): same positions, same probabilities — also
    with `analyze`'s MPPN in smaller chunks on the CPU than the task's (CPU_MPPN_CHUNK)."""
    import torch

    from lungcad import pipeline

    cache = PreprocessedCache(tiny_bundle_env["cache"])
    record = open_dataset("lidc", str(tiny_bundle_env["tree"])).records[0]
    volume = read_volume(record.image_path, series_uid=record.series_uid)
    monkeypatch.setitem(bundle.manifest["detection"], "operating_threshold", 2.0)  # detection only
    monkeypatch.setattr(pipeline, "CPU_MPPN_CHUNK", 3)
    assert bundle.models["mppn"].task.chunk_size > 3
    analysis = analyze_volume(volume, bundle)
    assert analysis.findings == [] and len(analysis.candidates) > 0

    pre = bundle.models["stage1"].preprocessing
    reader = ScanReader(
        cache, tuple(pre["window_hu"]), pre["mask_outside_lung"], pre["outside_hu"], pre["lung_margin"]
    )
    fpr, stage1 = bundle.models["mppn"].task, bundle.models["stage1"].task
    monkeypatch.setattr(fpr, "stage1_weight", bundle.stage1_weight)
    monkeypatch.setitem(fpr.__dict__, "_stage1", stage1)  # as FPRTask.stage1 keeps it: not a submodule
    scan = {"image": torch.from_numpy(reader.whole(record.uid)), "entry": cache.entry(record.uid)}
    world, final, _, _ = fpr.score(scan)
    order = np.argsort(-final.numpy(), kind="stable")
    np.testing.assert_allclose(analysis.candidates[["coordX", "coordY", "coordZ"]].to_numpy(), world[order])
    np.testing.assert_allclose(analysis.candidates["probability"].to_numpy(), final.numpy()[order])


def test_shared_glance_slices_and_batched_m3net_give_the_per_finding_answers(bundle):
    """Findings share GLANCE slices (each runs once) and M³Net runs on a batch of findings; the maps and
    probabilities are those of one GLANCE pass over each finding's own slices and one M³Net pass each. On a
    CPU the analysis runs CPU_GLANCE_SLICES slices per pass, the reference the task's larger batches."""
    from common.preprocess import clip_hu
    from lungcad.pipeline import CPU_GLANCE_SLICES, GlanceSlices, _glance_item, _malignancy
    from lungseg.inference import predict_scan

    volume = phantom()
    scan = prepare_scan(volume, bundle.models["seg"].preprocessing["cache"])
    task = bundle.models["seg"].task
    assert task.inference.slice_batch_size > CPU_GLANCE_SLICES
    first, second = np.arange(10, 30), np.arange(20, 40)  # two nearby findings: slices 20–29 shared
    glance = GlanceSlices(bundle, scan)
    glance(first)
    shared = glance(second)
    assert glance.slices_run == 30, "the shared slices ran once"
    alone = predict_scan(
        task.model, _glance_item(scan, bundle.models["seg"].preprocessing, second), task.inference
    )
    np.testing.assert_allclose(shared[second].astype(np.float32), alone.probability[second], atol=2e-3)

    hu = clip_hu(np.asarray(volume.array))  # what the pipeline hands M³Net
    centres = [np.array(NODULE_ZYX), np.array([30.0, 50.0, 60.0]), np.array([10.0, 20.0, 90.0])]
    batched = _malignancy(bundle, hu, centres)
    one_by_one = [_malignancy(bundle, hu, [c])[0] for c in centres]
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)


def test_glance_runs_channels_last_on_a_cpu_with_the_contiguous_answers(bundle):
    """On a CPU, GlanceSlices turns GLANCE's weights channels-last (faster oneDNN convolutions); the slice
    probabilities equal those of the contiguous network."""
    import copy

    import torch

    from lungcad.pipeline import GlanceSlices, _glance_item
    from lungseg.inference import probability_slices

    volume = phantom()
    scan = prepare_scan(volume, bundle.models["seg"].preprocessing["cache"])
    task = bundle.models["seg"].task
    contiguous = copy.deepcopy(task.model).to(memory_format=torch.contiguous_format)
    slices = np.arange(18, 30)
    glance = GlanceSlices(bundle, scan)
    weights = [p for p in task.model.parameters() if p.ndim == 4]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    assert not all(p.is_contiguous() for p in weights), "channels-last differs from contiguous here"
    got = glance(slices)
    item = _glance_item(scan, bundle.models["seg"].preprocessing, slices)
    for z, prob in probability_slices(contiguous, item, task.inference):
        np.testing.assert_allclose(
            got[z].astype(np.float32), prob.astype(np.float16).astype(np.float32), atol=1e-3
        )
