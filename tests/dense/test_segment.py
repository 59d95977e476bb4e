"""segment(): windows, overlap averaging, queries, background, geometry of the class maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cliplab.dense import DENSE_METHODS, segment, window_boxes
from cliplab.errors import UsageError

RED, BLUE, GREY = (220, 30, 30), (30, 30, 220), (128, 128, 128)


def _canvas(h, w, boxes):
    img = np.empty((h, w, 3), np.uint8)
    img[:] = GREY
    truth = np.zeros((h, w), np.int64)
    for k, (colour, (y0, x0, y1, x1)) in enumerate(boxes, start=1):
        img[y0:y1, x0:x1] = colour
        truth[y0:y1, x0:x1] = k
    return img, truth


def test_window_boxes_follow_mmseg_slide_inference():
    assert len(window_boxes(256, 256, 64, 64)) == 16
    boxes = window_boxes(256, 256, 64, 32)
    assert len(boxes) == 49 and boxes[-1] == (192, 192, 256, 256)
    # 100 px, window 64, stride 32: ceil(36 / 32) + 1 = 3 rows; the last is moved in to end at the border
    assert sorted({(y0, y1) for y0, _, y1, _ in window_boxes(100, 64, 64, 32)}) == [(0, 64), (32, 96), (36, 100)]
    assert window_boxes(20, 30, 64, 32) == [(0, 0, 20, 30)]


@pytest.mark.parametrize("method", sorted(DENSE_METHODS.names()))
def test_an_image_one_window_wide_equals_the_single_window_result(tiny, method):
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    single = segment(tiny, [img], ["cat", "dog", "car"], method=method, templates="default", return_probs=True)
    slid = segment(tiny, [img], ["cat", "dog", "car"], method=method, templates="default", window=32, stride=16,
                   return_probs=True)
    assert slid.n_windows == single.n_windows == 1
    np.testing.assert_allclose(slid.probs[0], single.probs[0], atol=1e-6)
    np.testing.assert_array_equal(slid.masks[0], single.masks[0])


@pytest.mark.parametrize("method", ["vanilla", "maskclip", "sclip", "clearclip"])
def test_two_object_scene_argmax_follows_the_objects(tiny, method):
    """Two pasted squares; each class is the method's mean feature of a plain image of its colour."""
    scene, truth = _canvas(64, 96, [(RED, (8, 8, 56, 40)), (BLUE, (8, 56, 56, 88))])
    meth = DENSE_METHODS.get(method)()
    plain = np.stack([np.broadcast_to(np.array(c, np.uint8), (32, 32, 3)) for c in (GREY, RED, BLUE)])
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    x = (torch.from_numpy(plain).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        tok = torch.nn.functional.normalize(meth.features(tiny, x).tokens, dim=-1).mean(dim=(1, 2))  # (3, D)
    res = segment(tiny, [scene], tok.numpy(), method=method, window=32, stride=16)
    pred = res.masks[0]
    assert pred.shape == truth.shape
    inner = np.zeros_like(truth, bool)
    inner[12:52, 12:36] = inner[12:52, 60:84] = True                         # object interiors
    assert (pred[inner] == truth[inner]).mean() > 0.9
    for k in (1, 2):
        assert (pred[truth == k] == k).mean() > 0.75


def test_masks_and_probs_at_the_original_resolution(tiny):
    img = np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    for kw in ({}, {"window": 32, "stride": 16}, {"window": 32, "size": 40}):
        res = segment(tiny, [img, img[:40]], ["a", "b"], method="sclip", templates="default", return_probs=True, **kw)
        assert [m.shape for m in res.masks] == [(50, 70), (40, 70)]
        assert res.probs[0].shape == (2, 50, 70) and res.masks[0].dtype == np.int32
        np.testing.assert_array_equal(res.masks[0], res.probs[0].argmax(0))


def test_synonyms_take_the_max_and_background_comes_first(tiny):
    img = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    flat = segment(tiny, [img], ["sky", "wall", "cat", "dog"], method="clearclip", templates="default",
                   return_probs=True)
    grouped = segment(tiny, [img], ["cat", "dog"], background=["sky", "wall"], method="clearclip",
                      templates="default", return_probs=True)
    assert grouped.classes == ["background", "cat", "dog"]
    p = flat.probs[0]
    np.testing.assert_allclose(grouped.probs[0], np.stack([p[:2].max(0), p[2], p[3]]), atol=1e-6)
    everything_background = segment(tiny, [img], ["cat", "dog"], background="background", prob_thd=1.0,
                                     method="sclip", templates="default")
    assert (everything_background.masks[0] == 0).all()


def test_windows_of_several_images_are_batched_together(tiny):
    imgs = [np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8) for i in range(3)]
    one_by_one = [segment(tiny, [im], ["a", "b"], window=32, stride=16, templates="default", return_probs=True)
                  for im in imgs]
    batched = segment(tiny, imgs, ["a", "b"], window=32, stride=16, batch_size=20, templates="default",
                      return_probs=True)
    assert batched.n_windows == 27
    for one, p in zip(one_by_one, batched.probs):
        np.testing.assert_allclose(p, one.probs[0], atol=1e-5)


