"""2D image datasets of the two pathology papers: class folders and VOC-style detection sets.

The LDFC (Sci. Data 2024) and spatio-temporal (STPD, Jian et al., preprint 2024) releases ship their classification data as
``<part>/<class>/<image>.bmp`` folders and their 2D detection data as Pascal-VOC trees (images,
``Annotations/*.xml``, ``ImageSets`` lists). These indexes only list files and parse annotations; the
pathology classifier and the COCO-style AP metric read pixels themselves.
"""

from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.datasets.tables import AnnotationError, RowPolicy

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff")


def _natural_key(name: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def patient_from_name(stem: str, pattern: str | re.Pattern | None) -> str | None:
    """Patient id from a file stem with a regex holding a ``patient`` group; None if absent/no match."""
    if pattern is None:
        return None
    match = re.search(pattern, stem)
    return match.group("patient") if match else None


@dataclass(frozen=True)
class ImageSample:
    """One classification image.

    Attributes:
        path: the image file.
        label: 0-based class index (position of the class folder in `ImageFolderIndex.classes`).
        class_name: the class folder name as published ("0", "1", … or "1" … "6").
        part: the part folder ("train", "test", "validate").
        patient_id: derived from the file name when the dataset's naming allows, else None.
    """

    path: Path
    label: int
    class_name: str
    part: str
    patient_id: str | None = None


class ImageFolderIndex:
    """``root/<part>/<class>/<image>`` listing for the pathology classifiers.

    Args:
        root: the folder holding the part folders (e.g. ``BMP_classification``).
        classes: expected class folder names in label order; each must exist and hold images in every part.
        parts: expected part folders; default every sub-folder of `root`.
        class_descriptions: class folder name → readable name (for reports).
        patient_pattern: regex with a ``patient`` group applied to file stems.
        strict: an empty or missing class folder is an error; lenient mode logs and continues.
    """

    def __init__(
        self,
        root: str | Path,
        classes: Sequence[str],
        parts: Sequence[str] | None = None,
        class_descriptions: Mapping[str, str] | None = None,
        patient_pattern: str | None = None,
        strict: bool = True,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder root {self.root} does not exist")
        self.classes = list(classes)
        self.class_descriptions = dict(class_descriptions or {})
        self.policy = RowPolicy(strict, log)
        found_parts = sorted((p.name for p in self.root.iterdir() if p.is_dir()), key=_natural_key)
        self.parts = list(parts) if parts is not None else found_parts
        if not self.parts:
            raise AnnotationError(f"{self.root} has no part folders (expected e.g. train/ and test/)")
        self.samples: list[ImageSample] = []
        for part in self.parts:
            part_dir = self.root / part
            if not part_dir.is_dir():
                raise AnnotationError(f"part folder {part_dir} is missing (expected parts {self.parts})")
            unknown = sorted(p.name for p in part_dir.iterdir() if p.is_dir() and p.name not in self.classes)
            if unknown:
                raise AnnotationError(
                    f"{part_dir} has unexpected class folder(s) {unknown}; expected {self.classes}"
                )
            for label, name in enumerate(self.classes):
                class_dir = part_dir / name
                images = (
                    sorted(
                        (p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS),
                        key=lambda p: _natural_key(p.name),
                    )
                    if class_dir.is_dir()
                    else []
                )
                if not images:
                    state = "is empty" if class_dir.is_dir() else "is missing"
                    self.policy.bad_row(
                        f"class folder {class_dir} {state}: class {name!r} has no images in {part}"
                    )
                    continue
                self.samples.extend(
                    ImageSample(p, label, name, part, patient_from_name(p.stem, patient_pattern))
                    for p in images
                )

    def __len__(self) -> int:
        return len(self.samples)

    def part(self, name: str) -> list[ImageSample]:
        """Samples of one part folder."""
        if name not in self.parts:
            raise KeyError(f"no part {name!r}; parts are {self.parts}")
        return [s for s in self.samples if s.part == name]

    def counts(self) -> dict[str, dict[str, int]]:
        """Per part, per class folder: number of images."""
        out: dict[str, dict[str, int]] = {}
        for part in self.parts:
            c = Counter(s.class_name for s in self.samples if s.part == part)
            out[part] = {name: c.get(name, 0) for name in self.classes}
        return out


@dataclass(frozen=True)
class VOCBox:
    """One object of a VOC annotation, pixel corners inclusive as VOC writes them."""

    xmin: float
    ymin: float
    xmax: float
    ymax: float
    name: str
    difficult: bool = False


@dataclass
class VOCImage:
    """One image of a VOC set with its boxes."""

    image_path: Path
    annotation_path: Path
    width: int
    height: int
    boxes: list[VOCBox] = field(default_factory=list)
    parts: tuple[str, ...] = ()
    patient_id: str | None = None


class VOCDetectionIndex:
    """A Pascal-VOC style 2D detection tree.

    LDFC ships ``BMP_2D/{Image,Annotations,ImageSets}`` with ``ImageSets/{train,test}.txt``; the
    spatio-temporal set ships ``{JPEGImages,Annotations,ImageSets/Main/{train,val}.txt}``. Both are found
    automatically; names can be forced.

    Args:
        root: the VOC tree root.
        image_dir: image folder name; default the first of Image, Images, JPEGImages that exists.
        imagesets_dir: folder of the ``<part>.txt`` lists; default ImageSets/Main if it exists, else
            ImageSets.
        patient_pattern: regex with a ``patient`` group applied to image stems.
        strict: bad XML or a box outside its image is an error; lenient mode logs and skips the image.
    """

    def __init__(
        self,
        root: str | Path,
        image_dir: str | None = None,
        imagesets_dir: str | None = None,
        patient_pattern: str | None = None,
        strict: bool = True,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"VOC root {self.root} does not exist")
        self.policy = RowPolicy(strict, log)
        self.image_dir = self._pick(image_dir, ("Image", "Images", "JPEGImages"), "image folder")
        self.annotation_dir = self._pick(None, ("Annotations",), "annotation folder")
        sets = self._pick(imagesets_dir, ("ImageSets/Main", "ImageSets"), "ImageSets folder")
        self.part_lists: dict[str, list[str]] = {}
        for txt in sorted(sets.glob("*.txt")):
            ids = [line.split()[0] for line in txt.read_text().splitlines() if line.strip()]
            self.part_lists[txt.stem] = ids
        if not self.part_lists:
            raise AnnotationError(f"{sets} has no <part>.txt image lists (expected e.g. train.txt, test.txt)")
        images_by_stem = {p.stem: p for p in self.image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS}
        parts_of: dict[str, list[str]] = {}
        for part, ids in self.part_lists.items():
            for image_id in ids:
                parts_of.setdefault(image_id, []).append(part)
        self.images: list[VOCImage] = []
        for xml_path in sorted(self.annotation_dir.glob("*.xml"), key=lambda p: _natural_key(p.name)):
            image = self._parse(xml_path, images_by_stem)
            if image is not None:
                image.parts = tuple(parts_of.get(xml_path.stem, ()))
                image.patient_id = patient_from_name(xml_path.stem, patient_pattern)
                self.images.append(image)
        listed = set(parts_of) - {i.annotation_path.stem for i in self.images}
        for image_id in sorted(listed, key=_natural_key):
            self.policy.bad_row(f"{sets}: image id {image_id!r} is listed but has no usable annotation")

    def _pick(self, forced: str | None, candidates: Sequence[str], what: str) -> Path:
        names = [forced] if forced else list(candidates)
        for name in names:
            if (self.root / name).is_dir():
                return self.root / name
        raise FileNotFoundError(f"{self.root} has no {what} (looked for {names})")

    def _parse(self, xml_path: Path, images_by_stem: Mapping[str, Path]) -> VOCImage | None:
        try:
            tree = ET.parse(xml_path).getroot()
            size = tree.find("size")
            width = int(float(size.findtext("width")))  # type: ignore[union-attr, arg-type]
            height = int(float(size.findtext("height")))  # type: ignore[union-attr, arg-type]
        except (ET.ParseError, AttributeError, TypeError, ValueError) as err:
            self.policy.bad_row(f"{xml_path}: not a VOC annotation with <size><width>/<height> ({err})")
            return None
        image_path = images_by_stem.get(xml_path.stem)
        filename = tree.findtext("filename")
        if filename and (self.image_dir / filename).is_file():
            image_path = self.image_dir / filename
        if image_path is None:
            self.policy.bad_row(
                f"{xml_path}: its image ({filename or xml_path.stem}) is not in {self.image_dir}"
            )
            return None
        boxes = []
        for number, obj in enumerate(tree.findall("object"), start=1):
            try:
                bb = obj.find("bndbox")
                corners = [float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]  # type: ignore[union-attr, arg-type]
            except (AttributeError, TypeError, ValueError):
                self.policy.bad_row(f"{xml_path}, object {number}: missing or non-numeric <bndbox>")
                return None
            x0, y0, x1, y1 = corners
            if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
                self.policy.bad_row(
                    f"{xml_path}, object {number}: box {corners} is empty or outside the "
                    f"{width}x{height} image"
                )
                return None
            difficult = (obj.findtext("difficult") or "0").strip() == "1"
            boxes.append(VOCBox(x0, y0, x1, y1, (obj.findtext("name") or "nodule").strip(), difficult))
        return VOCImage(image_path, xml_path, width, height, boxes)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def parts(self) -> list[str]:
        return list(self.part_lists)

    def part(self, name: str) -> list[VOCImage]:
        """Images listed in ``<name>.txt``."""
        if name not in self.part_lists:
            raise KeyError(f"no image list {name!r}.txt; lists are {self.parts}")
        return [i for i in self.images if name in i.parts]
