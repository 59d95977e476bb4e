"""ONNX export of both towers: parity with ONNX Runtime, int8, loading the pair back, errors."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cliplab
from cliplab.errors import ModelLoadError, UsageError
from cliplab.models.export import export_onnx, quantize_export
from cliplab.models.onnx_backbone import MANIFEST, OnnxBackbone

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

TEXTS = ["a photo of a red star.", "two small blue circles on a striped background at the top left", "a"]


@pytest.fixture(scope="module")
def fp32_dir(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny-onnx"
    export_onnx(tiny, out, progress=False)
    return out


@pytest.fixture(scope="module")
def exported(fp32_dir):
    return cliplab.load(fp32_dir)


@pytest.fixture(scope="module")
def shapes_tiny():
    return cliplab.load("shapes-tiny")


@pytest.fixture(scope="module")
def shapes_exports(shapes_tiny, tmp_path_factory):
    """shapes-tiny exported in fp32, and its int8 copy."""
    root = tmp_path_factory.mktemp("shapes-export")
    export_onnx(shapes_tiny, root / "fp32", progress=False)
    quantize_export(root / "fp32", root / "int8", reference=shapes_tiny)
    return root / "fp32", root / "int8"


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_runtime_parity_both_towers(tiny, fp32_dir, batch):
    """The raw graphs in ONNX Runtime equal the PyTorch towers (then L2-normalised) to 1e-5, any batch."""
    images = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))   # (B, 3, H, W)
    tokens = tiny.tokenize(TEXTS[:batch])                                                  # (B, T)
    with torch.no_grad():
        want_img = F.normalize(tiny.model.encode_image(images), dim=-1).numpy()
        want_txt = F.normalize(tiny.model.encode_text(tokens), dim=-1).numpy()
    img = _session(fp32_dir / "image.onnx")
    txt = _session(fp32_dir / "text.onnx")
    assert img.get_inputs()[0].shape[0] == txt.get_inputs()[0].shape[0] == "batch"   # dynamic batch axis
    got_img = img.run(["features"], {"image": images.numpy()})[0]
    got_txt = txt.run(["features"], {"tokens": tokens.numpy()})[0]
    assert got_img.shape == got_txt.shape == (batch, 32)
    np.testing.assert_allclose(got_img, want_img, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got_txt, want_txt, rtol=0, atol=1e-5)


def test_manifest(tiny, fp32_dir):
    m = json.loads((fp32_dir / MANIFEST).read_text())
    assert m["format"] == "cliplab-onnx" and m["precision"] == "fp32" and m["quantization"] is None
    assert m["fingerprint"] == tiny.fingerprint and m["model"] == tiny.name
    assert (m["embed_dim"], m["context_length"], m["image_size"]) == (32, 24, [32, 32])
    assert m["inputs"]["image"] == {"name": "image", "shape": ["batch", 3, 32, 32], "dtype": "float32"}
    assert m["inputs"]["text"] == {"name": "tokens", "shape": ["batch", 24], "dtype": "int64"}
    assert m["preprocess_cfg"] == json.loads(json.dumps(tiny.preprocess_cfg))
    assert m["model_cfg"] == json.loads(json.dumps(tiny.model_cfg))
    assert m["logit_scale"] == pytest.approx(tiny.logit_scale) and m["opset"] == 18
    for tower in ("image", "text"):
        f = m["files"][tower]
        data = (fp32_dir / f["path"]).read_bytes()
        assert f["bytes"] == len(data) and f["sha256"] == hashlib.sha256(data).hexdigest()
        assert m["check"]["max_abs_diff"][tower] <= 1e-5


def test_loaded_export_equals_the_torch_backbone(tiny, exported):
    """``cliplab.load(DIR)``: an OnnxBackbone whose features equal the Backbone's to 1e-5."""
    assert isinstance(exported, OnnxBackbone) and exported.precision == "fp32"
    assert (exported.embed_dim, exported.context_length, exported.image_size) == (32, 24, 32)
    assert exported.logit_scale == pytest.approx(tiny.logit_scale, rel=1e-7)
    images = np.random.default_rng(0).integers(0, 256, (5, 40, 48, 3), dtype=np.uint8)   # resized on the way
    np.testing.assert_allclose(exported.encode_images(images, batch_size=2).features,
                               tiny.encode_images(images, batch_size=2).features, rtol=0, atol=1e-5)
    np.testing.assert_allclose(exported.encode_texts(TEXTS, batch_size=2), tiny.encode_texts(TEXTS),
                               rtol=0, atol=1e-5)


def test_zero_shot_through_the_export_equals_torch(tiny, exported):
    images = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    labels = ["red star", "blue circle", "green square"]
    want = cliplab.ZeroShotClassifier(tiny, labels).predict_proba(images)
    got = cliplab.ZeroShotClassifier(exported, labels).predict_proba(images)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_fingerprint_is_stable_and_tells_exports_apart(fp32_dir, exported, shapes_exports, tiny):
    assert cliplab.load(fp32_dir).fingerprint == exported.fingerprint
    fp32, int8 = (cliplab.load(d).fingerprint for d in shapes_exports)
    assert len({exported.fingerprint, fp32, int8, tiny.fingerprint}) == 4


