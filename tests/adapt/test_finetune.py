"""The fine-tuners (LoRA / CLIP-SVD / full) on the tiny CLIP: zero-shot at step 0, the original
Backbone untouched, only the adapter tensors trained, state_ round trip, WiSE-FT merge."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cliplab.adapt import METHODS as REGISTRY
from cliplab.adapt.finetune import FineTuner, FullFineTuner, LoRAFineTuner, SVDFineTuner
from cliplab.errors import CheckpointMismatch, UsageError
from cliplab.surgery import interpolate, trainable_parameters

from _tiny import TINY_CFG, snapshot

NAMES = ["red circle", "blue square", "green star"]
METHODS = ("lora", "svd", "full")
LR = {"lora": 1e-2, "svd": 1e-2, "full": 1e-3}      # large, so 2 epochs move the weights visibly


def tuner(method, *args, **kw):
    """The registered fine-tuner ``method`` built with those of ``kw`` it takes."""
    cls = REGISTRY.get(method)
    return cls(*args, **{k: v for k, v in kw.items() if k in cls().get_params()})


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)   # (N, H, W, 3)
    y = np.repeat(np.arange(len(NAMES)), 4)
    return X, y


@pytest.fixture(scope="module")
def fitted(tiny, data):
    """method -> (estimator fitted for 2 epochs, whether tiny's weights and flags stayed the same)."""
    cache = {}

    def get(method):
        if method not in cache:
            before = snapshot(tiny.model)
            flags = [p.requires_grad for p in tiny.model.parameters()]
            est = tuner(method, tiny, NAMES, epochs=2, batch_size=4, lr=LR[method], progress=False).fit(*data)
            after = tiny.model.state_dict()
            same = (all(torch.equal(v, after[k]) for k, v in before.items())
                    and flags == [p.requires_grad for p in tiny.model.parameters()])
            cache[method] = (est, same)
        return cache[method]

    return get


def _zero_shot(bb, X):
    img = bb.encode_images(X, progress=False).features                                 # (N, D)
    txt = bb.encode_texts([f"a photo of a {c}." for c in NAMES], progress=False)  # (C, D)
    return img, txt


@pytest.mark.parametrize("method", METHODS)
def test_fit_predict_leaves_backbone_unchanged(fitted, data, method):
    est, unchanged = fitted(method)
    X, y = data
    assert unchanged
    assert est.lr_ == LR[method] and len(est.history_) == 2
    assert est.text_features_.shape == (3, TINY_CFG["embed_dim"])
    np.testing.assert_allclose(np.linalg.norm(est.text_features_, axis=1), 1.0, atol=1e-5)
    assert est.decision_function(X).shape == (12, 3)
    np.testing.assert_allclose(est.predict_proba(X).sum(1), 1.0, atol=1e-5)
    pred = est.predict(X)
    assert pred.shape == (12,) and set(pred) <= {0, 1, 2}


@pytest.mark.parametrize("method", METHODS)
def test_only_trained_tensors_change(fitted, method):
    est, _ = fitted(method)
    fresh = est._build().model.state_dict()                           # the adapted model before training
    trained = est._adapted.model.state_dict()
    assert set(est.state_) <= set(trained)
    suffix = {"lora": (".lora_A", ".lora_B"), "svd": (".original",), "full": ("",)}[method]
    assert all(k.endswith(suffix) for k in est.state_)
    for k, v in trained.items():
        if k not in est.state_:
            assert torch.equal(v, fresh[k]), k                            # base weights bit-for-bit
    if method == "full":
        assert set(est.state_) == {n for n, _ in est.backbone.model.named_parameters()}
    moved = [k for k in est.state_ if not k.endswith(".lora_A")
             and not np.array_equal(est.state_[k], fresh[k].numpy())]
    assert moved                                                        # B (or s, or W) trained
    for k in est.state_:                                                # state_ holds the trained values
        np.testing.assert_array_equal(est.state_[k], trained[k].numpy())


@pytest.mark.parametrize("method", METHODS)
def test_untrained_is_zero_shot(tiny, data, method):
    X, _ = data
    est = tuner(method, tiny, NAMES)
    est._setup()                                                        # the model of step 0
    with torch.no_grad():
        est._finish()
    est.classes_ = np.arange(len(NAMES))
    img, txt = _zero_shot(tiny, X)
    np.testing.assert_allclose(est._image_features(X), img, atol=1e-5)
    np.testing.assert_allclose(est.text_features_, txt, atol=1e-5)
    np.testing.assert_allclose(est.decision_function(X), tiny.logit_scale * img @ txt.T, atol=1e-3)
    np.testing.assert_array_equal(est.predict(X), np.argmax(img @ txt.T, axis=1))


@pytest.mark.parametrize("method", METHODS)
def test_state_round_trip(fitted, data, method):
    est, _ = fitted(method)
    X, _ = data
    loaded = type(est)(**est.get_params())
    for k, v in vars(est).items():                                      # what save_adapter keeps
        if k.endswith("_") and not k.startswith("_"):
            setattr(loaded, k, v)
    assert getattr(loaded, "_adapted", None) is None
    np.testing.assert_array_equal(loaded.decision_function(X), est.decision_function(X))
    assert loaded._adapted is not None                                  # rebuilt lazily

    wrong = tuner("svd" if method != "svd" else "lora", **est.get_params())
    for k, v in vars(est).items():
        if k.endswith("_") and not k.startswith("_"):
            setattr(wrong, k, v)
    with pytest.raises(CheckpointMismatch):
        wrong.predict(X)


@pytest.mark.parametrize("method", METHODS)
def test_adapted_backbone_is_plain_and_mixes(tiny, fitted, data, method):
    est, _ = fitted(method)
    X, _ = data
    ft = est.adapted_backbone()
    assert set(ft.model.state_dict()) == set(tiny.model.state_dict())   # plain: WiSE-FT accepts it
    texts = [f"a photo of a {c}." for c in NAMES]
    adapted = est._adapted.encode_images(X, progress=False).features, est._adapted.encode_texts(texts)
    merged = ft.encode_images(X, progress=False).features, ft.encode_texts(texts)
    for a, m in zip(adapted, merged):
        np.testing.assert_allclose(m, a, atol=1e-5)                      # merged == unmerged
    zs = _zero_shot(tiny, X)
    assert np.abs(adapted[0] - zs[0]).max() > 1e-3                      # training did something
    for alpha, want in ((0.0, zs), (1.0, adapted)):
        mixed = interpolate(tiny, ft, alpha)
        got = mixed.encode_images(X, progress=False).features, mixed.encode_texts(texts)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, atol=1e-5)


