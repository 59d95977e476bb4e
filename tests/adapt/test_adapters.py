"""cliplab.adapt: parity with the papers' formulas, the scikit-learn contract, save/load,
and the rule that hyper-parameters never see test labels."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.utils.estimator_checks import parametrize_with_checks

from cliplab.adapt import (GDA, METHODS, CapSAdapter, LinearProbe, TipAdapter, TipAdapterF, list_methods,
                           load_adapter, save_adapter)
from cliplab.adapt import _base

ADAPTERS = list_methods("adapter")

C, K, D = 5, 4, 16


def _unit(a):
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def _data(seed=0, n_per=K, c=C, d=D, sep=1.5):
    """Class-structured unit features, text weights near the class directions, captions."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(c, d)))
    y = np.repeat(np.arange(c), n_per)
    X = _unit(sep * centres[y] + rng.normal(size=(len(y), d)) / np.sqrt(d))
    T = _unit(centres + 0.5 * rng.normal(size=(c, d)) / np.sqrt(d))
    cap = _unit(X + 0.3 * rng.normal(size=X.shape))
    return X, y, T, cap


def _make(name, T):
    """The registered adapter ``name`` with its test preset (small grids) and text weights if it takes them."""
    cls = METHODS.get(name)
    kw = dict(cls.test_preset)
    if "text_weights" in cls().get_params():
        kw["text_weights"] = T
    return cls(**kw)


def _fit(est, X, y, cap, **kw):
    extra = {"captions_X": cap} if "captions_X" in est.fit_inputs else {}
    return est.fit(X, y, **extra, **kw)


# ----------------------------------------------------------------------- GDA parity
def _gda_reference(X, y, c):
    """The paper's / reference's formulas, written out directly."""
    d = X.shape[1]
    mus = np.stack([X[y == k].mean(0) for k in range(c)])
    centred = np.concatenate([X[y == k] - mus[k] for k in range(c)])
    cov = np.cov(centred.T)                                               # /(N-1), centred on 0
    prec = d * np.linalg.pinv((len(centred) - 1) * cov + np.trace(cov) * np.eye(d))
    W = mus @ prec                                                        # (C, D)
    b = np.log(np.full(c, 1.0 / c)) - 0.5 * np.einsum("nd,dc,nc->n", mus, prec, mus)
    return W, b


