"""Small writers shared by the LDFC and spatio-temporal stand-ins: CSV text, BMP/JPEG slices, VOC XML.

Kept free of heavy imports so `lungdata synth --help` stays fast; the generators import the phantom code
only when they run.
"""

from __future__ import annotations

import csv
import io
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common import atomic


def csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """CSV text with a header line, "\\n" line ends and quotes only where a field needs them ("1,3")."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


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


def scan_volume(scan, array: np.ndarray | None = None):
    """A `PathologyScan` (or another array on its grid) as a `common.io.CTVolume`, stored orientation."""
    from common.io import CTVolume

    g = scan.geometry
    return CTVolume(
        array=scan.image if array is None else array,
        spacing=g.spacing,
        origin=g.origin,
        direction=np.asarray(g.direction, dtype=np.float64).reshape(3, 3),
        series_uid=scan.uid,
    )


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
