"""Read image-caption data: CSV/TSV/JSONL tables and WebDataset tar shards.

Problems with the *file* (missing column, unreadable header, missing file) raise
:class:`~cliplab.errors.DataError` with the fix.  Problems with single *samples* (a
malformed row, an empty caption, a tar sample without image or text) are skipped and
recorded in a :class:`SkipLog`, which callers report; nothing is dropped silently.

Images are not decoded here (see :mod:`cliplab.data.images`), except by the map-style
datasets :class:`CaptionTableSet` and :class:`WebDatasetSet`, which load an image when
an item is read.

An image file has one identity whatever the spelling of its path (:func:`canonical_path`,
:func:`image_identity`, both at once for many paths: :class:`ImageIdentities`): ``img0.png``, ``./img0.png``, ``sub/../img0.png``, ``a//img0.png``
and a symbolic link to it are one image, so tables that spell it differently in different
rows still count it once.
"""

from __future__ import annotations

import csv
import glob as globlib
import itertools
import json
import logging
import os
import re
import tarfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadImage, DataError
from .text import open_text
from .records import Skipped

logger = logging.getLogger("cliplab.data.sources")

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
"""Image file suffixes (lower case, with the dot): of the files in a folder
(:func:`cliplab.data.images.find_images`) and of the members of a WebDataset shard."""
TEXT_EXTENSIONS: tuple[str, ...] = ("txt", "caption", "text")
IMAGE_COLUMNS: tuple[str, ...] = ("filepath", "image", "image_path", "file_name", "filename", "path", "file")
"""Image-path column of a table: the default name first, then the aliases tried in its absence."""
CAPTION_COLUMNS: tuple[str, ...] = ("caption", "captions", "text", "title")
"""Caption column of a table: the default name first, then the aliases tried in its absence."""


def canonical_path(path, base=None) -> Path:
    """The canonical path of an image file: absolute, symbolic links and ``.``/``..`` resolved.

    Parameters
    ----------
    path : str or path-like
        As written (in a table, on the command line...).
    base : str or path-like, optional
        Folder that a relative ``path`` is relative to (a table's folder); default the
        current directory.

    Returns
    -------
    Path
        ``os.path.realpath(base / path)``.  Never raises: a missing file or a symbolic
        link loop keeps the part that cannot be resolved, and fails later, when read.

    Examples
    --------
    >>> str(canonical_path("./a//b/../img0.png", "/data"))
    '/data/a/img0.png'
    """
    p = Path(os.fsdecode(path))
    if base is not None and not p.is_absolute():
        p = Path(base) / p
    return Path(os.path.realpath(p))


def image_identity(path) -> tuple:
    """What makes two paths the same image: the file itself.

    ``(device, inode)`` of an existing file, so hard links and different spellings on a
    case-insensitive file system are one image too; else the :func:`canonical_path`.

    Parameters
    ----------
    path : str or path-like
        Preferably already a :func:`canonical_path`.

    Returns
    -------
    tuple
        Hashable; equal for two paths exactly when they name the same file.
    """
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return ("path", os.fspath(canonical_path(path)))
    return ("file", st.st_dev, st.st_ino)


_DOTDOT = re.compile(r"(^|[\\/])\.\.([\\/]|$)")


class ImageIdentities:
    """:func:`canonical_path` and :func:`image_identity` of many paths, fast.

    Resolves each folder once and each spelling once (a table names thousands of files
    in a few folders, often several times each); only the last component of each path
    is checked for a symbolic link.  Meant for one pass over one table or folder.

    Parameters
    ----------
    base : str or path-like, optional
        Folder that relative paths are relative to; default the current directory.

    Examples
    --------
    >>> ids = ImageIdentities("/data")
    >>> ids("./a//b/../img0.png")[0] == ids("/data/a/img0.png")[0] == Path("/data/a/img0.png")
    True
    """

    def __init__(self, base=None):
        self.base = base
        self._folders: dict[str, str] = {}
        self._spellings: dict[str, tuple[Path, tuple]] = {}

    def __call__(self, path) -> tuple[Path, tuple]:
        """``(canonical_path(path, base), image_identity(...))``."""
        key = os.fsdecode(path)
        hit = self._spellings.get(key)
        if hit is None:
            hit = self._spellings[key] = self._resolve(key)
        return hit

    def _resolve(self, spelled: str) -> tuple[Path, tuple]:
        p = spelled
        if self.base is not None and not os.path.isabs(p):
            p = os.path.join(os.fspath(self.base), p)
        if _DOTDOT.search(p):                       # "link/.." must see the link: resolve all
            resolved = canonical_path(p)
        else:
            folder, name = os.path.split(os.path.abspath(p))
            if not name or os.path.islink(os.path.join(folder, name)):
                resolved = canonical_path(p)
            else:
                real = self._folders.get(folder)
                if real is None:
                    real = self._folders[folder] = os.path.realpath(folder)
                resolved = Path(real, name)
        return resolved, image_identity(resolved)


