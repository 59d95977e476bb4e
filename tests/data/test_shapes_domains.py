"""ShapesWorld domains: pure functions of the seed, the original rendering untouched, the same
objects in every domain, masks and boxes that agree with the pixels, reachable from the
dataset specs, the exporter and the CLI."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from cliplab.cli.main import main
from cliplab.data.datasets import load_dataset
from cliplab.data.shapes import DOMAINS, NEW_BACKGROUNDS, ObjectSpec, ShapesWorld, export, jitter_color, list_domains
from cliplab.data.shapes import shapes_tiny_world
from cliplab.data.shapes.domains import CORRUPTIONS, check_domain
from cliplab.data.shapes.export import rle_decode
from cliplab.errors import UsageError

ALL = list_domains()
PIXEL_FAMILIES = ("style", "lighting")  # domains whose masks must agree with a render without objects


def _digest(world, split, n):
    h = hashlib.sha256()
    for i in range(n):
        s = world.scene(split, i)
        h.update(s.image.tobytes())
        for o in s.objects:
            h.update(o.mask.tobytes())
        h.update("|".join(s.captions).encode())
    return h.hexdigest()


def test_registry_covers_every_family():
    families = {DOMAINS.meta(d)["family"] for d in ALL}
    assert families == {"original", "style", "lighting", "clutter", "occlusion", "background", "corruption"}
    assert ALL[0] == "original"
    for kind in CORRUPTIONS:
        assert all(f"{kind}-{s}" in DOMAINS for s in range(1, 6))
    assert {"outline", "textured", "hand-drawn", "low-contrast", "underexposed", "backlit", "color-cast",
            "clutter", "occluded", "new-backgrounds"} <= set(ALL)


def test_original_domain_renders_the_bytes_it_rendered_before_domains():
    # digests of the rendering before domains existed: the bundled model's training data
    assert _digest(shapes_tiny_world(0), "train", 16) == \
        "68ca8968f51fb45ef962cb9dd9f133d61265cf2e82eea2a01fe68374b6af479a"
    assert _digest(ShapesWorld(seed=3, defect_rate=0.5), "test", 16) == \
        "fcd780b5bb032ed6603f62ff0c336309418ce59721112c886def13b8d8070e52"
    assert _digest(ShapesWorld(seed=3, defect_rate=0.5, domain="original"), "test", 16) == \
        _digest(ShapesWorld(seed=3, defect_rate=0.5), "test", 16)
    assert ShapesWorld(domain="original").domain is None and check_domain("") is None


@pytest.mark.parametrize("domain", ALL[1:])
def test_every_domain_is_a_pure_function_of_the_seed_and_keeps_the_objects(domain):
    base = ShapesWorld(seed=2, defect_rate=0.3)
    w1, w2 = base.replace(domain=domain), ShapesWorld(**base.replace(domain=domain).config())
    changed = 0
    for i in (0, 4, 9):
        a, b, o = w1.scene("test", i), w2.scene("test", i), base.scene("test", i)
        assert a.image.tobytes() == b.image.tobytes() and a.captions == b.captions
        assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.objects, b.objects))
        # the domain changes the drawing, not the scene: same objects, labels, defects
        assert [(x.shape, x.color, x.size, x.position) for x in a.objects] == \
            [(x.shape, x.color, x.size, x.position) for x in o.objects]
        assert [d["kind"] for d in a.defects] == [d["kind"] for d in o.defects]
        if domain == "new-backgrounds":
            assert a.background in NEW_BACKGROUNDS
        else:
            assert a.background == o.background and a.captions == o.captions
        changed += not np.array_equal(a.image, o.image)
    assert changed == 3
    assert not np.array_equal(w1.scene("test", 0).image, w1.replace(seed=3).scene("test", 0).image)


def _specs(size, rng):
    out = []
    for shape, color, cx, cy, r in (("star", "red", 16, 18, 11), ("ring", "blue", 46, 20, 9),
                                    ("triangle", "green", 20, 47, 10), ("cross", "yellow", 47, 47, 12)):
        out.append(ObjectSpec(shape, color, "large", cx * size / 64, cy * size / 64, r * size / 64,
                              jitter_color(color, rng)))
    return out


@pytest.mark.parametrize("domain", [d for d in ALL if DOMAINS.meta(d)["family"] in PIXEL_FAMILIES])
def test_style_and_lighting_masks_and_boxes_agree_with_the_pixels(domain, monkeypatch):
    w = ShapesWorld(seed=1, antialias=False, domain=domain)
    for index, bg in enumerate(("plain", "gradient", "stripes")):
        specs = _specs(64, np.random.default_rng(index))
        scene = w.compose(specs, bg, np.random.default_rng(index), split="test", index=index)
        with monkeypatch.context() as m:  # the same scene without its objects (which have no caption)
            m.setattr("cliplab.data.shapes.world.make_captions", lambda *args: [])
            empty = w.compose([], bg, np.random.default_rng(index), split="test", index=index)
        diff = np.abs(scene.image.astype(int) - empty.image.astype(int)).max(-1) > 0  # (H, W)
        union = np.logical_or.reduce([o.mask for o in scene.objects])
        assert not (diff & ~union).any()  # nothing drawn outside the masks
        for o in scene.objects:
            ys, xs = np.nonzero(diff & o.mask)
            assert o.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)  # box of the drawn pixels
            if domain != "outline":  # outline leaves the background inside its stroke
                assert (diff & o.mask).sum() >= 0.9 * o.mask.sum()


@pytest.mark.parametrize("domain", ["textured", "low-contrast", "clutter", "new-backgrounds", "backlit",
                                    "noise-3", "blur-5", "jpeg-5", "pixelate-5", "haze-5"])
def test_pixel_domains_keep_the_original_masks(domain):
    base = ShapesWorld(seed=5)
    for i in range(4):
        a, o = base.replace(domain=domain).scene("train", i), base.scene("train", i)
        assert [x.box for x in a.objects] == [x.box for x in o.objects]
        assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.objects, o.objects))


def test_occluders_leave_the_masks():
    base = ShapesWorld(seed=6, n_objects=(1, 3))
    occluded = base.replace(domain="occluded")
    hidden_total = 0
    for i in range(12):
        a, o = occluded.scene("test", i), base.scene("test", i)
        for x, y in zip(a.objects, o.objects):
            assert not (x.mask & ~y.mask).any()  # visible part of the original region
            assert x.mask.sum() >= 0.5 * y.mask.sum()  # at most half hidden
            hidden = y.mask & ~x.mask
            hidden_total += hidden.sum()
            # hidden pixels show the occluder, not the object
            assert (np.abs(a.image[hidden].astype(int) - o.image[hidden].astype(int)).max(-1) > 0).all()
            ys, xs = np.nonzero(x.mask)
            assert x.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert hidden_total > 0


def test_config_replace_and_errors():
    assert "domain" not in ShapesWorld().config()  # the original domain's manifests are unchanged
    w = ShapesWorld(seed=1, domain="blur-2")
    assert w.config()["domain"] == "blur-2" and ShapesWorld(**w.config()).domain == "blur-2"
    assert w.replace(seed=2).domain == "blur-2" and w.replace(domain=None).domain is None
    assert "blur-2" in repr(w)
    with pytest.raises(UsageError, match="unknown ShapesWorld domain 'blur-9'.*noise"):
        ShapesWorld(domain="blur-9")


def test_dataset_spec_with_a_domain():
    shifted = load_dataset("shapes:color-shape@color-cast", "test", n=6)
    plain = load_dataset("shapes:color-shape", "test", n=6)
    assert shifted.name == "shapes:color-shape@color-cast" and shifted.meta["world"]["domain"] == "color-cast"
    assert list(shifted.labels) == list(plain.labels) and shifted.classnames == plain.classnames
    assert not np.array_equal(shifted.items[0], plain.items[0])
    world = ShapesWorld(**shifted.meta["world"])
    assert np.array_equal(world.scene("test", 0).image, shifted.items[0])
    retrieval = load_dataset("shapes:retrieval@occluded", "test", n=2)
    assert retrieval.name == "shapes:retrieval@occluded"
    for bad, msg in (("shapes:color-shape@nope", "unknown ShapesWorld domain 'nope'"),
                     ("shapes:color-shape@", "name a domain after '@'"),
                     ("shapes:nope@blur-1", "unknown ShapesWorld task 'nope'")):
        with pytest.raises(UsageError, match=msg) as err:
            load_dataset(bad, "test", n=2)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("fmt", ["folder", "csv", "jsonl", "wds", "coco"])
def test_export_every_format_in_a_domain(tmp_path, fmt):
    task = "detection" if fmt == "coco" else "color-shape"
    result = export("shapes-tiny", tmp_path, n=3, task=task, fmt=fmt, domain="occluded", progress=False)
    manifest = json.loads((tmp_path / "shapesworld.json").read_text())
    assert manifest["world"]["domain"] == "occluded" and result.n_images == 3
    if fmt == "coco":
        world = ShapesWorld(**manifest["world"])
        coco = json.loads((tmp_path / "annotations.json").read_text())
        for ann in coco["annotations"]:
            image = coco["images"][ann["image_id"] - 1]
            index = int(image["file_name"].rsplit("_", 1)[1].split(".")[0])
            masks = [o.mask for o in world.scene("test", index).objects]
            assert any(np.array_equal(rle_decode(ann["segmentation"]), m) for m in masks)


def test_cli_export_with_a_domain_and_a_bad_one(tmp_path, capsys):
    assert main(["shapes", "export", str(tmp_path / "out"), "--n", "2", "--format", "jsonl", "--domain",
                 "pixelate-4", "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "out" / "shapesworld.json").read_text())
    assert manifest["world"]["domain"] == "pixelate-4"
    capsys.readouterr()
    assert main(["shapes", "export", str(tmp_path / "bad"), "--n", "2", "--domain", "blurry"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown ShapesWorld domain 'blurry'" in err
