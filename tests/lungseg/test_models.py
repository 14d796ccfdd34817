"""GLANCE model tests: every table row builds and trains, and each block does what the paper specifies.

Models are narrow (widths 16–128) on 64×64 inputs so the whole module stays within a few seconds per test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lungseg.complexity import format_markdown, measure_complexity, report
from lungseg.losses import GlanceLoss, gaussian_center_heatmap
from lungseg.models import (
    MRGAM_WEIGHTINGS,
    TABLE_ROWS,
    VARIANTS,
    ConsensusFusion,
    GlanceNet,
    MRGAMBlock,
    SpatialReductionAttention,
    build_glance,
    get_variant,
)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core box they lose 10× to contention."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


SMALL = {"widths": (16, 32, 64, 128), "stem_channels": (8, 16), "gct_heads": (1, 1, 2, 2), "img_size": 64}
SIZE = 64


def small(variant: str | None = None, **overrides) -> GlanceNet:
    torch.manual_seed(0)
    return build_glance(variant, **{**SMALL, **overrides})


def planted_disk(batch: int = 2, size: int = SIZE) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A bright disk on a noisy background, with its mask and centre heatmap."""
    gen = torch.Generator().manual_seed(0)
    image = 0.2 + 0.05 * torch.rand(batch, 1, size, size, generator=gen)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks, heats = [], []
    for b in range(batch):
        cy, cx, r = 20 + 12 * b, 40 - 10 * b, 6
        disk = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r**2).float()
        image[b, 0][disk.bool()] = 0.8
        masks.append(disk)
        heats.append(torch.from_numpy(gaussian_center_heatmap((size, size), [(cy, cx)], [2 * r])))
    return image, {"mask": torch.stack(masks)[:, None], "heatmap": torch.stack(heats)[:, None]}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_forward_backward(name: str) -> None:
    model = small(name)
    image, targets = planted_disk()
    out = model(image)
    heads = get_variant(name).model.get("heads", ("seg", "heatmap"))
    assert ("seg" in out) == ("seg" in heads)
    assert ("heatmap" in out) == ("heatmap" in heads)
    for key in ("seg", "heatmap"):
        if key in out:
            assert out[key].shape == (2, 1, SIZE, SIZE)
    if "seg" in heads:
        assert [tuple(a.shape[-2:]) for a in out["aux"]] == [(16, 16), (8, 8), (4, 4)]
    else:
        assert "aux" not in out
    loss = GlanceLoss(**get_variant(name).loss)(out, targets)["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads), (
        "every parameter gets a finite gradient"
    )


@pytest.mark.parametrize("name", ["full", "plain_unet"])
def test_loss_decreases_on_planted_disk(name: str) -> None:
    model = small(name)
    image, targets = planted_disk()
    loss_fn = GlanceLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = loss_fn(model(image), targets)["loss"]
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0], losses


def test_table_rows_are_distinct_configurations() -> None:
    rows = TABLE_ROWS["table4"]
    assert len(rows) == 10 and TABLE_ROWS["table5"] == rows
    configs = {
        (
            tuple(get_variant(r).model.get("streams", ("gct", "mrgam"))),
            get_variant(r).model.get("fusion", "cscf"),
        )
        for r in rows
    }
    assert len(configs) == len(rows)
    assert {get_variant(r).model.get("mrgam_weighting", "global_local") for r in TABLE_ROWS["table6"]} == set(
        MRGAM_WEIGHTINGS
    )
    assert [get_variant(r).loss["lambda_det"] for r in TABLE_ROWS["table7"]] == [0.2, 0.3, 0.4, 0.5]
    assert all(r in VARIANTS for rows in TABLE_ROWS.values() for r in rows)
    with pytest.raises(KeyError, match="valid names"):
        get_variant("no_such_row")


def test_overrides_win_over_presets() -> None:
    model = small("wo_cscf", widths=(8, 16, 32, 64))
    assert model.encoder.widths == (8, 16, 32, 64)
    assert model.encoder.fusion_mode == "none"
    assert model.encoder.skip_channels == (16, 32, 64, 128)  # two streams concatenated


def test_head_priors_set_the_initial_probabilities() -> None:
    model = small("full", seg_prior=0.01)
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        out = model(x)
    assert torch.sigmoid(model.seg_head.bias).item() == pytest.approx(0.01)
    assert torch.sigmoid(model.heatmap_head.bias).item() == pytest.approx(0.01)  # the default heatmap prior
    assert torch.sigmoid(out["seg"]).mean().item() < 0.2  # starts near background, not at 0.5
    default = small("full")
    assert default.seg_head.bias.abs().max().item() < 1.0  # no prior: PyTorch's initialisation
    with pytest.raises(ValueError, match="seg_prior"):
        small("full", seg_prior=1.0)


