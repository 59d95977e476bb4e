"""Evaluation metrics as pure NumPy functions.

Definitions follow CLIP_benchmark (LAION-AI/CLIP_benchmark, ``clip_benchmark/metrics``),
so numbers computed here can be compared with its results files:

- ``acc1`` / ``acc5``: top-k accuracy of the class logits;
- ``mean_per_class_recall``: the mean over classes present in the labels of the recall
  of that class (scikit-learn's ``balanced_accuracy_score``);
- ``image_retrieval_recall@k``: text -> image; a caption is a hit when its image is among
  the k images most similar to it;
- ``text_retrieval_recall@k``: image -> text; an image is a hit when at least one of its
  captions is among the k captions most similar to it (the CLIP paper convention).

Ties are broken by index (a stable sort), so results are deterministic.

Segmentation (:func:`segmentation_areas`, :func:`mean_iou`) follows mmsegmentation's
``IoUMetric`` (``mmseg/evaluation/metrics/iou_metric.py``, ``intersect_and_union`` and
``total_area_to_metrics``), which every training-free CLIP segmentation repository uses:

- pixels labelled ``ignore_index`` (255) are left out;
- per class, intersection and union are summed over the whole set, not averaged per image;
- ``IoU_c = sum I_c / sum U_c``; ``mIoU`` is the mean over classes with a non-zero union
  (a class absent from both predictions and labels is NaN and excluded);
- ``aAcc`` = correctly labelled pixels / labelled pixels; ``mAcc`` = mean per-class recall.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from ..errors import UsageError
from ..validation import check_positive_int

__all__ = ["segmentation_areas", "mean_iou", "topk_accuracy", "mean_per_class_recall", "confusion_matrix",
           "retrieval_recall", "rank_correlation", "kendall_tau", "spearman", "ndcg_at_k",
           "accuracy", "group_accuracies", "worst_group_accuracy", "pair_accuracy"]


def _labels(labels, n: int | None = None, name: str = "labels") -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or (y.size and not np.issubdtype(y.dtype, np.integer)):
        raise UsageError(f"{name} must be a 1-d integer array, got {y.dtype} {y.shape}")
    if n is not None and len(y) != n:
        raise UsageError(f"{name} has {len(y)} entries but there are {n} predictions")
    return y.astype(np.int64)


def accuracy(pred, labels) -> float:
    """Fraction of predictions equal to the labels (any comparable dtype)."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    if pred.shape != labels.shape:
        raise UsageError(f"pred {pred.shape} and labels {labels.shape} differ in shape")
    return float((pred == labels).mean()) if len(labels) else float("nan")


def topk_accuracy(logits, labels, k: int = 1) -> float:
    """Top-k accuracy.

    acc@k = 1/N sum_i [ y_i in topk_c(z_ic) ]

    Parameters
    ----------
    logits : array (N, C)
    labels : int array (N,)
    k : int, default=1
        Capped at C (with 3 classes, acc@5 is 1).
    """
    z = np.asarray(logits)
    if z.ndim != 2:
        raise UsageError(f"logits must be (N, C), got shape {z.shape}")
    y = _labels(labels, len(z))
    k = check_positive_int("k", k)
    if not len(y):
        return float("nan")
    k = min(k, z.shape[1])
    top = np.argsort(-z, axis=1, kind="stable")[:, :k]                 # (N, k)
    return float((top == y[:, None]).any(axis=1).mean())


def confusion_matrix(pred, labels, n_classes: int) -> np.ndarray:
    """Counts M[i, j] = #{n : y_n = i and pred_n = j}; rows are true classes. int64 (C, C)."""
    p = _labels(pred, name="pred")
    y = _labels(labels, len(p))
    if len(y) and (min(y.min(), p.min()) < 0 or max(y.max(), p.max()) >= n_classes):
        raise UsageError(f"labels and predictions must lie in [0, {n_classes})")
    m = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(m, (y, p), 1)
    return m


