"""ExCEL: text enrichment, static visual calibration, feature surgery, refinement, pseudo-masks, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cliplab.dense import segment
from cliplab.dense.attention import prelast_tokens, project_tokens, qkv
from cliplab.dense.excel import (ExCEL, _box_mask, cam_pseudo_masks, default_descriptions, description_bank,
                                 enrich_text, feature_surgery, par_refine, refine_cams, svc_tokens,
                                 transition_matrix)
from cliplab.dense.vanilla import Vanilla
from cliplab.errors import UsageError


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_text_enrichment_closed_form():
    rng = np.random.default_rng(0)
    t = rng.normal(size=(2, 4))
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    bank = rng.normal(size=(4, 20))
    # keep=None: every bank entry weighs in
    expect = t + _softmax(t @ bank) @ bank.T
    expect /= np.linalg.norm(expect, axis=1, keepdims=True)
    got = enrich_text(torch.tensor(t), torch.tensor(bank), keep=None).numpy()
    np.testing.assert_allclose(got, expect, atol=1e-6)
    # keep=0.75 of 20: the 5 lowest scores of each class get weight 0
    scores = t @ bank
    for c in range(2):
        top = np.argsort(-scores[c])[:15]
        e = t[c] + _softmax(scores[c, top]) @ bank[:, top].T
        np.testing.assert_allclose(enrich_text(torch.tensor(t), torch.tensor(bank), keep=0.75).numpy()[c],
                                   e / np.linalg.norm(e), atol=1e-6)


def test_description_bank_size_and_default_descriptions(tiny):
    desc = default_descriptions(["cat", "dog"], prompt="a photo of a {c}.")
    assert len(desc["cat"]) == 10 and desc["dog"][0].startswith("a photo of a dog. ")
    bank = description_bank(tiny, desc)
    assert bank.shape == (tiny.embed_dim, 6)                                 # ceil(0.28 * 20)
    assert description_bank(tiny, desc, n_clusters=3).shape == (tiny.embed_dim, 3)


def test_svc_off_is_the_tower_and_on_is_the_closed_form(tiny):
    visual = tiny.model.visual
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain, att, grid = svc_tokens(visual, x, calibrate=False)
        ref = Vanilla().features(tiny, x).tokens.reshape(2, -1, tiny.embed_dim)
        np.testing.assert_allclose(plain[:, 1:].numpy(), ref.numpy(), atol=1e-5)
        # one calibrated block, by hand: x' = x_L + W_o (Σ_heads mean(softmax qq, kk, vv)) v, no FFN
        z, att1, _ = svc_tokens(visual, x, layers=1, positions="size")
        xl, _ = prelast_tokens(visual, x)
        block = visual.transformer.resblocks[-1]
        q, k, v = qkv(block, xl)
        s = q.shape[-1] ** -0.5
        a = sum(torch.softmax(m @ m.transpose(-2, -1) * s, -1) for m in (q, k, v)) / 3
        a = a.sum(1, keepdim=True)                                           # rows sum to the head count
        np.testing.assert_allclose(a.sum(-1).numpy(), block.attn.num_heads, rtol=1e-5)
        new = xl + block.attn.out_proj((a @ v).transpose(1, 2).reshape(xl.shape))
        np.testing.assert_allclose(z[:, 1:].numpy(), project_tokens(visual, new)[:, 1:].numpy(), atol=1e-5)
        np.testing.assert_allclose(z[:, 0].numpy(), plain[:, 0].numpy(), atol=1e-5)   # class token: original path
    assert grid == (4, 4) and len(att) == len(visual.transformer.resblocks)
    # attention as the reference returns it: head mean before the calibrated block, head sum in it
    np.testing.assert_allclose(att1[0].sum(-1).numpy(), 1, rtol=1e-5)
    np.testing.assert_allclose(att1[-1].sum(-1).numpy(), block.attn.num_heads, rtol=1e-5)


def test_feature_surgery_closed_form():
    f = torch.tensor([[[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-0.6, 0.8]]])    # class token first
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = _softmax(2 * (f[0, 0] @ t.T).numpy())
    w = p / p.mean()
    sim = w * (f[0] @ t.T).numpy()
    sim -= sim.mean(1, keepdims=True)
    expect = (sim - sim.min(0)) / (sim.max(0) - sim.min(0))
    np.testing.assert_allclose(feature_surgery(f, t)[0].numpy(), expect, atol=1e-6)
    raw = feature_surgery(f, t, minmax=False)[0]
    np.testing.assert_allclose(raw[:, 0].numpy(), -raw[:, 1].numpy(), atol=1e-7)   # two classes: antisymmetric


def test_transition_matrix_and_box_mask_closed_forms():
    n = 5
    a = (torch.full((n, n), 1 / n) + torch.eye(n)) / 2                       # symmetric, doubly stochastic
    np.testing.assert_allclose(transition_matrix(a).numpy(), (a @ a).numpy(), atol=1e-6)
    cam = np.zeros((6, 6))
    cam[1:3, 1:3] = 1.0                                                       # a blob
    cam[4:6, 4:6] = 0.95                                                      # a second one at the border
    m = _box_mask(cam, 0.79)
    expect = np.zeros((6, 6), bool)
    expect[1:3, 1:3] = True
    expect[4:5, 4:5] = True                                                   # the reference's end min(x + w, W - 1)
    np.testing.assert_array_equal(m, expect)


def test_refine_with_identity_attention_keeps_the_cam_inside_its_boxes():
    cams = torch.zeros(1, 6, 6)
    cams[0, 1:3, 1:3] = 1.0
    cams[0, 4, 0] = 0.3                                                       # below 0.79 of the max: outside the boxes
    eye = [torch.eye(37) for _ in range(3)]
    out = refine_cams(cams, eye)
    expect = torch.zeros(1, 6, 6)
    expect[0, 1:3, 1:3] = 1.0
    np.testing.assert_allclose(out.numpy(), expect.numpy(), atol=1e-6)


def test_par_keeps_constants_up_to_its_position_term():
    img = torch.rand(1, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    m = torch.full((1, 2, 20, 24), 0.5)
    # each step: softmax weights (sum 1) + 0.01 * softmax weights (sum 1) -> constants grow by 1.01
    np.testing.assert_allclose(par_refine(img, m, iterations=3).numpy(), 0.5 * 1.01 ** 3, rtol=1e-5)
    # a class score follows colour: a two-colour image's halves stay apart
    img = torch.zeros(1, 3, 16, 16)
    img[..., 8:] = 1
    m = torch.zeros(1, 2, 16, 16)
    m[:, 0, :, :8], m[:, 1, :, 8:] = 1, 1
    out = par_refine(img, m, iterations=5)
    assert (out[0].argmax(0) == m[0].argmax(0)).all()


@pytest.fixture(scope="module")
def scenes():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(3)]


def test_pseudo_masks_only_use_image_level_labels(tiny, scenes):
    classes = ["cat", "dog", "car", "tree"]
    labels = [["dog", "tree"], [0], []]
    masks = cam_pseudo_masks(tiny, scenes, labels, classes, templates="default", background=["sky", "wall"])
    assert [m.shape for m in masks] == [(40, 48)] * 3 and masks[0].dtype == np.int32
    assert set(np.unique(masks[0])) <= {0, 2, 4} and len(set(np.unique(masks[0])) - {0}) >= 1
    assert set(np.unique(masks[1])) <= {0, 1}
    assert (masks[2] == 0).all()                                              # no labels: all background
    hot = np.array([[0, 1, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0]])
    again = cam_pseudo_masks(tiny, scenes, hot, classes, templates="default", background=["sky", "wall"])
    for a, b in zip(masks, again):
        np.testing.assert_array_equal(a, b)
    plain = cam_pseudo_masks(tiny, scenes, labels, classes, templates="default", tse=False, layers=0,
                             surgery=False, refine=False, background=())
    assert set(np.unique(plain[0])) <= {0, 2, 4}
    with pytest.raises(UsageError, match="not one of the classes"):
        cam_pseudo_masks(tiny, scenes, [["bus"], [], []], classes, templates="default")
    with pytest.raises(UsageError, match="3 images but 2"):
        cam_pseudo_masks(tiny, scenes, [[0], [1]], classes, templates="default")


def test_segment_refine_is_surgery_on_cosines(tiny, scenes):
    meth = ExCEL(tse=False)
    q = F.normalize(torch.randn(3, tiny.embed_dim, generator=torch.Generator().manual_seed(1)), dim=-1)
    meth.text_queries(tiny, ["a", "b", "c"], q.numpy(), np.arange(3))
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        feats = meth.features(tiny, x)
        logits = torch.einsum("bhwd,qd->bqhw", F.normalize(feats.tokens, dim=-1), q)
        got = meth.refine(logits, feats)
        z, _, _ = svc_tokens(tiny.model.visual, x)
        expect = feature_surgery(F.normalize(z, dim=-1), q, minmax=False)[:, 1:]   # (1, N, Q)
    np.testing.assert_allclose(got.flatten(2).transpose(1, 2).numpy(), expect.numpy(), atol=1e-5)


def test_segment_with_text_enrichment_changes_only_foreground_queries(tiny, scenes):
    meth = ExCEL(prompt="a photo of a {c}.")
    q = F.normalize(torch.randn(4, tiny.embed_dim, generator=torch.Generator().manual_seed(3)), dim=-1).numpy()
    out = meth.text_queries(tiny, ["background", "cat", "dog"], q.copy(), np.array([0, 0, 1, 2]), background=True)
    np.testing.assert_array_equal(out[:2], q[:2])
    assert np.abs(out[2:] - q[2:]).max() > 1e-4
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, rtol=1e-5)
    res = segment(tiny, scenes[:1], ["cat", "dog"], method="excel", background="background", templates="default",
                  window=32, stride=16)
    assert res.masks[0].shape == (40, 48) and res.method == "excel"


def test_cli_segment_with_excel(tiny_dir, scenes, tmp_path):
    from cliplab.cli.main import main

    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(scenes[0]).save(folder / "a.png")
    rc = main(["segment", str(folder), "--labels", "cat,dog", "--method", "excel", "--templates", "default",
               "--model", str(tiny_dir), "--out", str(tmp_path / "out")])
    assert rc == 0
    mask = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    assert mask.shape == (40, 48) and set(np.unique(mask)) <= {0, 1}
