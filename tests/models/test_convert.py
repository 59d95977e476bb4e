"""Checkpoint reading, architecture inference and transformers <-> open_clip conversion.

Every model here is a tiny random-init CLIP made by the test itself.  Parity is
measured against the reference implementations (transformers' ``CLIPModel``,
open_clip's ``CLIP`` / ``create_model``) on the same weights and inputs.
"""

from __future__ import annotations

import dataclasses
import json

import open_clip
import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from cliplab.errors import CheckpointMismatch, ModelLoadError, UnsafeCheckpoint
from cliplab.models.convert import (
    hf_to_open_clip,
    is_hf_folder,
    open_clip_to_hf,
    read_hf_folder,
    read_hf_preprocess_cfg,
    save_hf_folder,
    save_open_clip_folder,
)
from cliplab.models.state_dicts import check_state_dict, infer_model_cfg, read_state_dict

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
CONTEXT = 16
TEXTS = ["a photo of a cat.", "a red circle on a striped background", "Two   spaces, and CAPS", "x"]

VIT_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2},
    "text_cfg": {"context_length": CONTEXT, "vocab_size": 1000, "width": 64, "heads": 1, "layers": 2},
}
RESNET_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16},
    "text_cfg": {"context_length": CONTEXT, "vocab_size": 1000, "width": 64, "heads": 1, "layers": 1},
}


