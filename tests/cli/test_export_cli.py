"""``cliplab export``: a round trip through classify and embed, and its errors with their exit codes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cliplab.cli.main import main

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("export-imgs")
    rng = np.random.default_rng(3)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(d / f"img_{i}.png")
    return d


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-export") / "onnx"
    assert main(["export", str(tiny_dir), "--format", "onnx", "--out", str(out)]) == 0
    return out


def _classify(capsys, images, model) -> list[dict]:
    assert main(["classify", str(images), "--labels", "red,blue,green", "--top-k", "3", "--format", "json",
                 "--model", str(model)]) == 0
    return json.loads(capsys.readouterr().out)


def test_classify_and_embed_through_the_export_equal_torch(tiny_dir, exported, images, tmp_path, capsys):
    capsys.readouterr()
    want, got = _classify(capsys, images, tiny_dir), _classify(capsys, images, exported)
    assert [r["path"] for r in got] == [r["path"] for r in want]
    for w, g in zip(want, got):
        probs = {p["label"]: p["prob"] for p in w["predictions"]}
        assert all(abs(p["prob"] - probs[p["label"]]) <= 1e-5 for p in g["predictions"])
    feats = {}
    for name, model in (("torch", tiny_dir), ("onnx", exported)):
        out = tmp_path / f"{name}.npy"
        assert main(["embed", str(images), "--model", str(model), "--out", str(out), "--no-cache"]) == 0
        feats[name] = np.load(out)
        meta = json.loads(out.with_name(out.name + ".json").read_text())
    assert meta["model"] == exported.name and meta["dim"] == 32
    np.testing.assert_allclose(feats["onnx"], feats["torch"], rtol=0, atol=1e-5)
    texts = tmp_path / "texts.txt"
    texts.write_text("a red star\na blue circle on a striped background\n")
    for name, model in (("torch", tiny_dir), ("onnx", exported)):
        assert main(["embed", "--texts", str(texts), "--model", str(model), "--out", str(tmp_path / f"t{name}.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "tonnx.npy"), np.load(tmp_path / "ttorch.npy"), rtol=0, atol=1e-5)


def test_int8_export_reports_its_size(tiny_dir, tmp_path, capsys):
    out = tmp_path / "int8"
    assert main(["export", str(tiny_dir), "--int8", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    manifest = json.loads((out / "cliplab_export.json").read_text())
    ratio = manifest["quantization"]["size_ratio"]["total"]
    assert manifest["precision"] == "int8" and f"int8 {ratio:.2f}x smaller" in err
    assert sorted(p.name for p in out.iterdir()) == ["cliplab_export.json", "image.onnx", "text.onnx"]
    assert main(["classify", str(tmp_path), "--labels", "a,b", "--model", str(out)]) == 4   # no images there


@pytest.mark.parametrize("argv, code, message", [
    (["export", "shapes-tiny", "--out", "{tmp}/o", "--opset", "9"], 2, "opset 9"),
    (["export", "no-such-model", "--out", "{tmp}/o"], 3, "cannot resolve model spec"),
    (["export", "shapes-tiny", "--out", "{tmp}/file/o"], 4, "a file is in the way"),
    (["export", "shapes-tiny", "--out", "{tmp}", "--precision", "fp16"], 2, "fp32 model on the CPU"),
    (["export", "shapes-tiny", "--out", "{tmp}"], 2, "holds other files"),
    (["classify", "{images}", "--labels", "a,b", "--model", "{export}", "--precision", "bf16"], 2, "drop --precision"),
    (["embed", "{images}", "--model", "{export}", "--device", "meta", "--out", "{tmp}/f.npy"], 2, "drop --device"),
])
def test_errors_are_one_line_with_the_exit_code(exported, images, tmp_path, capsys, argv, code, message):
    (tmp_path / "file").write_text("x")
    argv = [a.format(tmp=tmp_path, export=exported, images=images) for a in argv]
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_unknown_format_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["export", "shapes-tiny", "--format", "tflite", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err


def test_missing_dependency_exits_2(monkeypatch, tmp_path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    assert main(["export", "shapes-tiny", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("cliplab: error: cliplab export needs onnx, which is not installed: "
                   "pip install 'cliplab[export]'")
    assert not (tmp_path / "o").exists()
