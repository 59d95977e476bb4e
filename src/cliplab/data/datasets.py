"""Datasets: image classification and image-text retrieval, their readers, splits and few-shot subsets.

Two kinds of data, each a small dataclass whose ``kind`` says which tasks take it:

:class:`ClassificationData` (``kind == "classification"``)
    Images with integer labels that index ``classnames``.  Read from an image folder
    (one sub-folder per class), a CSV of ``path,label``, or a ShapesWorld task.
:class:`RetrievalData` (``kind == "retrieval"``)
    Images with one or more captions each.  Read from a CSV/TSV/JSONL caption table,
    WebDataset ``.tar`` shards, or ShapesWorld multi-object scenes.

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
    "ClassificationData",
    "RetrievalData",
    "classification_from_csv",
    "classification_from_folder",
    "fewshot_subset",
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
        Extra facts (split, seed, ShapesWorld attributes...).
    """

    items: list
    labels: np.ndarray
    classnames: list
    name: str
    skipped: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    kind: ClassVar[str] = "classification"

    def __post_init__(self):
        self.labels = check_labels(np.asarray(self.labels).reshape(-1), len(self.classnames),
                                   n_samples=len(self.items), name=f"{self.name} labels")

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, indices, name: str | None = None) -> "ClassificationData":
        """The examples at ``indices`` (in that order), same classes."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return replace(self, items=[self.items[i] for i in idx], labels=self.labels[idx],
                       classnames=list(self.classnames), name=name or self.name,
                       skipped=list(self.skipped), meta=dict(self.meta))


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
    """

    items: list
    captions: list
    name: str
    skipped: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    kind: ClassVar[str] = "retrieval"

    def __post_init__(self):
        if len(self.items) != len(self.captions):
            raise UsageError(f"{self.name}: {len(self.items)} items but {len(self.captions)} caption lists")

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, indices, name: str | None = None) -> "RetrievalData":
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return replace(self, items=[self.items[i] for i in idx],
                       captions=[list(self.captions[i]) for i in idx], name=name or self.name,
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
    with open_text(path, what="classification table") as f:
        reader = csv.reader(f, delimiter=delimiter)
        next(reader)
        for line, row in valid_csv_rows(reader, path, len(header), {"image path": ii, "label": li}, skip_log):
            rows.append((line, row[ii].strip(), row[li].strip()))

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

    items, labels = [], []
    first: dict[tuple, tuple[int, str]] = {}      # image identity -> (line, label)
    identities = ImageIdentities(base)
    for line, image, label in rows:
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
    skipped = skip_log.to_list()[before:]
    if skipped:
        logger.warning("%s: skipped %d row(s); %s", path, len(skipped), skip_log.summary())
    if not items:
        raise DataError(f"{path}: no usable row ({len(skipped)} skipped); "
                        f"each row needs an image path and a label")
    logger.info("%s: %d images, %d classes", path, len(items), len(classnames))
    return ClassificationData(items, np.asarray(labels), list(classnames), path.stem, skipped,
                              meta={"source": str(path)})


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
            - ``retrieval``: scenes of 1-3 objects with all their captions.

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
    ClassificationData or RetrievalData
        Tell them apart by ``data.kind``.
    """
    n = check_positive_int("n", n, allow_none=True)
    if isinstance(spec, str) and spec.startswith("shapes:"):
        from .shapes.tasks import shapes_task  # renders scenes; not needed for files

        return shapes_task(spec.split(":", 1)[1], split, n, seed)
    path = Path(spec)
    if path.is_dir():
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
