"""`lungcad bundle --stage1 RUN --mppn RUN --seg RUN --cls RUN --out BUNDLE/`: package four trained models.

Each RUN is a run folder (``runs/<name>`` or ``runs/<name>/version_N``: its config.yaml, run_info.json and
best or last checkpoint) or a checkpoint file. The operating threshold and the stage fusion are chosen on
the stage-1 run's validation scans (see ``lungcad.bundle``), so run it where that run's data and cache are.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``bundle`` sub-command."""
    parser = subparsers.add_parser(
        "bundle", help="package trained CLAF, MPPN, GLANCE and M3Net models into one bundle folder",
        description=__doc__.splitlines()[0],
    )  # fmt: skip
    parser.add_argument("--stage1", required=True, help="CLAF stage-1 run folder or checkpoint (lungdet)")
    parser.add_argument("--mppn", required=True, help="MPPN stage-2 run folder or checkpoint (lungdet)")
    parser.add_argument("--seg", required=True, help="GLANCE run folder or checkpoint (lungseg)")
    parser.add_argument("--cls", required=True, help="M3Net stage-2 run folder or checkpoint (lungcls)")
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    parser.add_argument(
        "--fp-per-scan", type=float, default=1.0,
        help="false positives per validation scan at the detection operating threshold (default 1)",
    )  # fmt: skip
    parser.add_argument(
        "--keep-fusion", action="store_true",
        help="keep the MPPN run's stage1_weight instead of choosing it by validation CPM",
    )  # fmt: skip
    parser.add_argument("--name", help="bundle name (default: the folder name)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from lungcad.bundle import write_bundle

    if args.fp_per_scan <= 0:
        raise ValueError(f"--fp-per-scan must be positive, got {args.fp_per_scan}")
    sources = {"stage1": args.stage1, "mppn": args.mppn, "seg": args.seg, "cls": args.cls}
    path = write_bundle(
        sources, args.out, fp_per_scan=args.fp_per_scan, search_fusion=not args.keep_fusion, name=args.name,
        progress=print,
    )  # fmt: skip
    print(f"lungcad bundle: wrote {path}")
    return 0
