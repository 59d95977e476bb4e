"""Datasets: image classification, image-text retrieval and dense ground truth; readers, splits, few-shot subsets.

Each kind of data is a small dataclass whose ``kind`` says which tasks take it:

:class:`ClassificationData` (``kind == "classification"``)
    Images with integer labels that index ``classnames``.  Read from an image folder
    (one sub-folder per class), a CSV of ``path,label``, or a ShapesWorld task.
:class:`RetrievalData` (``kind == "retrieval"``)
    Images with one or more captions each.  Read from a CSV/TSV/JSONL caption table,
    WebDataset ``.tar`` shards, or ShapesWorld multi-object scenes.
:class:`SegmentationData` (``kind == "segmentation"``)
    Images with a semantic class map each (``ignore_index`` for unscored pixels), e.g.
    ``shapes:seg``.
:class:`DetectionData` (``kind == "detection"``)
    Images with labelled ``[x0, y0, x1, y1]`` boxes, e.g. ``shapes:det``.
:class:`AnomalyData` (``kind == "anomaly"``)
    Normal and defective images with defect masks, categories and defect names: MVTec
    AD-style folders (:func:`anomaly_from_mvtec`) or ``shapes:inspection``.

Evaluation, few-shot adaptation and the CLI all read data through this module.

:func:`load_dataset` turns a spec string into either.  Images are not decoded here: an
item is a path, the encoded bytes of a shard member, or (ShapesWorld) an in-memory uint8
array; unreadable images are skipped and reported later, when features are computed
(:class:`cliplab.features.FeatureStore`).  Malformed rows are skipped, counted in the
``skipped`` list and logged, never dropped silently.

:func:`split_train_val` carves a stratified validation split from a training set with a
fixed seed (hyper-parameters are chosen on it, never on test), and
:func:`fewshot_subset` draws k examples per class.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..errors import DataError, UsageError
from ..validation import check_labels, check_positive_int
from .images import find_images
from .sources import (
    CAPTION_COLUMNS,
    IMAGE_COLUMNS,
    IMAGE_EXTENSIONS,
    ImageIdentities,
    SkipLog,
    WebDatasetSet,
    expand_shards,
    index_webdataset,
    read_caption_table,
    read_table_header,
    valid_csv_rows,
)
from .text import open_text, read_text

logger = logging.getLogger(__name__)

__all__ = [
    "LABEL_COLUMNS",
    "MAX_CLASSES",
    "SPLIT_NAMES",
    "AnomalyData",
    "ClassificationData",
    "DetectionData",
    "RetrievalData",
    "SegmentationData",
    "classification_from_csv",
    "classification_from_folder",
    "anomaly_from_mvtec",
    "fewshot_subset",
    "is_mvtec_folder",
    "load_dataset",
    "retrieval_from_file",
    "split_train_val",
]

SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
"""Split names: of ShapesWorld tasks, and of split sub-folders of a dataset folder."""

_TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson")
LABEL_COLUMNS: tuple[str, ...] = ("label", "class", "classname", "target", "y")
"""Label column of a classification table: the default name first, then the aliases."""

MAX_CLASSES = 1_000_000
"""Most classes that integer labels may imply when no class names are given.

Integer labels index classes ``0..max``, so one label fixes the size of the class
table; a label at or above this limit is refused (:class:`~cliplab.errors.DataError`)
before anything is allocated.  With class names the table is the names given.
"""


@dataclass
class ClassificationData:
    """Images with class labels.

    Attributes
    ----------
    items : list
        N images: paths, encoded bytes or uint8 arrays (H, W, 3).
    labels : ndarray of int, shape (N,)
        Index into ``classnames``.
    classnames : list of str
        C human-readable class names (used in prompts).
    name : str
    skipped : list of Skipped
        Rows left out while reading.
    meta : dict
        Extra facts (split, seed, ShapesWorld world...).
    attributes : dict of str -> ndarray (N,)
        Per-example values besides the label: a CSV's other columns (``sex``, ``site``,
        ``age``... as strings), a ShapesWorld task's ground truth (counts, areas, subgroup
        attributes and ids).  The sensitive features and subgroups of fairness evaluation,
        the targets of ordinal ranking; :meth:`subset` keeps them in step with ``items``.
    """

    items: list
    labels: np.ndarray
    classnames: list
    name: str
    skipped: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    attributes: dict = field(default_factory=dict)
    kind: ClassVar[str] = "classification"

    def __post_init__(self):
        self.labels = check_labels(np.asarray(self.labels).reshape(-1), len(self.classnames),
                                   n_samples=len(self.items), name=f"{self.name} labels")
        self.attributes = check_attributes(self.attributes, len(self.items), self.name)

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, indices, name: str | None = None) -> "ClassificationData":
        """The examples at ``indices`` (in that order), same classes."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return replace(self, items=[self.items[i] for i in idx], labels=self.labels[idx],
                       classnames=list(self.classnames), name=name or self.name,
                       skipped=list(self.skipped), meta=dict(self.meta),
                       attributes={k: v[idx] for k, v in self.attributes.items()})