class SkipLog:
    """Records skipped samples as :class:`~cliplab.data.records.Skipped` records.

    ``index`` is the sample's row or line number where the reader knows it, else its
    position among the skipped samples; ``source`` names the file and place
    (``"a.csv:3"``, ``"shard.tar:key"``).

    Examples
    --------
    >>> log = SkipLog()
    >>> log.add("a.csv:3", "empty caption", index=3)
    >>> log.count, log.summary()
    (1, 'skipped 1 sample: 1 empty caption')
    >>> log.to_list()[0].reason
    'empty caption'
    """

    def __init__(self):
        self._items: list[Skipped] = []

    def add(self, source, reason: str, *, index: int | None = None) -> None:
        """Record one skipped sample (and log it at debug level)."""
        index = len(self._items) if index is None else index
        self._items.append(Skipped(int(index), str(source), str(reason)))
        logger.debug("skipped %s: %s", source, reason)

    @property
    def count(self) -> int:
        """Number of skipped samples."""
        return len(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return True  # a log is truthy even when empty (``skip_log or SkipLog()`` keeps it)

    def to_list(self) -> list[Skipped]:
        """The records in the order they were added."""
        return list(self._items)

    def summary(self) -> str:
        """``"skipped 3 samples: 2 no image, 1 malformed row"`` (``"nothing skipped"``)."""
        if not self._items:
            return "nothing skipped"
        reasons: dict[str, int] = {}
        for item in self._items:
            key = item.reason.split(":")[0]
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
        The :func:`canonical_path` (relative paths are resolved against the table's
        folder or ``root``).
    captions : list of str
        At least one, in file order.
    meta : dict
        The other columns / keys of the (first) row.
    """

    image: Path
    captions: list[str]
    meta: dict = field(default_factory=dict)


def pick_column(key: str, aliases: tuple[str, ...], available) -> str | None:
    """The column (or JSON key) that ``key`` names among ``available``.

    ``key`` itself if present; otherwise, when ``key`` is the default name
    (``aliases[0]``), the first of ``aliases`` present; else ``None``.
    """
    if key in available:
        return key
    if key == aliases[0]:
        return next((a for a in aliases if a in available), None)
    return None


def read_table_header(path, columns: dict | None = None, *,
                      what: str = "table") -> tuple[list[str], dict[str, int]]:
    """Read the header of a CSV/TSV table (TSV for a ``.tsv`` suffix) and find its columns.

    Parameters
    ----------
    path : str or Path
    columns : dict, optional
        ``{option: (column, aliases)}``, for example
        ``{"image_key": ("filepath", IMAGE_COLUMNS)}``: the column asked for through the
        option ``option`` and the aliases tried when it is the default (:func:`pick_column`).
    what : str, default "table"
        What the file is, for error messages.

    Returns
    -------
    header : list of str
        The column names, stripped.
    index : dict
        ``{option: position of its column in header}``.

    Raises
    ------
    DataError
        Missing or empty file, unreadable header, or a column not in the header (the
        message names the option that chooses another one).
    """
    path = Path(path)
    columns = columns or {}
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open_text(path, what=what) as f:
        try:
            header = [h.strip() for h in next(csv.reader(f, delimiter=delimiter))]
        except StopIteration:
            asked = " and ".join(repr(c) for c, _ in columns.values())
            raise DataError(f"{path}: empty file; the first line must be a header"
                            + (f" naming the columns {asked}" if asked else "")) from None
        except csv.Error as e:
            raise DataError(f"{path}:1: unreadable header ({e})") from None
    index = {}
    for option, (given, aliases) in columns.items():
        key = pick_column(given, aliases, header)
        if key is None:
            raise DataError(f"{path}:1: no column {given!r} in header {header}; "
                            f"rename the column or name it with --{option.replace('_', '-')} "
                            f"({option}= in Python)")
        index[option] = header.index(key)
    return header, index


def _caption_list(value) -> tuple[list[str], list[int]]:
    """``(captions, dropped)``: the non-empty strings of a caption value (a string or a
    list), stripped, and the positions of the list entries that are empty or not text."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        return [], []
    keep = [isinstance(c, str) and bool(c.strip()) for c in value]
    return [c.strip() for c, k in zip(value, keep) if k], [j for j, k in enumerate(keep) if not k]


def _count_dropped_captions(skip_log: SkipLog, source: str, key: str, captions, dropped) -> None:
    """Record the empty or non-text entries of a caption list whose other entries are kept."""
    if captions:
        for j in dropped:
            skip_log.add(source, f"empty caption: entry {j} of {key!r} is empty or not text")


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
    both "one row per caption" and "one row per image" tables work.  Two rows name the same
    image when their paths name the same file (:class:`ImageIdentities`), however they are
    spelled (``img0.png``, ``./img0.png``, a symbolic link...).  In JSONL the caption
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
    if path.is_dir():
        raise DataError(f"{path}: is a folder; pass the path of a .csv, .tsv or .jsonl table")
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass the path of a .csv, .tsv or .jsonl table")
    suffix = path.suffix.lower()
    base = Path(root) if root is not None else path.parent
    skip_log = skip_log if skip_log is not None else SkipLog()
    before = skip_log.count
    if suffix in (".csv", ".tsv"):
        rows = _csv_rows(path, image_key, caption_key, skip_log)
    elif suffix in (".jsonl", ".ndjson"):
        rows = _jsonl_rows(path, image_key, caption_key, skip_log)
    else:
        raise DataError(f"{path}: unknown table type {suffix!r}; use .csv, .tsv or .jsonl")

    records: dict[tuple, CaptionRecord] = {}
    spellings: dict[tuple, str] = {}
    n_respelled = 0
    identities = ImageIdentities(base)
    for image, captions, meta in rows:
        resolved, ident = identities(image)
        rec = records.get(ident)
        if rec is None:
            records[ident] = CaptionRecord(resolved, captions, meta)
            spellings[ident] = image
        else:
            rec.captions.extend(captions)
            n_respelled += spellings[ident] != image
    if n_respelled:
        logger.info("%s: %d row(s) name an image already listed under another path spelling; "
                    "merged into its record", path, n_respelled)
    skipped = skip_log.count - before
    if skipped:
        logger.warning("%s: skipped %d malformed row(s); %s", path, skipped, skip_log.summary())
    logger.info("%s: %d images", path, len(records))
    return list(records.values())


def _csv_rows(path: Path, image_key: str, caption_key: str, skip_log: SkipLog):
    header, index = read_table_header(path, {"image_key": (image_key, IMAGE_COLUMNS),
                                             "caption_key": (caption_key, CAPTION_COLUMNS)},
                                      what="caption table")
    ii, ci = index["image_key"], index["caption_key"]
    with open_text(path, what="caption table") as f:
        reader = csv.reader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        next(reader, None)  # the header
        for _, row in valid_csv_rows(reader, path, len(header), {"image path": ii, "caption": ci}, skip_log):
            image, caption = row[ii].strip(), row[ci].strip()
            meta = {k: v for k, v in zip(header, row) if k not in (header[ii], header[ci])}
            yield image, [caption], meta


def valid_csv_rows(reader, path, n_fields: int, required: dict, skip_log: SkipLog):
    """``(line, row)`` of a ``csv.reader`` past its header, skipping bad rows.

    Blank rows are ignored; unparsable rows, rows with the wrong number of fields and
    rows whose ``required`` fields (``{"what": column index}``) are empty are counted in
    ``skip_log`` as ``path:line`` with the reason.  A quote left open swallows every
    line after it into one field; the ``csv`` module reads that silently, so such a last
    row is detected here and each line it swallowed is counted.  (``line`` is where the
    row starts.)
    """
    end = reader.line_num                 # the header's last line
    spanning = 0
    while True:
        start = end + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            end = reader.line_num
            skip_log.add(f"{path}:{end}", f"malformed row: {e}", index=end)
            continue
        end = reader.line_num
        if not row or all(not c.strip() for c in row):
            continue
        if end > start:
            if _open_quote(path, start, end, reader.dialect):
                for line in range(start, end + 1):
                    skip_log.add(f"{path}:{line}", f"malformed row: inside a quote opened on line "
                                                   f"{start} and never closed", index=line)
                continue
            spanning += 1
        if len(row) != n_fields:
            skip_log.add(f"{path}:{start}", f"malformed row: {len(row)} fields, header has {n_fields}",
                         index=start)
            continue
        empty = next((what for what, i in required.items() if not row[i].strip()), None)
        if empty is not None:
            skip_log.add(f"{path}:{start}", f"empty {empty}", index=start)
            continue
        yield start, row
    if spanning:
        logger.warning("%s: %d row(s) span several lines (a quoted field with line breaks); "
                       "check for a misplaced quote if that is not intended", path, spanning)


def _open_quote(path, start: int, end: int, dialect) -> bool:
    """Whether lines ``start``..``end`` of ``path`` end inside a quoted field."""
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        lines = list(itertools.islice(f, start - 1, end))
    if len(lines) != end - start + 1:
        return False
    try:
        for _ in csv.reader(lines, delimiter=dialect.delimiter, quotechar=dialect.quotechar, strict=True):
            pass
    except csv.Error as e:
        return "unexpected end of data" in str(e)
    return False


def _jsonl_rows(path: Path, image_key: str, caption_key: str, skip_log: SkipLog):
    with open_text(path, what="caption table") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                skip_log.add(f"{path}:{line_no}", f"malformed row: invalid JSON ({e.msg})", index=line_no)
                continue
            if not isinstance(obj, dict):
                skip_log.add(f"{path}:{line_no}", "malformed row: not a JSON object", index=line_no)
                continue
            ikey = pick_column(image_key, IMAGE_COLUMNS, obj)
            ckey = pick_column(caption_key, CAPTION_COLUMNS, obj)
            if ikey is None or not isinstance(obj[ikey], str) or not obj[ikey].strip():
                skip_log.add(f"{path}:{line_no}", f"empty image path: no {image_key!r} string",
                             index=line_no)
                continue
            captions, dropped = _caption_list(obj[ckey]) if ckey is not None else ([], [])
            _count_dropped_captions(skip_log, f"{path}:{line_no}", ckey, captions, dropped)
            if ckey is None:
                skip_log.add(f"{path}:{line_no}", f"malformed row: no {caption_key!r} key (name the caption "
                             "key with --caption-key, caption_key= in Python)", index=line_no)
                continue
            if not captions:
                skip_log.add(f"{path}:{line_no}", f"empty caption: no {caption_key!r} text", index=line_no)
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


def _is_image(ext: str) -> bool:
    return "." + ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS


def _finish(source: str, key: str, files: dict, skip_log: SkipLog):
    """One grouped sample as ``(key, image, captions, meta)``, or ``None`` (recorded in
    ``skip_log``) without image or text.  ``image`` is whatever ``files`` holds for the
    image member: its bytes, or its ``TarInfo`` when indexing."""
    image_ext = next((e for e in files if _is_image(e)), None)
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
            captions = [c.strip() for c in files[text_ext].decode("utf-8-sig").splitlines() if c.strip()]
        except UnicodeDecodeError:
            skip_log.add(f"{source}:{key}", "bad text member: not UTF-8")
            return None
    elif isinstance(meta.get("captions"), list):
        captions, dropped = _caption_list(meta["captions"])
        if image_ext is not None:
            _count_dropped_captions(skip_log, f"{source}:{key}", "captions", captions, dropped)
    elif isinstance(meta.get("caption"), str):
        captions = _caption_list(meta["caption"])[0]
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


def _require_shard(shard) -> Path:
    shard = Path(shard)
    if not shard.is_file():
        raise DataError(f"{shard}: no such shard; check the path or the brace pattern")
    return shard


def iter_webdataset(paths, *, skip_log: SkipLog | None = None) -> Iterator[tuple[str, bytes, list[str], dict]]:
    """Stream samples from WebDataset ``.tar`` shards.

    Members are grouped by key (the path up to the first dot of the file name); members of
    one sample must be consecutive, as WebDataset writes them.

    Parameters
    ----------
    paths : str, Path or iterable of them
        Shard files, in order.
    skip_log : SkipLog, optional
        Receives samples without image or text (e.g. a ``.jpg`` whose ``.txt`` is
        missing), undecodable members, and one entry per damaged shard: cut at any
        point (inside a member, inside or before a header, without its end-of-archive
        blocks), an invalid header, an empty or non-tar file, data after the end of the
        archive.  The samples read before the damage are still yielded; those after it
        cannot be counted, the shard's entry stands for them.

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
        shard = _require_shard(shard)
        for key, files in _shard_groups(shard, skip_log):
            sample = _finish(str(shard), key, files, skip_log)
            if sample is not None:
                yield sample


def _recording_tarinfo(ends: list):
    """A ``TarInfo`` class that appends to ``ends`` the header error which stops ``tarfile``.

    ``tarfile`` ends its member iteration *silently* at a zero block (the proper end),
    at the end of the file, at a header cut short and at an invalid header; the error it
    swallows is the only record of which one it was.
    """

    class _TarInfo(tarfile.TarInfo):
        @classmethod
        def fromtarfile(cls, tar):
            try:
                return super().fromtarfile(tar)
            except tarfile.HeaderError as e:
                ends.append(e)
                raise

    return _TarInfo


def _has_data_after_end(tar) -> bool:
    """Whether anything but zero padding follows the end-of-archive block just read."""
    while True:
        chunk = tar.fileobj.read(1 << 16)
        if not chunk:
            return False
        if chunk.strip(b"\0"):
            return True


def _damage(ends: list, offset: int, last: str | None, error: Exception | None = None) -> str | None:
    """Why a shard's reading stopped early, as a skip reason; ``None`` at a proper end.

    ``ends`` as recorded by :func:`_recording_tarinfo`, ``offset`` where the failing header
    lies, ``last`` the name of the last member read, ``error`` what was raised (if any).
    """
    end = ends[-1] if ends else None
    after = f"after member {last!r}" if last else "before its first member"
    lost = "the samples after it are lost"
    if isinstance(end, tarfile.EmptyHeaderError):
        if last is None:
            return "empty shard: 0 bytes, not a tar archive"
        return (f"truncated shard: ends at byte {offset} {after} without the end-of-archive "
                f"blocks; {lost}")
    if isinstance(end, tarfile.TruncatedHeaderError):
        return f"truncated shard: cut inside the member header at byte {offset}, {after}; {lost}"
    if isinstance(end, tarfile.InvalidHeaderError):
        if last is None:
            return f"unreadable shard: not a tar archive ({end})"
        return f"corrupt shard: invalid member header at byte {offset} ({end}), {after}; {lost}"
    if error is not None:
        return f"truncated shard: {error}"
    return None


def _shard_groups(shard: Path, skip_log: SkipLog, *, read_images: bool = True):
    """Yield ``(key, files)`` for each run of consecutive members sharing a key.

    ``files`` maps extension to the member's bytes; with ``read_images=False`` (plain,
    uncompressed tar only) image members map to their ``TarInfo`` instead and their data
    is seeked past, not read.

    Every way a shard can end early is recorded in ``skip_log``, once per shard: cut
    inside a member (the group being read is dropped), cut inside or before a member
    header, an invalid header, no end-of-archive blocks, an empty or non-tar file, and
    data after the end-of-archive blocks (a second archive appended, which ``tarfile``
    would not read).  Samples past the damage cannot be counted; the entry stands for them.
    """
    source = str(shard)
    key, files, last = None, {}, None
    n = 0
    end = shard.stat().st_size
    ends: list = []
    damage = None
    try:
        with tarfile.open(shard, mode="r|*" if read_images else "r:",
                          tarinfo=_recording_tarinfo(ends)) as tar:
            for member in tar:
                last = member.name
                if not member.isfile():
                    continue
                mkey, ext = _split_member(member.name)
                if mkey != key:
                    if key is not None:
                        n += 1
                        yield key, files
                    key, files = mkey, {}
                if not read_images and _is_image(ext):
                    if member.offset_data + member.size > end:
                        raise tarfile.ReadError("unexpected end of data")
                    files[ext] = member
                    continue
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError("unexpected end of data")
                files[ext] = data
            damage = _damage(ends, tar.offset, last)
            if damage is None and _has_data_after_end(tar):
                damage = (f"trailing data: the shard goes on after its end-of-archive blocks "
                          f"(byte {tar.offset}), e.g. a second archive appended; it is not read")
    except (tarfile.TarError, EOFError, OSError) as e:
        reason = _damage(ends, 0, last, e)
        skip_log.add(f"{source}:{key or '<start>'}", reason)
        logger.warning("%s: unreadable after %d samples (%s); the rest of the shard is skipped",
                       source, n, reason)
        return
    if key is not None:
        yield key, files
        n += 1
    if damage is not None:
        skip_log.add(f"{source}:{key or '<start>'}", damage)
        logger.warning("%s: %s (%d samples read)", source, damage, n)


@dataclass(slots=True)
class ShardSample:
    """Where one WebDataset sample's image lies in its (uncompressed) shard.

    Attributes
    ----------
    shard : Path
    key : str
        The sample's key (member names up to the first dot).
    offset, size : int
        Byte offset and length of the image member's data in ``shard``.
    captions : list of str
        At least one.
    """

    shard: Path
    key: str
    offset: int
    size: int
    captions: list[str]


# gzip, bzip2, xz: their members have no byte offsets in the file
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


def index_webdataset(paths, *, skip_log: SkipLog | None = None) -> list[ShardSample]:
    """Scan WebDataset ``.tar`` shards once and record where each usable sample's image is.

    Text and json members are read (for the captions); image data is seeked past and only
    its offset and size kept, so a :class:`WebDatasetSet` can
    later read any image by seeking.  Samples are grouped and parsed as in
    :func:`iter_webdataset`.

    Parameters
    ----------
    paths : str, Path or iterable of them
        Uncompressed shard files, in order (see :func:`expand_shards`).
    skip_log : SkipLog, optional
        Receives what :func:`iter_webdataset` skips (samples without image or text,
        undecodable members, one entry per truncated, corrupt or unreadable shard).

    Returns
    -------
    list of ShardSample
        In shard order, then member order.

    Raises
    ------
    DataError
        A shard is missing or compressed (``.tar.gz`` and the like).
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    skip_log = skip_log if skip_log is not None else SkipLog()
    samples: list[ShardSample] = []
    for shard in paths:
        shard = _require_shard(shard)
        with open(shard, "rb") as f:
            if f.read(6).startswith(_COMPRESSED_MAGIC):
                raise DataError(f"{shard}: compressed shard; training reads images by byte offset, "
                                f"so decompress it to a plain .tar (e.g. gunzip)")
        for key, files in _shard_groups(shard, skip_log, read_images=False):
            sample = _finish(str(shard), key, files, skip_log)
            if sample is not None:
                _, member, captions, _ = sample
                samples.append(ShardSample(shard, key, member.offset_data, member.size, captions))
    return samples


