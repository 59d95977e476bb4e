"""benchmarks/rave_shapes.py --quick: the JSON it writes and its rows."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_writes_every_row(tmp_path):
    spec = importlib.util.spec_from_file_location("rave_shapes_bench", ROOT / "benchmarks" / "rave_shapes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "rave.json"
    result = mod.main(["--quick", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["summary"] == result["summary"]
    methods = [r["method"] for r in saved["rows"]]
    assert methods == ["input (no enhancement)", "well-lit ground truth", "unguided", "guided"]
    for r in saved["rows"]:
        assert -1.0 <= r["projection"] <= 1.0
        if r["psnr"] is not None:
            assert 0.0 < r["psnr"] < 100.0 and 0.0 < r["ssim"] <= 1.0
    assert saved["guided_beats_unguided_psnr"] == (saved["summary"]["guided"]["psnr"]["mean"]
                                                  > saved["summary"]["unguided"]["psnr"]["mean"])
