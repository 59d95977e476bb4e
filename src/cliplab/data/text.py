"""Reading the text files users give (tables, label lists, templates) in one robust way.

Every user text file goes through :func:`open_text` (streamed: CSV and JSONL tables)
or :func:`read_text` / :func:`read_lines` (small files: labels, templates, configs):

- UTF-8, with or without a byte-order mark; UTF-16 when it starts with a UTF-16
  byte-order mark (what spreadsheet programs write as "Unicode text");
- ``\\r\\n``, ``\\r`` and ``\\n`` line ends alike;
- anything else (Latin-1, a PNG, random bytes) raises :class:`~cliplab.errors.DataError`
  naming the file, the first bad byte and its line, and a missing file, a folder or an
  unreadable file raises it too; the CLI turns it into one line and exit code 4.
"""

from __future__ import annotations

import codecs
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, TextIO

from ..errors import DataError

__all__ = ["open_text", "read_text", "read_lines"]

_LINE_END = re.compile(r"\r\n|\r|\n")


def _encoding(head: bytes) -> str:
    """``utf-16`` for a UTF-16 byte-order mark, else ``utf-8-sig`` (a UTF-8 mark is dropped)."""
    if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        return "utf-32"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    return "utf-8-sig"


def _check_file(path: Path, what: str) -> str:
    """The encoding of ``path``; DataError for a missing, non-regular or unreadable file."""
    if not path.exists():
        raise DataError(f"{path}: no such {what}")
    if path.is_dir():
        raise DataError(f"{path}: is a folder; expected a {what} (a text file)")
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        raise DataError(f"{path}: cannot read the {what}: {e.strerror or e}") from None
    if _looks_like_image(head):
        raise DataError(f"{path}: is an image, not a {what} (text)")
    encoding = _encoding(head)
    if encoding == "utf-8-sig" and b"\x00" in head:
        raise DataError(f"{path}: the {what} is not UTF-8 text (NUL byte at offset {head.index(0)}: "
                        "UTF-16 without a byte-order mark, or a binary file); save it as UTF-8")
    return encoding


def _decode_problem(path: Path, encoding: str, what: str) -> DataError:
    """The DataError of a file that does not decode: the first bad byte, its line and offset."""
    name = "UTF-8" if encoding == "utf-8-sig" else encoding.upper()
    decoder = codecs.getincrementaldecoder(encoding)()
    offset, line = 0, 1
    detail = "cut in the middle of a character at the end"
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                # the incremental decoder may hold back up to 3 bytes of the previous chunk
                pending = len(e.object) - len(chunk)
                bad = offset - pending + e.start
                line += e.object[:e.start].count(b"\n")
                detail = f"byte 0x{e.object[e.start]:02x} at line {line}, offset {bad}"
                break
            offset += len(chunk)
            line += chunk.count(b"\n")
    return DataError(f"{path}: the {what} is not {name} text ({detail}); save it as UTF-8")


def _looks_like_image(head: bytes) -> bool:
    """PNG, JPEG, GIF, BMP or WebP magic bytes."""
    return head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM")) or head[8:12] == b"WEBP"


@contextmanager
def open_text(path, *, what: str = "text file") -> Iterator[TextIO]:
    """Open a user's text file for streaming, with line ends left for ``csv`` (``newline=""``).

    A decoding error anywhere while the block reads the file becomes a DataError.

    Parameters
    ----------
    path : str or Path
    what : str
        What the file is, for messages ("caption table", "labels file"...).

    Raises
    ------
    DataError
        Missing file, a folder, unreadable, or bytes that are not UTF-8 / UTF-16 text.
    """
    path = Path(path)
    encoding = _check_file(path, what)
    try:
        with open(path, newline="", encoding=encoding) as f:
            yield f
    except UnicodeDecodeError:
        raise _decode_problem(path, encoding, what) from None


def read_text(path, *, what: str = "text file") -> str:
    """The whole text of a user's file, byte-order mark removed, line ends made ``\\n``.

    Raises :class:`~cliplab.errors.DataError` as :func:`open_text`.
    """
    with open_text(path, what=what) as f:
        text = f.read()
    return "\n".join(_LINE_END.split(text))


def read_lines(path, *, what: str = "text file", comments: bool = True) -> list[str]:
    """The non-blank lines of a user's file, stripped; ``#`` lines dropped when ``comments``.

    Raises :class:`~cliplab.errors.DataError` as :func:`open_text`.
    """
    lines = (s.strip() for s in read_text(path, what=what).split("\n"))
    return [s for s in lines if s and not (comments and s.startswith("#"))]
