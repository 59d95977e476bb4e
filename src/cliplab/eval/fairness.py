"""Subgroup fairness and shortcut measurements for any classifier's predictions.

Everything takes per-example arrays: true labels ``y`` (N,), predicted labels (N,),
optionally scores of the positive class (N,), and a sensitive attribute (N,) (strings or
integers: ``sex``, ``site``, ``background``...).  Group metrics and their gaps are
computed with `fairlearn <https://fairlearn.org>`_'s ``MetricFrame``;
equalized-odds and demographic-parity differences are fairlearn's functions.

Sources
-------
- Sourget et al., "Fairness and robustness of CLIP-based models for chest X-rays" (2025),
  reference ``TheoSourget/clip_cxr_fairness``: subgroup AUROC; the gap is max - min over
  subgroups; under-diagnosis = false-negative rate per subgroup; the drain shortcut test
  (AUROC on positives with the attribute + all negatives vs positives without it + all
  negatives); attribute probing from embeddings with a validation-selected head and a 95 %
  percentile bootstrap (1,000 resamples, skipping one-class resamples).
- Equalized odds (Hardt et al., NeurIPS 2016, arXiv 1610.02413) and demographic parity:
  fairlearn's ``equalized_odds_difference`` (the larger of the TPR and FPR gaps) and
  ``demographic_parity_difference`` (gap in selection rate).
"""

from __future__ import annotations

import numpy as np

from ..errors import UsageError

__all__ = ["subgroup_metrics", "shortcut_test", "attribute_probe", "bootstrap_auroc"]


def _fairlearn():
    try:
        import fairlearn.metrics as fm
    except ImportError as e:
        raise UsageError("subgroup fairness metrics need fairlearn: pip install 'cliplab[fairness]'") from e
    return fm


def _arrays(y_true, y_pred, sensitive):
    y, p, s = np.asarray(y_true).reshape(-1), np.asarray(y_pred).reshape(-1), np.asarray(sensitive).reshape(-1)
    if not (len(y) == len(p) == len(s)):
        raise UsageError(f"labels, predictions and attribute need one value per example; got {len(y)}, "
                         f"{len(p)} and {len(s)}")
    if not len(y):
        raise UsageError("no examples to measure")
    return y, p, s.astype(str)


def _auroc(y_bin, score) -> float:
    from sklearn.metrics import roc_auc_score

    y_bin = np.asarray(y_bin)
    if len(np.unique(y_bin)) < 2:
        return float("nan")
    return float(roc_auc_score(y_bin, score))


def subgroup_metrics(y_true, y_pred, sensitive, *, positive=None, scores=None) -> dict:
    """Per-subgroup metrics and their gaps.

    Parameters
    ----------
    y_true, y_pred : array (N,)
        Class indices (or any labels).
    sensitive : array (N,)
        The attribute that defines the subgroups.
    positive : label, optional
        The positive class.  With it, each group also gets ``tpr``, ``fpr``, ``fnr``
        (under-diagnosis) and ``selection_rate`` of "predicted positive", and the result
        gets fairlearn's ``equalized_odds_difference`` and ``demographic_parity_difference``.
    scores : array (N,), optional
        Score of the positive class (needs ``positive``): adds per-group ``auroc`` (NaN
        for a group with one class).

    Returns
    -------
    dict
        ``groups``: ``{group: {"n", "accuracy", ...}}``; ``gaps``: max - min over groups
        of each metric (NaN groups left out); ``worst``: the lowest ``accuracy`` (and
        ``auroc``), and the fairlearn differences when ``positive`` is given.

    Raises
    ------
    UsageError
        Mismatched lengths, no examples, ``scores`` without ``positive``.
    """
    from sklearn.metrics import accuracy_score

    fm = _fairlearn()
    MetricFrame = fm.MetricFrame

    y, p, s = _arrays(y_true, y_pred, sensitive)
    if scores is not None and positive is None:
        raise UsageError("subgroup AUROC needs the positive class (positive=...)")
    table = MetricFrame(metrics={"accuracy": accuracy_score}, y_true=y, y_pred=p, sensitive_features=s).by_group
    if positive is not None:
        yt, yp = (y == positive).astype(int), (p == positive).astype(int)   # the positive class vs the rest
        binary = MetricFrame(metrics={"tpr": fm.true_positive_rate, "fpr": fm.false_positive_rate,
                                      "fnr": fm.false_negative_rate, "selection_rate": fm.selection_rate},
                             y_true=yt, y_pred=yp, sensitive_features=s).by_group
        table = table.join(binary)
    groups = {}
    for g in table.index:
        row = {k: float(v) for k, v in table.loc[g].items()}
        mask = s == str(g)
        row["n"] = int(mask.sum())
        if scores is not None:
            row["auroc"] = _auroc(yt[mask], np.asarray(scores, dtype=np.float64).reshape(-1)[mask])
        groups[str(g)] = row
    names = [k for k in next(iter(groups.values())) if k != "n"]
    gaps = {}
    for k in names:
        vals = [r[k] for r in groups.values() if np.isfinite(r[k])]
        gaps[k] = float(max(vals) - min(vals)) if vals else float("nan")
    worst = {"accuracy": min(r["accuracy"] for r in groups.values())}
    if scores is not None:
        finite = [r["auroc"] for r in groups.values() if np.isfinite(r["auroc"])]
        worst["auroc"] = min(finite) if finite else float("nan")
    out = {"groups": groups, "gaps": gaps, "worst": worst}
    if positive is not None:
        out["equalized_odds_difference"] = float(fm.equalized_odds_difference(yt, yp, sensitive_features=s))
        out["demographic_parity_difference"] = float(fm.demographic_parity_difference(yt, yp, sensitive_features=s))
    return out


