"""Parameter and FLOP counting for every network of the three packages, with PyTorch's own ``FlopCounterMode``.

Convention: ``FlopCounterMode`` counts matrix multiplications, convolutions and attention products as
FLOPs = 2 × multiply-accumulates; normalisation, activations, pooling and resizing are not counted. A
counted forward pass runs in eval mode without gradients and restores the training flag afterwards.

On the ``meta`` device shapes propagate and nothing is computed or allocated, so counting a full-size
network costs milliseconds: build the model under ``torch.device("meta")``, or pass ``meta=True`` to count
on a shape-only copy of a real one. Each package keeps its own report (which parts of its model it groups
and how it prints them): ``lungdet.bench``, ``lungseg.complexity``, ``lungcls.complexity``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["FlopCount", "count_flops", "count_parameters"]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one forward pass.

    Attributes:
        total: every counted operation.
        by_module: module path below the model (``"encoder.0.conv"``; ``""`` is the model itself) → the
            FLOPs of the operations run inside that module, its children included. Containers that are
            never called themselves (``ModuleList``, ``ModuleDict``) have no entry; their children do.
    """

    total: int
    by_module: dict[str, int]

    def under(self, prefix: str) -> int:
        """FLOPs inside the module at ``prefix`` (0 when it ran nothing counted)."""
        return self.by_module.get(prefix, 0)

    def top_level(self) -> dict[str, int]:
        """FLOPs per top-level child: its own entry, or the sum of its shallowest recorded descendants."""
        shallowest: dict[str, tuple[int, int]] = {}
        for path, flops in self.by_module.items():
            if not path:
                continue
            parts = path.split(".")
            top, depth = parts[0], len(parts)
            best = shallowest.get(top)
            if best is None or depth < best[0]:
                shallowest[top] = (depth, flops)
            elif depth == best[0]:
                shallowest[top] = (depth, best[1] + flops)
        return {top: flops for top, (_, flops) in shallowest.items()}


def count_flops(model: nn.Module, *inputs: Any, meta: bool = False) -> FlopCount:
    """Count the FLOPs of ``model(*inputs)``.

    Args:
        model: the network (on any device; on ``meta`` nothing is computed).
        *inputs: its positional arguments (tensors, or containers of tensors such as M³Net's patch dict).
        meta: count on a shape-only copy of ``model`` on the meta device (tensor inputs are moved there).

    Returns:
        The total and the per-module counts (:class:`FlopCount`).
    """
    if meta:
        model = copy.deepcopy(model).to("meta")
        inputs = tuple(_to_meta(x) for x in inputs)
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model(*inputs)
    finally:
        model.train(was_training)
    root = type(model).__name__
    by_module: dict[str, int] = {}
    for key, ops in counter.get_flop_counts().items():
        if key == root:
            by_module[""] = int(sum(ops.values()))
        elif key.startswith(root + "."):
            by_module[key[len(root) + 1 :]] = int(sum(ops.values()))
    return FlopCount(int(counter.get_total_flops()), by_module)


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to("meta")
    if isinstance(value, dict):
        return {k: _to_meta(v) for k, v in value.items()}
    if isinstance(value, Iterable) and not isinstance(value, str):
        return type(value)(_to_meta(v) for v in value)
    return value
