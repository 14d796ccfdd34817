"""`lungdata split make|check|show`: patient-level split files that experiments reference.

    lungdata split make spatiotemporal --root $STPD_ROOT --out splits/stpd.json --method ratio \\
        --ratios train=0.7 val=0.15 test=0.15 --seed 0
    lungdata split make luna16 --out splits/claf6.json --method claf6
    lungdata split check splits/stpd.json --dataset spatiotemporal --root $STPD_ROOT
    lungdata split show splits/stpd.json

Datasets are the adapters of `common.datasets.registry`; a dataset's root defaults to its environment variable.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.datasets.registry import DATASETS, open_dataset
from common.splits import (
    Split,
    SplitError,
    claf_sixfold,
    describe,
    items_from_records,
    kfold_split,
    luna16_subset_folds,
    max_nodule_label,
    nodule_count_stratum,
    ratio_split,
)

METHODS = ("ratio", "kfold", "luna16-subsets", "claf6")
STRATA = {"none": None, "label": max_nodule_label, "nodules": nodule_count_stratum}


def _ratios(values: list[str]) -> dict[str, float]:
    out = {}
    for value in values:
        name, sep, share = value.partition("=")
        if not sep:
            raise ValueError(f"--ratios takes part=share pairs like train=0.7, got {value!r}")
        out[name.strip()] = float(share)
    return out


def make_split(args: argparse.Namespace) -> Split:
    """Build the split `args` asks for (also used by tests and scripts)."""
    dataset = open_dataset(args.dataset, args.root, strict=not args.lenient)
    records = dataset.records
    stratum = STRATA[args.stratify]
    if args.method == "ratio":
        split = ratio_split(
            items_from_records(records, stratum),
            _ratios(args.ratios),
            seed=args.seed,
            stratify=stratum is not None,
            require_all_classes=args.require_classes,
        )
    elif args.method == "kfold":
        split = kfold_split(
            items_from_records(records, stratum), k=args.folds, seed=args.seed, stratify=stratum is not None
        )
    elif args.method == "luna16-subsets":
        split = luna16_subset_folds(records, on_conflict="merge" if args.merge_patients else "error")
    else:
        split = claf_sixfold(records, seed=args.seed)
    split.meta["dataset"] = args.dataset
    if args.method in ("ratio", "kfold"):
        split.meta["stratify"] = args.stratify
    return split


def _make(args: argparse.Namespace) -> int:
    split = make_split(args)
    path = split.save(args.out)
    print(f"lungdata split: wrote {path}")
    print(describe(split))
    return 0


def _check(args: argparse.Namespace) -> int:
    split = Split.load(args.file)
    if args.dataset:
        dataset = open_dataset(args.dataset, args.root)
        split.check_against(dataset.records, source=str(args.file))
        if args.require_classes:
            split.check_classes({r.uid: max_nodule_label(r) for r in dataset.records if r.uid in split})
    print(f"lungdata split: {args.file} is a valid patient-level split")
    print(describe(split))
    return 0


def _show(args: argparse.Namespace) -> int:
    print(describe(Split.load(args.file)))
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `lungdata split` with its `make`, `check` and `show` sub-commands."""
    parser = subparsers.add_parser(
        "split", help="make, check or show patient-level split files", description=__doc__.splitlines()[0]
    )
    actions = parser.add_subparsers(dest="split_command", required=True, metavar="ACTION")

    make = actions.add_parser("make", help="make a seeded patient-level split of a dataset")
    make.add_argument("dataset", choices=sorted(DATASETS), help="dataset adapter")
    make.add_argument("--root", help="dataset root (default: its environment variable)")
    make.add_argument("--out", type=Path, required=True, help="split file to write (.json or .csv)")
    make.add_argument(
        "--method", choices=METHODS, default="ratio", help="ratio parts, k folds, LUNA16 subsets, CLAF"
    )
    make.add_argument(
        "--ratios", nargs="+", default=["train=0.7", "val=0.15", "test=0.15"], help="part=share"
    )
    make.add_argument("--folds", type=int, default=5, help="k for --method kfold")
    make.add_argument("--seed", type=int, default=0, help="shuffling seed (same seed → same split)")
    make.add_argument("--stratify", choices=sorted(STRATA), default="none", help="per-patient stratum")
    make.add_argument("--require-classes", action="store_true", help="refuse a part that lacks a class")
    make.add_argument(
        "--merge-patients", action="store_true", help="LUNA16 subsets: keep a patient in one fold"
    )
    make.add_argument("--lenient", action="store_true", help="skip (and log) bad annotation rows")
    make.set_defaults(func=_make)

    check = actions.add_parser("check", help="check a split file (and against a dataset)")
    check.add_argument("file", type=Path)
    check.add_argument("--dataset", help="also check that every scan exists in this dataset")
    check.add_argument("--root", help="dataset root (default: its environment variable)")
    check.add_argument(
        "--require-classes", action="store_true", help="every part must hold every nodule label"
    )
    check.set_defaults(func=_check)

    show = actions.add_parser("show", help="patients and scans per part")
    show.add_argument("file", type=Path)
    show.set_defaults(func=_show)
    return parser


__all__ = ["SplitError", "make_split", "open_dataset", "register"]