@dataclass
class RetrievalData:
    """Images with one or more captions each.

    Attributes
    ----------
    items : list
        N images: paths, encoded bytes or uint8 arrays (H, W, 3).
    captions : list of list of str
        The captions of each image (at least one).
    name : str
    skipped : list of Skipped
    meta : dict
    attributes : dict of str -> ndarray (N,)
        Per-example values (as :attr:`ClassificationData.attributes`).
    """

    items: list
    captions: list
    name: str
    skipped: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    attributes: dict = field(default_factory=dict)
    kind: ClassVar[str] = "retrieval"

    def __post_init__(self):
        if len(self.items) != len(self.captions):
            raise UsageError(f"{self.name}: {len(self.items)} items but {len(self.captions)} caption lists")
        self.attributes = check_attributes(self.attributes, len(self.items), self.name)

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, indices, name: str | None = None) -> "RetrievalData":
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return replace(self, items=[self.items[i] for i in idx],
                       captions=[list(self.captions[i]) for i in idx], name=name or self.name,
                       skipped=list(self.skipped), meta=dict(self.meta),
                       attributes={k: v[idx] for k, v in self.attributes.items()})


def check_attributes(attributes, n: int, name: str) -> dict:
    """Per-example attributes as ``{str: ndarray (n,)}``; a value that is itself a list (a pair's
    captions) makes an object array.  Raises DataError when a column's length is not ``n``."""
    out = {}
    for key, values in (attributes or {}).items():
        values = list(values) if not isinstance(values, np.ndarray) else values
        if len(values) != n:
            raise DataError(f"{name}: attribute {key!r} has {len(values)} values for {n} images")
        if isinstance(values, np.ndarray):
            column = values.reshape(n)
        elif any(isinstance(v, (list, tuple, np.ndarray)) for v in values):
            column = np.empty(n, dtype=object)
            for i, v in enumerate(values):
                column[i] = v
        else:
            column = np.asarray(values)
        out[str(key)] = column
    return out


def _check_len(name: str, what: str, values, n: int) -> None:
    if len(values) != n:
        raise UsageError(f"{name}: {n} items but {len(values)} {what}")


