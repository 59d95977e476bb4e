"""``cliplab adapt`` then ``cliplab classify --adapter`` on a tiny random model."""

import json

import numpy as np
import pytest
from PIL import Image

from cliplab.cli.main import main


@pytest.fixture(scope="module")
def adapter(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter") / "gda"
    rc = main(["adapt", "--method", "gda", "--shots", "2", "--dataset", "shapes:color-shape",
               "--model", str(tiny_dir), "--out", str(out), "--n-train", "400", "--n-val", "120",
               "--random-state", "1"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return path


def test_adapt_writes_adapter_and_summary(adapter, capsys):
    meta = json.loads((adapter / "cliplab_adapter.json").read_text())
    assert meta["method"] == "gda" and meta["shots"] == 2 and meta["random_state"] == 1
    assert len(meta["fingerprint"]) == 64 and 0.0 <= meta["val_accuracy"] <= 1.0
    assert len(meta["classnames"]) < meta["n_train"] <= 2 * len(meta["classnames"])   # <= 2 shots a class
    assert all(" " in c for c in meta["classnames"])                   # "red circle"...
    assert len(meta["classes_without_examples"]) == 8                  # held-out compositions


@pytest.mark.parametrize("method", ["tip", "caps"])
def test_adapt_prints_one_summary_line(method, tiny_dir, tmp_path, capsys):
    rc = main(["adapt", "--method", method, "--shots", "1", "--dataset", "shapes:shape", "--model",
               str(tiny_dir), "--out", str(tmp_path / method), "--n-train", "64", "--n-val", "32",
               "--cache", str(tmp_path / "cache")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert len(out.strip().splitlines()) == 1 and "val accuracy" in out and "8 classes" in out
    assert any((tmp_path / "cache").rglob("chunk_*.npz"))


def test_classify_with_adapter(adapter, image, tiny_dir, tiny, capsys):
    capsys.readouterr()
    rc = main(["classify", str(image), "--adapter", str(adapter), "--model", str(tiny_dir),
               "--format", "json", "--top-k", "3"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    (row,) = json.loads(out)
    names = json.loads((adapter / "cliplab_adapter.json").read_text())["classnames"]
    preds = row["predictions"]
    assert len(preds) == 3 and all(p["label"] in names for p in preds)
    assert preds[0]["prob"] >= preds[1]["prob"] >= preds[2]["prob"]
    from cliplab.adapt import load_adapter                              # same as the library path
    proba = load_adapter(adapter).predict_proba(tiny.encode_images([image]).features)[0]
    top = np.argsort(-proba, kind="stable")[:3]
    assert [p["label"] for p in preds] == [names[i] for i in top]
    np.testing.assert_allclose([p["prob"] for p in preds], proba[top], rtol=1e-5)


def test_other_model_is_refused(adapter, image, tmp_path, capsys):
    capsys.readouterr()
    rc = main(["classify", str(image), "--adapter", str(adapter)])      # bundled shapes-tiny
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "was fit on the features of model" in err


def test_classify_needs_labels_or_adapter(adapter, image, tiny_dir, capsys):
    assert main(["classify", str(image), "--model", str(tiny_dir)]) == 2
    assert "--labels" in capsys.readouterr().err
    assert main(["classify", str(image), "--model", str(tiny_dir), "--labels", "a,b",
                 "--adapter", str(adapter)]) == 2
    assert "drop --labels" in capsys.readouterr().err


def test_adapt_errors(tiny_dir, tmp_path, capsys):
    assert main(["adapt", "--method", "gda", "--shots", "0", "--dataset", "shapes:shape",
                 "--model", str(tiny_dir), "--out", str(tmp_path / "a")]) == 2
    assert "--shots" in capsys.readouterr().err
    assert main(["adapt", "--method", "tip", "--shots", "1", "--dataset", "shapes:retrieval",
                 "--model", str(tiny_dir), "--out", str(tmp_path / "b")]) == 2
    assert "train and val" in capsys.readouterr().err
    assert main(["classify", "x.png", "--adapter", str(tmp_path), "--model", str(tiny_dir)]) in (2, 4)


@pytest.mark.parametrize("method", ["coop", "lora"])
def test_learner_from_the_cli_then_classify(method, image, tiny_dir, tiny, tmp_path, capsys):
    out = tmp_path / method
    rc = main(["adapt", "--method", method, "--shots", "1", "--dataset", "shapes:shape", "--model",
               str(tiny_dir), "--out", str(out), "--n-train", "64", "--n-val", "16", "--epochs", "1"])
    printed, err = capsys.readouterr()
    assert rc == 0, err
    assert "trained" in printed and "parameters in" in printed
    meta = json.loads((out / "cliplab_adapter.json").read_text())
    assert meta["method"] == method and meta["trainable_parameters"] > 0
    rc = main(["classify", str(image), "--adapter", str(out), "--model", str(tiny_dir), "--format", "json",
               "--top-k", "2"])
    printed, err = capsys.readouterr()
    assert rc == 0, err
    (row,) = json.loads(printed)
    from cliplab.adapt.fewshot import load_fitted
    from cliplab.zeroshot import softmax

    est, names = load_fitted(out, tiny)                     # the library path: the learner's own encoder
    assert (est.image_encoder is tiny) == (est.input_kind == "features")
    proba = softmax(est.logits_from_features(est.image_encoder.encode_images([image]).features))[0]
    top = np.argsort(-proba, kind="stable")[:2]
    assert [p["label"] for p in row["predictions"]] == [names[i] for i in top]
    np.testing.assert_allclose([p["prob"] for p in row["predictions"]], proba[top], rtol=1e-4)


def test_learner_options_are_refused_for_adapters(tiny_dir, tmp_path, capsys):
    assert main(["adapt", "--method", "gda", "--shots", "1", "--dataset", "shapes:shape", "--model",
                 str(tiny_dir), "--out", str(tmp_path / "g"), "--epochs", "3"]) == 2
    assert "only apply to learners" in capsys.readouterr().err
