"""Caption data of the Trainer: CLIPScore filtering, noisy / recaptioned ShapesWorld captions, rewrites."""

import numpy as np
import pytest

from cliplab.data.shapes import shapes_tiny_world
from cliplab.data.shapes.alt_text import NoiseRates
from cliplab.data.shapes.captions import canonical_caption, mentions
from cliplab.errors import UsageError
from cliplab.train.caption_quality import filter_by_score, select_pairs
from cliplab.train.datasets import RewrittenSet, ShapesTrainSet
from cliplab.train.recipes import get_recipe, recipe_options


class ListSet:
    """Items (image, captions, extras) where image i is a constant i-valued array."""

    def __init__(self, captions):
        self.captions = captions

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        return np.full((2, 2, 3), i, np.uint8), list(self.captions[i]), {"targets": {"i": np.array([i])}}


def stub_scorer(images, captions):
    """Score = the number written at the end of the caption."""
    assert len(images) == len(captions)
    return np.array([float(c.split()[-1]) for c in captions])


def test_select_pairs_threshold_and_fraction():
    s = np.array([0.3, 0.9, 0.5, 0.5, 0.1])
    assert select_pairs(s, threshold=0.5).tolist() == [False, True, True, True, False]
    assert select_pairs(s, keep_fraction=0.4).tolist() == [False, True, True, False, False]  # tie: lower index
    assert select_pairs(s, keep_fraction=1.0).all()
    for bad in ({}, {"threshold": 0.1, "keep_fraction": 0.5}, {"keep_fraction": 0.0}):
        with pytest.raises(ValueError):
            select_pairs(s, **bad)


def test_filter_keeps_exactly_the_pairs_above_threshold():
    caps = [["x 0.9", "y 0.2"], ["z 0.1"], ["w 0.5", "v 0.7"], ["u 0.49"]]
    ds = ListSet(caps)
    kept, report, scores = filter_by_score(ds, stub_scorer, threshold=0.5, batch_size=3, progress=False)
    assert scores.tolist() == [0.9, 0.2, 0.1, 0.5, 0.7, 0.49]
    assert len(kept) == 2
    assert kept[0][1] == ["x 0.9"] and kept[1][1] == ["w 0.5", "v 0.7"]
    assert kept[1][0][0, 0, 0] == 2 and kept[1][2]["targets"]["i"].tolist() == [2]   # image and extras follow
    assert (report.n_pairs, report.n_kept_pairs, report.n_dropped_pairs) == (6, 3, 3)
    assert (report.n_items, report.n_kept_items, report.threshold) == (4, 2, 0.5)
    assert report.mean_kept_score == pytest.approx(0.7)
    images, captions, extras = kept.get_batch([1, 0])
    assert captions == [["w 0.5", "v 0.7"], ["x 0.9"]] and extras[0]["targets"]["i"].tolist() == [2]
    frac, report, _ = filter_by_score(ds, stub_scorer, keep_fraction=0.5, progress=False)
    assert report.n_kept_pairs == 3 and report.threshold == 0.5 and len(frac) == 2


def test_bundled_model_scores_real_pairs_above_corrupted_ones():
    import cliplab
    from cliplab.dense.misalignment import ClipScorer

    world = shapes_tiny_world(0)
    images, scenes = world.render_batch("test", range(48))
    real = [canonical_caption(s.objects) for s in scenes]
    rates = NoiseRates(unrelated=0.3, drop_object=0.0, wrong_attribute=1.0, drop_word=0.0, boilerplate=0.3)
    noisy = ShapesTrainSet(world, "test", captions="noisy", noise=rates).get_batch(range(48))[1]
    scorer = ClipScorer(cliplab.load("shapes-tiny"))
    s_real, s_noisy = scorer(list(images), real), scorer(list(images), [c[0] for c in noisy])
    assert s_real.shape == (48,)
    assert s_real.mean() > s_noisy.mean() + 0.2
    assert (s_real > s_noisy).mean() > 0.9


def test_shapes_captions_noisy_recaptioned_and_rewritten():
    world = shapes_tiny_world(0).replace(n_objects=(2, 3))
    noisy = ShapesTrainSet(world, "train", captions="noisy")
    a, b = noisy.get_batch(range(100))[1], [noisy[i][1] for i in range(100)]
    assert a == b and all(len(c) == 1 for c in a)                      # one caption, same item by item
    assert a == ShapesTrainSet(world, "train", captions="noisy").get_batch(range(100))[1]   # seeded
    assert not any(mentions(c[0], *pair) for c in a for pair in world.heldout)
    assert sum(c[0] != canonical_caption(s.objects) for c, s in zip(a, world.split("train"))) > 75
    rec = ShapesTrainSet(world, "train", captions="recaptioned", negatives=1, tags=True)
    image, caps, extras = rec[3]
    assert caps == [canonical_caption(world.scene("train", 3).objects)] and "extra_captions" in extras
    rw = RewrittenSet(rec, 3, seed=0)
    image, caps, extras = rw[3]
    assert caps[0] == canonical_caption(world.scene("train", 3).objects) and len(caps) == 4
    assert rw.get_batch([3])[1] == [caps] and "targets" in rw.get_batch([3])[2][0]
    with pytest.raises(ValueError, match="captions"):
        ShapesTrainSet(world, "train", captions="web")


def test_recipe_caption_options():
    assert {"captions", "rewrites", "pool", "keep_fraction", "filter_threshold", "scorer"} <= set(
        recipe_options("shapes-tiny"))
    r = get_recipe("shapes-tiny", captions="recaptioned", rewrites=2, pool=10, steps=3)
    assert len(r.train_set) == 10 and r.config.steps == 3
    assert len(r.train_set[0][1]) == 3
    f = get_recipe("shapes-tiny", captions="filtered", pool=20, scorer=stub_len_scorer, keep_fraction=0.25)
    assert len(f.train_set) == 5 and f.train_set.report.n_pairs == 20
    with pytest.raises(UsageError, match="scorer"):
        get_recipe("shapes-tiny", captions="filtered")
    with pytest.raises(UsageError, match="options of recipe"):
        get_recipe("shapes-tiny", colour="red")
    with pytest.raises(UsageError, match="captions must be"):
        get_recipe("shapes-tiny", captions="web")


def stub_len_scorer(images, captions):
    return np.array([len(c) for c in captions], dtype=float)
