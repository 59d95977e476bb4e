"""Calibration of classifier probabilities: ECE, adaptive ECE, Brier, NLL, reliability, temperature scaling.

Every function takes class probabilities ``probs`` (N, C) (rows summing to 1) or logits
where stated, and integer labels (N,).  They apply to any classifier: zero-shot CLIP
(``softmax(logit_scale * cos)``), an adapter's ``predict_proba``, a fine-tuned learner.

>>> import numpy as np
>>> from cliplab.eval.calibration import expected_calibration_error, TemperatureScaling
>>> logits = np.array([[4.0, 0.0], [3.0, 0.0], [0.0, 2.0], [3.5, 0.0]])
>>> labels = np.array([0, 1, 1, 0])
>>> ts = TemperatureScaling().fit(logits, labels)   # on validation logits only
>>> round(expected_calibration_error(ts.predict_proba(logits), labels), 3) <= round(
...     expected_calibration_error(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), labels), 3)
True

Sources
-------
- ECE: Naeini, Cooper and Hauskrecht, AAAI 2015; as computed by Guo et al. (ICML 2017,
  arXiv 1706.04599), reference ``gpleiss/temperature_scaling`` ``_ECELoss``: 15 equal-width
  bins of the top-1 confidence, bin ``b`` holds ``lower < conf <= upper``,
  ``ECE = sum_b |B_b|/n * |acc(B_b) - conf(B_b)|``.
- Adaptive ECE: equal-mass bins (Nixon et al., CVPRW 2019, arXiv 1904.01685), here on the
  top-1 confidence with bins of equal count.  (Mukhoti et al.'s ``AdaptiveECELoss`` cuts
  at interpolated confidence values instead and, with its ``lower < conf`` rule, leaves
  the lowest confidence out; the equal-count cut has neither quirk.)
- Brier score: Brier 1950, multi-class form ``mean_i sum_c (p_ic - y_ic)^2``.
- Temperature scaling: Guo et al. 2017 §4.2: one ``T > 0`` minimising validation NLL of
  ``softmax(z / T)``.  The reference runs L-BFGS from ``T = 1.5``; this finds the same
  minimum with a bounded scalar search over ``log T`` (the NLL is smooth in ``log T``),
  so the result does not depend on a start value or step size.
"""

from __future__ import annotations

import numpy as np

from ..errors import UsageError
from ..validation import check_positive_int

