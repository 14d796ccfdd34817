"""Datamodule of the 2D pathology image folders (cancer type, pathology class).

`PathologyImageDataModule` — the 2D cancer-type / pathology image folders of LDFC (Sci. Data 2024) (LDFC, 3 classes,
``BMP_classification/{train,test}``) and STPD (Jian et al., preprint 2024) (spatio-temporal, 6 classes,
``class_dataset/{train,validate}``): grey BMPs → [0, 1] → `in_chans` channels at `img_size`, flips and
rotation for training (LDFC's (Sci. Data 2024) augmentation). The validation part is a patient-level share of the
training folder (patients from the file names); the published held-out folder is the test part.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from common.datasets.image_folders import ImageFolderIndex, ImageSample
from common.lightning.datamodule import AdapterDataModule
from common.splits import SplitItem, ratio_split

log = logging.getLogger(__name__)

__all__ = ["PathologyImageDataModule", "PathologyImageDataset"]


class PathologyImageDataset(Dataset):
    """2D class-folder images → `(in_chans, img_size, img_size)` float tensors in [0, 1] (or normalised).

    Args:
        samples: the images with their labels.
        img_size: output size (square).
        in_chans: output channels (a grey image is repeated; 3 for ImageNet-shaped models).
        augment: flips and rotation (LDFC (Sci. Data 2024): horizontal, vertical flips and rotation).
        mean / std: per-channel normalisation after scaling to [0, 1].
        centres: in-plane nodule centre (row, column) per sample, None where unknown (image centre).
        crop: side in pixels of a square crop around the centre, taken before resizing (None: whole image;
            outside the image counts as black).
        jitter: training-time random shift of the crop centre, up to this many pixels per axis.
    """

    def __init__(
        self,
        samples: Sequence[ImageSample],
        img_size: int = 224,
        in_chans: int = 3,
        augment: bool = False,
        mean: float = 0.5,
        std: float = 0.5,
        centres: Sequence[tuple[float, float] | None] | None = None,
        crop: int | None = None,
        jitter: int = 0,
    ) -> None:
        self.samples = list(samples)
        self.centres = list(centres) if centres is not None else [None] * len(self.samples)
        if len(self.centres) != len(self.samples):
            raise ValueError(f"{len(self.centres)} crop centres for {len(self.samples)} images")
        self.crop = int(crop) if crop else None
        self.jitter = int(jitter) if augment else 0
        self.img_size = int(img_size)
        self.in_chans = int(in_chans)
        self.mean = float(mean)
        self.std = float(std)
        steps = [A.Resize(self.img_size, self.img_size)]
        if augment:
            steps += [
                A.HorizontalFlip(p=0.5),
                A.VerticalFlip(p=0.5),
                A.Affine(rotate=(-180, 180), border_mode=0, fill=0, p=0.5),
            ]
        self.transform = A.Compose(steps)

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, index: int) -> np.ndarray:
        """The image as float32 in [0, 1], grey `(H, W)` (colour images are averaged to grey)."""
        path = self.samples[index].path
        try:
            with Image.open(path) as img:
                pixels = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
        except OSError as err:
            raise ValueError(f"{path}: cannot read the image ({err}); replace or remove the file") from err
        return pixels

    def cropped(self, index: int) -> np.ndarray:
        """The image, or its `crop` × `crop` square around the sample's centre (shifted by the jitter)."""
        pixels = self.image(index)
        if self.crop is None:
            return pixels
        h, w = pixels.shape
        centre = self.centres[index] or ((h - 1) / 2.0, (w - 1) / 2.0)
        shift = torch.randint(-self.jitter, self.jitter + 1, (2,)).tolist() if self.jitter else (0, 0)
        top = int(round(centre[0] - (self.crop - 1) / 2.0)) + shift[0]
        left = int(round(centre[1] - (self.crop - 1) / 2.0)) + shift[1]
        out = np.zeros((self.crop, self.crop), dtype=np.float32)
        y0, x0 = max(top, 0), max(left, 0)
        y1, x1 = min(top + self.crop, h), min(left + self.crop, w)
        if y1 > y0 and x1 > x0:
            out[y0 - top : y1 - top, x0 - left : x1 - left] = pixels[y0:y1, x0:x1]
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        self.transform.set_random_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
        pixels = self.transform(image=self.cropped(index))["image"]
        tensor = (torch.from_numpy(np.ascontiguousarray(pixels)) - self.mean) / self.std
        return {
            "image": tensor.unsqueeze(0).expand(self.in_chans, -1, -1).contiguous(),
            "label": torch.tensor(self.samples[index].label, dtype=torch.long),
            "index": torch.tensor(index, dtype=torch.long),
        }