def write_webdataset_shard(path, samples) -> int:
    """Write one uncompressed WebDataset shard atomically: whole or not at all.

    The members go to a temporary file beside ``path``, which is flushed, fsync'd and
    renamed over ``path``; a run killed while writing leaves no shard (only a
    ``.NAME.tmp-PID`` file a rerun may delete), never a truncated one.

    Parameters
    ----------
    path : str or Path
        The ``.tar`` file to write.
    samples : iterable of (str, dict of str to bytes)
        ``(key, {extension: data})``; member ``key.extension`` holds ``data``.  Keys
        must not contain a dot (a reader splits member names at the first dot).

    Returns
    -------
    int
        The number of samples written.

    Raises
    ------
    ValueError
        A key with a dot or a slash.
    """
    import io

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    n = 0
    try:
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for key, members in samples:
                    if "." in key or "/" in key:
                        raise ValueError(f"a WebDataset key may not contain '.' or '/': {key!r}")
                    for ext, data in members.items():
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size, info.mode = len(data), 0o644
                        tar.addfile(info, io.BytesIO(data))
                    n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)  # the rename itself survives a power cut once the folder is synced
    return n


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entry list to disk (after a rename into it); silently skipped where
    the platform cannot open a folder.  Shared by every atomic writer (shards, the feature
    cache, Ray outputs)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------- map-style datasets


