"""Evaluation tasks: zero-shot classification, retrieval and segmentation, linear probe, few-shot.

Every task returns a :class:`TaskResult`: CLIP_benchmark-style ``metrics`` plus the
extras cliplab records (confusion matrix, chosen hyper-parameters, few-shot curves,
skipped images, seconds per stage).  :func:`cliplab.eval.results.make_result` turns
one into a results-file record.

Each task is registered in :data:`TASKS` (the ``eval task`` registry) with a one-line
``help`` and the kind of dataset it evaluates (``data``: ``"classification"``,
``"retrieval"`` or ``"segmentation"``); ``cliplab eval --task``, ``cliplab interpolate --task`` and
:func:`cliplab.eval.suite.evaluate` read their choices from it.

Protocol rules, enforced by the signatures: hyper-parameters are chosen on a
validation split only (:func:`select_on_validation`, :func:`cliplab.adapt.linear.search_C`); test features
and labels are used once, to score the final fitted model.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from .._progress import progress_bar
from ..data.datasets import ClassificationData, fewshot_subset
from ..errors import DataError, UsageError
from ..features import image_features
from ..registry import Registry
from ..validation import check_labels
from ..zeroshot import class_weights, get_templates
from .metrics import (accuracy, confusion_matrix, mean_iou, mean_per_class_recall, retrieval_recall,
                      topk_accuracy)

logger = logging.getLogger(__name__)

__all__ = ["TASKS", "TaskResult", "zeroshot_classification", "zeroshot_retrieval", "zeroshot_segmentation",
           "linear_probe", "fewshot",
           "select_on_validation"]

TASKS: Registry = Registry("eval task")
"""The evaluation tasks, by CLIP_benchmark task name (``fewshot`` is cliplab's own).

Metadata of each entry: ``help`` (one line) and ``data``, the dataset kind it evaluates
(:attr:`cliplab.data.datasets.ClassificationData.kind` or ``RetrievalData.kind``).
"""


@dataclass
class TaskResult:
    """What a task measured.

    Attributes
    ----------
    task : str
        CLIP_benchmark task name (``zeroshot_classification``, ``zeroshot_retrieval``,
        ``linear_probe``) or ``fewshot``.
    dataset : str
    metrics : dict of str -> float
    details : dict
        Task extras: ``confusion_matrix`` + ``classnames``, ``C``, ``fewshot`` curves...
    timings : dict of str -> float
        Seconds per stage.
    skipped : list of dict
        Images left out (``index``, ``source``, ``reason``).
    """

    task: str
    dataset: str
    metrics: dict
    details: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)


@contextmanager
def _timed(timings: dict, stage: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = round(timings.get(stage, 0.0) + time.perf_counter() - t0, 4)


# ---------------------------------------------------------------------------- features
def _text_features(backbone, texts, store=None, progress=None) -> np.ndarray:
    if store is not None:
        return np.asarray(store.text_features(list(texts)), np.float32)
    return backbone.encode_texts(list(texts), progress=progress)


def _acc5(scores, y, n_classes: int) -> float:
    """Top-5 accuracy, NaN with fewer than 5 classes (where it would be 1 by construction).

    The rule of CLIP_benchmark's zero-shot classification (``metrics/zeroshot_classification.py``
    ``evaluate``: ``acc5 = float("nan")`` unless ``len(classes) >= 5``).
    """
    return topk_accuracy(scores, y, 5) if n_classes >= 5 else float("nan")


def _all_skipped(name: str, n: int):
    raise DataError(f"none of the {n} images of {name} could be read")


# ------------------------------------------------------------------------- zero-shot
@TASKS.register("zeroshot_classification", data="classification",
                help="zero-shot classification with prompt-ensemble class weights")
def zeroshot_classification(backbone, data, *, templates=None, store=None,
                            batch_size: int = 64, progress=None) -> TaskResult:
    """Zero-shot classification of a ClassificationData with prompt-ensemble class weights.

    ``templates`` is a template spec (:func:`cliplab.zeroshot.get_templates`); ``None`` uses
    the dataset's own templates when it has them (``data.templates``), else ``"default"``.

    Metrics (CLIP_benchmark's names): ``acc1``, ``acc5`` (NaN with fewer than 5 classes),
    ``mean_per_class_recall``; details: ``confusion_matrix`` (C, C) as nested lists (rows
    true), ``classnames``, ``templates``, ``n``.
    """
    timings: dict = {}
    if templates is None:
        templates = getattr(data, "templates", None) or "default"
    templates = get_templates(templates)
    classnames = list(data.classnames)
    with _timed(timings, "text_features"):
        w = class_weights(backbone, classnames, templates, store=store, ties="warn", progress=progress)  # (C, D)
    with _timed(timings, "image_features"):
        x, kept, skipped = image_features(backbone, data.items, store=store, batch_size=batch_size,
                                          progress=progress)
    if not len(kept):
        _all_skipped(data.name, len(data.items))
    with _timed(timings, "metrics"):
        y = np.asarray(data.labels)[kept]                                     # (N,)
        logits = backbone.logit_scale * x @ w.T                               # (N, C)
        pred = logits.argmax(axis=1)
        c = len(classnames)
        metrics = {"acc1": topk_accuracy(logits, y, 1), "acc5": _acc5(logits, y, c),
                   "mean_per_class_recall": mean_per_class_recall(pred, y, c)}
        cm = confusion_matrix(pred, y, c)
    details = {"confusion_matrix": cm.tolist(), "classnames": classnames, "templates": templates,
               "n": int(len(y))}
    return TaskResult("zeroshot_classification", data.name, metrics, details, timings, skipped)


@TASKS.register("zeroshot_retrieval", data="retrieval",
                help="image-to-text and text-to-image retrieval recall@k")
def zeroshot_retrieval(backbone, data, *, store=None, ks: Sequence[int] = (1, 5, 10),
                       batch_size: int = 64, progress=None) -> TaskResult:
    """Image-text retrieval on a RetrievalData (several captions per image).

    Metrics: ``image_retrieval_recall@k`` (text -> image) and ``text_retrieval_recall@k``
    (image -> text), k in ``ks``.  Captions of unreadable images are left out with them.
    """
    timings: dict = {}
    with _timed(timings, "image_features"):
        x, kept, skipped = image_features(backbone, data.items, store=store, batch_size=batch_size,
                                          progress=progress)
    if not len(kept):
        _all_skipped(data.name, len(data.items))
    texts, t2i = [], []
    for pos, i in enumerate(kept):                 # captions follow their (kept) image
        caps = data.captions[i]
        texts.extend(caps)
        t2i.extend([pos] * len(caps))
    if not texts:
        raise DataError(f"{data.name} has no captions for its readable images")
    with _timed(timings, "text_features"):
        t = _text_features(backbone, texts, store, progress)                 # (T, D)
    with _timed(timings, "metrics"):
        metrics = retrieval_recall(x, t, np.asarray(t2i), ks)
    details = {"n_images": int(len(kept)), "n_texts": len(texts), "ks": list(ks)}
    return TaskResult("zeroshot_retrieval", data.name, metrics, details, timings, skipped)


def _segmentation_fields(data) -> tuple[list, list, list[str], int]:
    """(images, class maps, class names, ignore index) of a segmentation dataset."""
    images = getattr(data, "images", None)
    if images is None:
        images = getattr(data, "items", None)
    maps = getattr(data, "masks", None)
    if maps is None:
        maps = getattr(data, "targets", None)
    if images is None or maps is None or getattr(data, "classnames", None) is None:
        raise UsageError(f"{getattr(data, 'name', 'the dataset')} is not a segmentation dataset: it needs "
                         "images (or items), class maps (masks or targets) and classnames")
    if len(images) != len(maps):
        raise DataError(f"{len(images)} images but {len(maps)} class maps")
    return list(images), list(maps), list(data.classnames), int(getattr(data, "ignore_index", 255))


@TASKS.register("zeroshot_segmentation", data="segmentation",
                help="training-free open-vocabulary segmentation (mIoU as mmsegmentation computes it)")
def zeroshot_segmentation(backbone, data, *, method: str = "sclip", templates=None, window: int | None = None,
                          stride: int | None = None, prob_thd: float = 0.0, batch_size: int = 32,
                          progress=None, **method_options) -> TaskResult:
    """Segment every image of a segmentation dataset with a dense method and score the class maps.

    ``data`` needs ``images`` (or ``items``: paths, PIL images or uint8 arrays), class maps
    ``masks`` (or ``targets``; int arrays (H, W) at each image's size), ``classnames`` (class
    i of the maps is ``classnames[i]``; with ``prob_thd`` class 0 is the background) and
    optionally ``ignore_index`` (default 255) and ``name``.  The method runs through
    :func:`cliplab.dense.segment` with the other arguments.

    Metrics: ``mIoU``, ``aAcc``, ``mAcc`` (:func:`~cliplab.eval.metrics.mean_iou`) and
    ``IoU/<class>`` for each class with a non-zero union (the report's per-class table); details:
    per-class ``IoU`` and ``Acc`` (None where undefined), ``classnames``, ``method``,
    ``window``, ``stride``, ``n``, ``windows``.
    """
    from ..dense import segment

    timings: dict = {}
    images, maps, classnames, ignore = _segmentation_fields(data)
    if templates is None:
        templates = getattr(data, "templates", None) or "openai-80"
    res = segment(backbone, images, classnames, method=method, window=window, stride=stride,
                  prob_thd=prob_thd, templates=templates, batch_size=batch_size, progress=progress,
                  **method_options)
    timings.update({k: round(v, 4) for k, v in res.timings.items()})
    with _timed(timings, "metrics"):
        m = mean_iou(res.masks, maps, len(classnames), ignore_index=ignore)
    metrics = {"mIoU": m["mIoU"], "aAcc": m["aAcc"], "mAcc": m["mAcc"],
               **{f"IoU/{c}": float(v) for c, v in zip(classnames, m["IoU"]) if np.isfinite(v)}}

    def listed(a):
        return [None if not np.isfinite(v) else float(v) for v in a]

    details = {"IoU": listed(m["IoU"]), "Acc": listed(m["Acc"]), "classnames": classnames, "method": res.method,
               "window": window, "stride": stride, "prob_thd": prob_thd, "n": len(images),
               "windows": res.n_windows}
    return TaskResult("zeroshot_segmentation", getattr(data, "name", "segmentation"), metrics, details, timings)


# --------------------------------------------------------------- hyper-parameter choice
def _param_grid(grid) -> list[dict]:
    if isinstance(grid, Mapping):
        keys = list(grid)
        return [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]
    grid = [dict(g) for g in grid]
    return grid or [{}]


def select_on_validation(estimator_factory: Callable, grid, train, val) -> tuple[dict, float, list]:
    """Choose hyper-parameters by validation accuracy.

    Parameters
    ----------
    estimator_factory : callable
        ``estimator_factory(**params)`` -> an object with ``fit(X, y)`` and ``predict(X)``.
    grid : dict of lists or list of dicts
        Candidate parameters (a dict is expanded to its Cartesian product).
    train, val : (X, y) pairs
        The estimator is fit on ``train`` and scored on ``val``.  There is no test argument:
        the test split cannot take part in the choice.

    Returns
    -------
    (best_params, best_val_accuracy, [(params, val_accuracy), ...])
        Ties go to the earlier candidate.
    """
    from ..adapt.linear import quiet_fits

    (xt, yt), (xv, yv) = train, val
    if not len(yv):
        raise UsageError("the validation split is empty; hyper-parameters need a validation split")
    scores = []
    for params in _param_grid(grid):
        with quiet_fits(np.size(xt)):
            est = estimator_factory(**params).fit(xt, yt)
        scores.append((params, accuracy(est.predict(xv), yv)))
    best = max(range(len(scores)), key=lambda i: (scores[i][1], -i))
    return scores[best][0], scores[best][1], scores


def _xy(x, y, name):
    """Features (N, D) as float32, or uint8 images (N, H, W, 3) as they are (fine-tuners)."""
    x, y = np.asarray(x), np.asarray(y)
    images = x.ndim == 4 and x.dtype == np.uint8
    if not images:
        x = x.astype(np.float32, copy=False)
    if (x.ndim != 2 and not images) or len(x) != len(y):
        raise UsageError(f"{name}: give features (N, D) or uint8 images (N, H, W, 3) with one label per "
                         f"row; got {x.shape} and {y.shape}")
    return x, y


def _probe_metrics(est, xs, ys, n_classes=None) -> tuple[dict, list]:
    """lp_acc1/lp_acc5/lp_mean_per_class_recall of a fitted classifier, in the dataset's label space.

    Classes absent from the training data get score -inf: their test examples count as
    errors (and their recall as 0) instead of being dropped.
    """
    raw = est.decision_function(xs)
    raw = raw[:, None] if raw.ndim == 1 else raw
    if raw.shape[1] == 1:                                                  # binary: one column
        raw = np.concatenate([-raw, raw], axis=1)
    classes = np.asarray(est.classes_, dtype=np.int64)
    c = int(max(n_classes or 0, classes.max() + 1, ys.max() + 1 if len(ys) else 0))
    scores = np.full((len(xs), c), -np.inf, dtype=np.float64)              # (N, C)
    scores[:, classes] = raw
    pred = scores.argmax(axis=1)
    unseen = sorted(set(np.unique(ys).tolist()) - set(classes.tolist()))
    if unseen:
        logger.warning("%d test classes never occur in train/val; their examples count as errors", len(unseen))
    return ({"lp_acc1": accuracy(pred, ys), "lp_acc5": _acc5(scores, ys, c),
             "lp_mean_per_class_recall": mean_per_class_recall(pred, ys, c)}, unseen)


@TASKS.register("linear_probe", data="classification",
                help="logistic-regression probe on frozen features, C chosen on validation")
def linear_probe(train_feats, train_y, val_feats, val_y, test_feats, test_y, *, seed: int = 0,
                 refine: int = 8, progress=None, dataset: str = "features",
                 classnames: Sequence[str] | None = None) -> TaskResult:
    """Logistic-regression linear probe on frozen features (CLIP paper protocol).

    :class:`cliplab.adapt.LinearProbe` with ``refit=True``: C is chosen on (train -> val)
    by :func:`cliplab.adapt.linear.search_C` (CoOp's ``lpclip`` search, ``refine``
    binary-search rounds); the probe is then refit on train + val with that C and scored
    once on test.  Metrics, named as CLIP_benchmark's linear probe names them: ``lp_acc1``,
    ``lp_acc5`` (NaN with fewer than 5 classes), ``lp_mean_per_class_recall``; details:
    ``C``, ``val_accuracy``, ``sweep`` (every (C, val accuracy) tried, in order).
    """
    from ..adapt.linear import LinearProbe

    timings: dict = {}
    xt, yt = _xy(train_feats, train_y, "train")
    xv, yv = _xy(val_feats, val_y, "val")
    xs, ys = _xy(test_feats, test_y, "test")
    with _timed(timings, "fit"):
        est = LinearProbe(refit=True, search_steps=refine, random_state=seed, progress=progress)
        est.fit(xt, yt, X_val=xv, y_val=yv)
    with _timed(timings, "metrics"):
        metrics, unseen = _probe_metrics(est, xs, ys, len(classnames) if classnames is not None else None)
    details = {"C": est.C_, "val_accuracy": est.val_score_, "sweep": [[c, a] for c, a in est.search_path_],
               "n_train": int(len(yt)), "n_val": int(len(yv)), "n_test": int(len(ys)), "seed": seed,
               "unseen_test_classes": unseen}
    if classnames is not None:
        details["classnames"] = list(classnames)
    return TaskResult("linear_probe", dataset, metrics, details, timings)


# -------------------------------------------------------------------------- few-shot
def _index_data(y, classnames, name):
    return ClassificationData(list(range(len(y))), np.asarray(y), list(classnames), name)


@TASKS.register("fewshot", data="classification",
                help="k-shot linear probe over k and seeds, hyper-parameters chosen on validation")
def fewshot(make_estimator: Callable, train, val, test, *, ks: Sequence[int] = (1, 2, 4, 8, 16),
            seeds: Sequence[int] = (0, 1, 2), grid=None, method: str = "method",
            classnames: Sequence[str] | None = None, dataset: str = "features",
            progress=None) -> TaskResult:
    """The few-shot protocol: every adaptation method is measured with this one function.

    For each k and seed: draw ``fewshot_subset(train, k, seed)`` (k labelled examples per
    class), choose hyper-parameters on ``val`` with :func:`select_on_validation` (when a
    ``grid`` is given), fit on the k-shot subset, score on ``test``.

    Parameters
    ----------
    make_estimator : callable
        ``make_estimator(**params)`` -> an sklearn-style estimator (``fit``/``predict``).
    train, val, test : (X, y) pairs of features (N, D) and integer labels (N,)
    ks, seeds : sequences of int
    grid : dict of lists or list of dicts, optional
        Hyper-parameter candidates; chosen on ``val`` only.
    method : str
        Name of the method in the results.

    Returns
    -------
    TaskResult
        metrics ``acc1@{k}shot`` (mean over seeds); details ``fewshot``:
        ``{method, ks, seeds, mean, std, per_seed, params}``.
    """
    from ..adapt.linear import quiet_fits

    timings: dict = {}
    xt, yt = _xy(*train, "train")
    xv, yv = _xy(*val, "val")
    xs, ys = _xy(*test, "test")
    names = (list(classnames) if classnames is not None
             else [str(c) for c in range(int(max(yt.max(), ys.max(), yv.max())) + 1)])
    yt = check_labels(yt, len(names), name="few-shot labels")
    pool = _index_data(yt, names, dataset)
    per_seed: dict[int, list] = {}
    params: dict[int, list] = {}
    bar = progress_bar(total=len(ks) * len(seeds), progress=progress, desc=f"few-shot {method}",
                       unit="fit")
    with bar, _timed(timings, "fewshot"):
        for k in ks:
            per_seed[k], params[k] = [], []
            for seed in seeds:
                idx = np.asarray(fewshot_subset(pool, k, seed).items, dtype=np.int64)
                sub = (xt[idx], yt[idx])
                best = {}
                if grid is not None:
                    best, _, _ = select_on_validation(make_estimator, grid, sub, (xv, yv))
                est = make_estimator(**best)
                # estimators that search their own hyper-parameters (the adapters) get the
                # validation split; test labels never reach fit
                own_val = "X_val" in inspect.signature(est.fit).parameters
                with quiet_fits(np.size(sub[0])):
                    est.fit(*sub, **({"X_val": xv, "y_val": yv} if own_val else {}))
                per_seed[k].append(accuracy(est.predict(xs), ys))
                params[k].append(best)
                bar.update(1)
    mean = {k: float(np.mean(v)) for k, v in per_seed.items()}
    std = {k: float(np.std(v)) for k, v in per_seed.items()}
    metrics = {f"acc1@{k}shot": mean[k] for k in ks}
    curve = {"method": method, "ks": list(ks), "seeds": list(seeds),
             "mean": [mean[k] for k in ks], "std": [std[k] for k in ks],
             "per_seed": [per_seed[k] for k in ks], "params": [params[k] for k in ks]}
    details = {"fewshot": [curve], "seeds": list(seeds), "n_val": int(len(yv)), "n_test": int(len(ys))}
    return TaskResult("fewshot", dataset, metrics, details, timings)
