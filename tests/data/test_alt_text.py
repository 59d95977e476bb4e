"""Noisy alt-text captions: seeded, at the stated rates, never a held-out composition."""

import numpy as np
import pytest

from cliplab.data.shapes import COLORS
from cliplab.data.shapes.alt_text import BOILERPLATE, NoiseRates, corrupt_caption
from cliplab.data.shapes.world import SHAPES, ObjectGT

SHAPE_SET = SHAPES[:8]


def _objects(rng, k):
    return [ObjectGT(str(rng.choice(SHAPE_SET)), str(rng.choice(COLORS)), str(rng.choice(["small", "large"])),
                     str(rng.choice(["left", "center", "top right"])), (0, 0, 1, 1), np.zeros((1, 1), bool))
            for _ in range(k)]


def _scenes(n, k=3, seed=0):
    rng = np.random.default_rng(seed)
    return [_objects(rng, k) for _ in range(n)]


def test_corrupter_is_seeded():
    objs = _scenes(1)[0]
    a = [corrupt_caption(objs, np.random.default_rng([0, i]), colors=COLORS, shapes=SHAPE_SET).text for i in range(20)]
    b = [corrupt_caption(objs, np.random.default_rng([0, i]), colors=COLORS, shapes=SHAPE_SET).text for i in range(20)]
    c = [corrupt_caption(objs, np.random.default_rng([1, i]), colors=COLORS, shapes=SHAPE_SET).text for i in range(20)]
    assert a == b
    assert a != c


def _close(observed, expected, n):
    return abs(observed - expected) < 4.5 * np.sqrt(expected * (1 - expected) / n) + 1e-9


def test_corrupter_applies_the_stated_rates():
    p = NoiseRates(unrelated=0.3, drop_object=0.4, wrong_attribute=0.3, drop_word=0.2, boilerplate=0.5)
    scenes = _scenes(3000)
    out = [corrupt_caption(o, np.random.default_rng([7, i]), colors=COLORS, shapes=SHAPE_SET, rates=p)
           for i, o in enumerate(scenes)]
    unrelated = np.array([c.unrelated for c in out])
    assert _close(unrelated.mean(), p.unrelated, len(out))
    kept = [c for c in out if not c.unrelated]
    # 3 objects: each dropped at p, but when all three are, one is restored
    per_object = sum(c.n_dropped_objects for c in kept) / (3 * len(kept))
    assert _close(per_object, p.drop_object - p.drop_object ** 3 / 3, 3 * len(kept))
    n_kept_objects = sum(c.n_objects - c.n_dropped_objects for c in kept)
    assert _close(sum(c.n_wrong_attributes for c in kept) / n_kept_objects, p.wrong_attribute, n_kept_objects)
    n_words = sum(c.n_words for c in kept)
    assert _close(sum(c.n_dropped_words for c in kept) / n_words, p.drop_word, n_words)
    assert _close(np.mean([c.boilerplate for c in kept]), p.boilerplate, len(kept))


def test_unrelated_captions_are_boilerplate_and_clean_rates_keep_the_canonical_caption():
    objs = _scenes(1)[0]
    c = corrupt_caption(objs, np.random.default_rng(0), colors=COLORS, shapes=SHAPE_SET,
                        rates=NoiseRates(unrelated=1.0))
    assert c.unrelated and not any(w in c.text for w in (*COLORS, *SHAPE_SET))
    heads = {b.split("{")[0].strip() for b in BOILERPLATE}
    assert any(c.text.startswith(h) for h in heads)
    clean = NoiseRates(0, 0, 0, 0, 0)
    from cliplab.data.shapes.captions import canonical_caption
    assert corrupt_caption(objs, np.random.default_rng(0), colors=COLORS, shapes=SHAPE_SET,
                           rates=clean).text == canonical_caption(objs)


def test_wrong_attributes_never_make_an_avoided_composition():
    avoid = {(c, s) for c in COLORS for s in SHAPE_SET if (COLORS.index(c) + SHAPE_SET.index(s)) % 3 == 0}
    rates = NoiseRates(unrelated=0, drop_object=0, wrong_attribute=1.0, drop_word=0, boilerplate=0)
    rng = np.random.default_rng(3)
    for i in range(300):
        objs = [o for o in _objects(rng, 2) if (o.color, o.shape) not in avoid] or _objects(rng, 0)
        if not objs:
            continue
        text = corrupt_caption(objs, np.random.default_rng(i), colors=COLORS, shapes=SHAPE_SET, rates=rates,
                               avoid=avoid).text
        assert not any(f"{c} {s}" in text for c, s in avoid)


def test_rates_are_validated():
    with pytest.raises(ValueError, match="drop_word"):
        NoiseRates(drop_word=1.5)