class CaptionTableSet:
    """Image files with captions (rows of a CSV/JSONL/WebDataset caption table).

    Parameters
    ----------
    records : sequence of CaptionRecord
        Objects with ``.image`` (a path) and ``.captions`` (list of str), as
        returned by :func:`read_caption_table`.
    loader : callable, optional
        ``path -> PIL.Image``; default :func:`cliplab.data.images.load_image`,
        which raises :class:`~cliplab.errors.BadImage` on broken files (the
        Trainer counts and replaces those samples).

    Raises
    ------
    DataError
        If the table is empty or a record has no caption.
    """

    def __init__(self, records, *, loader=None):
        self.records = list(records)
        if not self.records:
            raise DataError("the caption table has no rows")
        for r in self.records:
            if not r.captions:
                raise DataError(f"{r.image}: the row has no caption")
        self.loader = loader

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        record = self.records[int(index)]
        loader = self.loader
        if loader is None:
            from .images import load_image  # PIL only when images are read

            loader = load_image
        return loader(record.image), list(record.captions)


class WebDatasetSet:
    """WebDataset shard samples as a map-style dataset (images read by byte offset).

    Parameters
    ----------
    samples : sequence of ShardSample
        As returned by :func:`index_webdataset`.
    loader : callable, optional
        ``bytes -> PIL.Image``; default :func:`cliplab.data.images.load_image`.
        A broken image raises :class:`~cliplab.errors.BadImage` naming
        ``shard:key`` (the Trainer counts and replaces those samples).
    max_open : int, default 8
        Shard files kept open per process (least recently used are closed).

    Raises
    ------
    DataError
        If there are no samples.
    ValueError
        If ``max_open < 1``.

    Notes
    -----
    Open files are per process: a DataLoader worker (forked or spawned) opens its
    own, because a handle inherited over ``fork`` shares its file position with
    the parent.  One instance is not meant to be read from several threads.
    """

    def __init__(self, samples, *, loader=None, max_open: int = 8):
        self.samples = list(samples)
        if not self.samples:
            raise DataError("the shards hold no usable sample (image + caption)")
        if int(max_open) < 1:
            raise ValueError(f"max_open must be at least 1, got {max_open!r}")
        self.loader = loader
        self.max_open = int(max_open)
        self._files: OrderedDict = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[int(index)]
        source = f"{sample.shard}:{sample.key}"
        f = self._file(sample.shard)
        f.seek(sample.offset)
        data = f.read(sample.size)
        if len(data) != sample.size:
            raise BadImage(source, f"truncated shard: {len(data)} of {sample.size} bytes")
        loader = self.loader
        if loader is None:
            from .images import load_image  # PIL only when images are read

            loader = load_image
        try:
            image = loader(data)
        except BadImage as err:
            raise BadImage(source, err.reason) from err
        return image, list(sample.captions)

    def _file(self, shard):
        if self._pid != os.getpid():  # forked: the inherited handles share the parent's positions
            self._files, self._pid = OrderedDict(), os.getpid()
        f = self._files.get(shard)
        if f is None:
            try:
                f = open(shard, "rb")
            except OSError as e:
                raise DataError(f"{shard}: cannot open shard ({e.strerror or e})") from None
            self._files[shard] = f
            while len(self._files) > self.max_open:
                self._files.popitem(last=False)[1].close()
        self._files.move_to_end(shard)
        return f

    def close(self) -> None:
        """Close the shard files this process opened."""
        if self._pid == os.getpid():
            for f in self._files.values():
                f.close()
        self._files.clear()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"] = OrderedDict()  # file handles do not pickle (spawned workers)
        return state