def test_maskclip_refinements(tiny):
    from cliplab.dense.maskclip import refine_maskclip

    torch.manual_seed(0)
    logits = torch.randn(1, 3, 2, 2) * 0.05
    logits[0, 2] = -1.0                                                      # class 2 never wins
    denoised = refine_maskclip(logits, None, pd_thresh=0.5)
    assert (denoised[0, 2] == -100).all() and torch.equal(denoised[0, :2], logits[0, :2])
    keys = torch.randn(1, 4, 8)
    smoothed = refine_maskclip(logits, keys, ks_thresh=1.0)                   # every patch is smoothed
    p = torch.softmax(logits * 100, 1).reshape(1, 3, 4).transpose(1, 2)
    k = torch.nn.functional.normalize(keys, dim=1)
    expected = ((k @ k.transpose(1, 2)) @ p).clamp_min(1e-12).log() / 100
    torch.testing.assert_close(smoothed.reshape(1, 3, 4).transpose(1, 2), expected)
    img = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    res = segment(tiny, [img], ["a", "b"], method="maskclip", ks_thresh=1.0, pd_thresh=0.5, templates="default")
    assert res.masks[0].shape == (32, 32)


def test_errors(tiny):
    img = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(UsageError, match="multiple of the patch size"):
        segment(tiny, [img], ["a"], window=30)
    with pytest.raises(UsageError, match="larger than the window"):
        segment(tiny, [img], ["a"], window=32, stride=40)
    with pytest.raises(UsageError, match="unknown dense method"):
        segment(tiny, [img], ["a"], method="nope")
    with pytest.raises(UsageError, match="prob_thd"):
        segment(tiny, [img], ["a"], prob_thd=2)
    with pytest.raises(UsageError, match="duplicate class"):
        segment(tiny, [img], ["a", "a"])
    with pytest.raises(UsageError, match="sclip"):
        segment(tiny, [img], ["a"], method="sclip", ks_thresh=1.0)
    with pytest.raises(UsageError, match="class embeddings"):
        segment(tiny, [img], np.ones((2, 32), np.float32), background="background")


def test_trident_guided_affinity_and_a_pluggable_guide(tiny):
    from cliplab.dense.attention import last_block, prelast_tokens, value_attention
    from cliplab.dense.trident import Trident, guided_affinity

    a = guided_affinity(torch.randn(2, 10, 6))
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 10))
    assert (a >= 0).all()
    calls = []

    def orthogonal_guide(images):                        # every token its own direction: A = identity
        calls.append(tuple(images.shape))
        h, w = images.shape[2] // 8, images.shape[3] // 8
        return torch.eye(h * w).expand(len(images), -1, -1).reshape(len(images), h, w, h * w)

    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = Trident(guide=orthogonal_guide).features(tiny, x).tokens
        pre, _ = prelast_tokens(tiny.model.visual, x)
        value_only = last_block(tiny.model.visual.transformer.resblocks[-1], pre, value_attention,
                                residual=False, ffn=False)[:, 1:]
    assert calls == [(2, 3, 32, 32)]
    torch.testing.assert_close(ours.reshape(2, 16, -1), value_only, atol=1e-5, rtol=0)
    img = np.random.default_rng(4).integers(0, 256, (40, 52, 3), dtype=np.uint8)   # padded to the patch grid
    res = segment(tiny, [img], ["a", "b"], method="trident", window=32, stride=16, templates="default")
    assert res.masks[0].shape == (40, 52)
