"""Anomaly metrics on hand-made maps whose values are worked out in the comments.

Both AUPRO protocols were also compared with their reference code on random maps
(MVTec AD ``generic_util.compute_pro`` + ``trapezoid``; AnomalyCLIP ``metrics.py::cal_pro_score``):
see docs/anomaly_detection.md.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cliplab.errors import UsageError
from cliplab.eval.anomaly_metrics import (anomaly_metrics, aupro, f1_max, image_ap, image_auroc, pixel_auroc,
                                          pro_curve)


def one_region():
    # one 2-pixel defect (scores .9, .3) and four normal pixels (.8, .5, .2, .1)
    masks = np.array([[[1, 1, 0, 0, 0, 0]]])
    maps = np.array([[[0.9, 0.3, 0.8, 0.5, 0.2, 0.1]]])
    return masks, maps


def two_regions():
    # region A = pixel 0 (score .9); region B = pixels 3-5 (.8, .2, .1); normal pixels 1-2 (.5, .3)
    masks = np.array([[[1, 0, 0, 1, 1, 1]]])
    maps = np.array([[[0.9, 0.5, 0.3, 0.8, 0.2, 0.1]]])
    return masks, maps


def test_pro_curve_by_hand():
    fpr, pro = pro_curve(*one_region())
    # descending scores: .9 (defect) .8 .5 (normal) .3 (defect) .2 .1 (normal)
    np.testing.assert_allclose(fpr, [0, 0, .25, .5, .5, .75, 1, 1])
    np.testing.assert_allclose(pro, [0, .5, .5, .5, 1, 1, 1, 1])


def test_aupro_by_hand():
    masks, maps = one_region()
    # up to FPR .3: .5 x .25 + .5 x .05 (interpolated end) = .15, / .3
    assert aupro(masks, maps) == pytest.approx(0.5)
    # up to FPR 1, one region: the PRO curve is the ROC curve
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(0.75)
    assert pixel_auroc(masks, maps) == pytest.approx(6 / 8)
    masks, maps = two_regions()
    # after .9 and .8 both regions are partly found: PRO = (1 + 1/3) / 2 up to FPR .5
    assert aupro(masks, maps) == pytest.approx(2 / 3)
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(2 / 3)
    assert pixel_auroc(masks, maps) == pytest.approx(0.5)     # pixels, not regions: 4 of 8 pairs


def test_aupro_anomalyclip_protocol_by_hand():
    masks, maps = one_region()
    # 200 thresholds in [.1, .9); FPR < .3 for t in [.5, .9): FPR .25 or 0, PRO .5 throughout;
    # FPRs rescaled to [0, 1]: the area is .5
    assert aupro(masks, maps, protocol="anomalyclip") == pytest.approx(0.5)


def test_perfect_and_inverted_maps():
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 16, 16), dtype=np.uint8)
    masks[0, 2:6, 3:9] = 1
    masks[1, 10:14, 10:12] = 1
    masks[1, 0:2, 0:2] = 1
    noise = rng.random(masks.shape)
    perfect = masks + 0.5 * noise              # every defect pixel above every normal pixel
    for protocol in ("mvtec", "anomalyclip"):
        assert aupro(masks, perfect, protocol=protocol) == pytest.approx(1.0)
    assert pixel_auroc(masks, perfect) == 1.0 and f1_max(masks, perfect) == pytest.approx(1.0)
    assert aupro(masks, -perfect) == pytest.approx(0.0)
    assert pixel_auroc(masks, -perfect) == 0.0


def test_single_region_aupro_to_one_equals_pixel_auroc_with_ties():
    rng = np.random.default_rng(1)
    masks = np.zeros((3, 20, 20), dtype=np.uint8)
    masks[1, 5:12, 6:10] = 1
    maps = np.round(rng.random(masks.shape) + 0.3 * masks, 1)      # many tied scores
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))


def test_image_metrics_and_table_row():
    labels, scores = [0, 0, 1, 1, 1], [0.1, 0.6, 0.4, 0.8, 0.9]
    assert image_auroc(labels, scores) == pytest.approx(5 / 6)
    # ranked: .9 (1) .8 (1) .6 (0) .4 (1): AP = (1 + 1 + 3/4) / 3
    assert image_ap(labels, scores) == pytest.approx((1 + 1 + 0.75) / 3)
    assert f1_max(labels, scores) == pytest.approx(2 * 0.75 * 1 / 1.75)     # all three at precision 3/4
    masks, maps = one_region()
    row = anomaly_metrics(labels, scores, np.repeat(masks, 2, 0), np.repeat(maps, 2, 0))
    assert set(row) == {"image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_aupro", "pixel_f1_max"}
    assert row["pixel_aupro"] == pytest.approx(0.5)


@pytest.mark.parametrize("call, match", [
    (lambda: image_auroc([1, 1], [0.2, 0.3]), "both normal and anomalous"),
    (lambda: image_auroc([0, 2], [0.2, 0.3]), "binary"),
    (lambda: pixel_auroc(np.zeros((1, 2, 2)), np.zeros((1, 2, 3))), "shape"),
    (lambda: aupro(np.zeros((1, 2, 2)), np.zeros((1, 2, 2))), "defect region"),
    (lambda: aupro(*one_region(), protocol="cflow"), "protocol"),
    (lambda: aupro(one_region()[0], np.ones((1, 1, 6)), protocol="anomalyclip"), "constant"),
    (lambda: aupro(one_region()[0], np.full((1, 1, 6), np.nan)), "finite"),
])
def test_errors(call, match):
    with pytest.raises(UsageError, match=match):
        call()