def test_int8_smaller_and_agrees_in_zero_shot_top1(shapes_tiny, shapes_exports):
    """int8 (ONNX Runtime dynamic quantization) of shapes-tiny: smaller, same top-1 on ShapesWorld."""
    from cliplab.data.shapes.tasks import shapes_task

    fp32_dir, int8_dir = shapes_exports
    m = json.loads((int8_dir / MANIFEST).read_text())
    q = m["quantization"]
    sizes = {t: ((fp32_dir / f"{t}.onnx").stat().st_size, (int8_dir / f"{t}.onnx").stat().st_size)
             for t in ("image", "text")}
    assert q["fp32_bytes"] == {t: s[0] for t, s in sizes.items()}
    assert q["int8_bytes"] == {t: s[1] for t, s in sizes.items()}
    assert q["size_ratio"]["total"] == pytest.approx(sum(s[0] for s in sizes.values())
                                                     / sum(s[1] for s in sizes.values()))
    assert q["size_ratio"]["total"] > 3.5 and q["size_ratio"]["image"] > 3      # measured 3.83, 3.18
    assert min(m["check"]["min_cosine_to_pytorch"].values()) > 0.999
    data = shapes_task("color-shape", n=48)
    int8 = cliplab.load(int8_dir)
    assert int8.precision == "int8"
    want = cliplab.ZeroShotClassifier(shapes_tiny, data.classnames).predict(data.items)
    got = cliplab.ZeroShotClassifier(int8, data.classnames).predict(data.items)
    assert np.mean(got == want) >= 0.95                               # measured 1.00 on 200 scenes
    assert np.mean(got == np.array(data.classnames)[data.labels]) >= 0.85


# ------------------------------------------------------------------------------------ errors
def test_export_argument_errors(tiny, exported, tmp_path):
    with pytest.raises(UsageError, match="format"):
        export_onnx(tiny, tmp_path / "a", format="tflite")
    with pytest.raises(UsageError, match="opset 9"):
        export_onnx(tiny, tmp_path / "a", opset=9)
    with pytest.raises(UsageError, match="ONNX export already"):
        export_onnx(exported, tmp_path / "a")
    with pytest.raises(UsageError, match="Backbone"):
        export_onnx(tiny.model, tmp_path / "a")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="holds other files"):
        export_onnx(tiny, busy)
    assert (busy / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError):
        export_onnx(tiny, tmp_path / "file" / "sub")


def test_export_refuses_fp16(tiny_dir, tmp_path):
    with pytest.raises(UsageError, match="fp32 model on the CPU"):
        export_onnx(cliplab.load(tiny_dir, precision="bf16"), tmp_path / "a")


def test_missing_dependency_is_a_usage_error(tiny, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(UsageError, match="onnxruntime.*pip install 'cliplab\\[export\\]'"):
        export_onnx(tiny, tmp_path / "a")


def test_quantize_errors(fp32_dir, shapes_exports, tmp_path):
    with pytest.raises(UsageError, match="another folder"):
        quantize_export(fp32_dir, fp32_dir)
    with pytest.raises(UsageError, match="int8 export; quantize an fp32"):
        quantize_export(shapes_exports[1], tmp_path / "q")


def test_load_errors(fp32_dir, exported, tmp_path):
    with pytest.raises(UsageError, match="drop --device"):
        cliplab.load(fp32_dir, device="meta")
    with pytest.raises(UsageError, match="drop --precision"):
        cliplab.load(fp32_dir, precision="fp16")
    with pytest.raises(UsageError, match="arch do not apply"):
        cliplab.load(fp32_dir, arch="ViT-B-32")
    for method, args in [("image_tokens", ([np.zeros((32, 32, 3), np.uint8)],)), ("save", (tmp_path / "x",)),
                         ("with_model", (None,)), ("image_token_batch", (torch.zeros(1, 3, 32, 32),))]:
        kwargs = {"name": "x"} if method == "with_model" else {}
        with pytest.raises(UsageError, match="ONNX export"):
            getattr(exported, method)(*args, **kwargs)


@pytest.mark.parametrize("damage, match", [
    (lambda d: (d / MANIFEST).write_text("{not json"), "not valid JSON|invalid JSON|JSON"),
    (lambda d: (d / MANIFEST).write_text('{"format": "other"}'), "not a cliplab ONNX export"),
    (lambda d: (d / "text.onnx").unlink(), "text tower of this export is missing"),
    (lambda d: (d / "image.onnx").write_bytes(b"\x00garbage"), "ONNX Runtime cannot load it"),
])
def test_damaged_export_is_a_load_error(fp32_dir, tmp_path, damage, match):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(fp32_dir, d)
    damage(d)
    with pytest.raises(ModelLoadError, match=match):
        cliplab.load(d)
