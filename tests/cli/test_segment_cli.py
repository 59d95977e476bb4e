"""``cliplab segment``: class-index PNGs, overlays and a legend; one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cliplab.cli.main import main


@pytest.fixture()
def pictures(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "in"
    folder.mkdir()
    for name, shape in (("a.png", (48, 40, 3)), ("b.jpg", (32, 32, 3))):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / name)
    return folder


def test_round_trip_matches_the_library(tiny, tiny_dir, pictures, tmp_path, capsys):
    from cliplab.dense import segment

    out = tmp_path / "out"
    rc = main(["segment", str(pictures), "--labels", "cat,dog|puppy", "--background", "background",
               "--method", "clearclip", "--window", "32", "--stride", "16", "--templates", "default",
               "--model", str(tiny_dir), "--out", str(out)])
    assert rc == 0
    assert (out / "classes.txt").read_text().split("\n")[:3] == ["background", "cat", "dog"]
    assert (out / "legend.png").is_file()
    res = segment(tiny, [pictures / "a.png", pictures / "b.jpg"], ["cat", ["dog", "puppy"]], background="background",
                  method="clearclip", window=32, stride=16, templates="default")
    for stem, mask in zip(("a", "b"), res.masks):
        saved = np.asarray(Image.open(out / f"{stem}.png"))
        np.testing.assert_array_equal(saved, mask)
        assert Image.open(out / f"{stem}_overlay.png").size == mask.shape[::-1]
    assert "a.png" in capsys.readouterr().out


@pytest.mark.parametrize("argv, code, message", [
    (["--labels", "a,b", "--stride", "8"], 2, "--stride needs --window"),
    (["--labels", "a,b", "--window", "30"], 2, "multiple of the patch size"),
    (["--labels", " , "], 2, "no labels"),
    (["--labels", "a,b", "--prob-thd", "3"], 2, "prob_thd"),
])
def test_errors_are_one_line(tiny_dir, pictures, tmp_path, capsys, argv, code, message):
    rc = main(["segment", str(pictures), "--model", str(tiny_dir), "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == code and message in err and "\n" not in err and "Traceback" not in err


def test_unknown_method_is_a_usage_error(pictures, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["segment", str(pictures), "--labels", "a", "--method", "nope", "--out", str(tmp_path)])
    assert e.value.code == 2 and "nope" in capsys.readouterr().err
