"""`lungdata synth <dataset> --out DIR --scans N --seed S [--size small|medium|large]`.

(`lungdata synth followup` counts patients: `--patients N --times 2|3`.)

Writes a synthetic stand-in for a dataset in that dataset's real on-disk layout (SPEC §3.5). Each dataset
is one entry of `GENERATORS`: a function `(out, n_scans, seed, size, **options) -> summary` plus the
options its sub-command adds, so adding a dataset (LNDb, Tianchi, LDFC, …) is one entry here.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.synth import ldfc, lndb, tianchi
from common.synth import spatiotemporal as stpd
from common.synth.phantom import SIZE_PRESETS


@dataclass(frozen=True)
class Generator:
    """One `lungdata synth` sub-command.

    Attributes:
        make: the generator; called as make(out, n_scans=…, seed=…, size=…, **options).
        help: one line for `--help`.
        default_scans: default of `--scans`.
        options: extra arguments as (flag, argparse keyword arguments); their dests become **options.
    """

    make: Callable[..., Any]
    help: str
    default_scans: int = 8
    options: tuple[tuple[str, dict[str, Any]], ...] = field(default_factory=tuple)
    count_flag: str = "--scans"
    count_help: str = "number of scans"


def _make_luna16(out: Path, n_scans: int, seed: int, size: str, subsets: int | None = None) -> Any:
    from common.synth.luna16 import make_luna16

    return make_luna16(out, n_scans=n_scans, seed=seed, size=size, subsets=subsets)


def _make_followup(out: Path, n_scans: int, seed: int, size: str, times: int = 2) -> Any:
    from common.synth.followup import make_followup

    return make_followup(out, n_patients=n_scans, n_times=times, seed=seed, size=size)


def _make_lidc(out: Path, n_scans: int, seed: int, size: str) -> Any:
    from common.synth.lidc import make_lidc

    return make_lidc(out, n_scans=n_scans, seed=seed, size=size)


GENERATORS: dict[str, Generator] = {
    "luna16": Generator(
        make=_make_luna16,
        help="LUNA16 tree: subsetK/*.mhd|raw, seg-lungs-LUNA16, annotations*.csv, candidates_V2.csv",
        options=(
            ("--subsets", {"type": int, "default": None, "help": "subset folders (default min(10, scans))"}),
        ),
    ),
    "lidc": Generator(
        make=_make_lidc,
        help="LIDC-IDRI tree: LIDC-IDRI-XXXX/<study>/<series>/*.dcm + reader XML, per-reader masks",
    ),
    "lndb": Generator(make=lndb.make_lndb, help=lndb.HELP, default_scans=lndb.DEFAULT_SCANS),
    "tianchi": Generator(make=tianchi.make_tianchi, help=tianchi.HELP, default_scans=tianchi.DEFAULT_SCANS),
    "ldfc": Generator(make=ldfc.make_ldfc, help=ldfc.HELP, default_scans=ldfc.DEFAULT_SCANS),
    "spatiotemporal": Generator(make=stpd.make_spatiotemporal, help=stpd.HELP, default_scans=6),
    "followup": Generator(
        make=_make_followup,
        help="longitudinal phantoms: <patient>_T<k>.mhd, annotations.csv, patients.csv (dates), truth manifest",
        default_scans=2,
        options=(
            ("--times", {"type": int, "choices": (2, 3), "default": 2, "help": "time points per patient"}),
        ),
        count_flag="--patients",
        count_help="number of patients",
    ),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `synth` and one sub-command per entry of `GENERATORS`."""
    parser = subparsers.add_parser(
        "synth",
        help="write synthetic phantom datasets in the real layouts",
        description=__doc__.splitlines()[0],
    )
    datasets = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    for name, generator in GENERATORS.items():
        sub = datasets.add_parser(name, help=generator.help, description=generator.help)
        sub.add_argument("--out", type=Path, required=True, help="output folder")
        sub.add_argument(
            generator.count_flag,
            dest="scans",
            metavar="N",
            type=int,
            default=generator.default_scans,
            help=generator.count_help,
        )
        sub.add_argument("--seed", type=int, default=0, help="dataset seed (same seed → identical files)")
        sub.add_argument(
            "--size", choices=sorted(SIZE_PRESETS), default="small", help="phantom matrix preset"
        )
        option_dests = []
        for flag, kwargs in generator.options:
            action = sub.add_argument(flag, **kwargs)
            option_dests.append(action.dest)
        sub.set_defaults(func=_run, generator_name=name, option_dests=tuple(option_dests))


def _run(args: argparse.Namespace) -> int:
    generator = GENERATORS[args.generator_name]
    if args.scans < 1:
        raise ValueError(f"{generator.count_flag} must be at least 1, got {args.scans}")
    options = {dest: getattr(args, dest) for dest in args.option_dests}
    summary = generator.make(args.out, n_scans=args.scans, seed=args.seed, size=args.size, **options)
    what = generator.count_flag.lstrip("-")
    print(
        f"lungdata synth {args.generator_name}: wrote {args.scans} synthetic {what} to {Path(args.out).resolve()}"
    )
    described = getattr(summary, "describe", None)
    if callable(described):
        print(described())
    return 0
