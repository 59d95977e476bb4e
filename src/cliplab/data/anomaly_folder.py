"""MVTec-style anomaly detection folders (MVTec AD, VisA in MVTec layout, ShapesWorld inspection sets).

Layout, per category::

    <root>/<category>/train/good/*.png                      normal training images
    <root>/<category>/test/good/*.png                       normal test images
    <root>/<category>/test/<defect>/<name>.png              defective test images
    <root>/<category>/ground_truth/<defect>/<name>_mask.png their masks (non-zero = defect)

``root`` may also be a single category folder (it has ``train`` and ``test``).  A defective
test image without a mask is left out; its count is logged.  The files are read by
:func:`cliplab.data.datasets.anomaly_from_mvtec`; this module groups them by category.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["AnomalyCategory", "read_anomaly_folder", "load_mask", "resize_mask"]


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
    """One category, read by :func:`~cliplab.data.datasets.anomaly_from_mvtec` (the one MVTec reader)."""
    from .datasets import anomaly_from_mvtec

    train = list(anomaly_from_mvtec(folder, "train").items) if (folder / "train" / "good").is_dir() else []
    test = anomaly_from_mvtec(folder, "test")
    if test.skipped:
        logger.warning("%s: %d defective test image(s) without a mask file left out", folder, len(test.skipped))
    return AnomalyCategory(folder.name, [Path(p) for p in train], [Path(p) for p in test.items],
                           np.asarray(test.labels, dtype=np.int64), list(test.defects),
                           [Path(m) if m is not None else None for m in test.masks])


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


def resize_mask(mask, size: int) -> np.ndarray:
    """A mask file or a mask array (H, W) as bool (size, size), nearest neighbours (non-zero = defect)."""
    if not isinstance(mask, np.ndarray):
        return load_mask(mask, size)
    from PIL import Image

    m = Image.fromarray(np.asarray(mask).astype(bool).astype(np.uint8) * 255)
    return np.asarray(m.resize((size, size), Image.NEAREST)) > 0
