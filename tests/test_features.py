"""FeatureStore: caching, identity keys, skip list, atomic chunks and SIGKILL resume."""

from __future__ import annotations

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

from cliplab.features import FeatureStore, text_key

TMP_MARK = ".tmp-"


def _write_pngs(folder: Path, n: int, seed: int = 0, size: int = 32) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"img_{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def _chunk_keys(store_path: Path) -> list[str]:
    keys = []
    for p in sorted((store_path / "chunks").glob("chunk_*.npz")):
        with np.load(p) as z:
            keys.extend(z["keys"].tolist())
    return keys


def test_cache_hit_returns_identical_arrays(tiny, tmp_path):
    files = _write_pngs(tmp_path / "img", 10)
    store = FeatureStore(tmp_path / "cache", tiny, chunk_size=4, progress=False)
    first = store.image_features(files, workers=0)
    assert first.features.shape == (10, tiny.embed_dim) and first.features.dtype == np.float32
    assert first.n_computed == 10 and first.n_cached == 0 and first.skipped == []
    np.testing.assert_array_equal(first.kept, np.arange(10))
    np.testing.assert_allclose(first.features, tiny.encode_images(files, workers=0).features, atol=1e-6)
    assert len(list((store.path / "chunks").glob("chunk_*.npz"))) == 3  # 4 + 4 + 2

    second = store.image_features(files, workers=0)
    assert second.n_computed == 0 and second.n_cached == 10
    assert np.array_equal(second.features, first.features)
    # a fresh store on the same root reads the chunks back
    reopened = FeatureStore(tmp_path / "cache", tiny, chunk_size=4, progress=False)
    third = reopened.image_features(files[::-1], workers=0)
    assert third.n_computed == 0
    assert np.array_equal(third.features, first.features[::-1])
    meta = (store.path / "meta.json").read_text()
    assert tiny.fingerprint in meta and store.path.name == tiny.fingerprint[:16]


def test_new_file_only_it_is_computed(tiny, tmp_path):
    files = _write_pngs(tmp_path / "img", 6)
    store = FeatureStore(tmp_path / "cache", tiny, progress=False)
    store.image_features(files[:5], workers=0)
    res = store.image_features(files, workers=0)
    assert res.n_computed == 1 and res.n_cached == 5 and len(res.kept) == 6


def test_duplicates_in_input_are_encoded_once(tiny, tmp_path):
    files = _write_pngs(tmp_path / "img", 3)
    store = FeatureStore(tmp_path / "cache", tiny, progress=False)
    res = store.image_features([files[0], files[1], files[0], files[2]], workers=0)
    assert res.n_computed == 3 and res.features.shape[0] == 4
    assert np.array_equal(res.features[0], res.features[2])


def test_corrupt_and_missing_files_are_skipped_and_not_retried(tiny, tmp_path):
    files = _write_pngs(tmp_path / "img", 3)
    bad = tmp_path / "img" / "broken.png"
    bad.write_bytes(b"this is not a png")
    missing = tmp_path / "img" / "missing.png"
    items = [files[0], bad, files[1], missing, files[2]]
    store = FeatureStore(tmp_path / "cache", tiny, progress=False)
    res = store.image_features(items, workers=0)
    np.testing.assert_array_equal(res.kept, [0, 2, 4])
    assert res.features.shape == (3, tiny.embed_dim)
    reasons = {s.index: s for s in res.skipped}
    assert sorted(reasons) == [1, 3]
    assert reasons[1].source.endswith("broken.png") and "not an image" in reasons[1].reason
    assert "cannot read file" in reasons[3].reason
    assert res.n_computed == 4  # the missing file cannot be keyed, so it is not encoded

    again = FeatureStore(tmp_path / "cache", tiny, progress=False).image_features(items, workers=0)
    assert again.n_computed == 0  # the corrupt file is recorded, not retried
    assert [s.index for s in again.skipped] == [1, 3]
    assert "not an image" in again.skipped[0].reason


