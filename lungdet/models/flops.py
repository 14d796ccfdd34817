"""FLOP counting for the lungdet networks with PyTorch's own ``FlopCounterMode`` (no extra dependency).

The bench divides these counts by measured inference time to report achieved GFLOP/s, so they must
count what the model really executes for a given input shape. Counting runs on the ``meta`` device by
default: shapes propagate, nothing is computed, so a full 128³ candidate-net count costs milliseconds
and no memory.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops", "count_parameters"]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_flops(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    device: torch.device | str = "meta",
    by_module: bool = False,
) -> int | tuple[int, dict[str, int]]:
    """Floating-point operations of one forward pass (a multiply-add counts as 2 FLOPs).

    Args:
        model: a network; when it has ``example_inputs(input_shape)`` (``CandidateNet``, ``MPPN``) that
            builds the full argument tuple (e.g. coordinate maps), otherwise one zero tensor is passed.
        input_shape: (B, C, D, H, W) of the image input.
        device: ``"meta"`` (default) counts on a shape-only copy of the model; a real device runs it.
        by_module: also return FLOPs per top-level submodule name.

    Returns:
        Total FLOPs, or ``(total, {module: flops})`` with ``by_module=True``.
    """
    make = getattr(model, "example_inputs", None)
    inputs = make(tuple(input_shape)) if callable(make) else (torch.zeros(*input_shape),)
    target = copy.deepcopy(model).to(device) if str(device) == "meta" else model.to(device)
    inputs = tuple(t.to(device) for t in inputs)
    was_training = target.training
    target.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        target(*inputs)
    target.train(was_training)
    total = int(counter.get_total_flops())
    if not by_module:
        return total
    # Keys are "Root.child.grandchild…"; a container such as a ModuleList is never called itself, so
    # take, per top-level child, the shallowest entries recorded under it.
    shallowest: dict[str, tuple[int, int]] = {}
    for key, counts in counter.get_flop_counts().items():
        parts = key.split(".")
        if len(parts) < 2:
            continue
        top, depth, flops = parts[1], len(parts), int(sum(counts.values()))
        best = shallowest.get(top)
        if best is None or depth < best[0]:
            shallowest[top] = (depth, flops)
        elif depth == best[0]:
            shallowest[top] = (depth, best[1] + flops)
    return total, {top: flops for top, (_, flops) in shallowest.items()}
