"""Read image-caption data: CSV/TSV/JSONL tables and WebDataset tar shards.

Problems with the *file* (missing column, unreadable header, missing file) raise
:class:`~cliplab.errors.DataError` with the fix.  Problems with single *samples* (a
malformed row, an empty caption, a tar sample without image or text) are skipped and
recorded in a :class:`SkipLog`, which callers report; nothing is dropped silently.

Images are not decoded here (see :mod:`cliplab.data.images`).
"""

from __future__ import annotations

import csv
import json
import logging
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError

logger = logging.getLogger("cliplab.data.sources")

IMAGE_EXTENSIONS: tuple[str, ...] = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")
TEXT_EXTENSIONS: tuple[str, ...] = ("txt", "caption", "text")
_IMAGE_ALIASES = ("filepath", "image", "image_path", "file_name", "filename", "path", "file")
_CAPTION_ALIASES = ("caption", "captions", "text", "title")


class SkipLog:
    """Records skipped samples as ``(source, reason)`` pairs.

    Examples
    --------
    >>> log = SkipLog()
    >>> log.add("a.csv:3", "empty caption")
    >>> log.count, log.summary()
    (1, 'skipped 1 sample: 1 empty caption')
    """

    def __init__(self):
        self._items: list[tuple[str, str]] = []

    def add(self, source, reason: str) -> None:
        """Record one skipped sample (and log it at debug level)."""
        self._items.append((str(source), str(reason)))
        logger.debug("skipped %s: %s", source, reason)

    @property
    def count(self) -> int:
        """Number of skipped samples."""
        return len(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return True  # a log is truthy even when empty (``skip_log or SkipLog()`` keeps it)

    def to_list(self) -> list[tuple[str, str]]:
        """Copies of the ``(source, reason)`` pairs in the order they were added."""
        return list(self._items)

    def summary(self) -> str:
        """``"skipped 3 samples: 2 no image, 1 malformed row"`` (``"nothing skipped"``)."""
        if not self._items:
            return "nothing skipped"
        reasons: dict[str, int] = {}
        for _, reason in self._items:
            key = reason.split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
        parts = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
        plural = "s" if len(self._items) != 1 else ""
        return f"skipped {len(self._items)} sample{plural}: {parts}"

    def __repr__(self) -> str:
        return f"SkipLog({self.count} skipped)"


@dataclass
class CaptionRecord:
    """One image and its captions.

    Attributes
    ----------
    image : Path
        Absolute (resolved against the table's folder or ``root``).
    captions : list of str
        At least one, in file order.
    meta : dict
        The other columns / keys of the (first) row.
    """

    image: Path
    captions: list[str]
    meta: dict = field(default_factory=dict)


def _pick_key(key: str, default: str, aliases: tuple[str, ...], available) -> str | None:
    """``key`` if present; for a default key the first alias present; else ``None``."""
    if key in available:
        return key
    if key == default:
        return next((a for a in aliases if a in available), None)
    return None


def _split_captions(value) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        return []
    return [c.strip() for c in value if isinstance(c, str) and c.strip()]


def read_caption_table(
    path,
    *,
    image_key: str = "filepath",
    caption_key: str = "caption",
    root=None,
    skip_log: SkipLog | None = None,
) -> list[CaptionRecord]:
    """Read a ``.csv``, ``.tsv`` or ``.jsonl`` table of image paths and captions.

    Rows naming the same image are merged into one record (captions in file order), so
    both "one row per caption" and "one row per image" tables work.  In JSONL the caption
    value may be a string or a list of strings.

    Parameters
    ----------
    path : str or Path
    image_key, caption_key : str
        Column names.  When left at their defaults and absent, common aliases are tried
        (``image``, ``file_name``, ``path``... and ``captions``, ``text``, ``title``).
    root : str or Path, optional
        Folder that relative image paths are resolved against; default the table's folder.
    skip_log : SkipLog, optional
        Receives the skipped rows (malformed, empty path or caption).  A new one is used
        when not given; either way the count is logged.

    Returns
    -------
    list of CaptionRecord

    Raises
    ------
    DataError
        The file is missing, of an unknown type, or lacks the image or caption column.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass the path of a .csv, .tsv or .jsonl table")
    suffix = path.suffix.lower()
    base = Path(root) if root is not None else path.parent
    skip_log = skip_log if skip_log is not None else SkipLog()
    before = skip_log.count
    if suffix in (".csv", ".tsv"):
        rows = _csv_rows(path, "\t" if suffix == ".tsv" else ",", image_key, caption_key, skip_log)
    elif suffix in (".jsonl", ".ndjson"):
        rows = _jsonl_rows(path, image_key, caption_key, skip_log)
    else:
        raise DataError(f"{path}: unknown table type {suffix!r}; use .csv, .tsv or .jsonl")

    records: dict[str, CaptionRecord] = {}
    for image, captions, meta in rows:
        rec = records.get(image)
        if rec is None:
            p = Path(image)
            records[image] = CaptionRecord(p if p.is_absolute() else base / p, captions, meta)
        else:
            rec.captions.extend(captions)
    skipped = skip_log.count - before
    if skipped:
        logger.warning("%s: skipped %d malformed row(s); %s", path, skipped, skip_log.summary())
    logger.info("%s: %d images", path, len(records))
    return list(records.values())


def _csv_rows(path: Path, delimiter: str, image_key: str, caption_key: str, skip_log: SkipLog):
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path}: empty file; the first line must be a header naming "
                            f"the columns {image_key!r} and {caption_key!r}") from None
        except csv.Error as e:
            raise DataError(f"{path}:1: unreadable header ({e})") from None
        header = [h.strip() for h in header]
        ikey = _pick_key(image_key, "filepath", _IMAGE_ALIASES, header)
        ckey = _pick_key(caption_key, "caption", _CAPTION_ALIASES, header)
        for key, given, flag in ((ikey, image_key, "image_key"), (ckey, caption_key, "caption_key")):
            if key is None:
                raise DataError(f"{path}:1: no column {given!r} in header {header}; "
                                f"rename the column or pass {flag}=<column name>")
        ii, ci = header.index(ikey), header.index(ckey)
        line = 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                skip_log.add(f"{path}:{reader.line_num}", f"malformed row: {e}")
                continue
            line = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                skip_log.add(f"{path}:{line}", f"malformed row: {len(row)} fields, header has {len(header)}")
                continue
            image, caption = row[ii].strip(), row[ci].strip()
            if not image:
                skip_log.add(f"{path}:{line}", "empty image path")
                continue
            if not caption:
                skip_log.add(f"{path}:{line}", "empty caption")
                continue
            meta = {k: v for k, v in zip(header, row) if k not in (ikey, ckey)}
            yield image, [caption], meta


def _jsonl_rows(path: Path, image_key: str, caption_key: str, skip_log: SkipLog):
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                skip_log.add(f"{path}:{line_no}", f"malformed row: invalid JSON ({e.msg})")
                continue
            if not isinstance(obj, dict):
                skip_log.add(f"{path}:{line_no}", "malformed row: not a JSON object")
                continue
            ikey = _pick_key(image_key, "filepath", _IMAGE_ALIASES, obj)
            ckey = _pick_key(caption_key, "caption", _CAPTION_ALIASES, obj)
            if ikey is None or not isinstance(obj[ikey], str) or not obj[ikey].strip():
                skip_log.add(f"{path}:{line_no}", f"empty image path: no {image_key!r} string")
                continue
            captions = _split_captions(obj[ckey]) if ckey is not None else []
            if not captions:
                skip_log.add(f"{path}:{line_no}", f"empty caption: no {caption_key!r} text")
                continue
            meta = {k: v for k, v in obj.items() if k not in (ikey, ckey)}
            yield obj[ikey].strip(), captions, meta


# ---------------------------------------------------------------- WebDataset


def _split_member(name: str) -> tuple[str, str]:
    """``"dir/abc.001.png"`` -> (``"dir/abc"``, ``"001.png"``): the key ends at the first
    dot of the file name, as in WebDataset."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, ext.lower() if dot else ""


def _finish(source: str, key: str, files: dict, skip_log: SkipLog):
    image_ext = next((e for e in files if e.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS), None)
    text_ext = next((e for e in files if e.rsplit(".", 1)[-1] in TEXT_EXTENSIONS), None)
    json_ext = next((e for e in files if e.rsplit(".", 1)[-1] == "json"), None)
    meta = {}
    if json_ext is not None:
        try:
            meta = json.loads(files[json_ext].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            skip_log.add(f"{source}:{key}", f"bad json member: {e}")
            return None
        if not isinstance(meta, dict):
            meta = {"json": meta}
    captions: list[str] = []
    if text_ext is not None:
        try:
            captions = [c.strip() for c in files[text_ext].decode("utf-8").splitlines() if c.strip()]
        except UnicodeDecodeError:
            skip_log.add(f"{source}:{key}", "bad text member: not UTF-8")
            return None
    elif isinstance(meta.get("captions"), list):
        captions = _split_captions(meta["captions"])
    elif isinstance(meta.get("caption"), str):
        captions = _split_captions(meta["caption"])
    if image_ext is None:
        skip_log.add(f"{source}:{key}", "no image: sample has no image member")
        return None
    if not captions:
        skip_log.add(f"{source}:{key}", "no text: sample has no caption")
        return None
    meta = dict(meta)
    meta.setdefault("__shard__", source)
    meta.setdefault("__image_ext__", image_ext)
    return key, files[image_ext], captions, meta


def iter_webdataset(paths, *, skip_log: SkipLog | None = None) -> Iterator[tuple[str, bytes, list[str], dict]]:
    """Stream samples from WebDataset ``.tar`` shards.

    Members are grouped by key (the path up to the first dot of the file name); members of
    one sample must be consecutive, as WebDataset writes them.

    Parameters
    ----------
    paths : str, Path or iterable of them
        Shard files, in order.
    skip_log : SkipLog, optional
        Receives samples without image or text, undecodable members and truncated or
        unreadable shards (the samples read before the damage are still yielded).

    Yields
    ------
    key : str
    image_bytes : bytes
        The encoded image (decode with :func:`cliplab.data.images.load_image`).
    captions : list of str
        The ``.txt`` member split into lines, else ``captions``/``caption`` of the json.
    meta : dict
        The ``.json`` member (if any) plus ``__shard__`` and ``__image_ext__``.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    skip_log = skip_log if skip_log is not None else SkipLog()
    for shard in paths:
        shard = Path(shard)
        if not shard.is_file():
            raise DataError(f"{shard}: no such shard; check the path or the brace pattern")
        yield from _iter_shard(shard, skip_log)


def _iter_shard(shard: Path, skip_log: SkipLog):
    source = str(shard)
    key, files = None, {}
    n = 0
    try:
        with tarfile.open(shard, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                mkey, ext = _split_member(member.name)
                if mkey != key:
                    if key is not None:
                        sample = _finish(source, key, files, skip_log)
                        if sample is not None:
                            n += 1
                            yield sample
                    key, files = mkey, {}
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError("unexpected end of data")
                files[ext] = data
    except (tarfile.TarError, EOFError, OSError) as e:
        skip_log.add(f"{source}:{key or '<start>'}", f"truncated shard: {e}")
        logger.warning("%s: unreadable after %d samples (%s); the rest of the shard is skipped", source, n, e)
        return
    if key is not None:
        sample = _finish(source, key, files, skip_log)
        if sample is not None:
            yield sample
