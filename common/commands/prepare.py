"""`lungdata prepare <dataset> --root R --out O [--spacing 1] [--lenient] [--workers N] [--shard I/N]`.

Builds the preprocessed cache (`common.cache`): every scan of the dataset resampled to `--spacing` mm with
a cubic B-spline, clipped to [−1024, 3071] HU and stored as int16 with its lung mask, plus `manifest.json`.
Re-running skips every scan whose inputs and settings are unchanged, so an interrupted run (Ctrl-C, a
killed job) is finished by simply running the same command again.

`--workers N` prepares N scans at a time in processes on this machine; `--shard I/N` prepares only shard I
of N (every N-th scan by uid), so N jobs — a SLURM array, several machines sharing the cache folder — fill
one cache together, each scan written by exactly one of them (docs/scale.md). Both give the same bytes as
one plain run.

Datasets come from `common.datasets.registry.DATASETS`: name → "module:Class" of a `ScanDataset` whose
constructor takes `(root, strict=...)`; its root defaults to the class's `env_var` environment variable.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from common.cache import PrepareSettings, PreprocessedCache, parse_shard
from common.datasets.registry import DATASETS, open_dataset, resolve_root

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prepare",
        help="build the preprocessed cache (1 mm int16 HU + lung masks + manifest.json) for a dataset",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("dataset", choices=sorted(DATASETS), help="dataset adapter")
    parser.add_argument(
        "--root", type=Path, default=None, help="dataset root (default: its environment variable)"
    )
    parser.add_argument("--out", type=Path, required=True, help="cache folder")
    parser.add_argument(
        "--spacing",
        type=float,
        nargs="+",
        default=[1.0],
        metavar="MM",
        help="target spacing: one value or x y z",
    )
    parser.add_argument(
        "--lung-mask",
        choices=("auto", "computed", "provided"),
        default="auto",
        help="lung masks: the dataset's own where present (auto), always computed, or required provided",
    )
    parser.add_argument("--order", type=int, choices=(1, 3), default=3, help="image interpolation order")
    parser.add_argument("--lenient", action="store_true", help="log and skip bad rows and bad scans")
    parser.add_argument("--workers", type=int, default=1, help="scans processed in parallel (processes)")
    parser.add_argument(
        "--shard",
        metavar="I/N",
        help="prepare only shard I of N (0-based) of the scans, e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    root = resolve_root(args.dataset, args.root)
    if len(args.spacing) not in (1, 3):
        raise ValueError(f"--spacing takes one value or three (x y z), got {args.spacing}")
    spacing = tuple(args.spacing * 3) if len(args.spacing) == 1 else tuple(args.spacing)
    if args.workers < 1:
        raise ValueError(f"--workers {args.workers}: give at least 1")
    shard = parse_shard(args.shard) if args.shard else None
    settings = PrepareSettings(spacing=spacing, order=args.order, lung_mask=args.lung_mask)
    strict = not args.lenient
    records = open_dataset(args.dataset, root, strict=strict).records
    if not records:
        raise ValueError(f"{args.dataset}: no scans found under {root}")
    cache = PreprocessedCache(args.out)
    report = cache.build(records, settings, workers=args.workers, strict=strict, shard=shard)
    where = f" (shard {shard[0]}/{shard[1]})" if shard else ""
    print(f"lungdata prepare {args.dataset}{where}: {report.summary()}; manifest {cache.manifest_path}")
    if shard:
        cached = len(set(cache.uids) & {r.uid for r in records})
        print(f"  {cached} of {len(records)} scans of the dataset are in the cache so far")
    for uid, reason in report.failed.items():
        print(f"  failed {uid}: {reason}")
    return 0
