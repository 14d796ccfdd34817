"""lungcad.bundle: write a bundle from four runs, load it with every check, refuse tampered copies."""

from __future__ import annotations

import json


def test_tiny_bundle_is_written(tiny_bundle):
    manifest = json.loads((tiny_bundle / "bundle.json").read_text())
    assert set(manifest["models"]) == {"stage1", "mppn", "seg", "cls"}
