"""CLIP-DINOiser: heads, correlation pooling, FOUND background, training through the Trainer, save/load, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cliplab.dense import DENSE_METHODS, segment
from cliplab.dense.clip_dinoiser import (CLIPDinoiser, DinoiserHeads, SceneImages, clip_dinoiser_features,
                                         correlation_pool, found_background, guide_correlations, load_heads,
                                         make_guide, save_heads, train_clip_dinoiser)
from cliplab.errors import DataError

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(0)
    return torch.randn(2, 3, 32, 32)


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """Heads trained for a few steps on 16 ShapesWorld scenes; the run's folder and the model's weights before."""
    out = tmp_path_factory.mktemp("dinoiser")
    before = {k: v.detach().clone() for k, v in tiny.model.state_dict().items()}
    grads = [p.requires_grad for p in tiny.model.parameters()]
    heads = train_clip_dinoiser(tiny, images=SceneImages(size=32, n=16), steps=30, batch_size=8, lr=1e-2,
                                warmup_steps=0, feats_idx=-1, in_dim=16, out=out, progress=False)
    return heads, out, before, grads


def test_head_output_shapes_and_inner_features(tiny, images):
    with torch.no_grad():
        feats, inner = clip_dinoiser_features(tiny, images, feats_idx=-2)
        bkg, corrs = DinoiserHeads(64, in_dim=16, feats_idx=-2)(inner)
        # the heads read ln_2 of block -2 in the unchanged forward pass, as the reference hooks it
        seen = {}
        hook = tiny.model.visual.transformer.resblocks[-2].ln_2.register_forward_hook(
            lambda m, i, o: seen.__setitem__("x", o))
        try:
            tiny.model.visual(images)
        finally:
            hook.remove()
        mc = DENSE_METHODS.get("maskclip")().features(tiny, images).tokens         # (B, h, w, D)
    assert feats.shape == (2, 32, 4, 4) and inner.shape == (2, 64, 4, 4)
    assert bkg.shape == (2, 1, 4, 4) and corrs.shape == (2, 16, 4, 4)
    torch.testing.assert_close(inner, seen["x"][:, 1:].reshape(2, 4, 4, 64).permute(0, 3, 1, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(feats, mc.permute(0, 3, 1, 2), atol=1e-5, rtol=0)
    diag = corrs.reshape(2, 16, 16).diagonal(dim1=1, dim2=2)
    torch.testing.assert_close(diag, torch.ones(2, 16), atol=1e-5, rtol=0)       # cosines: 1 on the diagonal


def test_identity_correlations_reproduce_maskclip(tiny, images):
    with torch.no_grad():
        feats, _ = clip_dinoiser_features(tiny, images, "final")
    eye = torch.eye(16).reshape(1, 16, 4, 4).expand(2, -1, -1, -1)
    torch.testing.assert_close(correlation_pool(feats, eye), feats, atol=1e-5, rtol=1e-5)
    # end to end: a guide whose tokens are one-hot per patch has identity correlations
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    one_hot = lambda x: torch.eye(16).expand(len(x), 16, 16).reshape(len(x), 4, 4, 16)   # noqa: E731
    ours = segment(tiny, [img], ["cat", "dog", "car"], method="clip-dinoiser", guide=one_hot,
                   templates="default", return_probs=True)
    ref = segment(tiny, [img], ["cat", "dog", "car"], method="maskclip", templates="default", return_probs=True)
    np.testing.assert_allclose(ours.probs[0], ref.probs[0], atol=1e-4)


def test_pooling_averages_the_correlated_patches():
    feats = torch.arange(4.0).reshape(1, 1, 2, 2)                                # patch values 0, 1, 2, 3
    corrs = torch.zeros(1, 4, 2, 2)
    corrs[0, 0].view(-1)[[0, 1]] = 1.0                                           # patch 0 pools patches 0 and 1
    corrs[0, 1].view(-1)[1] = 1.0
    corrs[0, 2].view(-1)[[2, 3]] = torch.tensor([1.0, 3.0])
    corrs[0, 3].view(-1)[3] = 1.0
    out = correlation_pool(feats, corrs).flatten()
    torch.testing.assert_close(out, torch.tensor([0.5, 1.0, (2 + 9) / 4, 3.0]), atol=1e-5, rtol=0)


def test_guide_correlations_threshold_and_found_background():
    values = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]]])
    c = guide_correlations(values, 0.2)
    assert (c[0, 0] > 0).tolist() == [True, True, False, False]
    # patches 0-1 one object, 2-3 the background; the class token attends patch 3 least
    att = torch.tensor([[[0.4, 0.4, 0.15, 0.05], [0.45, 0.35, 0.1, 0.1]]])       # (B, H, N)
    keys = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]]])[:, :, None, :].repeat(1, 1, 2, 1)
    bkg = found_background(att, keys, th_bkg=0.3)
    assert bkg.tolist() == [[False, False, True, True]]


def test_background_step_sets_uncertain_background_patches_to_class_0():
    meth = CLIPDinoiser(apply_found=True, delta=0.99)
    logits = torch.tensor([0.0, 0.01, 0.02])[None, :, None, None].repeat(1, 1, 1, 3)   # uncertain everywhere
    logits[0, 2, 0, 2] = 0.5                                                            # certain at patch 2
    fg = torch.tensor([[[False, True, False]]])
    from cliplab.dense.base import DenseFeatures

    out = meth.refine(logits, DenseFeatures(torch.zeros(1, 1, 3, 4), {"foreground": fg,
                                                                          "query_owner": torch.tensor([0, 1, 2])}))
    assert out.argmax(1).tolist() == [[[0, 2, 2]]]                  # background only where uncertain and not fg


def test_trainer_run_lowers_the_loss_and_keeps_the_backbone_frozen(tiny, trained):
    heads, out, before, grads = trained
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_corr", "loss_bkg"} <= set(rows[0])
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.01
    for k, v in tiny.model.state_dict().items():
        assert torch.equal(v, before[k]), k                                      # bit-identical
    assert [p.requires_grad for p in tiny.model.parameters()] == grads
    assert not heads.training and heads.config["feats_idx"] == -1


def test_save_load_round_trip_gives_identical_maps(tiny, trained, tmp_path):
    heads, out, _, _ = trained
    loaded = load_heads(out)
    assert loaded.config["in_dim"] == 16 and loaded.config["gamma"] == heads.config["gamma"]
    for k, v in heads.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    img = np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    a = segment(tiny, [img], ["cat", "dog"], background="background", method="clip-dinoiser", head=heads,
                templates="default", window=32, stride=16, return_probs=True)
    b = segment(tiny, [img], ["cat", "dog"], background="background", method="clip-dinoiser", head=out,
                templates="default", window=32, stride=16, return_probs=True)
    np.testing.assert_array_equal(a.probs[0], b.probs[0])
    np.testing.assert_array_equal(a.masks[0], b.masks[0])
    save_heads(loaded, tmp_path / "again")
    assert load_heads(tmp_path / "again").config == loaded.config
    with pytest.raises(DataError, match="not a folder of CLIP-DINOiser heads"):
        load_heads(tmp_path)


def test_a_timm_vit_and_a_second_backbone_plug_in_as_guides(tiny, tiny_dir, images):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=1,
                            num_classes=0).eval()
    guide = make_guide(vit)
    with torch.no_grad():
        sig = guide.signals(images, MEAN.flatten().tolist(), STD.flatten().tolist(), (4, 4))
    assert sig.values.shape == (2, 16, 192) and sig.keys.shape == (2, 16, 3, 64)
    assert sig.cls_attention.shape == (2, 3, 16)
    img = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    res = segment(tiny, [img], ["a", "b"], background="background", method="clip-dinoiser", guide=vit,
                  apply_found=True, templates="default")
    assert res.masks[0].shape == (32, 32)
    second = make_guide(str(tiny_dir))                                            # a model spec
    with torch.no_grad():
        s2 = second.signals(images, MEAN.flatten().tolist(), STD.flatten().tolist(), (4, 4))
    assert s2.values.shape == (2, 16, 64)


def test_cli_runs_with_clip_dinoiser(tiny, tiny_dir, trained, tmp_path, capsys):
    from cliplab.cli.main import main

    _, out, _, _ = trained
    folder = tmp_path / "in"
    folder.mkdir()
    img = np.random.default_rng(3).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    Image.fromarray(img).save(folder / "a.png")
    rc = main(["segment", str(folder), "--labels", "cat,dog", "--background", "background", "--method",
               "clip-dinoiser", "--head", str(out), "--templates", "default", "--model", str(tiny_dir),
               "--out", str(tmp_path / "seg")])
    assert rc == 0
    res = segment(tiny, [folder / "a.png"], ["cat", "dog"], background="background", method="clip-dinoiser",
                  head=out, templates="default")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "seg" / "a.png")), res.masks[0])
    capsys.readouterr()
    rc = main(["segment", str(folder), "--labels", "a,b", "--method", "sclip", "--head", str(out),
               "--model", str(tiny_dir), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--head is for --method clip-dinoiser" in err and "\n" not in err
    rc = main(["segment", str(folder), "--labels", "a,b", "--method", "clip-dinoiser", "--head", str(folder),
               "--model", str(tiny_dir), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 4 and "not a folder of CLIP-DINOiser heads" in err and "\n" not in err
