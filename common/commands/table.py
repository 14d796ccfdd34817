"""`lungdata table list|render`: the papers' tables with our numbers beside the published ones.

    lungdata table list
    lungdata table render glance_table3                        # runs what is missing under runs/, then renders
    lungdata table render glance_table3 --from-runs runs/      # only reads finished runs
    lungdata table render claf_table9 --dry-run                # prints the commands it would run
    lungdata table render glance_table3 --jobs 2               # two runs at once, one thread each on 2 cores
    lungdata table render glance_table7 --rows lambda_0.2 --override trainer.max_epochs=5   # on every run

Tables are the files of `configs/tables/` (schema: `common.experiments.tables`). The markdown is printed and
written with the CSV to `--out` (default `<runs>/tables/`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.experiments.tables import (
    collect,
    dry_run_commands,
    list_tables,
    load_table,
    missing_plans,
    missing_prerequisites,
    render_markdown,
    render_table,
    write_outputs,
)


def _override(text: str) -> str:
    """`trainer.max_epochs=5` → `--trainer.max_epochs=5` (a leading `--` is accepted too)."""
    key, sep, _ = text.removeprefix("--").partition("=")
    if not sep or not key:
        raise ValueError(f"--override {text!r}: write KEY=VALUE, e.g. trainer.max_epochs=5")
    return "--" + text.removeprefix("--")


def _list(args: argparse.Namespace) -> int:
    for spec in list_tables():
        ours = sum(1 for r in spec.rows if not r.reference)
        print(f"{spec.name:24s} {spec.title}  ({len(spec.rows)} rows, {ours} ours)")
    return 0


def _render(args: argparse.Namespace) -> int:
    if args.jobs < 1:
        raise ValueError(f"--jobs {args.jobs}: give at least 1 (runs at once)")
    overrides = [_override(a) for a in args.override]
    failures: list[str] = []
    if args.from_runs is not None:
        if overrides or args.extra_config or args.rows:
            raise ValueError(
                "--from-runs only reads finished runs; --rows, --extra-config and --override run things"
            )
        runs_dir = args.from_runs
        if not runs_dir.is_dir():
            raise FileNotFoundError(
                f"--from-runs {runs_dir}: no such folder (the trainer.default_root_dir of the runs)"
            )
        result = collect(load_table(args.name), runs_dir)
    elif args.dry_run:
        spec = load_table(args.name)
        plans = missing_plans(spec, args.runs_dir, args.rows)
        if not plans:
            print(f"lungdata table: every run of {spec.name} is finished under {args.runs_dir}")
        prerequisites = missing_prerequisites(spec, plans, args.runs_dir)
        for line in dry_run_commands(plans, args.runs_dir, args.extra_config, overrides, prerequisites):
            print(line)
        return 0
    else:
        runs_dir = args.runs_dir
        result, failures = render_table(
            args.name,
            runs_dir,
            rows=args.rows,
            extra_configs=args.extra_config,
            extra_args=overrides,
            timeout=args.timeout,
            keep_going=not args.stop_on_error,
            jobs=args.jobs,
        )
    out = args.out if args.out is not None else Path(runs_dir) / "tables"
    md, csv_path = write_outputs(result, out)
    print(render_markdown(result))
    print(f"lungdata table: wrote {md} and {csv_path}")
    for failure in failures:
        print(f"lungdata table: failed: {failure}", file=sys.stderr)
    return 1 if failures else 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `lungdata table` with its `list` and `render` sub-commands."""
    parser = subparsers.add_parser(
        "table",
        help="render a paper table with our runs beside the published numbers",
        description=__doc__.splitlines()[0],
    )
    actions = parser.add_subparsers(dest="table_command", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="the registered tables (configs/tables/)")
    listing.set_defaults(func=_list)

    render = actions.add_parser("render", help="run what is missing (or read --from-runs) and render a table")
    render.add_argument("name", help="table name (configs/tables/NAME.yaml) or a table file")
    render.add_argument("--from-runs", type=Path, metavar="DIR", help="only read the finished runs under DIR")
    render.add_argument(
        "--runs-dir", type=Path, default=Path("runs"), help="where runs are read and written (runs/)"
    )
    render.add_argument("--rows", nargs="+", metavar="ROW", help="run only these rows (the table shows all)")
    render.add_argument(
        "--extra-config",
        action="append",
        default=[],
        metavar="FILE",
        help="config layered after each row's; PREFIX:FILE only for runs of command PREFIX or of a config named PREFIX",
    )
    render.add_argument("--out", type=Path, help="folder for NAME.md and NAME.csv (default: <runs>/tables)")
    render.add_argument(
        "--dry-run", action="store_true", help="print the commands of the missing runs and stop"
    )
    render.add_argument("--timeout", type=float, help="seconds per launched command")
    render.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="runs at once, prerequisites first, each with cores/N threads (default 1)",
    )
    render.add_argument(
        "--stop-on-error", action="store_true", help="stop at the first failed run (default: run the others)"
    )
    render.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="CLI setting appended to every command, e.g. trainer.max_epochs=5 (repeatable)",
    )
    render.set_defaults(func=_render)
    return parser


__all__ = ["register"]
