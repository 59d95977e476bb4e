"""Outlier-free attention is recorded in what cliplab writes and rebuilt by what it loads."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import cliplab
from cliplab.cli.main import main
from cliplab.errors import ModelLoadError
from cliplab.models.attention import OutlierFreeAttention
from cliplab.surgery import apply_outlier_free

from _tiny import features


@pytest.fixture(scope="module")
def images():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # (B, 3, H, W)


def _trained_looking(bb):
    """Move the gate weights off their init, as training would, so that losing them shows."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in bb.model.named_parameters():
            if ".gates." in name:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    return bb


def _attention(bb):
    return [(m.softmax, m.gamma, m.zeta, m.gate, m.pi_init, m.gate_scale)
            for m in bb.model.modules() if isinstance(m, OutlierFreeAttention)]


def _assert_same_model(a, b, images, atol=1e-6):
    assert _attention(a) == _attention(b) and len(_attention(a)) == 4
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)     # gate weights included
    for x, y in zip(features(a, images), features(b, images)):
        np.testing.assert_allclose(x, y, atol=atol)


@pytest.mark.parametrize("kw", [{"softmax": "clipped", "gamma": -0.05},
                                {"softmax": "clipped", "alpha": 2.0, "gate": "mlp", "init_std": None},
                                {"softmax": "vanilla", "gate": "linear", "pi_init": 0.25}])
def test_a_saved_model_loads_back_with_its_attention(tiny, images, tmp_path, kw):
    new = _trained_looking(apply_outlier_free(tiny, **kw))
    folder = new.save(tmp_path / "model")
    cfg = json.loads((folder / "open_clip_config.json").read_text())
    assert "cliplab" not in cfg["model_cfg"]                      # open_clip builds CLIP(**model_cfg)
    assert cfg["cliplab"]["attention"]["softmax"] == kw["softmax"]
    assert cfg["cliplab"]["attention"]["fine_tuning"] is (kw.get("init_std", 0.01) is not None)
    _assert_same_model(new, cliplab.load(folder), images)
    _assert_same_model(new, cliplab.load(new.save(tmp_path / "model.safetensors")), images)  # one file alone


def test_loading_clipped_weights_as_vanilla_would_be_wrong(tiny, images, tmp_path):
    """Why the attention must be recorded: clipped softmax has no parameters of its own."""
    folder = apply_outlier_free(tiny, softmax="clipped", gamma=-0.05).save(tmp_path / "m")
    cfg = json.loads((folder / "open_clip_config.json").read_text())
    cfg.pop("cliplab")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "open_clip_config.json").write_text(json.dumps(cfg))
    (plain / "open_clip_model.safetensors").write_bytes((folder / "open_clip_model.safetensors").read_bytes())
    plain_img = features(cliplab.load(plain), images)[0]
    clipped_img = features(cliplab.load(folder), images)[0]
    assert np.abs(plain_img - clipped_img).max() > 1e-2


def test_bundle_keeps_the_attention(tiny, images, tmp_path):
    new = _trained_looking(apply_outlier_free(tiny, softmax="clipped", gamma=-0.05, gate="linear"))
    src = new.save(tmp_path / "ckpt")
    assert main(["bundle", str(src), str(tmp_path / "bundled")]) == 0
    again = cliplab.load(tmp_path / "bundled")
    assert _attention(again) == _attention(new)
    for x, y in zip(features(again, images), features(new, images)):                # fp16 weights
        np.testing.assert_allclose(x, y, atol=2e-2)


def test_an_unknown_attention_is_a_clear_load_error(tiny, tmp_path, capsys):
    folder = apply_outlier_free(tiny, softmax="clipped").save(tmp_path / "m")
    cfg = json.loads((folder / "open_clip_config.json").read_text())
    cfg["cliplab"]["attention"]["softmax"] = "sparsemax"
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="sparsemax"):
        cliplab.load(folder)
    capsys.readouterr()
    Image.new("RGB", (32, 32), "red").save(tmp_path / "x.png")
    assert main(["classify", str(tmp_path / "x.png"), "--labels", "a,b", "--model", str(folder)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sparsemax" in err[0] and "attention" in err[0]
    cfg["cliplab"] = {"attention": {"softmax": "clipped"}, "experts": 4}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="experts"):
        cliplab.load(folder)


def test_conversion_to_transformers_refuses_outlier_free_attention(tiny, tmp_path, capsys):
    folder = apply_outlier_free(tiny, softmax="clipped").save(tmp_path / "m")
    assert main(["convert", str(folder), str(tmp_path / "hf"), "--to", "hf"]) == 3
    err = capsys.readouterr().err
    assert "outlier-free attention" in err and not (tmp_path / "hf").exists()
    assert main(["convert", str(folder), str(tmp_path / "oc"), "--to", "open_clip"]) == 0
    written = json.loads((tmp_path / "oc" / "open_clip_config.json").read_text())
    assert written["cliplab"]["attention"]["softmax"] == "clipped"
