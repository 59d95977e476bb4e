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
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..._progress import progress_bar
from ...data.datasets import ClassificationData, fewshot_subset, load_dataset, split_train_val
from ...errors import DataError, UsageError
from ...features import image_features
from ...registry import Registry
from ...validation import check_labels
from ...zeroshot import class_weights, get_templates
from ..metrics import accuracy, confusion_matrix, mean_per_class_recall, retrieval_recall, topk_accuracy

logger = logging.getLogger(__name__)

__all__ = ["TASKS", "EvalRequest", "register_task", "TaskResult", "zeroshot_classification", "zeroshot_retrieval",
           "linear_probe", "fewshot",
           "select_on_validation"]

TASKS: Registry = Registry("eval task", package=__name__)
"""The evaluation tasks, by CLIP_benchmark task name (``fewshot`` is cliplab's own).

Metadata of each entry: ``help`` (one line); ``data``, the dataset kind it evaluates
(:attr:`cliplab.data.datasets.ClassificationData.kind` or ``RetrievalData.kind``);
``run``, ``run(request: EvalRequest, data) -> TaskResult``, what :func:`cliplab.eval.evaluate`
calls; ``options``, the task's own options (``{name: help}``; ``cliplab eval`` offers each
as ``--name``, the task reads it from ``request.options``).  A new task is one module
of this package (``cliplab/eval/tasks/<name>.py``) that calls :func:`register_task`; the
registry imports the package's modules when it is first read.
"""


def register_task(name: str, *, data: str, help: str, run: Callable, options: Mapping[str, str] | None = None,
                  report: Mapping[str, Any] | None = None):
    """Decorator: register a task function under ``name`` in :data:`TASKS`.

    Parameters
    ----------
    name : str
        The task name (``cliplab eval --task NAME``).
    data : str
        The dataset kind it evaluates (``data.kind`` of the loaded ``--dataset``).
    help : str
        One line.
    run : callable
        ``run(request: EvalRequest, data) -> TaskResult``: loads what else it needs through
        ``request`` (train/val splits, other datasets) and calls the task function.
    options : dict of str -> str, optional
        Extra options of the task and their one-line help.
    report : dict, optional
        The task's section of :func:`cliplab.eval.report.build_report`: ``heading``,
        ``explain`` (one paragraph) and ``plot(record) -> PNG bytes``, one figure per record.
    """
    meta = dict(data=data, help=help, run=run, options=dict(options or {}))
    if report is not None:
        meta["report"] = dict(report)
    return TASKS.register(name, **meta)


@dataclass
class EvalRequest:
    """One evaluation: what ``cliplab eval --task`` asks of a task's ``run``.

    Attributes
    ----------
    backbone : Backbone
    dataset : str
        The dataset spec of the evaluated split (``--dataset``).
    split : str
    n, n_train : int or None
        Images of the evaluated split; of the train split (default ``2 * n`` when ``n`` is set).
    templates, store, progress
        Zero-shot templates spec, feature cache, progress bar switch.
    seeds, shots : sequence of int
        Few-shot seeds and k values.
    val_fraction : float
        Share of train held out for validation.
    options : dict
        The task's own options (``TASKS.meta(name)["options"]``).
    timings : dict
        Seconds spent loading data and computing features through this request.
    skipped : list of dict
        Images left out while reading or encoding through this request.
    """

    backbone: Any
    dataset: str
    split: str = "test"
    n: int | None = None
    n_train: int | None = None
    templates: Any = None
    store: Any = None
    seeds: Sequence[int] = (0, 1, 2)
    shots: Sequence[int] = (1, 2, 4, 8, 16)
    val_fraction: float = 0.2
    options: dict = field(default_factory=dict)
    progress: Any = None
    timings: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)

    def load(self, spec: str | None = None, split: str | None = None, n: int | None = None):
        """Load ``spec`` (default: the request's dataset) ``split`` (default: its split), ``n`` images."""
        with _timed(self.timings, "load_dataset"):
            data = load_dataset(spec or self.dataset, split or self.split, n=n if spec or split else (n or self.n))
        self.skipped.extend({"source": s.source, "reason": s.reason, "stage": "read"}
                            for s in getattr(data, "skipped", None) or [])
        return data

    def templates_for(self, data) -> list[str]:
        """The zero-shot templates: ``--templates`` when given, else the dataset's own
        (``data.meta["templates"]``, e.g. a ShapesWorld task's), else ``"default"``."""
        return get_templates(self.templates or data.meta.get("templates") or "default")

    def train_val(self):
        """The train split (``n_train`` images) cut into (train, val) with ``val_fraction``, seed 0."""
        n_train = self.n_train if self.n_train is not None else (2 * self.n if self.n else None)
        train_all = self.load(split="train", n=n_train)
        return split_train_val(train_all, val_fraction=self.val_fraction, seed=0)

    def labelled_features(self, data, split_name: str):
        """``(features (N, D), labels (N,), skipped)`` of a classification dataset's readable images."""
        with _timed(self.timings, "image_features"):
            x, kept, skipped = image_features(self.backbone, data.items, store=self.store, progress=self.progress)
        for s in skipped:
            s.setdefault("split", split_name)
        self.skipped.extend(skipped)
        return x, np.asarray(data.labels)[kept], skipped


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
@register_task("zeroshot_classification", data="classification",
               help="zero-shot classification with prompt-ensemble class weights",
               run=lambda req, data: zeroshot_classification(req.backbone, data, templates=req.templates,
                                                             store=req.store, progress=req.progress))
