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
        (["caption", str(folder), "--captioner", str(folder / "a.png")], 3, "a file, not a captioner folder"),
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


def test_usage_limits_are_one_line_errors(trained, folder, tmp_path, capsys):
    cases = [
        (["caption", str(folder), "--captioner", str(trained), "--beam", "1000000"], 2, "--beam 1000000 is too wide"),
        (["caption", str(folder), "--captioner", str(trained), "--beam", "60"], 2, "at most"),   # > the vocabulary
        (["caption", str(folder), "--captioner", str(trained), "--batch-size", "0"], 2, "--batch-size must be"),
        (["caption", "--train", str(tmp_path / "t"), "--batch-size", "1"], 2, "at least 2 captions"),
        (["caption", str(folder), "--captioner", str(trained), "--out", str(folder / "a.png" / "x.csv")], 4,
         "a file is in the way"),
    ]
    for argv, code, message in cases:
        capsys.readouterr()
        assert main(argv) == code, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "t").exists()


def test_a_huge_batch_size_is_clamped_to_the_images(trained, folder, capsys, monkeypatch):
    monkeypatch.setenv("CLIPLAB_PROGRESS", "0")
    assert main(["caption", str(folder / "a.png"), "--captioner", str(trained), "--batch-size", "1000000000"]) == 0
    assert "a.png" in capsys.readouterr().out


def test_an_interrupted_run_keeps_the_finished_captions(trained, folder, tmp_path, capsys, monkeypatch):
    from cliplab.generative.captioner import CaptionHead

    monkeypatch.setenv("CLIPLAB_PROGRESS", "0")
    real, calls = CaptionHead.generate, []

    def generate(self, images, **kw):               # Ctrl-C while the second batch decodes
        calls.append(len(images))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, images, **kw)

    monkeypatch.setattr(CaptionHead, "generate", generate)
    for name in ("caps.jsonl", "caps.csv"):
        calls.clear()
        out = tmp_path / name
        capsys.readouterr()
        assert main(["caption", str(folder / "a.png"), str(folder / "sub" / "b.jpg"), "--captioner", str(trained),
                     "--out", str(out), "--batch-size", "1"]) == 130
        err = capsys.readouterr().err
        assert "kept 1 finished caption(s)" in err and "Traceback" not in err
        rows = out.read_text().splitlines()[0 if name.endswith(".jsonl") else 1:]    # (csv: after the header)
        assert len(rows) == 1 and "a.png" in rows[0]                            # the first batch's caption


def test_the_recorded_spec_loads_from_anywhere_and_model_overrides_it(folder, tmp_path, capsys, monkeypatch):
    import cliplab

    monkeypatch.setenv("CLIPLAB_PROGRESS", "0")
    monkeypatch.chdir(tmp_path)
    cliplab.load("shapes-tiny").save("stf")                                  # a relative model folder
    assert main(["caption", "--train", "head", "--model", "stf", "--steps", "1", "--batch-size", "2"]) == 0
    meta = json.loads((tmp_path / "head" / "captioner.json").read_text())
    assert meta["backbone"]["spec"] == str((tmp_path / "stf").resolve())
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["caption", str(folder / "a.png"), "--captioner", "../head"]) == 0
    meta["backbone"]["spec"] = "shapes-tiny+surgery"                           # a name that does not load
    (tmp_path / "head" / "captioner.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["caption", str(folder / "a.png"), "--captioner", "../head"]) == 3
    assert "--model SPEC" in capsys.readouterr().err
    assert main(["caption", str(folder / "a.png"), "--captioner", "../head", "--model", "../stf"]) == 0


def test_bf16_trains_and_captions(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CLIPLAB_PROGRESS", "0")
    head = tmp_path / "capbf"
    assert main(["caption", "--train", str(head), "--precision", "bf16", "--steps", "1", "--batch-size", "2"]) == 0
    assert json.loads((head / "captioner.json").read_text())["backbone"]["precision"] == "bf16"
    capsys.readouterr()
    assert main(["caption", str(folder / "a.png"), "--captioner", str(head)]) == 0       # the recorded precision
    assert "a.png" in capsys.readouterr().out
    assert main(["caption", str(folder / "a.png"), "--captioner", str(head), "--precision", "fp32"]) == 3
    assert "trained on a bf16 Backbone, not on fp32" in capsys.readouterr().err


def test_no_output_file_is_left_when_nothing_was_captioned(trained, folder, tmp_path, capsys):
    for extra in ([], ["--strict"]):
        out = tmp_path / "none.jsonl"
        assert main(["caption", str(folder / "broken.png"), "--captioner", str(trained), "--out", str(out),
                     *extra]) == 4
        assert not out.exists() and "Traceback" not in capsys.readouterr().err
