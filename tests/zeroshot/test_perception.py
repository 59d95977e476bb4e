"""PerceptionCLIP scoring checked against a direct NumPy computation; worst-group accuracy."""

import numpy as np
import pytest

from cliplab.errors import UsageError
from cliplab.eval.metrics import group_accuracies, worst_group_accuracy
from cliplab.zeroshot import ZeroShotClassifier
from cliplab.zeroshot.perception import PerceptionCLIP, context_posterior

CLASSES = ["red star", "blue circle", "green square"]
CTX = {"plain": ["on a plain background"], "stripes": ["on a striped background", "with stripes"],
       "none": [""]}


@pytest.fixture(scope="module")
def feats(tiny):
    imgs = np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    return tiny.encode_images(imgs).features                                            # (N, D) float32


def _e(tiny, main, descs):
    s = tiny.encode_texts([f"{main}, {t}." if t else f"{main}." for t in descs]).mean(0)
    return s / np.linalg.norm(s)


def _softmax(z, axis):
    z = z - z.max(axis=axis, keepdims=True)
    return np.exp(z) / np.exp(z).sum(axis=axis, keepdims=True)


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_two_step_matches_numpy(tiny, feats, T):
    clf = PerceptionCLIP(tiny, CLASSES, CTX, temperature=T)
    s = tiny.logit_scale
    E = np.stack([[_e(tiny, f"a photo of a {c}", CTX[z]) for z in CTX] for c in CLASSES])   # (C, Z, D)
    f = s * np.einsum("nd,czd->ncz", feats.astype(np.float64), E)                                              # (N, C, Z)
    p_z = np.exp(f / T).sum(axis=1)
    p_z /= p_z.sum(axis=1, keepdims=True)                                                   # (N, Z)
    p_y = (_softmax(f, axis=1) * p_z[:, None, :]).sum(axis=2)                               # (N, C)
    np.testing.assert_allclose(clf.context_proba(feats), p_z, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(clf.predict_proba(feats), p_y, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(clf.predict_proba(feats).sum(1), 1.0, atol=1e-6)
    assert list(clf.predict(feats)) == [CLASSES[i] for i in p_y.argmax(1)]


def test_without_y_uses_class_agnostic_texts(tiny, feats):
    clf = PerceptionCLIP(tiny, CLASSES, CTX, temperature=2.0, infer="without_y")
    A = np.stack([_e(tiny, "a photo of a object", CTX[z]) for z in CTX])                   # (Z, D)
    np.testing.assert_allclose(clf.context_proba(feats), _softmax(tiny.logit_scale * feats @ A.T / 2.0, 1),
                               rtol=1e-4, atol=1e-6)


def test_single_context_is_plain_zero_shot(tiny, feats):
    clf = PerceptionCLIP(tiny, CLASSES, {"any": [""]})
    zs = ZeroShotClassifier(tiny, CLASSES)                     # "a photo of a {c}."
    np.testing.assert_allclose(clf.predict_proba(feats), zs.predict_proba(feats), rtol=1e-4, atol=1e-6)


def test_high_temperature_gives_uniform_context():
    f = np.random.default_rng(0).normal(size=(4, 3, 5)) * 10
    np.testing.assert_allclose(context_posterior(f, 1e9), np.full((4, 5), 0.2), atol=1e-6)


def test_errors(tiny):
    with pytest.raises(UsageError, match="temperature"):
        PerceptionCLIP(tiny, CLASSES, CTX, temperature=0)
    with pytest.raises(UsageError, match="infer"):
        PerceptionCLIP(tiny, CLASSES, CTX, infer="both")
    with pytest.raises(UsageError, match="non-empty list"):
        PerceptionCLIP(tiny, CLASSES, {"a": "on a plain background"})


def test_worst_group_accuracy():
    y = np.array([0, 0, 1, 1, 1, 0])
    pred = np.array([0, 1, 1, 1, 0, 0])
    groups = np.array([["a", "x"], ["a", "x"], ["b", "x"], ["b", "y"], ["b", "y"], ["a", "y"]])
    acc = group_accuracies(pred, y, groups)
    assert acc == {("a", "x"): 0.5, ("b", "x"): 1.0, ("b", "y"): 0.5, ("a", "y"): 1.0}
    assert worst_group_accuracy(pred, y, groups) == 0.5
    assert worst_group_accuracy(pred, y, [0, 0, 0, 1, 1, 1]) == pytest.approx(2 / 3)
    with pytest.raises(UsageError):
        worst_group_accuracy(pred, y, [0, 1])
