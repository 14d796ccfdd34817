"""`lungcad export --bundle BUNDLE --format onnx [--out DIR]`: the bundle's four networks as ONNX models.

Writes ``stage1.onnx``, ``mppn.onnx``, ``seg.onnx``, ``cls.onnx`` and ``export.json`` (opset, package
versions, input/output names and shapes with the dynamic axes by name, each model's attributes, and the
parity max |eager − onnxruntime| measured at export time on random inputs). The default folder is
``BUNDLE/onnx``, where ``lungcad analyze --runtime onnxruntime`` looks. See docs/export.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_SUBFOLDER = "onnx"


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``export`` sub-command."""
    parser = subparsers.add_parser(
        "export", help="export a bundle's networks to ONNX (onnxruntime CPU), with parity checks",
        description=__doc__.splitlines()[0],
    )  # fmt: skip
    parser.add_argument("--bundle", type=Path, required=True, help="model bundle folder (lungcad bundle)")
    parser.add_argument("--format", choices=("onnx",), default="onnx", help="export format (onnx)")
    parser.add_argument("--out", type=Path, help=f"output folder (default: BUNDLE/{DEFAULT_SUBFOLDER})")
    parser.add_argument(
        "--opset", type=int, help="ONNX opset (default 20; lower ones fall back to TorchScript)"
    )
    parser.add_argument(
        "--stage1-block", type=int, default=64,
        help="side of the stage-1 block traced (any multiple of 32 runs afterwards; default 64)",
    )  # fmt: skip
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from lungcad.bundle import Bundle
    from lungcad.export import OPSET, export_bundle, max_parity

    bundle = Bundle.load(args.bundle)
    out = args.out or Path(args.bundle) / DEFAULT_SUBFOLDER
    path = export_bundle(
        bundle, out, opset=args.opset or OPSET, stage1_block=args.stage1_block, progress=print
    )
    worst = max_parity(json.loads(path.read_text(encoding="utf-8")))
    print(f"lungcad export: wrote {path} (max |eager − onnxruntime| {worst:.2e})")
    return 0
