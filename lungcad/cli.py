"""`lungcad`: analysis of new scans — bundle trained models, analyze a CT series, compare with a prior.

Each sub-command lives in its own module under `lungcad.commands` and exposes ``register(subparsers)``
(same pattern as `lungdata`). A sub-command whose module is not present yet is skipped, so the entry
point stays importable while commands are added one by one.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMAND_MODULES = (
    "lungcad.commands.bundle",
    "lungcad.commands.analyze",
    "lungcad.commands.followup",
    "lungcad.commands.export",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lungcad", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            continue
        module.register(subparsers)
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
        # Our readers and checks raise errors that already name the file and the fix: one line, no traceback.
        print(f"lungcad {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
