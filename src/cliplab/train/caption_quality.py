"""Caption filtering by a CLIP score: keep the image-caption pairs a model finds matching.

The quality step of DataComp / HQ-CLIP-style data curation ("CLIP score filtering":
Gadre et al., "DataComp", NeurIPS 2023, arXiv:2304.14108; the CLIPScore of Hessel et al.,
arXiv:2104.08718): every image-caption pair of a training set is scored by a CLIP model,
and only the pairs above a threshold, or the best fraction of them, are trained on.

:func:`filter_by_score` scores every pair of a map-style training set (all captions of
every item) with any ``scorer(images, captions) -> scores``, keeps the selected pairs
(:func:`select_pairs`) and returns the filtered set with a :class:`FilterReport` (pairs
and items scored, kept, dropped, the threshold used).  The CLIPScore scorer over a
Backbone is :class:`cliplab.dense.misalignment.ClipScorer` (``dense`` builds on ``train``,
so the scorer is handed in rather than imported here).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .._progress import progress_bar

logger = logging.getLogger(__name__)

__all__ = ["FilterReport", "FilteredSet", "filter_by_score", "select_pairs"]


def select_pairs(scores, *, threshold: float | None = None, keep_fraction: float | None = None) -> np.ndarray:
    """Which pairs a filter keeps: score >= ``threshold``, or the best ``keep_fraction``.

    Parameters
    ----------
    scores : array (N,)
    threshold : float, optional
        Keep the pairs scoring at least this.
    keep_fraction : float in (0, 1], optional
        Keep the ``round(keep_fraction * N)`` best pairs (ties broken by index, lower first).
        Exactly one of ``threshold`` and ``keep_fraction`` is given.

    Returns
    -------
    numpy.ndarray of bool, shape (N,)

    Raises
    ------
    ValueError
        Neither or both criteria, or ``keep_fraction`` outside (0, 1].
    """
    s = np.asarray(scores, dtype=np.float64).ravel()                     # (N,)
    if (threshold is None) == (keep_fraction is None):
        raise ValueError("give exactly one of threshold and keep_fraction")
    if threshold is not None:
        return s >= threshold
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    k = int(round(keep_fraction * len(s)))
    order = np.argsort(-s, kind="stable")                                # best first, ties by index
    keep = np.zeros(len(s), dtype=bool)
    keep[order[:k]] = True
    return keep


@dataclass
class FilterReport:
    """What a caption filter did.

    Attributes
    ----------
    n_pairs, n_kept_pairs : int
        Image-caption pairs scored and kept.
    n_items, n_kept_items : int
        Items (images) scored, and those with at least one caption kept.
    threshold : float
        The lowest kept score (the given threshold, or the one ``keep_fraction`` implies).
    mean_score, mean_kept_score : float
    """

    n_pairs: int
    n_kept_pairs: int
    n_items: int
    n_kept_items: int
    threshold: float
    mean_score: float
    mean_kept_score: float

    @property
    def n_dropped_pairs(self) -> int:
        return self.n_pairs - self.n_kept_pairs

    def summary(self) -> str:
        return (f"kept {self.n_kept_pairs} of {self.n_pairs} pairs ({self.n_dropped_pairs} dropped, score >= "
                f"{self.threshold:.4f}), {self.n_kept_items} of {self.n_items} images")


class FilteredSet:
    """The items of ``base`` that kept a caption, each with its kept captions only.

    Parameters
    ----------
    base : map-style dataset of ``(image, captions[, extras])``
    kept : list of (int, list of int)
        ``(item index in base, indices of its kept captions)``.
    report : FilterReport, optional
        What the filter did (kept for the record).
    """

    def __init__(self, base, kept: list[tuple[int, list[int]]], report: FilterReport | None = None):
        self.base, self.kept, self.report = base, kept, report

    def __len__(self) -> int:
        return len(self.kept)

    def __getitem__(self, index: int):
        i, caps = self.kept[int(index)]
        image, captions, *extras = self.base[i]
        return (image, [captions[j] for j in caps], *extras)

    def get_batch(self, indices):
        """The base set's batch (its own ``get_batch`` when it has one) with the kept captions."""
        rows = [self.kept[int(k)] for k in indices]
        if hasattr(self.base, "get_batch"):
            images, captions, *extras = self.base.get_batch([i for i, _ in rows])
        else:
            images, captions, *extras = zip(*(self.base[i] for i, _ in rows))
        return (list(images), [[c[j] for j in caps] for c, (_, caps) in zip(captions, rows)], *extras)


def _items(base, start: int, stop: int):
    idx = list(range(start, stop))
    if hasattr(base, "get_batch"):
        images, captions, *_ = base.get_batch(idx)
        return list(images), [list(c) for c in captions]
    items = [base[i] for i in idx]
    return [it[0] for it in items], [list(it[1]) for it in items]


def filter_by_score(base, scorer: Callable, *, threshold: float | None = None, keep_fraction: float | None = None,
                    batch_size: int = 256, progress: bool | None = None) -> tuple[FilteredSet, FilterReport, np.ndarray]:
    """Score every image-caption pair of ``base`` and keep the selected pairs.

    Parameters
    ----------
    base : map-style dataset of ``(image, captions[, extras])``
    scorer : callable
        ``scorer(images, captions) -> array (N,)`` for N paired images and captions,
        higher = better matching (e.g. :class:`cliplab.dense.misalignment.ClipScorer`).
    threshold, keep_fraction : float, optional
        Exactly one (see :func:`select_pairs`); the fraction is of pairs.
    batch_size : int, default 256
        Items scored per call of ``scorer``.
    progress : bool, optional

    Returns
    -------
    (FilteredSet, FilterReport, scores)
        ``scores`` (P,) of every pair, in item order then caption order.

    Raises
    ------
    ValueError
        Bad criteria; a scorer that does not return one score per pair.
    """
    if (threshold is None) == (keep_fraction is None):
        raise ValueError("give exactly one of threshold and keep_fraction")
    owner, scores = [], []
    bar = progress_bar(total=len(base), desc="score captions", unit="image", progress=progress)
    for start in range(0, len(base), batch_size):
        images, captions = _items(base, start, min(start + batch_size, len(base)))
        pair_images = [im for im, caps in zip(images, captions) for _ in caps]
        pair_texts = [c for caps in captions for c in caps]
        s = np.asarray(scorer(pair_images, pair_texts), dtype=np.float64).ravel()
        if len(s) != len(pair_texts):
            raise ValueError(f"the scorer returned {len(s)} scores for {len(pair_texts)} pairs")
        scores.append(s)
        owner += [(start + i, j) for i, caps in enumerate(captions) for j in range(len(caps))]
        bar.update(len(images))
    bar.close()
    scores = np.concatenate(scores) if scores else np.zeros(0)          # (P,)
    keep = select_pairs(scores, threshold=threshold, keep_fraction=keep_fraction)
    kept: dict[int, list[int]] = {}
    for (i, j), k in zip(owner, keep):
        if k:
            kept.setdefault(i, []).append(j)
    report = FilterReport(
        n_pairs=len(scores), n_kept_pairs=int(keep.sum()), n_items=len(base), n_kept_items=len(kept),
        threshold=float(threshold if threshold is not None else (scores[keep].min() if keep.any() else np.inf)),
        mean_score=float(scores.mean()) if len(scores) else float("nan"),
        mean_kept_score=float(scores[keep].mean()) if keep.any() else float("nan"))
    logger.info("caption filter: %s", report.summary())
    return FilteredSet(base, sorted(kept.items()), report), report, scores