def mean_per_class_recall(pred, labels, n_classes: int) -> float:
    """Balanced accuracy: the mean recall over the classes that occur in ``labels``.

    recall_c = M[c, c] / sum_j M[c, j];  mpcr = mean_{c : sum_j M[c, j] > 0} recall_c

    Classes without test examples are left out of the mean (as in scikit-learn's
    ``balanced_accuracy_score``, which CLIP_benchmark uses).
    """
    m = confusion_matrix(pred, labels, n_classes)
    support = m.sum(axis=1)                                               # (C,)
    present = support > 0
    if not present.any():
        return float("nan")
    return float((np.diag(m)[present] / support[present]).mean())


def group_accuracies(pred, labels, groups) -> dict:
    """Accuracy within each group: ``{group: acc}`` over the groups that occur.

    ``groups`` is (N,) group ids, or (N, k) attribute columns (a group is one row's
    tuple, e.g. (shape, background)).
    """
    pred, labels = np.asarray(pred), np.asarray(labels)
    g = np.asarray(groups)
    if pred.shape != labels.shape or len(g) != len(labels):
        raise UsageError(f"pred {pred.shape}, labels {labels.shape} and groups {g.shape} must have "
                         "one entry per example")
    keys = [tuple(r.tolist()) for r in g] if g.ndim == 2 else g.tolist()
    hit = pred == labels
    out: dict = {}
    for key, h in zip(keys, hit):
        n, k = out.get(key, (0, 0))
        out[key] = (n + 1, k + int(h))
    return {key: k / n for key, (n, k) in out.items()}


def worst_group_accuracy(pred, labels, groups) -> float:
    """The lowest accuracy over the groups that occur (Sagawa et al., ICLR 2020, arXiv:1911.08731).

    wga = min_g  1/|G_g| sum_{i in G_g} [pred_i = y_i]
    """
    acc = group_accuracies(pred, labels, groups)
    return float(min(acc.values())) if acc else float("nan")


def _hits_at(scores: np.ndarray, positive: np.ndarray, ks: Sequence[int], chunk: int = 1024) -> dict:
    """For each query row: is any positive among the top k columns?  -> {k: bool (Q,)}."""
    kmax = min(max(ks), scores.shape[1])
    out = {k: np.zeros(len(scores), dtype=bool) for k in ks}
    for s in range(0, len(scores), chunk):
        top = np.argsort(-scores[s:s + chunk], axis=1, kind="stable")[:, :kmax]     # (q, kmax)
        pos = np.take_along_axis(positive[s:s + chunk], top, axis=1)                # (q, kmax)
        first = np.where(pos.any(axis=1), pos.argmax(axis=1), kmax)                  # rank of 1st hit
        for k in ks:
            out[k][s:s + chunk] = first < k
    return out


