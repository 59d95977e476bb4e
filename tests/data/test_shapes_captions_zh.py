"""Chinese ShapesWorld captions: they parse back to the scene, fit the context, leave the world's bytes alone."""

import hashlib

import numpy as np
import pytest

from cliplab.data.shapes import ShapesWorld, shapes_tiny_world
from cliplab.data.shapes.captions_zh import (COLOR_ZH, MAX_TOKENS_ZH, SHAPE_ZH, chinese_captions, parse_caption,
                                             relation)


@pytest.fixture(scope="module")
def scenes():
    return shapes_tiny_world(0).replace(n_objects=(1, 3)).render_batch("train", range(120))[1]


def test_canonical_caption_parses_back_to_every_attribute(scenes):
    for sc in scenes:
        caps = sc.captions_zh
        assert len(caps) == 5 and len(set(caps)) == 5
        want = [(o.position, o.size, o.color, o.shape) for o in sc.objects]
        assert parse_caption(caps[0])["placed"] == want
        for c in caps:                                   # every rewrite names only the scene's objects
            named = parse_caption(c)["objects"]
            assert named and set(named) <= {(o.color, o.shape) for o in sc.objects}


def test_relation_captions_agree_with_the_boxes(scenes):
    seen = set()
    for sc in scenes:
        if len(sc.objects) < 2:
            continue
        a, b = sc.objects[:2]
        rel = [parse_caption(c)["relation"] for c in chinese_captions(sc.objects, sc.background, n=6)]
        got = [r for r in rel if r is not None]
        assert got == [(a.color, a.shape, relation(a, b), b.color, b.shape)]
        ax, bx = (a.box[0] + a.box[2]) / 2, (b.box[0] + b.box[2]) / 2
        if got[0][2] == "left":
            assert ax < bx
        seen.add(got[0][2])
    assert len(seen) >= 3


def test_chinese_word_order_and_words():
    from cliplab.data.shapes.world import ObjectGT

    red = ObjectGT("circle", "red", "large", "left", (0, 10, 10, 20), np.zeros((1, 1), bool))
    blue = ObjectGT("square", "blue", "small", "right", (40, 10, 50, 20), np.zeros((1, 1), bool))
    single = chinese_captions([red], "plain", n=8)
    assert single[0] == "左边有一个大的红色圆形" and "一个红色的圆形" in single
    pair = chinese_captions([red, blue], "plain", n=6)
    assert "红色圆形在蓝色方形的左边" in pair
    assert parse_caption("红色圆形在蓝色方形的左边")["relation"] == ("red", "circle", "left", "blue", "square")
    assert len(set(COLOR_ZH.values())) == len(COLOR_ZH) and len(set(SHAPE_ZH.values())) == len(SHAPE_ZH)


def test_captions_fit_the_context_length_of_clip(scenes):
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    longest = max(len(tok.encode(c)) + 2 for sc in scenes for c in sc.captions_zh)
    assert 40 < longest <= MAX_TOKENS_ZH == 77
    assert tok.decode(tok.encode("红色圆形在蓝色方形的左边")).strip() == "红色圆形在蓝色方形的左边"  # UTF-8 bytes round-trip


def test_world_bytes_and_english_captions_are_unchanged():
    world = shapes_tiny_world(0)
    h = hashlib.sha256()
    for i in range(16):
        s = world.scene("train", i)
        _ = s.captions_zh                                # reading them draws no random numbers
        h.update(s.image.tobytes())
        for o in s.objects:
            h.update(o.mask.tobytes())
        h.update("|".join(s.captions).encode())
    assert h.hexdigest() == "68ca8968f51fb45ef962cb9dd9f133d61265cf2e82eea2a01fe68374b6af479a"
    assert ShapesWorld(seed=2).scene("val", 3).captions == ShapesWorld(seed=2).scene("val", 3).captions
