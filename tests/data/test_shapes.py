"""ShapesWorld: determinism, ground truth that agrees with the pixels, splits, exporters."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from cliplab.data.shapes import (
    BACKGROUNDS,
    COLORS,
    DEFAULT_HELDOUT,
    DEFAULT_WORLD,
    DEFECTS,
    MULTI_OBJECTS,
    SHAPES,
    SPURIOUS_BACKGROUND,
    ShapesWorld,
    export,
    get_world,
    list_worlds,
    shapes_tiny_world,
    task_classes,
    task_world,
)
from cliplab.data.shapes.captions import mentions
from cliplab.data.shapes.export import rle_decode
from cliplab.data.shapes.render import PALETTE
from cliplab.data.sources import SkipLog, iter_webdataset, read_caption_table
from cliplab.errors import UsageError


def test_vocabulary():
    assert len(COLORS) >= 8 and len(SHAPES) >= 8
    assert BACKGROUNDS == ("plain", "gradient", "stripes", "noise")
    assert set(DEFECTS) == {"scratch", "hole", "stain"}
    assert all(" " not in s for s in SHAPES)
    assert len(DEFAULT_HELDOUT) == len(SHAPES)
    assert {s for _, s in DEFAULT_HELDOUT} == set(SHAPES)  # one per shape
    for color in COLORS:  # every colour keeps a trainable shape
        assert any((color, s) not in DEFAULT_HELDOUT for s in SHAPES)


def _same(a, b):
    return (np.array_equal(a.image, b.image) and a.captions == b.captions and a.background == b.background
            and [(o.shape, o.color, o.box) for o in a.objects] == [(o.shape, o.color, o.box) for o in b.objects])


def test_pure_function_of_seed():
    w1, w2, w3 = ShapesWorld(seed=0), ShapesWorld(seed=0), ShapesWorld(seed=1)
    for i in (0, 7, 999_999):
        assert _same(w1.scene("train", i), w2.scene("train", i))
    assert _same(w1.scene("test", 5), w1.split("test")[5])
    # order does not matter: random access
    later, first = w1.scene("val", 3), w1.scene("val", 0)
    assert _same(later, w2.scene("val", 3)) and _same(first, w2.scene("val", 0))
    assert not np.array_equal(w1.scene("train", 0).image, w3.scene("train", 0).image)
    assert not np.array_equal(w1.scene("train", 0).image, w1.scene("test", 0).image)


def test_split_sequence_and_batch():
    w = ShapesWorld(seed=2, split_sizes={"test": 6}, image_size=40)
    ds = w.split("test")
    assert len(ds) == 6 and len(list(ds)) == 6
    assert _same(ds[-1], ds[5])
    with pytest.raises(IndexError):
        ds[6]
    images, scenes = w.render_batch("test", [4, 1])
    assert images.shape == (2, 40, 40, 3) and images.dtype == np.uint8
    assert np.array_equal(images[0], ds[4].image) and scenes[1].index == 1
    with pytest.raises(UsageError):
        w.split("ood")


@pytest.mark.parametrize("size", [64, 37])
def test_masks_boxes_match_pixels(size):
    w = ShapesWorld(seed=3, image_size=size, antialias=False)
    for i in range(40):
        s = w.scene("train", i)
        assert s.image.shape == (size, size, 3) and s.image.dtype == np.uint8
        assert 1 <= len(s.objects) <= 3 and len(set(s.captions)) >= 3
        union = np.zeros((size, size), bool)
        for o in s.objects:
            assert o.mask.shape == (size, size) and o.mask.any()
            assert not (union & o.mask).any()  # visible masks are disjoint
            union |= o.mask
            ys, xs = np.nonzero(o.mask)
            assert o.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            diff = np.abs(s.image[o.mask].astype(int) - np.array(PALETTE[o.color]))
            assert diff.max() <= 25  # exact colour up to the per-object jitter
            # nearest palette colour of the mean pixel is the object's colour
            mean = s.image[o.mask].mean(0)
            nearest = min(PALETTE, key=lambda c: np.linalg.norm(mean - np.array(PALETTE[c])))
            assert nearest == o.color


def test_antialiased_masks_mostly_object_colour():
    w = ShapesWorld(seed=4, n_objects=1)
    for i in range(20):
        s = w.scene("test", i)
        o = s.objects[0]
        diff = np.abs(s.image[o.mask].astype(int) - np.array(PALETTE[o.color])).max(1)
        assert (diff <= 25).mean() > 0.7


def test_heldout_absent_from_train_present_in_test():
    w = ShapesWorld(seed=5, n_objects=(1, 3), image_size=16, split_sizes={"test": 3000})
    held = set(DEFAULT_HELDOUT)
    seen_train = set()
    for i in range(2000):
        s = w.scene("train", i)
        seen_train |= {(o.color, o.shape) for o in s.objects}
        for cap in s.captions:
            assert not any(mentions(cap, c, sh) for c, sh in held), cap
    assert not seen_train & held
    assert {c for c, _ in seen_train} == set(COLORS) and {s for _, s in seen_train} == set(SHAPES)
    seen_test = {(o.color, o.shape) for i in range(1500) for o in w.scene("test", i).objects}
    assert held <= seen_test


def test_ood_shapes_only_in_ood_split():
    ood = ("star", "heart")
    w = ShapesWorld(seed=6, ood_shapes=ood, image_size=16)
    for split in ("train", "val", "test"):
        for i in range(150):
            assert not {o.shape for o in w.scene(split, i).objects} & set(ood)
    got = {o.shape for i in range(60) for o in w.scene("ood", i).objects}
    assert got == set(ood)
    with pytest.raises(UsageError):
        ShapesWorld(ood_shapes=("blob",))


def test_spurious_background_map():
    w = ShapesWorld(seed=7, spurious=1.0, image_size=16)
    for i in range(100):
        s = w.scene("train", i)
        assert s.background == SPURIOUS_BACKGROUND[s.objects[0].shape]
    bgs = {ShapesWorld(seed=7, image_size=16).scene("train", i).background for i in range(100)}
    assert bgs == set(BACKGROUNDS)


def test_defects_have_masks_and_change_pixels():
    clean, broken = ShapesWorld(seed=8), ShapesWorld(seed=8, defect_rate=1.0)
    kinds = set()
    for i in range(30):
        a, b = clean.scene("test", i), broken.scene("test", i)
        assert not a.defects and len(b.defects) == 1
        d = b.defects[0]
        kinds.add(d["kind"])
        assert d["mask"].any()
        changed = np.abs(a.image.astype(int) - b.image.astype(int)).max(-1)  # (H, W)
        assert changed[d["mask"]].mean() > 10
        assert (changed[~d["mask"]] > 0).mean() < 0.1  # only soft edges outside the mask
        assert a.captions == b.captions  # defects come from their own stream
    assert kinds == set(DEFECTS)


def test_captions_short_and_varied():
    w = ShapesWorld(seed=9, n_objects=3, image_size=16)
    longest = max(len(c.split()) for i in range(200) for c in w.scene("train", i).captions)
    assert longest <= 28
    caps = w.scene("train", 0).captions
    assert len(set(caps)) == len(caps) >= 3


def test_bad_options():
    for kwargs in ({"spurious": 2}, {"n_objects": (3, 1)}, {"image_size": 4}, {"heldout": [("grey", "star")]}):
        with pytest.raises(UsageError):
            ShapesWorld(**kwargs)


# ---------------------------------------------------------------- exporters

@pytest.fixture(scope="module")
def world():
    return ShapesWorld(seed=11, image_size=32, defect_rate=0.3)


def test_export_folder(world, tmp_path):
    res = export(world, tmp_path, n=12, task="color-shape", fmt="folder", progress=False)
    pngs = list(tmp_path.rglob("*.png"))
    assert len(pngs) == 12 and res.n_images == 12
    for p in pngs:
        assert p.parent.parent == tmp_path
        color, shape = p.parent.name.split(" ")
        assert color in COLORS and shape in SHAPES
        assert p.parent.name in res.classes
    with pytest.raises(UsageError):
        export(world, tmp_path, n=3, task="captions", fmt="folder")


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_export_table_round_trip(world, tmp_path, fmt):
    res = export(world, tmp_path, n=10, task="captions", fmt=fmt, progress=False)
    records = read_caption_table(res.index_file)
    assert len(records) == 10
    for k, rec in enumerate(records):
        scene = world.scene("test", k)
        assert rec.captions == scene.captions
        assert rec.image.is_file()
        with open(rec.image, "rb") as f:
            from PIL import Image

            assert np.array_equal(np.asarray(Image.open(f).convert("RGB")), scene.image)


def test_export_wds_round_trip(world, tmp_path):
    res = export(world, tmp_path, n=9, task="detection", fmt="wds", progress=False)
    log = SkipLog()
    samples = list(iter_webdataset(res.files, skip_log=log))
    assert len(samples) == 9 and log.count == 0
    key, image_bytes, captions, meta = samples[3]
    assert key == "test_0000003" and image_bytes[:4] == b"\x89PNG"
    assert captions == world.scene("test", 3).captions
    assert meta["label"] == ";".join(o.name for o in world.scene("test", 3).objects)


def test_export_coco_consistent(world, tmp_path):
    res = export(world, tmp_path, n=8, task="detection", fmt="coco", progress=False)
    coco = json.loads(res.index_file.read_text())
    image_ids = {im["id"] for im in coco["images"]}
    cat_ids = {c["id"] for c in coco["categories"]}
    ann_ids = [a["id"] for a in coco["annotations"]]
    assert len(image_ids) == 8 and len(set(ann_ids)) == len(ann_ids)
    assert {c["name"] for c in coco["categories"]} == set(SHAPES)
    n_objects = sum(len(world.scene("test", i).objects) for i in range(8))
    assert len(ann_ids) == n_objects
    for a in coco["annotations"]:
        assert a["image_id"] in image_ids and a["category_id"] in cat_ids
        mask = rle_decode(a["segmentation"])
        ys, xs = np.nonzero(mask)
        x, y, w, h = a["bbox"]
        assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert a["area"] == mask.sum()


def test_cli_export(tmp_path, capsys):
    from argparse import ArgumentParser

    from cliplab.cli import shapes

    parser = ArgumentParser()
    shapes.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["shapes", "export", str(tmp_path), "--n", "4", "--format", "jsonl",
                              "--task", "shape", "--image-size", "24", "--no-progress"])
    assert args.run(args) == 0
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1 and "4" in out
    lines = (tmp_path / "captions.jsonl").read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[0])["label"] in SHAPES
    assert re.search(r"jsonl", out)


# ---------------------------------------------------------------- the named worlds

def test_named_worlds():
    assert {"shapes-tiny", "plain"} <= set(list_worlds()) and DEFAULT_WORLD == "shapes-tiny"
    tiny = get_world()
    assert tiny.config() == shapes_tiny_world(0).config()
    assert tiny.image_size == 64 and tiny.n_objects == (1, 1) and tiny.ood_shapes == ("heart", "crescent")
    assert len(tiny.shapes_of("test")) == 8 and tiny.shapes_of("ood") == ("heart", "crescent")
    assert get_world("plain", 3).config() == ShapesWorld(seed=3).config()
    assert get_world("shapes-tiny", 2, image_size=32).image_size == 32
    with pytest.raises(UsageError, match="unknown ShapesWorld 'tiny'"):
        get_world("tiny")
    assert task_world(tiny, "color").n_objects == (1, 1)
    assert task_world(tiny, "captions").n_objects == task_world(tiny, "retrieval").n_objects == MULTI_OBJECTS
    assert len(task_classes(tiny, "color-shape", "train")) == 64  # held-out pairs stay classes
    assert task_classes(tiny, "shape", "ood") == ["heart", "crescent"]


def _cli(*argv) -> int:
    from cliplab.cli.main import main

    return main(["shapes", "export", *map(str, argv), "--no-progress"])


def _folder_by_index(data) -> dict:
    """``{scene index: (path, class name)}`` of an exported class folder read back."""
    return {int(p.stem.split("_")[1]): (p, data.classnames[y]) for p, y in zip(data.items, data.labels)}


@pytest.mark.parametrize("split, n", [("test", 96), ("train", 24)])
def test_export_default_is_the_eval_world(tmp_path, split, n):
    """`cliplab shapes export` writes exactly the images, labels and label set of the
    `shapes:color-shape` evaluation dataset (the world of the bundled model)."""
    from PIL import Image

    from cliplab.data.datasets import load_dataset

    assert _cli(tmp_path, "--n", n, "--task", "color-shape", "--split", split) == 0
    exported = load_dataset(str(tmp_path))
    ours = load_dataset("shapes:color-shape", split, n=n)
    assert sorted(exported.classnames) == sorted(ours.classnames) and len(ours.classnames) == 64
    by_index = _folder_by_index(exported)
    assert sorted(by_index) == list(range(n))
    for i, (path, name) in by_index.items():
        assert name == ours.classnames[ours.labels[i]]
        with Image.open(path) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), ours.items[i])
    manifest = json.loads((tmp_path / "shapesworld.json").read_text())
    assert manifest["world"] == {**ours.meta["world"], "split_sizes": manifest["world"]["split_sizes"]}
    assert manifest["classes"] == sorted(ours.classnames)


def test_export_classified_by_shapes_tiny_like_eval(tmp_path):
    """Regression: the export used to be the 10-shape world (80 classes, 77 % zero-shot);
    now it is the eval task, image for image, with the same accuracy."""
    import cliplab
    from cliplab.data.datasets import load_dataset
    from cliplab.eval.tasks import zeroshot_classification

    n = 96
    assert _cli(tmp_path, "--n", n, "--task", "color-shape", "--split", "test") == 0
    bb = cliplab.load("shapes-tiny")
    got = zeroshot_classification(bb, load_dataset(str(tmp_path)), progress=False).metrics
    want = zeroshot_classification(bb, load_dataset("shapes:color-shape", "test", n=n), progress=False).metrics
    assert got["acc1"] == pytest.approx(want["acc1"], abs=1e-12)
    assert got["acc1"] >= 0.9  # the model card: 98.9 % seen, 78.5 % held-out compositions


def test_export_captions_are_the_retrieval_task(tmp_path):
    from PIL import Image

    from cliplab.data.datasets import load_dataset

    assert _cli(tmp_path, "--n", 12, "--task", "captions", "--format", "jsonl") == 0
    records = read_caption_table(tmp_path / "captions.jsonl")
    ours = load_dataset("shapes:retrieval", "test", n=12)
    assert [r.captions for r in records] == ours.captions
    for rec, image in zip(records, ours.items):
        with Image.open(rec.image) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), image)
    lines = (tmp_path / "captions.jsonl").read_text().splitlines()
    assert max(len(json.loads(line)["objects"]) for line in lines) > 1  # MULTI_OBJECTS, 1-3


def test_export_other_world(tmp_path):
    assert _cli(tmp_path, "--n", 8, "--world", "plain", "--task", "shape") == 0
    manifest = json.loads((tmp_path / "shapesworld.json").read_text())
    assert manifest["world"]["ood_shapes"] == [] and manifest["classes"] == sorted(SHAPES)
    assert {p.name for p in tmp_path.iterdir() if p.is_dir()} == set(SHAPES)
    ood = tmp_path / "ood"
    assert _cli(ood, "--n", 4, "--split", "ood", "--task", "shape") == 0  # shapes-tiny has an ood split
    assert {p.name for p in ood.iterdir() if p.is_dir()} == {"heart", "crescent"}
    assert _cli(tmp_path / "x", "--n", 4, "--world", "plain", "--split", "ood") == 2
    with pytest.raises(SystemExit) as e:
        _cli(tmp_path / "y", "--n", 4, "--world", "tiny")
    assert e.value.code == 2
