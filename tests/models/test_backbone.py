import warnings

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from cliplab.errors import BadImage, UsageError
from cliplab.models.backbone import Backbone, Skipped
from cliplab.models.loading import default_preprocess_cfg, make_tokenizer
from cliplab.models.transforms import uint8_to_tensor

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


@pytest.fixture(params=["clip", "minilm"])
def any_tiny(request):
    """The same API tests on a CLIP Backbone and on a sentence-encoder (MiniLM) Backbone."""
    return request.getfixturevalue({"clip": "tiny", "minilm": "tiny_minilm"}[request.param])


@pytest.fixture(params=["clip", "minilm"])
def any_tiny_dir(request):
    return request.getfixturevalue({"clip": "tiny_dir", "minilm": "tiny_minilm_dir"}[request.param])


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


def test_encode_images_inputs_agree(any_tiny, tmp_path):
    rng = np.random.default_rng(0)
    arrs = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    paths = []
    for i, a in enumerate(arrs):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(a).save(paths[-1])
    from_paths = any_tiny.encode_images(paths, batch_size=2).features
    from_pil = any_tiny.encode_images([Image.fromarray(a) for a in arrs]).features
    from_arrays = any_tiny.encode_images(arrs).features
    from_tensor = any_tiny.encode_images(torch.stack([any_tiny.preprocess(Image.fromarray(a)) for a in arrs])).features
    assert from_paths.shape == (3, 32) and from_paths.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(from_paths, axis=1), 1, atol=1e-5)
    for other in (from_pil, from_arrays, from_tensor):
        np.testing.assert_allclose(other, from_paths, atol=2e-5)
    # a uint8 array at another size goes through the exact PIL path
    big = np.kron(arrs[0], np.ones((2, 2, 1), dtype=np.uint8))
    assert any_tiny.encode_images(big).features.shape == (1, 32)


def test_encode_images_bad_input(any_tiny, tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (40, 40), "red").save(good)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(BadImage, match="empty.jpg"):
        any_tiny.encode_images([good, empty])
    res = any_tiny.encode_images([empty, good, empty], on_error="skip")
    assert res.features.shape == (1, 32) and res.kept.tolist() == [1]
    assert [s.index for s in res.skipped] == [0, 2]
    assert res.skipped[0] == Skipped(0, str(empty), res.skipped[0].reason)
    np.testing.assert_allclose(res.features[0], any_tiny.encode_images(good).features[0], atol=1e-6)
    strict = any_tiny.encode_images([good, good])
    assert strict.kept.tolist() == [0, 1] and strict.skipped == []
    with pytest.raises(UsageError):
        any_tiny.encode_images([good], on_error="ignore")


def test_with_model_keeps_everything_but_the_model(any_tiny):
    import copy

    model = copy.deepcopy(any_tiny.model)
    with torch.no_grad():
        model.logit_scale.fill_(1.0)                                  # log space: s = e
    bb = any_tiny.with_model(model, name="copy")
    assert bb is not any_tiny and bb.model is model and any_tiny.model is not model
    assert (bb.name, bb.model_cfg, bb.preprocess_cfg, bb.tokenizer, bb.device, bb.precision) == (
        "copy", any_tiny.model_cfg, any_tiny.preprocess_cfg, any_tiny.tokenizer, any_tiny.device, any_tiny.precision)
    assert bb.logit_scale == pytest.approx(np.e) and any_tiny.logit_scale != pytest.approx(np.e)
    np.testing.assert_allclose(bb.encode_texts(["a red star"]), any_tiny.encode_texts(["a red star"]), atol=1e-6)


def test_image_tokens_shape(any_tiny):
    img = np.zeros((32, 32, 3), dtype=np.uint8)
    tokens = any_tiny.image_tokens([img, img])
    assert tokens.shape == (2, 16, 64)  # (32/8)^2 patches, width 64
    assert any_tiny.image_tokens(img, project=True).shape == (1, 16, 32)


