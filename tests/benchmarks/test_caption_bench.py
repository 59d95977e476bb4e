"""benchmarks/caption_shapes.py: a --quick run writes one entry per head with every measure."""

import json
from pathlib import Path

from _benchmarks import load_benchmark


ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_writes_every_measure(tmp_path):
    import torch

    bench = load_benchmark("caption_shapes.py")
    out = tmp_path / "caption.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)                                            # the script runs on 1, then gives back 2
    try:
        result = bench.main(["--quick", "--out", str(out)])
        assert torch.get_num_threads() == 2                             # the caller's thread count is restored
    finally:
        torch.set_num_threads(threads)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    canon = result["canonical_caption"]                                 # the scale the docs quote
    assert canon["against_all_five"] > canon["against_other_four"] > 0
    assert set(result["heads"]) == {"captioner", "lightcap"}
    for r in result["heads"].values():
        assert {"cider", "attributes", "params", "mb", "latency_ms", "loss_first", "loss_last"} <= set(r)
        assert set(r["attributes"]) == {"color", "shape", "object", "precision", "count", "exact"}
        assert r["params"] > 0 and r["latency_ms"] > 0 and r["cider"] >= 0
    assert result["heads"]["lightcap"]["params"] < result["heads"]["captioner"]["params"]


def test_recorded_canonical_caption_scores_are_the_ones_the_script_computes():
    """The committed result's canonical-caption CIDEr-D (quoted in docs/generative.md) is what
    ``canonical_cider`` gives for its seed and test scenes (no training involved)."""
    import pytest

    bench = load_benchmark("caption_shapes.py")
    from cliplab.data.shapes import shapes_tiny_world
    from cliplab.data.shapes.worlds import task_world

    recorded = json.loads((ROOT / "benchmarks" / "results" / "caption_shapes.json").read_text())
    world = task_world(shapes_tiny_world(seed=recorded["seed"]), "captions")
    _, scenes = world.render_batch("test", list(range(recorded["test_scenes"])))
    got = bench.canonical_cider(scenes)
    for key, value in recorded["canonical_caption"].items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
