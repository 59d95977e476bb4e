"""Soft-NMS against the reference loop, hand cases from the authors' code, and the hard-NMS limit.

Expected numbers marked "reference" were printed by the authors' ``cpu_soft_nms``
(bharatsingh430/soft-nms, ``lib/nms/cpu_nms.pyx``, compiled with Cython) on the same inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cliplab.ops import soft_nms, soft_nms_loop

METHODS = ("linear", "gaussian", "hard")


def random_boxes(rng, n, integer=False):
    xy = rng.uniform(0, 200, (n, 2))
    wh = rng.uniform(1, 80, (n, 2))
    if integer:
        xy, wh = np.round(xy), np.round(wh)
    return np.c_[xy, xy + wh].astype(np.float32), rng.uniform(0, 1, n).astype(np.float32)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("offset", [0, 1])
def test_equals_the_reference_loop_on_random_boxes(method, offset):
    rng = np.random.default_rng(7)
    dropped = 0
    for trial in range(6):
        boxes, scores = random_boxes(rng, 150, integer=trial % 2 == 0)
        if trial >= 4:
            scores = (np.round(scores * 4) / 4).astype(np.float32)     # many exact ties
        for sigma, nt, thr in ((0.5, 0.3, 0.001), (0.1, 0.5, 0.05)):
            kw = dict(method=method, sigma=sigma, iou_threshold=nt, score_threshold=thr, offset=offset)
            keep, s = soft_nms(boxes, scores, **kw)
            keep_ref, s_ref = soft_nms_loop(boxes, scores, **kw)
            np.testing.assert_array_equal(keep, keep_ref)
            np.testing.assert_allclose(s, s_ref, rtol=0, atol=1e-6)
            dropped += len(boxes) - len(keep)
    assert dropped > 0      # the deletion path of the loop was exercised


@pytest.mark.parametrize("offset, expected", [
    (1, {"linear": 0.23661971, "gaussian": 0.29670697}),    # reference
    (0, {"linear": 0.25546217, "gaussian": 0.31670862}),    # IoU 0.6807 without the +1
])
def test_paper_rules_on_a_known_vector(offset, expected):
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], dtype=np.float32)
    scores = np.array([0.9, 0.8, 0.7], dtype=np.float32)
    iou = 0.7042254 if offset else 0.6806723
    for method, value in expected.items():
        keep, s = soft_nms(boxes, scores, method=method, offset=offset)
        assert keep.tolist() == [0, 2, 1]
        np.testing.assert_allclose(s, [0.9, 0.7, value], atol=1e-7)
    np.testing.assert_allclose(expected["linear"], 0.8 * (1 - iou), atol=1e-6)            # eq. (2)
    np.testing.assert_allclose(expected["gaussian"], 0.8 * np.exp(-iou ** 2 / 0.5), atol=1e-6)  # eq. (3)
    keep, s = soft_nms(boxes, scores, method="hard", offset=offset)
    assert keep.tolist() == [0, 2]


def test_ties_are_broken_as_the_reference_breaks_them():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [2, 2, 12, 12], [0, 1, 10, 11], [50, 50, 60, 60]],
                     dtype=np.float32)
    scores = np.full(5, 0.5, dtype=np.float32)
    for method in ("linear", "gaussian"):
        assert soft_nms(boxes, scores, method=method, offset=1)[0].tolist() == [0, 4, 2, 1, 3]   # reference
    assert soft_nms(boxes, scores, method="hard", offset=1)[0].tolist() == [0, 4]                 # reference


@pytest.mark.parametrize("method", METHODS)
def test_empty_and_single_box(method):
    keep, s = soft_nms(np.zeros((0, 4)), np.zeros(0), method=method)
    assert keep.shape == (0,) and s.shape == (0,) and keep.dtype == np.int64
    keep, s = soft_nms([[0, 0, 5, 5]], [1e-5], method=method)   # below the threshold, but never rescored
    assert keep.tolist() == [0] and s.tolist() == [np.float32(1e-5)]


def test_rescored_boxes_below_the_threshold_are_dropped_others_kept():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [40, 40, 50, 50]], dtype=np.float32)
    keep, s = soft_nms(boxes, [0.9, 0.8, 0.0005], method="linear")
    assert keep.tolist() == [0, 2]          # the duplicate gets 0.8 * (1 - 1) = 0; the lone box stays


def test_hard_method_agrees_with_torchvision_nms():
    from torchvision.ops import nms

    rng = np.random.default_rng(3)
    for thr in (0.1, 0.3, 0.5, 0.7):
        boxes, scores = random_boxes(rng, 300)
        keep, s = soft_nms(boxes, scores, method="hard", iou_threshold=thr, score_threshold=1e-9)
        expected = nms(torch.from_numpy(boxes), torch.from_numpy(scores), thr).numpy()
        np.testing.assert_array_equal(keep, expected)
        np.testing.assert_array_equal(s, scores[keep])


def test_gaussian_tends_to_hard_nms_as_sigma_tends_to_zero():
    from torchvision.ops import box_iou, nms

    rng = np.random.default_rng(4)
    boxes, scores = random_boxes(rng, 300)
    iou = box_iou(torch.from_numpy(boxes), torch.from_numpy(boxes)).numpy()
    sigma = 1e-15
    assert iou[iou > 0].astype(np.float64).min() ** 2 / sigma > 30     # every overlap: exp(-IoU^2/sigma) ~ 0
    keep, s = soft_nms(boxes, scores, method="gaussian", sigma=sigma)
    np.testing.assert_array_equal(keep, nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.0).numpy())
    np.testing.assert_array_equal(s, scores[keep])
    keep_wide, _ = soft_nms(boxes, scores, method="gaussian", sigma=0.5)
    assert len(keep_wide) > len(keep)


def test_torch_in_torch_out_and_float64():
    rng = np.random.default_rng(5)
    boxes, scores = random_boxes(rng, 50)
    keep, s = soft_nms(torch.from_numpy(boxes), torch.from_numpy(scores), method="gaussian")
    assert isinstance(keep, torch.Tensor) and keep.dtype == torch.int64 and s.dtype == torch.float32
    keep_np, s_np = soft_nms(boxes, scores, method="gaussian")
    np.testing.assert_array_equal(keep.numpy(), keep_np)
    keep64, s64 = soft_nms(boxes.astype(np.float64), scores.astype(np.float64), method="gaussian")
    assert s64.dtype == np.float64
    np.testing.assert_array_equal(keep64, keep_np)
    np.testing.assert_allclose(s64, s_np, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(boxes=np.zeros((3, 5)), scores=np.zeros(3)), r"\(N, 4\)"),
    (dict(boxes=np.zeros((3, 4)), scores=np.zeros(2)), r"\(N,\)"),
    (dict(boxes=np.full((1, 4), np.nan), scores=np.zeros(1)), "finite"),
    (dict(boxes=np.zeros((1, 4)), scores=np.zeros(1), method="soft"), "method"),
    (dict(boxes=np.zeros((1, 4)), scores=np.zeros(1), sigma=0), "sigma"),
    (dict(boxes=np.zeros((1, 4)), scores=np.zeros(1), iou_threshold=1.5), "iou_threshold"),
])
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        soft_nms(**kwargs)
