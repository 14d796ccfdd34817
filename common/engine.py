"""How a network runs at inference time on the CPU: eager PyTorch or a faster engine with the same answers.

The inference code of the packages (``lungdet.inference``'s sliding window and candidate scoring) calls
``EngineCache.get(net, engine, example)`` for a callable with the network's own signature (tensors in, one
tensor out) and runs whatever it returns. Engines (``ENGINES``):

- ``"eager"`` — the network itself, fp32, under ``torch.no_grad`` (the reference; always available);
- ``"channels_last"`` — a copy in ``torch.channels_last_3d`` (``channels_last`` for 4-D) memory format, the
  inputs converted too: oneDNN's blocked convolution kernels without layout reorders;
- ``"frozen"`` — TorchScript ``torch.jit.trace`` + ``torch.jit.freeze``: batch norm folded into the
  convolutions and weights constant (oneDNN fusion);
- ``"onnxruntime"`` — the network exported to ONNX in memory and run by onnxruntime's CPU provider (its graph
  optimisations fuse conv + BN + ReLU);
- ``"bf16"`` — eager under ``torch.autocast("cpu", torch.bfloat16)``, only where the CPU has native bf16
  (AVX512-BF16 or AMX, ``native_bf16()``); elsewhere bf16 is emulated and slower than fp32, so the fp32
  eager path runs instead and ``describe`` says so.

Every engine except eager works on a CPU network only; on another device eager runs (``resolve`` says which
ran). A compiled engine is a snapshot of the weights: the cache keys it by the identity and in-place version
counter of every parameter and buffer, so a network trained further (optimiser steps modify the weights in
place) is compiled again, never run with stale weights.
"""

from __future__ import annotations

import copy
import io
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ENGINES", "EngineCache", "describe", "native_bf16", "resolve"]

ENGINES = ("eager", "channels_last", "frozen", "onnxruntime", "bf16")


def native_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels on this CPU (AVX512-BF16 / AMX); False where it would emulate."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve(engine: str, device: torch.device | str) -> str:
    """The engine that actually runs: ``engine`` on a CPU (bf16 only with native support), else eager."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if torch.device(device).type != "cpu":
        return "eager"
    if engine == "bf16" and not native_bf16():
        return "eager"
    return engine


def describe(engine: str, device: torch.device | str) -> str:
    """One line saying which path ran, e.g. ``"bf16 requested: no native bf16 on this CPU, ran fp32 eager"``."""
    ran = resolve(engine, device)
    where = f"{torch.device(device).type}, {torch.get_num_threads()} threads"
    if ran == engine:
        precision = "bf16 autocast" if ran == "bf16" else "fp32"
        return f"{ran} ({precision}; {where})"
    if engine == "bf16" and torch.device(device).type == "cpu":
        return f"bf16 requested: no native bf16 on this CPU (AVX512-BF16/AMX), ran fp32 eager ({where})"
    return f"{engine} requested: CPU-only engine, ran fp32 eager ({where})"


def _memory_format(ndim: int) -> torch.memory_format:
    return torch.channels_last_3d if ndim == 5 else torch.channels_last


def _weights_key(net: nn.Module) -> tuple[Any, ...]:
    return tuple((id(t), t.data_ptr(), t._version) for t in (*net.parameters(), *net.buffers()))


class EngineCache:
    """Compiled engines of networks, reused while the weights and input shapes stay the same.

    ``get(net, engine, example)`` returns a callable taking the same positional tensors as ``net`` and
    returning its (single tensor) output. ``example`` is a tuple of inputs of the shapes that will be run
    (a new shape compiles again for ``frozen``; onnxruntime models have dynamic axes).
    """

    def __init__(self) -> None:
        # per network (weakly held: a network that is gone takes its engines with it) → key → engine
        self._compiled: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], Callable[..., Tensor]]]
        self._compiled = weakref.WeakKeyDictionary()

    def get(self, net: nn.Module, engine: str, example: Sequence[Tensor]) -> Callable[..., Tensor]:
        device = next(net.parameters()).device
        ran = resolve(engine, device)
        if ran == "eager":
            return _eager(net)
        if ran == "bf16":
            return _bf16(net)
        shapes = tuple(tuple(t.shape) for t in example) if ran == "frozen" else ()
        weights = _weights_key(net)
        mine = self._compiled.setdefault(net, {})
        for stale in [k for k in mine if k[2] != weights]:  # compiled from weights the network no longer has
            del mine[stale]
        key = (ran, shapes, weights)
        if key not in mine:
            build = {"channels_last": _channels_last, "frozen": _frozen, "onnxruntime": _onnxruntime}[ran]
            mine[key] = build(net, tuple(example))
        return mine[key]


def _eager(net: nn.Module) -> Callable[..., Tensor]:
    def run(*inputs: Tensor) -> Tensor:
        with torch.no_grad():
            return net(*inputs)

    return run


def _bf16(net: nn.Module) -> Callable[..., Tensor]:
    def run(*inputs: Tensor) -> Tensor:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return net(*inputs).float()

    return run


def _snapshot(net: nn.Module) -> nn.Module:
    return copy.deepcopy(net).eval().requires_grad_(False)


def _channels_last(net: nn.Module, example: tuple[Tensor, ...]) -> Callable[..., Tensor]:
    fmt = _memory_format(example[0].ndim)
    model = _snapshot(net).to(memory_format=fmt)

    def run(*inputs: Tensor) -> Tensor:
        with torch.no_grad():  # not inference_mode: callers (MONAI's stitching) update the output in place
            out = model(
                *(t.contiguous(memory_format=fmt) if t.ndim == example[0].ndim else t for t in inputs)
            )
        return out.contiguous()

    return run


def _frozen(net: nn.Module, example: tuple[Tensor, ...]) -> Callable[..., Tensor]:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings on the network's Python shape checks
        traced = torch.jit.freeze(torch.jit.trace(_snapshot(net), example, check_trace=False))

    def run(*inputs: Tensor) -> Tensor:
        with torch.no_grad():
            return traced(*inputs)

    return run


def _onnxruntime(net: nn.Module, example: tuple[Tensor, ...]) -> Callable[..., Tensor]:
    import onnxruntime as ort

    names = [f"input{i}" for i in range(len(example))]
    axes = {n: {a: f"{n}_{a}" for a in range(t.ndim) if a != 1} for n, t in zip(names, example)}
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _snapshot(net)
        dummy = model(*example)
        axes["output"] = {a: f"output_{a}" for a in range(dummy.ndim)}
        torch.onnx.export(
            model, example, buffer, input_names=names, output_names=["output"], dynamic_axes=axes,
            opset_version=20, dynamo=False,
        )  # fmt: skip
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])

    def run(*inputs: Tensor) -> Tensor:
        feeds = {n: t.detach().float().contiguous().numpy() for n, t in zip(names, inputs)}
        return torch.from_numpy(session.run(None, feeds)[0])

    return run
