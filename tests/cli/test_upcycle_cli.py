"""`cliplab upcycle` on a caption table: multiplet, upcycling, MoE training, a loadable model."""

import json

import numpy as np

import cliplab
from cliplab.cli.main import main
from cliplab.models.moe import moe_modules


def test_upcycle_a_model_on_a_caption_table_then_load(tiny_dir, tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["shapes", "export", str(data), "--n", "16", "--task", "captions", "--format", "csv"]) == 0
    table = next(data.glob("*.csv"))
    out = tmp_path / "run"
    assert main(["upcycle", "--model", str(tiny_dir), "--data", str(table), "--experts", "2", "--top-k", "1",
                 "--layers", "1", "--n-samples", "16", "--expert-steps", "1", "--steps", "2",
                 "--batch-size", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "multiplet: 2 clusters" in printed
    bb = cliplab.load(printed.split("--model ")[-1].strip())
    assert bb.model_cfg["cliplab"]["moe"] == {"experts": 2, "top_k": 1, "layers": {"visual": [1], "text": [1]}}
    assert [len(m) for m in moe_modules(bb.model).values()] == [1, 1]
    rows = [json.loads(line) for line in open(out / "moe" / "metrics.jsonl")]
    assert rows[-1]["step"] == 2 and np.isfinite(rows[-1]["loss_balance"])
    assert sorted(p.name for p in (out / "multiplet").iterdir()) == ["expert_0", "expert_1"]


def test_upcycle_usage_errors(tiny_dir, tmp_path, capsys):
    assert main(["upcycle", "--model", str(tiny_dir), "--out", str(tmp_path)]) == 2
    assert "--recipe" in capsys.readouterr().err
    assert main(["upcycle", "--model", str(tiny_dir), "--recipe", "shapes-tiny", "--top-k", "3",
                 "--experts", "2", "--init", "copies", "--out", str(tmp_path)]) == 2
    assert "--top-k 3" in capsys.readouterr().err
