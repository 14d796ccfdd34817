"""report.html: one self-contained file, escaped, true geometry, and rendered by a real headless Chromium.

The report dict is hand-built in the report.json layout from a phantom scan (3 LIDC-shaped nodules,
0.88 × 0.88 × 1.25 mm voxels) and its consensus masks, so this file tests the HTML writer alone.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.io import CTVolume
from common.synth.luna16 import scan_volume
from common.synth.scan import default_bank, generate_scan
from lungcad import DISCLAIMER
from lungcad.html_report import MAX_FRAMES, Crop, axial_frames, write_report_html
from tests.lungcad.chromium import CHROMIUM, SKIP_REASON, dump_dom

CATEGORY_3 = {
    "category": "3",
    "descriptor": "Probably benign",
    "management": "6-month LDCT",
    "reason": "solid, mean diameter in [6, 8) <script>alert(1)</script>",
}


def _nodule(volume: CTVolume, mask: np.ndarray, index: int, diameter_mm: float, texture: str) -> dict:
    """One nodule in the report.json layout: centre, volume and axial slice from the mask, the rest made up."""
    zyx = np.argwhere(mask).mean(axis=0)
    return {
        "index": index,
        "label": index,
        "source": "detected",
        "detection_score": 0.95 - 0.1 * index,
        "malignancy_probability": 0.2 * index,
        "measurements": {
            "center_world_mm": volume.voxel_to_world(zyx)[0].tolist(),
            "center_voxel_xyz": zyx[::-1].tolist(),
            "volume_mm3": float(mask.sum() * np.prod(volume.spacing)),
            "long_axis_mm": diameter_mm * 1.1,
            "short_axis_mm": diameter_mm * 0.9,
            "mean_diameter_mm": round(diameter_mm, 1),
            "max_3d_diameter_mm": diameter_mm * 1.2,
            "axial_slice": int(np.argmax(mask.sum(axis=(1, 2)))),
            "mean_hu": -120.0,
            "max_hu": 90.0,
            "type": {"ggo": "ground-glass"}.get(texture, texture),
            "solid_component_mm": 4.0 if texture == "part-solid" else None,
            "solid_volume_mm3": 30.0 if texture == "part-solid" else None,
        },
        "category": CATEGORY_3,
    }


def _report(volume: CTVolume, nodules: list[dict], scan_id: str) -> dict:
    return {
        "schema_version": "1.0",
        "generator": {"name": "lungcad", "version": "0.1.0"},
        "disclaimer": DISCLAIMER,
        "scan": {
            "id": scan_id,
            "format": "mhd",
            "shape_zyx": list(volume.shape),
            "spacing_xyz": list(volume.spacing),
            "origin_xyz": list(volume.origin),
            "direction": volume.direction.ravel().tolist(),
        },
        "bundle": {"name": "tiny & test", "operating_threshold": 0.5},
        "mode": "detection",
        "timings_s": {"read": 0.1, "detect": 1.2},
        "scan_category": CATEGORY_3,
        "nodules": nodules,
    }


@pytest.fixture(scope="module")
def phantom():
    """(report, volume, labels, patient id) of phantom scan 0 of seed 0: its three accepted nodules."""
    scan = generate_scan(0, 0, "small", default_bank())
    volume = scan_volume(scan)
    volume.source = Path(f"/data/{scan.patient_id}/scan.mhd")  # a path that names the patient: never shown
    labels = np.zeros(volume.shape, np.uint16)
    nodules = []
    for finding in (f for f in scan.findings if f.accepted):
        votes = np.zeros(volume.shape, np.int16)
        for reader in finding.reader_masks:
            votes[tuple(slice(s, s + n) for s, n in zip(reader.start, reader.mask.shape))] += reader.mask
        mask = (votes * 2 >= len(finding.reader_masks)) & (labels == 0)
        labels[mask] = len(nodules) + 1
        nodules.append(_nodule(volume, mask, len(nodules) + 1, finding.diameter_mm, finding.texture))
    assert len(nodules) == 3
    return _report(volume, nodules, scan.series_uid), volume, labels, scan.patient_id


@pytest.fixture(scope="module")
def written(phantom, tmp_path_factory):
    report, volume, labels, _ = phantom
    return write_report_html(report, volume, labels, tmp_path_factory.mktemp("report") / "report.html")


def test_report_is_one_self_contained_file(phantom, written):
    report, _, _, patient_id = phantom
    text = written.read_text(encoding="utf-8")
    outside_images = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text)
    assert not re.search(r"https?:|//|url\(|@import|<link|<iframe|<object|<embed", outside_images, re.I)
    for match in re.finditer(r"\b(?:src|href)\s*=\s*[\"']([^\"']*)", text):
        assert match.group(1).startswith(("data:image/png;base64,", "#")), match.group(1)[:60]
    assert "default-src 'none'" in text  # the CSP: the browser may fetch nothing
    assert html.escape(DISCLAIMER) in text
    assert patient_id not in text and "/data/" not in text
    assert text.count('class="nodule-row"') == 3 and text.count('<section class="nodule"') == 3
    assert "<script>alert(1)" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "tiny &amp; test" in text
    size = written.stat().st_size
    print(f"report.html with 3 nodules: {size / 1e6:.2f} MB")
    assert size < 1.6e6


def test_an_empty_report_and_hostile_strings(tmp_path):
    volume = CTVolume(np.full((8, 16, 16), -800, np.int16), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3))
    report = _report(volume, [], '"><img src=x onerror=alert(1)>')
    text = write_report_html(
        report, volume, np.zeros(volume.shape, np.uint16), tmp_path / "r.html"
    ).read_text()
    assert "<img src=x" not in text and "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in text
    assert "No nodule reported." in text
    with pytest.raises(ValueError, match="do not match the scan"):
        write_report_html(report, volume, np.zeros((8, 16, 15), np.uint16), tmp_path / "bad.html")


def _rotation_z(degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


GEOMETRIES = {  # direction matrices: as read, LUNA16's flipped storage, an oblique in-plane rotation
    "identity": np.eye(3),
    "flipped": np.diag([-1.0, -1.0, 1.0]),
    "oblique": _rotation_z(20.0),
}


def _geometry_phantom(direction: np.ndarray) -> tuple[CTVolume, np.ndarray, np.ndarray]:
    """A 16 mm sphere in 0.7 × 0.7 × 2.5 mm voxels with a bright marker 12 mm to the patient's left and one
    12 mm superior, drawn in world mm on a grid of the given direction centred on the sphere in-plane."""
    spacing, shape = (0.7, 0.7, 2.5), (40, 128, 128)
    centre = np.array([45.0, 45.0, 50.0])
    middle = np.array([(shape[2] - 1) / 2, (shape[1] - 1) / 2, 0.0]) * spacing
    origin = np.array([*centre[:2], 0.0]) - direction @ middle
    volume = CTVolume(np.zeros(shape, np.int16), spacing, tuple(origin), direction)
    world = volume.voxel_to_world(np.indices(shape).reshape(3, -1).T).reshape(*shape, 3)
    sphere = np.linalg.norm(world - centre, axis=-1) <= 8.0
    volume.array[:] = np.where(sphere, 30, -850)
    for shift in ([12.0, 0.0, 0.0], [0.0, 0.0, 12.0]):
        volume.array[np.linalg.norm(world - centre - shift, axis=-1) <= 3.0] = 400
    return volume, sphere.astype(np.uint16), centre


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_views_keep_physical_aspect_and_radiological_orientation(geometry):
    volume, labels, centre = _geometry_phantom(GEOMETRIES[geometry])
    crop = Crop(volume, labels, centre, size_mm=48.0, pixels=192)  # 0.25 mm pixels
    for plane in ("axial", "coronal", "sagittal"):
        rows, cols = np.nonzero(crop.mask(plane, 1) >= 0.5)
        height = (rows.max() - rows.min() + 1) * crop.pixel_mm
        width = (cols.max() - cols.min() + 1) * crop.pixel_mm
        # 16 mm within a voxel: 0.7 mm in-plane (1 mm when oblique), 2.5 mm along z (the height of
        # coronal and sagittal views)
        in_plane = 1.0 if geometry == "oblique" else 0.7
        assert abs(height - 16) <= (in_plane if plane == "axial" else 2.5), (plane, height)
        assert abs(width - 16) <= in_plane, (plane, width)
    middle = crop.pixels // 2
    axial, coronal = crop.sample("axial"), crop.sample("coronal")
    # patient left (+x) is on the image's right; superior (+z) is up
    assert axial[middle, middle + 48] > 200 and axial[middle, middle - 48] < -500
    assert coronal[middle - 48, middle] > 200 and coronal[middle + 48, middle] < -500
    frames, start = axial_frames(crop, volume, 1, axial_slice=20)
    # the sphere spans slices 17-23 (z 42.5-57.5 mm); ± 5 mm = 2 slices; inferior to superior
    assert [f.caption.split(",")[0] for f in frames] == [f"slice {k}" for k in range(15, 26)]
    assert frames[start].caption == "slice 20, z 50.0 mm (largest extent)"


# Runs after load, as a user would: reads what rendered, moves the first scroller by its range input and
# by the keyboard, and leaves the observations in a <pre> for --dump-dom.
PROBE = """<script>
window.addEventListener("securitypolicyviolation", function (ev) {
  (window.violations = window.violations || []).push(ev.blockedURI);
});
window.addEventListener("load", function () {
  var rows = document.querySelectorAll("table.summary tbody tr.nodule-row");
  var imgs = document.querySelectorAll("img");
  var fig = document.querySelector("figure.scroller");
  var range = fig.querySelector("input[type=range]");
  function shown() {
    var visible = fig.querySelectorAll("img.slice:not([hidden])");
    return {n_visible: visible.length, src: visible[0].getAttribute("src"),
            width: visible[0].getBoundingClientRect().width, slice: fig.getAttribute("data-slice"),
            caption: fig.querySelector(".slice-caption").textContent, value: range.value};
  }
  var out = {
    rows: Array.prototype.map.call(rows, function (r) {
      return {index: r.cells[0].textContent, height: r.getBoundingClientRect().height}; }),
    images: imgs.length,
    undecoded: Array.prototype.filter.call(imgs, function (i) { return !(i.naturalWidth > 0); }).length,
    frames: Number(fig.getAttribute("data-frames")),
  };
  out.before = shown();
  range.value = String(Number(range.value) + 2);
  range.dispatchEvent(new Event("input", {bubbles: true}));
  out.after_input = shown();
  fig.dispatchEvent(new KeyboardEvent("keydown", {key: "ArrowDown", bubbles: true}));
  out.after_key = shown();
  out.violations = window.violations || [];
  var pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script></body>"""


@pytest.mark.skipif(CHROMIUM is None, reason=SKIP_REASON)
def test_report_renders_in_headless_chromium(written, tmp_path):
    probed = tmp_path / "probed.html"
    probed.write_text(written.read_text(encoding="utf-8").replace("</body>", PROBE), encoding="utf-8")
    screenshot = tmp_path / "report.png"
    dom = dump_dom(
        probed, tmp_path / "chromium-profile", "--window-size=1200,1600", f"--screenshot={screenshot}"
    )
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.DOTALL)
    assert found, dom[-2000:]
    seen = json.loads(html.unescape(found.group(1)))
    assert [r["index"] for r in seen["rows"]] == ["1", "2", "3"]
    assert all(r["height"] > 0 for r in seen["rows"])
    assert seen["images"] > 9 and seen["undecoded"] == 0  # every data-URI PNG decoded
    assert seen["violations"] == []
    before, after, key = seen["before"], seen["after_input"], seen["after_key"]
    assert before["n_visible"] == after["n_visible"] == key["n_visible"] == 1
    assert before["width"] == 192
    assert int(after["slice"]) == int(before["slice"]) + 2 and after["src"] != before["src"]
    assert after["caption"] != before["caption"]
    assert int(key["slice"]) == int(after["slice"]) - 1 and key["value"] == key["slice"]
    with Image.open(screenshot) as image:
        assert image.size == (1200, 1600)
    print(f"screenshot: {screenshot}")


def test_a_long_extent_is_scrolled_with_a_stride_that_keeps_the_largest_slice():
    volume = CTVolume(np.full((120, 24, 24), -800, np.int16), (1.0, 1.0, 0.5), (0.0, 0.0, 0.0), np.eye(3))
    labels = np.zeros(volume.shape, np.uint16)
    labels[10:111, 8:16, 8:16] = 1
    crop = Crop(volume, labels, volume.voxel_to_world((60, 12, 12))[0], size_mm=64.0, pixels=16)
    frames, start = axial_frames(crop, volume, 1, axial_slice=57)
    slices = [int(f.caption.split(",")[0].removeprefix("slice ")) for f in frames]
    assert len(frames) <= MAX_FRAMES and slices[start] == 57
    assert slices[0] <= 10 and slices[-1] >= 108 and len(set(np.diff(slices))) == 1
