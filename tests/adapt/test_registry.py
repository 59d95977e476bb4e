"""The few-shot registry: every method is a CLI choice with its help, can be saved and
loaded, and a new training-free adapter is one module (nothing else edited)."""

from __future__ import annotations

import importlib
import json
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from cliplab.adapt import METHODS, list_methods, method_table
from cliplab.cli.main import main

OLD_METHODS = {"linear", "gda", "tip", "tip-f", "caps", "coop", "kgcoop", "mocoop", "lora", "svd", "full"}


def test_every_method_is_registered_with_help_and_kind():
    assert set(METHODS.names()) == OLD_METHODS
    assert set(list_methods("adapter")) | set(list_methods("learner")) == OLD_METHODS
    for row in method_table():
        cls = METHODS.get(row["name"])
        assert row["kind"] in ("adapter", "learner") and row["help"] and row["input"] in ("features", "images")
        assert cls.name == row["name"] and cls.__doc__                 # documented where defined
    assert {r["name"] for r in method_table() if r["input"] == "images"} == {"lora", "svd", "full"}


def test_every_method_is_a_cli_choice_with_its_help(capsys):
    with pytest.raises(SystemExit):
        main(["adapt", "--help"])
    text = "".join(capsys.readouterr().out.split())                        # argparse wraps lines
    for row in method_table():
        assert "".join(f"{row['name']} ({row['kind']} on {row['input']}): {row['help']}".split()) in text
    with pytest.raises(SystemExit) as e:
        main(["adapt", "--method", "nope", "--shots", "1", "--dataset", "shapes:shape", "--out", "x"])
    assert e.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err


NEW_ADAPTER = '''
"""Nearest class mean on features: a throwaway adapter for the registry test."""

import numpy as np

from cliplab.adapt import METHODS, FeatureAdapter


@METHODS.register("nearest-mean", kind="adapter", help="nearest class mean of the few-shot features")
class NearestMean(FeatureAdapter):
    """Scores each class by the cosine to its mean training feature."""

    def __init__(self, *, scale=10.0):
        self.scale = scale

    def _fit(self, X, y, X_val, y_val):
        self.means_ = np.stack([X[y == c].mean(axis=0) for c in range(len(self.classes_))])   # (C, D)

    def _logits(self, X):
        return self.scale * X @ self.means_.T                                               # (N, C)
'''


@pytest.fixture
def new_adapter(tmp_path, monkeypatch):
    """A training-free adapter defined in a module of its own, as a new file of cliplab/adapt would be."""
    (tmp_path / "nearest_mean_adapter.py").write_text(textwrap.dedent(NEW_ADAPTER))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("nearest_mean_adapter")
    yield module.NearestMean
    METHODS.unregister("nearest-mean")
    sys.modules.pop("nearest_mean_adapter", None)


def test_a_new_adapter_is_one_module(new_adapter, tiny_dir, tiny, tmp_path, capsys):
    from cliplab.adapt.fewshot import load_fitted

    assert "nearest-mean" in list_methods("adapter")
    out = tmp_path / "nm"
    rc = main(["adapt", "--method", "nearest-mean", "--shots", "2", "--dataset", "shapes:shape", "--model",
               str(tiny_dir), "--out", str(out), "--n-train", "64", "--n-val", "16"])
    printed, err = capsys.readouterr()
    assert rc == 0, err
    assert printed.startswith("nearest-mean 2-shot on shapes:shape")
    meta = json.loads((out / "cliplab_adapter.json").read_text())
    assert meta["method"] == "nearest-mean"
    est, names = load_fitted(out, tiny)
    assert type(est) is new_adapter and est.image_encoder is tiny
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image)
    assert main(["classify", str(image), "--adapter", str(out), "--model", str(tiny_dir), "--format", "json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    feats = tiny.encode_images([image]).features                         # (1, D)
    want = int(np.argmax(feats @ est.means_.T))
    assert row["predictions"][0]["label"] == names[int(est.classes_[want])]
    np.testing.assert_allclose(row["predictions"][0]["prob"], est.predict_proba(feats)[0, want], rtol=1e-5)
    with pytest.raises(SystemExit):
        main(["adapt", "--help"])
    assert "nearest-mean(adapteronfeatures)" in "".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("page", ["adaptation.md", "finetuning.md"])
def test_docs_tables_name_registered_methods(page):
    """Every method row of the docs tables (``| `name` | `Class` |``) is the registry's."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / page).read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([a-z-]+)` \| `(\w+)` \|", text, flags=re.M)
    assert rows
    classes = {r["name"]: r["class"] for r in method_table()}
    assert all(classes.get(name) == cls for name, cls in rows), rows
