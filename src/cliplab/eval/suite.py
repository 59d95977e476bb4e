"""Run evaluation tasks on dataset specs and the ShapesWorld suite; returns results records.

:func:`evaluate` is what ``cliplab eval --task`` calls: it loads the dataset, computes
(cached) features and runs one task of :mod:`cliplab.eval.tasks`.  :func:`run_suite`
runs a named list of such evaluations (``SUITES``).  :func:`check_request` checks a
``cliplab eval`` request before anything is loaded, and :func:`evaluate_interpolation`
evaluates WiSE-FT mixes (``cliplab interpolate --sweep``).

The ``shapes`` suite; with shapes-tiny it takes well under a minute on 2 CPU cores
(``benchmarks/eval_suite.py`` measures it).  Test sets are shared between tasks, so their
features are computed once.  Linear probe and few-shot use the 8-way shape task, whose
classes all occur in train (the colour x shape task holds out compositions that train
never shows):

=============================  ==========================  ========================================
dataset                        task                        images
=============================  ==========================  ========================================
shapes:color-shape             zeroshot_classification     test 1280
shapes:shape                   zeroshot_classification     test 800 ("a photo of a {c}.")
shapes:color                   zeroshot_classification     test 800 ("a photo of a {c} shape.")
shapes:color-shape-heldout     zeroshot_classification     test 400
shapes:retrieval               zeroshot_retrieval          test 1000 (all captions)
shapes:shape                   linear_probe                train 2560 (20 % val), test 800
shapes:shape                   fewshot (linear probe)      same; k 1,2,4,8,16; seeds 0,1,2
=============================  ==========================  ========================================
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from ..data.datasets import load_dataset, split_train_val
from ..errors import UsageError
from ..features import image_features
from ..validation import check_positive_int
from .results import make_result
from .tasks import (TASKS, fewshot, linear_probe, zeroshot_classification, zeroshot_retrieval,
                    zeroshot_segmentation)

__all__ = ["TASKS", "SUITES", "evaluate", "run_suite", "check_request", "evaluate_interpolation",
           "FEWSHOT_C_GRID"]

#: C candidates of the few-shot linear probe, chosen on validation per (k, seed).
FEWSHOT_C_GRID = {"C": [1e-2, 1e-1, 1.0, 10.0, 100.0]}

SUITES = {
    "shapes": [
        dict(task="zeroshot_classification", dataset="shapes:color-shape", n=1280),
        dict(task="zeroshot_classification", dataset="shapes:shape", n=800, templates="a photo of a {c}."),
        dict(task="zeroshot_classification", dataset="shapes:color", n=800,
             templates="a photo of a {c} shape."),
        dict(task="zeroshot_classification", dataset="shapes:color-shape-heldout", n=400),
        dict(task="zeroshot_retrieval", dataset="shapes:retrieval", n=1000),
        dict(task="linear_probe", dataset="shapes:shape", n=800, n_train=2560),
        dict(task="fewshot", dataset="shapes:shape", n=800, n_train=2560),
    ],
}


def _load(spec, split, n, seed=0):
    return load_dataset(spec, split, n=n, seed=seed)


def _labelled_features(backbone, data, store, progress, split_name):
    x, kept, skipped = image_features(backbone, data.items, store=store, progress=progress)
    for s in skipped:
        s.setdefault("split", split_name)
    return x, np.asarray(data.labels)[kept], skipped


def _require_kind(data, task):
    """Raise unless ``data`` is the kind of dataset that ``task`` evaluates (``TASKS.meta``)."""
    wanted = TASKS.meta(task)["data"]
    if data.kind == wanted:
        return
    if wanted == "segmentation" or data.kind == "segmentation":
        raise UsageError(f"task {task} needs a {wanted} dataset; {data.name} is a {data.kind} dataset"
                         + (" (segmentation datasets hold images with class maps)" if wanted == "segmentation"
                            else ""))
    if data.kind == "retrieval":
        raise UsageError(f"task {task} needs a classification dataset (images with class labels); "
                         f"{data.name} is a retrieval dataset")
    raise UsageError(f"task {task} needs an image-caption dataset; {data.name} has "
                     "class labels (try shapes:retrieval or a CSV/JSONL of image,caption)")


def evaluate(backbone, *, model_spec: str, task: str, dataset: str, split: str = "test",
             templates=None, store=None, n: int | None = None, n_train: int | None = None,
             seeds: Sequence[int] = (0, 1, 2), shots: Sequence[int] = (1, 2, 4, 8, 16),
             val_fraction: float = 0.2, progress=None) -> dict:
    """Run one task on one dataset spec; return a results record (see :mod:`.results`).

    ``n`` limits the evaluated split, ``n_train`` the train split of ``linear_probe`` and
    ``fewshot`` (default: ``2 * n`` when ``n`` is given); the validation split is
    ``val_fraction`` of train (fixed seed).
    """
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}: use one of {', '.join(TASKS.names())}")
    t0 = time.perf_counter()
    data = _load(dataset, split, n)
    load_s = time.perf_counter() - t0
    seeds = list(seeds)
    _require_kind(data, task)
    if task == "zeroshot_classification":
        res = zeroshot_classification(backbone, data, templates=templates, store=store, progress=progress)
    elif task == "zeroshot_retrieval":
        res = zeroshot_retrieval(backbone, data, store=store, progress=progress)
    elif task == "zeroshot_segmentation":
        res = zeroshot_segmentation(backbone, data, templates=templates, progress=progress)
    else:
        t0 = time.perf_counter()
        train_all = _load(dataset, "train", n_train if n_train is not None else (2 * n if n else None))
        train, val = split_train_val(train_all, val_fraction=val_fraction, seed=0)
        load_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        xt, yt, sk_t = _labelled_features(backbone, train, store, progress, "train")
        xv, yv, sk_v = _labelled_features(backbone, val, store, progress, "val")
        xs, ys, sk_s = _labelled_features(backbone, data, store, progress, split)
        feat_s = time.perf_counter() - t0
        if task == "linear_probe":
            res = linear_probe(xt, yt, xv, yv, xs, ys, seed=seeds[0] if seeds else 0, progress=progress,
                               dataset=data.name, classnames=data.classnames)
        else:
            from ..adapt.linear import logistic_regression

            res = fewshot(lambda **p: logistic_regression(**p), (xt, yt), (xv, yv), (xs, ys),
                          ks=shots, seeds=seeds, grid=FEWSHOT_C_GRID, method="linear probe",
                          classnames=data.classnames, dataset=data.name, progress=progress)
        res.skipped = sk_t + sk_v + sk_s
        res.timings = {"image_features": round(feat_s, 4), **res.timings}
    res.timings = {"load_dataset": round(load_s, 4), **res.timings}
    read_skips = [{"source": s.source, "reason": s.reason, "stage": "read"}
                  for s in getattr(data, "skipped", None) or []]
    res.skipped = read_skips + list(res.skipped)
    return make_result(res, model_spec=model_spec, fingerprint=backbone.fingerprint,
                       seeds=seeds if task == "fewshot" else None,
                       extra={"split": split, "n": n})


def check_request(*, task: str | None = None, suite: str | None = None, dataset: str | None = None,
                  n: int | None = None, n_train: int | None = None, shots: Sequence[int] = (1,),
                  out=None, report=None) -> None:
    """Check an evaluation request before any model or data is loaded (``cliplab eval``).

    Parameters
    ----------
    task, suite : str, optional
        One evaluation (``task`` on ``dataset``) or a suite of them.
    dataset : str, optional
        Required with ``task``.
    n, n_train : int, optional
        Positive when given.
    shots : sequence of int
        Few-shot k values, all positive.
    out : path, optional
        With ``suite``, a folder for one results file per evaluation
        (:func:`cliplab.eval.results.results_folder`).
    report : path, optional
        An ``.html`` file, or a folder (no suffix).

    Raises
    ------
    UsageError
        Naming the offending option as the command line spells it.
    """
    from pathlib import Path

    from .results import results_folder

    if min(shots) < 1:
        raise UsageError(f"--shots must be positive, got {','.join(map(str, shots))}")
    check_positive_int("--n", n, allow_none=True)
    check_positive_int("--n-train", n_train, allow_none=True)
    if task and not dataset:
        raise UsageError("--task needs --dataset (a folder, CSV/JSONL, shards or shapes:NAME)")
    if suite and out:
        results_folder(out)                              # before the suite runs
    if report and not str(report).lower().endswith((".html", ".htm")) and Path(report).suffix:
        raise UsageError(f"--report must be an .html file or a folder, got {report}")


def run_suite(backbone, name: str, *, model_spec: str, store=None, progress=None,
              seeds: Sequence[int] = (0, 1, 2), shots: Sequence[int] = (1, 2, 4, 8, 16),
              on_result=None) -> list[dict]:
    """Run every evaluation of ``SUITES[name]``; ``on_result(record)`` is called after each."""
    if name not in SUITES:
        raise UsageError(f"unknown suite {name!r}: use one of {', '.join(SUITES)}")
    out = []
    for entry in SUITES[name]:
        kw = dict(entry)
        rec = evaluate(backbone, model_spec=model_spec, store=store, progress=progress, seeds=seeds,
                       shots=shots, task=kw.pop("task"), dataset=kw.pop("dataset"), **kw)
        out.append(rec)
        if on_result is not None:
            on_result(rec)
    return out


def evaluate_interpolation(zero_shot, finetuned, alphas: Sequence[float], *, task: str, dataset: str,
                           split: str = "test", templates=None, cache=None, n: int | None = None,
                           extrapolate: bool = False, zero_shot_spec: str = "", finetuned_spec: str = "",
                           on_result=None) -> tuple[list[dict], list[dict]]:
    """Evaluate the WiSE-FT mix of two Backbones at each alpha (``cliplab interpolate --sweep``).

    Parameters
    ----------
    zero_shot, finetuned : Backbone
        Same architecture (:func:`cliplab.surgery.wise_ft.check_compatible`).
    alphas : sequence of float
        Weights of ``finetuned``, each in [0, 1] unless ``extrapolate``.
    task, dataset, split, templates, n
        As for :func:`evaluate`.
    cache : path, optional
        Feature cache folder; each mixed model gets its own entries (by fingerprint).
    zero_shot_spec, finetuned_spec : str
        The models' specs, recorded in each record (``cliplab.alpha``, ``..._spec``).
    on_result : callable, optional
        ``on_result(index, alpha, record)`` after each alpha.

    Returns
    -------
    rows : list of dict
        ``{"alpha": a, **numeric metrics}`` per alpha, in the given order.
    records : list of dict
        The results record of each alpha (:func:`cliplab.eval.results.make_result`).
    """
    from ..surgery.wise_ft import sweep

    records = []

    def evaluate_fn(backbone):
        store = None
        if cache:
            from ..features import FeatureStore

            store = FeatureStore(cache, backbone)
        rec = evaluate(backbone, model_spec=finetuned_spec, task=task, dataset=dataset, split=split,
                       templates=templates, store=store, n=n)
        records.append(rec)
        if on_result is not None:
            on_result(len(records) - 1, alphas[len(records) - 1], rec)
        return {k: v for k, v in rec["metrics"].items() if isinstance(v, (int, float))}

    rows = sweep(zero_shot, finetuned, alphas, evaluate_fn, extrapolate=extrapolate)
    for a, rec in zip(alphas, records):
        rec["cliplab"].update({"alpha": a, "zero_shot_spec": str(zero_shot_spec),
                               "finetuned_spec": str(finetuned_spec)})
    return rows, records
