"""Training from WebDataset shards: index once, read images by byte offset, skip and count bad samples."""

import gzip
import io
import json
import logging
import pickle
import shutil
import tarfile

import numpy as np
import pytest
import torch

from cliplab.cli.main import main
from cliplab.data.shapes import ShapesWorld, export
from cliplab.data.sources import (SkipLog, expand_braces, expand_shards, index_webdataset,
                                  iter_webdataset)
from cliplab.errors import BadImage, DataError
from cliplab.data.sources import WebDatasetSet

from _tiny import TINY_CFG

N = 24
BAD_KEY = "test_0000005"  # its image bytes are overwritten in bad.tar


@pytest.fixture(scope="module")
def world():
    return ShapesWorld(seed=0)


@pytest.fixture(scope="module")
def data(world, tmp_path_factory):
    """``orig`` (the export), ``bad`` (one corrupt image + one sample without image) and
    ``split/shard-0000..0002.tar`` (the export repacked 8 samples per shard)."""
    root = tmp_path_factory.mktemp("wds")
    res = export(world, root / "export", n=N, task="captions", fmt="wds", progress=False)
    (orig,) = res.files

    bad = root / "bad.tar"
    shutil.copyfile(orig, bad)
    with tarfile.open(orig) as tar:
        png = tar.getmember(f"{BAD_KEY}.png")
    with open(bad, "r+b") as f:  # same size, so the tar structure is intact
        f.seek(png.offset_data)
        f.write(b"\x89PNG\r\n\x1a\n" + b"\x00" * (png.size - 8))
    with tarfile.open(bad, "a") as tar:
        for name, payload in (("orphan.txt", b"a caption without an image"), ("orphan.json", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

    split = root / "split"
    split.mkdir()
    with tarfile.open(orig) as src:
        members = src.getmembers()  # png, txt, json per sample
        for k in range(3):
            with tarfile.open(split / f"shard-{k:04d}.tar", "w") as dst:
                for m in members[k * 24:(k + 1) * 24]:
                    dst.addfile(m, src.extractfile(m))
    return {"root": root, "orig": orig, "bad": bad, "split": split}


def _pixels(image):
    return np.asarray(image.convert("RGB"))


def test_index_counts_and_skips(data):
    log = SkipLog()
    samples = index_webdataset(data["bad"], skip_log=log)
    assert len(samples) == N                      # the corrupt image is only found when decoded
    assert log.count == 1 and log.summary() == "skipped 1 sample: 1 no image"
    assert log.to_list()[0].source.endswith(":orphan")
    streamed_log = SkipLog()                      # the same grouping as the streaming reader
    streamed = list(iter_webdataset(data["bad"], skip_log=streamed_log))
    assert streamed_log.to_list() == log.to_list()
    raw = data["bad"].read_bytes()
    for s, (key, image_bytes, captions, _) in zip(samples, streamed, strict=True):
        assert (s.key, s.captions) == (key, captions)
        assert raw[s.offset:s.offset + s.size] == image_bytes


def test_items_equal_the_export(world, data):
    ds = WebDatasetSet(index_webdataset(expand_shards(data["split"])))
    assert len(ds) == N
    for k in [23, 0, 17, 8, 9, 1, *range(N)]:    # random access: seeks back and forth across shards
        image, captions = ds[k]
        scene = world.scene("test", k)
        assert np.array_equal(_pixels(image), scene.image)
        assert captions == scene.captions


def test_bad_image_raises_bad_image(data):
    samples = index_webdataset(data["bad"])
    ds = WebDatasetSet(samples)
    bad = next(i for i, s in enumerate(samples) if s.key == BAD_KEY)
    with pytest.raises(BadImage, match=f"bad.tar:{BAD_KEY}"):
        ds[bad]
    ds[bad + 1]                                   # the set stays usable


def test_truncated_shard(data, tmp_path):
    raw = data["orig"].read_bytes()
    samples = index_webdataset(data["orig"])
    cut = tmp_path / "cut.tar"
    cut.write_bytes(raw[:samples[10].offset + 100])   # ends inside the image of sample 10
    log = SkipLog()
    assert [s.key for s in index_webdataset(cut, skip_log=log)] == [s.key for s in samples[:10]]
    assert log.summary().startswith("skipped 1 sample: 1 truncated shard")
    ds = WebDatasetSet(samples[:11])
    ds.samples[10].shard = cut                    # the file shrank after indexing
    with pytest.raises(BadImage, match="truncated shard"):
        ds[10]


def test_errors(data, tmp_path):
    gz = tmp_path / "shard.tar.gz"
    gz.write_bytes(gzip.compress(data["orig"].read_bytes()))
    with pytest.raises(DataError, match="compressed shard"):
        index_webdataset(gz)
    with pytest.raises(DataError, match="no such shard"):
        index_webdataset(tmp_path / "nope.tar")
    with pytest.raises(DataError, match="no usable sample"):
        WebDatasetSet([])
    with pytest.raises(ValueError, match="max_open"):
        WebDatasetSet(index_webdataset(data["orig"]), max_open=0)


def test_reopens_after_fork_and_pickles(world, data):
    ds = WebDatasetSet(index_webdataset(expand_shards(data["split"])), max_open=2)
    ds[0], ds[20]                                 # the parent holds open handles
    assert len(ds._files) == 2
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, collate_fn=lambda x: x,
                                         multiprocessing_context="fork")
    for k, (image, captions) in enumerate(loader):
        assert np.array_equal(_pixels(image), world.scene("test", k).image)
    copy = pickle.loads(pickle.dumps(ds))         # what a spawned worker receives
    assert not copy._files and copy[3][1] == world.scene("test", 3).captions
    ds[10]                                        # a third shard: the least recently used is closed
    assert len(ds._files) == 2
    ds.close()


def test_expand_braces():
    assert expand_braces("s-{0000..0002}.tar") == ["s-0000.tar", "s-0001.tar", "s-0002.tar"]
    assert expand_braces("s-{8..10}.tar") == ["s-8.tar", "s-9.tar", "s-10.tar"]
    assert expand_braces("s-{2..0}") == ["s-2", "s-1", "s-0"]
    assert expand_braces("{a,b}/{0..1}") == ["a/0", "a/1", "b/0", "b/1"]
    assert expand_braces("{a,{b,c}}x") == ["ax", "bx", "cx"]
    assert expand_braces("{x}-{1,2}") == ["{x}-1", "{x}-2"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_expand_shards(data, tmp_path):
    split = data["split"]
    names = [f"shard-{k:04d}.tar" for k in range(3)]
    assert expand_shards(split) == [split / n for n in names]
    assert expand_shards(str(split / "shard-{0000..0002}.tar")) == [split / n for n in names]
    assert expand_shards(str(split / "shard-{0002,0000}.tar")) == [split / names[2], split / names[0]]
    assert expand_shards(str(split / "shard-*.tar")) == [split / n for n in names]
    assert expand_shards(split / names[1]) == [split / names[1]]
    with pytest.raises(DataError, match="no such shard"):
        expand_shards(str(split / "shard-{0000..0003}.tar"))
    with pytest.raises(DataError, match="no file matches"):
        expand_shards(str(split / "*.tgz"))
    with pytest.raises(DataError, match="no .tar shards"):
        expand_shards(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="not a .tar shard"):
        expand_shards(tmp_path / "notes.txt")


def _train(data, spec, tmp_path, caplog):
    cfg = tmp_path / "model.json"
    cfg.write_text(json.dumps(TINY_CFG))
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="cliplab.train"):
        assert main(["train", "--data", spec, "--model-config", str(cfg), "--steps", "3",
                     "--batch-size", "8", "--log-every", "1", "--out", str(out)]) == 0
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def test_train_on_a_brace_pattern(data, tmp_path, caplog):
    rows = _train(data, str(data["split"] / "shard-{0000..0002}.tar"), tmp_path, caplog)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["bad_images"] == 0
    assert "indexed 24 samples in 3 shard(s); nothing skipped" in caplog.text


def test_train_on_a_damaged_shard(data, tmp_path, caplog):
    rows = _train(data, str(data["bad"]), tmp_path, caplog)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["bad_images"] == 1            # 3 x 8 = one epoch: the corrupt image is met once
    assert "indexed 24 samples in 1 shard(s); skipped 1 sample: 1 no image" in caplog.text
