"""Long and short captions of ShapesWorld scenes: agree with the scene, long enough, exported."""

from __future__ import annotations

import csv
import hashlib
import json
import re

import numpy as np
import pytest

from cliplab.data.shapes import ObjectSpec, ShapesWorld, export, jitter_color, shapes_tiny_world
from cliplab.data.shapes.finegrained import place
from cliplab.data.shapes.long_captions import COUNT_WORDS, long_caption, relation, short_caption
from cliplab.data.sources import read_caption_table

WORDS = {v: k for k, v in COUNT_WORDS.items()}


def _tokens(text: str) -> int:
    """Token count under open_clip's tokenizer (start and end tokens included)."""
    import open_clip

    tokens = open_clip.get_tokenizer("ViT-B-32")([text], context_length=1000)[0]
    return int((tokens != 0).sum())


def dense_scene(n: int, seed: int = 0, size: int = 128):
    """``n`` non-touching objects of distinct (colour, shape) composed on one background."""
    world = ShapesWorld(seed=seed, image_size=size)
    rng = np.random.default_rng(seed)
    kinds = [(c, s) for c in ("red", "blue", "green", "yellow") for s in ("circle", "square", "star")]
    radii = rng.uniform(0.06, 0.09, n) * size
    specs = []
    for (cx, cy), r, k in zip(place(radii, size, rng), radii, rng.permutation(len(kinds))[:n]):
        c, s = kinds[k]
        specs.append(ObjectSpec(s, c, "small", cx, cy, r, jitter_color(c, rng)))
    return world.compose(specs, "stripes", rng)


def test_existing_scenes_and_captions_are_unchanged():
    # Digest of images and captions of the bundled model's training worlds (seed 0, one object;
    # seed 1, 2-3 objects) as rendered before long captions existed: they must not move.
    h = hashlib.sha256()
    for world in (shapes_tiny_world(0), shapes_tiny_world(1, n_objects=(2, 3))):
        for i in range(40):
            s = world.scene("train", i)
            h.update(s.image.tobytes())
            h.update("\n".join(s.captions).encode())
    assert h.hexdigest() == "1081ba95d7b4f3ed8345e094948f539e5031b5ec560823e0ca2aad3e079c4103"


def test_long_caption_is_deterministic_and_on_every_scene():
    w = ShapesWorld(seed=3, n_objects=(1, 3), defect_rate=0.5)
    for i in range(10):
        a, b = w.scene("test", i), w.scene("test", i)
        assert a.long_caption == b.long_caption == long_caption(a)
        assert a.short_caption == short_caption(a)
        assert a.long_caption.endswith(".") and a.long_caption.count(". ") >= 2


def test_counts_colours_positions_and_defects_agree_with_the_scene():
    w = ShapesWorld(seed=5, n_objects=(1, 3), defect_rate=0.5)
    seen_defect = False
    for i in range(30):
        s = w.scene("val", i)
        text = s.long_caption
        n = int(WORDS[re.match(r"A picture of (\w+) shapes? on a", text).group(1)])
        assert n == len(s.objects)
        for o in s.objects:
            assert f"a {o.size} {o.color} {o.shape} " in text
        if len(s.objects) > 1:
            counted = re.search(r"There (?:is|are) ([^.]+)\.", text).group(1)
            total = sum(WORDS[m] for m in re.findall(r"\b(" + "|".join(WORDS) + r") \w+", counted))
            assert total == len(s.objects)
            for shape in {o.shape for o in s.objects}:
                k = sum(o.shape == shape for o in s.objects)
                assert re.search(rf"\b{COUNT_WORDS[k]} {shape}s?\b", counted)
        if s.defects:
            seen_defect = True
            assert f"a {s.defects[0]['kind']} near the" in text
        else:
            assert "There are no defects." in text
    assert seen_defect


def _relation_from_masks(a, b) -> str:
    ya, xa = np.nonzero(a)
    yb, xb = np.nonzero(b)
    dx, dy = xa.mean() - xb.mean(), ya.mean() - yb.mean()
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def test_relations_agree_with_the_masks():
    checked = 0
    for seed in range(4):
        s = dense_scene(8, seed=seed)
        sentences = re.findall(r"The (\w+) (\w+) is (left of|right of|above|below) the (\w+) (\w+)\.", s.long_caption)
        assert len(sentences) == len(s.objects) - 1
        for i, (c1, s1, rel, c2, s2) in enumerate(sentences, start=1):
            a, b = s.objects[i], s.objects[i - 1]
            assert (c1, s1, c2, s2) == (a.color, a.shape, b.color, b.shape)
            assert rel == _relation_from_masks(a.mask, b.mask) == relation(a.mask, b.mask)
            checked += 1
    assert checked == 28


def test_relation_examples():
    a = np.zeros((20, 20), bool)
    b = np.zeros((20, 20), bool)
    a[8:12, 1:5] = True
    b[8:12, 14:18] = True
    assert relation(a, b) == "left of" and relation(b, a) == "right of"
    assert relation(a.T, b.T) == "above" and relation(b.T, a.T) == "below"


@pytest.mark.parametrize("n", [8, 10, 12])
def test_long_captions_of_dense_scenes_exceed_77_tokens(n):
    s = dense_scene(n, seed=n)
    assert len(s.objects) == n
    assert _tokens(s.long_caption) > 77
    assert _tokens(s.short_caption) <= 77
    assert f"a photo of {COUNT_WORDS[n]} shapes on a striped background" in s.short_caption


def test_short_caption_names_the_largest_objects():
    s = dense_scene(8, seed=1)
    area = [o.mask.sum() for o in s.objects]
    biggest = s.objects[int(np.argmax(area))]
    assert f"including a {biggest.size} {biggest.color} {biggest.shape}" in s.short_caption


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "wds"])
def test_export_carries_long_and_short_captions(tmp_path, fmt):
    w = ShapesWorld(seed=2, n_objects=(2, 3))
    res = export(w, tmp_path, n=3, split="test", task="captions", fmt=fmt, progress=False)
    scenes = [w.scene("test", i) for i in range(3)]
    if fmt == "csv":
        with open(res.index_file, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0])[:10] == ["filepath", "caption", "label", "split", "index", "background",
                                      "n_objects", "colors", "shapes", "defect"]  # old columns first
        by_index = {int(r["index"]): r for r in rows}
        records = read_caption_table(res.index_file)  # the old reader still merges the rows
        assert [r.captions for r in records] == [s.captions for s in scenes]
    elif fmt == "jsonl":
        by_index = {r["index"]: r for r in map(json.loads, res.index_file.read_text().splitlines())}
        assert [r.captions for r in read_caption_table(res.index_file)] == [s.captions for s in scenes]
    else:
        import tarfile

        with tarfile.open(res.files[0]) as tar:
            by_index = {json.loads(tar.extractfile(m).read())["index"]: json.loads(tar.extractfile(m).read())
                        for m in tar.getmembers() if m.name.endswith(".json")}
    for s in scenes:
        assert by_index[s.index]["long_caption"] == s.long_caption
        assert by_index[s.index]["short_caption"] == s.short_caption