def test_gda_matches_reference_formulas():
    X, y, T, _ = _data(1, n_per=8, d=12)
    W, b = _gda_reference(X.astype(np.float64), y, C)
    est = GDA(text_weights=T, alpha=0.37).fit(X, y)
    np.testing.assert_allclose(est.coef_, W, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(est.intercept_, b, rtol=1e-6, atol=1e-8)
    Xq = _data(2, n_per=3, d=12)[0]
    expected = 100.0 * Xq @ T.T + 0.37 * (Xq @ W.T + b)                     # zero-shot ensemble
    np.testing.assert_allclose(est.decision_function(Xq), expected, rtol=1e-5, atol=1e-4)


def test_gda_matches_sklearn_lda_without_ridge():
    rng = np.random.default_rng(3)
    c, n_per, d = 4, 60, 6
    means = 3 * rng.normal(size=(c, d))
    y = np.repeat(np.arange(c), n_per)
    X = means[y] + rng.normal(size=(len(y), d)) @ rng.normal(size=(d, d))
    ours = GDA(ridge="none").fit(X, y)
    lda = LinearDiscriminantAnalysis(solver="lsqr").fit(X, y)
    Xq = means[rng.integers(0, c, 300)] + 2 * rng.normal(size=(300, d))
    np.testing.assert_array_equal(ours.predict(Xq), lda.predict(Xq))
    np.testing.assert_allclose(ours.coef_ * len(X) / d, lda.coef_, rtol=1e-6)  # coef scale N/D


def test_gda_without_text_weights_is_lda_and_ignores_alpha():
    X, y, _, _ = _data(4)
    a = GDA(alpha=0.01).fit(X, y).decision_function(X)
    b = GDA(alpha=50.0).fit(X, y).decision_function(X)
    np.testing.assert_allclose(a, b)


# ------------------------------------------------------------------------ Tip / CapS
def test_tip_alpha_zero_is_zero_shot():
    X, y, T, _ = _data(5)
    Xq = _data(6)[0]
    est = TipAdapter(alpha=0.0, beta=3.0, text_weights=T).fit(X, y)
    np.testing.assert_allclose(est.decision_function(Xq), 100.0 * Xq @ T.T, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(est.predict(Xq), np.argmax(Xq @ T.T, axis=1))


def test_tip_cache_logits_match_formula():
    X, y, T, _ = _data(7)
    Xq = _data(8)[0]
    est = TipAdapter(alpha=1.3, beta=4.0, text_weights=T).fit(X, y)
    L = np.eye(C)[y]
    expected = 100.0 * Xq @ T.T + 1.3 * np.exp(-4.0 * (1 - Xq @ X.T)) @ L
    np.testing.assert_allclose(est.decision_function(Xq), expected, rtol=1e-5, atol=1e-3)


def test_tip_f_with_zero_epochs_is_tip():
    X, y, T, _ = _data(9)
    tip = TipAdapter(alpha=1.0, beta=2.0, text_weights=T).fit(X, y)
    tipf = TipAdapterF(alpha=1.0, beta=2.0, text_weights=T, epochs=0).fit(X, y)
    np.testing.assert_allclose(tipf.decision_function(X), tip.decision_function(X), rtol=1e-6)


def test_tip_f_training_moves_the_keys():
    X, y, T, _ = _data(9)
    X, y = X[::K], y[::K]                                  # 1-shot: no validation, all epochs run
    est = TipAdapterF(alpha=1.0, beta=2.0, text_weights=T, epochs=5, lr=1e-2).fit(X, y)
    assert est.selection_ == "default" and est.epoch_ == 5
    assert not np.allclose(est.keys_, TipAdapter(alpha=1.0, beta=2.0).fit(X, y).keys_)


def test_caps_delta0_gamma0_is_tip_and_kl_rescaled():
    X, y, T, cap = _data(10)
    Xq = _data(11)[0]
    caps = CapSAdapter(alpha=1.5, beta=3.0, gamma=0.0, delta=0.0, text_weights=T).fit(X, y, captions_X=cap)
    tip = TipAdapter(alpha=1.5, beta=3.0, text_weights=T).fit(X, y)
    np.testing.assert_allclose(caps.decision_function(Xq), tip.decision_function(Xq), rtol=1e-5)
    from cliplab.adapt.caps import kl_divergence, kl_signatures
    p = kl_signatures(X, T)
    np.testing.assert_allclose(p.sum(1), 1, rtol=1e-6)
    np.testing.assert_allclose(np.diag(kl_divergence(p, p)), 0, atol=1e-6)
    assert (kl_divergence(p, p) >= -1e-6).all()


def test_caps_caption_callable_and_missing_captions():
    X, y, T, cap = _data(12)
    lookup = {X[i].tobytes(): cap[i] for i in range(len(X))}
    est = CapSAdapter(alpha=1.0, beta=1.0, gamma=0.5, delta=1.0, text_weights=T,
                      caption_features=lambda F: np.stack([lookup[r.tobytes()] for r in F]))
    est.fit(X, y)
    ref = CapSAdapter(alpha=1.0, beta=1.0, gamma=0.5, delta=1.0, text_weights=T).fit(X, y, captions_X=cap)
    np.testing.assert_allclose(est.decision_function(X), ref.decision_function(X))
    with pytest.raises(ValueError, match="caption features"):
        CapSAdapter(text_weights=T).fit(X, y)


# --------------------------------------------------------------- every estimator
@pytest.mark.parametrize("name", ADAPTERS)
def test_contract_clone_fit_proba_save_load(name, tmp_path):
    X, y, T, cap = _data(13)
    est = _make(name, T)
    params = est.get_params()
    twin = clone(est)
    assert twin.get_params().keys() == params.keys()
    _fit(est, X, y, cap)
    assert est.get_params()["text_weights"] is params["text_weights"] if "text_weights" in params else True
    Xq = _data(14)[0]
    proba = est.predict_proba(Xq)
    assert proba.shape == (len(Xq), C)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-5)
    assert set(est.predict(Xq)) <= set(est.classes_)
    save_adapter(est, tmp_path / name)
    back = load_adapter(tmp_path / name)
    assert type(back) is type(est)
    np.testing.assert_array_equal(back.predict(Xq), est.predict(Xq))
    np.testing.assert_allclose(back.decision_function(Xq), est.decision_function(Xq), rtol=1e-6)


def test_string_classes_round_trip(tmp_path):
    X, y, T, _ = _data(15)
    names = np.array(["circle", "square", "star", "cross", "heart"])[y]
    est = GDA(text_weights=T).fit(X, names)
    save_adapter(est, tmp_path)
    back = load_adapter(tmp_path)
    assert back.classes_.tolist() == sorted(set(names))
    np.testing.assert_array_equal(back.predict(X), est.predict(X))


def test_errors():
    X, y, T, _ = _data(16)
    with pytest.raises(ValueError, match="text_weights must be"):
        GDA(text_weights=T[:3]).fit(X, y)
    with pytest.raises(ValueError, match="X_val and y_val"):
        GDA(text_weights=T).fit(X, y, X_val=X)
    with pytest.raises(ValueError, match="at least 2 classes"):
        TipAdapter().fit(X, np.zeros(len(X)))


# --------------------------------------------------- no test labels in the search
@pytest.mark.parametrize("name", ["gda", "tip", "tip-f", "caps"])
def test_search_sees_only_validation_labels(name, monkeypatch):
    """Every label array scored during the search is the validation split's, and the
    choice does not move when test labels are permuted (the estimator never gets them)."""
    X, y, T, cap = _data(17, n_per=6)
    Xv, yv, _, capv = _data(18, n_per=3)
    Xs, ys, _, _ = _data(19, n_per=5)
    seen = []
    real = _base.val_accuracy
    monkeypatch.setattr(_base, "val_accuracy", lambda z, t: seen.append(np.array(t)) or real(z, t))
    est = _fit(_make(name, T), X, y, cap, X_val=Xv, y_val=yv)
    assert seen and all(np.array_equal(s, yv) for s in seen)
    assert est.selection_ == "validation"
    chosen = {k: v for k, v in vars(est).items() if k in ("alpha_", "beta_", "gamma_", "delta_", "epoch_")}
    est.score(Xs, ys)                                      # scoring on test afterwards ...
    est2 = _fit(_make(name, T), X, y, cap, X_val=Xv, y_val=yv)
    est2.score(Xs, np.random.default_rng(0).permutation(ys))
    assert {k: getattr(est2, k) for k in chosen} == chosen  # ... changes nothing chosen


def test_carved_split_draws_from_training_labels_only(monkeypatch):
    X, y, T, _ = _data(20, n_per=8)
    seen = []
    real = _base.val_accuracy
    monkeypatch.setattr(_base, "val_accuracy", lambda z, t: seen.append(np.array(t)) or real(z, t))
    est = GDA(text_weights=T).fit(X, y)
    assert est.selection_ == "carved" and seen
    assert all(len(s) == C * 2 for s in seen)             # round(0.25 * 8) = 2 per class
    one_shot = GDA(text_weights=T).fit(X[::8], y[::8])
    assert one_shot.selection_ == "default" and one_shot.alpha_ == 0.1
    # one shot per class: Sigma = 0, P = pinv(0) = 0, so GDA adds a constant: zero-shot
    np.testing.assert_array_equal(one_shot.predict(X), np.argmax(X @ T.T, axis=1))


def test_fewshot_protocol_runs_adapters():
    from cliplab.eval.tasks import fewshot

    X, y, T, _ = _data(21, n_per=10)
    Xs, ys, _, _ = _data(22, n_per=4)
    r = fewshot(lambda **p: GDA(text_weights=T, **p), (X, y), (X[:10], y[:10]), (Xs, ys),
                ks=(2, 4), seeds=(0,), method="gda")
    assert 0.0 <= r.metrics["acc1@4shot"] <= 1.0


# ------------------------------------------------------------ scikit-learn checks
def _preset(name):
    cls = METHODS.get(name)
    return cls(**cls.test_preset)


@parametrize_with_checks([LinearProbe(C=1.0), GDA(ridge="none"), *(_preset(n) for n in ADAPTERS)])
def test_sklearn_contract(estimator, check):
    check(estimator)


# ---------------------------------------- ties and empty searches: the references' rules
def _caps_reference_loop(X, y, cap, T, Xv, yv, grid):
    """The reference's search (WLuLi/CapS-Adapter ``madapter.py`` ``hparam_search``) written
    out: loops alpha -> beta -> delta -> gamma, best accuracy starts at 0 with all four at 0,
    a candidate replaces it only when strictly better.  Also returns every candidate's score."""
    from cliplab.adapt.caps import kl_divergence, kl_logits, kl_signatures, multimodal_affinity
    from cliplab.adapt.tip import linear_grid

    n_beta, n_alpha, n_gamma = grid
    order = np.argsort(y, kind="stable")
    keys, cap_keys, starts = X[order], cap[order], np.searchsorted(y[order], np.arange(C))
    kl = kl_divergence(kl_signatures(Xv, T), kl_signatures(keys, T))
    best, best_acc, scores = (0.0, 0.0, 0.0, 0.0), 0.0, []
    for alpha in linear_grid(0.1, 50.0, n_alpha):
        for beta in linear_grid(1.0, 50.0, n_beta):
            for delta in [i / 10 for i in range(11)]:
                aff = multimodal_affinity(Xv, keys, cap_keys, delta)
                cache = np.add.reduceat(np.exp(-beta * (1 - aff)), starts, axis=1)
                for gamma in linear_grid(0.1, 30.0, n_gamma):
                    z = 100.0 * Xv @ T.T + alpha * cache + gamma * kl_logits(kl, aff, starts)
                    acc = float(np.mean(z.argmax(1) == yv))
                    scores.append(((delta, beta, alpha, gamma), acc))
                    if acc > best_acc:
                        best, best_acc = (alpha, beta, gamma, delta), acc
    return best, best_acc, scores


def test_caps_keeps_the_first_tie_in_the_reference_loop_order():
    """5 classes, 4 shots, 16 dims, grid (n_beta, n_alpha, n_gamma) = (6, 5, 3): many
    candidates tie; the chosen tuple is the first of them in the order alpha -> beta ->
    delta -> gamma (here alpha 20.06, delta 0.6), not the first in the order the search
    computes them (delta first: alpha 40.02, delta 0)."""
    rng = np.random.default_rng(5)
    centres = _unit(rng.normal(size=(C, D)))
    def draw(n):                                                           # noqa: E306
        y = np.repeat(np.arange(C), n)
        return _unit(0.6 * centres[y] + rng.normal(size=(len(y), D)) / np.sqrt(D)), y
    X, y = draw(K)
    Xv, yv = draw(4)
    T = _unit(centres + 1.5 * rng.normal(size=(C, D)) / np.sqrt(D))
    cap = _unit(X + 0.3 * rng.normal(size=X.shape))
    grid = (6, 5, 3)
    est = CapSAdapter(text_weights=T, search_steps=grid).fit(X, y, Xv, yv, captions_X=cap)
    ref, ref_acc, scores = _caps_reference_loop(X, y, cap, T, Xv, yv, grid)
    ties = [p for p, a in scores if a == ref_acc]                           # (delta, beta, alpha, gamma)
    d, b, a, g = min(ties)                                     # the first in the search's own order
    assert len(ties) > 1 and (a, b, g, d) != ref               # the two orders disagree here
    assert (est.alpha_, est.beta_, est.gamma_, est.delta_) == pytest.approx(ref, abs=1e-12)
    assert est.val_score_ == ref_acc


def test_searches_that_score_zero_keep_the_references_initial_values():
    """Validation labels that no candidate can hit: each search keeps what its reference
    starts from — GDA alpha 0.1 (mrflogs/ICLR24), Tip-Adapter alpha = beta = 0
    (gaopengcuhk/Tip-Adapter ``search_hp``), CapS-Adapter all four 0."""
    X, y, T, cap = _data(23, sep=4.0)
    Xv, yv = X[::K], (y[::K] + 1) % C                                       # always wrong labels
    gda = GDA(text_weights=T).fit(X, y, Xv, yv)
    assert gda.val_score_ == 0.0 and gda.alpha_ == 0.1
    tip = TipAdapter(text_weights=T, search_steps=(10, 5)).fit(X, y, Xv, yv)
    assert tip.val_score_ == 0.0 and (tip.alpha_, tip.beta_) == (0.0, 0.0)
    caps = CapSAdapter(text_weights=T, search_steps=(3, 3, 2)).fit(X, y, Xv, yv, captions_X=cap)
    assert caps.val_score_ == 0.0 and (caps.alpha_, caps.beta_, caps.gamma_, caps.delta_) == (0, 0, 0, 0)
    np.testing.assert_array_equal(caps.predict(X), np.argmax(X @ T.T, axis=1))   # zero-shot alone


def test_tip_f_keeps_a_trained_epoch_never_the_untrained_cache():
    """The reference (``run_tip_adapter_F``) scores and keeps epochs after training only.
    Here the untrained cache already scores 100 % on validation, as every epoch does; the
    first trained epoch is kept, not epoch 0."""
    X, y, T, _ = _data(24, n_per=6, sep=4.0)
    Xv, yv, _, _ = _data(24, n_per=2, sep=4.0)
    base = TipAdapterF(alpha=1.0, beta=2.0, text_weights=T, epochs=0).fit(X, y, Xv, yv)
    assert base.val_score_ == 1.0 and base.epoch_ == 0                     # epochs=0: the cache itself
    est = TipAdapterF(alpha=1.0, beta=2.0, text_weights=T, epochs=3, lr=1e-2).fit(X, y, Xv, yv)
    assert est.val_score_ == 1.0 and est.epoch_ == 1
    assert not np.allclose(est.keys_, base.keys_)


def test_linear_probe_C_search_is_coops():
    """CoOp ``lpclip/linear_probe.py``: the first best of (1e6, 1e4, ..., 1e-6), then 8 binary
    steps on [c*/10, 10 c*] keeping the left end on ties.  When every C scores the same (here
    0: validation labels nothing predicts), that is 1e6, then the left end 1e5 every step."""
    from cliplab.adapt.linear import search_C

    X, y, _, _ = _data(25, n_per=6, sep=4.0)
    Xv, yv = X[::3], (y[::3] + 1) % C
    assert search_C((X, y), (Xv, yv)) == (1e5, 0.0)
    est = LinearProbe().fit(X, y, Xv, yv)
    assert est.C_ == 1e5 and est.val_score_ == 0.0


def test_linear_probe_refit_fits_train_plus_validation():
    """``refit=True`` (the benchmark protocol): the same C search on (train -> val), then the
    final fit on train + val; ``refit=False`` fits on train only.  Without a given validation
    split both fit on all of X."""
    from cliplab.adapt.linear import logistic_regression

    X, y, _, _ = _data(26, n_per=6)
    Xv, yv, _, _ = _data(27, n_per=3)
    own = LinearProbe().fit(X, y, Xv, yv)
    both = LinearProbe(refit=True).fit(X, y, Xv, yv)
    assert both.C_ == own.C_ and both.search_path_ == own.search_path_ and len(own.search_path_) == 7 + 2 * 8
    X64, Xv64 = X.astype(np.float64), Xv.astype(np.float64)
    ref = logistic_regression(own.C_).fit(np.concatenate([X64, Xv64]), np.concatenate([y, yv]))
    np.testing.assert_allclose(both.coef_, ref.coef_, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(own.coef_, logistic_regression(own.C_).fit(X64, y).coef_, rtol=1e-6, atol=1e-9)
    carved = LinearProbe(refit=True).fit(X, y)
    np.testing.assert_array_equal(carved.coef_, LinearProbe().fit(X, y).coef_)
