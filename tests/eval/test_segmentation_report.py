"""The report section of ``zeroshot_segmentation``: per-class IoU and image | truth | prediction overlays."""

from __future__ import annotations

import base64
import io
import json
import types

import numpy as np
import pytest
from PIL import Image

from cliplab.errors import UsageError
from cliplab.eval.report import build_report
from cliplab.eval.results import make_result
from cliplab.eval.tasks import TASKS
from cliplab.eval.tasks.segmentation import overlay_strip


@pytest.fixture(scope="module")
def toy():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 48, 3), dtype=np.uint8) for _ in range(3)]
    maps = [rng.integers(0, 3, (32, 48)) for _ in range(3)]
    maps[0][:4] = 255
    return types.SimpleNamespace(images=images, masks=maps, classnames=["background", "cat", "dog"],
                                 ignore_index=255, name="toy")


def _png(b64):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_record_keeps_small_overlays_of_the_first_scenes(tiny, toy):
    res = TASKS.get("zeroshot_segmentation")(tiny, toy, method="clearclip", templates="default", overlays=2)
    kept = res.details["overlays"]
    assert [o["index"] for o in kept] == [0, 1]
    strip = _png(kept[0]["png"])
    assert strip.shape == (96, 3 * 144 + 4, 3)                                # 32 x 48 scenes -> 96 x 144 panels
    from cliplab.dense import segment

    pred = segment(tiny, toy.images, toy.classnames, method="clearclip", templates="default").masks
    expect = _png(base64.b64encode(overlay_strip(toy.images[0], toy.masks[0], pred[0], 3)))
    np.testing.assert_array_equal(strip, expect)
    # ignored pixels (the first 4 rows, 12 px here) are blended with white in the truth panel
    assert strip[:12, 146:290].mean() > strip[:12, :144].mean() + 40
    assert len(json.dumps(res.details)) < 50_000                              # two strips of pure noise
    assert TASKS.get("zeroshot_segmentation")(tiny, toy, method="clearclip", templates="default",
                                              overlays=0).details["overlays"] == []
    with pytest.raises(UsageError, match="overlays"):
        TASKS.get("zeroshot_segmentation")(tiny, toy, method="clearclip", templates="default", overlays=-1)


def test_report_has_a_segmentation_section_with_iou_and_overlays(tiny, toy, tmp_path):
    res = TASKS.get("zeroshot_segmentation")(tiny, toy, method="sclip", templates="default")
    rec = make_result(res, model_spec="tiny", fingerprint="f")
    assert len(rec["cliplab"]["overlays"]) == 3
    paths = build_report([rec], tmp_path / "report")
    md = paths["md"].read_text()
    html = paths["html"].read_text()
    assert "## Segmentation" in md and "<h2>Segmentation</h2>" in html
    assert "IoU/" in md                                                       # per-class IoU rows of the summary
    figs = sorted(paths["figures"].glob("zeroshot_segmentation_*.png"))
    assert len(figs) == 1
    w, h = Image.open(figs[0]).size
    assert h > 300 and w >= 600                                               # bars + three overlay rows
    assert html.count("data:image/png;base64,") == 1
