"""User text files: BOMs, line ends and encodings, read once and the same way everywhere."""

import pytest

from cliplab.data.sources import read_caption_table
from cliplab.data.text import open_text, read_lines, read_text
from cliplab.errors import DataError


def test_line_ends_and_byte_order_marks(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes(b"\xef\xbb\xbfa\r\nb\rc\n")
    assert read_text(f) == "a\nb\nc\n"
    for raw in (b"\xff\xfe" + "a\r\nb\rc\n".encode("utf-16-le"), b"\xfe\xff" + "a\nb\nc".encode("utf-16-be"),
                "a\nb\r\nc".encode("utf-32"), b" a \n\n\t\nb\n# comment\nc"):
        f.write_bytes(raw)
        assert read_lines(f) == ["a", "b", "c"]


def test_decode_error_names_the_byte_and_line_past_the_first_chunk(tmp_path):
    f = tmp_path / "big.csv"
    head = ("x" * 99 + "\n") * 1000                       # 100,000 bytes: past the 64 KiB read size
    f.write_bytes(head.encode() + b"caf\xe9\n")
    with pytest.raises(DataError, match=r"big.csv: the table is not UTF-8 text "
                                        r"\(byte 0xe9 at line 1001, offset 100003\); save it as UTF-8"):
        with open_text(f, what="table") as stream:
            for _ in stream:
                pass


@pytest.mark.parametrize("raw, message", [
    ("a,b\n".encode("utf-16-le"), "NUL byte at offset 1"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is an image, not a table"),
    ("café".encode()[:-1], "cut in the middle of a character at the end"),
])
def test_not_text(tmp_path, raw, message):
    f = tmp_path / "x.csv"
    f.write_bytes(raw)
    with pytest.raises(DataError, match=message):
        read_text(f, what="table")


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(DataError, match="no such labels file"):
        read_lines(tmp_path / "nope.txt", what="labels file")
    with pytest.raises(DataError, match="is a folder; expected a labels file"):
        read_lines(tmp_path, what="labels file")


def test_caption_table_from_a_spreadsheet_export(tmp_path):
    """UTF-16 with BOM and CRLF, as spreadsheet programs write "Unicode text"."""
    text = "filepath\tcaption\r\na.png\tun café\r\nb.png\tdeux\r\n"
    (tmp_path / "t.tsv").write_bytes(b"\xff\xfe" + text.encode("utf-16-le"))
    recs = read_caption_table(tmp_path / "t.tsv")
    assert [(r.image.name, r.captions) for r in recs] == [("a.png", ["un café"]), ("b.png", ["deux"])]
    (tmp_path / "l.csv").write_bytes("filepath,caption\na.png,café\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"l.csv: the caption table is not UTF-8 text \(byte 0xe9 at line 2"):
        read_caption_table(tmp_path / "l.csv")
