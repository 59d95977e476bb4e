"""mIoU as mmsegmentation's IoUMetric computes it, on hand-made class maps."""

from __future__ import annotations

import types

import numpy as np
import pytest

from cliplab.errors import UsageError
from cliplab.eval.metrics import mean_iou, segmentation_areas


def test_hand_made_case_with_ignore_label_and_absent_class():
    label = np.array([[0, 0, 1, 1],
                      [0, 255, 1, 1]])
    pred = np.array([[0, 1, 1, 1],
                     [0, 3, 0, 1]])            # the pixel predicted 3 is ignored (label 255)
    a = segmentation_areas([pred], [label], 4)
    # class 0: I = 2, pred 3, label 3 -> U = 4; class 1: I = 3, pred 4, label 4 -> U = 5
    np.testing.assert_array_equal(a["intersect"], [2, 3, 0, 0])
    np.testing.assert_array_equal(a["union"], [4, 5, 0, 0])
    m = mean_iou([pred], [label], 4)
    assert m["mIoU"] == pytest.approx((2 / 4 + 3 / 5) / 2)           # classes 2, 3 absent: excluded
    assert np.isnan(m["IoU"][2]) and np.isnan(m["IoU"][3])
    assert m["aAcc"] == pytest.approx(5 / 7)
    assert m["mAcc"] == pytest.approx((2 / 3 + 3 / 4) / 2)


def test_a_class_predicted_but_absent_from_labels_counts_as_zero():
    label = np.zeros((2, 2), int)
    pred = np.array([[0, 0], [0, 2]])
    m = mean_iou([pred], [label], 3)
    assert m["IoU"][2] == 0 and np.isnan(m["IoU"][1])
    assert m["mIoU"] == pytest.approx((3 / 4 + 0) / 2)


def test_areas_are_summed_over_the_set_not_averaged_per_image():
    big_label, big_pred = np.ones((10, 10), int), np.ones((10, 10), int)        # class 1: perfect, 100 px
    small_label = np.array([[1, 1]])
    small_pred = np.array([[1, 0]])                                            # class 1: I 1, U 2
    m = mean_iou([big_pred, small_pred], [big_label, small_label], 2)
    assert m["IoU"][1] == pytest.approx(101 / 102)
    per_image_mean = (1.0 + 0.5) / 2
    assert m["IoU"][1] != pytest.approx(per_image_mean)
    assert m["IoU"][0] == 0                                                    # predicted once, never labelled


def test_errors():
    with pytest.raises(UsageError, match="differ in shape"):
        mean_iou([np.zeros((2, 2), int)], [np.zeros((2, 3), int)], 2)
    with pytest.raises(UsageError, match="predictions"):
        mean_iou([np.zeros((2, 2), int)], [], 2)


def test_zeroshot_segmentation_task_scores_the_class_maps(tiny):
    from cliplab.eval.tasks import TASKS

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 48, 3), dtype=np.uint8) for _ in range(2)]
    maps = [rng.integers(0, 3, (32, 48)) for _ in range(2)]
    maps[0][:4] = 255
    data = types.SimpleNamespace(images=images, masks=maps, classnames=["background", "cat", "dog"],
                                 ignore_index=255, name="toy")
    res = TASKS.get("zeroshot_segmentation")(tiny, data, method="clearclip", templates="default")
    from cliplab.dense import segment

    direct = segment(tiny, images, ["background", "cat", "dog"], method="clearclip", templates="default")
    expected = mean_iou(direct.masks, maps, 3)
    assert res.metrics["mIoU"] == pytest.approx(expected["mIoU"])
    assert res.details["IoU"] == pytest.approx(list(expected["IoU"]))
    assert {k: v for k, v in res.metrics.items() if k.startswith("IoU/")} == pytest.approx(
        {f"IoU/{c}": v for c, v in zip(["background", "cat", "dog"], expected["IoU"]) if np.isfinite(v)})
    assert res.task == "zeroshot_segmentation" and res.dataset == "toy" and res.details["n"] == 2
    with pytest.raises(UsageError, match="not a segmentation dataset"):
        TASKS.get("zeroshot_segmentation")(tiny, types.SimpleNamespace(items=images, classnames=["a"]))