__all__ = ["expected_calibration_error", "adaptive_calibration_error", "brier_score", "negative_log_likelihood",
           "reliability_bins", "softmax", "TemperatureScaling", "calibration_metrics"]


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    """Row softmax of ``logits / temperature`` (N, C) in float64."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _check(probs, labels):
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    if p.ndim != 2 or y.ndim != 1 or len(p) != len(y):
        raise UsageError(f"give probabilities (N, C) and labels (N,); got {p.shape} and {y.shape}")
    if not len(y):
        raise UsageError("no examples to measure calibration on")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= p.shape[1]:
        raise UsageError(f"labels must be integers in [0, {p.shape[1]}), got {y.dtype} in "
                         f"[{y.min()}, {y.max()}]")
    return p, y.astype(np.int64)


def _gap(conf, correct, bin_ids, n_bins) -> float:
    n = len(conf)
    conf_sum = np.bincount(bin_ids, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(bin_ids, weights=correct, minlength=n_bins)
    return float(np.abs(conf_sum - acc_sum).sum() / n)        # sum_b |B_b|/n * |mean conf - mean acc|


def _equal_width_bins(conf, n_bins: int) -> np.ndarray:
    # bin b holds lower_b < conf <= upper_b (the reference's rule); conf 0 joins bin 0
    return np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)


def expected_calibration_error(probs, labels, n_bins: int = 15) -> float:
    """Expected calibration error of the top-1 prediction, equal-width bins.

    Parameters
    ----------
    probs : array (N, C)
        Class probabilities.
    labels : array of int (N,)
    n_bins : int, default 15
        The number of bins commonly reported.

    Returns
    -------
    float in [0, 1]

    Raises
    ------
    UsageError
        Mismatched shapes, no examples, labels out of range.
    """
    p, y = _check(probs, labels)
    n_bins = check_positive_int("n_bins", n_bins)
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    return _gap(conf, (pred == y).astype(np.float64), _equal_width_bins(conf, n_bins), n_bins)


def adaptive_calibration_error(probs, labels, n_bins: int = 15) -> float:
    """ECE with equal-mass bins: each bin holds ``N / n_bins`` predictions (sizes differ by at most 1).

    Predictions are sorted by top-1 confidence (stable sort) and cut into ``n_bins``
    consecutive groups (``numpy.array_split``); the score is then ECE's weighted gap.
    Same inputs and errors as :func:`expected_calibration_error`.
    """
    p, y = _check(probs, labels)
    n_bins = check_positive_int("n_bins", n_bins)
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    bins = np.empty(len(conf), dtype=np.int64)
    for b, idx in enumerate(np.array_split(np.argsort(conf, kind="stable"), n_bins)):
        bins[idx] = b
    return _gap(conf, (pred == y).astype(np.float64), bins, n_bins)


def brier_score(probs, labels) -> float:
    """Multi-class Brier score ``mean_i sum_c (p_ic - [y_i = c])^2``, in [0, 2]."""
    p, y = _check(probs, labels)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    return float(((p - onehot) ** 2).sum(axis=1).mean())


def negative_log_likelihood(probs, labels, eps: float = 1e-12) -> float:
    """Mean ``-log p_{i, y_i}`` (natural log), probabilities clipped at ``eps``."""
    p, y = _check(probs, labels)
    return float(-np.log(np.clip(p[np.arange(len(y)), y], eps, 1.0)).mean())


def reliability_bins(probs, labels, n_bins: int = 15) -> dict:
    """The reliability diagram's data: per equal-width bin, mean confidence, accuracy and count.

    Returns
    -------
    dict
        ``edges`` (n_bins + 1,), ``confidence``, ``accuracy`` (NaN for empty bins) and
        ``count`` (n_bins,) as lists, plus ``ece``.
    """
    p, y = _check(probs, labels)
    n_bins = check_positive_int("n_bins", n_bins)
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    bins = _equal_width_bins(conf, n_bins)
    counts = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(bins, weights=conf, minlength=n_bins) / counts
        acc = np.bincount(bins, weights=(pred == y).astype(np.float64), minlength=n_bins) / counts
    return {"edges": np.linspace(0, 1, n_bins + 1).tolist(), "confidence": mean_conf.tolist(),
            "accuracy": acc.tolist(), "count": counts.tolist(),
            "ece": _gap(conf, (pred == y).astype(np.float64), bins, n_bins)}


def calibration_metrics(probs, labels, n_bins: int = 15) -> dict:
    """``acc1``, ``ece``, ``adaptive_ece``, ``brier``, ``nll`` of one set of probabilities."""
    p, y = _check(probs, labels)
    return {"acc1": float((p.argmax(axis=1) == y).mean()),
            "ece": expected_calibration_error(p, y, n_bins), "adaptive_ece": adaptive_calibration_error(p, y, n_bins),
            "brier": brier_score(p, y), "nll": negative_log_likelihood(p, y)}


class TemperatureScaling:
    """Post-hoc temperature scaling: ``softmax(logits / T)`` with ``T`` fitted by validation NLL.

    Parameters
    ----------
    bounds : (float, float), default (0.01, 100.0)
        Search range of ``T``.

    Attributes
    ----------
    temperature_ : float
        The fitted ``T``; above 1 softens over-confident logits.
    nll_before_, nll_after_ : float
        Validation NLL at ``T = 1`` and at ``temperature_``.

    Examples
    --------
    See the module docstring.  Fit on validation logits only, then apply to test logits.
    """

    def __init__(self, bounds: tuple[float, float] = (0.01, 100.0)):
        self.bounds = bounds

    def fit(self, logits, labels) -> "TemperatureScaling":
        """Fit ``T`` on validation ``logits`` (N, C) and ``labels`` (N,)."""
        from scipy.optimize import minimize_scalar

        z = np.asarray(logits, dtype=np.float64)
        _, y = _check(z, labels)
        lo, hi = self.bounds
        if not 0 < lo < hi:
            raise UsageError(f"bounds must satisfy 0 < low < high, got {self.bounds}")
        zs = z - z.max(axis=1, keepdims=True)
        rows = np.arange(len(y))

        def nll(log_t: float) -> float:
            s = zs / np.exp(log_t)
            s = s - s.max(axis=1, keepdims=True)
            return float((np.log(np.exp(s).sum(axis=1)) - s[rows, y]).mean())

        res = minimize_scalar(nll, bounds=(np.log(lo), np.log(hi)), method="bounded",
                              options={"xatol": 1e-6})
        self.temperature_ = float(np.exp(res.x))
        self.nll_before_, self.nll_after_ = nll(0.0), float(res.fun)
        return self

    def predict_proba(self, logits) -> np.ndarray:
        """Calibrated probabilities (N, C)."""
        if not hasattr(self, "temperature_"):
            raise UsageError("TemperatureScaling is not fitted; call fit(val_logits, val_labels) first")
        return softmax(logits, self.temperature_)
