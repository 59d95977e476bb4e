import time

import numpy as np
import pytest
import torch

import cliplab
from cliplab.errors import AmbiguousCheckpoint, CheckpointMismatch, ModelLoadError, OfflineError, UnsafeCheckpoint, UsageError
from cliplab.models.loading import SOURCES, list_sources

from _tiny import TINY_CFG, make_model

TEXTS = ["a photo of a cat.", "a dog"]


def features(bb):
    img = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    return bb.encode_texts(TEXTS), bb.encode_images(img).features


def test_sources_registered():
    assert {"bundled", "local", "open_clip-tag", "hf-hub"} <= set(list_sources())
    assert list_sources()[:4] == ["bundled", "local", "open_clip-tag", "hf-hub"]   # the order load tries
    for name in list_sources():
        meta = SOURCES.meta(name)
        assert callable(meta["match"]) and meta["help"]
        first = next(n for n in list_sources() if SOURCES.meta(n)["match"](meta["example"]))
        assert first == name, f"the example spec {meta['example']!r} of {name!r} is taken by {first!r}"


def test_first_matching_source_loads(tiny_dir, tiny):
    """A registered source answers its specs; an earlier source that matches wins."""
    def alias(spec, opts):
        return SOURCES.get("local")(str(tiny_dir), opts)

    SOURCES.register("test-alias", match=lambda spec: spec == "tiny-alias", help="test")(alias)
    try:
        assert cliplab.load("tiny-alias").fingerprint == tiny.fingerprint
        with pytest.raises(ModelLoadError, match="cannot resolve"):
            cliplab.load("tiny-alias-2")
    finally:
        SOURCES.unregister("test-alias")
    with pytest.raises(ModelLoadError, match="cannot resolve"):
        cliplab.load("tiny-alias")


def test_open_clip_folder_matches_the_model(tiny_dir, tiny):
    import open_clip

    ref = open_clip.create_model("local-dir:" + str(tiny_dir)).eval()
    tokens = tiny.tokenize(TEXTS)
    with torch.no_grad():
        want = torch.nn.functional.normalize(ref.encode_text(tokens), dim=-1).numpy()
    np.testing.assert_allclose(tiny.encode_texts(TEXTS), want, atol=1e-5)


# Head counts are not visible in tensor shapes; OpenAI's format implies 64-wide heads,
# so the OpenAI-format tests use them.
INFERABLE_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 64},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2},
}


def _save_plain(model_or_sd, path):
    """Weights saved bare with plain safetensors: no metadata, no config."""
    from safetensors.torch import save_file

    sd = model_or_sd.state_dict() if hasattr(model_or_sd, "state_dict") else model_or_sd
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return path


def _backbone(model, cfg):
    from cliplab.models.backbone import Backbone
    from cliplab.models.loading import default_preprocess_cfg, make_tokenizer

    return Backbone(model, model_cfg=cfg, preprocess_cfg=default_preprocess_cfg(cfg), tokenizer=make_tokenizer(cfg))


def _assert_same_features(a, b, atol=1e-6):
    for x, y in zip(features(a), features(b)):
        np.testing.assert_allclose(x, y, atol=atol)


def test_bare_weights_without_config_are_refused_not_guessed(tmp_path):
    f = _save_plain(make_model(INFERABLE_CFG), tmp_path / "weights.safetensors")
    with pytest.raises(AmbiguousCheckpoint) as e:
        cliplab.load(f)
    msg = str(e.value)
    assert "\n" not in msg
    for names_the_fix in ("head count", "heads= (--heads)", "GELU or QuickGELU", "quick_gelu=", "arch= (--arch"):
        assert names_the_fix in msg
    assert e.value.exit_code == 3
    # given what the shapes cannot tell, it loads exactly
    given = cliplab.load(f, heads={"vision": 1, "text": 1}, quick_gelu=False)
    _assert_same_features(given, _backbone(make_model(INFERABLE_CFG), INFERABLE_CFG))
    # only the activation given: still refused, naming only the head count
    with pytest.raises(AmbiguousCheckpoint) as e:
        cliplab.load(f, quick_gelu=False)
    assert "heads=" in str(e.value) and "quick_gelu=" not in str(e.value)
    # a config JSON beside the file is the model's config
    (tmp_path / "weights.json").write_text(__import__("json").dumps({"model_cfg": INFERABLE_CFG}))
    assert cliplab.load(f).model_cfg == INFERABLE_CFG


