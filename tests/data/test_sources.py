"""Caption tables and WebDataset shards: reading, merging, skipping and counting."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from cliplab.data.sources import CaptionRecord, SkipLog, iter_webdataset, read_caption_table
from cliplab.errors import DataError


def test_skiplog():
    log = SkipLog()
    assert log.count == 0 and len(log) == 0 and log.summary() == "nothing skipped"
    log.add("a.csv:3", "malformed row: 2 fields")
    log.add("a.csv:5", "malformed row: 4 fields")
    log.add("s.tar:k", "no image: x")
    assert log.count == 3 and len(log) == 3
    last = log.to_list()[2]
    assert (last.source, last.reason) == ("s.tar:k", "no image: x")
    assert log.summary() == "skipped 3 samples: 2 malformed row, 1 no image"


def test_csv_merges_rows_and_resolves_paths(tmp_path):
    (tmp_path / "t.csv").write_text(
        "filepath,caption,label\n"
        "img/a.png,a red star,red star\n"
        "img/a.png,a small red star,red star\n"
        "/abs/b.png,\"a blue ring, large\",blue ring\n"
    )
    recs = read_caption_table(tmp_path / "t.csv")
    assert recs == [
        CaptionRecord(tmp_path / "img/a.png", ["a red star", "a small red star"], {"label": "red star"}),
        CaptionRecord(Path("/abs/b.png"), ["a blue ring, large"], {"label": "blue ring"}),
    ]
    recs = read_caption_table(tmp_path / "t.csv", root=tmp_path / "elsewhere")
    assert recs[0].image == tmp_path / "elsewhere/img/a.png"


def test_tsv_and_custom_keys(tmp_path):
    (tmp_path / "t.tsv").write_text("path\ttext\nx.jpg\thello, world\n")
    recs = read_caption_table(tmp_path / "t.tsv")  # default keys fall back to aliases
    assert recs[0].captions == ["hello, world"] and recs[0].image.name == "x.jpg"
    (tmp_path / "u.csv").write_text("img,desc\nx.jpg,hi\n")
    recs = read_caption_table(tmp_path / "u.csv", image_key="img", caption_key="desc")
    assert recs[0].captions == ["hi"]


def test_csv_header_problems_raise(tmp_path):
    (tmp_path / "t.csv").write_text("filepath,label\na.png,x\n")
    with pytest.raises(DataError, match=r"t\.csv:1: no column 'caption'.*caption_key"):
        read_caption_table(tmp_path / "t.csv")
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(DataError, match="empty file"):
        read_caption_table(tmp_path / "e.csv")
    with pytest.raises(DataError, match="no such file"):
        read_caption_table(tmp_path / "missing.csv")
    (tmp_path / "t.parquet").write_text("x")
    with pytest.raises(DataError, match="unknown table type"):
        read_caption_table(tmp_path / "t.parquet")


def test_csv_bad_rows_skipped_and_counted(tmp_path):
    (tmp_path / "t.csv").write_text(
        "filepath,caption\n"
        "a.png,ok\n"
        "b.png,too,many\n"
        "c.png,\n"
        ",no image\n"
        "\n"
        "d.png,fine\n"
    )
    log = SkipLog()
    recs = read_caption_table(tmp_path / "t.csv", skip_log=log)
    assert [r.image.name for r in recs] == ["a.png", "d.png"]
    assert log.count == 3
    sources = [s.source for s in log.to_list()]
    assert sources == [f"{tmp_path / 't.csv'}:3", f"{tmp_path / 't.csv'}:4", f"{tmp_path / 't.csv'}:5"]


def test_jsonl(tmp_path):
    lines = [
        json.dumps({"image": "a.png", "captions": ["one", "two"], "label": 3}),
        "{not json",
        json.dumps({"image": "b.png", "caption": "three"}),
        json.dumps({"image": "c.png"}),
        json.dumps([1, 2]),
    ]
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
    log = SkipLog()
    recs = read_caption_table(tmp_path / "t.jsonl", skip_log=log)
    assert [(r.image.name, r.captions) for r in recs] == [("a.png", ["one", "two"]), ("b.png", ["three"])]
    assert recs[0].meta == {"label": 3}
    assert log.count == 3


def test_empty_entries_of_a_caption_list_are_counted(tmp_path):
    (tmp_path / "t.jsonl").write_text(json.dumps({"image": "a.png", "captions": ["one", "", None, " two "]})
                                      + "\n" + json.dumps({"image": "b.png", "captions": ["", 5]}) + "\n")
    log = SkipLog()
    recs = read_caption_table(tmp_path / "t.jsonl", skip_log=log)
    assert [(r.image.name, r.captions) for r in recs] == [("a.png", ["one", "two"])]
    src = str(tmp_path / "t.jsonl")
    assert [(s.source, s.reason) for s in log.to_list()] == [
        (f"{src}:1", "empty caption: entry 1 of 'captions' is empty or not text"),
        (f"{src}:1", "empty caption: entry 2 of 'captions' is empty or not text"),
        (f"{src}:2", "empty caption: no 'caption' text")]
    _tar(tmp_path / "s.tar", [("k.png", PNG), ("k.json", json.dumps({"captions": ["x", ""]}).encode())])
    log = SkipLog()
    assert [g[2] for g in iter_webdataset(tmp_path / "s.tar", skip_log=log)] == [["x"]]
    assert [s.reason for s in log.to_list()] == ["empty caption: entry 1 of 'captions' is empty or not text"]


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


PNG = b"\x89PNG fake"


def test_webdataset_groups_and_skips(tmp_path):
    _tar(tmp_path / "s0.tar", [
        ("a.png", PNG), ("a.txt", b"cap a\ncap a2\n"), ("a.json", b'{"label": 1}'),
        ("b.png", PNG),                                       # no text
        ("c.txt", b"only text"),                              # no image
        ("d.jpg", PNG), ("d.json", b'{"caption": "from json"}'),
        ("dir/e.x.png", PNG), ("dir/e.x.txt", b"nested"),
    ])
    _tar(tmp_path / "s1.tar", [("f.png", PNG), ("f.txt", b"shard two")])
    log = SkipLog()
    got = list(iter_webdataset([tmp_path / "s0.tar", tmp_path / "s1.tar"], skip_log=log))
    assert [g[0] for g in got] == ["a", "d", "dir/e", "f"]
    assert got[0][1] == PNG and got[0][2] == ["cap a", "cap a2"] and got[0][3]["label"] == 1
    assert got[1][2] == ["from json"]
    assert got[2][2] == ["nested"]
    reasons = sorted(s.reason.split(":")[0] for s in log.to_list())
    assert reasons == ["no image", "no text"]


def test_webdataset_truncated_shard_reported(tmp_path):
    members = [(f"k{i}.png", PNG * 200) for i in range(5)]
    members = [m for i, m in enumerate(members) for m in (m, (f"k{i}.txt", b"t"))]
    _tar(tmp_path / "s.tar", members)
    data = (tmp_path / "s.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])
    log = SkipLog()
    got = list(iter_webdataset(tmp_path / "cut.tar", skip_log=log))
    assert 0 < len(got) < 5
    assert any("truncated" in s.reason for s in log.to_list())
    with pytest.raises(DataError, match="no such shard"):
        list(iter_webdataset(tmp_path / "nope.tar"))


# ------------------------------------------------------------------ one file, one image


def test_every_spelling_of_an_image_path_is_one_record(tmp_path):
    img = tmp_path / "data" / "img0.png"
    (tmp_path / "data" / "sub").mkdir(parents=True)
    img.write_bytes(PNG)
    (tmp_path / "data" / "other.png").write_bytes(PNG)
    (tmp_path / "data" / "link.png").symlink_to(img)
    (tmp_path / "data" / "hard.png").hardlink_to(img)
    (tmp_path / "data" / "t.csv").write_text(
        "filepath,caption\n"
        "img0.png,one\n"
        "./img0.png,two\n"
        ".//img0.png,three\n"
        "sub/../img0.png,four\n"
        f"{img},five\n"
        "link.png,six\n"
        "hard.png,seven\n"
        "other.png,eight\n"
        "missing.png,nine\n"
        "./missing.png,ten\n"
    )
    recs = read_caption_table(tmp_path / "data" / "t.csv")
    assert [r.image for r in recs] == [img, tmp_path / "data" / "other.png", tmp_path / "data" / "missing.png"]
    assert recs[0].captions == ["one", "two", "three", "four", "five", "six", "seven"]
    assert recs[2].captions == ["nine", "ten"]   # a missing file: one canonical path too
    # JSONL and a table elsewhere with root=: same rule
    (tmp_path / "t.jsonl").write_text('{"image": "data/img0.png", "caption": "a"}\n'
                                      '{"image": "./data/./img0.png", "caption": "b"}\n')
    recs = read_caption_table(tmp_path / "t.jsonl")
    assert len(recs) == 1 and recs[0].image == img and recs[0].captions == ["a", "b"]
    recs = read_caption_table(tmp_path / "data" / "t.csv", root=tmp_path / "data" / "sub")
    assert recs[0].image == tmp_path / "data" / "sub" / "img0.png"   # does not exist: not merged
    assert recs[1].image == img                                      # sub/../img0.png, f"{img}", ...


# ------------------------------------------------------------------ every way a shard ends early


def _shard_bytes(n_samples=4):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(n_samples):
            for name, data in ((f"k{i}.png", PNG * 100), (f"k{i}.txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    offsets = {m.name: (m.offset, m.offset_data) for m in tarfile.open(fileobj=io.BytesIO(data))}
    return data, offsets


def _cases():
    full, off = _shard_bytes()
    header = off["k2.png"][0]               # where sample k2 begins
    return {
        # name: (bytes, samples yielded, reasons (prefix before ':') in the log)
        "mid-header": (full[:header + 100], 2, ["truncated shard"]),
        "mid-member": (full[:off["k2.png"][1] + 50], 2, ["truncated shard"]),
        "mid-text-member": (full[:off["k2.txt"][1] + 3], 2, ["truncated shard"]),
        "between-samples": (full[:header], 2, ["truncated shard"]),
        "between-pair-members": (full[:off["k2.txt"][0]], 2, ["no text", "truncated shard"]),
        "invalid-header": (full[:header] + b"x" * 512 + full[header + 512:], 2, ["corrupt shard"]),
        "appended-archive": (full + full, 4, ["trailing data"]),
        "empty-file": (b"", 0, ["empty shard"]),
        "not-a-tar": (b"this is a text file, not a tar archive\n" * 40, 0, ["unreadable shard"]),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_every_truncation_of_a_shard_is_counted(tmp_path, case):
    from cliplab.data.sources import index_webdataset

    data, n_kept, reasons = _cases()[case]
    shard = tmp_path / "s.tar"
    shard.write_bytes(data)
    for read in (lambda log: list(iter_webdataset(shard, skip_log=log)),
                 lambda log: index_webdataset(shard, skip_log=log)):
        log = SkipLog()
        got = read(log)
        assert len(got) == n_kept
        assert [s.reason.split(":")[0] for s in log.to_list()] == reasons
        assert log.count == len(reasons) and log.summary().startswith(f"skipped {len(reasons)} sample")


def test_intact_shards_log_nothing(tmp_path):
    full, _ = _shard_bytes()
    (tmp_path / "s.tar").write_bytes(full)
    (tmp_path / "empty-archive.tar").write_bytes(b"\0" * 10240)   # a valid tar with no member
    log = SkipLog()
    got = list(iter_webdataset([tmp_path / "s.tar", tmp_path / "empty-archive.tar"], skip_log=log))
    assert [g[2] for g in got] == [[f"caption {i}"] for i in range(4)] and log.count == 0
    import gzip

    (tmp_path / "s.tar.gz").write_bytes(gzip.compress(full))
    assert len(list(iter_webdataset(tmp_path / "s.tar.gz", skip_log=log))) == 4 and log.count == 0
    (tmp_path / "cut.tar.gz").write_bytes(gzip.compress(full)[:60])
    assert len(list(iter_webdataset(tmp_path / "cut.tar.gz", skip_log=log))) < 4 and log.count >= 1


def test_image_identities_agree_with_canonical_path(tmp_path, monkeypatch):
    from cliplab.data.sources import ImageIdentities, canonical_path, image_identity

    (tmp_path / "real" / "deep").mkdir(parents=True)
    (tmp_path / "real" / "deep" / "x.png").write_bytes(PNG)
    (tmp_path / "real" / "y.png").write_bytes(PNG)
    (tmp_path / "dirlink").symlink_to(tmp_path / "real" / "deep")      # a linked folder
    (tmp_path / "filelink.png").symlink_to(tmp_path / "real" / "y.png")
    monkeypatch.chdir(tmp_path)
    spellings = ["dirlink/x.png", "./dirlink//x.png", "dirlink/../y.png", "real/deep/../y.png",
                 "filelink.png", str(tmp_path / "dirlink" / "x.png"), "missing/../z.png", "nope.png"]
    for base in (None, tmp_path, "."):
        ids = ImageIdentities(base)
        for s in spellings:
            expected = canonical_path(s, base)
            assert ids(s) == (expected, image_identity(expected)), (base, s)
    assert canonical_path("dirlink/../y.png") == tmp_path / "real" / "y.png"   # .. after a link
    assert canonical_path("dirlink/x.png") == tmp_path / "real" / "deep" / "x.png"


def test_brace_pattern_cannot_size_the_shard_list(monkeypatch):
    """A range's size comes from its two numbers: ``{0..99999999999}`` would make 10^11
    names.  It is refused before any name is made, as are nested ranges whose product is
    over the limit; the limit itself is allowed."""
    from cliplab.data import sources

    with pytest.raises(DataError, match=r"\{0\.\.99999999999\}: the brace pattern names 100,000,000,000"):
        sources.expand_shards("shard-{0..99999999999}.tar")
    monkeypatch.setattr(sources, "MAX_BRACE_EXPANSION", 4)
    assert sources.expand_braces("s{0..1}{0..1}") == ["s00", "s01", "s10", "s11"]
    with pytest.raises(DataError, match="over the limit of 4"):
        sources.expand_braces("s{0..1}{0..2}")
    with pytest.raises(DataError, match="over the limit of 4"):
        sources.expand_braces("s{0..4}")


def test_table_messages_name_the_command_line_option(tmp_path):
    """A missing caption column or key names --caption-key; a folder is called a folder."""
    (tmp_path / "t.csv").write_text("filepath,text_\na.png,x\n")
    with pytest.raises(DataError, match=r"--caption-key \(caption_key= in Python\)"):
        read_caption_table(tmp_path / "t.csv", caption_key="nosuch")
    (tmp_path / "t.jsonl").write_text(json.dumps({"filepath": "a.png", "nosuch": "x"}) + "\n")
    log = SkipLog()
    assert read_caption_table(tmp_path / "t.jsonl", skip_log=log) == []
    assert "no 'caption' key (name the caption key with --caption-key" in log.to_list()[0].reason
    with pytest.raises(DataError, match="is a folder"):
        read_caption_table(tmp_path)
