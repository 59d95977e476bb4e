"""``cliplab caption``: train a head, caption a folder with a bad image, clear errors with exit codes."""

import csv
import json

import pytest
from PIL import Image

from cliplab.cli.main import main
from cliplab.data.shapes import shapes_tiny_world


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cap") / "head"
    assert main(["caption", "--train", str(out), "--model", "shapes-tiny", "--steps", "2", "--batch-size", "4"]) == 0
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    images, _ = shapes_tiny_world(seed=0).render_batch("test", [0, 1])
    (d / "sub").mkdir()
    Image.fromarray(images[0]).save(d / "a.png")
    Image.fromarray(images[1]).resize((100, 80)).save(d / "sub" / "b.jpg")
    (d / "broken.png").write_bytes(b"\x89PNG not really")
    return d


def test_train_then_caption_skips_the_bad_image(trained, folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CLIPLAB_PROGRESS", "0")
    assert sorted(p.name for p in trained.iterdir()) == ["captioner.json", "captioner.safetensors", "train"]
    assert json.loads((trained / "captioner.json").read_text())["kind"] == "captioner"
    capsys.readouterr()
    out = tmp_path / "caps.jsonl"
    assert main(["caption", str(folder), "--captioner", str(trained), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["path"].rsplit("/", 1)[-1] for r in rows) == ["a.png", "b.jpg"]
    assert all(isinstance(r["caption"], str) for r in rows)
    assert "skipped 1 unreadable image(s)" in err and "broken.png" in err
    out_csv = tmp_path / "caps.csv"                                     # CSV, beam search, one file
    assert main(["caption", str(folder / "a.png"), "--captioner", str(trained), "--out", str(out_csv),
                 "--beam", "2"]) == 0
    with open(out_csv, newline="") as f:
        assert [r["path"] for r in csv.DictReader(f)] == [str(folder / "a.png")]
    assert main(["caption", str(folder / "a.png"), "--captioner", str(trained)]) == 0     # table on stdout
    assert "a.png" in capsys.readouterr().out


def test_errors_are_one_line_with_the_documented_exit_code(trained, folder, tmp_path, capsys):
    cases = [
        (["caption", str(folder), "--captioner", str(tmp_path / "nope")], 3, "no such captioner folder"),
        (["caption", str(folder), "--captioner", str(folder)], 3, "not a captioner folder"),
        (["caption", str(folder), "--captioner", str(trained), "--out", str(tmp_path / "x.txt")], 2, ".csv or .jsonl"),
        (["caption", str(folder)], 2, "--captioner DIR"),
        (["caption", str(folder), "--train", str(tmp_path / "t")], 2, "--train DIR trains a head"),
        (["caption", "--train", str(tmp_path / "t"), "--head", "nope"], 2, "unknown caption head 'nope'"),
        (["caption", str(folder / "broken.png"), "--captioner", str(trained)], 4, "none of the 1 image(s)"),
        (["caption", str(folder), "--captioner", str(trained), "--strict"], 4, "broken.png"),
    ]
    for argv, code, message in cases:
        capsys.readouterr()
        assert main(argv) == code, argv
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert last.startswith("cliplab: error:") and message in last, (argv, err)
        assert "Traceback" not in err
