"""``cliplab index build`` and ``cliplab search``: folder, .npy and parquet sources, table and JSON
output, another model refused (exit 2), a damaged index refused in one line (exit 4)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _tiny import TINY_CFG, make_model
from cliplab.cli.main import main

N = 12


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(N):
        colour = rng.integers(0, 256, 3)
        arr = np.clip(colour + rng.integers(-30, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"im_{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def built(images, tiny_dir, cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built") / "idx"
    assert main(["index", "build", str(images), "--out", str(out), "--model", str(tiny_dir),
                 "--cache", str(cache), "--workers", "0"]) == 0
    return out


def test_a_second_build_reads_the_embeddings_from_the_cache(built, images, tiny_dir, cache, tmp_path):
    chunks = sorted(cache.rglob("chunk_*.npz"))
    assert chunks                                              # the first build embedded through the cache
    assert main(["index", "build", str(images), "--out", str(tmp_path / "again"), "--model", str(tiny_dir),
                 "--cache", str(cache), "--workers", "0"]) == 0
    assert sorted(cache.rglob("chunk_*.npz")) == chunks        # nothing embedded twice
    assert np.array_equal(np.fromfile(built / "vectors.f32", np.float32),
                          np.fromfile(tmp_path / "again" / "vectors.f32", np.float32))


def _json(capsys, argv) -> list:
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_build_then_search_by_text_and_image(built, images, tiny_dir, tiny, capsys):
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["count"] == N and manifest["index_type"] == "flat"
    assert manifest["fingerprint"] == tiny.fingerprint and manifest["model"] == os.path.abspath(tiny_dir)

    rows = _json(capsys, ["search", str(built), "--text", "a red circle", "--k", "5", "--format", "json"])
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(Path(r["path"]).parent == images.resolve() for r in rows)
    text_q = tiny.encode_texts(["a red circle"])
    feats = tiny.encode_images(sorted(images.iterdir())).features
    expected = np.argsort(-(feats @ text_q[0]))[:5]
    assert [Path(r["path"]).name for r in rows] == [f"im_{i:02d}.png" for i in expected]
    np.testing.assert_allclose([r["score"] for r in rows], (feats @ text_q[0])[expected], atol=1e-5)

    rows = _json(capsys, ["search", str(built), "--image", str(images / "im_03.png"), "--format", "json"])
    assert len(rows) == 10 and rows[0]["path"].endswith("im_03.png") and rows[0]["score"] > 0.9999

    assert main(["search", str(built), "--text", "a red circle", "--k", "3"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["rank", "score", "id", "path"] and len(table) == 2 + 3


def test_build_from_embed_outputs(images, tiny_dir, tmp_path, capsys):
    pytest.importorskip("pyarrow")
    for name in ("e.npy", "e.parquet"):
        emb = tmp_path / name
        assert main(["embed", str(images), "--out", str(emb), "--model", str(tiny_dir), "--no-cache",
                     "--workers", "0"]) == 0
        assert main(["index", "build", str(emb), "--out", str(tmp_path / f"idx-{name}")]) == 0
        # cliplab embed records the model's name (here a folder's), which does not load by itself
        assert main(["search", str(tmp_path / f"idx-{name}"), "--text", "x"]) == 3
        assert "give --model SPEC" in capsys.readouterr().err
        rows = _json(capsys, ["search", str(tmp_path / f"idx-{name}"), "--image", str(images / "im_05.png"),
                              "--k", "2", "--format", "json", "--model", str(tiny_dir)])
        assert rows[0]["path"].endswith("im_05.png") and rows[0]["score"] > 0.9999
    info = _json(capsys, ["index", "info", str(tmp_path / "idx-e.npy"), "--format", "json"])
    assert info["count"] == N and info["model"] == "tiny-clip0"


def test_another_model_is_refused_with_exit_2(built, tmp_path, capsys):
    from cliplab.models.convert import save_open_clip_folder

    other = tmp_path / "other"
    save_open_clip_folder(other, TINY_CFG, make_model(seed=1).state_dict())
    capsys.readouterr()
    assert main(["search", str(built), "--text", "a star", "--model", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "index built with model" in err[0] and "not other" in err[0]


@pytest.mark.parametrize("damage", ["faiss", "manifest", "sqlite", "missing"])
def test_damaged_index_is_one_line_exit_4(built, tmp_path, capsys, damage):
    import shutil

    idx = tmp_path / "idx"
    shutil.copytree(built, idx)
    if damage == "faiss":
        (idx / "index.faiss").write_bytes(b"\x00" * 100)
    elif damage == "manifest":
        (idx / "manifest.json").write_text("{not json")
    elif damage == "sqlite":
        (idx / "items.sqlite").write_bytes(b"garbage" * 100)
    else:
        shutil.rmtree(idx)
    capsys.readouterr()
    assert main(["search", str(idx), "--text", "a star"]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cliplab: error: ") and str(idx) in err[0]


def test_build_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["index", "build", str(tmp_path / "empty"), "--out", str(tmp_path / "idx")]) == 4
    np.save(tmp_path / "bare.npy", np.ones((3, 4), np.float32))
    assert main(["index", "build", str(tmp_path / "bare.npy"), "--out", str(tmp_path / "idx")]) == 4
    err = capsys.readouterr().err
    assert "no sidecar bare.npy.json" in err
    assert main(["index"]) == 2
