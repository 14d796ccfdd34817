"""Writers the stand-ins share: CSV text, and (LDFC, spatio-temporal) BMP/JPEG slices and VOC XML.

Kept free of heavy imports so `lungdata synth --help` stays fast; the generators import the phantom code
only when they run.
"""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common import atomic


def start_pathology_tree(
    out: str | Path,
    n_scans: int,
    bank,
    class_rule: Callable[[Any], int],
    classes: Sequence[int],
    size: str,
    seed: int,
) -> tuple[Path, Any, dict[int, list]]:
    """Start a tree (`common.synth.manifest.start_tree`) and deal the class decks of its nodules.

    Returns:
        The root folder, the shape bank (`bank`, or the process-wide default) and the per-class decks
        (`common.synth.pathology.class_decks` under `class_rule`).
    """
    from common.synth.manifest import start_tree
    from common.synth.pathology import class_decks

    root, bank = start_tree(out, n_scans, bank)
    return root, bank, class_decks(bank, class_rule, classes, size, seed)


def write_class_images(scan, folder: Path, counts: dict[str, int]) -> set[int]:
    """Write the axial slice through each nodule of `scan` to ``folder/<label>/<uid>_<slice>_<k>.bmp``.

    Args:
        scan: a `PathologyScan`.
        folder: the part's class-folder root (``BMP_classification/train``, ``class_dataset/validate``).
        counts: images per class label (text), updated in place.

    Returns:
        The slices that hold a nodule centre (the 2D detection images to write).
    """
    from common.synth.pathology import window_to_uint8

    slices = set()
    for k, nodule in enumerate(scan.nodules):
        z = int(round(nodule.voxel_zyx[0]))
        write_bmp(folder / str(nodule.label) / f"{scan.uid}_{z}_{k}.bmp", window_to_uint8(scan.image[z]))
        counts[str(nodule.label)] += 1
        slices.add(z)
    return slices


def write_voc_slices(
    scan, slices: Iterable[int], voc_root: Path, image_folder: str, suffix: str
) -> list[str]:
    """Write each slice as a VOC image ``<uid>_<slice><suffix>`` in `image_folder` with its XML annotation.

    Args:
        scan: a `PathologyScan`.
        slices: the slice indices to write (in sorted order).
        voc_root: the VOC tree (holding `image_folder` and ``Annotations``).
        image_folder: ``Image`` (LDFC) or ``JPEGImages`` (spatio-temporal).
        suffix: ``.bmp`` or ``.jpg``.

    Returns:
        The image ids written, for the ImageSets lists.
    """
    from common.synth.pathology import window_to_uint8

    names = []
    for z in sorted(slices):
        boxes = [b for n in scan.nodules if (b := n.slice_box(z)) is not None]
        name = f"{scan.uid}_{z}"
        pixels = window_to_uint8(scan.image[z])
        write_bmp(voc_root / image_folder / f"{name}{suffix}", pixels)
        write_voc_annotation(
            voc_root / "Annotations" / f"{name}.xml", image_folder, f"{name}{suffix}", pixels.shape, boxes
        )
        names.append(name)
    return names


def write_bmp(path: Path, pixels: np.ndarray) -> Path:
    """Write a uint8 grey image as BMP or JPEG (by suffix), atomically."""
    from PIL import Image

    buffer = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), mode="L")
    if path.suffix.lower() in (".jpg", ".jpeg"):
        image.save(buffer, format="JPEG", quality=95)
    else:
        image.save(buffer, format="BMP")
    atomic.write_bytes(path, buffer.getvalue())
    return path


def write_voc_annotation(
    path: Path,
    folder: str,
    filename: str,
    shape_yx: tuple[int, int],
    boxes: Sequence[tuple[int, int, int, int]],
    name: str = "nodule",
) -> Path:
    """A Pascal-VOC annotation; `boxes` are inclusive 0-based pixel boxes (x0, y0, x1, y1), 1-based in XML."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = folder
    ET.SubElement(root, "filename").text = filename
    size = ET.SubElement(root, "size")
    ET.SubElement(size, "width").text = str(int(shape_yx[1]))
    ET.SubElement(size, "height").text = str(int(shape_yx[0]))
    ET.SubElement(size, "depth").text = "1"
    ET.SubElement(root, "segmented").text = "0"
    for x0, y0, x1, y1 in boxes:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = name
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = "0"
        box = ET.SubElement(obj, "bndbox")
        for key, value in zip(("xmin", "ymin", "xmax", "ymax"), (x0 + 1, y0 + 1, x1 + 1, y1 + 1)):
            ET.SubElement(box, key).text = str(int(value))
    ET.indent(root)
    atomic.write_bytes(path, ET.tostring(root, encoding="utf-8") + b"\n")
    return path


def scan_entry(scan, geometry) -> dict[str, Any]:
    """Manifest entry of a `PathologyScan`."""
    return {
        "uid": scan.uid,
        "patient": scan.patient,
        "time_point": scan.time_point,
        "shape_zyx": list(geometry.shape),
        "spacing_xyz": list(geometry.spacing),
        "origin_xyz": list(geometry.origin),
        "direction": list(geometry.direction),
        "flipped": geometry.flipped,
        "nodules": [n.manifest() for n in scan.nodules],
    }
