"""The one parameter / FLOP counter the three packages share (`common.complexity`)."""

from __future__ import annotations

import torch
from torch import nn

from common.complexity import count_flops, count_parameters


class Pair(nn.Module):
    """Two branches in a ModuleDict (never called itself) fed from a dict, as M³Net is."""

    def __init__(self) -> None:
        super().__init__()
        self.branches = nn.ModuleDict({"a": nn.Conv3d(1, 2, 3, padding=1, bias=False), "b": nn.Linear(4, 3)})

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.branches["a"](inputs["a"]).sum() + self.branches["b"](inputs["b"]).sum()


def test_hand_counts_per_module_on_meta_and_real():
    model = Pair().train()
    inputs = {"a": torch.zeros(1, 1, 4, 4, 4), "b": torch.zeros(5, 4)}
    conv, linear = 2 * 64 * 27 * 2, 2 * 5 * 4 * 3
    real = count_flops(model, inputs)
    meta = count_flops(model, inputs, meta=True)
    assert real == meta
    assert (
        real.total == conv + linear
        and real.under("branches.a") == conv
        and real.under("branches.b") == linear
    )
    assert real.top_level() == {"branches": conv + linear}
    assert model.training and next(model.parameters()).device.type == "cpu"  # flag and weights untouched
    assert count_parameters(model) == 2 * 27 + 4 * 3 + 3
    model.branches["b"].requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 2 * 27
