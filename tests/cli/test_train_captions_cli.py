"""`cliplab train --captions/--rewrites`: the data-side methods from the command line."""

import json

import pytest

from cliplab.cli.main import main

from _tiny import TINY_CFG


def _rows(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def test_rewrites_train_on_a_caption_table(tmp_path, capsys):
    root = tmp_path / "data"
    assert main(["shapes", "export", str(root), "--n", "8", "--task", "captions", "--format", "csv"]) == 0
    table = next(root.glob("*.csv"))
    cfg = tmp_path / "model.json"
    cfg.write_text(json.dumps({"model_cfg": TINY_CFG}))
    out = tmp_path / "run"
    assert main(["train", "--data", str(table), "--model-config", str(cfg), "--rewrites", "2", "--steps", "1",
                 "--batch-size", "4", "--out", str(out), "--ckpt-every", "0"]) == 0
    assert [r["step"] for r in _rows(out)] == [1]
    assert main(["captions", "rewrite", str(table), "--out", str(tmp_path / "rw.jsonl"), "-n", "2"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "rw.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(len(r["caption"]) > 1 for r in rows)


def test_filtered_captions_get_the_bundled_clipscore_scorer():
    from argparse import Namespace

    from cliplab.cli.train import _recipe_options
    from cliplab.dense.misalignment import ClipScorer

    args = Namespace(captions="filtered", rewrites=None, pool=32, keep_fraction=0.5, filter_threshold=None,
                     filter_model="shapes-tiny", device=None)
    opts = _recipe_options(args, "shapes-tiny")
    assert isinstance(opts.pop("scorer"), ClipScorer)
    assert opts == {"captions": "filtered", "pool": 32, "keep_fraction": 0.5}


def test_caption_options_are_checked(tmp_path, capsys):
    cfg = tmp_path / "model.json"
    cfg.write_text(json.dumps({"model_cfg": TINY_CFG}))
    (tmp_path / "t.csv").write_text("filepath,caption\na.png,a red star\n")
    assert main(["train", "--data", str(tmp_path / "t.csv"), "--model-config", str(cfg), "--captions", "noisy",
                 "--steps", "1"]) == 2
    assert "--captions" in capsys.readouterr().err
    assert main(["train", "--recipe", "shapes-tiny", "--captions", "noisy", "--keep-fraction", "0.5",
                 "--steps", "1"]) == 2
    assert "filtered" in capsys.readouterr().err
