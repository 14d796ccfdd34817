"""`lungcad`: analysis of new scans — bundle trained models, analyze a CT series, compare with a prior.

Each sub-command lives in its own module under `lungcad.commands` and exposes ``register(subparsers)``;
parsing, logging and the one-line user errors are `lungdata`'s (`common.cli.command_parser` / `run_command`).
"""

from __future__ import annotations

import argparse
import sys

from common.cli import command_parser, run_command

COMMAND_MODULES = (
    "lungcad.commands.bundle",
    "lungcad.commands.analyze",
    "lungcad.commands.followup",
    "lungcad.commands.export",
)


def build_parser() -> argparse.ArgumentParser:
    return command_parser("lungcad", __doc__.splitlines()[0], COMMAND_MODULES)


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