def test_shapes_tiny_resaved_bare_by_cliplab_loads_back_exactly(tmp_path):
    original = cliplab.load("shapes-tiny")
    f = original.save(tmp_path / "shapes-tiny.safetensors")
    assert f.is_file() and not (tmp_path / "shapes-tiny.json").exists()   # one file, config inside
    loaded = cliplab.load(f)
    assert loaded.model_cfg == {**original.model_cfg, "quick_gelu": False}
    assert loaded.preprocess_cfg == original.preprocess_cfg
    _assert_same_features(loaded, original, atol=0)
    # the weights file of a saved folder, copied out alone, loads back exactly too
    original.save(tmp_path / "folder")
    alone = tmp_path / "alone" / "w.safetensors"
    alone.parent.mkdir()
    alone.write_bytes((tmp_path / "folder" / "open_clip_model.safetensors").read_bytes())
    _assert_same_features(cliplab.load(alone), original, atol=0)


def test_shapes_tiny_saved_with_plain_safetensors_is_refused(tmp_path):
    original = cliplab.load("shapes-tiny")
    f = _save_plain(original.model, tmp_path / "shapes-tiny.safetensors")
    with pytest.raises(AmbiguousCheckpoint, match="heads=.*quick_gelu="):
        cliplab.load(f)
    # the old guess (64-wide heads) computes something else: the head count matters
    guessed = cliplab.load(f, heads=2, quick_gelu=False)
    cos = (guessed.encode_texts(TEXTS) * original.encode_texts(TEXTS)).sum(-1)
    assert cos.min() < 0.99
    # the true values (shapes-tiny: head_width 32 -> 4 heads; text 4 heads; GELU) load exactly
    exact = cliplab.load(f, heads={"vision": 4, "text": 4}, quick_gelu=False)
    assert exact.model_cfg["vision_cfg"]["head_width"] == 32 and exact.model_cfg["text_cfg"]["heads"] == 4
    for a, b in zip(features(exact), features(original)):
        np.testing.assert_allclose(a, b, atol=2e-6)


WIDTH_32_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def test_width_32_model_saved_bare_is_refused_cleanly(tmp_path, capsys):
    from cliplab.cli.main import main
    from PIL import Image

    f = _save_plain(make_model(WIDTH_32_CFG), tmp_path / "w32.safetensors")
    with pytest.raises(AmbiguousCheckpoint, match="vision width 32, text width 32"):
        cliplab.load(f)
    Image.new("RGB", (16, 16), "red").save(tmp_path / "img.png")
    capsys.readouterr()
    assert main(["classify", str(tmp_path / "img.png"), "--labels", "a,b", "--model", str(f)]) == 3
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--heads" in err and "--quick-gelu" in err
    # with the values given on the command line, it classifies
    assert main(["classify", str(tmp_path / "img.png"), "--labels", "a,b", "--model", str(f),
                 "--heads", "2", "--no-quick-gelu"]) == 0
    # OpenAI's convention (64-wide heads) cannot hold at width 32: refused, not 0 heads
    sd = make_model(WIDTH_32_CFG).state_dict()
    sd["input_resolution"], sd["context_length"], sd["vocab_size"] = (torch.tensor(v) for v in (16, 16, 49408))
    torch.save(sd, tmp_path / "openai32.pt")
    with pytest.raises(AmbiguousCheckpoint, match="64-wide heads"):
        cliplab.load(tmp_path / "openai32.pt")
    # a head count that does not divide the width is a usage error
    with pytest.raises(UsageError, match="divisor"):
        cliplab.load(f, heads=3, quick_gelu=False)


QUICKGELU_CFG = {**INFERABLE_CFG, "quick_gelu": True}   # like ViT-B-16-quickgelu, small


def test_bare_quickgelu_state_dict_is_not_loaded_as_gelu(tmp_path):
    model = make_model(QUICKGELU_CFG)
    f = _save_plain(model, tmp_path / "vit-quickgelu.safetensors")
    with pytest.raises(AmbiguousCheckpoint, match="GELU or QuickGELU"):
        cliplab.load(f, heads=1)
    with pytest.raises(AmbiguousCheckpoint, match="GELU or QuickGELU"):
        cliplab.load(f)
    ref = _backbone(model, QUICKGELU_CFG)
    _assert_same_features(cliplab.load(f, heads=1, quick_gelu=True), ref)
    # the activation changes the features, so guessing GELU would have been wrong
    gelu = cliplab.load(f, heads=1, quick_gelu=False)
    assert np.abs(gelu.encode_texts(TEXTS) - ref.encode_texts(TEXTS)).max() > 1e-4
    # saved by cliplab, it needs no flags
    g = ref.save(tmp_path / "by-cliplab.safetensors")
    loaded = cliplab.load(g)
    assert loaded.model_cfg["quick_gelu"] is True
    _assert_same_features(loaded, ref)


