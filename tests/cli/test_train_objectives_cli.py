"""`cliplab train --loss NAME` for the objectives beyond InfoNCE and SigLIP, end to end on tiny runs."""

import json

import numpy as np
import pytest

from cliplab.cli.main import main

from _tiny import TINY_CFG


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """A caption table of 24 ShapesWorld scenes and a tiny model config."""
    root = tmp_path_factory.mktemp("objectives")
    assert main(["shapes", "export", str(root / "data"), "--n", "24", "--task", "captions", "--format", "csv"]) == 0
    cfg = root / "model.json"
    cfg.write_text(json.dumps({"model_cfg": TINY_CFG}))
    return next((root / "data").glob("*.csv")), cfg


def _rows(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


@pytest.mark.parametrize("loss, start_scale", [("cloob", 14.3), ("hard-negatives", 50.0)])
def test_train_with_a_contrastive_objective(table, tmp_path, loss, start_scale):
    csv, cfg = table
    out = tmp_path / "run"
    assert main(["train", "--data", str(csv), "--model-config", str(cfg), "--loss", loss, "--steps", "2",
                 "--batch-size", "8", "--out", str(out), "--log-every", "1"]) == 0
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss_contrastive"]) for r in rows)
    if loss == "cloob":                                       # the reference's fixed inverse temperature
        assert [r["logit_scale"] for r in rows] == pytest.approx([14.3, 14.3], rel=1e-6)
    else:                                                     # learnable, from UniME's 50
        assert rows[0]["logit_scale"] == pytest.approx(start_scale, rel=1e-2)


def test_hqclip_trains_from_the_shapes_recipe(tmp_path, capsys, monkeypatch):
    from cliplab.train.recipes import ShapesZeroShot

    monkeypatch.setattr(ShapesZeroShot, "__call__", lambda self, model: {})  # validation is tested elsewhere
    out = tmp_path / "run"
    assert main(["train", "--recipe", "shapes-tiny", "--loss", "hqclip", "--steps", "2", "--batch-size", "8",
                 "--out", str(out), "--log-every", "1", "--eval-every", "1000"]) == 0
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["loss"] == pytest.approx(r["loss_contrastive"] + r["loss_tags"], rel=1e-6) for r in rows)
    assert "local-dir:" in capsys.readouterr().out


def test_hqclip_on_a_plain_caption_table_is_one_clear_error(table, tmp_path, capsys):
    csv, cfg = table
    assert main(["train", "--data", str(csv), "--model-config", str(cfg), "--loss", "hqclip", "--steps", "1",
                 "--batch-size", "8", "--out", str(tmp_path / "run")]) == 4
    err = capsys.readouterr().err
    assert "the 'hqclip' objective needs" in err and "Traceback" not in err
