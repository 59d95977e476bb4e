"""MoCoOp: the gate, the reduction to CoOp / zero-shot, the text loss, frozen towers, the contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cliplab.adapt import CoOp, MoCoOp, load_adapter, save_adapter
from cliplab.adapt.mocoop import DEFAULT_GROUPS, gate_targets, grouped_text_loss
from cliplab.errors import UsageError

NAMES = ["cat", "dog", "car", "tree", "boat"]


def _data(d, n_per=3, c=len(NAMES), seed=0):
    """Random unit-norm "image features" (N, D) and labels."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_per * c, d)).astype(np.float32)
    return X / np.linalg.norm(X, axis=1, keepdims=True), np.repeat(np.arange(c), n_per)


def _untrained(est, X, y):
    """``fit`` with the training loop skipped: the fitted state at initialisation."""
    est._train = lambda modules, X, y: []
    return est.fit(X, y)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_gate_weights_sum_to_one_with_top_k_nonzeros(tiny):
    X, y = _data(tiny.embed_dim)
    for k in (1, 2, 3):
        est = _untrained(MoCoOp(tiny, NAMES, top_k=k, random_state=k), X, y)   # the router's init differs by seed
        G = est.expert_weights(X)
        assert G.shape == (len(X), len(DEFAULT_GROUPS))
        np.testing.assert_allclose(G.sum(axis=1), 1.0, atol=1e-6)
        assert ((G > 0).sum(axis=1) == k).all()


@pytest.mark.parametrize("template", ["a photo of a {}.", "a {} on a plain background."])
def test_one_expert_untrained_is_zero_shot(tiny, template):
    """E = 1, extra losses off: the untrained logits are zero-shot CLIP with that template,
    and (nothing after the class) CoOp's with ctx_init = the template's words."""
    X, y = _data(tiny.embed_dim)
    mo = _untrained(MoCoOp(tiny, NAMES, templates=[template], groups=[1], gate_weight=0.0, text_weight=0.0),
                    X, y)
    assert mo.top_k_ == 1                                               # top_k=2 capped at E = 1
    np.testing.assert_array_equal(mo.expert_weights(X), 1.0)
    W = tiny.encode_texts([template.format(c) for c in NAMES])          # (C, D)
    np.testing.assert_allclose(mo.decision_function(X), tiny.logit_scale * X @ W.T, atol=1e-5)
    if template.endswith(" {}."):
        co = _untrained(CoOp(tiny, NAMES, ctx_init=template[:-len(" {}.")]), X, y)
        np.testing.assert_allclose(mo.decision_function(X), co.decision_function(X), atol=1e-5)


def test_text_loss_at_init(tiny):
    """One template per group: each expert starts exactly at its prototypes, so the diagonal
    of T_e P_eᵀ is 1 and wins every row (100 %) for distinct class names; the loss value
    equals the formula written out in NumPy."""
    X, y = _data(tiny.embed_dim)
    templates = ["a photo of a {}.", "a drawing of a {}.", "a {} on a plain background."]
    est = _untrained(MoCoOp(tiny, NAMES, templates=templates, groups=[1, 1, 1]), X, y)
    T, P = est.expert_features_, est.prototypes_                        # (E, C, D)
    np.testing.assert_allclose(T, P, atol=1e-5)
    S = np.einsum("ecd,ekd->eck", T, P)                                 # (E, C, C)
    assert (S.argmax(axis=-1) == np.arange(len(NAMES))).all()
    lse = np.log(np.exp(S).sum(-1))
    expected = np.mean(lse - np.einsum("ecc->ec", S))
    got = float(grouped_text_loss(torch.from_numpy(T), torch.from_numpy(P)))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # Default groups of two: P_e mixes two templates; the expert still starts nearer its
    # own class's prototype than any other class's on this model.
    est = _untrained(MoCoOp(tiny, NAMES), X, y)
    S = np.einsum("ecd,ekd->eck", est.expert_features_, est.prototypes_)
    assert (S.argmax(axis=-1) == np.arange(len(NAMES))).mean() >= 0.8


