"""lungcad.export / lungcad.runtime: ONNX parity of the four networks and the runtime swap in inference.

Small widths and inputs; every parity is max |eager − onnxruntime| ≤ 1e-4 in fp32 on random inputs of a
batch other than the traced one.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from lungcad.export import (  # noqa: E402
    TOLERANCE,
    candidate_spec,
    export_network,
    glance_spec,
    m3net_spec,
    mppn_spec,
    parity,
)
from lungcad.runtime import OnnxCandidateNet, OnnxGlance, OnnxM3Net, OnnxMPPN  # noqa: E402

CLS_SIZES = {32: 8, 64: 12, 96: 16}


@pytest.fixture(scope="module")
def nets():
    from lungcls.models.m3net import create_m3net
    from lungdet.models import build_candidate_net, build_mppn
    from lungseg.models import build_glance

    torch.manual_seed(0)
    stage1 = build_candidate_net("ascrm", width=4, head_channels=8)
    mppn = build_mppn(width=2)
    glance = build_glance(
        "full",
        widths=[16, 32, 64, 128],
        stem_channels=[8, 16],
        gct_heads=[1, 1, 2, 2],
        in_channels=3,
        img_size=64,
    )
    m3net = create_m3net("tiny", in_slices=8)
    for net in (stage1, mppn, glance, m3net):  # non-trivial BatchNorm statistics, as after training
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
        net.eval()
    # Untrained heads answer almost the same everywhere (stage 1 starts at its prior, std 0.01 weights):
    # spread them so candidates and probabilities differ by input and a comparison means something.
    with torch.no_grad():
        torch.nn.init.normal_(stage1.head[-1].weight, std=1.0)
        stage1.head[-1].bias.zero_()
        torch.nn.init.normal_(mppn.classifier[-1].weight, std=20.0)
    return {"stage1": stage1, "mppn": mppn, "seg": glance, "cls": m3net}


@pytest.fixture(scope="module")
def exported(nets, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    specs = {
        "stage1": candidate_spec(nets["stage1"], block=64),
        "mppn": mppn_spec(nets["mppn"]),
        "seg": glance_spec(nets["seg"], 64),
        "cls": m3net_spec(nets["cls"], CLS_SIZES, 8),
    }
    entries = {kind: export_network(spec, out / kind) for kind, spec in specs.items()}
    return {"specs": specs, "entries": entries, "out": out}


@pytest.mark.parametrize("kind", ["stage1", "mppn", "seg", "cls"])
def test_parity_within_tolerance(exported, kind):
    entry = exported["entries"][kind]
    assert entry["format"] == "onnx" and entry["fallback"] is None
    diffs = entry["parity"]["max_abs_diff"]
    assert diffs and max(diffs.values()) <= TOLERANCE
    assert entry["inputs"][0]["shape"][0] == "batch"


def test_eager_networks_untouched_by_export(nets, exported):
    assert not nets["mppn"].training and not any(m.training for m in nets["mppn"].modules())


def test_stage1_spatial_axes_are_dynamic(nets, exported):
    """The candidate net exported on 64³ blocks runs any multiple of 32 (here 32×96×64, batch 1)."""
    from lungdet.models import coordinate_maps

    onnx_net = OnnxCandidateNet(exported["out"] / "stage1.onnx")
    x = torch.rand(1, 1, 32, 96, 64)
    coords = coordinate_maps([[16, 0, 32]], (32, 96, 64), (128, 128, 128))
    with torch.no_grad():
        eager = nets["stage1"](x, coords)
    got = onnx_net(x, coords)
    assert got.shape == eager.shape == (1, 8, 24, 16, 3, 5)
    assert float((got - eager).abs().max()) <= TOLERANCE
    assert (onnx_net.stride, onnx_net.num_anchors, onnx_net.use_coords) == (4, 3, True)
    assert onnx_net.anchor_sizes == tuple(nets["stage1"].anchor_sizes)


def test_detect_scan_same_candidates(nets, exported):
    """Stage 1 over a whole synthetic scan: identical candidate positions, scores within 1e-5."""
    from lungdet.inference import Stage1Inference, detect_scan

    gen = torch.Generator().manual_seed(3)
    scan = torch.rand(80, 72, 70, generator=gen) * 0.3
    zz, yy, xx = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in scan.shape), indexing="ij")
    for c in ((30, 30, 30), (55, 40, 20)):
        scan += 0.7 * (((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) < 16).float()
    settings = Stage1Inference(block_size=64, overlap=0.5, score_threshold=0.0, max_candidates=20)
    eager = detect_scan(nets["stage1"], scan, settings)
    onnx = detect_scan(OnnxCandidateNet(exported["out"] / "stage1.onnx"), scan, settings)
    assert eager.shape[0] >= 5 and onnx.shape == eager.shape
    assert float(eager[:, 0].max() - eager[:, 0].min()) > 1e-3, "scores spread: the order is not a tie-break"
    assert float((onnx[:, 1:] - eager[:, 1:]).abs().max()) <= 1e-4, "same candidates, same order"
    assert float((onnx[:, 0] - eager[:, 0]).abs().max()) <= 1e-5


def test_score_candidates_same_probabilities(nets, exported):
    from lungdet.inference import score_candidates

    scan = torch.rand(40, 60, 60, generator=torch.Generator().manual_seed(4))
    centres = torch.tensor([[20.0, 30.0, 30.0], [2.0, 5.0, 58.0], [39.0, 59.0, 0.0]])
    onnx_mppn = OnnxMPPN(exported["out"] / "mppn.onnx")
    assert onnx_mppn.crop_sizes == nets["mppn"].crop_sizes
    for mirror in (False, True):
        eager = score_candidates(nets["mppn"], scan, centres, chunk_size=2, mirror=mirror)
        onnx = score_candidates(onnx_mppn, scan, centres, chunk_size=2, mirror=mirror)
        assert float(eager.max() - eager.min()) > 1e-3
        assert float((onnx - eager).abs().max()) <= 1e-5


def test_mppn_ensemble(tmp_path):
    from lungdet.inference import score_candidates
    from lungdet.models import build_mppn

    torch.manual_seed(1)
    ensemble = build_mppn(width=2, members=2).eval()
    entry = export_network(mppn_spec(ensemble), tmp_path / "mppn")
    assert entry["attributes"]["members"] == 2
    assert entry["outputs"][0]["shape"] == ["batch", 2, 2]
    assert max(entry["parity"]["max_abs_diff"].values()) <= TOLERANCE
    scan = torch.rand(40, 60, 60, generator=torch.Generator().manual_seed(5))
    centres = torch.tensor([[20.0, 30.0, 30.0], [10.0, 10.0, 10.0]])
    eager = score_candidates(ensemble, scan, centres)
    onnx = score_candidates(OnnxMPPN(tmp_path / "mppn.onnx"), scan, centres)
    assert float((onnx - eager).abs().max()) <= 1e-5


def test_glance_through_slice_probabilities(nets, exported):
    from lungseg.inference import slice_probabilities

    onnx_glance = OnnxGlance(exported["out"] / "seg.onnx")
    chunk = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        for flip in (False, True):
            e_seg, e_heat = slice_probabilities(nets["seg"], chunk, flip)
            o_seg, o_heat = slice_probabilities(onnx_glance, chunk, flip)
            assert float((o_seg - e_seg).abs().max()) <= 1e-5
            assert float((o_heat - e_heat).abs().max()) <= 1e-5
    assert next(onnx_glance.parameters()).device.type == "cpu"
    with pytest.raises(ValueError, match="64, 64"):
        onnx_glance(torch.rand(1, 3, 96, 96))


def test_m3net_logits(nets, exported):
    onnx_m3 = OnnxM3Net(exported["out"] / "cls.onnx")
    patches = {s: torch.rand(4, 1, 8, n, n) for s, n in CLS_SIZES.items()}
    with torch.no_grad():
        eager = nets["cls"](patches).logits
    assert float((onnx_m3(patches).logits - eager).abs().max()) <= TOLERANCE
    with pytest.raises(KeyError, match="missing"):
        onnx_m3({32: patches[32]})


def test_torchscript_fallback_when_an_operator_has_no_onnx_form(nets, tmp_path):
    """Below opset 20 ONNX has no N-D AffineGrid / GridSample (MPPN's injection): TorchScript, same interface."""
    entry = export_network(mppn_spec(nets["mppn"]), tmp_path / "mppn", opset=19)
    assert entry["format"] == "torchscript" and entry["file"] == "mppn.pt"
    assert "affine_grid" in entry["fallback"] or "grid_sampler" in entry["fallback"]
    assert max(entry["parity"]["max_abs_diff"].values()) <= TOLERANCE
    scripted = OnnxMPPN(tmp_path / "mppn.pt")
    assert scripted.crop_sizes == nets["mppn"].crop_sizes
    large = torch.rand(2, 1, 32, 48, 48)
    with torch.no_grad():
        assert float((scripted(large) - nets["mppn"](large)).abs().max()) <= TOLERANCE


def test_parity_detects_a_wrong_export(nets, exported):
    """The check compares against the eager network: another network's export is refused."""
    other = mppn_spec(nets["mppn"])
    for p in other.module.parameters():
        p.data.add_(0.5)
    diffs = parity(other, exported["out"] / "mppn.onnx")
    assert max(diffs.values()) > TOLERANCE
    assert json.dumps(diffs)
    assert np.isfinite(list(diffs.values())).all()


# --------------------------------------------------------------------- a real bundle, command line, analyze


def _compare_reports(torch_report: dict, onnx_report: dict) -> None:
    """Same nodules; measurements within 0.1 mm and 1 % volume; scores within 1e-4."""
    assert len(onnx_report["nodules"]) == len(torch_report["nodules"])
    for a, b in zip(torch_report["nodules"], onnx_report["nodules"]):
        ma, mb = a["measurements"], b["measurements"]
        assert np.linalg.norm(np.subtract(ma["center_world_mm"], mb["center_world_mm"])) <= 0.1
        for key in ("long_axis_mm", "short_axis_mm", "mean_diameter_mm", "max_3d_diameter_mm"):
            assert abs(ma[key] - mb[key]) <= 0.1, key
        assert abs(ma["volume_mm3"] - mb["volume_mm3"]) <= 0.01 * ma["volume_mm3"]
        assert ma["type"] == mb["type"] and a["category"]["category"] == b["category"]["category"]
        assert abs(a["malignancy_probability"] - b["malignancy_probability"]) <= 1e-4
        if a["detection_score"] is not None:
            assert abs(a["detection_score"] - b["detection_score"]) <= 1e-4


def test_export_command_and_analyze_on_onnxruntime(tiny_bundle, tmp_path):
    """`lungcad export` on the tiny bundle, then `lungcad analyze --runtime onnxruntime` against PyTorch on
    one MHD phantom, in detection mode and with a given nodule (segmentation, measurements, M³Net)."""
    import pandas as pd

    from common.io import CTVolume, write_mhd
    from common.synth import generate_scan
    from lungcad import outputs
    from lungcad.cli import main

    onnx_dir = tmp_path / "onnx"
    assert main(["export", "--bundle", str(tiny_bundle), "--format", "onnx", "--out", str(onnx_dir)]) == 0
    document = json.loads((onnx_dir / "export.json").read_text())
    assert document["opset"] == 20 and document["versions"]["onnxruntime"] != "missing"
    assert set(document["models"]) == {"stage1", "mppn", "seg", "cls"}
    for entry in document["models"].values():
        assert entry["format"] == "onnx" and (onnx_dir / entry["file"]).is_file()
        assert max(entry["parity"]["max_abs_diff"].values()) <= TOLERANCE
        assert all(i["shape"][0] == "batch" for i in entry["inputs"] + entry["outputs"])

    scan = generate_scan(0, 2)
    g = scan.geometry
    volume = CTVolume(scan.image, g.spacing, g.origin, np.asarray(g.direction, float).reshape(3, 3), "x")
    path = tmp_path / "case.mhd"
    write_mhd(volume, path)
    world = volume.voxel_to_world(np.asarray(scan.accepted[0].voxel_zyx))[0]
    marks = tmp_path / "marks.csv"
    pd.DataFrame(
        [("case", *world, scan.accepted[0].diameter_mm)],
        columns=["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"],
    ).to_csv(marks, index=False)
    for mode in ([], ["--nodules", str(marks)]):
        reports = {}
        for runtime in ("torch", "onnxruntime"):
            out = tmp_path / f"out_{runtime}_{len(mode)}"
            extra = ["--onnx", str(onnx_dir)] if runtime == "onnxruntime" else []
            argv = ["analyze", str(path), "--bundle", str(tiny_bundle), "--out", str(out), *mode]
            assert main([*argv, "--runtime", runtime, *extra]) == 0
            reports[runtime] = outputs.finished_report(out / "case")
            assert reports[runtime]["parameters"]["runtime"] == runtime
        _compare_reports(reports["torch"], reports["onnxruntime"])
        if not mode:
            a = pd.read_csv(tmp_path / "out_torch_0" / "case" / "results.csv")
            b = pd.read_csv(tmp_path / "out_onnxruntime_0" / "case" / "results.csv")
            assert len(a) == len(b) and len(a) > 0
            np.testing.assert_allclose(
                b[["coordX", "coordY", "coordZ"]], a[["coordX", "coordY", "coordZ"]], atol=1e-3
            )
            np.testing.assert_allclose(b["probability"], a["probability"], atol=1e-4)
        else:
            assert len(reports["torch"]["nodules"]) == 1


def test_analyze_onnxruntime_refuses_a_missing_or_foreign_export(tiny_bundle, tmp_path, capsys):
    from lungcad.cli import main

    (tmp_path / "case.mhd").write_text("never read: the options are refused first")
    argv = ["analyze", str(tmp_path / "case.mhd"), "--bundle", str(tiny_bundle), "--out", str(tmp_path / "o")]
    assert main([*argv, "--runtime", "onnxruntime", "--onnx", str(tmp_path / "nothing")]) == 2
    assert "lungcad export" in capsys.readouterr().err
    assert main([*argv, "--onnx", str(tmp_path / "nothing")]) == 2
    assert "--runtime onnxruntime" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "export.json").write_text(json.dumps({"bundle": {"sha256": "0" * 64}, "models": {}}))
    from lungcad.bundle import Bundle
    from lungcad.runtime import use_exported_models

    with pytest.raises(ValueError, match="another bundle"):
        use_exported_models(Bundle.load(tiny_bundle), foreign)
