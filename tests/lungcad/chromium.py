"""One headless Chromium call for the browser tests (report.html, followup.html).

The flags are what this machine's closed network needs (no background connections, no component
updates); CI's `.ci/run` installs Debian's chromium when it is missing.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
SKIP_REASON = "chromium is not installed (CI's .ci/run installs Debian's)"


def dump_dom(page: Path, profile: Path, *extra: str) -> str:
    """The DOM of ``page`` after load (``--dump-dom``), with any extra flags (window size, screenshot)."""
    command = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, "--dump-dom", page.as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout
