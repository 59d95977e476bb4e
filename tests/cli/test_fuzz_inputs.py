"""Every file a user gives the CLI, broken every usual way, ends in one line and a documented code.

Each command's file inputs get a truncated, a wrong-encoding (Latin-1, UTF-16 without a
byte-order mark), a wrong-type (a PNG given as text, text given as an image, a folder
where a file is expected, a file where a folder is expected) and a missing file.  The
CLI runs in-process on the tiny model; the assertion is the contract of
:mod:`cliplab.errors`: a documented exit code, exactly one line on stderr, no traceback.
"""

import io
import json

import pytest
from PIL import Image

from cliplab.cli.main import main

_png = io.BytesIO()
Image.new("RGB", (8, 8), "red").save(_png, format="PNG")
PNG = _png.getvalue()

# kind -> bytes of the file (None: a folder, or no file at all)
KINDS = {
    "latin1": "filepath,label\nimg0.png,café\n".encode("latin-1"),
    "utf16-no-bom": "filepath,label\nimg0.png,cat\n".encode("utf-16-le"),
    "png": PNG,
    "truncated": "filepath,label\nimg0.png,caf\u00e9".encode()[:-1],
    "random": bytes(range(128, 256)) * 4,
    "empty": b"",
    "folder": None,
    "missing": None,
}


def make(tmp_path, kind: str, suffix: str):
    path = tmp_path / f"input-{kind}{suffix}"
    if kind == "folder":
        path.mkdir()
        (path / "note.txt").write_text("not an image\n")
    elif kind != "missing":
        path.write_bytes(KINDS[kind])
    return path


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_dir):
    d = tmp_path_factory.mktemp("good")
    Image.new("RGB", (40, 40), "blue").save(d / "img0.png")
    (d / "captions.csv").write_text("filepath,caption\nimg0.png,a blue square\n")
    (d / "cfg.json").write_text((tiny_dir / "open_clip_config.json").read_text())
    return d


# (command line with {bad} for the broken file and {good} for the good inputs folder, suffix,
#  exit codes allowed for the broken file: 4 bad data, 2 usage, 3 model)
CASES = {
    "classify --labels-file": (["classify", "{good}/img0.png", "--labels-file", "{bad}"], ".txt", {4}),
    "classify --labels-file json": (["classify", "{good}/img0.png", "--labels-file", "{bad}"], ".json", {4}),
    "classify --templates": (["classify", "{good}/img0.png", "--labels", "a,b", "--templates", "{bad}"],
                             ".txt", {4}),
    "classify PATH": (["classify", "{bad}", "--labels", "a,b"], ".png", {4}),
    "embed --texts": (["embed", "--texts", "{bad}", "--out", "{tmp}/e.npy"], ".txt", {4}),
    "embed PATH": (["embed", "{bad}", "--out", "{tmp}/e.npy"], ".jpg", {4}),
    "eval classification csv": (["eval", "--task", "zeroshot_classification", "--dataset", "{bad}",
                                 "--no-cache"], ".csv", {4}),
    "eval retrieval jsonl": (["eval", "--task", "zeroshot_retrieval", "--dataset", "{bad}", "--no-cache"],
                             ".jsonl", {4}),
    "eval --templates": (["eval", "--task", "zeroshot_classification", "--dataset", "shapes:color",
                          "--n", "4", "--no-cache", "--templates", "{bad}"], ".txt", {4}),
    "train --data": (["train", "--data", "{bad}", "--model-config", "{good}/cfg.json", "--steps", "1",
                      "--out", "{tmp}/run"], ".csv", {4}),
    "train --model-config": (["train", "--data", "{good}/captions.csv", "--model-config", "{bad}",
                              "--steps", "1", "--out", "{tmp}/run"], ".json", {4}),
    "adapt --dataset": (["adapt", "--method", "linear", "--shots", "1", "--dataset", "{bad}",
                         "--out", "{tmp}/a"], ".csv", {4}),
    "adapt --templates": (["adapt", "--method", "linear", "--shots", "1", "--dataset", "shapes:color",
                           "--n-train", "12", "--n-val", "6", "--templates", "{bad}", "--out", "{tmp}/a"],
                          ".txt", {4}),
    "report RESULTS": (["report", "{bad}", "--out", "{tmp}/rep"], ".json", {4}),
    "interpolate --dataset": (["interpolate", "{model}", "{model}", "--sweep", "0,1", "--dataset", "{bad}"],
                              ".csv", {4}),
}
NEEDS_MODEL = {"classify", "embed", "eval", "adapt"}