def zeroshot_classification(backbone, data, *, templates=None, store=None,
                            batch_size: int = 64, progress=None) -> TaskResult:
    """Zero-shot classification of a ClassificationData with prompt-ensemble class weights.

    ``templates`` is a template spec (:func:`cliplab.zeroshot.get_templates`); ``None`` uses
    the dataset's own templates when it has them (``data.meta["templates"]``), else ``"default"``.

    Metrics (CLIP_benchmark's names): ``acc1``, ``acc5`` (NaN with fewer than 5 classes),
    ``mean_per_class_recall``; details: ``confusion_matrix`` (C, C) as nested lists (rows
    true), ``classnames``, ``templates``, ``n``.
    """
    timings: dict = {}
    if templates is None:
        templates = data.meta.get("templates") or "default"
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


@register_task("zeroshot_retrieval", data="retrieval",
               help="image-to-text and text-to-image retrieval recall@k",
               run=lambda req, data: zeroshot_retrieval(req.backbone, data, store=req.store, progress=req.progress))
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
    from ...adapt.linear import quiet_fits

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


def _run_linear_probe(req: EvalRequest, data) -> TaskResult:
    train, val = req.train_val()
    xt, yt, _ = req.labelled_features(train, "train")
    xv, yv, _ = req.labelled_features(val, "val")
    xs, ys, _ = req.labelled_features(data, req.split)
    return linear_probe(xt, yt, xv, yv, xs, ys, seed=req.seeds[0] if req.seeds else 0, progress=req.progress,
                        dataset=data.name, classnames=data.classnames)


@register_task("linear_probe", data="classification",
               help="logistic-regression probe on frozen features, C chosen on validation", run=_run_linear_probe)
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
    from ...adapt.linear import LinearProbe

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


#: C candidates of the few-shot linear probe, chosen on validation per (k, seed).
FEWSHOT_C_GRID = {"C": [1e-2, 1e-1, 1.0, 10.0, 100.0]}


def _run_fewshot(req: EvalRequest, data) -> TaskResult:
    from ...adapt.linear import logistic_regression

    train, val = req.train_val()
    xt, yt, _ = req.labelled_features(train, "train")
    xv, yv, _ = req.labelled_features(val, "val")
    xs, ys, _ = req.labelled_features(data, req.split)
    return fewshot(lambda **p: logistic_regression(**p), (xt, yt), (xv, yv), (xs, ys), ks=req.shots,
                   seeds=req.seeds, grid=FEWSHOT_C_GRID, method="linear probe", classnames=data.classnames,
                   dataset=data.name, progress=req.progress)


@register_task("fewshot", data="classification",
               help="k-shot linear probe over k and seeds, hyper-parameters chosen on validation", run=_run_fewshot)
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
    from ...adapt.linear import quiet_fits

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
