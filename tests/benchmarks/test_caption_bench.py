"""benchmarks/caption_shapes.py: a --quick run writes one entry per head with every measure."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_writes_every_measure(tmp_path):
    spec = importlib.util.spec_from_file_location("caption_bench", ROOT / "benchmarks" / "caption_shapes.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "caption.json"
    result = bench.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert set(result["heads"]) == {"captioner", "lightcap"}
    for r in result["heads"].values():
        assert {"cider", "attributes", "params", "mb", "latency_ms", "loss_first", "loss_last"} <= set(r)
        assert set(r["attributes"]) == {"color", "shape", "object", "precision", "count", "exact"}
        assert r["params"] > 0 and r["latency_ms"] > 0 and r["cider"] >= 0
    assert result["heads"]["lightcap"]["params"] < result["heads"]["captioner"]["params"]
