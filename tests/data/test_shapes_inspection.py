"""Inspection scenes: determinism, consistent normal instances, defect masks, MVTec AD folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cliplab.cli.main import main
from cliplab.data.datasets import AnomalyData, load_dataset
from cliplab.data.shapes import SHAPES, export
from cliplab.data.shapes.inspection import (
    CATEGORIES,
    INSPECTION_DEFECTS,
    SURFACES,
    InspectionWorld,
    inspection_scene,
    mvtec_test_items,
    surface,
)
from cliplab.data.shapes.render import PALETTE
from cliplab.errors import DataError, UsageError

S = 96
WORLD = InspectionWorld(seed=0, image_size=S)


def test_categories_and_defects():
    assert set(CATEGORIES) == set(SHAPES) and {c.surface for c in CATEGORIES.values()} == set(SURFACES)
    assert INSPECTION_DEFECTS == ("scratch", "hole", "stain", "missing_part", "wrong_color", "misplaced")
    for kind in SURFACES:  # textured: not flat, and seeded
        a = surface(kind, 64, np.random.default_rng(3))
        assert a.shape == (64, 64, 3) and a.std() > 2
        assert np.array_equal(a, surface(kind, 64, np.random.default_rng(3)))


def test_same_seed_same_bytes_and_splits_apart():
    other = InspectionWorld(seed=0, image_size=S)
    for args in (("star", "train", 0, None), ("ring", "test", 3, "hole"), ("cross", "test", 1, "misplaced")):
        a, b = WORLD.scene(*args), other.scene(*args)
        assert a.image.tobytes() == b.image.tobytes() and a.mask.tobytes() == b.mask.tobytes()
    assert InspectionWorld(seed=1, image_size=S).scene("star", "train", 0).image.tobytes() != \
        WORLD.scene("star", "train", 0).image.tobytes()
    train = {WORLD.scene("circle", "train", i).image.tobytes() for i in range(10)}
    val = {WORLD.scene("circle", "val", i).image.tobytes() for i in range(10)}
    test = {WORLD.scene("circle", "test", i).image.tobytes() for i in range(10)}
    assert len(train) == len(val) == len(test) == 10 and not (train & test) and not (train & val) and not (val & test)
    for split in ("train", "val"):  # held-out splits: defects only in test
        with pytest.raises(UsageError, match="only in the test split"):
            WORLD.scene("circle", split, 0, "scratch")
    with pytest.raises(UsageError, match="unknown defect"):
        WORLD.scene("circle", "test", 0, "dent")
    with pytest.raises(UsageError, match="unknown inspection category"):
        WORLD.scene("bottle", "test", 0)


def test_normal_instances_are_consistent():
    for name in ("circle", "star", "ring"):
        cat = CATEGORIES[name]
        scenes = [WORLD.scene(name, "train", i) for i in range(8)]
        boxes = np.array([s.box for s in scenes], float)
        assert np.ptp(boxes, axis=0).max() <= 0.1 * S  # position and size in a narrow range
        for s in scenes:
            assert not s.mask.any() and s.defect == "good" and not s.is_anomalous
            pix = s.image[s.object_mask].astype(float)  # (P, 3)
            assert np.abs(np.median(pix, 0) - np.asarray(PALETTE[cat.color])).max() < 20


@pytest.mark.parametrize("defect", INSPECTION_DEFECTS)
def test_defect_masks_mark_what_changed(defect):
    for name in ("circle", "square", "ring", "cross"):
        s = WORLD.scene(name, "test", 2, defect)
        good = WORLD.scene(name, "test", 2)
        assert s.is_anomalous and s.defect == defect and s.mask.dtype == bool
        assert s.mask.sum() >= 4
        cat = CATEGORIES[name]
        if defect in ("scratch", "hole", "stain"):  # on the object, and the pixels differ from the object colour
            nominal = s.object_mask
            assert (s.mask & ~nominal).sum() == 0
            diff = np.abs(s.image[s.mask].astype(float) - np.asarray(PALETTE[cat.color])).max(1)
            assert np.median(diff) > 40
        elif defect == "missing_part":
            assert (s.mask & s.object_mask).sum() == 0  # the removed pixels are not object any more
            assert s.object_mask.sum() < good.object_mask.sum()
        elif defect == "wrong_color":
            assert np.array_equal(s.mask, s.object_mask)
            diff = np.abs(np.median(s.image[s.mask].astype(float), 0) - np.asarray(PALETTE[cat.color])).max()
            assert diff > 60
        else:  # misplaced: the object left its normal place
            assert s.mask.sum() > 0.5 * s.object_mask.sum()
            cy, cx = (np.argwhere(s.object_mask).mean(0))
            assert np.hypot(cx - S / 2, cy - S / 2) > 0.1 * S


def test_inspection_dataset():
    data = load_dataset("shapes:inspection", "test", n=28)
    assert isinstance(data, AnomalyData) and data.kind == "anomaly" and len(data) == 28
    C = len(CATEGORIES)
    assert data.categories[:C] == list(CATEGORIES) and data.defects[:C] == ["good"] * C
    assert data.defects[C:2 * C] == ["scratch"] * C and set(data.labels[C:].tolist()) == {1}
    for i in (0, C, 2 * C + 3):
        s = inspection_scene(data.categories[i], "test", 0, data.defects[i])
        assert np.array_equal(data.items[i], s.image) and np.array_equal(data.masks[i], s.mask)
    train = load_dataset("shapes:inspection", "train", n=12)
    assert set(train.defects) == {"good"} and not train.labels.any()
    sub = data.subset([C, 0])
    assert sub.defects == ["scratch", "good"] and sub.labels.tolist() == [1, 0]


def test_mvtec_export_layout_and_masks(tmp_path):
    world = InspectionWorld(seed=0, image_size=64, categories=["star", "ring"])
    res = export(world, tmp_path, n=3, task="inspection", fmt="mvtec", n_test=2, progress=False)
    assert res.n_images == 2 * (3 + 7 * 2) and res.classes == ["star", "ring"]
    assert json.loads((tmp_path / "shapesworld.json").read_text())["n_test"] == 2
    for cat in ("star", "ring"):
        root = tmp_path / cat
        assert sorted(p.name for p in root.iterdir()) == ["ground_truth", "test", "train"]
        assert sorted(p.name for p in (root / "train").iterdir()) == ["good"]
        assert sorted(p.name for p in (root / "test").iterdir()) == sorted(["good", *INSPECTION_DEFECTS])
        assert sorted(p.name for p in (root / "ground_truth").iterdir()) == sorted(INSPECTION_DEFECTS)
        assert [p.name for p in sorted((root / "train" / "good").iterdir())] == ["000.png", "001.png", "002.png"]
        # read it as MVTec AD readers do: test/<defect>/<stem>.png + ground_truth/<defect>/<stem>_mask.png
        for path in sorted((root / "test").glob("*/*.png")):
            kind, index = path.parent.name, int(path.stem)
            s = world.scene(cat, "test", index, kind)
            assert np.array_equal(np.asarray(Image.open(path)), s.image)
            mask_path = root / "ground_truth" / kind / f"{path.stem}_mask.png"
            assert mask_path.exists() == (kind != "good")
            if kind != "good":
                m = np.asarray(Image.open(mask_path))
                assert m.dtype == np.uint8 and m.shape == (64, 64) and set(np.unique(m)) <= {0, 255}
                assert np.array_equal(m == 255, s.mask) and m.any()
        assert len(list((root / "test").glob("*/*.png"))) == len(mvtec_test_items(2))
        for path in (root / "train" / "good").glob("*.png"):
            assert np.array_equal(np.asarray(Image.open(path)), world.scene(cat, "train", int(path.stem)).image)
    with pytest.raises(UsageError, match="mvtec"):
        export(world, tmp_path / "x", n=1, task="inspection", fmt="coco")

    # read back by cliplab's MVTec reader: one category, then the whole export
    star = load_dataset(tmp_path / "star", "test")
    assert isinstance(star, AnomalyData) and len(star) == 14 and set(star.categories) == {"star"}
    for i in range(len(star)):
        s = world.scene("star", "test", int(star.items[i].stem), star.defects[i])
        assert star.labels[i] == int(s.is_anomalous)
        assert np.array_equal(star.mask(i), s.mask)
    both = load_dataset(tmp_path, "train")
    assert both.categories == ["ring"] * 3 + ["star"] * 3 and not both.labels.any()
    assert not both.mask(0).any() and both.mask(0).shape == (64, 64)
    (tmp_path / "ring" / "ground_truth" / "hole" / "000_mask.png").unlink()
    ring = load_dataset(tmp_path / "ring", "test")
    assert len(ring) == 13 and len(ring.skipped) == 1 and "no ground-truth mask" in ring.skipped[0].reason
    with pytest.raises(DataError, match="train and a test split"):
        load_dataset(tmp_path, "val")


def test_mvtec_export_is_byte_identical(tmp_path):
    for d in ("a", "b"):
        export(InspectionWorld(seed=2, image_size=48, categories=["heart"]), tmp_path / d, n=1,
               task="inspection", fmt="mvtec", n_test=1, progress=False)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files) == 1 + 7 + 6
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)


def test_cli_export_mvtec(tmp_path, capsys):
    rc = main(["shapes", "export", str(tmp_path), "--task", "inspection", "--format", "mvtec", "--n", "1",
               "--n-test", "1", "--categories", "circle", "--image-size", "48", "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "8 train+test scenes" in out
    m = np.asarray(Image.open(tmp_path / "circle" / "ground_truth" / "hole" / "000_mask.png"))
    assert np.array_equal(m == 255, inspection_scene("circle", "test", 0, "hole", image_size=48).mask)
    assert main(["shapes", "export", str(tmp_path / "b"), "--task", "seg", "--n-test", "1", "--n", "1"]) == 2
    assert main(["shapes", "export", str(tmp_path / "c"), "--task", "inspection", "--format", "mvtec",
                 "--n", "1", "--categories", "bottle"]) == 2
