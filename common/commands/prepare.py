"""`lungdata prepare <dataset> [--root R] [--out O] [--spacing 1] [--lenient] [--workers N] [--shard I/N]
[--dicom-tolerance MM]`.

Builds the preprocessed cache (`common.cache`): every scan of the dataset resampled to `--spacing` mm with
a cubic B-spline, clipped to [−1024, 3071] HU and stored as int16 with its lung mask, plus `manifest.json`.
Re-running skips every scan whose inputs and settings are unchanged, so an interrupted run (Ctrl-C, a
killed job) is finished by simply running the same command again.

Without `--out` the cache goes where every datamodule looks for it when its `cache_dir` is not set
(`common.cache.default_cache_dir`: `cache/<dataset>-<hash of the root>` under the working directory), so
`lungdata prepare luna16` followed by `lungdet fit --config configs/claf_luna16.yaml` in the same folder
reuses it. With `--out`, give the datamodule the same folder (`--data.init_args.cache_dir`).

`--workers N` prepares N scans at a time in processes on this machine; `--shard I/N` prepares only shard I
of N (every N-th scan by uid), so N jobs — a SLURM array, several machines sharing the cache folder — fill
one cache together, each scan written by exactly one of them (docs/scale.md). Both give the same bytes as
one plain run.

Datasets come from `common.datasets.registry.DATASETS`: name → "module:Class" of a `ScanDataset` whose
constructor takes `(root, strict=...)`; its root defaults to the class's `env_var` environment variable.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from pathlib import Path

from common.cache import PrepareSettings, PreprocessedCache, default_cache_dir, parse_shard
from common.datasets.registry import DATASETS, open_dataset, resolve_root
from common.dicom import DICOM_POSITION_TOLERANCE_MM
from common.io import read_volume

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
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="cache folder (default: cache/<dataset>-<hash of the root>, where the datamodules look)",
    )
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
    parser.add_argument(
        "--columns",
        nargs="+",
        default=None,
        metavar="ROLE=NAME",
        help="annotation column names where your copy differs, e.g. --columns x=coordX_mm diameter=d",
    )
    parser.add_argument("--workers", type=int, default=1, help="scans processed in parallel (processes)")
    parser.add_argument(
        "--shard",
        metavar="I/N",
        help="prepare only shard I of N (0-based) of the scans, e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT",
    )
    parser.add_argument(
        "--dicom-tolerance",
        type=float,
        default=None,
        metavar="MM",
        help="DICOM series: accept slices up to MM mm off an even grid (missing slices, uneven spacing) and "
        f"leave out unreadable slice files; default: refuse both (slices more than "
        f"{DICOM_POSITION_TOLERANCE_MM:g} mm off, any unreadable slice)",
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
    kwargs = {}
    if args.columns:
        pairs = [item.split("=", 1) for item in args.columns]
        if any(len(pair) != 2 or not all(pair) for pair in pairs):
            raise ValueError(f"--columns takes ROLE=NAME pairs, e.g. x=coordX_mm; got {args.columns}")
        kwargs["columns"] = dict(pairs)
    records = open_dataset(args.dataset, root, strict=strict, **kwargs).records
    if not records:
        raise ValueError(f"{args.dataset}: no scans found under {root}")
    if args.dataset != "folder" and not any(r.nodules for r in records):
        print(
            f"lungdata prepare {args.dataset}: warning: no nodules in any of the {len(records)} scans under "
            f"{root} (header-only annotations file?); the cache serves prediction, training will refuse it",
            file=sys.stderr,
        )
    if args.dicom_tolerance is not None and not args.dicom_tolerance >= 0:
        raise ValueError(f"--dicom-tolerance takes a distance in mm >= 0, got {args.dicom_tolerance}")
    read_fn = None  # common.io.read_volume with the default DICOM rule
    if args.dicom_tolerance is not None:
        read_fn = functools.partial(read_volume, dicom_tolerance_mm=args.dicom_tolerance)
    cache = PreprocessedCache(args.out or default_cache_dir(args.dataset, root))
    cache.lock_wait_s = 0.0  # a user's second prepare is refused at once; training runs wait for the lock
    report = cache.build(records, settings, read_fn=read_fn, workers=args.workers, strict=strict, shard=shard)
    where = f" (shard {shard[0]}/{shard[1]})" if shard else ""
    print(f"lungdata prepare {args.dataset}{where}: {report.summary()}; manifest {cache.manifest_path}")
    if shard:
        cached = len(set(cache.uids) & {r.uid for r in records})
        print(f"  {cached} of {len(records)} scans of the dataset are in the cache so far")
    for uid, reason in report.failed.items():
        print(f"  failed {uid}: {reason}")
    return 0
