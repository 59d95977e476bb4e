"""`cliplab train --data` on a caption table exported by `cliplab shapes export`, end to end."""

import json

import numpy as np

import cliplab
from cliplab.cli.main import main

from _tiny import TINY_CFG


def test_export_then_train_on_the_csv_then_load(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["shapes", "export", str(data), "--n", "24", "--task", "captions", "--format", "csv"]) == 0
    table = next(data.glob("*.csv"))
    cfg = tmp_path / "model.json"
    cfg.write_text(json.dumps({"model_cfg": TINY_CFG}))
    out = tmp_path / "run"
    assert main(["train", "--data", str(table), "--model-config", str(cfg), "--steps", "3",
                 "--batch-size", "8", "--out", str(out), "--log-every", "1"]) == 0
    printed = capsys.readouterr().out
    assert "local-dir:" in printed
    ckpt = printed.split("--model ")[-1].strip()
    bb = cliplab.load(ckpt)                     # the printed spec works as --model
    assert bb.encode_texts(["a red star"]).shape == (1, 32)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)


def test_train_usage_errors(tmp_path, capsys):
    assert main(["train"]) == 2
    assert "--recipe" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "missing.csv"), "--model-config", "ViT-B-32"]) == 4
