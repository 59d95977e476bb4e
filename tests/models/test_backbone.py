import warnings

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from cliplab.errors import BadImage, UsageError
from cliplab.models.backbone import Backbone
from cliplab.models.loading import default_preprocess_cfg, make_tokenizer

from _tiny import TINY_CFG, make_model

PROMPTS = [
    "a photo of a cat.",
    "dog",
    "",
    "a very long prompt " * 20,           # cut at the context length
    "an image of a small red star on the left side of a gradient background",
    "x",
]


def wrap(model, cfg):
    return Backbone(model, model_cfg=cfg, preprocess_cfg=default_preprocess_cfg(cfg),
                    tokenizer=make_tokenizer(cfg), name="t")


def reference_text(model, tokens):
    with torch.no_grad():
        return torch.nn.functional.normalize(model.encode_text(tokens), dim=-1).numpy()


@pytest.mark.parametrize("which", ["tiny", "ViT-B-32"])
def test_fast_text_path_matches_open_clip(which):
    if which == "tiny":
        cfg, model = TINY_CFG, make_model()
    else:
        cfg = open_clip.get_model_config("ViT-B-32")
        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-32").eval()
    bb = wrap(model, cfg)
    prompts = PROMPTS * 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokens = bb.tokenize(prompts)
        fast = bb.encode_texts(prompts, batch_size=4)
    ref = reference_text(model, tokens)
    assert fast.dtype == np.float32 and fast.shape == ref.shape
    np.testing.assert_allclose(fast, ref, atol=1e-5)
    slow = bb.encode_texts(prompts, fast=False)
    np.testing.assert_allclose(slow, ref, atol=1e-6)


def test_tokenize_matches_open_clip_and_warns_once(tiny_dir):
    import cliplab

    tiny = cliplab.load(tiny_dir)          # a fresh Backbone: the shared one may have warned already
    ref = open_clip.tokenizer.SimpleTokenizer(context_length=24)(PROMPTS)
    with pytest.warns(UserWarning, match="truncated"):
        ours = tiny.tokenize(PROMPTS)
    assert torch.equal(ours, ref)
    assert ours[3, -1] == tiny.tokenizer.eot_token_id
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny.tokenize(PROMPTS)  # second time: no warning


def test_encode_images_inputs_agree(tiny, tmp_path):
    rng = np.random.default_rng(0)
    arrs = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    paths = []
    for i, a in enumerate(arrs):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(a).save(paths[-1])
    from_paths = tiny.encode_images(paths, batch_size=2)
    from_pil = tiny.encode_images([Image.fromarray(a) for a in arrs])
    from_arrays = tiny.encode_images(arrs)
    from_tensor = tiny.encode_images(torch.stack([tiny.preprocess(Image.fromarray(a)) for a in arrs]))
    assert from_paths.shape == (3, 32) and from_paths.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(from_paths, axis=1), 1, atol=1e-5)
    for other in (from_pil, from_arrays, from_tensor):
        np.testing.assert_allclose(other, from_paths, atol=2e-5)
    # a uint8 array at another size goes through the exact PIL path
    big = np.kron(arrs[0], np.ones((2, 2, 1), dtype=np.uint8))
    assert tiny.encode_images(big).shape == (1, 32)


def test_encode_images_bad_input(tiny, tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (40, 40), "red").save(good)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(BadImage, match="empty.jpg"):
        tiny.encode_images([good, empty])
    feats, skipped = tiny.encode_images([empty, good, empty], on_error="skip")
    assert feats.shape == (1, 32)
    assert [s.index for s in skipped] == [0, 2]
    np.testing.assert_allclose(feats[0], tiny.encode_images(good)[0], atol=1e-6)
    with pytest.raises(UsageError):
        tiny.encode_images([good], on_error="ignore")


def test_image_tokens_shape(tiny):
    img = np.zeros((32, 32, 3), dtype=np.uint8)
    tokens = tiny.image_tokens([img, img])
    assert tokens.shape == (2, 16, 64)  # (32/8)^2 patches, width 64
    assert tiny.image_tokens(img, project=True).shape == (1, 16, 32)


def test_fingerprint_stable_and_sensitive(tiny_dir):
    import cliplab

    a, b = cliplab.load(tiny_dir), cliplab.load(tiny_dir)
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64
    with torch.no_grad():
        b.model.logit_scale.add_(1e-3)
    b.__dict__.pop("fingerprint")
    assert a.fingerprint != b.fingerprint


def test_logit_scale_and_repr(tiny):
    assert tiny.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)
    assert "embed_dim=32" in repr(tiny)
    assert tiny.encode_texts([]).shape == (0, 32)