@dataclass
class SegmentationData:
    """Images with a semantic class map each (dense ground truth).

    Attributes
    ----------
    items : list
        N images: paths, encoded bytes or uint8 arrays (H, W, 3).
    masks : list of ndarray of uint8, shape (H, W)
        Class map of each image, same size as the image: a pixel's value indexes
        ``classnames``, or is ``ignore_index`` (not scored: ambiguous boundary pixels).
    classnames : list of str
        C class names; ``classnames[0]`` is ``"background"`` where the data has one.
    name : str
    ignore_index : int, default 255
        The label of unscored pixels (mmseg's convention).
    skipped : list of Skipped
    meta : dict
        Extra facts (split, seed, the ShapesWorld world, ``classes``: the names that
        can occur in this split...).
    """

    items: list
    masks: list
    classnames: list
    name: str
    ignore_index: int = 255
    skipped: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    kind: ClassVar[str] = "segmentation"

    def __post_init__(self):
        _check_len(self.name, "class maps", self.masks, len(self.items))

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, indices, name: str | None = None) -> "SegmentationData":
        """The examples at ``indices`` (in that order), same classes."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return replace(self, items=[self.items[i] for i in idx], masks=[self.masks[i] for i in idx],
                       classnames=list(self.classnames), name=name or self.name,
                       skipped=list(self.skipped), meta=dict(self.meta))


@dataclass
class DetectionData:
    """Images with labelled boxes (open-vocabulary detection ground truth).

    Attributes
    ----------
    items : list
        N images: paths, encoded bytes or uint8 arrays (H, W, 3).
    boxes : list of ndarray of float32, shape (K_i, 4)
        Boxes of image ``i`` as ``[x0, y0, x1, y1]`` in pixels, ``x1``/``y1`` exclusive
        (COCO's ``[x, y, w, h]`` is ``[x0, y0, x1 - x0, y1 - y0]``).
    labels : list of ndarray of int64, shape (K_i,)
        Index into ``classnames`` of each box.
    classnames : list of str
        C class names (the text queries of an open-vocabulary detector).
    name : str
    skipped : list of Skipped
    meta : dict
    """

    items: list
    boxes: list
    labels: list
    classnames: list
    name: str
    skipped: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    kind: ClassVar[str] = "detection"

    def __post_init__(self):
        _check_len(self.name, "box lists", self.boxes, len(self.items))
        _check_len(self.name, "label lists", self.labels, len(self.items))
        self.boxes = [np.asarray(b, dtype=np.float32).reshape(-1, 4) for b in self.boxes]
        self.labels = [check_labels(np.asarray(y).reshape(-1), len(self.classnames), n_samples=len(b),
                                    name=f"{self.name} labels") for b, y in zip(self.boxes, self.labels)]

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, indices, name: str | None = None) -> "DetectionData":
        """The examples at ``indices`` (in that order), same classes."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return replace(self, items=[self.items[i] for i in idx], boxes=[self.boxes[i] for i in idx],
                       labels=[self.labels[i] for i in idx], classnames=list(self.classnames),
                       name=name or self.name, skipped=list(self.skipped), meta=dict(self.meta))


