"""Configs must load on machines whose locale is not UTF-8 (jsonargparse reads them with the locale encoding)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CLI_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if "tables" not in p.relative_to(CONFIGS).parts)


@pytest.mark.parametrize("path", CLI_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_cli_config_is_ascii(path):
    text = path.read_text(encoding="utf-8")
    bad = sorted(set(re.findall(r"[^\x00-\x7f]", text)))
    assert not bad, f"{path}: non-ASCII characters {bad}; write them in ASCII (e.g. 'tau', '->', 'x')"
