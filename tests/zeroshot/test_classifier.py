import numpy as np
import pytest

from cliplab.errors import DataError, UsageError
from cliplab.zeroshot import ZeroShotClassifier, get_templates, list_template_sets, read_labels

CLASSES = ["red star", "blue circle", "green square"]


def test_template_sets():
    assert {"default", "openai-7", "openai-80"} <= set(list_template_sets())
    assert len(get_templates("openai-80")) == 80 and len(get_templates("openai-7")) == 7
    assert get_templates("a sketch of a {}.") == ["a sketch of a {c}."]
    with pytest.raises(UsageError, match="placeholder"):
        get_templates(["no placeholder"])
    with pytest.raises(UsageError, match="unknown template set"):
        get_templates("nope")


def test_templates_from_file(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("# comment\na photo of a {c}.\n\nart of the {}.\n")
    assert get_templates(str(f)) == ["a photo of a {c}.", "art of the {c}."]


def test_class_weights_are_the_prompt_ensemble(tiny):
    templates = ["a photo of a {c}.", "art of the {c}."]
    clf = ZeroShotClassifier(tiny, CLASSES, templates=templates)
    for c, name in enumerate(CLASSES):
        e = tiny.encode_texts([t.replace("{c}", name) for t in templates])   # (T, D), unit rows
        w = e.mean(0)
        np.testing.assert_allclose(clf.weights_[c], w / np.linalg.norm(w), atol=1e-6)


def test_predict_proba_topk(tiny):
    clf = ZeroShotClassifier(tiny, CLASSES)
    imgs = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    feats = tiny.encode_images(imgs)
    logits = clf.decision_function(feats)
    np.testing.assert_allclose(logits, tiny.logit_scale * feats @ clf.weights_.T, rtol=1e-6)
    proba = clf.predict_proba(imgs)
    np.testing.assert_allclose(proba.sum(1), 1, atol=1e-6)
    np.testing.assert_allclose(proba, clf.predict_proba(feats), atol=1e-6)
    assert list(clf.predict(feats)) == list(np.array(CLASSES)[logits.argmax(1)])
    labels, p = clf.topk(feats, k=5)
    assert labels.shape == (4, 3) and np.all(np.diff(p, axis=1) <= 0)
    assert list(labels[:, 0]) == list(clf.predict(feats))


@pytest.mark.parametrize("bad", [[], ["a", ""], ["a", "a"], "a,b"])
def test_bad_label_lists(tiny, bad):
    with pytest.raises(UsageError):
        ZeroShotClassifier(tiny, bad)


def test_read_labels(tmp_path):
    (tmp_path / "l.txt").write_text("cat\n\n dog \n# x\n")
    (tmp_path / "l.json").write_text('{"1": "dog", "0": "cat"}')
    assert read_labels(tmp_path / "l.txt") == ["cat", "dog"]
    assert read_labels(tmp_path / "l.json") == ["cat", "dog"]
    with pytest.raises(DataError):
        read_labels(tmp_path / "missing.txt")
    for bad in ['"cat"', '{"a": "x", "0": "y"}', '[1, 2]', '[oops']:
        (tmp_path / "bad.json").write_text(bad)
        with pytest.raises(DataError):
            read_labels(tmp_path / "bad.json")
