"""Soft prompts, CoOp and KgCoOp on a tiny random CLIP."""

import numpy as np
import pytest
import torch

from _tiny import snapshot
from cliplab.adapt import CoOp, KgCoOp, load_adapter, save_adapter
from cliplab.adapt.prompts import SoftPrompts, split_template
from cliplab.errors import DuplicateClassError, UsageError

NAMES = ["red star", "blue circle", "green square", "yellow hexagon"]


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    """Features of 4 classes in random clusters of the 32-d space: (X, y)."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 6)
    centres = rng.normal(size=(4, 32)).astype(np.float32)
    return _unit(centres[y] + 0.3 * rng.normal(size=(len(y), 32)).astype(np.float32)), y


def test_split_template():
    assert split_template("a {} on a plain background.") == ("a", "on a plain background")
    assert split_template("a photo of a {}.") == ("a photo of a", "")
    with pytest.raises(UsageError, match="exactly one"):
        split_template("a photo")


@pytest.mark.parametrize("before,after,template", [("a photo of a", 0, "a photo of a {}."),
                                                   ("a", "on a plain background", "a {} on a plain background.")])
def test_prompts_from_words_equal_the_written_prompt(tiny, before, after, template):
    sp = SoftPrompts(tiny, NAMES, before=before, after=after)
    with torch.no_grad():
        got = torch.nn.functional.normalize(sp(tiny.model), dim=-1).numpy()
    np.testing.assert_allclose(got, tiny.encode_texts([template.format(c) for c in NAMES]), atol=1e-6)


def test_prompt_shapes_and_errors(tiny):
    sp = SoftPrompts(tiny, NAMES, before=5, class_specific=True)
    assert sp.before.shape == (4, 5, 64) and sp.after is None
    assert sp(tiny.model).shape == (4, 32)
    with pytest.raises(UsageError, match="does not fit the context"):
        SoftPrompts(tiny, ["a " * 30 + "star"], before="a photo of a")
    with pytest.raises(UsageError, match="at least one class"):
        SoftPrompts(tiny, [], before=4)


def test_learners_refuse_names_that_tokenize_alike(tiny, data):
    X, y = data
    with pytest.raises(DuplicateClassError, match="'Red star' = 'red star'"):
        CoOp(backbone=tiny, classnames=["Red star", "blue circle", "red star", "x"], epochs=1).fit(X, y)
    est = CoOp(backbone=tiny, classnames=NAMES, epochs=1, progress=False).fit(X, y)
    with pytest.raises(DuplicateClassError):
        est.with_classnames(["Cat", "CAT"])


def test_coop_starts_at_zero_shot_and_kgcoop_regulariser_is_zero(tiny, data):
    X, y = data
    zs = tiny.encode_texts([f"a photo of a {c}." for c in NAMES])
    est = KgCoOp(backbone=tiny, classnames=NAMES)
    est._setup()
    with torch.no_grad():
        np.testing.assert_allclose(est._text().numpy(), zs, atol=1e-6)
        terms = est._loss(torch.from_numpy(X), torch.from_numpy(y))
    assert abs(float(terms["kg"])) < 1e-5 and float(terms["ce"]) > 0


def test_training_moves_only_the_context(tiny, data):
    X, y = data
    before = snapshot(tiny.model)
    flags = [p.requires_grad for p in tiny.model.parameters()]
    est = CoOp(backbone=tiny, classnames=NAMES, epochs=30, lr=0.005, batch_size=8, progress=False,
               ctx_init="a photo of a").fit(X, y)
    after = snapshot(tiny.model)
    assert all(torch.equal(before[k], after[k]) for k in before)                 # frozen towers
    assert [p.requires_grad for p in tiny.model.parameters()] == flags
    assert all(p.grad is None for p in tiny.model.parameters())
    init = SoftPrompts(tiny, NAMES, before="a photo of a").before.detach().numpy()
    assert est.context_.shape == (4, 64) and not np.allclose(est.context_, init)
    assert est.n_trainable_ == 4 * 64
    assert est.history_[-1]["loss"] < est.history_[0]["loss"]                     # it learns
    zs_acc = np.mean((X @ tiny.encode_texts([f"a photo of a {c}." for c in NAMES]).T).argmax(1) == y)
    assert np.mean(est.predict(X) == y) > zs_acc
    assert est.predict_proba(X).shape == (24, 4)
    np.testing.assert_allclose(est.predict_proba(X).sum(1), 1, atol=1e-6)


def test_coop_defaults_are_the_references(tiny):
    """KaiyangZhou/CoOp ``train.py``: N_CTX 16, CTX_INIT "" (random N(0, 0.02²)); KgCoOp's
    reference starts from "a photo of a"."""
    est = CoOp(backbone=tiny, classnames=NAMES)
    est._setup()
    ctx = est._prompts.before.detach().numpy()
    assert ctx.shape == (16, 64) and abs(float(ctx.std()) - 0.02) < 0.002
    assert KgCoOp(backbone=tiny, classnames=NAMES).ctx_init == "a photo of a"


def test_coop_lr_follows_the_references_per_epoch_schedule(tiny, data, monkeypatch):
    """Dassl's ConstantWarmupScheduler(CosineAnnealingLR(T_max=E), 1 epoch, 1e-5), stepped
    at the end of each epoch: 1e-5 in epoch 0, then lr (1 + cos(pi (e - 1) / E)) / 2."""
    X, y = data
    seen = []
    real_step = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step",
                        lambda self, *a, **k: seen.append(self.param_groups[0]["lr"]) or real_step(self, *a, **k))
    CoOp(backbone=tiny, classnames=NAMES, epochs=4, lr=2e-3, batch_size=8, progress=False).fit(X, y)
    per_epoch = [seen[i:i + 3] for i in range(0, 12, 3)]                        # 24 rows / 8 = 3 steps
    expected = [1e-5] + [2e-3 * (1 + np.cos(np.pi * (e - 1) / 4)) / 2 for e in (1, 2, 3)]
    assert len(seen) == 12
    for got, want in zip(per_epoch, expected):
        np.testing.assert_allclose(got, [want] * 3, rtol=1e-12)


def test_kgcoop_stays_closer_to_the_written_prompt(tiny, data):
    X, y = data
    zs = tiny.encode_texts([f"a photo of a {c}." for c in NAMES])
    kw = dict(backbone=tiny, classnames=NAMES, epochs=15, lr=0.05, batch_size=8, progress=False,
              ctx_init="a photo of a")
    coop = CoOp(**kw).fit(X, y)
    kg = KgCoOp(kg_weight=8.0, **kw).fit(X, y)
    cos = lambda t: float(np.mean(np.sum(t * zs, axis=1)))                      # noqa: E731
    assert cos(kg.text_features_) > cos(coop.text_features_)
    assert set(kg.history_[0]) == {"epoch", "loss", "ce", "kg"}


def test_with_classnames_and_save_load(tiny, data, tmp_path):
    X, y = data
    est = CoOp(backbone=tiny, classnames=NAMES, epochs=2, progress=False, ctx_init="", n_ctx=3).fit(X, y)
    novel = est.with_classnames(["pink ring", "cyan cross"])
    assert novel.predict_proba(X).shape == (24, 2) and novel.classnames_ == ["pink ring", "cyan cross"]
    assert est.predict_proba(X).shape == (24, 4)                                   # the original is kept
    save_adapter(est, tmp_path / "coop")
    loaded = load_adapter(tmp_path / "coop")
    assert loaded.backbone is None
    np.testing.assert_array_equal(loaded.predict_proba(X), est.predict_proba(X))
    with pytest.raises(UsageError, match="backbone"):
        loaded.with_classnames(["pink ring"])
    loaded.backbone = tiny
    np.testing.assert_allclose(loaded.with_classnames(["pink ring", "cyan cross"]).text_features_,
                               novel.text_features_, atol=1e-6)
    csc = CoOp(backbone=tiny, classnames=NAMES, class_specific=True, epochs=1, progress=False).fit(X, y)
    with pytest.raises(UsageError, match="class-specific"):
        csc.with_classnames(["pink ring"])


def test_input_errors(tiny, data):
    X, y = data
    with pytest.raises(UsageError, match="backbone"):
        CoOp(classnames=NAMES).fit(X, y)
    with pytest.raises(UsageError, match=r"features \(N, 32\)"):
        CoOp(backbone=tiny, classnames=NAMES).fit(X[:, :5], y)
    with pytest.raises(UsageError, match="class indices"):
        CoOp(backbone=tiny, classnames=NAMES).fit(X, y + 4)


def test_runs_in_the_fewshot_protocol(tiny, data):
    from cliplab.eval.tasks import fewshot

    X, y = data
    res = fewshot(lambda **p: CoOp(backbone=tiny, classnames=NAMES, epochs=2, progress=False, **p),
                  (X, y), (X, y), (X, y), ks=(1, 2), seeds=(0,), method="coop", progress=False)
    assert set(res.metrics) == {"acc1@1shot", "acc1@2shot"}


def test_sklearn_clone_copies_the_backbone(tiny, data):
    from sklearn.base import clone

    est = CoOp(backbone=tiny, classnames=NAMES, epochs=1, progress=False)
    twin = clone(est)
    assert twin.get_params()["classnames"] == NAMES and twin.backbone is not tiny
    X, y = data
    np.testing.assert_array_equal(twin.fit(X, y).predict(X), est.fit(X, y).predict(X))