# ---------------------------------------------------------------- shard patterns


_GLOB_CHARS = frozenset("*?[")
_BRACE_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")

MAX_BRACE_EXPANSION = 2_000_000
"""Most names one brace pattern may expand to (DataComp-12.8B has 1.28 M shards).

A range's size is read from its two numbers, so ``{0..99999999999}`` would ask for
10^11 names; such a pattern is refused (:class:`~cliplab.errors.DataError`) before the
names are made.
"""


def _too_many(pattern: str, count: int) -> DataError:
    return DataError(f"{pattern}: the brace pattern names {count:,} or more shards, over the limit "
                     f"of {MAX_BRACE_EXPANSION:,}; check the range")


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion: ``{0000..0003}`` zero-padded ranges and ``{x,y}`` lists.

    A range is padded to the width of its longer end when either end has a leading zero,
    as in bash; braces that are neither stay as they are.

    Raises
    ------
    DataError
        The pattern names more than :data:`MAX_BRACE_EXPANSION` strings.

    Examples
    --------
    >>> expand_braces("shard-{08..10}.tar")
    ['shard-08.tar', 'shard-09.tar', 'shard-10.tar']
    >>> expand_braces("{a,b}/{0..1}.tar")
    ['a/0.tar', 'a/1.tar', 'b/0.tar', 'b/1.tar']
    """
    depth, open_at = 0, 0
    for i, ch in enumerate(pattern):
        if ch == "{":
            open_at = i if depth == 0 else open_at
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0:
                alternatives = _brace_alternatives(pattern[open_at + 1:i])
                if alternatives is not None:
                    head, tail = pattern[:open_at], pattern[i + 1:]
                    names: list[str] = []
                    for alt in alternatives:
                        names.extend(expand_braces(head + alt + tail))
                        if len(names) > MAX_BRACE_EXPANSION:
                            raise _too_many(pattern, len(names))
                    return names
    return [pattern]


def _brace_alternatives(body: str) -> list[str] | None:
    m = _BRACE_RANGE.fullmatch(body)
    if m:
        a, b = m.groups()
        padded = any(len(x.lstrip("-")) > 1 and x.lstrip("-").startswith("0") for x in (a, b))
        width = max(len(a), len(b)) if padded else 0
        step = 1 if int(b) >= int(a) else -1
        if abs(int(b) - int(a)) + 1 > MAX_BRACE_EXPANSION:  # before the names are made
            raise _too_many("{" + body + "}", abs(int(b) - int(a)) + 1)
        return [str(k).zfill(width) for k in range(int(a), int(b) + step, step)]
    parts, depth, current = [], 0, []
    for ch in body:
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        depth += (ch == "{") - (ch == "}")
        current.append(ch)
    parts.append("".join(current))
    return parts if len(parts) > 1 else None


def expand_shards(spec) -> list[Path]:
    """The shard files named by ``spec``.

    Parameters
    ----------
    spec : str or Path
        A folder (its ``*.tar`` files, sorted), one ``.tar`` file, a glob
        (``data/*.tar``, matches sorted) or a brace pattern
        (``data/shard-{0000..0003}.tar``, in expansion order; may contain globs).

    Returns
    -------
    list of Path

    Raises
    ------
    DataError
        Nothing matches, a named shard is missing, a single file is not a ``.tar``, or
        a brace pattern names more than :data:`MAX_BRACE_EXPANSION` shards.
    """
    path = Path(spec)
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        if not shards:
            raise DataError(f"{path}: no .tar shards in this folder")
        return shards
    if path.is_file() and path.suffix.lower() != ".tar":
        raise DataError(f"{path}: not a .tar shard; pass a .tar file, a folder of shards, "
                        f"a glob or a brace pattern such as shard-{{0000..0003}}.tar")
    shards: list[Path] = []
    for pattern in expand_braces(str(spec)):
        if _GLOB_CHARS & set(pattern):
            matches = sorted(globlib.glob(pattern))
            if not matches:
                raise DataError(f"{pattern}: no file matches this pattern")
            shards.extend(Path(m) for m in matches)
        else:
            shards.append(Path(pattern))
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise DataError(f"no such shard: {', '.join(missing[:3])}{more}; check the path or the pattern")
    return shards