@dataclass
class AnomalyData:
    """Images of normal and defective objects with pixel masks of the defects (MVTec AD style).

    Attributes
    ----------
    items : list
        N images: paths, encoded bytes or uint8 arrays (H, W, 3).
    labels : ndarray of int64, shape (N,)
        ``0`` normal (``good``), ``1`` anomalous.
    masks : list
        Defect pixels of each image: a bool array (H, W) (ShapesWorld), the path of a
        mask image whose non-zero pixels are the defect (MVTec folders), or ``None``
        for no defect pixel.  :meth:`mask` gives any of them as a bool array.
    categories : list of str
        Object category of each image (MVTec's ``bottle``, ``screw``...).
    defects : list of str
        Defect type of each image, ``"good"`` for a normal one.
    name : str
    skipped : list of Skipped
    meta : dict
    """

    items: list
    labels: np.ndarray
    masks: list
    categories: list
    defects: list
    name: str
    skipped: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    kind: ClassVar[str] = "anomaly"

    def __post_init__(self):
        n = len(self.items)
        for what, values in (("masks", self.masks), ("categories", self.categories), ("defect names", self.defects)):
            _check_len(self.name, what, values, n)
        self.labels = check_labels(np.asarray(self.labels).reshape(-1), 2, n_samples=n, name=f"{self.name} labels")

    def __len__(self) -> int:
        return len(self.items)

    def mask(self, i: int) -> np.ndarray:
        """Defect mask of image ``i``: (H, W) bool, the size of the image.

        Decodes a mask file (non-zero = defect); for ``None`` the image is decoded to
        learn its size (an array item just gives its shape).
        """
        m = self.masks[i]
        if isinstance(m, np.ndarray):
            return m.astype(bool, copy=False)
        from .images import load_image

        if m is not None:
            return np.asarray(load_image(m)).max(axis=2) > 0  # (H, W)
        item = self.items[i]
        h, w = item.shape[:2] if isinstance(item, np.ndarray) else load_image(item).size[::-1]
        return np.zeros((h, w), dtype=bool)

    def subset(self, indices, name: str | None = None) -> "AnomalyData":
        """The examples at ``indices`` (in that order)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return replace(self, items=[self.items[i] for i in idx], labels=self.labels[idx],
                       masks=[self.masks[i] for i in idx], categories=[self.categories[i] for i in idx],
                       defects=[self.defects[i] for i in idx], name=name or self.name,
                       skipped=list(self.skipped), meta=dict(self.meta))


# --------------------------------------------------------------------- class names


def _read_names(classnames_json):
    """A JSON file path, or an already loaded dict/list, -> dict or list."""
    if classnames_json is None or isinstance(classnames_json, (dict, list, tuple)):
        return classnames_json
    path = Path(classnames_json)
    text = read_text(path, what="class-name file")
    try:
        names = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not a JSON class-name file ({e})") from None
    if not isinstance(names, (dict, list)):
        raise DataError(f"{path}: class names must be a JSON object {{folder: name}} or a list")
    return names


def _names_for(keys: list[str], names, source: str) -> list[str]:
    """Human-readable names for class ``keys`` (folder names / label values)."""
    if names is None:
        return [k.replace("_", " ") for k in keys]
    if isinstance(names, dict):
        missing = [k for k in keys if k not in names]
        if missing:
            raise DataError(f"{source}: class names JSON has no entry for {missing[:5]}"
                            f"{' ...' if len(missing) > 5 else ''}; add them")
        return [str(names[k]) for k in keys]
    names = [str(n) for n in names]
    if len(names) != len(keys):
        raise DataError(f"{source}: class names list has {len(names)} entries for {len(keys)} "
                        f"classes; give one name per class, in sorted folder/label order")
    return names


# --------------------------------------------------------------------- classification


def classification_from_folder(root, *, classnames_json=None) -> ClassificationData:
    """Read an image folder with one sub-folder per class.

    Parameters
    ----------
    root : str or Path
        ``root/<class>/**/<image>``; classes are the sub-folders in sorted order (hidden
        ones ignored), images are found by :func:`cliplab.data.images.find_images`.
    classnames_json : path, dict or list, optional
        Class names: ``{folder: name}``, or a list of names in sorted folder order.
        Default: the folder names with ``_`` read as spaces.

    Returns
    -------
    ClassificationData
        ``items`` are canonical paths (:class:`~cliplab.data.sources.ImageIdentities`).
        One file is one image: a file reached again through a link (in another class
        folder, or a hard link in the same one) is left out and listed in ``skipped``, as
        are image files lying in ``root`` itself, in no class folder.  (A symbolic link
        beside its target is listed once already by ``find_images``.)

    Raises
    ------
    DataError
        ``root`` is not a folder, has no class folders or no images, or the names do
        not cover the classes.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; pass a folder with one sub-folder per class")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{root}: no class sub-folders; put each class's images in root/<class>/")
    classnames = _names_for([f.name for f in folders], _read_names(classnames_json), str(root))
    skip_log = SkipLog()
    for p in sorted(root.iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS:
            skip_log.add(p, "not in a class folder: images must lie in root/<class>/")
    items, labels = [], []
    first: dict[tuple, tuple[Path, str]] = {}     # image identity -> (path, class folder)
    identities = ImageIdentities()
    for c, folder in enumerate(folders):
        found = find_images(folder)
        if not found:
            logger.warning("%s: class %r has no images", root, folder.name)
        for f in found:
            resolved, ident = identities(f)
            if ident in first:
                seen, cls = first[ident]
                skip_log.add(f, f"duplicate image: same file as {seen} (class {cls!r})")
                continue
            first[ident] = (f, folder.name)
            items.append(resolved)
            labels.append(c)
    if skip_log.count:
        logger.warning("%s: %s", root, skip_log.summary())
    if not items:
        raise DataError(f"{root}: the class folders hold no images")
    logger.info("%s: %d images, %d classes", root, len(items), len(folders))
    return ClassificationData(items, np.asarray(labels), classnames, root.name or str(root),
                              skip_log.to_list(), meta={"source": str(root)})


def classification_from_csv(path, *, image_key: str = "filepath", label_key: str = "label",
                            classnames_json=None, root=None,
                            skip_log: SkipLog | None = None) -> ClassificationData:
    """Read a CSV/TSV of image paths and class labels.

    Parameters
    ----------
    path : str or Path
        ``.csv`` or ``.tsv`` with a header.  Relative image paths are resolved against
        ``root`` (default: the table's folder).
    image_key, label_key : str
        Column names; at their defaults, common aliases are tried (``image``, ``path``...
        and ``class``, ``target``...).
    classnames_json : path, dict or list, optional
        With integer labels: a list indexed by label (or ``{"0": name}``).  With string
        labels: ``{label: name}``, or a list that orders the classes (labels must be
        among its entries).  Default: integer labels ``0..max`` are named by their
        number (the largest label must be below :data:`MAX_CLASSES`), string labels
        are the names, sorted.
    skip_log : SkipLog, optional
        Receives malformed rows (wrong field count, empty path or label, label not in
        the class list), each as ``path:line``.  They are also in ``data.skipped``.
        One file is one image, however its path is spelled
        (:class:`~cliplab.data.sources.ImageIdentities`): a later row naming a file
        already listed is skipped too, as a duplicate or, with another label, a
        conflicting label.

    Raises
    ------
    DataError
        Missing file, missing column, no usable row, names that do not cover the labels,
        or, without names, an integer label of :data:`MAX_CLASSES` or more.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass the path of a .csv or .tsv table")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    base = Path(root) if root is not None else path.parent
    skip_log = skip_log if skip_log is not None else SkipLog()
    before = skip_log.count
    header, index = read_table_header(path, {"image_key": (image_key, IMAGE_COLUMNS),
                                             "label_key": (label_key, LABEL_COLUMNS)},
                                      what="classification table")
    ii, li = index["image_key"], index["label_key"]
    rows: list[tuple[int, str, str]] = []
    extra_columns = [j for j in range(len(header)) if j not in (ii, li) and header[j].strip()]
    extras: list[list[str]] = []
    with open_text(path, what="classification table") as f:
        reader = csv.reader(f, delimiter=delimiter)
        next(reader)
        for line, row in valid_csv_rows(reader, path, len(header), {"image path": ii, "label": li}, skip_log):
            rows.append((line, row[ii].strip(), row[li].strip()))
            extras.append([row[j].strip() for j in extra_columns])

    names = _read_names(classnames_json)
    integer = bool(rows) and all(_is_int(lab) for _, _, lab in rows)
    if integer:
        if isinstance(names, dict):
            keys = sorted(names, key=lambda k: int(k) if _is_int(k) else -1)
            classnames = [str(names[k]) for k in keys]
            if [int(k) for k in keys if _is_int(k)] != list(range(len(keys))):
                raise DataError(f"{path}: with integer labels the class-name JSON keys must be 0..C-1")
        elif names is not None:
            classnames = [str(n) for n in names]
        else:
            line, top = max(((line, int(lab)) for line, _, lab in rows), key=lambda r: r[1])
            if top >= MAX_CLASSES:  # checked before the table is built: the label sets its size
                raise DataError(f"{path}:{line}: label {top} would make {top + 1:,} classes "
                                f"(integer labels index classes 0..max, at most {MAX_CLASSES:,}); "
                                f"number the classes 0..C-1, or write class names in the label column")
            classnames = [str(i) for i in range(top + 1)]
        n_classes = len(classnames)
        to_index = lambda lab: int(lab) if 0 <= int(lab) < n_classes else None  # noqa: E731
    else:
        values = sorted({lab for _, _, lab in rows})
        if isinstance(names, dict):
            keys = sorted(names)
            classnames = [str(names[k]) for k in keys]
        elif names is not None:
            keys = classnames = [str(n) for n in names]
        else:
            keys = classnames = values
        lookup = {k: i for i, k in enumerate(keys)}
        to_index = lookup.get

    items, labels, kept_extras = [], [], []
    first: dict[tuple, tuple[int, str]] = {}      # image identity -> (line, label)
    identities = ImageIdentities(base)
    for (line, image, label), extra in zip(rows, extras):
        idx = to_index(label)
        if idx is None:
            skip_log.add(f"{path}:{line}", f"unknown label {label!r}: not in the class names", index=line)
            continue
        resolved, ident = identities(image)
        if ident in first:
            seen_line, seen_label = first[ident]
            why = ("duplicate image" if to_index(seen_label) == idx else f"conflicting label {label!r}")
            skip_log.add(f"{path}:{line}", f"{why}: same file as line {seen_line} "
                                           f"(label {seen_label!r}), which is kept", index=line)
            continue
        first[ident] = (line, label)
        items.append(resolved)
        labels.append(idx)
        kept_extras.append(extra)
    skipped = skip_log.to_list()[before:]
    if skipped:
        logger.warning("%s: skipped %d row(s); %s", path, len(skipped), skip_log.summary())
    if not items:
        raise DataError(f"{path}: no usable row ({len(skipped)} skipped); "
                        f"each row needs an image path and a label")
    logger.info("%s: %d images, %d classes", path, len(items), len(classnames))
    columns = np.asarray(kept_extras, dtype=object).reshape(len(items), len(extra_columns))
    attributes = {header[j].strip(): columns[:, k].astype(str) for k, j in enumerate(extra_columns)}
    return ClassificationData(items, np.asarray(labels), list(classnames), path.stem, skipped,
                              meta={"source": str(path)}, attributes=attributes)


def _is_int(s: str) -> bool:
    try:
        int(s)
    except (TypeError, ValueError):
        return False
    return True


# --------------------------------------------------------------------- retrieval


def retrieval_from_file(path) -> RetrievalData:
    """Read image-caption pairs for retrieval.

    Parameters
    ----------
    path : str or Path
        A ``.csv``/``.tsv``/``.jsonl`` caption table (rows naming the same image are
        merged, so an image may have several captions), or WebDataset shards: a ``.tar``
        file, a folder of them, a glob or a brace pattern (``shard-{0000..0003}.tar``).

    Returns
    -------
    RetrievalData
        ``items`` are resolved paths for a table, and the encoded image bytes (read by
        byte offset from the uncompressed shards) for WebDataset.

    Raises
    ------
    DataError
        Missing file or shard, missing column, compressed shards, or no usable sample.
    """
    skip_log = SkipLog()
    spath = Path(str(path))
    if spath.suffix.lower() in _TABLE_SUFFIXES:
        records = read_caption_table(spath, skip_log=skip_log)
        items = [r.image for r in records]
        captions = [list(r.captions) for r in records]
        name = spath.stem
    else:
        shards = expand_shards(path)
        samples = index_webdataset(shards, skip_log=skip_log)
        if not samples:
            raise DataError(f"{path}: the shards hold no usable sample (image + caption)")
        reader = WebDatasetSet(samples, loader=bytes)  # raw bytes; decoded with the features
        try:
            items = [reader[i][0] for i in range(len(reader))]
        finally:
            reader.close()
        captions = [list(s.captions) for s in samples]
        name = spath.name if spath.is_dir() else spath.stem.split("{")[0].rstrip("-_") or spath.stem
    if not items:
        raise DataError(f"{path}: no usable image-caption pair ({skip_log.summary()})")
    if skip_log.count:
        logger.warning("%s: %s", path, skip_log.summary())
    return RetrievalData(items, captions, name, skip_log.to_list(), meta={"source": str(path)})


# --------------------------------------------------------------------- anomaly (MVTec AD folders)


def is_mvtec_folder(path) -> bool:
    """Whether ``path`` is an MVTec AD-style category folder (``train/`` or ``test/``, and
    ``ground_truth/``) or a folder of them."""
    path = Path(path)

    def category(p: Path) -> bool:
        return (p / "ground_truth").is_dir() and ((p / "test").is_dir() or (p / "train").is_dir())

    if not path.is_dir():
        return False
    if category(path):
        return True
    subdirs = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return bool(subdirs) and all(category(p) for p in subdirs)


def anomaly_from_mvtec(root, split: str = "test") -> AnomalyData:
    """Read MVTec AD-style folders (MVTec AD itself, VisA in its MVTec layout, ShapesWorld's export).

    Parameters
    ----------
    root : str or Path
        A category folder (``<category>/train/good``, ``<category>/test/<defect>``,
        ``<category>/ground_truth/<defect>/<stem>_mask.png``) or a folder of them (all
        categories, in sorted order).
    split : {"train", "test"}, default "test"
        ``train`` reads ``train/good``; ``test`` reads every ``test/<kind>`` folder
        (``good`` is normal, any other name is a defect type).

    Returns
    -------
    AnomalyData
        ``items`` are image paths; ``masks`` are mask paths (``<stem>_mask.png``, or
        ``<stem>.png``) for defective images and ``None`` for normal ones.  A defective
        image without a mask file is left out and listed in ``skipped``.

    Raises
    ------
    DataError
        Not an MVTec-style folder, no ``split`` folder, or no image.
    """
    root = Path(root)
    if split not in ("train", "test"):
        raise DataError(f"{root}: MVTec-style folders have a train and a test split, not {split!r}")
    if not is_mvtec_folder(root):
        raise DataError(f"{root}: not an MVTec-style folder (<category>/train/good, <category>/test/<defect>, "
                        f"<category>/ground_truth/<defect>)")
    cats = [root] if (root / "ground_truth").is_dir() else sorted(
        p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    skip_log = SkipLog()
    items, labels, masks, categories, defects = [], [], [], [], []
    for cat in cats:
        base = cat / split
        if not base.is_dir():
            raise DataError(f"{cat}: no {split!r} folder")
        kinds = ["good"] if split == "train" else sorted(
            p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
        for kind in kinds:
            for image in find_images(base / kind) if (base / kind).is_dir() else []:
                mask = None
                if kind != "good":
                    found = [m for m in (cat / "ground_truth" / kind / f"{image.stem}_mask.png",
                                         cat / "ground_truth" / kind / f"{image.stem}.png") if m.is_file()]
                    if not found:
                        skip_log.add(image, f"no ground-truth mask in {cat / 'ground_truth' / kind}")
                        continue
                    mask = found[0]
                items.append(image)
                labels.append(int(kind != "good"))
                masks.append(mask)
                categories.append(cat.name)
                defects.append(kind)
    if skip_log.count:
        logger.warning("%s: %s", root, skip_log.summary())
    if not items:
        raise DataError(f"{root}: no image in {split}/ ({skip_log.summary()})")
    logger.info("%s: %d %s images, %d anomalous, %d categories", root, len(items), split, sum(labels), len(cats))
    return AnomalyData(items, np.asarray(labels, np.int64), masks, categories, defects, root.name,
                       skip_log.to_list(), meta={"source": str(root)})


# --------------------------------------------------------------------- load_dataset


def _table_kind(path: Path) -> str:
    """``"classification"`` for a CSV with a label column and no caption column."""
    if path.suffix.lower() not in (".csv", ".tsv"):
        return "retrieval"
    header, _ = read_table_header(path, what="classification table")
    has_caption = any(h in header for h in CAPTION_COLUMNS)
    has_label = any(h in header for h in LABEL_COLUMNS)
    return "classification" if has_label and not has_caption else "retrieval"


def load_dataset(spec, split: str = "test", *, n: int | None = None, seed: int = 0):
    """Load a dataset (classification or retrieval) from a spec.

    Parameters
    ----------
    spec : str or Path
        ``"shapes:<task>"``
            A ShapesWorld task on the world of the bundled shapes-tiny model
            (:func:`cliplab.data.shapes.shapes_tiny_world`, 64 px scenes, 8
            in-distribution shapes; the scenes, splits and classes that
            ``cliplab shapes export`` writes); images are uint8 arrays in memory.

            - ``color-shape``: 64-way colour x shape classification;
            - ``shape``, ``color``: 8-way;
            - ``color-shape-heldout``: test scenes whose (colour, shape) is held out
              of train/val, classified among all 64 colour-shape classes;
            - ``retrieval``: scenes of 1-3 objects with all their captions;
            - ``seg``: 256 px scenes of 3-12 overlapping shapes with class maps
              (:class:`SegmentationData`);
            - ``det``: the same scenes with a labelled box per object
              (:class:`DetectionData`);
            - ``inspection``: shapes on textured surfaces, normal or defective, with
              defect masks (:class:`AnomalyData`).
        an MVTec AD-style folder
            ``<category>/{train,test,ground_truth}`` or a folder of categories
            (anomaly, :func:`anomaly_from_mvtec`).

            ``"shapes:<task>@<domain>"`` renders the same scenes in a domain of
            :data:`cliplab.data.shapes.DOMAINS` (a controlled shift such as
            ``shapes:color-shape@blur-3``).
        a folder
            One sub-folder per class (classification); if its sub-folders are split
            names (``train``/``val``/``test``), the one named ``split``.  A folder of
            ``.tar`` files is WebDataset shards (retrieval).
        a ``.csv``/``.tsv``
            Classification when it has a label column (``label``, ``class``...) and no
            caption column, else retrieval.
        a ``.jsonl``, ``.tar``, glob or brace pattern
            Retrieval.
    split : {"train", "val", "test"}, default "test"
        ShapesWorld split, or split folder (see above).  File datasets without split
        folders are used whole.
    n : int, optional
        Number of examples.  ShapesWorld: the first ``n`` scenes of the split, default
        :data:`cliplab.data.shapes.tasks.SHAPES_DEFAULT_N` (2000 train, 1000 val, 1000 test).  Files: a random
        subset of ``n`` (seeded, kept in file order); default all.
    seed : int, default 0
        ShapesWorld world seed; subset seed for files.

    Returns
    -------
    ClassificationData, RetrievalData, SegmentationData, DetectionData or AnomalyData
        Tell them apart by ``data.kind``; files give the first two and AnomalyData.
    """
    n = check_positive_int("n", n, allow_none=True)
    if isinstance(spec, str) and spec.startswith("shapes:"):
        from .shapes.tasks import shapes_task  # renders scenes; not needed for files

        return shapes_task(spec.split(":", 1)[1], split, n, seed)
    path = Path(spec)
    if is_mvtec_folder(path):
        data = anomaly_from_mvtec(path, split)
    elif path.is_dir():
        subdirs = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if subdirs and all(p.name in SPLIT_NAMES for p in subdirs):
            if not (path / split).is_dir():
                raise DataError(f"{path}: no {split!r} split folder; it has "
                                f"{sorted(p.name for p in subdirs)}")
            path = path / split
            subdirs = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if not subdirs and any(path.glob("*.tar")):
            data = retrieval_from_file(path)
        else:
            data = classification_from_folder(path)
    elif path.suffix.lower() in _TABLE_SUFFIXES:
        if not path.is_file():
            raise DataError(f"{path}: no such file; pass the path of a .csv, .tsv or .jsonl table")
        if _table_kind(path) == "classification":
            data = classification_from_csv(path)
        else:
            data = retrieval_from_file(path)
    elif path.is_file() and path.suffix.lower() != ".tar":
        from .shapes.tasks import SHAPES_TASKS

        raise UsageError(f"{spec}: unknown dataset type; pass a folder, .csv, .jsonl, .tar shards "
                         f"or shapes:<task> ({', '.join(SHAPES_TASKS)})")
    else:
        data = retrieval_from_file(spec)
    data.meta["split"] = split
    if n is not None and n < len(data):
        rng = np.random.default_rng(seed)
        data = data.subset(np.sort(rng.choice(len(data), size=int(n), replace=False)))
        data.meta.update({"n": int(n), "seed": seed})
    return data


# --------------------------------------------------------------------- splits


def split_train_val(data, *, val_fraction: float = 0.2, seed: int = 0):
    """Carve a validation split from a training set.

    Classification data is stratified: each class with at least two examples gives
    ``round(val_fraction * n_c)`` of them (at least one, never all) to validation.
    Retrieval data is split at random.  Both keep the original order within each part.

    Returns
    -------
    (train, val)
        Same type as ``data``; ``meta["split"]`` is ``"train"`` / ``"val"``.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UsageError(f"val_fraction must be between 0 and 1, got {val_fraction!r}")
    rng = np.random.default_rng(seed)
    if isinstance(data, ClassificationData):
        val = []
        for c in range(len(data.classnames)):
            idx = np.flatnonzero(data.labels == c)
            if len(idx) < 2:
                continue
            k = int(np.clip(round(val_fraction * len(idx)), 1, len(idx) - 1))
            val.extend(rng.permutation(idx)[:k].tolist())
    else:
        k = int(np.clip(round(val_fraction * len(data)), 1, max(1, len(data) - 1)))
        val = rng.permutation(len(data))[:k].tolist()
    is_val = np.zeros(len(data), dtype=bool)
    is_val[val] = True
    train_part = data.subset(np.flatnonzero(~is_val))
    val_part = data.subset(np.flatnonzero(is_val))
    train_part.meta.update(split="train", val_fraction=val_fraction, split_seed=seed)
    val_part.meta.update(split="val", val_fraction=val_fraction, split_seed=seed)
    return train_part, val_part


def fewshot_subset(data: ClassificationData, k: int, seed: int = 0) -> ClassificationData:
    """``k`` examples of each class (all of a class with fewer), deterministic in ``seed``.

    Each class draws from its own stream ``default_rng([seed, class])``, taking a prefix
    of a permutation, so the ``k``-shot set contains the smaller-``k`` sets of the same
    seed.  Examples keep their original order.
    """
    if not isinstance(data, ClassificationData):
        raise UsageError("few-shot subsets need classification data")
    k = check_positive_int("k", k)
    chosen = []
    for c in range(len(data.classnames)):
        idx = np.flatnonzero(data.labels == c)
        rng = np.random.default_rng([int(seed), c])
        chosen.extend(rng.permutation(idx)[:int(k)].tolist())
    out = data.subset(np.sort(np.asarray(chosen, dtype=np.int64)))
    out.meta.update(shots=int(k), fewshot_seed=int(seed))
    return out
