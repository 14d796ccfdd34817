"""Synthetic chest CT phantoms written in the real dataset layouts (SPEC §3.5; docs/synthetic.md).

Every test and the demo run on this data. A phantom has a body, two lungs, an airway that enters from the
top, branching vessel trees, CT noise and blur, and nodules whose shapes and ratings are real LIDC-IDRI
radiologist annotations. Generation is deterministic from a seed and takes well under a second per small
scan.

Python API (the `lungdata synth` command calls the same functions):

    make_luna16(out, n_scans=8, seed=0, size="small", subsets=None) -> Luna16Tree
    make_lidc(out, n_scans=8, seed=0, size="small") -> LidcTree
    make_followup(out, n_patients=2, n_times=2, seed=0, size="small") -> FollowupTree   # longitudinal
    generate_scan(seed, index, size="small", bank=None) -> SynthScan       # one scan in memory
    read_manifest(folder) -> dict                                            # synth_manifest.json
    tree_matches(folder, n_scans=…, seed=…, size=…) -> bool                  # reuse a tree only if made so
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "SIZE_PRESETS",
    "ShapeBank",
    "SynthScan",
    "generate_scan",
    "make_followup",
    "make_lidc",
    "make_luna16",
    "read_manifest",
    "tree_matches",
]

# Imported lazily: the writers pull in SimpleITK, pydicom and OpenCV, which `import common.synth` alone
# (e.g. for SIZE_PRESETS in a CLI parser) should not pay for.
_EXPORTS = {
    "SIZE_PRESETS": "common.synth.phantom",
    "ShapeBank": "common.synth.nodules",
    "SynthScan": "common.synth.scan",
    "generate_scan": "common.synth.scan",
    "make_followup": "common.synth.followup",
    "make_lidc": "common.synth.lidc",
    "make_luna16": "common.synth.luna16",
    "read_manifest": "common.synth.manifest",
    "tree_matches": "common.synth.manifest",
}

if TYPE_CHECKING:
    from common.synth.followup import make_followup
    from common.synth.lidc import make_lidc
    from common.synth.luna16 import make_luna16
    from common.synth.manifest import read_manifest, tree_matches
    from common.synth.nodules import ShapeBank
    from common.synth.phantom import SIZE_PRESETS
    from common.synth.scan import SynthScan, generate_scan


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'common.synth' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
