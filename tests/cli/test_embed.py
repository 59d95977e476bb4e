"""``cliplab embed`` through the FeatureStore: a killed run resumes exactly, nothing twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cliplab.cli.embed as embed_cli
from cliplab.cli.main import main

N_IMAGES, BATCH, CHUNK = 40, 4, 8

# A run of ``cliplab embed`` slowed down between batches (test-only), with 8-image chunks.
_KILLED_EMBED = textwrap.dedent("""
    import sys, time
    import torch
    torch.set_num_threads(int(sys.argv[1]))
    import cliplab.cli.embed as embed_cli
    from cliplab.cli.main import main
    from cliplab.models.backbone import Backbone

    encode = Backbone.encode_images

    def slow_encode(self, *args, **kwargs):
        time.sleep(0.3)
        return encode(self, *args, **kwargs)

    Backbone.encode_images = slow_encode
    embed_cli._CHUNK = int(sys.argv[2])
    sys.exit(main(sys.argv[3:]))
""")


def _write_pngs(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"img_{i:03d}.png")
    return sorted(folder.iterdir())


def _chunk_keys(cache: Path) -> list[str]:
    keys = []
    for p in sorted(cache.rglob("chunk_*.npz")):
        with np.load(p) as z:
            keys.extend(z["keys"].tolist())
    return keys


def _embed(img_dir, out, cache, tiny_dir, *extra) -> list[str]:
    return ["embed", str(img_dir), "--out", str(out), "--cache", str(cache), "--model", str(tiny_dir),
            "--batch-size", str(BATCH), "--workers", "0", *extra]


def test_killed_embed_resumes_with_exactly_the_uninterrupted_arrays(tiny_dir, tmp_path, monkeypatch, capsys):
    img_dir = tmp_path / "img"
    _write_pngs(img_dir, N_IMAGES)
    script = tmp_path / "killed_embed.py"
    script.write_text(_KILLED_EMBED)
    cache, out = tmp_path / "cache", tmp_path / "e.npy"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(torch.get_num_threads()), str(CHUNK),
         *_embed(img_dir, out, cache, tiny_dir)],
        env={**os.environ, "CLIPLAB_PROGRESS": "0"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    try:
        while len(list(cache.rglob("chunk_*.npz"))) < 2:
            if proc.poll() is not None:
                pytest.fail(f"embed ended before it was killed (rc {proc.returncode}): "
                            f"{proc.communicate()[1].decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("embed saved no chunks in 90 s")
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()                              # killed before writing its output
    done = _chunk_keys(cache)
    assert CHUNK * 2 <= len(done) < N_IMAGES and len(done) % CHUNK == 0

    monkeypatch.setattr(embed_cli, "_CHUNK", CHUNK)
    assert main(_embed(img_dir, out, cache, tiny_dir)) == 0
    assert f"{len(done)} of {N_IMAGES} image features read from the cache" in capsys.readouterr().err
    after = _chunk_keys(cache)
    assert after[:len(done)] == done                     # the killed run's chunks are kept...
    assert len(after) == len(set(after)) == N_IMAGES     # ...and nothing is computed twice

    reference = tmp_path / "ref.npy"
    assert main(_embed(img_dir, reference, tmp_path / "ref-cache", tiny_dir)) == 0
    resumed, expected = np.load(out), np.load(reference)
    assert resumed.shape == (N_IMAGES, 32)
    assert np.array_equal(resumed, expected)
    assert (json.loads(Path(f"{out}.json").read_text())["items"]
            == json.loads(Path(f"{reference}.json").read_text())["items"])
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]   # outputs are renamed whole


def test_embed_cache_texts_no_cache_and_strict(tiny_dir, tiny, tmp_path, capsys):
    img_dir = tmp_path / "img"
    files = _write_pngs(img_dir, 3)
    (img_dir / "broken.png").write_bytes(b"not a png")
    cache = tmp_path / "cache"
    assert main(_embed(img_dir, tmp_path / "a.npy", cache, tiny_dir)) == 0
    assert main(_embed(img_dir, tmp_path / "b.npy", cache, tiny_dir)) == 0
    err = capsys.readouterr().err
    assert "4 of 4 image features read from the cache" in err    # the broken file's skip too
    assert "broken.png" in err
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    assert a.shape == (3, 32) and np.array_equal(a, b)
    np.testing.assert_allclose(a, tiny.encode_images(files, workers=0).features, atol=1e-6)

    assert main(_embed(img_dir, tmp_path / "c.npy", tmp_path / "unused", tiny_dir, "--no-cache")) == 0
    assert not (tmp_path / "unused").exists()
    np.testing.assert_allclose(np.load(tmp_path / "c.npy"), a, atol=1e-6)
    # --strict stops on the bad image with exit 4, whether it is computed or read from the cache
    assert main(_embed(img_dir, tmp_path / "d.npy", cache, tiny_dir, "--strict")) == 4
    assert "broken.png" in capsys.readouterr().err and not (tmp_path / "d.npy").exists()

    texts = tmp_path / "t.txt"
    texts.write_text("a red star\na blue ring\na red star\n")
    argv = ["embed", "--texts", str(texts), "--out", str(tmp_path / "t.npy"), "--cache", str(cache),
            "--model", str(tiny_dir)]
    assert main(argv) == 0
    t = np.load(tmp_path / "t.npy")
    np.testing.assert_allclose(t, tiny.encode_texts(["a red star", "a blue ring", "a red star"]), atol=1e-6)
    n_keys = len(_chunk_keys(cache))
    assert main(argv) == 0 and len(_chunk_keys(cache)) == n_keys   # texts come from the cache
    assert np.array_equal(np.load(tmp_path / "t.npy"), t)
