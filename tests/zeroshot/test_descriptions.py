"""Classification by description and the GRAIN-style score, checked against NumPy."""

import json

import numpy as np
import pytest

from cliplab.errors import DataError, UsageError
from cliplab.zeroshot import ZeroShotClassifier
from cliplab.zeroshot.descriptions import DescriptionClassifier, load_descriptors

DESC = {"red star": ["five points", "a warm colour"],
        "blue circle": ["no corners", "a cool colour", "a round outline"],
        "green square": ["four sides"]}


@pytest.fixture(scope="module")
def feats(tiny):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    return tiny.encode_images(imgs).features                                           # (N, D)


def _sentences(tiny, c):
    return tiny.encode_texts([f"{c}, which has {d}." for d in DESC[c]])      # (|D_c|, D)


def test_mean_score_is_mean_of_descriptor_cosines(tiny, feats):
    clf = DescriptionClassifier(tiny, DESC)
    expected = np.stack([(feats @ _sentences(tiny, c).T).mean(1) for c in DESC], axis=1)   # (N, C)
    np.testing.assert_allclose(clf.decision_function(feats), tiny.logit_scale * expected, rtol=1e-5, atol=1e-5)
    assert list(clf.classes_) == list(DESC) and len(clf.sentences_) == 6
    proba = clf.predict_proba(feats)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-6)
    labels, p = clf.topk(feats, k=2)
    assert labels.shape == (5, 2) and (labels[:, 0] == clf.predict(feats)).all()


def test_grain_mixes_global_and_best_descriptor(tiny, feats):
    clf = DescriptionClassifier(tiny, DESC, mode="grain", grain_weight=0.3)
    zs = ZeroShotClassifier(tiny, list(DESC))
    best = np.stack([(feats @ _sentences(tiny, c).T).max(1) for c in DESC], axis=1)
    expected = 0.3 * feats @ zs.weights_.T + 0.7 * best
    np.testing.assert_allclose(clf.decision_function(feats), tiny.logit_scale * expected, rtol=1e-5, atol=1e-5)
    only_global = DescriptionClassifier(tiny, DESC, mode="grain", grain_weight=1.0)
    np.testing.assert_allclose(only_global.decision_function(feats), zs.decision_function(feats), rtol=1e-5)


def test_plain_prompt_descriptor_equals_zero_shot(tiny, feats):
    classes = list(DESC)
    clf = DescriptionClassifier(tiny, {c: [f"a photo of a {c}."] for c in classes}, template="{d}")
    zs = ZeroShotClassifier(tiny, classes)
    np.testing.assert_allclose(clf.decision_function(feats), zs.decision_function(feats), rtol=1e-5, atol=1e-5)
    assert (clf.predict(feats) == zs.predict(feats)).all()


def test_bundled_and_file_descriptors(tiny, tmp_path):
    table = load_descriptors("shapes")
    assert {"circle", "star", "red", "pink"} <= set(table)
    clf = DescriptionClassifier(tiny, "shapes", classnames=["circle", "star"])
    assert list(clf.classes_) == ["circle", "star"] and len(clf.sentences_) == 6
    f = tmp_path / "d.json"
    f.write_text(json.dumps(DESC))
    assert load_descriptors(f) == DESC


def test_errors(tiny, tmp_path):
    with pytest.raises(UsageError, match="no descriptors for class"):
        DescriptionClassifier(tiny, DESC, classnames=["red star", "tiger"])
    with pytest.raises(UsageError, match="mode"):
        DescriptionClassifier(tiny, DESC, mode="max")
    with pytest.raises(UsageError, match="grain_weight"):
        DescriptionClassifier(tiny, DESC, grain_weight=1.5)
    with pytest.raises(UsageError, match="placeholder"):
        DescriptionClassifier(tiny, DESC, template="{c} has")
    with pytest.raises(DataError, match="non-empty list"):
        load_descriptors({"a": []})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not a JSON descriptor file"):
        load_descriptors(bad)
    with pytest.raises(DataError, match="no such descriptor file"):
        load_descriptors(tmp_path / "missing.json")