def _hf_config(act: str):
    return transformers.CLIPConfig(
        text_config=dict(
            hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=CONTEXT, vocab_size=49408, bos_token_id=49406, eos_token_id=49407,
            pad_token_id=1, hidden_act=act,
        ),
        vision_config=dict(
            hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8, hidden_act=act,
        ),
        projection_dim=32,
    )


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """O(0.1) random weights (layer-norm scales around 1) so differences show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):
                continue
            noise = 0.1 * torch.randn(p.shape, generator=g)
            is_norm = "norm" in name or ".ln" in name or name.startswith("ln")
            is_norm_scale = p.ndim == 1 and name.endswith("weight") and is_norm
            p.copy_(noise + (1.0 if is_norm_scale else 0.0))


def _features(out) -> torch.Tensor:
    # transformers 5 returns a BaseModelOutputWithPooling from get_*_features.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _inputs(seed: int = 0, image_size: int = 32):
    pixels = torch.randn(len(TEXTS), 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    ids = open_clip.tokenize(TEXTS, context_length=CONTEXT)  # (B, T), padded with 0
    eot = ids.argmax(dim=-1)
    mask = (torch.arange(CONTEXT)[None, :] <= eot[:, None]).long()  # (B, T), 1 up to end-of-text
    return pixels, ids, mask


def _hf_outputs(hf_model, pixels, ids, mask):
    with torch.no_grad():
        image = _features(hf_model.get_image_features(pixel_values=pixels))
        text = _features(hf_model.get_text_features(input_ids=ids, attention_mask=mask))
    return image, text


def _open_clip_outputs(model, pixels, ids):
    with torch.no_grad():
        return model.encode_image(pixels), model.encode_text(ids)


def _max_diff(a, b) -> float:
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------------------
# transformers <-> open_clip
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_hf_folder_parity_and_back(tmp_path, act):
    torch.manual_seed(0)
    hf = transformers.CLIPModel(_hf_config(act)).eval()
    _randomize(hf, seed=1)
    hf.save_pretrained(tmp_path / "hf")
    assert is_hf_folder(tmp_path / "hf")

    model_cfg, state_dict = read_hf_folder(tmp_path / "hf")
    assert model_cfg["quick_gelu"] is (act == "quick_gelu")
    assert model_cfg["vision_cfg"]["head_width"] == 16 and model_cfg["text_cfg"]["heads"] == 4
    model = CLIP(**model_cfg).eval()
    check_state_dict(model, state_dict)

    pixels, ids, mask = _inputs()
    hf_image, hf_text = _hf_outputs(hf, pixels, ids, mask)
    oc_image, oc_text = _open_clip_outputs(model, pixels, ids)
    assert hf_image.abs().max() > 0.1 and hf_text.abs().max() > 0.1  # not a trivially small signal
    assert _max_diff(oc_image, hf_image) < ATOL
    assert _max_diff(oc_text, hf_text) < ATOL
    assert model.logit_scale.item() == pytest.approx(hf.logit_scale.item())

    # The activation matters: the other one gives visibly different features.
    wrong = CLIP(**{**model_cfg, "quick_gelu": not model_cfg["quick_gelu"]}).eval()
    wrong.load_state_dict(state_dict)
    assert _max_diff(_open_clip_outputs(wrong, pixels, ids)[0], hf_image) > 1e-3

    # And back: a fresh transformers CLIPModel computes the same.
    hf_cfg, hf_sd = open_clip_to_hf(model_cfg, model.state_dict())
    assert hf_cfg["architectures"] == ["CLIPModel"] and hf_cfg["model_type"] == "clip"
    back = transformers.CLIPModel(transformers.CLIPConfig(**hf_cfg)).eval()
    back.load_state_dict(hf_sd, strict=True)
    back_image, back_text = _hf_outputs(back, pixels, ids, mask)
    assert _max_diff(back_image, hf_image) < ATOL
    assert _max_diff(back_text, hf_text) < ATOL


def test_save_hf_folder_loads_in_transformers(tmp_path):
    torch.manual_seed(0)
    cfg = {**VIT_CFG, "quick_gelu": True, "text_cfg": {**VIT_CFG["text_cfg"], "vocab_size": 49408}}
    model = CLIP(**cfg).eval()
    _randomize(model, seed=2)
    save_hf_folder(tmp_path / "hf", cfg, model.state_dict())

    hf = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    pixels, ids, mask = _inputs(seed=3)
    hf_image, hf_text = _hf_outputs(hf, pixels, ids, mask)
    oc_image, oc_text = _open_clip_outputs(model, pixels, ids)
    assert _max_diff(oc_image, hf_image) < ATOL
    assert _max_diff(oc_text, hf_text) < ATOL

    # The written tokenizer gives open_clip's ids up to end-of-text; it pads with
    # end-of-text where open_clip pads with 0.
    tok = transformers.CLIPTokenizer.from_pretrained(tmp_path / "hf")
    enc = tok(TEXTS + ["Hello world!", "wow!! 42, café"], padding="max_length", max_length=CONTEXT,
              truncation=True, return_tensors="pt")
    ref = open_clip.tokenize(TEXTS + ["Hello world!", "wow!! 42, café"], context_length=CONTEXT)
    real = enc["attention_mask"].bool()
    assert torch.equal(enc["input_ids"][real], ref[real])
    assert (ref[~real] == 0).all() and (enc["input_ids"][~real] == 49407).all()

    processor = transformers.CLIPImageProcessor.from_pretrained(tmp_path / "hf")
    assert processor.crop_size["height"] == 32
    assert read_hf_preprocess_cfg(tmp_path / "hf")["size"] == 32

    # Reading the folder back gives the very same tensors.
    cfg_back, sd_back = read_hf_folder(tmp_path / "hf")
    assert cfg_back["quick_gelu"] is True
    for key, value in model.state_dict().items():
        assert torch.equal(sd_back[key], value), key


def test_hf_conversion_errors():
    hf_cfg = _hf_config("quick_gelu").to_dict()
    with pytest.raises(CheckpointMismatch, match="hidden_act='silu'"):
        hf_to_open_clip({**hf_cfg, "vision_config": {**hf_cfg["vision_config"], "hidden_act": "silu"}}, {})
    with pytest.raises(CheckpointMismatch, match="model_type='siglip'"):
        hf_to_open_clip({**hf_cfg, "model_type": "siglip"}, {})
    with pytest.raises(CheckpointMismatch, match="missing"):
        hf_to_open_clip(hf_cfg, {"logit_scale": torch.tensor(1.0)})
    with pytest.raises(CheckpointMismatch, match="ModifiedResNet"):
        open_clip_to_hf(RESNET_CFG, {})


def test_non_max_eos_pools_at_eos(caplog):
    from cliplab.models.convert import hf_config_to_model_cfg

    hf_cfg = _hf_config("gelu").to_dict()
    hf_cfg["text_config"]["eos_token_id"] = 7
    with caplog.at_level("WARNING", logger="cliplab.models.convert"):
        cfg = hf_config_to_model_cfg(hf_cfg)
    assert cfg["text_cfg"]["pool_type"] == "eos" and cfg["text_cfg"]["eos_id"] == 7
    assert "not the largest token id" in caplog.text
    assert "pool_type" not in hf_config_to_model_cfg(_hf_config("gelu").to_dict())["text_cfg"]


# --------------------------------------------------------------------------------------
# OpenAI / open_clip state dicts
# --------------------------------------------------------------------------------------


def _expected_inferable(cfg: dict) -> dict:
    vision = {**dataclasses.asdict(CLIPVisionCfg()), **cfg["vision_cfg"]}
    text = {**dataclasses.asdict(CLIPTextCfg()), **cfg["text_cfg"]}
    if isinstance(vision["layers"], (list, tuple)):
        vision["layers"] = list(vision["layers"])
    return {"embed_dim": cfg["embed_dim"], "vision_cfg": vision, "text_cfg": text}


@pytest.mark.parametrize("cfg", [VIT_CFG, RESNET_CFG], ids=["vit", "resnet"])
def test_openai_state_dict_round_trip(tmp_path, cfg):
    torch.manual_seed(0)
    model = CLIP(**cfg, quick_gelu=True).eval()
    path = tmp_path / "clip.pt"
    torch.save(model.state_dict(), path)

    state_dict = read_state_dict(path)
    inferred = infer_model_cfg(state_dict, heads="openai")  # OpenAI's 64-wide heads
    assert "quick_gelu" not in inferred
    expected = _expected_inferable(cfg)
    assert inferred["embed_dim"] == expected["embed_dim"]
    for tower in ("vision_cfg", "text_cfg"):
        for key, value in inferred[tower].items():
            assert value == expected[tower][key], (tower, key)

    rebuilt = CLIP(**inferred, quick_gelu=True).eval()
    check_state_dict(rebuilt, state_dict)
    size = cfg["vision_cfg"]["image_size"]
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(4))
    ids = torch.randint(1, 999, (2, CONTEXT), generator=torch.Generator().manual_seed(5))
    for a, b in zip(_open_clip_outputs(rebuilt, pixels, ids), _open_clip_outputs(model, pixels, ids)):
        assert torch.equal(a, b)


def test_read_state_dict_unwraps(tmp_path):
    sd = CLIP(**VIT_CFG).state_dict()
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    assert read_state_dict(path).keys() == sd.keys()
    torch.save({"model": sd}, path)
    assert read_state_dict(path).keys() == sd.keys()


def test_read_state_dict_bad_files(tmp_path):
    with pytest.raises(ModelLoadError, match="missing.pt: no such file"):
        read_state_dict(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ModelLoadError, match="corrupt.pt"):
        read_state_dict(corrupt)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelLoadError, match="bad.safetensors"):
        read_state_dict(bad)


class _NeedsCode:
    """A pickled object that weights_only loading refuses."""

    def __init__(self):
        self.note = "trained on Tuesday"


def test_pickle_with_code_needs_trust(tmp_path):
    path = tmp_path / "custom.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "extra": _NeedsCode()}, path)
    with pytest.raises(UnsafeCheckpoint, match="trust_pickle=True"):
        read_state_dict(path)
    assert list(read_state_dict(path, trust_pickle=True)) == ["w"]


class _TinyScripted(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.arange(3.0))
        self.register_buffer("input_resolution", torch.tensor(224))

    def forward(self, x):
        return x * self.weight


def test_torchscript_archive_needs_trust(tmp_path):
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.script(_TinyScripted()).save(str(path))
    with pytest.raises(UnsafeCheckpoint, match="--trust-pickle"):
        read_state_dict(path)
    sd = read_state_dict(path, trust_pickle=True)
    assert list(sd) == ["weight"] and torch.equal(sd["weight"], torch.arange(3.0))


def test_check_state_dict_names_the_fix():
    sd = CLIP(**VIT_CFG).state_dict()
    short = CLIP(**{**VIT_CFG, "text_cfg": {**VIT_CFG["text_cfg"], "context_length": 8}})
    with pytest.raises(CheckpointMismatch, match="16 positions but the config says 8: pass the checkpoint.s own config"):
        check_state_dict(short, sd)
    narrow = CLIP(**{**VIT_CFG, "embed_dim": 16})
    with pytest.raises(CheckpointMismatch, match="embed dims 32 vs 16: wrong architecture name"):
        check_state_dict(narrow, sd)
    deeper = CLIP(**{**VIT_CFG, "text_cfg": {**VIT_CFG["text_cfg"], "layers": 3}})
    with pytest.raises(CheckpointMismatch, match="1 fewer text layers"):
        check_state_dict(deeper, sd)


def test_check_state_dict_recognises_transformers_keys():
    hf = transformers.CLIPModel(_hf_config("gelu"))
    model = CLIP(**VIT_CFG)
    with pytest.raises(CheckpointMismatch, match="Hugging Face transformers checkpoint; point cliplab at its folder"):
        check_state_dict(model, hf.state_dict())
    with pytest.raises(CheckpointMismatch, match="Hugging Face transformers"):
        infer_model_cfg(hf.state_dict(), heads="openai")


# --------------------------------------------------------------------------------------
# open_clip folders
# --------------------------------------------------------------------------------------


def test_save_open_clip_folder_loads_with_open_clip(tmp_path):
    torch.manual_seed(0)
    cfg = {**VIT_CFG, "quick_gelu": True}
    model = CLIP(**cfg)
    preprocess = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    save_open_clip_folder(tmp_path / "oc", cfg, model.state_dict(), preprocess_cfg=preprocess)
    assert json.loads((tmp_path / "oc" / "open_clip_config.json").read_text())["model_cfg"] == cfg
    assert not is_hf_folder(tmp_path / "oc")

    loaded = open_clip.create_model("local-dir:" + str(tmp_path / "oc"))
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert isinstance(loaded.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    assert list(loaded.visual.preprocess_cfg["mean"]) == preprocess["mean"]