def test_changed_mtime_or_size_is_recomputed(tiny, tmp_path):
    files = _write_pngs(tmp_path / "img", 3)
    store = FeatureStore(tmp_path / "cache", tiny, progress=False)
    before = store.image_features(files, workers=0)
    st = files[0].stat()
    os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    res = store.image_features(files, workers=0)
    assert res.n_computed == 1
    # Same pixels, same features -- up to float rounding: the touched image is now encoded
    # alone, before in a batch of 3, and the matrix kernels block their sums by batch size,
    # so the rows differ by ~1e-8.  The cache itself is exact: rows read back are
    # bit-identical (test_cache_hit_returns_identical_arrays, and the SIGKILL test, whose runs
    # encode the same batches).
    np.testing.assert_allclose(res.features, before.features, rtol=0, atol=1e-6)
    assert np.array_equal(res.features[1:], before.features[1:])  # the untouched rows: the cache
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(files[1])  # new content and size
    res = store.image_features(files, workers=0)
    assert res.n_computed == 1
    assert not np.allclose(res.features[1], before.features[1])


def test_every_spelling_of_a_path_is_one_key(tiny, tmp_path, monkeypatch):
    files = _write_pngs(tmp_path / "img", 2)
    (tmp_path / "img" / "sub").mkdir()
    (tmp_path / "link.png").symlink_to(files[0])
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    monkeypatch.chdir(tmp_path)
    spellings = [files[0], "img/img_000.png", "./img/img_000.png", "img//img_000.png",
                 "img/sub/../img_000.png", str(tmp_path / "img" / "." / "img_000.png"), "link.png"]
    store = FeatureStore(tmp_path / "cache", tiny, progress=False)
    res = store.image_features(spellings + [files[1], "loop.png"], workers=0)
    assert res.n_computed == 2  # one file, one key, whatever the spelling
    np.testing.assert_array_equal(res.kept, np.arange(8))
    assert all(np.array_equal(row, res.features[0]) for row in res.features[:7])
    assert len(_chunk_keys(store.path)) == 2
    # a symbolic-link loop is an unreadable file, skipped with its reason, not a crash
    assert [s.index for s in res.skipped] == [8] and "cannot read file" in res.skipped[0].reason


def test_in_memory_items_are_keyed_by_content(tiny, tmp_path):
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    store = FeatureStore(tmp_path / "cache", tiny, progress=False)
    res = store.image_features(arrays)
    assert res.n_computed == 3
    res2 = store.image_features([a.copy() for a in arrays] + [Image.fromarray(arrays[0])])
    assert res2.n_computed == 1  # the PIL image is keyed apart from the array
    assert np.array_equal(res2.features[:3], res.features)
    np.testing.assert_allclose(res2.features[3], res.features[0], atol=1e-6)


def test_text_features_cached(tiny, tmp_path):
    store = FeatureStore(tmp_path / "cache", tiny, chunk_size=2, progress=False)
    texts = ["a red star.", "a blue ring.", "a green square.", "a red star."]
    feats = store.text_features(texts)
    assert feats.shape == (4, tiny.embed_dim) and np.array_equal(feats[0], feats[3])
    np.testing.assert_allclose(feats, tiny.encode_texts(texts), atol=1e-5)
    n_chunks = len(list((store.path / "chunks").glob("chunk_*.npz")))
    again = FeatureStore(tmp_path / "cache", tiny, progress=False).text_features(texts[::-1])
    assert np.array_equal(again, feats[::-1])
    assert len(list((store.path / "chunks").glob("chunk_*.npz"))) == n_chunks
    assert text_key("a") != text_key("b")


def test_different_backbone_gets_its_own_cache(tiny, tmp_path):
    import cliplab
    from cliplab.models.convert import save_open_clip_folder

    from _tiny import TINY_CFG, make_model

    other_dir = tmp_path / "other-model"
    save_open_clip_folder(other_dir, TINY_CFG, make_model(seed=1).state_dict())
    other = cliplab.load(other_dir)
    files = _write_pngs(tmp_path / "img", 2)
    a = FeatureStore(tmp_path / "cache", tiny, progress=False)
    b = FeatureStore(tmp_path / "cache", other, progress=False)
    assert a.path != b.path and a.path.parent == b.path.parent
    ra = a.image_features(files, workers=0)
    rb = b.image_features(files, workers=0)
    assert rb.n_computed == 2 and not np.allclose(ra.features, rb.features)