def test_any_multiple_of_32_and_clear_errors() -> None:
    model = small().eval()
    with torch.no_grad():
        out = model(torch.rand(1, 1, 96, 64))
    assert out["seg"].shape == (1, 1, 96, 64)
    with pytest.raises(ValueError, match="multiple of 32"):
        model(torch.rand(1, 1, 70, 64))
    with pytest.raises(ValueError, match="input channel"):
        model(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="stream kind"):
        small(streams=("gct", "lstm"))


def test_stride4_decoder_upsamples_logits() -> None:
    model = small(full_resolution_decoder=False).eval()
    assert len(model.decoder.stages) == 3
    with torch.no_grad():
        out = model(torch.rand(1, 1, 64, 64))
    assert out["seg"].shape == out["heatmap"].shape == (1, 1, 64, 64)
    assert [a.shape[-1] for a in out["aux"]] == [8, 4]
    assert model.encoder.stem is not None, "the MRGAM stream enters through the stem"
    assert small("single_gct", full_resolution_decoder=False).encoder.stem is None, "nothing needs a stem"


def test_cscf_matches_equation_7() -> None:
    torch.manual_seed(0)
    fusion = ConsensusFusion(channels=16, num_streams=2).eval()
    with torch.no_grad():
        fusion.norm.running_mean.uniform_(-0.5, 0.5)
        fusion.norm.running_var.uniform_(0.5, 2.0)
    fg, fl = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        z = (torch.cat([fg, fl], 1) - fusion.norm.running_mean[None, :, None, None]) / torch.sqrt(
            fusion.norm.running_var[None, :, None, None] + fusion.norm.eps
        )
        z = z * fusion.norm.weight[None, :, None, None] + fusion.norm.bias[None, :, None, None]
        hidden = F.relu(F.conv2d(z.mean((2, 3), keepdim=True), fusion.gate.fc1.weight, fusion.gate.fc1.bias))
        gamma = torch.sigmoid(F.conv2d(hidden, fusion.gate.fc2.weight, fusion.gate.fc2.bias))
        expected = gamma * F.conv2d(z, fusion.proj.weight) + fg + fl
        assert torch.allclose(fusion([fg, fl]), expected, atol=1e-5)
    assert gamma.shape == (2, 16, 1, 1)


def test_consensus_map_feeds_both_streams() -> None:
    seen: dict[str, torch.Tensor] = {}

    def grab(name):
        def hook(module, args):
            seen[name] = args[0]

        return hook

    for fusion, shared in (("cscf", True), ("none", False)):
        model = small(fusion=fusion).eval()
        model.encoder.streams["gct"][1].register_forward_pre_hook(grab("gct"))
        model.encoder.streams["mrgam"][1].register_forward_pre_hook(grab("mrgam"))
        with torch.no_grad():
            model(torch.rand(1, 1, SIZE, SIZE))
        assert (seen["gct"] is seen["mrgam"]) == shared


@pytest.mark.parametrize("weighting", MRGAM_WEIGHTINGS)
def test_mrgam_weightings(weighting: str) -> None:
    torch.manual_seed(0)
    block = MRGAMBlock(16, dilations=(1, 3, 5), groups=4, weighting=weighting, context_channels=16).eval()
    x, ctx = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        out = block(x, ctx)
        alpha = block.branch_weights(x, ctx)
        alpha_other_ctx = block.branch_weights(x, 3 * torch.randn(2, 16, 8, 8))
    assert out.shape == x.shape
    if weighting == "conv1x1":
        assert alpha is None
        return
    assert alpha.shape == (2, 3)
    assert torch.allclose(alpha.sum(1), torch.ones(2))
    if weighting == "uniform":
        assert torch.allclose(alpha, torch.full((2, 3), 1 / 3))
    if weighting in ("uniform", "static", "local_se"):
        assert torch.allclose(alpha, alpha_other_ctx), "these mechanisms ignore the global stream"
    if weighting in ("global_local", "attention"):
        assert not torch.allclose(alpha, alpha_other_ctx), "the gate must listen to the global stream"
    with torch.no_grad():
        branches = [b(x) for b in block.branches]
        expected = x + sum(alpha[:, i, None, None, None] * u for i, u in enumerate(branches))
    assert torch.allclose(out, expected, atol=1e-5)


