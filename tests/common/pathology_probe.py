"""A deliberately crude probe of whether the pathology stand-ins' classes show in the pixels.

Hand-made intensity and size features around the nodule centre, a logistic regression, patient-grouped
cross-validation. If even this beats chance clearly, the class is in the image content (density, size,
calcium) — which the stand-ins promise — and a CNN has more to work with.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def nodule_features(path, row: float, col: float, half: int = 12) -> np.ndarray:
    """Grey-level histogram, bright fractions, peak and centre value, and the centre blob's area."""
    image = np.asarray(Image.open(path), dtype=np.float32)
    r, c = int(round(row)), int(round(col))
    crop = image[max(r - half, 0) : r + half, max(c - half, 0) : c + half]
    labels, _ = ndimage.label(image > 100)
    area = float((labels == labels[r, c]).sum()) if labels[r, c] else 0.0
    hist = np.histogram(crop, bins=8, range=(0, 255))[0] / crop.size
    bright = [(crop > 120).mean(), (crop > 170).mean(), crop.max() / 255.0, image[r, c] / 255.0]
    return np.r_[hist, bright, np.log1p(min(area, 2000.0))]


def grouped_cv_accuracy(
    features: np.ndarray, labels: np.ndarray, groups: np.ndarray, folds: int = 5
) -> float:
    """Mean accuracy of a logistic regression over patient-grouped folds."""
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    return float(cross_val_score(model, features, labels, groups=groups, cv=GroupKFold(folds)).mean())