def test_gate_targets_formula():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]])                           # (B, D)
    P = torch.tensor([[[1.0, 0.0]], [[0.6, 0.8]], [[0.0, 1.0]]])         # (E, C=1, D)
    h = np.array([[1.0, 0.6, 0.0], [0.0, 0.8, 1.0]])
    h[[0, 0, 1, 1], [0, 1, 1, 2]] += 10.0                                # top-2 of each row
    expected = np.exp(h) / np.exp(h).sum(1, keepdims=True)
    np.testing.assert_allclose(gate_targets(f, P, torch.tensor([0, 0]), 2).numpy(), expected, rtol=1e-6)


def test_one_step_trains_prompts_not_the_towers(tiny):
    X, y = _data(tiny.embed_dim)
    before = _snapshot(tiny.model)
    flags = {n: p.requires_grad for n, p in tiny.model.named_parameters()}
    init = _untrained(MoCoOp(tiny, NAMES), X, y)
    est = MoCoOp(tiny, NAMES, epochs=1, batch_size=len(X), warmup_epochs=0).fit(X, y)
    assert len(est.history_) == 1 and set(est.history_[0]) >= {"ce", "gate", "text"}
    after = _snapshot(tiny.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == {n: p.requires_grad for n, p in tiny.model.named_parameters()}
    assert set(est.contexts_) == set(init.contexts_)
    for key in init.contexts_:                                          # every expert's context moved
        assert not np.array_equal(est.contexts_[key], init.contexts_[key]), key
    assert np.abs(est.correction_).max() > 0
    assert not np.array_equal(est.router_weight_, init.router_weight_)


def test_fit_predict_relabel_save_and_bad_groups(tiny, tmp_path):
    X, y = _data(tiny.embed_dim)
    est = MoCoOp(tiny, NAMES, epochs=2).fit(X, y, X_val=X, y_val=y)
    E, C, D = len(DEFAULT_GROUPS), len(NAMES), tiny.embed_dim
    assert est.expert_features_.shape == est.prototypes_.shape == (E, C, D)
    assert est.decision_function(X).shape == est.predict_proba(X).shape == (len(X), C)
    assert est.predict(X).shape == (len(X),) and 0.0 <= est.val_accuracy_ <= 1.0
    new = est.with_classnames(["red", "blue", "green"])
    assert new.decision_function(X).shape == (len(X), 3) and new.expert_features_.shape == (E, 3, D)
    assert set(new.predict(X)) <= {0, 1, 2} and est.expert_features_.shape == (E, C, D)
    G = est.expert_weights(X)                                           # trained router: same rule
    np.testing.assert_allclose(G.sum(axis=1), 1.0, atol=1e-6)
    assert ((G > 0).sum(axis=1) == 2).all()
    np.testing.assert_array_equal(new.expert_weights(X), G)             # the router stays
    back = est.with_classnames(NAMES)                                   # same names: same model
    np.testing.assert_allclose(back.decision_function(X), est.decision_function(X), atol=1e-5)
    loaded = load_adapter(save_adapter(est, tmp_path / "mocoop"))
    np.testing.assert_allclose(loaded.decision_function(X), est.decision_function(X), rtol=1e-6)
    for bad in ({"groups": [3, 3]}, {"groups": [0, 8]}, {"templates": ["a {}.", "{} x."], "groups": [1]},
                {"templates": ["no placeholder"]}, {"templates": "a photo of a {}."}, {"top_k": 0}):
        with pytest.raises(UsageError):
            MoCoOp(tiny, NAMES, epochs=1, **bad).fit(X, y)
    with pytest.raises(UsageError):
        MoCoOp(tiny, NAMES).fit(X[:, :8], y)                            # not (N, D) features
