"""detect(): proposals, crop-and-encode scores, suppression, COCO AP by pycocotools."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cliplab.data.datasets import DetectionData

from cliplab.dense import segment
from cliplab.dense.detect import Detections, crop_regions, detect, suppress
from cliplab.dense.proposals import PROPOSALS, ProposalOptions, parse_proposals, propose, region_boxes
from cliplab.errors import UsageError
from cliplab.eval.coco import coco_box_ap, coco_ground_truth, coco_results

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")

RED, BLUE, GREY = (220, 30, 30), (30, 30, 220), (128, 128, 128)


def _scene():
    """96 x 96 grey canvas with a red and a blue 24 px square, each exactly on a 24 px window."""
    img = np.empty((96, 96, 3), np.uint8)
    img[:] = GREY
    img[12:36, 12:36] = RED                     # x 12..36, y 12..36
    img[48:72, 60:84] = BLUE                    # x 60..84, y 48..72
    return img, np.array([[12, 12, 36, 36], [60, 48, 84, 72]], np.float32)


def _colour_embeddings(bb):
    plain = np.stack([np.broadcast_to(np.array(c, np.uint8), (32, 32, 3)) for c in (RED, BLUE)])
    return bb.encode_images(plain, progress=False).features                    # (2, D)


def test_two_object_scene_boxes_follow_the_objects(tiny):
    img, truth = _scene()
    dets = detect(tiny, [img], _colour_embeddings(tiny), method="windows", window_scales=(0.25, 0.5),
                  context=1.0, nms="hard", iou_thr=0.5, score_thr=0.0)[0]
    assert dets.classes == ["0", "1"] and dets.n_proposals > 50
    assert dets.boxes.dtype == np.float32 and dets.labels.dtype == np.int64 and dets.boxes.shape == (len(dets), 4)
    assert np.all(np.diff(dets.scores) <= 0)                                  # best first
    for c in (0, 1):
        best = dets.boxes[dets.labels == c][0]                                # the top box of each class
        np.testing.assert_array_equal(best, truth[c])


def test_crops_are_the_boxes_at_the_model_input():
    img = torch.arange(3 * 40 * 60, dtype=torch.float32).reshape(3, 40, 60)
    crop = crop_regions(img, np.array([[10, 5, 30, 25]]), 20, context=1.0)    # 20 px box -> 20 px crop
    torch.testing.assert_close(crop[0], img[:, 5:25, 10:30])
    outside = crop_regions(img, np.array([[0, 0, 10, 10]]), 10, context=3.0)  # 30 px square around (5, 5)
    assert outside.shape == (1, 3, 10, 10) and float(outside[0, :, :3, :3].abs().max()) == 0  # the mean colour


def test_hard_nms_equals_torchvision_per_class():
    from torchvision.ops import nms

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 80, (60, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 30, (60, 2))], axis=1).astype(np.float32)
    scores = rng.uniform(0, 1, (60, 3)).astype(np.float32)                    # (P, C)
    got_b, got_s, got_l = suppress(boxes, scores, nms="hard", iou_thr=0.4, score_thr=0.2, max_dets=1000)
    want = []
    for c in range(3):
        sel = np.flatnonzero(scores[:, c] >= 0.2)
        keep = nms(torch.from_numpy(boxes[sel]), torch.from_numpy(scores[sel, c]), 0.4).numpy()
        want += [(float(scores[i, c]), c, tuple(boxes[i])) for i in sel[keep]]
    want.sort(key=lambda t: -t[0])
    assert [(float(s), int(c), tuple(b)) for s, c, b in zip(got_s, got_l, got_b)] == want
    # soft rules keep every box of a class, rescored by cliplab.ops.soft_nms; none keeps the scores
    _, s_none, _ = suppress(boxes, scores, nms="none", score_thr=0.2, max_dets=1000)
    assert len(s_none) == int((scores >= 0.2).sum()) and len(got_s) < len(s_none)
    _, s_lin, _ = suppress(boxes, scores, nms="soft-linear", iou_thr=0.4, score_thr=0.0, max_dets=1000)
    assert len(s_lin) == scores.size and s_lin.sum() < scores.sum()


def test_soft_nms_path_is_the_ops_kernel_per_class():
    from cliplab.ops import soft_nms

    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 50, (30, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 25, (30, 2))], axis=1).astype(np.float32)
    scores = rng.uniform(0, 1, (30, 1)).astype(np.float32)
    b, s, _ = suppress(boxes, scores, nms="soft-gaussian", sigma=0.5, score_thr=0.01, max_dets=1000)
    keep, new = soft_nms(boxes, scores[:, 0], method="gaussian", sigma=0.5, score_threshold=0.01)
    order = np.argsort(-new, kind="stable")
    np.testing.assert_array_equal(b, boxes[keep[order]])
    np.testing.assert_allclose(s, new[order])


def test_the_package_keeps_its_segment_function():
    assert callable(segment) and segment.__name__ == "segment"               # not the submodule


def test_region_boxes_and_proposal_registry():
    mask = np.zeros((20, 30), bool)
    mask[2:5, 3:9] = True                                  # 18 px
    mask[10:12, 20:21] = True                              # 2 px: under min_area
    np.testing.assert_array_equal(region_boxes(mask, min_area=3), [[3, 2, 9, 5]])
    assert set(PROPOSALS.names()) >= {"dense", "windows"}
    assert parse_proposals("windows+dense+windows") == ["windows", "dense"]
    with pytest.raises(UsageError, match="unknown proposal method 'boxes'"):
        parse_proposals("dense+boxes")


def test_dense_and_window_proposals_cover_the_image(tiny):
    img, _ = _scene()
    opts = ProposalOptions(window_scales=(0.5,), templates="default")
    win, = propose(tiny, [img], ["cat", "dog"], ["windows"], opts)
    assert win.shape == (9, 4) and win.min() == 0 and win.max() == 96      # 48 px windows, stride 24
    both, = propose(tiny, [img], ["cat", "dog"], ["windows", "dense"], opts)
    assert len(both) >= len(win) and both.dtype == np.float32
    assert np.all(both[:, 2] > both[:, 0]) and np.all(both[:, 3] > both[:, 1]) and both.max() <= 96


def test_coco_conversion_round_trip():
    from cliplab.data.datasets import load_dataset

    data = load_dataset("shapes:det", "test", n=3)
    gt = coco_ground_truth(data)
    assert [im["id"] for im in gt["images"]] == [1, 2, 3]
    assert [c["name"] for c in gt["categories"]] == list(data.classnames)
    x0, y0, x1, y1 = data.boxes[0][0]
    assert gt["annotations"][0]["bbox"] == [x0, y0, x1 - x0, y1 - y0]
    assert gt["annotations"][0]["category_id"] == data.labels[0][0] + 1
    truth = [Detections(b, np.ones(len(b), np.float32), y) for b, y in
             zip(data.boxes, data.labels)]
    m = coco_box_ap(gt, coco_results(truth))
    assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0) and m["AR@100"] == pytest.approx(1.0)
    shifted = [type(t)(t.boxes + np.float32(8), t.scores, t.labels) for t in truth]
    assert coco_box_ap(gt, coco_results(shifted))["AP"] < 0.9
    assert coco_box_ap(gt, [])["AP"] == 0.0


def test_eval_task_runs_and_scores_with_pycocotools(tiny):
    from cliplab.eval.tasks import TASKS

    img, truth = _scene()
    data = DetectionData([img, img], [truth, truth], [[0, 1], [0, 1]], ["red square", "blue square"], "scene")
    run = TASKS.meta("zeroshot_detection")["run"]
    req = type("Req", (), {"backbone": tiny, "options": {"proposals": "windows", "nms": "soft-gaussian",
                                                         "max_dets": "50"},
                           "templates": "default", "progress": False})()
    res = run(req, data)
    assert res.task == "zeroshot_detection" and 0 <= res.metrics["AP"] <= res.metrics["AP50"] <= 1
    assert res.details["nms"] == "soft-gaussian" and len(res.details["precision50"]) == 101
    bad = type(req)()
    bad.backbone, bad.options, bad.templates, bad.progress = tiny, {"iou_thr": "high"}, "default", False
    with pytest.raises(UsageError, match="iou-thr"):
        run(bad, data)


@pytest.mark.parametrize("kwargs, message", [
    ({"nms": "soft"}, "nms"),
    ({"method": "dense+rpn"}, "unknown proposal method"),
    ({"iou_thr": 1.5}, "iou_thr"),
    ({"context": 0.5}, "context"),
])
def test_bad_options_are_usage_errors(tiny, kwargs, message):
    img, _ = _scene()
    with pytest.raises(UsageError, match=message):
        detect(tiny, [img], ["a", "b"], templates="default", **kwargs)


def test_duplicate_classes_are_refused(tiny):
    img, _ = _scene()
    with pytest.raises(UsageError, match="duplicate"):
        detect(tiny, [img], ["cat", "cat"], method="windows", templates="default")
