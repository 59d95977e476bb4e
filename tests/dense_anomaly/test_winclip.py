"""WinCLIP / WinCLIP+ mechanics, the MVTec-style folder reader and ``cliplab anomaly``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cliplab.cli.main import main
from cliplab.data.anomaly_folder import read_anomaly_folder
from cliplab.data.shapes import ShapesWorld
from cliplab.data.shapes.world import ObjectSpec, jitter_color
from cliplab.dense.anomaly import ANOMALY_METHODS
from cliplab.dense.anomaly import winclip as wc


def test_windows_and_harmonic_aggregation_by_hand():
    np.testing.assert_array_equal(wc.window_indices(3, 2), [[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7], [4, 5, 7, 8]])
    assert wc.window_indices(15, 3).shape == (13 * 13, 9)
    scores = np.array([[0.5, 0.25, 1.0, 0.5]])                      # the four 2x2 windows of a 3x3 grid
    m = wc.harmonic_patch_map(scores, wc.window_indices(3, 2), 9)
    # corner patch 0: window 0 only; centre patch 4: all four -> 4 / (2 + 4 + 1 + 2)
    np.testing.assert_allclose(m[0, [0, 2, 6, 8, 4]], [0.5, 0.25, 1.0, 0.5, 4 / 9])
    np.testing.assert_allclose(m[0, 1], 2 / (2 + 4))                # patch 1: windows 0 and 1


def test_a_window_over_the_whole_grid_is_the_image_embedding(tiny, monkeypatch):
    images = [ShapesWorld(seed=0, image_size=32).scene("test", i).image for i in range(3)]
    monkeypatch.setattr(wc, "SCALES", (4,))                          # the tiny model has a 4 x 4 grid
    whole, windows, grid = wc.WinCLIP(tiny).embeddings(images)
    assert grid == 4 and windows[4].shape[1] == 1 and windows[1].shape[1] == 16
    np.testing.assert_allclose(windows[4][:, 0], whole, atol=1e-5)
    np.testing.assert_allclose(whole, tiny.encode_images(images).features, atol=1e-5)


def test_predict_shapes_and_few_shot_memory(tiny):
    world = ShapesWorld(seed=0, image_size=32, defect_rate=1.0)
    images = [world.scene("test", i).image for i in range(3)]
    zero_shot = ANOMALY_METHODS.get("winclip")(tiny, category="shape")
    res = zero_shot.predict(images)
    assert res.scores.shape == (3,) and res.maps.shape == (3, 32, 32)
    assert ((res.scores > 0) & (res.scores < 1)).all() and (res.maps > 0).all()
    plus = ANOMALY_METHODS.get("winclip+")(tiny, category="shape")
    plus._text = zero_shot.text_embeddings()                       # the same prompts: encode them once
    with pytest.raises(ValueError, match="not fitted"):
        plus.predict(images)
    same = plus.fit(images).predict(images)                        # its own references: few-shot distance 0
    np.testing.assert_allclose(same.scores, 0.5 * res.scores, atol=1e-5)
    np.testing.assert_allclose(same.maps, 0.5 * res.maps, atol=1e-5)


def write_folder(root, categories=(("red", "circle"), ("blue", "star")), n=2, size=32):
    """A small MVTec-style folder of ShapesWorld inspection scenes (one object per category)."""
    world = ShapesWorld(seed=0, image_size=size, defect_rate=1.0)
    for c, (color, shape) in enumerate(categories):
        cat = root / f"{color}_{shape}"
        for split, defective in (("train", False), ("test", False), ("test", True)):
            for i in range(n):
                rng = np.random.default_rng([c, split == "test", defective, i])
                spec = ObjectSpec(shape, color, "large", size / 2, size / 2, size * 0.28, jitter_color(color, rng))
                scene = world.compose([spec], "plain", rng, np.random.default_rng([c, i]) if defective else None)
                kind = scene.defects[0]["kind"] if defective else "good"
                (cat / split / kind).mkdir(parents=True, exist_ok=True)
                Image.fromarray(scene.image).save(cat / split / kind / f"{i}.png")
                if defective:
                    (cat / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
                    Image.fromarray(np.uint8(scene.defects[0]["mask"]) * 255).save(
                        cat / "ground_truth" / kind / f"{i}_mask.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("mvtec-style"))


def test_read_anomaly_folder(folder, tmp_path):
    cats = read_anomaly_folder(folder)
    assert [c.name for c in cats] == ["blue_star", "red_circle"]
    c = cats[0]
    assert len(c.train) == 2 and c.labels.tolist().count(1) == 2 and c.labels.tolist().count(0) == 2
    for path, label, mask in zip(c.test, c.labels, c.masks):
        assert (mask is None) == (label == 0)
        if mask is not None:
            assert mask.name == f"{path.stem}_mask.png" and mask.parent.name == path.parent.name
    assert [x.name for x in read_anomaly_folder(folder / "red_circle")] == ["red_circle"]   # one category


def test_anomaly_cli_on_an_mvtec_style_folder(folder, tiny_dir, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    rc = main(["anomaly", str(folder), "--method", "winclip+", "--shots", "1", "--model", str(tiny_dir),
               "--category", "blue_star", "--out", str(out), "--maps", str(tmp_path / "maps"), "--format", "json"])
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["category"] for r in rows] == ["blue_star", "mean"]
    res = json.loads(out.read_text())["results"]
    assert res["blue_star"]["n_test"] == 4 and res["blue_star"]["shots"] == 1
    for key in ("image_auroc", "image_ap", "pixel_auroc", "pixel_aupro"):
        assert 0 <= res["blue_star"][key] <= 1 and res["mean"][key] == res["blue_star"][key]
    assert len(list((tmp_path / "maps" / "blue_star").rglob("*.png"))) == 4


@pytest.mark.parametrize("argv, code, msg", [
    (["anomaly", "{tmp}/nowhere"], 2, "no such folder"),
    (["anomaly", "{tmp}"], 4, "no category folder"),
    (["anomaly", "{folder}", "--category", "green_ring"], 4, "no category 'green_ring'"),
    (["anomaly", "{folder}", "--method", "winclip+"], 2, "--shots"),
    (["anomaly", "{folder}", "--method", "winclip+", "--shots", "5"], 2, "train/good has 2"),
])
def test_anomaly_cli_errors_are_one_line(folder, tiny_dir, tmp_path, capsys, argv, code, msg):
    rc = main([a.format(tmp=tmp_path, folder=folder) for a in argv] + ["--model", str(tiny_dir)])
    err = capsys.readouterr().err
    assert rc == code and msg in err and len(err.strip().splitlines()) == 1
