"""CLI smoke tests on a tiny model saved to a temp dir, run the way a user runs them."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cliplab.cli.main import main


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    (d / "sub").mkdir()
    for i, colour in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (48, 40), colour).save(d / ("sub" if i == 2 else ".") / f"{colour}.png")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    return d


def run_cli(*args):
    env = {**os.environ, "CLIPLAB_PROGRESS": "0"}
    return subprocess.run([sys.executable, "-m", "cliplab.cli.main", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_classify_json_skips_bad_images(tiny_dir, images, capsys):
    rc = main(["classify", str(images), "--labels", "red,blue,green", "--model", str(tiny_dir),
               "--format", "json", "--top-k", "2"])
    out, err = capsys.readouterr()
    assert rc == 0
    rows = json.loads(out)
    assert sorted(os.path.basename(r["path"]) for r in rows) == ["blue.png", "green.png", "red.png"]
    assert all(len(r["predictions"]) == 2 for r in rows)
    assert "skipped 1" in err and "broken.jpg" in err


def test_classify_table_and_csv(tiny_dir, images, capsys):
    assert main(["classify", str(images / "red.png"), "--labels", "a,b", "--model", str(tiny_dir)]) == 0
    assert "red.png" in capsys.readouterr().out
    assert main(["classify", str(images / "red.png"), "--labels", "a,b", "--model", str(tiny_dir),
                 "--format", "csv", "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "path,rank,label,prob" and len(lines) == 3


@pytest.mark.parametrize("argv,code,msg", [
    (["classify", "IMG", "--labels", " , ", "--model", "MODEL"], 2, "no labels"),
    (["classify", "nowhere.png", "--labels", "a", "--model", "MODEL"], 2, "nowhere.png"),
    (["classify", "IMG", "--labels", "a", "--model", "no-such-model"], 3, "cannot resolve"),
    (["classify", "BAD", "--labels", "a", "--model", "MODEL", "--strict"], 4, "broken.jpg"),
    (["embed", "IMG", "--out", "x.txt", "--model", "MODEL"], 2, ".npy or .parquet"),
])
def test_user_errors_are_one_line(tiny_dir, images, capsys, argv, code, msg):
    sub = {"IMG": str(images / "red.png"), "BAD": str(images / "broken.jpg"), "MODEL": str(tiny_dir)}
    rc = main([sub.get(a, a) for a in argv])
    err = capsys.readouterr().err
    assert rc == code
    assert msg in err and err.startswith("cliplab: error:") and len(err.strip().splitlines()) == 1


def test_embed_images_npy_and_texts_parquet(tiny_dir, images, tmp_path, tiny, monkeypatch):
    monkeypatch.setenv("CLIPLAB_CACHE", str(tmp_path / "cache"))  # the default feature cache
    out = tmp_path / "e.npy"
    assert main(["embed", str(images), "--out", str(out), "--model", str(tiny_dir)]) == 0
    feats = np.load(out)
    meta = json.loads((tmp_path / "e.npy.json").read_text())
    assert feats.shape == (3, 32) and len(meta["items"]) == 3 and len(meta["skipped"]) == 1
    np.testing.assert_allclose(feats, tiny.encode_images(meta["items"]).features, atol=1e-6)
    texts = tmp_path / "t.txt"
    texts.write_text("a cat\na dog\n")
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "t.parquet"
    assert main(["embed", "--texts", str(texts), "--out", str(out), "--model", str(tiny_dir)]) == 0
    table = pq.read_table(out)
    emb = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(emb, tiny.encode_texts(["a cat", "a dog"]), atol=1e-6)


def test_convert_round_trip_through_hf(tiny_dir, tmp_path, tiny):
    import cliplab

    hf, back = tmp_path / "hf", tmp_path / "oc"
    assert main(["convert", str(tiny_dir), str(hf), "--to", "hf"]) == 0
    assert (hf / "config.json").is_file()
    assert main(["convert", str(hf), str(back), "--to", "open_clip"]) == 0
    again = cliplab.load(back)
    np.testing.assert_allclose(again.encode_texts(["a red star"]), tiny.encode_texts(["a red star"]), atol=1e-5)
    assert main(["convert", str(tiny_dir), str(hf), "--to", "hf"]) == 2  # refuses to overwrite


def test_models_and_help_in_a_subprocess():
    r = run_cli("models")
    assert r.returncode == 0 and "spec" in r.stdout
    r = run_cli()
    assert r.returncode == 2 and "classify" in r.stderr
