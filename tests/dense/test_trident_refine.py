"""Trident's mask-model refinement with a stub mask model that returns known masks."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from cliplab.dense import segment
from cliplab.dense.trident import mask_refinement, sam_mask_model
from cliplab.errors import UsageError


class GrowBox:
    """Stub mask model: the prompt box grown by ``grow`` px, scored ``good``, or 0.5 for boxes right of ``bad_x``."""

    def __init__(self, grow=3, good=0.95, bad_x=None):
        self.grow, self.good, self.bad_x, self.calls = grow, good, bad_x, []

    def __call__(self, image, *, points, boxes, mask_input):
        self.calls.append({"image": image, "points": points, "boxes": boxes, "mask_input": mask_input})
        H, W = image.shape[:2]
        masks = np.zeros((len(boxes), H, W), np.float32)
        scores = np.full(len(boxes), self.good, np.float32)
        for r, (x0, y0, x1, y1) in enumerate(boxes):
            g = self.grow
            masks[r, max(int(y0) - g, 0):int(y1) + g + 1, max(int(x0) - g, 0):int(x1) + g + 1] = 1.0
            if self.bad_x is not None and x0 > self.bad_x:
                scores[r] = 0.5
        return masks, scores


def _scene():
    pred = torch.zeros(40, 40, dtype=torch.long)
    pred[6:20, 6:20] = 1
    pred[24:36, 24:36] = 2
    probs = torch.full((3, 40, 40), 0.2)
    for c in range(3):
        probs[c][pred == c] = 0.8
    image = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    return probs, pred, image


def test_kept_masks_replace_the_class_map_and_failed_ones_do_not():
    probs, pred, image = _scene()
    stub = GrowBox(bad_x=21)                                  # class 2's region (x >= 24) fails
    ref_probs, ref_pred = mask_refinement(probs, pred, image, stub, minimal_area=4, iou_thresh=0.9)
    assert [len(c["boxes"]) for c in stub.calls] == [1, 1, 1]                  # background, class 1, class 2
    assert all(c["image"] is image for c in stub.calls)
    call = stub.calls[1]                                                       # class 1's prompt
    x, y = call["points"][0]
    assert pred[int(y), int(x)] == 1                                           # the point lies in its region
    np.testing.assert_allclose(call["mask_input"], probs[1].numpy())           # 0.8 / 0.2 are above 0.10
    # the background mask (box over the whole image) and class 1's grown box are kept; class 2's is not
    x0, y0, x1, y1 = call["boxes"][0].astype(int)
    grown = np.zeros((40, 40), bool)
    grown[y0 - 3:y1 + 4, x0 - 3:x1 + 4] = True
    expect = np.zeros((40, 40), np.int64)                                      # background mask covers all
    expect[grown & (pred.numpy() == 1)] = 1                                    # 0.8 beats background's 0.2
    np.testing.assert_array_equal(ref_pred.numpy(), expect)
    # class 2's region failed: its probabilities come back, the class map does not (as the reference)
    assert torch.equal(ref_probs[2][pred == 2], probs[2][pred == 2])


def test_uncovered_pixels_keep_the_original_prediction():
    probs, pred, image = _scene()
    probs[0] = 0.05                                                            # no background prompt at all
    out_p, out = mask_refinement(probs, pred, image, GrowBox(grow=0), minimal_area=4, coarse_thresh=0.3)
    covered = out_p.sum(0) > 0
    assert covered.any() and not covered.all()
    np.testing.assert_array_equal(out[~covered].numpy(), pred[~covered].numpy())
    assert set(torch.unique(out[covered]).tolist()) <= {1, 2}
    with pytest.raises(UsageError, match="one \\(H, W\\) mask and one score per prompt"):
        mask_refinement(probs, pred, image, lambda im, **kw: (np.zeros((1, 5, 5)), [1.0]), minimal_area=4)


def test_segment_calls_the_mask_model_with_the_original_image(tiny):
    img = np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    stub = GrowBox()
    res = segment(tiny, [img], ["cat", "dog"], method="trident", templates="default", mask_model=stub,
                  minimal_area=1, coarse_thresh=0.0, return_probs=True)
    assert stub.calls and all(c["image"].shape == (40, 48, 3) for c in stub.calls)
    np.testing.assert_array_equal(stub.calls[0]["image"], img)
    plain = segment(tiny, [img], ["cat", "dog"], method="trident", templates="default", return_probs=True)
    _, expect = mask_refinement(torch.from_numpy(plain.probs[0]), torch.from_numpy(plain.masks[0]).long(), img,
                                GrowBox(), minimal_area=1, coarse_thresh=0.0)
    np.testing.assert_array_equal(res.masks[0], expect.numpy())


def test_sam_adapter_says_what_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "segment_anything", None)                 # as if not installed
    with pytest.raises(UsageError, match="segment_anything"):
        sam_mask_model("sam_vit_b.pth")