def _argv(template, bad, good, tmp, tiny_dir):
    argv = [a.format(bad=bad, good=good, tmp=tmp, model=tiny_dir) for a in template]
    if argv[0] in NEEDS_MODEL:
        argv += ["--model", str(tiny_dir)]
    return argv


def _check(rc, err, codes):
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    assert rc in codes, err
    assert len(lines) == 1 and lines[0].startswith("cliplab: error: "), err


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("case", list(CASES))
def test_broken_input_file(case, kind, good, tiny_dir, tmp_path, capsys):
    template, suffix, codes = CASES[case]
    bad = make(tmp_path, kind, suffix)
    if case.endswith("PATH") and kind == "png":
        pytest.skip("a real PNG is a good image")
    if case.endswith("PATH") and kind == "missing":
        codes = {2}                      # an image PATH that does not exist is a mistyped argument
    rc = main(_argv(template, bad, good, tmp_path, tiny_dir))
    _check(rc, capsys.readouterr().err, codes)


@pytest.mark.parametrize("argv, code", [
    (["shapes", "export", "{bad}", "--n", "2", "--no-progress"], 4),                # a file where a folder goes
    (["embed", "{good}/img0.png", "--out", "{bad}/e.npy", "--model", "{model}"], 4),
    (["eval", "--task", "zeroshot_classification", "--dataset", "{bad}", "--no-cache", "--model", "{model}"], 4),
    (["classify", "{good}/img0.png", "--labels", "a,b", "--model", "{bad}"], 3),   # a CSV given as a model
    (["classify", "{good}/img0.png", "--adapter", "{bad}", "--model", "{model}"], 4),
    (["eval", "--task", "zeroshot_classification", "--dataset", "shapes:color", "--n", "2", "--cache", "{bad}",
      "--model", "{model}"], 4),
])
def test_file_where_a_folder_is_expected(argv, code, good, tiny_dir, tmp_path, capsys):
    bad = tmp_path / "table.csv"
    bad.write_text("filepath,label\nimg0.png,cat\n")
    rc = main([a.format(bad=bad, good=good, model=tiny_dir) for a in argv])
    _check(rc, capsys.readouterr().err, {code})


@pytest.mark.parametrize("argv", [
    ["embed", "{good}/img0.png", "--out", "{folder}/out.npy", "--model", "{model}"],
    # `eval --out` and `--report` accept an existing folder (one result file is written inside it)
])
def test_folder_where_an_output_file_is_expected(argv, good, tiny_dir, tmp_path, capsys):
    (tmp_path / "out.npy").mkdir()
    rc = main([a.format(folder=tmp_path, good=good, model=tiny_dir) for a in argv])
    err = capsys.readouterr().err
    _check(rc, err, {4})
    assert "is a folder" in err and ".tmp" not in err          # names the user's path, not a temp file


@pytest.mark.parametrize("kind", ["latin1", "truncated", "png", "folder"])
def test_broken_adapter_metadata(kind, tiny_dir, good, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    meta = make(tmp_path, kind, ".json")
    meta.rename(adapter / "cliplab_adapter.json")
    rc = main(["classify", f"{good}/img0.png", "--adapter", str(adapter), "--model", str(tiny_dir)])
    _check(rc, capsys.readouterr().err, {4})


def test_embed_refuses_when_no_image_is_readable(tiny_dir, tmp_path, capsys):
    for i in range(2):
        (tmp_path / f"bad{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n cut")
    out = tmp_path / "e.npy"
    rc = main(["embed", str(tmp_path), "--out", str(out), "--model", str(tiny_dir)])
    err = capsys.readouterr().err
    _check(rc, err, {4})
    assert "none of the 2 image(s)" in err and not out.exists()
    rc = main(["classify", str(tmp_path), "--labels", "a,b", "--model", str(tiny_dir)])
    _check(rc, capsys.readouterr().err, {4})


def test_classify_refuses_labels_that_tokenize_alike(good, tiny_dir, capsys):
    rc = main(["classify", f"{good}/img0.png", "--labels", "Red star,red star, RED STAR",
               "--model", str(tiny_dir)])
    err = capsys.readouterr().err
    _check(rc, err, {2})
    assert "'Red star' = 'red star' = 'RED STAR'" in err


def test_classify_reads_a_labels_file_with_bom_and_crlf(good, tiny_dir, tmp_path, capsys):
    f = tmp_path / "labels.txt"
    f.write_bytes(b"\xef\xbb\xbfred star\r\nblue circle\r\n\r\n")
    rc = main(["classify", f"{good}/img0.png", "--labels-file", str(f), "--top-k", "2", "--format", "json",
               "--model", str(tiny_dir)])
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted(p["label"] for p in rows[0]["predictions"]) == ["blue circle", "red star"]