def test_stray_temp_files_are_ignored_and_removed(tiny, tmp_path):
    files = _write_pngs(tmp_path / "img", 2)
    store = FeatureStore(tmp_path / "cache", tiny, progress=False)
    store.image_features(files, workers=0)
    chunks = store.path / "chunks"
    # a partial write by a dead process on this host, and one by another host
    import re
    import socket

    host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (chunks / f"{TMP_MARK}{host}-{dead}-abcd").write_bytes(b"PK\x03\x04partial")
    (chunks / "chunk_000099.npz.partial").write_bytes(b"junk")
    reopened = FeatureStore(tmp_path / "cache", tiny, progress=False)
    assert reopened.image_features(files, workers=0).n_computed == 0
    assert not any(p.name.startswith(TMP_MARK) for p in chunks.iterdir())


_KILLED_RUN = textwrap.dedent("""
    import os, sys, time
    import torch
    torch.set_num_threads(int(sys.argv[4]))
    import cliplab
    from cliplab.features import FeatureStore

    model_dir, root, img_dir = sys.argv[1:4]
    backbone = cliplab.load(model_dir)
    delay = float(os.environ.get("CLIPLAB_TEST_SLOW_CHUNKS", "0"))
    encode = backbone.encode_images

    def slow_encode(*args, **kwargs):          # test-only: slow down between chunks
        time.sleep(delay)
        return encode(*args, **kwargs)

    backbone.encode_images = slow_encode
    files = sorted(os.path.join(img_dir, f) for f in os.listdir(img_dir))
    FeatureStore(root, backbone, chunk_size=8, progress=False).image_features(files, workers=0)
    print("finished")
""")


def test_sigkill_resume_gives_exactly_the_uninterrupted_features(tiny, tiny_dir, tmp_path):
    files = sorted(_write_pngs(tmp_path / "img", 60, seed=3))
    script = tmp_path / "killed_run.py"
    script.write_text(_KILLED_RUN)
    root = tmp_path / "cache"
    env = {**os.environ, "CLIPLAB_TEST_SLOW_CHUNKS": "0.3", "CLIPLAB_PROGRESS": "0"}
    proc = subprocess.Popen([sys.executable, str(script), str(tiny_dir), str(root),
                             str(tmp_path / "img"), str(torch.get_num_threads())],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    chunks = root / tiny.fingerprint[:16] / "chunks"
    deadline = time.monotonic() + 90
    try:
        while True:
            n_chunks = len(list(chunks.glob("chunk_*.npz"))) if chunks.is_dir() else 0
            if n_chunks >= 2:
                break
            if proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(f"worker ended before it was killed (rc {proc.returncode}): {err.decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("worker wrote no chunks in 90 s")
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL

    written = _chunk_keys(root / tiny.fingerprint[:16])
    assert 16 <= len(written) < 60 and len(written) % 8 == 0

    resumed = FeatureStore(root, tiny, chunk_size=8, progress=False).image_features(files, workers=0)
    reference = FeatureStore(tmp_path / "ref", tiny, chunk_size=8, progress=False).image_features(
        files, workers=0)
    assert resumed.n_computed == 60 - len(written)
    assert reference.n_computed == 60
    np.testing.assert_array_equal(resumed.kept, reference.kept)
    assert np.array_equal(resumed.features, reference.features)
    all_keys = _chunk_keys(root / tiny.fingerprint[:16])
    assert len(all_keys) == len(set(all_keys)) == 60  # none missing, none duplicated
    assert not any(p.name.startswith(TMP_MARK) for p in chunks.iterdir())
    assert sorted(p.name for p in chunks.iterdir()) == [f"chunk_{i:06d}.npz" for i in range(8)]
