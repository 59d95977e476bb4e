"""``cliplab detect``: COCO JSON that pycocotools reads back, drawn boxes, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cliplab.cli.main import main

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")


@pytest.fixture()
def pictures(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "in"
    folder.mkdir()
    for name, shape in (("a.png", (48, 40, 3)), ("b.jpg", (32, 32, 3))):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / name)
    return folder


def test_round_trip_read_back_by_pycocotools(tiny, tiny_dir, pictures, tmp_path, capsys):
    from pycocotools.coco import COCO

    from cliplab.dense.detect import detect

    out = tmp_path / "out"
    rc = main(["detect", str(pictures), "--labels", "cat,dog|puppy", "--proposals", "windows", "--nms", "hard",
               "--templates", "default", "--max-dets", "5", "--model", str(tiny_dir), "--out", str(out)])
    assert rc == 0
    gt = COCO(str(out / "coco.json"))
    res = gt.loadRes(str(out / "detections.json"))
    assert {c["name"] for c in gt.loadCats(gt.getCatIds())} == {"cat", "dog"}
    files = [pictures / "a.png", pictures / "b.jpg"]
    dets = detect(tiny, files, ["cat", ["dog", "puppy"]], method="windows", nms="hard", templates="default",
                  max_dets=5)
    for image_id, (f, det) in enumerate(zip(files, dets), start=1):
        info = gt.loadImgs(image_id)[0]
        assert info["file_name"] == str(f) and (info["height"], info["width"]) == Image.open(f).size[::-1]
        anns = res.loadAnns(res.getAnnIds(imgIds=image_id))
        assert len(anns) == len(det) == 5
        boxes = np.array([a["bbox"] for a in anns])                          # x, y, w, h
        np.testing.assert_allclose(boxes[:, :2] + boxes[:, 2:], det.boxes[:, 2:], atol=1e-4)
        np.testing.assert_allclose([a["score"] for a in anns], det.scores, atol=1e-6)
        assert [a["category_id"] - 1 for a in anns] == det.labels.tolist()
        assert Image.open(out / f"{f.stem}_boxes.png").size == Image.open(f).size
    assert json.loads((out / "detections.json").read_text())[0]["image_id"] == 1
    assert "a.png" in capsys.readouterr().out


@pytest.mark.parametrize("labels, code, message", [
    ("cat,cat", 2, "duplicate class names"),
    (" , ", 2, "no labels"),
])
def test_bad_labels_are_one_line(tiny_dir, pictures, tmp_path, capsys, labels, code, message):
    rc = main(["detect", str(pictures), "--labels", labels, "--proposals", "windows", "--model", str(tiny_dir),
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == code and message in err and "\n" not in err and "Traceback" not in err


def test_bad_images_are_one_line(tiny_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = main(["detect", str(empty), "--labels", "a,b", "--model", str(tiny_dir), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 4 and "no image files" in err and "\n" not in err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    rc = main(["detect", str(broken), "--labels", "a,b", "--proposals", "windows", "--model", str(tiny_dir),
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 4 and "broken.png" in err and "\n" not in err and "Traceback" not in err
    rc = main(["detect", str(broken), "--labels", "a,b", "--proposals", "rpn", "--model", str(tiny_dir),
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "unknown proposal method 'rpn'" in err and "\n" not in err
