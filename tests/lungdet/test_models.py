"""CLAF networks: candidate-net variants, parameter budget, coordinate channels, MPPN, FLOP counting."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from common.complexity import count_flops, count_parameters
from lungdet.models import (
    CANDIDATE_VARIANTS,
    MPPN,
    MPPN_CROP_SIZES,
    ASCRMBlock3d,
    CBAM3d,
    MPPNEnsemble,
    ResidualBlock3d,
    build_candidate_net,
    build_model,
    build_mppn,
    centre_crop,
    coordinate_maps,
    crop_candidates,
    list_models,
    resample_centre,
)

PAPER_STAGE1_PARAMS = 1.77e6  # CLAF (Wang et al. 2025), "Our first-stage detector contains 1.77 M parameters"


def small_inputs(batch: int = 1, side: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, side, side, side, generator=gen)
    starts = [[8 * i, 0, 16] for i in range(batch)]
    return x, coordinate_maps(starts, (side, side, side), [(300, 320, 320)] * batch)


# ------------------------------------------------------------------------------------------ stage 1


@pytest.mark.parametrize("variant", CANDIDATE_VARIANTS)
def test_default_width_matches_the_paper_parameter_budget(variant):
    n = count_parameters(build_candidate_net(variant))
    assert abs(n - PAPER_STAGE1_PARAMS) / PAPER_STAGE1_PARAMS < 0.15, n


def test_width_is_the_size_knob():
    counts = [count_parameters(build_candidate_net("ascrm", w)) for w in (4, 8, 16)]
    assert counts[0] < counts[1] < counts[2]
    assert counts[2] / counts[1] == pytest.approx(4, rel=0.1)  # convs dominate: quadratic in width


def test_variants_use_the_blocks_they_name():
    def kinds(net):
        return {type(m) for m in net.encoder.modules()}

    unet, cbam, ascrm = (build_candidate_net(v, 4) for v in ("unet", "unet_cbam", "ascrm"))
    assert CBAM3d not in kinds(unet) and ASCRMBlock3d not in kinds(unet)
    assert CBAM3d in kinds(cbam) and ASCRMBlock3d not in kinds(cbam)
    assert sum(isinstance(b, ASCRMBlock3d) for b in ascrm.encoder) == 5


def test_small_forward_backward_reaches_every_parameter():
    torch.manual_seed(0)
    net = build_candidate_net("ascrm", width=4)
    x, coords = small_inputs(batch=2)
    out = net(x, coords)
    assert out.shape == (2, 8, 8, 8, 3, 5)
    assert bool(torch.isfinite(out).all())
    out.square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing, missing  # DDP needs every parameter in the graph


@pytest.mark.parametrize("variant", ["unet", "unet_cbam"])
def test_small_forward_of_the_ablation_variants(variant):
    net = build_candidate_net(variant, width=4).eval()
    with torch.no_grad():
        out = net(*small_inputs())
    assert out.shape == (1, 8, 8, 8, 3, 5) and bool(torch.isfinite(out).all())


def test_initial_objectness_follows_the_prior():
    net = build_candidate_net("ascrm", width=4, prior_prob=0.01).eval()
    with torch.no_grad():
        out = net(*small_inputs())
    assert float(torch.sigmoid(out[..., 0]).mean()) == pytest.approx(0.01, rel=0.2)


def test_full_width_128_cube_shape_on_meta_device():
    net = build_candidate_net("ascrm").to("meta").eval()
    x, coords = net.example_inputs((1, 1, 128, 128, 128))
    out = net(x.to("meta"), coords.to("meta"))
    assert out.shape == (1, 32, 32, 32, 3, 5)
    assert net.output_shape((128, 128, 128)) == (32, 32, 32)


def test_coordinate_channels_are_used_and_checked():
    net = build_candidate_net("ascrm", width=4).eval()
    x, coords = small_inputs()
    with torch.no_grad():
        a = net(x, coords)
        b = net(x, coordinate_maps([(200, 250, 250)], (32, 32, 32), [(300, 320, 320)]))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="coordinate_maps"):
        net(x)
    with pytest.raises(ValueError, match="coords must have shape"):
        net(x, coords[:, :, :16])
    with pytest.raises(ValueError, match="multiples of 32"):
        net(torch.zeros(1, 1, 48, 32, 32), None)
    no_coords = build_candidate_net("unet", width=4, use_coords=False).eval()
    with torch.no_grad():
        assert no_coords(x).shape == (1, 8, 8, 8, 3, 5)
    with pytest.raises(ValueError, match="use_coords=False"):
        no_coords(x, coords)
    with pytest.raises(ValueError, match="unknown candidate-net variant"):
        build_candidate_net("resnet")


def test_coordinate_maps_values_and_pooling_exactness():
    m = coordinate_maps((0, 2, 0), (4, 2, 1), (4, 8, 2))
    assert m.shape == (3, 4, 2, 1)
    assert m[0, :, 0, 0].tolist() == pytest.approx([-0.75, -0.25, 0.25, 0.75])
    assert m[1, 0, :, 0].tolist() == pytest.approx([2 * 2.5 / 8 - 1, 2 * 3.5 / 8 - 1])
    assert m[2, 0, 0, 0].item() == pytest.approx(-0.5)
    # 2× average pooling of a crop's map == the map of the same crop on a 2× coarser scan grid
    fine = coordinate_maps([(4, 8, 0), (0, 0, 12)], (8, 8, 8), [(40, 64, 64)] * 2)
    coarse = coordinate_maps([(2, 4, 0), (0, 0, 6)], (4, 4, 4), [(20, 32, 32)] * 2)
    torch.testing.assert_close(nn.functional.avg_pool3d(fine, 2), coarse)
    with pytest.raises(ValueError, match="positive"):
        coordinate_maps((0, 0, 0), (2, 2, 2), (0, 10, 10))


def test_blocks_keep_shape_and_attend():
    x = torch.randn(2, 6, 8, 8, 8)
    for block in (ResidualBlock3d(6, 8), ResidualBlock3d(6, 8, use_cbam=True), ASCRMBlock3d(6, 8, depth=3)):
        y = block(x)
        assert y.shape == (2, 8, 8, 8, 8) and bool((y >= 0).all())
    cbam = CBAM3d(8)
    assert cbam(torch.zeros(1, 8, 5, 5, 5)).abs().sum() == 0  # multiplicative gates
    y = cbam(torch.randn(1, 8, 5, 5, 5))
    y.sum().backward()
    assert cbam.spatial.conv.weight.grad is not None and cbam.channel.mlp[0].weight.grad is not None


# ------------------------------------------------------------------------------------------ stage 2


def test_mppn_has_more_parameters_than_stage_one():
    # CLAF (Wang et al. 2025) Table 1 text: the FP-reduction network "has more parameters" than the 1.77 M detector
    assert count_parameters(build_mppn()) > PAPER_STAGE1_PARAMS


def test_mppn_forward_and_scale_cutting():
    torch.manual_seed(0)
    net = build_mppn(width=2).eval()
    large = torch.rand(2, 1, 32, 48, 48)
    with torch.no_grad():
        logits = net(large)
        explicit = net(large, centre_crop(large, (16, 24, 24)), centre_crop(large, (8, 12, 12)))
    assert logits.shape == (2, 2)
    torch.testing.assert_close(logits, explicit)
    p = net.nodule_probability(logits)
    torch.testing.assert_close(p, torch.softmax(logits, 1)[:, 1])
    single = build_mppn(width=2, num_classes=1).eval()
    with torch.no_grad():
        assert single(large).shape == (2, 1)
    with pytest.raises(ValueError, match="large crops"):
        net(torch.zeros(1, 1, 32, 32, 32))
    with pytest.raises(ValueError, match="medium"):
        net(large, medium=torch.zeros(2, 1, 16, 16, 16))


def test_mppn_ensemble_averages_independent_members():
    torch.manual_seed(0)
    assert isinstance(build_mppn(width=2, members=1), MPPN)
    ens = build_mppn(width=2, members=3).eval()
    assert isinstance(ens, MPPNEnsemble) and len(ens.members) == 3
    assert ens.crop_sizes == MPPN_CROP_SIZES
    assert count_parameters(ens) == 3 * count_parameters(build_mppn(width=2))
    first, second = (next(m.parameters()) for m in ens.members[:2])
    assert not torch.equal(first, second)  # independently initialised
    large = torch.rand(4, 1, 32, 48, 48)
    with torch.no_grad():
        logits = ens(large)
        each = [m.nodule_probability(m(large)) for m in ens.members]
    assert logits.shape == (4, 3, 2)
    torch.testing.assert_close(ens.nodule_probability(logits), torch.stack(each).mean(0))
    with pytest.raises(ValueError, match="members must be"):
        build_mppn(width=2, members=0)
    with pytest.raises(ValueError, match="at least 2"):
        MPPNEnsemble([build_mppn(width=2)])


def test_fpr_task_ensemble_loss_is_the_mean_of_the_members_losses():
    from lungdet.task import FPRTask

    torch.manual_seed(0)
    task = FPRTask(width=2, members=2).eval()
    large, labels = torch.rand(3, 1, 32, 48, 48), torch.tensor([0, 1, 1])
    with torch.no_grad():
        loss = task._loss(task.model(large), labels)
        alone = [F.cross_entropy(m(large), labels) for m in task.model.members]
    torch.testing.assert_close(loss, torch.stack(alone).mean())


def test_mppn_top_down_injection_carries_large_scale_context():
    torch.manual_seed(0)
    net = build_mppn(width=2).eval()
    large = torch.rand(1, 1, 32, 48, 48)
    changed = large.clone()
    changed[..., :4, :, :] = 1.0  # only the periphery, outside the medium and small crops
    medium, small = centre_crop(large, (16, 24, 24)), centre_crop(large, (8, 12, 12))
    torch.testing.assert_close(medium, centre_crop(changed, (16, 24, 24)))
    with torch.no_grad():
        _, ctx_a = net.large(large)
        _, ctx_b = net.large(changed)
        f_med_a, _ = net.medium(medium, ctx_a)
        f_med_b, _ = net.medium(medium, ctx_b)
        f_med_none, _ = net.medium(medium, None)
    assert not torch.allclose(f_med_a, f_med_b)  # the medium branch sees the large crop's context
    assert not torch.allclose(f_med_a, f_med_none)
    with torch.no_grad():
        loss = net(large, medium, small).sum()
    assert torch.isfinite(loss)


def test_resample_centre_aligns_feature_cells():
    ctx = torch.randn(2, 3, 16, 24, 24)
    torch.testing.assert_close(
        resample_centre(ctx, (8, 12, 12)), centre_crop(ctx, (8, 12, 12)), atol=1e-5, rtol=0
    )
    # 3 cells out of 6 do not land on whole cells: sampled at cell positions 1.5, 2.5, 3.5
    ramp = torch.arange(6.0).reshape(1, 1, 1, 6, 1).expand(1, 1, 2, 6, 6)
    out = resample_centre(ramp, (2, 3, 3))
    assert out[0, 0, 0, :, 0].tolist() == pytest.approx([1.5, 2.5, 3.5], abs=1e-5)


def test_crop_candidates_centres_and_pads():
    vol = torch.arange(40 * 50 * 60, dtype=torch.float32).reshape(40, 50, 60)
    crops = crop_candidates(vol, [[20.2, 25.0, 30.0], [1.0, 2.0, 58.0]], size=(32, 48, 48), pad_value=-1)
    assert crops.shape == (2, 1, 32, 48, 48)
    torch.testing.assert_close(crops[0, 0], vol[4:36, 1:49, 6:54])
    assert crops[0, 0, 16, 24, 24] == vol[20, 25, 30]  # the centre voxel sits at size // 2
    assert crops[1, 0, 0, 0, 0] == -1 and crops[1, 0, 15, 22, 24] == vol[0, 0, 58]
    assert crops[1, 0, 16, 24, 24] == vol[1, 2, 58]


# -------------------------------------------------------------------------------- flops and registry


def _flops(net: nn.Module, shape: tuple[int, ...], meta: bool = True):
    return count_flops(net, *net.example_inputs(shape), meta=meta)


def test_count_flops_hand_case_and_meta_equals_real():
    conv = nn.Conv3d(1, 2, 3, padding=1, bias=False)
    assert count_flops(conv, torch.zeros(1, 1, 4, 4, 4), meta=True).total == 2 * 64 * 27 * 2
    net = build_candidate_net("ascrm", width=4)
    real = _flops(net, (1, 1, 32, 32, 32), meta=False)
    assert real.total == _flops(net, (1, 1, 32, 32, 32)).total > 0
    parts = real.top_level()
    assert sum(parts.values()) == real.total and {"stem", "encoder", "head"} <= set(parts)
    # convolutions scale with the voxel count: 128³ costs 8× a 64³ block
    full = _flops(build_candidate_net(), (1, 1, 128, 128, 128)).total
    half = _flops(build_candidate_net(), (1, 1, 64, 64, 64)).total
    assert full / half == pytest.approx(8.0, rel=0.01)
    assert _flops(build_mppn(width=2), (2, 1, 32, 48, 48)).total > 0


def test_registry():
    assert {"claf_unet", "claf_unet_cbam", "claf_ascrm", "mppn"} <= set(list_models())
    assert isinstance(build_model("mppn", width=4), MPPN)
    net = build_model("claf_unet_cbam", width=4)
    assert net.variant == "unet_cbam"
    with pytest.raises(KeyError, match="registered"):
        build_model("retinanet")


# ------------------------------------------------------------------------------- slow learning checks


def _phantom_ball_crops(gen: torch.Generator, batch: int, side: int = 32):
    """Noisy background with one bright ball (5–12 mm) per crop; returns images and (z, y, x, d) boxes."""
    grid = torch.stack(torch.meshgrid(*(torch.arange(side, dtype=torch.float32),) * 3, indexing="ij"))
    images, boxes = [], []
    for _ in range(batch):
        centre = torch.rand(3, generator=gen) * (side - 16) + 8
        diameter = float(torch.rand(1, generator=gen) * 7 + 5)
        inside = ((grid - centre[:, None, None, None]) ** 2).sum(0) <= (diameter / 2) ** 2
        noise = 0.05 * torch.randn(side, side, side, generator=gen)
        images.append((0.2 + noise + 0.6 * inside.float())[None])
        boxes.append(torch.tensor([[*centre.tolist(), diameter]]))
    return torch.stack(images), boxes


@pytest.mark.slow
def test_candidate_net_learns_to_find_a_ball():
    from lungdet.anchors import anchor_grid, assign_targets_batch
    from lungdet.losses import DetectionLoss
    from lungdet.postprocess import candidates_from_prediction

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    net = build_candidate_net("ascrm", width=4)
    loss_fn = DetectionLoss()
    opt = torch.optim.Adam([*net.parameters(), *loss_fn.parameters()], lr=3e-3)
    anchors = anchor_grid((8, 8, 8))
    coords = coordinate_maps([[0, 0, 0]] * 4, (32, 32, 32), [(32, 32, 32)] * 4)
    for _ in range(80):
        x, boxes = _phantom_ball_crops(gen, 4)
        labels, deltas = assign_targets_batch(anchors, boxes)
        res = loss_fn(net(x, coords), labels, deltas)
        opt.zero_grad()
        res.loss.backward()
        opt.step()
    net.eval()
    x, boxes = _phantom_ball_crops(torch.Generator().manual_seed(99), 4)
    with torch.no_grad():
        pred = net(x, coords)
    hits = 0
    for i in range(4):
        top = candidates_from_prediction(pred[i], anchors, score_threshold=0.0)[0]
        truth = boxes[i][0]
        hits += bool((top[1:4] - truth[:3]).norm() < truth[3] / 2)  # the LUNA16 hit criterion
    assert hits >= 3, hits


@pytest.mark.slow
def test_mppn_learns_balls_from_tubes():
    def crops(gen: torch.Generator, n: int):
        grid = torch.stack(
            torch.meshgrid(*(torch.arange(s, dtype=torch.float32) for s in (32, 48, 48)), indexing="ij")
        )
        centre = torch.tensor([16.0, 24.0, 24.0])[:, None, None, None]
        rel = grid - centre
        images, labels = [], []
        for i in range(n):
            if i % 2:  # a nodule: ball of 4–10 mm
                r = float(torch.rand(1, generator=gen) * 3 + 2)
                mask = (rel**2).sum(0) <= r**2
            else:  # a vessel through the centre: tube along a random direction
                axis = torch.randn(3, generator=gen)
                axis = axis / axis.norm()
                along = (rel * axis[:, None, None, None]).sum(0)
                r = float(torch.rand(1, generator=gen) * 1.5 + 1.5)
                mask = ((rel**2).sum(0) - along**2) <= r**2
            noise = 0.05 * torch.randn(32, 48, 48, generator=gen)
            images.append((0.2 + noise + 0.6 * mask.float())[None])
            labels.append(i % 2)
        return torch.stack(images), torch.tensor(labels)

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    net = build_mppn(width=2)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(60):
        x, y = crops(gen, 8)
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    x, y = crops(torch.Generator().manual_seed(99), 16)
    with torch.no_grad():
        p = net.nodule_probability(net(x))
    # ranking, not a 0.5 cut: after 60 steps BatchNorm's running statistics still shift the calibration
    assert roc_auc_score(y.numpy(), p.numpy()) >= 0.9
