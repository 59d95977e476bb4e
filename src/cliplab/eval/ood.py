"""Out-of-distribution detection scores and metrics for CLIP-style classifiers.

Scores are larger for in-distribution (ID) images.  ``cos`` are cosine similarities of
L2-normalised image and class-prompt features (N, C); ``logits = logit_scale * cos``.

- :func:`mcm_score`: maximum concept matching (Ming et al., NeurIPS 2022, arXiv 2211.13445,
  Eq. 4): ``max_c softmax_c(cos / tau)``, ``tau = 1``; reference ``deeplearning-wisc/MCM``
  ``utils/detection_util.py`` ``get_ood_scores_clip`` (``score='MCM'``).
- :func:`energy_score`: ``T * logsumexp(logits / T)`` (Liu et al., NeurIPS 2020,
  arXiv 2010.03759; the negative free energy).
- :func:`max_logit_score`: ``max_c logits`` (Hendrycks et al., ICML 2022, arXiv 1911.11132).
- :func:`msp_score`: maximum softmax probability (Hendrycks and Gimpel, ICLR 2017,
  arXiv 1610.02136), for any classifier's probabilities.

Metrics treat ID as the positive class: :func:`ood_auroc` and :func:`fpr_at_tpr` (FPR of
OOD images at the threshold that keeps 95 % of ID images), computed as the MCM reference's
``fpr_and_fdr_at_recall`` does (the distinct-score threshold whose ID recall is nearest to
0.95).
"""

from __future__ import annotations

import numpy as np

from ..errors import UsageError
from ..validation import check_number

__all__ = ["mcm_score", "energy_score", "max_logit_score", "msp_score", "ood_auroc", "fpr_at_tpr", "ood_metrics"]


def _rows(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] < 1:
        raise UsageError(f"{name} must be a 2-D array (N, C), got shape {a.shape}")
    return a


def _logsumexp(a: np.ndarray) -> np.ndarray:
    m = a.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=1, keepdims=True)))[:, 0]


def mcm_score(cos, temperature: float = 1.0) -> np.ndarray:
    """MCM: ``max_c softmax(cos / temperature)``; ``cos`` (N, C) cosines, returns (N,)."""
    c = _rows(cos, "cos") / check_number("temperature", temperature, minimum=0, strict_minimum=True)
    return np.exp(c.max(axis=1) - _logsumexp(c))


def energy_score(logits, temperature: float = 1.0) -> np.ndarray:
    """Negative free energy ``T * logsumexp(logits / T)``, (N,)."""
    t = check_number("temperature", temperature, minimum=0, strict_minimum=True)
    return t * _logsumexp(_rows(logits, "logits") / t)


def max_logit_score(logits) -> np.ndarray:
    """``max_c logits``, (N,)."""
    return _rows(logits, "logits").max(axis=1)


def msp_score(probs) -> np.ndarray:
    """``max_c probs``, (N,)."""
    return _rows(probs, "probs").max(axis=1)


def _pair(id_scores, ood_scores):
    i = np.asarray(id_scores, dtype=np.float64).ravel()
    o = np.asarray(ood_scores, dtype=np.float64).ravel()
    if not len(i) or not len(o):
        raise UsageError(f"OOD metrics need ID and OOD scores; got {len(i)} ID and {len(o)} OOD")
    if not (np.isfinite(i).all() and np.isfinite(o).all()):
        raise UsageError("OOD scores must be finite")
    return i, o


def ood_auroc(id_scores, ood_scores) -> float:
    """Area under the ROC curve with ID as positives (0.5: no separation, 1: perfect)."""
    from sklearn.metrics import roc_auc_score

    i, o = _pair(id_scores, ood_scores)
    y = np.r_[np.ones(len(i)), np.zeros(len(o))]
    return float(roc_auc_score(y, np.r_[i, o]))


def fpr_at_tpr(id_scores, ood_scores, tpr: float = 0.95) -> float:
    """False-positive rate on OOD at the threshold whose ID recall (TPR) is nearest ``tpr``.

    Thresholds are the distinct scores down to the highest one that accepts every ID
    image; a threshold ``s`` accepts every score ``>= s``.  Of their recalls, the one
    nearest ``tpr`` is taken, ties to the lower threshold, as the MCM reference does.
    """
    tpr = check_number("tpr", tpr, minimum=0, maximum=1)
    i, o = _pair(id_scores, ood_scores)
    scores = np.r_[i, o]
    is_id = np.r_[np.ones(len(i), bool), np.zeros(len(o), bool)]
    order = np.argsort(scores, kind="mergesort")[::-1]
    scores, is_id = scores[order], is_id[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]   # last index of each distinct score
    tps = np.cumsum(is_id, dtype=np.float64)[last]
    fps = last + 1 - tps
    stop = int(np.searchsorted(tps, tps[-1]))                          # first threshold reaching all ID
    recall, fps = tps[:stop + 1] / tps[-1], fps[:stop + 1]
    # scanned from the lowest threshold up (then an empty acceptance: recall 1, no false positive, as the
    # reference appends); the first nearest recall wins, so ties go to the lower threshold
    rev_recall, rev_fps = np.r_[recall[::-1], 1.0], np.r_[fps[::-1], 0.0]
    k = int(np.argmin(np.abs(rev_recall - tpr)))
    return float(rev_fps[k] / len(o))


def ood_metrics(id_scores, ood_scores, tpr: float = 0.95) -> dict:
    """``{"auroc": ..., "fpr95": ...}`` (the key names ``tpr`` in percent)."""
    return {"auroc": ood_auroc(id_scores, ood_scores),
            f"fpr{int(round(100 * tpr))}": fpr_at_tpr(id_scores, ood_scores, tpr)}