def test_image_token_batch_is_image_tokens_and_the_pooled_embedding(any_tiny):
    imgs = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    x = uint8_to_tensor(list(imgs), any_tiny.preprocess_cfg)                  # (2, 3, 32, 32)
    pooled, tokens = any_tiny.image_token_batch(x)
    assert pooled.dtype == tokens.dtype == torch.float32 and tokens.shape == (2, 16, 64)
    np.testing.assert_allclose(tokens.numpy(), any_tiny.image_tokens(list(imgs)), atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(pooled, any_tiny.model.encode_image(x).float(), rtol=1e-5, atol=1e-5)
    assert any_tiny.model.visual.output_tokens is False                       # the toggle is restored


def test_text_tokens_pool_to_open_clips_text_features(tiny):
    texts = ["a red star.", "two blue squares on a striped background"]
    tok = tiny.text_tokens(texts)
    assert tok.shape == (2, tiny.context_length, 64)                  # every position, text width
    ids = tiny.tokenize(texts)
    pooled = torch.from_numpy(tok)[torch.arange(2), ids.argmax(dim=-1)] @ tiny.model.text_projection
    with torch.no_grad():
        want = tiny.model.encode_text(ids)                              # open_clip's own pooled feature
    assert torch.allclose(pooled, want, atol=1e-5)


def test_fingerprint_stable_and_sensitive(any_tiny_dir):
    import cliplab

    a, b = cliplab.load(any_tiny_dir), cliplab.load(any_tiny_dir)
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64
    with torch.no_grad():
        b.model.logit_scale.add_(1e-3)
    b.__dict__.pop("fingerprint")
    assert a.fingerprint != b.fingerprint


def test_logit_scale_and_repr(any_tiny):
    assert any_tiny.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)
    assert "embed_dim=32" in repr(any_tiny)
    assert any_tiny.encode_texts([]).shape == (0, 32)


# ------------------------------------------------------------- per-image cost bounds

_PEAK_SCRIPT = r"""
import json, resource, sys
import torch
torch.set_num_threads(1)
from PIL import Image
from _tiny import TINY_CFG, make_model
from cliplab.models.backbone import Backbone, Skipped
from cliplab.models.loading import default_preprocess_cfg, make_tokenizer
from cliplab.models.transforms import uint8_to_tensor

out, mode = sys.argv[1], sys.argv[2]
cfg = {**TINY_CFG, "vision_cfg": {**TINY_CFG["vision_cfg"], "image_size": 224, "patch_size": 32,
                                  "layers": 1}}
pp = dict(default_preprocess_cfg(cfg), resize_mode=mode)
bb = Backbone(make_model(cfg), model_cfg=cfg, preprocess_cfg=pp, tokenizer=make_tokenizer(cfg))
Image.new("RGB", (8000, 1), "red").save(f"{out}/wide.png")          # ~100 bytes
Image.new("RGB", (1_000_000, 1), "green").save(f"{out}/strip.png")  # ~3 KB
Image.new("RGB", (300, 200), "blue").save(f"{out}/good.png")
alone = bb.encode_images([f"{out}/good.png"]).features              # warm-up, the reference
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
res = bb.encode_images([f"{out}/wide.png", f"{out}/strip.png", f"{out}/good.png"],
                       on_error="skip", batch_size=2, workers=2)
feats, skipped = res.features, res.skipped
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"rise_mb": (peak - base) / 1024, "n": len(feats), "skipped": [s.reason for s in skipped],
                  "good_diff": float(abs(feats[-1] - alone[0]).max())}))
"""