def test_quick_gelu_choice_is_built_into_open_clip_tag_models(monkeypatch):
    """The model that open_clip builds for ARCH:TAG uses the activation that model_cfg reports."""
    import open_clip

    import cliplab.models.loading as loading

    calls = []

    def fake_create_model(arch, **kwargs):
        calls.append(kwargs)
        return make_model(quick_gelu=kwargs["quick_gelu"])

    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    assert cliplab.load("ViT-B-32:openai").model_cfg["quick_gelu"] is True   # the tag was trained with it
    assert calls[-1]["quick_gelu"] is True
    assert cliplab.load("ViT-B-32:openai", quick_gelu=False).model_cfg["quick_gelu"] is False
    assert calls[-1]["quick_gelu"] is False
    with pytest.raises(UsageError, match="heads="):
        cliplab.load("ViT-B-32:openai", heads=12)


def test_heads_cli_option_parses_both_forms():
    from cliplab.cli._common import parse_heads

    assert parse_heads("8") == 8
    assert parse_heads("vision=12,text=8") == {"vision": 12, "text": 8}
    for bad in ("x", "vision=12", "text=8,colour=2"):
        with pytest.raises(__import__("argparse").ArgumentTypeError):
            parse_heads(bad)


def test_wrong_arch_names_the_fix(tmp_path):
    from safetensors.torch import save_file

    f = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in make_model().state_dict().items()}, f)
    with pytest.raises(CheckpointMismatch) as e:
        cliplab.load(f, arch="ViT-B-32")
    msg = str(e.value)
    assert "missing keys (visual.transformer.resblocks.2" in msg   # names what does not fit
    assert "fewer vision layers than the config" in msg              # ... and why


def test_openai_format_gets_quickgelu(tmp_path):
    sd = make_model(INFERABLE_CFG).state_dict()
    sd["input_resolution"] = torch.tensor(32)
    sd["context_length"] = torch.tensor(24)
    sd["vocab_size"] = torch.tensor(49408)
    f = tmp_path / "openai.pt"
    torch.save(sd, f)
    bb = cliplab.load(f)
    assert bb.model_cfg["quick_gelu"] is True
    from open_clip.transformer import QuickGELU

    assert any(isinstance(m, QuickGELU) for m in bb.model.modules())
    # outputs equal a QuickGELU model with the same weights
    ref = make_model(INFERABLE_CFG, quick_gelu=True)
    with torch.no_grad():
        want = torch.nn.functional.normalize(ref.encode_text(bb.tokenize(TEXTS)), dim=-1).numpy()
    np.testing.assert_allclose(bb.encode_texts(TEXTS), want, atol=1e-5)
    # ... and the user can still force GELU
    assert cliplab.load(f, quick_gelu=False).model_cfg["quick_gelu"] is False


def test_unsafe_pickle_refused(tmp_path):
    import argparse

    f = tmp_path / "evil.pt"  # training scripts often pickle their argparse Namespace
    torch.save({"state_dict": make_model().state_dict(), "args": argparse.Namespace(lr=1)}, f)
    with pytest.raises(UnsafeCheckpoint, match="trust"):
        cliplab.load(f)
    assert cliplab.load(f, trust_pickle=True, heads=2, quick_gelu=False).embed_dim == 32


@pytest.mark.parametrize("spec", ["ViT-B-32:openai", "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"])
def test_offline_download_fails_fast_with_instructions(spec, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    with pytest.raises(OfflineError) as e:
        cliplab.load(spec, cache_dir=str(tmp_path))
    assert time.monotonic() - t0 < 10
    msg = str(e.value)
    assert "not reachable" in msg and "cliplab.load('/path/to/" in msg


def test_bad_specs():
    with pytest.raises(ModelLoadError, match="cannot resolve"):
        cliplab.load("no-such-model")
    with pytest.raises(ModelLoadError, match="tag"):
        cliplab.load("ViT-B-32:no-such-tag")
    with pytest.raises(UsageError, match="precision"):
        cliplab.load("shapes-tiny", precision="int3")


def test_corrupt_weights_file(tmp_path):
    f = tmp_path / "broken.safetensors"
    f.write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match="broken.safetensors"):
        cliplab.load(f)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_low_precision_runs_close_to_fp32(tiny_dir, tiny, precision):
    bb = cliplab.load(tiny_dir, precision=precision)
    assert bb.model.visual.conv1.weight.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    for low, full in zip(features(bb), features(tiny)):
        assert low.dtype == np.float32 and low.shape == full.shape
        assert (low * full).sum(1).min() > 0.99   # cosine to the fp32 features


def test_unavailable_device_is_a_usage_error(tiny_dir):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(UsageError, match="CUDA is not available"):
        cliplab.load(tiny_dir, device="cuda")