def test_mrgam_branches_are_grouped_atrous() -> None:
    block = MRGAMBlock(32, dilations=(1, 3, 5), groups=4)
    convs = [branch.conv for branch in block.branches]
    assert [c.dilation for c in convs] == [(1, 1), (3, 3), (5, 5)]
    assert all(c.groups == 4 and c.kernel_size == (3, 3) for c in convs)
    assert all(c.weight.shape == (32, 8, 3, 3) for c in convs)


def test_spatial_reduction_attention_equals_explicit_softmax() -> None:
    torch.manual_seed(0)
    for sr in (1, 2):
        attn = SpatialReductionAttention(dim=16, num_heads=2, sr_ratio=sr).eval()
        x = torch.randn(1, 64, 16)
        with torch.no_grad():
            kv_src = x
            if sr > 1:
                grid = x.transpose(1, 2).reshape(1, 16, 8, 8)
                kv_src = attn.sr_norm(attn.sr(grid).flatten(2).transpose(1, 2))
            q = attn.q(x).reshape(1, 64, 2, 8).transpose(1, 2)
            k, v = attn.kv(kv_src).reshape(1, -1, 2, 2, 8).permute(2, 0, 3, 1, 4)
            assert k.shape[2] == 64 // sr**2
            weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
            expected = attn.proj((weights @ v).transpose(1, 2).reshape(1, 64, 16))
            assert torch.allclose(attn(x, (8, 8)), expected, atol=1e-5)


def test_gct_stage1_patch_embedding_and_positional_embedding() -> None:
    model = small()
    stage1 = model.encoder.streams["gct"][0]
    assert stage1.embed.proj.kernel_size == (4, 4) and stage1.embed.proj.stride == (4, 4)
    assert stage1.pos_embed is not None and stage1.pos_embed.shape == (1, 16, 16, 16)
    assert all(stage.pos_embed is None for stage in model.encoder.streams["gct"][1:])
    srs = [stage.blocks[0].attn.sr_ratio for stage in model.encoder.streams["gct"]]
    assert srs == [8, 4, 1, 1], "full attention only at the two low-resolution stages"


def test_gradient_checkpointing_matches_plain_backward() -> None:
    image, targets = planted_disk()
    grads = []
    for checkpointing in (False, True):
        model = small(gradient_checkpointing=checkpointing)
        loss = GlanceLoss()(model(image), targets)["loss"]
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_attention_gated_transposed_decoder_variant() -> None:
    model = small(skip_gate=True, upsample="transposed", residual_decoder=False)
    image, targets = planted_disk()
    GlanceLoss()(model(image), targets)["loss"].backward()
    assert model.decoder.stages[0].gate is not None


def test_complexity_report_small() -> None:
    model = small()
    rep = measure_complexity(model, image_size=SIZE, variant="full", reference=small("plain_unet"))
    assert (
        sum(c.params for c in rep.components)
        == rep.total_params
        == sum(p.numel() for p in model.parameters())
    )
    assert sum(c.flops for c in rep.components) == rep.total_flops > 0
    by_name = {c.name: c for c in rep.components}
    assert {"GCT", "MRGAM", "CSCF", "PRD"} <= set(by_name)
    # The grouped atrous formula of the paper is exact for our mixer blocks.
    assert by_name["MRGAM"].scoped_flops == pytest.approx(by_name["MRGAM"].paper_flops, rel=0.01)
    assert all(0 < s.fusion_share < 0.5 for s in rep.stages)
    assert rep.ratio is not None and rep.ratio > 1
    text = format_markdown(rep)
    assert "| CSCF |" in text and "Eq. 2 ratio" in text
    assert "| GCT |" in report("wo_cscf", image_size=SIZE, reference_variant=None, **SMALL)


@pytest.mark.slow
def test_full_model_learns_planted_disk() -> None:
    """Longer check: GLANCE segments the disk and puts its heatmap peak on the centre."""
    model = small("full")
    image, targets = planted_disk(batch=2)
    loss_fn = GlanceLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    for _ in range(150):
        optimizer.zero_grad()
        loss_fn(model(image), targets)["loss"].backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        out = model(image)
    pred = (torch.sigmoid(out["seg"]) > 0.5).float()
    inter = (pred * targets["mask"]).sum((1, 2, 3))
    dice = 2 * inter / (pred.sum((1, 2, 3)) + targets["mask"].sum((1, 2, 3)))
    assert dice.min() > 0.8, dice
    for b in range(2):
        peak = torch.argmax(out["heatmap"][b, 0])
        true = torch.argmax(targets["heatmap"][b, 0])
        (py, px), (ty, tx) = divmod(int(peak), SIZE), divmod(int(true), SIZE)
        assert abs(py - ty) <= 2 and abs(px - tx) <= 2
