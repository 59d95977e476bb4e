"""MVTec-style anomaly detection folders (MVTec AD, VisA in MVTec layout, ShapesWorld inspection sets).

Layout, per category::

    <root>/<category>/train/good/*.png                      normal training images
    <root>/<category>/test/good/*.png                       normal test images
    <root>/<category>/test/<defect>/<name>.png              defective test images
    <root>/<category>/ground_truth/<defect>/<name>_mask.png their masks (non-zero = defect)

``root`` may also be a single category folder (it has ``train`` and ``test``).  A defective
test image without a mask gets none (image-level metrics only); its count is logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError
from .images import find_images

logger = logging.getLogger(__name__)

__all__ = ["AnomalyCategory", "read_anomaly_folder", "load_mask"]


@dataclass
class AnomalyCategory:
    """One category of an MVTec-style folder.

    Attributes
    ----------
    name : str
    train : list of Path
        Normal training images (the few-shot references are drawn from them).
    test : list of Path
    labels : ndarray of int64 (len(test),)
        0 normal, 1 defective.
    defects : list of str
        The defect folder of each test image ("good" for normal ones).
    masks : list of Path or None
        The mask file of each test image; None for normal images and missing masks.
    """

    name: str
    train: list[Path]
    test: list[Path]
    labels: np.ndarray
    defects: list[str] = field(default_factory=list)
    masks: list[Path | None] = field(default_factory=list)


def _category(folder: Path) -> AnomalyCategory:
    train = find_images(folder / "train" / "good") if (folder / "train" / "good").is_dir() else []
    test, labels, defects, masks = [], [], [], []
    n_missing = 0
    for defect_dir in sorted(p for p in (folder / "test").iterdir() if p.is_dir()):
        for image in find_images(defect_dir, recursive=False):
            test.append(image)
            defects.append(defect_dir.name)
            good = defect_dir.name == "good"
            labels.append(0 if good else 1)
            mask = folder / "ground_truth" / defect_dir.name / f"{image.stem}_mask.png"
            if not good and not mask.is_file():
                n_missing += 1
            masks.append(mask if not good and mask.is_file() else None)
    if n_missing:
        logger.warning("%s: %d defective test image(s) without a mask file", folder, n_missing)
    return AnomalyCategory(folder.name, train, test, np.asarray(labels, dtype=np.int64), defects, masks)


def read_anomaly_folder(root, categories=None) -> list[AnomalyCategory]:
    """The categories of an MVTec-style folder (module docstring), sorted by name.

    Parameters
    ----------
    root : str or Path
        The dataset folder, or one category folder.
    categories : sequence of str, optional
        Only these.

    Raises
    ------
    DataError
        No such folder, no category with a ``test`` folder, an unknown category asked for,
        or a category whose test set lacks normal or defective images.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; pass an MVTec-style dataset folder")
    folders = [root] if (root / "test").is_dir() else sorted(p for p in root.iterdir() if (p / "test").is_dir())
    if not folders:
        raise DataError(f"{root}: no category folder with a 'test' subfolder "
                        "(expected <category>/train/good, <category>/test/<defect>)")
    if categories:
        names = {p.name for p in folders}
        unknown = [c for c in categories if c not in names]
        if unknown:
            raise DataError(f"{root}: no category {unknown[0]!r}; found {sorted(names)}")
        folders = [p for p in folders if p.name in set(categories)]
    out = []
    for folder in folders:
        cat = _category(folder)
        if not (cat.labels == 0).any() or not (cat.labels == 1).any():
            raise DataError(f"{folder}/test: needs both 'good' and defective images to be evaluated")
        out.append(cat)
    return out


def load_mask(path, size: int) -> np.ndarray:
    """A mask file as bool (size, size), resized with nearest neighbours (non-zero = defect)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            m = im.convert("L").resize((size, size), Image.NEAREST)
    except OSError as e:
        raise DataError(f"{path}: unreadable mask ({e})") from None
    return np.asarray(m) > 0