def shortcut_test(y_true, y_pred, sensitive, *, aligned: dict) -> dict:
    """Accuracy where a spurious attribute agrees with the label and where it does not.

    Parameters
    ----------
    y_true, y_pred, sensitive : array (N,)
    aligned : dict
        ``{label: attribute value}``: the value that usually comes with each label (in
        training data, where the shortcut was learnt).  An example is *aligned* when its
        attribute is its label's value, *conflicting* otherwise (the attribute "flipped").

    Returns
    -------
    dict
        ``aligned_accuracy``, ``conflicting_accuracy``, ``gap`` (aligned - conflicting; a
        model that relies on the attribute has a large positive gap), ``n_aligned``,
        ``n_conflicting``.
    """
    y, p, s = _arrays(y_true, y_pred, sensitive)
    want = np.array([str(aligned.get(label, aligned.get(str(label), "\0"))) for label in y.tolist()])
    is_aligned = s == want
    acc = lambda m: float(np.mean(y[m] == p[m])) if m.any() else float("nan")  # noqa: E731
    a, c = acc(is_aligned), acc(~is_aligned)
    return {"aligned_accuracy": a, "conflicting_accuracy": c, "gap": a - c,
            "n_aligned": int(is_aligned.sum()), "n_conflicting": int((~is_aligned).sum())}


def _auc(y, scores) -> float:
    """Binary AUROC of (N,) scores, or one-vs-rest macro AUROC of (N, K) probabilities."""
    from sklearn.metrics import roc_auc_score

    scores = np.asarray(scores)
    if scores.ndim == 1:
        return float(roc_auc_score(y, scores))
    return float(roc_auc_score(y, scores, multi_class="ovr", labels=np.arange(scores.shape[1])))


def bootstrap_auroc(y_true, scores, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95):
    """AUROC and its percentile bootstrap interval (resamples with one class are skipped).

    ``y_true`` (N,) binary or class indices, ``scores`` (N,) for binary or (N, K) class
    probabilities (one-vs-rest macro AUROC).  Returns ``(auroc, low, high)``.
    """
    y = np.asarray(y_true)
    sc = np.asarray(scores, dtype=np.float64)

    def auc(idx):
        yy = y[idx]
        if len(np.unique(yy)) < (2 if sc.ndim == 1 else sc.shape[1]):
            return None
        return _auc(yy, sc[idx])

    point = auc(np.arange(len(y)))
    if point is None:
        raise UsageError("AUROC needs every class among the test examples")
    rng = np.random.default_rng(seed)
    boot = [v for v in (auc(rng.integers(0, len(y), len(y))) for _ in range(n_boot)) if v is not None]
    lo, hi = np.percentile(boot, [100 * (1 - level) / 2, 100 * (1 + level) / 2]) if boot else (np.nan, np.nan)
    return float(point), float(lo), float(hi)


def attribute_probe(features, attribute, *, seed: int = 0, n_boot: int = 1000, shuffled: bool = True) -> dict:
    """How well a linear probe recovers an attribute from embeddings.

    Split 60/20/20 (train/val/test, stratified, seeded); logistic regression with ``C``
    chosen on validation by AUROC from ``[0.01, 0.1, 1, 10, 100]``, refit on train+val, test
    AUROC (one-vs-rest macro for more than two values) with a 95 % bootstrap interval.
    With ``shuffled``, the same protocol on permuted attribute values gives the chance
    level to compare with.

    Parameters
    ----------
    features : array (N, D)
    attribute : array (N,)

    Returns
    -------
    dict
        ``auroc``, ``auroc_low``, ``auroc_high``, ``C``, ``n_test``, ``values`` and, with
        ``shuffled``, ``shuffled_auroc``.

    Raises
    ------
    UsageError
        Fewer than two attribute values, or a value with fewer than 5 examples.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    x = np.asarray(features, dtype=np.float32)
    values, a = np.unique(np.asarray(attribute).astype(str), return_inverse=True)
    if len(values) < 2:
        raise UsageError(f"the attribute has one value ({values[0] if len(values) else 'none'}); "
                         "a probe needs at least two")
    counts = np.bincount(a)
    if counts.min() < 5:
        raise UsageError(f"attribute value {str(values[counts.argmin()])!r} has {counts.min()} examples; "
                         "a probe needs at least 5 of each")

    def run(labels, rs):
        idx = np.arange(len(labels))
        tv, te = train_test_split(idx, test_size=0.2, stratify=labels, random_state=rs)
        tr, va = train_test_split(tv, test_size=0.25, stratify=labels[tv], random_state=rs)

        def fit(c, rows):
            return LogisticRegression(C=c, max_iter=2000).fit(x[rows], labels[rows])

        def score(model, rows):
            pr = model.predict_proba(x[rows])
            return pr[:, 1] if pr.shape[1] == 2 else pr

        def val_auc(c):
            return _auc(labels[va], score(fit(c, tr), va))

        best = max([0.01, 0.1, 1.0, 10.0, 100.0], key=val_auc)
        model = fit(best, tv)
        return best, te, score(model, te)

    c, te, s = run(a, seed)
    auc, lo, hi = bootstrap_auroc(a[te], s, n_boot=n_boot, seed=seed)
    out = {"auroc": auc, "auroc_low": lo, "auroc_high": hi, "C": c, "n_test": int(len(te)),
           "values": values.tolist()}
    if shuffled:
        perm = np.random.default_rng(seed + 1).permutation(a)
        _, te2, s2 = run(perm, seed)
        out["shuffled_auroc"] = _auc(perm[te2], s2)
    return out