def retrieval_recall(image_feats, text_feats, text_to_image, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Image-text retrieval recall@k with several captions per image.

    S = F_img F_txtᵀ  (I, T); positive P[i, t] = [text_to_image[t] = i]

    - ``image_retrieval_recall@k`` (text -> image) = 1/T sum_t [ text_to_image[t] in topk_i S[:, t] ]
    - ``text_retrieval_recall@k`` (image -> text)  = 1/I sum_i [ exists t: P[i, t] and t in topk_t S[i, :] ]

    Parameters
    ----------
    image_feats : float array (I, D)
    text_feats : float array (T, D)
    text_to_image : int array (T,)
        The image each caption describes.
    ks : sequence of int, default=(1, 5, 10)

    Returns
    -------
    dict
        ``{"image_retrieval_recall@k": float, "text_retrieval_recall@k": float}`` per k.
    """
    fi, ft = np.asarray(image_feats, np.float32), np.asarray(text_feats, np.float32)
    if fi.ndim != 2 or ft.ndim != 2 or fi.shape[1] != ft.shape[1]:
        raise UsageError(f"image features {fi.shape} and text features {ft.shape} must be (N, D) "
                         "with the same D")
    t2i = _labels(text_to_image, len(ft), name="text_to_image")
    if len(t2i) and (t2i.min() < 0 or t2i.max() >= len(fi)):
        raise UsageError(f"text_to_image must index the {len(fi)} images")
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise UsageError(f"ks must be positive integers, got {ks}")
    scores = fi @ ft.T                                                    # (I, T)
    positive = np.zeros(scores.shape, dtype=bool)
    positive[t2i, np.arange(len(t2i))] = True                             # (I, T)
    t2i_hits = _hits_at(scores.T, positive.T, ks)                         # text -> image
    i2t_hits = _hits_at(scores, positive, ks)                             # image -> text
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = float(t2i_hits[k].mean()) if len(ft) else float("nan")
        out[f"text_retrieval_recall@{k}"] = float(i2t_hits[k].mean()) if len(fi) else float("nan")
    return out


def _paired(x, y, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Two finite float sequences of the same length >= 2, or a UsageError naming ``name``."""
    x = np.asarray(list(x) if not isinstance(x, np.ndarray) else x, dtype=float).reshape(-1)
    y = np.asarray(list(y) if not isinstance(y, np.ndarray) else y, dtype=float).reshape(-1)
    if x.shape != y.shape or x.size < 2:
        raise UsageError(f"{name} needs two sequences of the same length >= 2, got {x.size} and {y.size}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise UsageError(f"{name} needs finite values (no NaN or inf)")
    return x, y


def rank_correlation(x: Iterable[float], y: Iterable[float]) -> float:
    """Kendall's τ_b between two sequences (e.g. layer sharpness vs OOD accuracy over α).

    Computed by :func:`scipy.stats.kendalltau` (SciPy comes with scikit-learn).  NaN
    when either sequence is constant.  :func:`kendall_tau` is the same function.

    Parameters
    ----------
    x, y : array-like of float, shape (n,)
        n ≥ 2, finite.

    Returns
    -------
    float
        τ_b in [−1, 1].
    """
    x, y = _paired(x, y, "rank_correlation")
    from scipy.stats import kendalltau

    return float(kendalltau(x, y).statistic)


kendall_tau = rank_correlation


def spearman(x: Iterable[float], y: Iterable[float]) -> float:
    """Spearman's ρ (Pearson correlation of the ranks, ties averaged): :func:`scipy.stats.spearmanr`.

    Parameters
    ----------
    x, y : array-like of float, shape (n,)
        n ≥ 2, finite.  NaN when either is constant.

    Returns
    -------
    float
        ρ in [−1, 1].
    """
    x, y = _paired(x, y, "spearman")
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def ndcg_at_k(relevance: Iterable[float], scores: Iterable[float], k: int | None = None) -> float:
    """NDCG@k of one ranking: order items by ``scores``, gain = ``relevance`` (non-negative).

    ``DCG@k = Σ_{r ≤ k} rel_(r) / log2(r + 1)`` over the k best-scored items, divided by the
    DCG of the ideal order; :func:`sklearn.metrics.ndcg_score` (ties in ``scores``
    averaged).  E.g. relevance = object counts, scores = a model's "how many objects" scores.

    Parameters
    ----------
    relevance : array-like of float, shape (n,)
        True gains, ≥ 0, n ≥ 2.
    scores : array-like of float, shape (n,)
    k : int, optional
        Cut-off; None for the whole list.

    Returns
    -------
    float
        In [0, 1]; 1 for an order that sorts the relevances.
    """
    rel, sc = _paired(relevance, scores, "ndcg_at_k")
    if (rel < 0).any():
        raise UsageError("ndcg_at_k needs non-negative relevance values")
    if k is not None:
        check_positive_int("k", k)
    from sklearn.metrics import ndcg_score

    return float(ndcg_score(rel[None], sc[None], k=k))


def pair_accuracy(image_feats, text_feats, pair) -> float:
    """MMVP pair accuracy: a pair counts only when both of its images pick their own caption.

    Tong et al., "Eyes Wide Shut? Exploring the Visual Shortcomings of Multimodal LLMs",
    CVPR 2024, arXiv:2401.06209.  Image ``i`` has caption ``i`` (``text_feats[i]``); the two
    members of each pair (the entries sharing a ``pair`` id) choose between their two
    captions only:

    acc = 1/P sum_p [ s(a, t_a) > s(a, t_b)  and  s(b, t_b) > s(b, t_a) ],  s = cosine

    Parameters
    ----------
    image_feats, text_feats : array (N, D)
        L2-normalised features; row ``i`` of each belongs to example ``i``.
    pair : int array (N,)
        Pair id of each example; every id occurs exactly twice.

    Returns
    -------
    float
        Fraction of pairs solved (chance 0.25); NaN with no pairs.
    """
    x, t = np.asarray(image_feats, np.float64), np.asarray(text_feats, np.float64)
    ids = _labels(pair, len(x), name="pair")
    if x.shape != t.shape or x.ndim != 2:
        raise UsageError(f"image_feats {x.shape} and text_feats {t.shape} must both be (N, D)")
    if np.any(np.unique(ids, return_counts=True)[1] != 2):
        raise UsageError("pair ids must each occur exactly twice")
    order = np.argsort(ids, kind="stable")
    a, b = order[0::2], order[1::2]                      # the two members of each pair, (P,) each
    s_aa, s_ab = (x[a] * t[a]).sum(1), (x[a] * t[b]).sum(1)
    s_bb, s_ba = (x[b] * t[b]).sum(1), (x[b] * t[a]).sum(1)
    return float(((s_aa > s_ab) & (s_bb > s_ba)).mean()) if len(a) else float("nan")


def segmentation_areas(preds, labels, n_classes: int, *, ignore_index: int = 255) -> dict:
    """Per-class pixel areas summed over a set of class maps (mmseg's ``intersect_and_union``).

    Parameters
    ----------
    preds, labels : sequence of int arrays (H_i, W_i)
        Predicted and true class maps, pairwise of equal shape.
    n_classes : int
        C; predicted or true values outside [0, C) count for no class (as mmseg's histogram).
    ignore_index : int, default=255
        Label value whose pixels are left out.

    Returns
    -------
    dict of str -> ndarray (C,) int64
        ``intersect``, ``union``, ``pred`` and ``label`` areas.
    """
    n_classes = check_positive_int("n_classes", n_classes)
    if len(preds) != len(labels):
        raise UsageError(f"{len(preds)} predictions but {len(labels)} label maps")
    inter, area_p, area_l = (np.zeros(n_classes, np.int64) for _ in range(3))
    for i, (p, y) in enumerate(zip(preds, labels)):
        p, y = np.asarray(p), np.asarray(y)
        if p.shape != y.shape:
            raise UsageError(f"map {i}: prediction {p.shape} and labels {y.shape} differ in shape")
        keep = y != ignore_index
        p, y = p[keep].astype(np.int64), y[keep].astype(np.int64)
        hit = p[p == y]

        def count(v):
            v = v[(v >= 0) & (v < n_classes)]
            return np.bincount(v, minlength=n_classes)

        inter += count(hit)
        area_p += count(p)
        area_l += count(y)
    return {"intersect": inter, "union": area_p + area_l - inter, "pred": area_p, "label": area_l}


def mean_iou(preds, labels, n_classes: int, *, ignore_index: int = 255) -> dict:
    """mIoU, aAcc and mAcc of a set of class maps, as mmsegmentation's ``IoUMetric`` computes them.

    IoU_c = sum_i I_ic / sum_i U_ic (areas summed over the set);  mIoU = nanmean_c IoU_c

    Parameters
    ----------
    preds, labels, n_classes, ignore_index
        As :func:`segmentation_areas`.

    Returns
    -------
    dict
        ``mIoU``, ``aAcc``, ``mAcc`` (floats, NaN when undefined) and ``IoU``, ``Acc``
        (ndarrays (C,), NaN for classes with zero union / no labelled pixel).
    """
    a = segmentation_areas(preds, labels, n_classes, ignore_index=ignore_index)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(a["union"] > 0, a["intersect"] / np.maximum(a["union"], 1), np.nan)
        acc = np.where(a["label"] > 0, a["intersect"] / np.maximum(a["label"], 1), np.nan)
    total = a["label"].sum()

    def nanmean(x):
        return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")

    return {"mIoU": nanmean(iou), "aAcc": float(a["intersect"].sum() / total) if total else float("nan"),
            "mAcc": nanmean(acc), "IoU": iou, "Acc": acc}
