"""`lungdata`: the data and evaluation command.

Each sub-command lives in its own module under `common.commands`; the module exposes
`register(subparsers)` that adds its parser and sets `func` on it. This keeps the entry point small and
lets every sub-command be imported and tested on its own.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMAND_MODULES = (
    "common.commands.synth",
    "common.commands.prepare",
    "common.commands.lidc",
    "common.commands.evaluate_froc",
    "common.commands.split",
    "common.commands.table",
    "common.commands.sweep",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lungdata", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as err:
        # Errors raised by our readers already name the file and the fix; print them without a traceback.
        print(f"lungdata {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
