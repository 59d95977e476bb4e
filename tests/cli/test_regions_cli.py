"""``cliplab regions``: train a CLOC Prompter and classify the boxes of a table."""

import json

import numpy as np
from PIL import Image

from cliplab.cli.main import main


def _table(tmp_path):
    img = np.full((64, 64, 3), 200, np.uint8)
    img[8:30, 8:30] = (220, 30, 30)
    img[36:60, 36:60] = (30, 30, 220)
    Image.fromarray(img).save(tmp_path / "scene.png")
    (tmp_path / "boxes.csv").write_text("image,x0,y0,x1,y1\nscene.png,8,8,30,30\nscene.png,36,36,60,60\n")
    return tmp_path / "boxes.csv"


def test_train_then_classify_and_the_crop_baseline(tiny_dir, tmp_path, capsys):
    table = _table(tmp_path)
    assert main(["regions", "train", "--out", str(tmp_path / "run"), "--steps", "2", "--scenes", "4",
                 "--model", str(tiny_dir)]) == 0
    assert (tmp_path / "run" / "prompter").is_dir()
    capsys.readouterr()
    for how in (["--prompter", str(tmp_path / "run" / "prompter")], ["--baseline", "crop"]):
        assert main(["regions", "classify", "--boxes", str(table), "--labels", "red square,blue square", *how,
                     "--model", str(tiny_dir), "--format", "json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert [r["x0"] for r in rows] == [8, 36]
        assert all(r["label"] in ("red square", "blue square") and 0.5 <= r["score"] <= 1 for r in rows)


def test_bad_tables_are_one_line(tiny_dir, tmp_path, capsys):
    _table(tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text("image,x0,y0,x1,y1\nscene.png,30,8,8,30\n")
    rc = main(["regions", "classify", "--boxes", str(bad), "--labels", "a,b", "--baseline", "crop",
               "--model", str(tiny_dir)])
    err = capsys.readouterr().err
    assert rc == 4 and "empty box" in err and len(err.strip().splitlines()) == 1
    rc = main(["regions", "classify", "--boxes", str(tmp_path / "boxes.csv"), "--labels", "a,b",
               "--model", str(tiny_dir)])
    err = capsys.readouterr().err
    assert rc == 2 and "--prompter DIR or --baseline crop" in err
