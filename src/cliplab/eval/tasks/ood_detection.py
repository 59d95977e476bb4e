"""Eval task ``ood_detection``: tell in-distribution images from out-of-distribution ones.

The evaluated ``--dataset`` is the in-distribution (ID) set, a classification dataset whose
class names make the zero-shot prompts; ``--ood-dataset`` holds the OOD images (any
dataset; its labels are not used).  Scores (:mod:`cliplab.eval.ood`): ``mcm`` (maximum
concept matching, Ming et al. 2022), ``energy``, ``max_logit`` and ``msp`` of zero-shot
CLIP, and ``msp_probe``, the maximum softmax probability of a linear probe trained on the
ID dataset's train split (C chosen on validation), the usual baseline of a trained
classifier.  The probe is left out when the ID dataset has no train split of its own.

Metrics: ``auroc_<score>`` (ID positive) and ``fpr95_<score>`` (FPR on OOD at 95 % TPR
on ID).  Details: a histogram of each score on ID and OOD images (for the report).
"""

from __future__ import annotations

import logging

import numpy as np

from ...errors import DataError, UsageError
from ...zeroshot import class_weights
from ..calibration import softmax
from ..ood import energy_score, max_logit_score, mcm_score, msp_score, ood_metrics
from . import EvalRequest, TaskResult, _timed, register_task
from .calibration import _same_items

logger = logging.getLogger(__name__)


def _features(request: EvalRequest, data, split_name: str) -> np.ndarray:
    from ...features import image_features

    with _timed(request.timings, "image_features"):
        x, kept, skipped = image_features(request.backbone, data.items, store=request.store,
                                          progress=request.progress)
    for s in skipped:
        s.setdefault("split", split_name)
    request.skipped.extend(skipped)
    if not len(kept):
        raise DataError(f"none of the {len(data.items)} images of {data.name} could be read")
    return x


def _histogram(a: np.ndarray, b: np.ndarray, bins: int = 30) -> dict:
    lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
    edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1)
    return {"edges": edges.tolist(), "id": np.histogram(a, edges)[0].tolist(),
            "ood": np.histogram(b, edges)[0].tolist()}


def _probe_msp(request: EvalRequest, data, x_id, x_ood):
    from ...adapt.linear import LinearProbe

    train, val = request.train_val()
    if _same_items(train, data) or not len(val.items):
        logger.info("%s has no train split of its own; the linear-probe baseline is left out", data.name)
        return None
    xt, yt, _ = request.labelled_features(train, "train")
    xv, yv, _ = request.labelled_features(val, "val")
    probe = LinearProbe(refit=True, random_state=request.seeds[0] if request.seeds else 0).fit(xt, yt, X_val=xv,
                                                                                                y_val=yv)
    return msp_score(probe.predict_proba(x_id)), msp_score(probe.predict_proba(x_ood))


def _run(request: EvalRequest, data) -> TaskResult:
    spec = request.options.get("ood_dataset")
    if not spec:
        raise UsageError("task ood_detection needs --ood-dataset (the out-of-distribution images, e.g. shapes:ood)")
    timings: dict = {}
    ood = request.load(spec=spec, split=request.split, n=request.n)
    templates = request.templates_for(data)
    with _timed(timings, "text_features"):
        w = class_weights(request.backbone, list(data.classnames), templates, store=request.store,
                          progress=request.progress)                                   # (C, D)
    x_id = _features(request, data, request.split)
    x_ood = _features(request, ood, "ood")
    scale = float(request.backbone.logit_scale)
    scores = {}
    with _timed(timings, "scores"):
        for name, x in (("id", x_id), ("ood", x_ood)):
            cos = x @ w.T                                                               # (N, C)
            scores.setdefault("mcm", {})[name] = mcm_score(cos)
            scores.setdefault("energy", {})[name] = energy_score(scale * cos)
            scores.setdefault("max_logit", {})[name] = max_logit_score(scale * cos)
            scores.setdefault("msp", {})[name] = msp_score(softmax(scale * cos))
    with _timed(timings, "probe"):
        probe = _probe_msp(request, data, x_id, x_ood)
    if probe is not None:
        scores["msp_probe"] = {"id": probe[0], "ood": probe[1]}
    metrics, hist = {}, {}
    for name, s in scores.items():
        for k, v in ood_metrics(s["id"], s["ood"]).items():
            metrics[f"{k}_{name}"] = v
        hist[name] = _histogram(s["id"], s["ood"])
    details = {"ood_dataset": spec, "n_id": int(len(x_id)), "n_ood": int(len(x_ood)), "histograms": hist,
               "templates": templates, "classnames": list(data.classnames)}
    return TaskResult("ood_detection", data.name, metrics, details, timings)


def histogram_plot(record: dict) -> bytes:
    """Score histograms of an ``ood_detection`` record: ID vs OOD, one panel per score."""
    from ..report import figure_png, new_figure

    hists = record["cliplab"]["histograms"]
    names = [n for n in ("mcm", "energy", "msp", "msp_probe") if n in hists]
    fig = new_figure(3.2 * len(names), 3.2)
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        h = hists[name]
        edges = np.asarray(h["edges"])
        centers, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
        for key, color in (("id", "C0"), ("ood", "C3")):
            counts = np.asarray(h[key], float)
            ax.bar(centers, counts / max(counts.sum(), 1), width, color=color, alpha=0.55, label=key.upper())
        auroc = record["metrics"].get(f"auroc_{name}")
        ax.set_title(f"{name}: AUROC {auroc:.3f}" if auroc is not None else name, fontsize=10)
        ax.set_xlabel("score (higher = more in-distribution)", fontsize=8)
        ax.legend(fontsize=8)
    return figure_png(fig)


@register_task("ood_detection", data="classification", run=_run,
               report={"heading": "Out-of-distribution detection", "plot": histogram_plot,
                       "explain": "Share of in-distribution (ID) and out-of-distribution (OOD) test images "
                                  "per score value; the less the two overlap, the higher the AUROC."},
               options={"ood_dataset": "dataset of out-of-distribution images (e.g. shapes:ood)"},
               help="OOD detection AUROC and FPR@95 of MCM, energy, max-logit, MSP and a linear probe's MSP")
def ood_detection(request: EvalRequest, data) -> TaskResult:
    """OOD detection with zero-shot scores and a linear-probe baseline (see the module docstring)."""
    return _run(request, data)