class PathologyImageDataModule(AdapterDataModule):
    """The LDFC / spatio-temporal classification image folders (module docstring).

    No cache and no split file: the images are read as they are, and the validation part is drawn from the
    training folder with `seed` on every run.

    Args:
        dataset: "ldfc" (3 classes) or "spatiotemporal" (6 classes), or any adapter with a
            `classification()` index.
        train_part: the training folder ("train").
        test_part: the held-out folder (LDFC "test", spatio-temporal "validate"); None picks the
            adapter's non-training part.
        val_fraction: patient-level share of the training folder used for validation; 0 validates on
            the test part (the papers have no separate validation set).
        img_size: network input size.
        in_chans: input channels.
        augment: flips and rotation on the training part.
        crop: side in pixels of a nodule-centred square crop taken before resizing (None: the whole image);
            the centres come from the adapter's `image_centres` (LDFC: its voxel annotation table).
        crop_jitter: training-time random shift of the crop centre, pixels per axis.
        batch_size: training batch size.
        eval_batch_size: batch size of val/test/predict (default `batch_size`).
        **kwargs: `common.lightning.datamodule.AdapterDataModule` arguments: root (None: LDFC_ROOT /
            STPD_ROOT), predict_root (a folder of images to predict, recursively, any label; None predicts
            the test part), seed (of the validation split), num_workers, lenient (an empty class folder is
            a warning, not an error), dataset_kwargs.
    """

    drop_last_train = True  # a last training batch of one sample breaks BatchNorm

    def __init__(
        self,
        dataset: str = "ldfc",
        train_part: str = "train",
        test_part: str | None = None,
        val_fraction: float = 0.15,
        img_size: int = 224,
        in_chans: int = 3,
        augment: bool = True,
        crop: int | None = None,
        crop_jitter: int = 0,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        super().__init__(dataset=dataset, batch_size=batch_size, **kwargs)
        self.train_part = train_part
        self.test_part = test_part
        self.val_fraction = float(val_fraction)
        self.img_size = img_size
        self.in_chans = in_chans
        self.augment = augment
        self.crop = crop
        self.crop_jitter = crop_jitter
        self.eval_batch_size = eval_batch_size or batch_size
        self.samples: dict[str, list[ImageSample]] = {}
        self.datasets: dict[str, PathologyImageDataset] = {}
        self.class_names: list[str] = []
        self.centres: dict[Path, tuple[float, float] | None] = {}

    def index(self) -> ImageFolderIndex:
        """The adapter's classification image index."""
        adapter = self.open_dataset()
        if not hasattr(adapter, "classification"):
            raise ValueError(f"dataset {self.dataset_name!r} has no classification image folders")
        return adapter.classification()

    def _crop_centres(self, samples: Sequence[ImageSample]) -> dict[Path, tuple[float, float] | None]:
        adapter = self.open_dataset()
        if not hasattr(adapter, "image_centres"):
            raise ValueError(
                f"dataset {self.dataset_name!r} gives no nodule positions for its images; set crop: null"
            )
        paths = [s.path for s in samples]
        centres = dict(zip(paths, adapter.image_centres(paths)))
        missing = sum(c is None for c in centres.values())
        if missing:
            log.warning(
                "%d of %d images have no annotated nodule; cropped at the image centre", missing, len(paths)
            )
        return centres

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _val_split(self, train: list[ImageSample]) -> tuple[list[ImageSample], list[ImageSample]]:
        items = [SplitItem(str(s.path), s.patient_id or f"image:{s.path.name}", s.label) for s in train]
        split = ratio_split(
            items, {"train": 1.0 - self.val_fraction, "val": self.val_fraction}, seed=self.seed, stratify=True
        )
        val = set(split.uids("val"))
        return [s for s in train if str(s.path) not in val], [s for s in train if str(s.path) in val]

    def setup(self, stage: str | None = None) -> None:
        if not self.samples:
            index = self.index()
            self.class_names = [index.class_descriptions.get(c, c) for c in index.classes]
            if self.train_part not in index.parts:
                raise ValueError(f"{index.root} has no {self.train_part!r} folder; parts are {index.parts}")
            test_part = self.test_part or next((p for p in index.parts if p != self.train_part), None)
            if test_part is None or test_part not in index.parts:
                raise ValueError(
                    f"{index.root} has no held-out folder {test_part!r}; parts are {index.parts}"
                )
            train = index.part(self.train_part)
            test = index.part(test_part)
            if self.val_fraction > 0:
                train, val = self._val_split(train)
            else:
                val = test
            self.samples = {"train": train, "val": val, "test": test}
            if self.predict_root:
                root = Path(self.predict_root)
                files = sorted(
                    p for p in root.rglob("*") if p.suffix.lower() in (".bmp", ".png", ".jpg", ".jpeg")
                )
                if not files:
                    raise FileNotFoundError(f"no images (.bmp, .png, .jpg) under predict_root {root}")
                self.samples["predict"] = [ImageSample(p, 0, "", "predict") for p in files]
            else:
                self.samples["predict"] = test
            if self.crop:
                self.centres = self._crop_centres([s for part in self.samples.values() for s in part])
            log.info("pathology images: %s", {k: len(v) for k, v in self.samples.items()})
        self.setup_parts(stage, self._dataset_for)

    def _dataset_for(self, part: str) -> PathologyImageDataset:
        if not self.samples[part]:
            raise ValueError(f"the {part} part of {self.dataset_name} has no images")
        samples = self.samples[part]
        return PathologyImageDataset(
            samples,
            self.img_size,
            self.in_chans,
            augment=self.augment and part == "train",
            centres=[self.centres.get(s.path) for s in samples] if self.crop else None,
            crop=self.crop,
            jitter=self.crop_jitter,
        )

    def table(self, part: str) -> pd.DataFrame:
        """Images of a part: file, label, class folder, patient id."""
        return pd.DataFrame(
            {
                "file": [str(s.path) for s in self.samples[part]],
                "label": [s.label for s in self.samples[part]],
                "class_folder": [s.class_name for s in self.samples[part]],
                "patient_id": [s.patient_id or "" for s in self.samples[part]],
            }
        )
