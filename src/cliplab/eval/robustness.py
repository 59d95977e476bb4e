"""Robustness to distribution shift: corruption error, relative and effective robustness.

Sources
-------
- Corruption error (Hendrycks and Dietterich, ICLR 2019, arXiv 1903.12261, §3): for a
  corruption ``c`` with severities ``s = 1..5``, ``CE_c = sum_s E_{s,c} / sum_s E^base_{s,c}``
  (E = top-1 error; ``base`` a stated baseline model), ``mCE = mean_c CE_c``; relative
  ``CE_c = sum_s (E_{s,c} - E_clean) / sum_s (E^base_{s,c} - E^base_clean)``.
- Effective robustness (Taori et al., NeurIPS 2020, arXiv 2007.00644, §3): fit a line to
  ``(logit(acc_ID), logit(acc_shift))`` over a set of reference models; a model's effective
  robustness is its shifted accuracy minus the line's prediction at its ID accuracy.
"""

from __future__ import annotations

import re

import numpy as np

from ..errors import UsageError

__all__ = ["corruption_errors", "effective_robustness", "split_severity"]

_SEVERITY = re.compile(r"^(?P<name>.+)-(?P<severity>[1-9])$")


def split_severity(name: str) -> tuple[str, int | None]:
    """``"noise-3"`` -> ``("noise", 3)``; a name without a ``-<digit>`` suffix -> ``(name, None)``."""
    m = _SEVERITY.match(name)
    return (m["name"], int(m["severity"])) if m else (name, None)


def corruption_errors(errors: dict, clean_error: float, baseline: dict | None = None,
                      baseline_clean_error: float | None = None) -> dict:
    """Corruption errors of one model, by corruption.

    Parameters
    ----------
    errors : dict of str -> float
        Top-1 error per corrupted set, keyed ``"<corruption>-<severity>"``.
    clean_error : float
        Top-1 error on the clean (ID) set.
    baseline, baseline_clean_error : optional
        The same for the baseline model; without them only mean errors are returned.

    Returns
    -------
    dict
        ``mean_error`` per corruption, and with a baseline ``ce`` and ``relative_ce`` per
        corruption plus ``mce`` and ``relative_mce``.

    Raises
    ------
    UsageError
        The baseline lacks a corrupted set the model has, or a baseline sum is zero.
    """
    by_c: dict[str, list[str]] = {}
    for key in errors:
        name, severity = split_severity(key)
        if severity is not None:
            by_c.setdefault(name, []).append(key)
    out: dict = {"mean_error": {c: float(np.mean([errors[k] for k in ks])) for c, ks in by_c.items()}}
    if baseline is None:
        return out
    if baseline_clean_error is None:
        raise UsageError("relative corruption error needs the baseline's clean error")
    ce, rce = {}, {}
    for c, ks in by_c.items():
        missing = [k for k in ks if k not in baseline]
        if missing:
            raise UsageError(f"the baseline has no result for {missing[0]}")
        den = sum(baseline[k] for k in ks)
        rden = sum(baseline[k] - baseline_clean_error for k in ks)
        if den <= 0:
            raise UsageError(f"the baseline makes no error on {c}; CE is undefined")
        ce[c] = sum(errors[k] for k in ks) / den
        rce[c] = sum(errors[k] - clean_error for k in ks) / rden if rden > 0 else float("nan")
    finite = [v for v in rce.values() if np.isfinite(v)]
    out.update({"ce": ce, "relative_ce": rce, "mce": float(np.mean(list(ce.values()))),
                "relative_mce": float(np.mean(finite)) if finite else float("nan")})
    return out


def _logit(p):
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def effective_robustness(reference_id, reference_shift, id_acc, shift_acc) -> dict:
    """Effective robustness of a model against the line fit to reference models.

    Parameters
    ----------
    reference_id, reference_shift : sequence of float
        ID and shifted accuracy (0-1) of at least two reference models.
    id_acc, shift_acc : float
        The model's own.

    Returns
    -------
    dict
        ``slope``, ``intercept`` (of the logit-space line), ``predicted`` (shifted accuracy
        the line expects) and ``effective_robustness`` (``shift_acc - predicted``).
    """
    x, y = _logit(reference_id), _logit(reference_shift)
    if len(x) < 2 or len(x) != len(y) or np.ptp(x) == 0:
        raise UsageError("effective robustness needs at least two reference models with different ID accuracy")
    slope, intercept = np.polyfit(x, y, 1)
    predicted = float(1 / (1 + np.exp(-(slope * _logit(id_acc) + intercept))))
    return {"slope": float(slope), "intercept": float(intercept), "predicted": predicted,
            "effective_robustness": float(shift_acc) - predicted}
