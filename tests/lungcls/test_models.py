"""M³Net backbones, stage-1/stage-2 models, freezing policies, complexity counting and the pathology zoo.

Everything runs on tiny networks and small patches (56 slices, 16/16/24 in-plane); the paper-size model is
only ever built on the meta device (no memory, no compute).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lungcls.complexity import (
    PAPER_INPUT_SIZES,
    PAPER_TABLE7,
    REFERENCE_PROFILE_SIZES,
    format_complexity_table,
    measure_complexity,
)
from lungcls.losses import M3NetLoss
from lungcls.models import (
    PATHOLOGY_ZOO,
    M3Net,
    ResNet3DBackbone,
    Timm2DBackbone,
    create_backbone,
    create_m3net,
    create_pathology_classifier,
    create_scale_classifier,
    parameter_breakdown,
    resolve_pathology_model,
)

SLICES = 56
# scale → in-plane size used in the tests (the scale keys keep their paper names).
TEST_SIZES = {32: 16, 64: 16, 96: 24}


def _patches(batch: int = 2, seed: int = 0) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {s: torch.randn(batch, 1, SLICES, n, n, generator=gen) for s, n in TEST_SIZES.items()}


def _labels(batch: int = 2) -> torch.Tensor:
    return torch.arange(batch) % 2


def _tiny(**kwargs) -> M3Net:
    torch.manual_seed(0)
    return create_m3net("tiny", **kwargs)


# ------------------------------------------------------------------------------------------ backbones
def test_resnet3d_stem_matches_reference_layout():
    backbone = ResNet3DBackbone(18, widths=(8, 16, 32, 64))
    conv1 = backbone.net.conv1
    assert conv1.kernel_size == (7, 7, 7)
    assert conv1.stride == (1, 2, 2)
    assert conv1.bias is None
    assert isinstance(backbone.net.maxpool, nn.MaxPool3d)
    feats = backbone(torch.randn(2, 1, SLICES, 32, 32))
    # z: 56 → 56 (stem) → 28 (pool) → 14 → 7 → 4; y, x: 32 → 16 → 8 → 4 → 2 → 1
    assert feats.feature_map.shape == (2, 64, 4, 1, 1)
    assert feats.tokens.shape == (2, 4, 64)
    assert feats.pooled.shape == (2, 64)
    torch.testing.assert_close(feats.pooled, feats.tokens.mean(dim=1))


def test_resnet3d_accepts_patch_without_channel_axis_and_rejects_bad_shapes():
    backbone = ResNet3DBackbone(10, widths=(4, 8, 8, 8))
    assert backbone(torch.randn(1, SLICES, 16, 16)).pooled.shape == (1, 8)
    with pytest.raises(ValueError, match=r"\(B, 1, Z, Y, X\)"):
        backbone(torch.randn(1, 2, SLICES, 16, 16))
    with pytest.raises(ValueError, match="depth"):
        ResNet3DBackbone(19)


def test_resnet3d_parameter_groups_cover_every_parameter_in_depth_order():
    backbone = ResNet3DBackbone(34, widths=(4, 8, 16, 32))
    groups = backbone.parameter_groups()
    assert len(groups) == 5
    assert groups[0][0] is backbone.net.conv1.weight
    flat = [id(p) for g in groups for p in g]
    assert sorted(flat) == sorted(id(p) for p in backbone.parameters())


def test_timm_backbone_reads_slices_as_channels_and_resizes_in_plane():
    plain = Timm2DBackbone("test_convnext", in_slices=SLICES)
    assert plain.model.stem[0].in_channels == SLICES
    feats = plain(torch.randn(2, 1, SLICES, 32, 32))
    assert feats.tokens.shape == (2, 1, plain.num_features)  # stride 32 → a single position
    upsampled = Timm2DBackbone("test_convnext", in_slices=SLICES, input_size=64)
    feats = upsampled(torch.randn(2, SLICES, 16, 16))
    assert feats.feature_map.shape[-2:] == (2, 2)
    assert feats.tokens.shape == (2, 4, upsampled.num_features)
    assert feats.pooled.shape == (2, upsampled.num_features)


def test_timm_token_model_drops_class_token():
    vit = Timm2DBackbone("test_vit", in_slices=SLICES)
    feats = vit(torch.randn(1, 1, SLICES, 32, 32))
    assert feats.feature_map.shape[1] == feats.tokens.shape[1] + vit.model.num_prefix_tokens


def test_timm_backbone_errors_name_the_fix():
    backbone = Timm2DBackbone("test_convnext", in_slices=SLICES)
    with pytest.raises(ValueError, match="in_slices"):
        backbone(torch.randn(1, 1, 40, 32, 32))
    with pytest.raises(ValueError, match="unknown backbone"):
        create_backbone("no_such_net")
    with pytest.raises(TypeError, match="resnet3d"):
        create_backbone("test_convnext", widths=(8, 8, 8, 8))
    with pytest.raises(TypeError, match="timm 2D"):
        create_backbone("resnet3d18", input_size=64)


def test_create_backbone_dispatches_by_name():
    assert isinstance(create_backbone("resnet3d10", widths=(4, 4, 4, 4)), ResNet3DBackbone)
    assert isinstance(create_backbone("test_resnet", in_slices=8), Timm2DBackbone)


# ---------------------------------------------------------------------------------- stage 1 / stage 2
def test_scale_classifier_outputs_logits_and_learns_signal():
    clf = create_scale_classifier(64, "tiny")
    out = clf(_patches(2)[64])
    assert out.logits.shape == (2, 2)
    out.logits.sum().backward()
    assert clf.backbone.net.conv1.weight.grad is not None


@pytest.mark.parametrize("mode", ["spatial", "pooled", "logits"])
def test_m3net_token_modes(mode):
    model = _tiny(token_mode=mode)
    out = model(_patches())
    assert out.logits.shape == (2, 2)
    assert set(out.scale_logits) == set(out.embeddings) == {32, 64, 96}
    assert all(z.shape == (2, model.embed_dim) for z in out.embeddings.values())
    n_tokens = {s: t.shape[1] for s, t in out.tokens.items()}
    if mode == "spatial":
        assert n_tokens == {32: 4, 64: 4, 96: 4}  # 2×2 ConvNeXt map; 4×1×1 ResNet maps at 16 and 24 px
    else:
        assert n_tokens == {32: 1, 64: 1, 96: 1}
    # stage I, stage II and two transformer layers
    assert len(out.attention) == 4
    first = out.attention[0]
    if mode == "logits":
        assert first.shape[-2:] == (2, 2)  # reference code: self-attention over [Z32; Z64]
    else:
        assert first.shape[-2:] == (n_tokens[32], n_tokens[64])
    torch.testing.assert_close(first.sum(-1), torch.ones_like(first.sum(-1)))
    torch.testing.assert_close(out.embeddings[32], out.tokens[32].mean(1))


def test_m3net_embedding_is_projection_of_pooled_features():
    model = _tiny().eval()
    with torch.no_grad():
        out = model(_patches())
        proj = model.projections["96"]
        torch.testing.assert_close(out.embeddings[96], proj(out.features[96].pooled))


@pytest.mark.parametrize(
    ("flags", "n_attn", "n_seq"),
    [
        ({"use_lsf": False}, 3, 4 + 4 + 4),  # Z32, Z64 pass through; T2 attends to both
        ({"use_hsf": False}, 3, 4 + 4),  # [T1; Z96]
        ({"use_transformer": False}, 2, 4 + 4),  # [T1; T2] pooled directly
        ({"use_lsf": False, "use_hsf": False}, 2, 12),  # transformer only
    ],
)
def test_module_ablations(flags, n_attn, n_seq):
    model = _tiny(**flags)
    out = model(_patches())
    assert out.logits.shape == (2, 2)
    assert len(out.attention) == n_attn
    if flags.get("use_transformer", True):
        assert out.attention[-1].shape[-1] == n_seq


@pytest.mark.parametrize("scales", [(32,), (32, 96), (64, 96)])
def test_scale_subsets(scales):
    model = _tiny(scales=scales)
    assert model.scales == scales
    out = model(_patches())
    assert out.logits.shape == (2, 2)
    assert set(out.embeddings) == set(scales)


def test_m3net_missing_scale_is_a_clear_error():
    model = _tiny()
    patches = _patches()
    del patches[64]
    with pytest.raises(KeyError, match="missing"):
        model(patches)


def _grad_state(model: M3Net) -> dict[str, bool]:
    return {name: p.grad is not None and bool(p.grad.abs().sum() > 0) for name, p in model.named_parameters()}


def _backward(model: M3Net) -> None:
    model.train()
    out = model(_patches())
    M3NetLoss()(out, _labels())["loss"].backward()


def test_freeze_none_trains_everything():
    model = _tiny(freeze="none")
    _backward(model)
    missing = [n for n, has in _grad_state(model).items() if not has]
    assert not missing
    assert len(model.trainable_parameters()) == len(list(model.parameters()))


def test_freeze_all_trains_only_projections_fusion_and_head():
    model = _tiny(freeze="all")
    bn = model.branch(64).backbone.net.bn1
    before = bn.running_mean.clone()
    _backward(model)
    assert not model.branch(64).training  # frozen branches stay in eval mode
    torch.testing.assert_close(bn.running_mean, before)
    for name, has_grad in _grad_state(model).items():
        p = dict(model.named_parameters())[name]
        if name.startswith("branches."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad and has_grad, name
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable == {id(p) for n, p in model.named_parameters() if not n.startswith("branches.")}


def test_freeze_lower_freezes_stem_and_first_stages_only():
    model = _tiny(freeze="lower", frozen_groups=2)
    stem_bn = model.branch(96).backbone.net.bn1
    deep_bn = model.branch(96).backbone.net.layer4[0].bn1
    stem_before, deep_before = stem_bn.running_mean.clone(), deep_bn.running_mean.clone()
    _backward(model)
    torch.testing.assert_close(stem_bn.running_mean, stem_before)
    assert not torch.equal(deep_bn.running_mean, deep_before)
    grads = _grad_state(model)
    params = dict(model.named_parameters())
    for s in model.scales:
        groups = model.branch(s).backbone.parameter_groups()
        frozen = {id(p) for g in groups[:2] for p in g}
        for name, p in params.items():
            if not name.startswith(f"branches.{s}."):
                continue
            if id(p) in frozen:
                assert not p.requires_grad and p.grad is None, name
            else:
                assert p.requires_grad and grads[name], name
    assert all(grads[n] for n in params if not n.startswith("branches."))


def test_freeze_policy_can_be_reapplied_and_validates():
    model = _tiny(freeze="all")
    model.set_freeze_policy("none")
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="frozen_groups"):
        model.set_freeze_policy("lower", frozen_groups=99)
    with pytest.raises(ValueError, match="freeze"):
        model.set_freeze_policy("most")


def test_load_branch_weights_from_stage1_checkpoint():
    torch.manual_seed(1)
    stage1 = create_scale_classifier(32, "tiny")
    checkpoint = {f"model.{k}": v for k, v in stage1.state_dict().items()} | {"optimizer_step": torch.ones(1)}
    model = _tiny()
    model.load_branch_weights(32, checkpoint, prefix="model.")
    for key, value in stage1.state_dict().items():
        torch.testing.assert_close(model.branch(32).state_dict()[key], value)
    with pytest.raises(ValueError, match="starts with"):
        model.load_branch_weights(32, checkpoint, prefix="net.")


def test_backbone_override_and_unknown_preset():
    model = create_m3net("tiny", backbones={32: {"name": "resnet3d10", "widths": (4, 4, 4, 4)}})
    assert isinstance(model.branch(32).backbone, ResNet3DBackbone)
    with pytest.raises(ValueError, match="preset"):
        create_m3net("huge")


# --------------------------------------------------------------------------------- sizes and complexity
@pytest.fixture(scope="module")
def paper_model() -> M3Net:
    """The paper configuration on the meta device: real shapes, no memory, no compute."""
    with torch.device("meta"):
        return create_m3net("paper")


def test_paper_model_has_table7_parameter_count(paper_model):
    parts = parameter_breakdown(paper_model)
    # ConvNeXt-Base with a 56-channel stem, 3D ResNet-34, 3D ResNet-18 (each with its 2-class head)
    assert parts["branch32"] == pytest.approx(87.68e6, rel=1e-3)
    assert parts["branch64"] == pytest.approx(63.47e6, rel=1e-3)
    assert parts["branch96"] == pytest.approx(33.16e6, rel=1e-3)
    assert parts["total"] == pytest.approx(PAPER_TABLE7["params_m"] * 1e6, rel=0.03)
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")


def test_reduced_presets_are_cpu_sized():
    with torch.device("meta"):
        small = create_m3net("small")
    assert parameter_breakdown(small)["total"] < 10e6
    assert parameter_breakdown(_tiny())["total"] < 1e6


def test_complexity_table_at_paper_and_reference_sizes(paper_model):
    model = paper_model
    rows = measure_complexity(model, PAPER_INPUT_SIZES)
    assert [r.part for r in rows] == [
        "branch 32",
        "branch 64",
        "branch 96",
        "projections",
        "fusion + head",
        "total",
    ]
    assert all(r.flops == 2 * r.macs for r in rows)
    assert rows[-1].macs == pytest.approx(sum(r.macs for r in rows[:-1]), rel=1e-6)
    assert rows[-1].params == parameter_breakdown(model)["total"]
    # at the real sizes the model is far above the paper's 20.08 "GFLOPs"
    assert rows[-1].macs > 2 * PAPER_TABLE7["gflops_reported"] * 1e9
    ref = {r.part: r for r in measure_complexity(model, REFERENCE_PROFILE_SIZES)}
    # thop MACs of the same 3D ResNets on a 32×32×56 patch (thop adds BatchNorm, hence the tolerance)
    assert ref["branch 64"].macs == pytest.approx(2.984e9, rel=0.01)
    assert ref["branch 96"].macs == pytest.approx(1.736e9, rel=0.01)
    table = format_complexity_table(rows)
    assert table.count("\n") == len(rows) + 1 and "resnet3d34 (3D)" in table


def test_complexity_counts_a_linear_layer_exactly():
    model = _tiny(scales=(64,), use_transformer=False)
    rows = {r.part: r for r in measure_complexity(model, {64: (SLICES, 16, 16)}, batch_size=2)}
    proj = model.projections["64"]
    tokens = 4  # 4×1×1 map
    assert rows["projections"].macs == tokens * proj.in_features * proj.out_features


# ------------------------------------------------------------------------------------------- pathology
@pytest.mark.parametrize(
    ("name", "timm_name"),
    [
        ("ResNet", "resnet50"),
        ("SE-ResNet", "seresnet50"),
        ("se_resnet", "seresnet50"),
        ("Vision Transformer", "vit_base_patch16_224"),
        ("Swin-Transformer", "swin_tiny_patch4_window7_224"),
        ("InceptionV4", "inception_v4"),
        ("Res2Net", "res2net50_26w_4s"),
        ("resnet18", "resnet18"),
    ],
)
def test_pathology_names_resolve(name, timm_name):
    assert resolve_pathology_model(name) == timm_name


def test_pathology_zoo_covers_the_papers_families():
    assert set(PATHOLOGY_ZOO) == {
        "ResNet",
        "EfficientNet",
        "ResNeXt",
        "Res2Net",
        "SE-ResNet",
        "ViT",
        "Inception-v4",
        "ConvNeXt",
        "Swin",
    }
    with pytest.raises(ValueError, match="unknown pathology"):
        resolve_pathology_model("CABNet")


@pytest.mark.parametrize("family", ["Swin", "SE-ResNet"])
def test_pathology_classifier_shapes_on_meta(family):
    with torch.device("meta"):
        model = create_pathology_classifier(family, 6, in_chans=1, img_size=96)
        assert model(torch.empty(2, 1, 96, 96)).shape == (2, 6)


def test_pathology_classifier_trains_on_cpu():
    model = create_pathology_classifier("test_resnet", 3, in_chans=1)
    logits = model(torch.randn(2, 1, 64, 64))
    assert logits.shape == (2, 3)
    nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()
    assert all(p.grad is not None for p in model.parameters())


# ----------------------------------------------------------------------------------------------- learning
def _blob_batch(n: int, seed: int) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Nested patches of a centred sphere whose radius carries the label (big = malignant)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    patches = {}
    for scale, size in TEST_SIZES.items():
        z, y, x = torch.meshgrid(
            torch.arange(SLICES) - SLICES / 2,
            torch.arange(size) - size / 2,
            torch.arange(size) - size / 2,
            indexing="ij",
        )
        dist = (z**2 + y**2 + x**2).sqrt()
        radius = (3.0 + 3.0 * labels.float()).view(n, 1, 1, 1)
        volume = (dist.unsqueeze(0) < radius).float() + 0.3 * torch.randn(
            n, SLICES, size, size, generator=gen
        )
        patches[scale] = volume.unsqueeze(1)
    return patches, labels


@pytest.mark.slow
def test_two_stage_training_learns_a_separable_task():
    torch.manual_seed(0)
    patches, labels = _blob_batch(16, seed=0)
    branches = {}
    for scale in TEST_SIZES:  # stage 1: each scale alone with cross-entropy
        clf = create_scale_classifier(scale, "tiny")
        opt = torch.optim.AdamW(clf.parameters(), lr=3e-3)
        for _ in range(20):
            opt.zero_grad()
            nn.functional.cross_entropy(clf(patches[scale]).logits, labels).backward()
            opt.step()
        branches[scale] = clf
    model = M3Net(branches, embed_dim=32, freeze="lower", frozen_groups=2)  # stage 2
    criterion = M3NetLoss()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3, weight_decay=1e-5)
    for _ in range(20):
        opt.zero_grad()
        criterion(model(patches), labels)["loss"].backward()
        opt.step()
    test_patches, test_labels = _blob_batch(16, seed=1)
    with torch.no_grad():
        accuracy = (model.eval()(test_patches).logits.argmax(1) == test_labels).float().mean()
    assert accuracy >= 0.9