def test_n_trainable(tiny, fitted):
    lora, svd, full = (fitted(m)[0] for m in METHODS)
    assert lora.n_trainable_ == trainable_parameters(lora._adapted)[0]
    vis, txt = TINY_CFG["vision_cfg"], TINY_CFG["text_cfg"]
    six_w = 6 * (vis["layers"] * vis["width"] + txt["layers"] * txt["width"])    # 6W per block
    assert svd.n_trainable_ == six_w == trainable_parameters(svd._adapted)[0]
    assert full.n_trainable_ == sum(p.numel() for p in tiny.model.parameters())


def test_one_class_per_method(tiny, fitted, data):
    assert all(issubclass(REGISTRY.get(m), FineTuner) and REGISTRY.meta(m)["kind"] == "learner" for m in METHODS)
    assert [REGISTRY.get(m) for m in METHODS] == [LoRAFineTuner, SVDFineTuner, FullFineTuner]
    assert "method" not in LoRAFineTuner().get_params() and LoRAFineTuner.name == "lora"
    assert {"rank", "lora_alpha"} <= set(LoRAFineTuner().get_params())
    assert "rank" not in SVDFineTuner().get_params() and FullFineTuner.name == "full"
    assert {"optimizer": "adamw", "weight_decay": 0.01, "grad_clip": 1.0, "random_state": 0}.items() \
        <= FullFineTuner().get_params().items()                          # hyper-parameters are parameters
    est = SVDFineTuner(tiny, NAMES, epochs=2, batch_size=4, lr=LR["svd"], progress=False).fit(*data)
    np.testing.assert_array_equal(est.decision_function(data[0]), fitted("svd")[0].decision_function(data[0]))
    assert type(est)(**est.get_params()).get_params() == est.get_params()   # params stored verbatim


def test_with_classnames(fitted, data):
    est, _ = fitted("lora")
    same = est.with_classnames(NAMES)
    np.testing.assert_allclose(same.text_features_, est.text_features_, atol=1e-6)
    other = est.with_classnames(["purple triangle", "red star"])
    assert other.decision_function(data[0]).shape == (12, 2)


def test_errors(tiny, fitted, data):
    X, y = data
    with pytest.raises(UsageError, match="optimizer"):
        LoRAFineTuner(tiny, NAMES, optimizer="adam", epochs=1).fit(X, y)
    with pytest.raises(UsageError, match="uint8"):
        LoRAFineTuner(tiny, NAMES).fit(X.astype(np.float32), y)
    with pytest.raises(UsageError, match="model's size"):
        LoRAFineTuner(tiny, NAMES).fit(X[:, :16, :16], y)
    with pytest.raises(UsageError, match="uint8"):
        LoRAFineTuner(tiny, NAMES).fit(np.zeros((12, TINY_CFG["embed_dim"]), np.float32), y)
    with pytest.raises(UsageError, match="lr"):
        LoRAFineTuner(tiny, NAMES, lr=-1.0).fit(X, y)
    with pytest.raises(UsageError, match="template"):
        LoRAFineTuner(tiny, NAMES, template="a photo").fit(X, y)
    with pytest.raises(UsageError, match="epochs"):
        LoRAFineTuner(tiny, NAMES, epochs=0).fit(X, y)
    with pytest.raises(UsageError, match="model's size"):
        fitted("lora")[0].predict(X[:, :16, :16])
