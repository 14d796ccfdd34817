"""`trainer.precision: bf16-mixed` trains GLANCE (a few CPU steps: finite loss, weights move)."""

from __future__ import annotations

from lungseg.cli import GlanceCLI
from lungseg.data import GlanceDataModule
from lungseg.task import GlanceTask
from tests.lungseg.conftest import BASE_CONFIG, small_config_text
from tests.precision_check import fit_steps


def test_bf16_mixed_training_steps(lidc_root, lidc_cache, tmp_path):
    small = tmp_path / "small.yaml"
    small.write_text(small_config_text(lidc_root, lidc_cache, tmp_path / "runs", logger=False))
    cli = GlanceCLI(
        GlanceTask, GlanceDataModule, args=["--config", str(BASE_CONFIG), "--config", str(small)], run=False
    )
    fit_steps(cli.model, cli.datamodule, "bf16-mixed", steps=2)


def test_glance_loss_of_bf16_outputs_is_computed_in_fp32():
    """bf16 heads give exactly the loss of their fp32 upcast: Dice/focal sums and targets stay fp32."""
    import torch

    from lungseg.losses import GlanceLoss, gaussian_center_heatmap

    gen = torch.Generator().manual_seed(0)
    outputs = {
        "seg": torch.randn(2, 1, 64, 64, generator=gen).bfloat16(),
        "heatmap": torch.randn(2, 1, 64, 64, generator=gen).bfloat16(),
        "aux": [torch.randn(2, 1, 32, 32, generator=gen).bfloat16()],
    }
    mask = torch.zeros(2, 1, 64, 64)
    mask[:, :, 20:31, 30:37] = 1
    heatmap = torch.from_numpy(gaussian_center_heatmap((64, 64), [(25.3, 33.1)], [6.0]))[None, None]
    targets = {"mask": mask, "heatmap": heatmap.expand(2, 1, 64, 64)}
    full_outputs = {"seg": outputs["seg"].float(), "heatmap": outputs["heatmap"].float(),
                    "aux": [outputs["aux"][0].float()]}  # fmt: skip
    half, full = GlanceLoss()(outputs, targets), GlanceLoss()(full_outputs, targets)
    assert half["loss"].dtype == torch.float32
    for key in ("loss", "dice", "focal", "aux"):
        assert torch.equal(half[key], full[key]), key
