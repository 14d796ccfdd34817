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

from common.runtime import keep_freed_memory

COMMAND_MODULES = (
    "common.commands.synth",
    "common.commands.prepare",
    "common.commands.lidc",
    "common.commands.evaluate_froc",
    "common.commands.split",
    "common.commands.table",
    "common.commands.sweep",
)


def command_parser(prog: str, description: str, modules: tuple[str, ...]) -> argparse.ArgumentParser:
    """A parser whose sub-commands are ``modules``, each exposing ``register(subparsers)`` (also `lungcad`)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in modules:
        importlib.import_module(name).register(subparsers)
    return parser


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse, set up logging and run the chosen sub-command; a user error is one line and exit status 2."""
    args = parser.parse_args(argv)
    keep_freed_memory()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as err:
        # Errors raised by our readers already name the file and the fix; print them without a traceback.
        print(f"{parser.prog} {args.command}: error: {err}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    return command_parser("lungdata", __doc__.splitlines()[0], COMMAND_MODULES)


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
