"""LaCLIP rewrites: deterministic, distinct, and they keep every ground-truth attribute."""

import json
import re
from collections import Counter

import numpy as np
import pytest

from cliplab.data.rewrites import add_rewrites, rewrite_caption, rewrite_table
from cliplab.data.shapes import COLORS, ShapesWorld
from cliplab.data.shapes.captions import canonical_caption
from cliplab.data.shapes.world import SHAPES

# The test's own reading of captions (written independently of the rewriter's tables).
_WORDS = {"big": "large", "little": "small", "backdrop": "background"}
_PLACES = [("in the upper left", "at the top left"), ("in the top left corner", "at the top left"),
           ("in the upper right", "at the top right"), ("in the top right corner", "at the top right"),
           ("in the lower left", "at the bottom left"), ("in the bottom left corner", "at the bottom left"),
           ("in the lower right", "at the bottom right"), ("in the bottom right corner", "at the bottom right"),
           ("in the middle", "in the center"), ("at the center", "in the center"),
           ("on the left side", "on the left"), ("to the left", "on the left"),
           ("on the right side", "on the right"), ("to the right", "on the right"),
           ("near the top", "at the top"), ("at the top edge", "at the top"),
           ("near the bottom", "at the bottom"), ("at the bottom edge", "at the bottom")]
_POSITIONS = ["at the top left", "at the top right", "at the bottom left", "at the bottom right", "in the center",
              "on the left", "on the right", "at the top", "at the bottom"]
_NUM = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
_SHAPE = "|".join(SHAPES)
_COLOR = "|".join(COLORS)
_SIZE = "small|large"


def parse(caption: str) -> dict:
    """Objects (colour, shape) with multiplicity, sizes, positions and background of a caption."""
    t = caption.lower().rstrip(".")
    for a, b in _PLACES:
        t = t.replace(a, b)
    t = " ".join(_WORDS.get(w, w) for w in t.split())
    objects, sizes = Counter(), Counter()
    obj = re.compile(rf"\b(a|an|one|two|three) (?:({_SIZE}) )?(?:({_COLOR}) ({_SHAPE})(?:e?s)?\b"
                     rf"|({_SHAPE})(?:e?s)? in ({_COLOR})\b)")
    for m in obj.finditer(t):
        k = _NUM[m.group(1)]
        color, shape = (m.group(3), m.group(4)) if m.group(3) else (m.group(6), m.group(5))
        objects[(color, shape)] += k
        if m.group(2):
            sizes[m.group(2)] += k
    for m in re.finditer(rf", ({_SIZE})$", t):        # "there is a red star, small"
        sizes[m.group(1)] += 1
    positions = Counter()
    rest = t
    for p in _POSITIONS:                              # longest first: "at the top left" before "at the top"
        positions[p] += rest.count(p)
        rest = rest.replace(p, "")
    bg = re.findall(r"on an? (\w+) background", t)
    return {"objects": objects, "sizes": sizes, "positions": +positions, "background": bg}


def _scene_truth(scene) -> dict:
    return {"objects": Counter((o.color, o.shape) for o in scene.objects),
            "sizes": Counter(o.size for o in scene.objects),
            "positions": +Counter({"center": "in the center", "left": "on the left", "right": "on the right"}
                                  .get(o.position, f"at the {o.position}") for o in scene.objects),
            "background": []}


@pytest.fixture(scope="module")
def scenes():
    world = ShapesWorld(seed=0, n_objects=(1, 3))
    return [world.scene("train", i) for i in range(40)]


def test_parser_reads_the_ground_truth_of_canonical_captions(scenes):
    for s in scenes:
        assert parse(canonical_caption(s.objects)) == _scene_truth(s)


def test_rewrites_preserve_every_attribute(scenes):
    n_checked = 0
    for s in scenes:
        for caption in s.captions:
            truth = parse(caption)
            rewrites = rewrite_caption(caption, 4, seed=0)
            assert rewrites and caption not in rewrites and len(set(rewrites)) == len(rewrites)
            for r in rewrites:
                assert parse(r) == truth, (caption, r)
                n_checked += 1
    assert n_checked > 500


def test_rewrites_are_deterministic_by_seed_and_vary():
    c = "a large red star at the top left, a small blue circle in the center and a small green ring on the right"
    assert rewrite_caption(c, 4, seed=0) == rewrite_caption(c, 4, seed=0)
    assert rewrite_caption(c, 4, seed=0) != rewrite_caption(c, 4, seed=1)
    many = rewrite_caption(c, 8, seed=0)
    firsts = {r.split(",")[0] for r in many}
    assert len(firsts) > 2                                   # clauses really are reordered
    assert any(re.search(rf"({_SHAPE}) in ({_COLOR})", r) for r in many)        # colour placement
    assert any("big" in r or "little" in r for r in many)                        # size synonyms


def test_plural_merge_keeps_the_count():
    c = "a red star, a red star and a blue circle"
    rewrites = rewrite_caption(c, 12, seed=0)
    assert any("two red stars" in r or "two stars in red" in r for r in rewrites)
    assert all(parse(r) == parse(c) for r in rewrites)


def test_any_caption_gets_template_and_order_rewrites():
    rewrites = rewrite_caption("a dog on a sofa and a cat", 3, seed=0)
    assert len(rewrites) == 3
    assert all("dog" in r and "cat" in r and "sofa" in r for r in rewrites)
    assert rewrite_caption("x", 0) == []
    with pytest.raises(ValueError):
        rewrite_caption("x", -1)


def test_add_rewrites_keeps_originals_first():
    out = add_rewrites(["a red star", "a red star"], 2, seed=0)
    assert out[0] == "a red star" and len(out) == len(set(out)) == 3


def test_rewrite_table_and_cli(tmp_path, capsys):
    from cliplab.cli.main import main

    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.png").write_bytes(b"")
    table = tmp_path / "t.csv"
    table.write_text("filepath,caption\na.png,a large red star on the left\nb.png,a blue circle\n"
                     "a.png,a small green ring\n")
    stats = rewrite_table(table, tmp_path / "o.jsonl", n=2, seed=0)
    rows = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert stats["images"] == 2 and stats["captions"] == 3 and stats["rewrites"] == 6
    assert rows[0]["caption"][:2] == ["a large red star on the left", "a small green ring"]
    assert rows[0]["caption"][2:4] == rewrite_caption("a large red star on the left", 2, seed=0)
    assert main(["captions", "rewrite", str(table), "--out", str(tmp_path / "c.jsonl"), "-n", "2"]) == 0
    assert (tmp_path / "c.jsonl").read_text() == (tmp_path / "o.jsonl").read_text()
    assert main(["captions", "rewrite", str(table), "--out", str(tmp_path / "c.csv")]) == 2
    assert "JSONL" in capsys.readouterr().err
