import time

import numpy as np
import pytest
import torch

import cliplab
from cliplab.errors import CheckpointMismatch, ModelLoadError, OfflineError, UnsafeCheckpoint, UsageError
from cliplab.models.loading import list_sources

from _tiny import TINY_CFG, make_model

TEXTS = ["a photo of a cat.", "a dog"]


def features(bb):
    img = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    return bb.encode_texts(TEXTS), bb.encode_images(img)


def test_sources_registered():
    assert {"bundled", "local", "open_clip-tag", "hf-hub"} <= set(list_sources())


def test_open_clip_folder_matches_the_model(tiny_dir, tiny):
    import open_clip

    ref = open_clip.create_model("local-dir:" + str(tiny_dir)).eval()
    tokens = tiny.tokenize(TEXTS)
    with torch.no_grad():
        want = torch.nn.functional.normalize(ref.encode_text(tokens), dim=-1).numpy()
    np.testing.assert_allclose(tiny.encode_texts(TEXTS), want, atol=1e-5)


# Head counts are not visible in tensor shapes; like OpenAI's loader, inference assumes
# 64-wide heads, so this config uses them.
INFERABLE_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 64},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2},
}


def test_bare_safetensors_inferred_with_config_or_arch(tmp_path):
    from safetensors.torch import save_file

    from cliplab.models.backbone import Backbone
    from cliplab.models.loading import default_preprocess_cfg, make_tokenizer

    model = make_model(INFERABLE_CFG)
    f = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f)
    inferred = cliplab.load(f)
    assert inferred.model_cfg["quick_gelu"] is False
    ref = Backbone(model, model_cfg=INFERABLE_CFG, preprocess_cfg=default_preprocess_cfg(INFERABLE_CFG),
                   tokenizer=make_tokenizer(INFERABLE_CFG))
    for a, b in zip(features(inferred), features(ref)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # a config JSON beside the file wins over inference
    (tmp_path / "weights.json").write_text(__import__("json").dumps({"model_cfg": INFERABLE_CFG}))
    assert cliplab.load(f).model_cfg == INFERABLE_CFG


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
    assert cliplab.load(f, trust_pickle=True).embed_dim == 32


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
