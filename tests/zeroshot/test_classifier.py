import numpy as np
import pytest

from cliplab.errors import DataError, DuplicateClassError, UsageError
from cliplab.zeroshot import (ZeroShotClassifier, check_classnames, class_weights, get_templates, list_template_sets,
                              prompt_collisions, read_labels)

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
    feats = tiny.encode_images(imgs).features
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


# ------------------------------------------------------------ labels as people write them
def test_names_that_tokenize_alike_are_refused(tiny):
    with pytest.raises(DuplicateClassError) as e:
        ZeroShotClassifier(tiny, ["Red star", "red star", " RED STAR", "blue circle"])
    assert e.value.groups == [["Red star", "red star", "RED STAR"]]
    assert isinstance(e.value, ValueError) and e.value.exit_code == 2
    assert "'Red star' = 'red star' = 'RED STAR'" in str(e.value)
    with pytest.raises(DuplicateClassError, match="'red star' = 'red  star'"):   # whitespace runs
        ZeroShotClassifier(tiny, ["red star", "red  star"], templates="openai-7")
    with pytest.raises(DuplicateClassError, match="duplicate class names: 'a'"):
        ZeroShotClassifier(tiny, ["a", "b", "a"])
    assert list(ZeroShotClassifier(tiny, ["red star", "red stars"]).classes_) == ["red star", "red stars"]


def test_collisions_compare_the_tokens_of_every_template(tiny):
    long = "word " * tiny.context_length + "{c}."        # the class name is cut off: equal tokens
    assert tiny.tokenize(long.replace("{c}", "cat")).tolist() == tiny.tokenize(long.replace("{c}", "dog")).tolist()
    assert prompt_collisions(tiny, ["cat", "dog", "bird"], [long]) == [[0, 1, 2]]
    assert prompt_collisions(tiny, ["cat", "dog", "bird"], [long, "a photo of a {c}."]) == []
    assert prompt_collisions(tiny, ["Cat", "dog", "CAT"], [long, "a photo of a {c}."]) == [[0, 2]]
    with pytest.raises(DuplicateClassError):
        ZeroShotClassifier(tiny, ["cat", "dog"], templates=[long])
    assert check_classnames(tiny, [" cat ", "dog"], ["{c}"]) == ["cat", "dog"]


def test_every_prompt_builder_refuses_colliding_names(tiny):
    from cliplab.zeroshot import DescriptionClassifier, PerceptionCLIP

    with pytest.raises(DuplicateClassError):
        class_weights(tiny, ["Star", "star"], ["a photo of a {c}."])        # adapters' text weights
    with pytest.raises(DuplicateClassError):
        PerceptionCLIP(tiny, ["Star", "circle", "STAR"])
    with pytest.raises(DuplicateClassError):
        DescriptionClassifier(tiny, {"Star": ["five points"], "star": ["pointed"]})
    with pytest.raises(DataError, match="repeats another class"):
        DescriptionClassifier(tiny, {"star": ["five points"], " star": ["pointed"]})


def test_eval_runs_on_tied_dataset_classes_and_names_them(tiny, caplog):
    with caplog.at_level("WARNING", logger="cliplab.zeroshot.classifier"):
        w = class_weights(tiny, ["Cat", "dog", "cat"], ["a photo of a {c}."], ties="warn")   # as CLIP_benchmark: runs
    assert "'Cat' = 'cat'" in caplog.text
    np.testing.assert_array_equal(w[0], w[2])


@pytest.mark.parametrize("raw", [
    b"\xef\xbb\xbfcat\r\n dog \r\n\r\n# a comment\r\nbird\r\n",      # UTF-8 with BOM, CRLF
    b"cat\rdog\r\rbird",                                               # old Mac line ends
    "cat\n  dog\t\n\nbird\n".encode("utf-16"),                         # UTF-16 with its BOM
])
def test_read_labels_as_people_write_them(tmp_path, raw):
    (tmp_path / "l.txt").write_bytes(raw)
    assert read_labels(tmp_path / "l.txt") == ["cat", "dog", "bird"]
    (tmp_path / "l.json").write_bytes(b'\xef\xbb\xbf[" cat", "dog "]\r\n')
    assert read_labels(tmp_path / "l.json") == ["cat", "dog"]


def test_label_template_and_descriptor_files_that_are_not_utf8(tmp_path):
    from cliplab.zeroshot import DescriptionClassifier

    f = tmp_path / "latin1.txt"
    f.write_bytes("cat\ncafé {c}\n".encode("latin-1"))
    for read in (read_labels, get_templates):
        with pytest.raises(DataError, match=r"latin1.txt: .* not UTF-8 text \(byte 0xe9 at line 2, offset 7\)"):
            read(str(f))
    j = tmp_path / "d.json"
    j.write_bytes('{"café": ["x"]}'.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        DescriptionClassifier(None, str(j))
    t = tmp_path / "t.txt"
    t.write_bytes(b"\xef\xbb\xbfa photo of a {c}.\r\nart of the {}.\r\n")
    assert get_templates(str(t)) == ["a photo of a {c}.", "art of the {c}."]


def test_classify_images_is_the_classifiers_top_k(tiny):
    from cliplab.zeroshot import classify_images

    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(4)]
    clf = ZeroShotClassifier(tiny, ["red", "green", "blue"])
    assert clf.image_encoder is tiny
    res = classify_images(clf, [*images[:2], "no-such-file.png", *images[2:]], k=2)
    assert [s.index for s in res.skipped] == [2] and len(res.items) == 4
    labels, probs = clf.topk(images, k=2)
    np.testing.assert_array_equal(res.labels, labels)
    np.testing.assert_allclose(res.probs, probs, rtol=1e-6)
    with pytest.raises(UsageError, match="k must be"):
        classify_images(clf, images, k=0)


def test_every_zero_shot_classifier_follows_the_prediction_protocol(tiny):
    from cliplab.zeroshot import DescriptionClassifier, PerceptionCLIP
    from cliplab.zeroshot.perception import SHAPES_BACKGROUNDS

    feats = tiny.encode_images([np.random.default_rng(6).integers(0, 256, (32, 32, 3), dtype=np.uint8)]).features
    shapes = ["circle", "square", "star"]
    for clf in (ZeroShotClassifier(tiny, shapes),
                DescriptionClassifier(tiny, {"circle": ["round"], "square": ["four corners"], "star": ["points"]}),
                PerceptionCLIP(tiny, shapes, SHAPES_BACKGROUNDS, "a photo of a {c}")):
        assert clf.image_encoder is tiny
        np.testing.assert_allclose(clf.predict_proba_features(feats), clf.predict_proba(feats), rtol=1e-6)
