"""The `lungcad` entry point: parser builds, no command is a usage error."""

from __future__ import annotations

import pytest

from lungcad.cli import build_parser, main


def test_lungcad_without_a_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_parser_builds_with_the_present_commands():
    assert build_parser().prog == "lungcad"