@pytest.mark.parametrize("mode", ["shortest", "longest"])
def test_extreme_aspect_ratios_cost_bounded_memory(tmp_path, mode):
    """An 8000x1 and a 1,000,000x1 PNG next to a good image, 224-px preprocessing: the peak
    RSS rises by well under 300 MB (it was +1.6 GB and a MemoryError that lost the good
    image; with "longest", a ValueError), every image is embedded, and the good image's
    features are those it has alone."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "CLIPLAB_PROGRESS": "0",
           "PYTHONPATH": os.pathsep.join([tests, *sys.path])}
    run = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path), mode],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["rise_mb"] < 300, result
    assert result["good_diff"] < 1e-6
    # "shortest": cropped before the resize; "longest": the short side kept at 1 pixel
    assert result["n"] == 3 and result["skipped"] == []


def test_image_that_cannot_be_preprocessed_is_skipped(any_tiny, tmp_path):
    """A preprocessing failure of one image (ValueError, MemoryError) is that image's
    BadImage: skipped and reported with on_error="skip", the others kept."""
    good, odd = tmp_path / "good.png", tmp_path / "odd.png"
    Image.new("RGB", (40, 40), "red").save(good)
    Image.new("RGB", (41, 40), "red").save(odd)
    expected = any_tiny.encode_images([good]).features
    bb = Backbone(any_tiny.model, model_cfg=any_tiny.model_cfg, preprocess_cfg=any_tiny.preprocess_cfg,
                  tokenizer=any_tiny.tokenizer)
    transform = bb.preprocess

    def fussy(img):
        if img.width == 41:
            raise MemoryError
        return transform(img)

    bb.preprocess = fussy
    res = bb.encode_images([odd, good], on_error="skip", workers=2)
    np.testing.assert_allclose(res.features, expected, atol=1e-6)
    assert [(s.index, s.reason) for s in res.skipped] == [(0, "cannot preprocess a 41x40 image (MemoryError: )")]
    with pytest.raises(BadImage, match="odd.png: cannot preprocess"):
        bb.encode_images([odd, good])


def _smooth(h, w):
    y, x = np.mgrid[0:h, 0:w]
    rgb = [127 + 120 * np.sin(x / 37.0 + c) * np.cos(y / 53.0 - c) for c in (0, 1, 2)]
    return Image.fromarray(np.stack(rgb, -1).round().astype(np.uint8))


@pytest.mark.parametrize("size", [(10, 1000), (1, 8000), (7, 3000), (1000, 10), (3000, 7), (480, 640)])
def test_crop_before_resize_matches_open_clips_transform(size):
    """Past MAX_RESIZE_RATIO the crop is taken before the resize.  Against open_clip's
    resize-then-crop transform: identical on wide images (noise, where any offset or
    scale error shows), within PIL's rounding between its two passes on tall ones;
    images below the ratio take open_clip's own path."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from cliplab.models.transforms import MAX_RESIZE_RATIO, make_preprocess

    cfg = default_preprocess_cfg({**TINY_CFG, "vision_cfg": {**TINY_CFG["vision_cfg"], "image_size": 224}})
    ours = make_preprocess(cfg)
    theirs = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    h, w = size
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))
    extreme = max(h, w) / min(h, w) > MAX_RESIZE_RATIO
    assert (ours.transforms[0](noise).size == (224, 224)) == extreme
    if w >= h:
        assert torch.equal(ours(noise), theirs(noise))
    smooth = _smooth(h, w)
    step = 1 / 255 / min(cfg["std"])  # one grey level, normalised
    assert (ours(smooth) - theirs(smooth)).abs().max() <= 2 * step


@pytest.mark.filterwarnings("ignore:.*longer than the context length")
def test_encode_texts_in_chunks_equals_one_chunk(any_tiny, monkeypatch):
    """Token ids (8 bytes x context per text) are made TEXT_CHUNK texts at a time; the
    features do not depend on the chunking, on either text path."""
    from cliplab.models import backbone as backbone_module

    whole = [any_tiny.encode_texts(PROMPTS, batch_size=2, fast=fast) for fast in (True, False)]
    monkeypatch.setattr(backbone_module, "TEXT_CHUNK", 4)
    for fast, expected in zip((True, False), whole):
        np.testing.assert_allclose(any_tiny.encode_texts(PROMPTS, batch_size=2, fast=fast), expected, atol=1e-6)


def test_longest_mode_keeps_a_one_pixel_side():
    """resize_mode="longest": open_clip's transform raises on a side that rounds to 0
    pixels (aspect ratio above 2 x 224); ours keeps it at 1 pixel and pads, and equals
    open_clip's wherever open_clip works."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from cliplab.models.transforms import make_preprocess

    cfg = dict(default_preprocess_cfg({**TINY_CFG, "vision_cfg": {**TINY_CFG["vision_cfg"],
                                                                 "image_size": 224}}), resize_mode="longest")
    ours, theirs = make_preprocess(cfg), image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    for w, h in [(640, 480), (400, 1)]:
        img = _smooth(h, w)
        assert torch.equal(ours(img), theirs(img))
    strip = Image.new("RGB", (1000, 1), (255, 0, 0))
    with pytest.raises(ValueError):
        theirs(strip)
    x = ours(strip)
    assert x.shape == (3, 224, 224)
    red = ours(Image.new("RGB", (4, 4), (255, 0, 0)))[:, 0, 0]
    rows = [r for r in range(224) if torch.equal(x[:, r, 0], red)]
    assert len(rows) == 1  # one red line, the rest padding
