"""Anomaly detection metrics: image AUROC / AP / F1-max, pixel AUROC, AUPRO.

Definitions, per category (average the categories afterwards, as the papers do):

- ``image_auroc`` / ``image_ap``: scikit-learn's ``roc_auc_score`` and
  ``average_precision_score`` of one score per image against "has a defect";
- ``pixel_auroc``: ``roc_auc_score`` over every pixel of every test image (normal ones too);
- ``f1_max``: the best F1 over all thresholds (WinCLIP's "F1-max");
- ``aupro``: area under the per-region-overlap curve up to a false positive rate of 0.3,
  divided by 0.3.  PRO(t) is the mean, over all connected ground-truth regions (8-connected)
  of all images, of the fraction of the region's pixels scored above t; FPR(t) is the fraction
  of normal pixels above t.  Two published ways of computing it:

  ``protocol="mvtec"`` (default): the MVTec AD evaluation code (Bergmann et al., IJCV 2021,
  ``generic_util.py`` ``compute_pro`` + ``trapezoid``): every distinct score is a threshold,
  the curve is cut at FPR 0.3 with a linearly interpolated end point, the area is divided by
  0.3.

  ``protocol="anomalyclip"``: AnomalyCLIP's ``metrics.py::cal_pro_score`` (from cflow-ad),
  which WinCLIP re-implementations and AnomalyCLIP's tables use: 200 equidistant thresholds
  ``np.arange(min, max, (max - min) / 200)``, points with FPR < 0.3 kept, their FPRs min-max
  rescaled to [0, 1], trapezoidal area.  Its numbers are not those of the MVTec protocol
  (the rescaling stretches whatever FPR range the thresholds reached).

Both agree with their reference code on random maps (see ``tests/eval/test_anomaly_metrics.py``
and docs/anomaly_detection.md for the comparison).
"""

from __future__ import annotations

import numpy as np

from ..errors import UsageError
from ..validation import check_choice, check_number, check_positive_int

__all__ = ["image_auroc", "image_ap", "pixel_auroc", "f1_max", "pro_curve", "aupro", "anomaly_metrics"]


def _binary(labels, name: str) -> np.ndarray:
    y = np.asarray(labels)
    if y.size and not np.isin(np.unique(y), (0, 1, False, True)).all():
        raise UsageError(f"{name} must be binary (0 = normal, 1 = anomalous)")
    return y.astype(bool)


def _pair(labels, scores, name: str) -> tuple[np.ndarray, np.ndarray]:
    y, s = _binary(labels, name), np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape:
        raise UsageError(f"{name} {y.shape} and scores {s.shape} differ in shape")
    if not np.isfinite(s).all():
        raise UsageError("anomaly scores must be finite")
    if y.all() or not y.any():
        raise UsageError(f"{name} need both normal and anomalous examples")
    return y.ravel(), s.ravel()


def image_auroc(labels, scores) -> float:
    """Image-level AUROC: ``labels`` (N,) 1 = defective, ``scores`` (N,) higher = more anomalous."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(*_pair(labels, scores, "labels")))


def image_ap(labels, scores) -> float:
    """Image-level average precision (scikit-learn's step-wise AP)."""
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(*_pair(labels, scores, "labels")))


def pixel_auroc(masks, maps) -> float:
    """Pixel-level AUROC over all pixels: ``masks`` (N, H, W) binary, ``maps`` (N, H, W) scores."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(*_pair(masks, maps, "masks")))


def f1_max(labels, scores) -> float:
    """Best F1 over thresholds (WinCLIP's F1-max), image- or pixel-level (inputs are flattened)."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, _ = precision_recall_curve(*_pair(labels, scores, "labels"))
    f1 = 2 * precision * recall / np.maximum(precision + recall, np.finfo(float).tiny)
    return float(f1.max())


def _components(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Global ids of the 8-connected regions of (N, H, W) masks: (N, H, W) int, 0 = normal; count."""
    from scipy.ndimage import label

    ids = np.zeros(masks.shape, dtype=np.int64)
    total = 0
    for i, mask in enumerate(masks):
        lab, n = label(mask, structure=np.ones((3, 3), dtype=int))
        ids[i] = np.where(lab > 0, lab + total, 0)
        total += n
    return ids, total


def _maps(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    m, a = _binary(masks, "masks"), np.asarray(maps, dtype=np.float64)
    if m.ndim != 3 or m.shape != a.shape:
        raise UsageError(f"masks and maps must both be (N, H, W); got {m.shape} and {a.shape}")
    if not np.isfinite(a).all():
        raise UsageError("anomaly maps must be finite")
    if not m.any() or m.all():
        raise UsageError("AUPRO needs at least one defect region and some normal pixels")
    return m, a


def pro_curve(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    """The PRO curve at every distinct score (MVTec AD protocol).

    Parameters
    ----------
    masks : array (N, H, W) of {0, 1}
    maps : array (N, H, W) of float

    Returns
    -------
    fpr, pro : ndarray (P,)
        Increasing FPR and the matching mean region overlap, from (0, 0) to (1, 1); all
        pixels sharing one score enter the curve together.
    """
    m, a = _maps(masks, maps)
    ids, n_regions = _components(m)
    sizes = np.bincount(ids.ravel(), minlength=n_regions + 1).astype(np.float64)
    order = np.argsort(-a.ravel(), kind="stable")                       # descending scores
    s, comp = a.ravel()[order], ids.ravel()[order]
    fp = np.cumsum(comp == 0) / sizes[0]                                # FPR after each pixel
    pro_step = np.where(comp > 0, 1.0 / sizes[comp], 0.0)               # each region pixel adds 1/|R|
    pro = np.cumsum(pro_step) / n_regions
    last = np.append(s[1:] != s[:-1], True)                            # one point per distinct score
    fpr, pro = np.minimum(fp[last], 1.0), np.minimum(pro[last], 1.0)
    return np.r_[0.0, fpr, 1.0], np.r_[0.0, pro, 1.0]


def _area_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under (x, y), x sorted, from x[0] to ``x_max`` (y interpolated there)."""
    inside = x <= x_max
    area = float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x) * inside[1:]))
    if x_max not in x:
        j = int(np.searchsorted(x, x_max, side="right"))               # first x > x_max
        y_end = y[j - 1] + (y[j] - y[j - 1]) * (x_max - x[j - 1]) / (x[j] - x[j - 1])
        area += 0.5 * (y_end + y[j - 1]) * (x_max - x[j - 1])
    return area


