"""benchmarks/rave_shapes.py --quick: the JSON it writes and its rows, checked against independent numbers."""

import json

import numpy as np
import pytest

from cliplab.generative.rave import image_quality, shapes_backlit

from _benchmarks import load_benchmark, run_benchmark


def test_quick_run_writes_every_row(tmp_path):
    out = tmp_path / "rave.json"
    result = run_benchmark(load_benchmark("rave_shapes.py"), ["--quick", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["summary"] == result["summary"]
    methods = [r["method"] for r in saved["rows"]]
    assert methods == ["input (no enhancement)", "well-lit ground truth", "unguided", "guided"]
    for r in saved["rows"]:
        assert -1.0 <= r["projection"] <= 1.0
        if r["psnr"] is not None:
            assert 0.0 < r["psnr"] < 100.0 and 0.0 < r["ssim"] <= 1.0
    # the input row and the mean pixels, recomputed here from the same 8 test scenes
    test_in, test_gt = shapes_backlit("test", range(8))
    want = image_quality(test_in, test_gt)
    assert saved["rows"][0]["psnr"] == pytest.approx(want["psnr"], rel=1e-9)
    assert saved["rows"][0]["ssim"] == pytest.approx(want["ssim"], rel=1e-9)
    assert saved["mean_pixel"] == pytest.approx({"backlit": test_in.mean() / 255, "well_lit": test_gt.mean() / 255})
    # r points from backlit to well-lit: the truth projects higher than the input
    assert saved["rows"][1]["projection"] > saved["rows"][0]["projection"]
    for m in ("unguided", "guided"):           # the summary is the mean of the method's rows
        rs = [r for r in saved["rows"] if r["method"] == m]
        assert saved["summary"][m]["psnr"]["mean"] == pytest.approx(np.mean([r["psnr"] for r in rs]))
