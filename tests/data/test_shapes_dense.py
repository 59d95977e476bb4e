"""Dense ShapesWorld scenes: determinism, class maps and boxes that agree with the pixels, COCO and mask exports."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cliplab.cli.main import main
from cliplab.data.datasets import DetectionData, SegmentationData, load_dataset
from cliplab.data.shapes import SHAPES, export, shapes_tiny_world
from cliplab.data.shapes.dense import (
    CLASS_IDS,
    CLASSNAMES,
    DENSE_OBJECTS,
    IGNORE_INDEX,
    MIN_VISIBLE,
    dense_scene,
    dense_world,
)
from cliplab.data.shapes import render
from cliplab.data.shapes.render import PALETTE
from cliplab.errors import UsageError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")

WORLD = dense_world(image_size=128)  # shapes-tiny, 3-12 objects, smaller images to stay fast


def _tight_box(mask):
    ys, xs = np.nonzero(mask)
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def test_class_ids_are_fixed():
    assert CLASSNAMES[0] == "background" and IGNORE_INDEX == 255
    assert all(CLASS_IDS[s] == SHAPES.index(s) + 1 for s in SHAPES)
    w = dense_world()
    assert w.image_size == 256 and w.n_objects == DENSE_OBJECTS == (3, 12)


def test_same_seed_same_bytes():
    other = dense_world(image_size=128)
    for split, i in (("train", 0), ("test", 5), ("val", 999)):
        a, b = dense_scene(WORLD, split, i), dense_scene(other, split, i)
        assert a.image.tobytes() == b.image.tobytes() and a.class_map.tobytes() == b.class_map.tobytes()
        assert a.captions == b.captions and [o.box for o in a.objects] == [o.box for o in b.objects]
    assert dense_scene(WORLD, "test", 0).image.tobytes() != dense_scene(WORLD, "test", 1).image.tobytes()
    reseeded = dense_world(shapes_tiny_world(1), image_size=128)
    assert dense_scene(reseeded, "test", 0).image.tobytes() != dense_scene(WORLD, "test", 0).image.tobytes()


def test_dense_scenes_are_dense_and_overlap():
    counts, overlaps = [], 0
    for i in range(40):
        s = dense_scene(WORLD, "test", i)
        counts.append(len(s.objects))
        overlaps += sum(1 for j, a in enumerate(s.specs) for b in s.specs[j + 1:]
                        if np.hypot(a.cx - b.cx, a.cy - b.cy) < a.r + b.r)
        for o in s.objects:  # no hidden object in the ground truth
            assert o.mask.sum() > 0
    assert min(counts) >= 1 and max(counts) <= 12 and max(counts) >= 10 and np.mean(counts) > 5
    assert overlaps > 20


@pytest.mark.parametrize("antialias", [False, True])
def test_class_map_agrees_with_masks_and_pixels(antialias):
    world = WORLD.replace(antialias=antialias)
    for i in range(12):
        s = dense_scene(world, "test", i)
        cm = s.class_map
        assert cm.dtype == np.uint8 and cm.shape == s.image.shape[:2]
        masks = np.stack([o.mask for o in s.objects])  # (K, H, W)
        assert masks.sum(0).max() <= 1  # disjoint
        valid = cm != IGNORE_INDEX
        expected = np.zeros_like(cm)
        for o in s.objects:
            expected[o.mask] = CLASS_IDS[o.shape]
        np.testing.assert_array_equal(cm[valid], expected[valid])
        if not antialias:
            assert valid.all()
        else:
            assert 0 < (~valid).mean() < 0.2
        for o, spec in zip(s.objects, s.specs):
            assert o.shape == spec.shape and o.color == spec.color
            pix = s.image[o.mask & valid]  # (P, 3) every scored pixel has the object's fill colour
            assert len(pix) > 0
            np.testing.assert_array_equal(pix, np.broadcast_to(np.floor(spec.rgb + 0.5), pix.shape))
            assert np.abs(spec.rgb - np.asarray(PALETTE[o.color])).max() <= 24.5
        bg = cm == 0
        if s.background == "plain" and bg.any():  # background pixels carry no object colour
            assert len(np.unique(s.image[bg].reshape(-1, 3), axis=0)) == 1


def test_boxes_are_tight_and_objects_visible():
    for i in range(12):
        s = dense_scene(WORLD, "train", i)
        for o, spec in zip(s.objects, s.specs):
            assert o.box == _tight_box(o.mask)
            window, alpha = render.coverage(spec.shape, spec.cx, spec.cy, spec.r, 128, True)
            assert o.mask.sum() >= MIN_VISIBLE * (alpha >= 0.5).sum() - 1


def test_held_out_pairs_and_ood_shapes_stay_out():
    heldout = set(WORLD.heldout)
    seen = set()
    for i in range(40):
        for split in ("train", "val"):
            for o in dense_scene(WORLD, split, i).objects:
                assert (o.color, o.shape) not in heldout and o.shape not in WORLD.ood_shapes
        seen |= {(o.color, o.shape) for o in dense_scene(WORLD, "test", i).objects}
    assert seen & heldout  # the test split does draw held-out pairs
    assert all(o.shape in WORLD.ood_shapes for o in dense_scene(WORLD, "ood", 0).objects)


def test_seg_and_det_datasets():
    seg = load_dataset("shapes:seg", "val", n=3)
    assert isinstance(seg, SegmentationData) and seg.kind == "segmentation" and len(seg) == 3
    assert seg.classnames == list(CLASSNAMES) and seg.ignore_index == 255
    assert seg.meta["classes"] == ["background", *shapes_tiny_world().shapes_of("val")]
    s = dense_scene(dense_world(), "val", 2)
    assert np.array_equal(seg.items[2], s.image) and np.array_equal(seg.masks[2], s.class_map)
    sub = seg.subset([2, 0])
    assert np.array_equal(sub.masks[0], s.class_map) and len(sub) == 2

    det = load_dataset("shapes:det", "val", n=3)
    assert isinstance(det, DetectionData) and det.kind == "detection" and det.classnames == list(SHAPES)
    assert det.boxes[2].shape == (len(s.objects), 4) and det.boxes[2].dtype == np.float32
    np.testing.assert_array_equal(det.boxes[2], np.asarray([o.box for o in s.objects], np.float32))
    assert [det.classnames[k] for k in det.labels[2]] == [o.shape for o in s.objects]
    with pytest.raises(UsageError, match="labels"):
        DetectionData([np.zeros((4, 4, 3), np.uint8)], [[[0, 0, 1, 1]]], [[11]], list(SHAPES), "x")
    with pytest.raises(UsageError, match="class maps"):
        SegmentationData([np.zeros((4, 4, 3), np.uint8)], [], ["background"], "x")


def test_eval_refuses_dense_data_with_one_line(capsys):
    rc = main(["eval", "--task", "zeroshot_classification", "--dataset", "shapes:seg", "--no-cache"])
    err = capsys.readouterr().err
    assert rc == 2 and "needs a classification dataset" in err and "segmentation" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_coco_export_read_back_by_pycocotools(tmp_path):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    n = 5
    res = export(WORLD, tmp_path, n=n, split="test", task="det", fmt="coco", progress=False)
    coco = COCO(str(res.index_file))
    assert sorted(coco.getImgIds()) == list(range(1, n + 1))
    assert {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())} == {CLASS_IDS[s]: s for s in SHAPES}
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        s = dense_scene(WORLD, "test", image_id - 1)
        assert np.array_equal(np.asarray(Image.open(tmp_path / info["file_name"])), s.image)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert len(anns) == len(s.objects)
        for ann, o in zip(anns, s.objects):
            assert ann["category_id"] == CLASS_IDS[o.shape]
            m = coco.annToMask(ann).astype(bool)
            assert np.array_equal(m, o.mask)
            x0, y0, x1, y1 = o.box
            assert ann["bbox"] == [x0, y0, x1 - x0, y1 - y0]
            assert list(mask_utils.toBbox(coco.annToRLE(ann))) == ann["bbox"]
            assert ann["area"] == int(o.mask.sum())

    results = []  # the ground truth as detections: AP must be 1
    for ann in coco.loadAnns(coco.getAnnIds()):
        rle = coco.annToRLE(ann)
        rle["counts"] = rle["counts"].decode("ascii")
        results.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": ann["bbox"],
                        "segmentation": rle, "score": 1.0})
    for iou_type in ("bbox", "segm"):
        dt = coco.loadRes([dict(r) for r in results])
        ev = COCOeval(coco, dt, iou_type)
        ev.params.useCats = 1
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        assert ev.stats[0] == pytest.approx(1.0) and ev.stats[1] == pytest.approx(1.0)


def test_mask_png_export(tmp_path):
    n = 4
    res = export(WORLD, tmp_path, n=n, split="val", task="seg", fmt="masks", progress=False)
    manifest = json.loads((tmp_path / "shapesworld.json").read_text())
    assert manifest["classes"] == list(CLASSNAMES) == res.classes and manifest["ignore_index"] == 255
    files = sorted((tmp_path / "masks").glob("*.png"))
    assert [f.name for f in files] == sorted(f.name for f in (tmp_path / "images").glob("*.png"))
    assert len(files) == n
    for i, f in enumerate(files):
        png = Image.open(f)
        assert png.mode == "L"
        s = dense_scene(WORLD, "val", i)
        assert np.array_equal(np.asarray(png), s.class_map)
        assert np.array_equal(np.asarray(Image.open(tmp_path / "images" / f.name)), s.image)
    with pytest.raises(UsageError, match="masks"):
        export(WORLD, tmp_path / "x", n=1, task="det", fmt="masks")


@pytest.mark.parametrize("task, fmt", [("seg", "masks"), ("det", "coco")])
def test_exports_are_byte_identical(tmp_path, task, fmt):
    for d in ("a", "b"):
        export(dense_world(image_size=64), tmp_path / d, n=3, task=task, fmt=fmt, progress=False)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) >= 4
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)


def test_cli_export_dense(tmp_path, capsys):
    rc = main(["shapes", "export", str(tmp_path), "--task", "seg", "--format", "coco", "--n", "2",
               "--image-size", "96", "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    coco = json.loads((tmp_path / "annotations.json").read_text())
    assert coco["images"][0]["width"] == 96 and len(coco["images"]) == 2
    world = dense_world(image_size=96)
    assert len(coco["annotations"]) == sum(len(dense_scene(world, "test", i).objects) for i in range(2))
    assert main(["shapes", "export", str(tmp_path / "b"), "--task", "det", "--format", "masks", "--n", "1"]) == 2