def aupro(masks, maps, *, fpr_limit: float = 0.3, protocol: str = "mvtec", n_thresholds: int = 200) -> float:
    """Area under the PRO curve up to ``fpr_limit``, normalised to [0, 1].

    Parameters
    ----------
    masks : array (N, H, W) of {0, 1}
        Ground truth of every test image of a category (normal images are all zero).
    maps : array (N, H, W) of float
        Anomaly maps, higher = more anomalous.
    fpr_limit : float, default=0.3
        Integration limit on the false positive rate.
    protocol : {"mvtec", "anomalyclip"}, default="mvtec"
        Which reference computation (module docstring).
    n_thresholds : int, default=200
        Thresholds of the ``"anomalyclip"`` protocol (its ``max_step``).

    Returns
    -------
    float
        1.0 for a map that scores every defect pixel above every normal pixel.

    Raises
    ------
    UsageError
        Shapes differ, masks are not binary, there is no defect or no normal pixel, or (for
        ``"anomalyclip"``) all scores are equal.

    References
    ----------
    P. Bergmann et al., "The MVTec Anomaly Detection Dataset: A Comprehensive Real-World
    Dataset for Unsupervised Anomaly Detection", IJCV 2021 (PRO, section 4.3).
    Q. Zhou et al., "AnomalyCLIP: Object-agnostic Prompt Learning for Zero-shot Anomaly
    Detection", ICLR 2024, arXiv:2310.18961 (``metrics.py``).
    """
    check_choice("protocol", protocol, ("mvtec", "anomalyclip"))
    limit = check_number("fpr_limit", fpr_limit, minimum=0, maximum=1, strict_minimum=True)
    if protocol == "mvtec":
        fpr, pro = pro_curve(masks, maps)
        return float(_area_to(fpr, pro, limit) / limit)
    steps = check_positive_int("n_thresholds", n_thresholds)
    m, a = _maps(masks, maps)
    raw = np.asarray(maps)
    if raw.dtype in (np.float32, np.float16):   # thresholds in the maps' precision, as the reference
        a = a.astype(raw.dtype)
    lo, hi = a.min(), a.max()
    if hi == lo:
        raise UsageError("AUPRO (anomalyclip protocol) needs anomaly maps that are not constant")
    thresholds = np.arange(lo, hi, (hi - lo) / steps)                  # as the reference: (T,)
    ids, n_regions = _components(m)
    flat_ids, flat = ids.ravel(), a.ravel()
    ok = np.sort(flat[flat_ids == 0])
    fpr = (len(ok) - np.searchsorted(ok, thresholds, side="right")) / len(ok)   # pixels > t
    by_region = np.argsort(flat_ids, kind="stable")
    starts = np.searchsorted(flat_ids[by_region], np.arange(1, n_regions + 2))
    overlap = np.zeros((n_regions, len(thresholds)))
    for r in range(n_regions):
        scores = np.sort(flat[by_region[starts[r]:starts[r + 1]]])
        overlap[r] = (len(scores) - np.searchsorted(scores, thresholds, side="right")) / len(scores)
    pro = overlap.mean(axis=0)
    keep = fpr < limit
    x = fpr[keep]
    x = (x - x.min()) / (x.max() - x.min())                             # the reference's rescaling
    return float(np.trapezoid(pro[keep][::-1], x[::-1]))              # x falls as t rises: reverse it


def anomaly_metrics(image_labels, image_scores, masks=None, maps=None, *, fpr_limit: float = 0.3) -> dict:
    """The standard table row of one category: image AUROC / AP / F1-max, pixel AUROC / AUPRO / F1-max.

    Pixel metrics are included when ``masks`` and ``maps`` (N, H, W) are given.  Values are
    fractions in [0, 1]; AUPRO uses the MVTec protocol.
    """
    out = {"image_auroc": image_auroc(image_labels, image_scores),
           "image_ap": image_ap(image_labels, image_scores),
           "image_f1_max": f1_max(image_labels, image_scores)}
    if masks is not None and maps is not None:
        out.update(pixel_auroc=pixel_auroc(masks, maps), pixel_aupro=aupro(masks, maps, fpr_limit=fpr_limit),
                   pixel_f1_max=f1_max(masks, maps))
    return out
