"""Eval task ``fairness``: subgroup performance, gaps, a shortcut test and attribute probes.

The dataset is a classification dataset with per-example attributes
(:attr:`cliplab.data.datasets.ClassificationData.attributes`): a CSV's other columns
(``filepath,label,sex,site`` — a CheXpert/MIMIC-style metadata table works as it is) or a
ShapesWorld subgroup task.  Predictions are zero-shot CLIP's, or with ``--predictor
linear-probe`` a linear probe's trained on the dataset's train split (C on validation):
the model that learns a shortcut the train split holds.  For each attribute
(option ``--attributes sex,site``, default all):

- per-group accuracy, and with a positive class (``--positive NAME``; default the second
  class of a two-class dataset) per-group AUROC, TPR, FPR, FNR (under-diagnosis) and
  selection rate, their gaps (max - min) and fairlearn's equalized-odds and
  demographic-parity differences (:func:`cliplab.eval.fairness.subgroup_metrics`);
- an attribute probe: how well a linear probe recovers the attribute from the image
  embeddings (AUROC with a 95 % bootstrap interval, and the same on shuffled values);
- with ``--shortcut ATTR``, the shortcut test: accuracy where the attribute takes the
  value that usually comes with the label and where it does not
  (:func:`cliplab.eval.fairness.shortcut_test`); "usually" is counted on the dataset's
  train split when it has one, else on the evaluated images (said in the details).

Metrics are named ``<attribute>:<metric>``.
"""

from __future__ import annotations

import logging

import numpy as np

from ...errors import UsageError
from ...zeroshot import class_weights
from ..calibration import softmax
from ..fairness import attribute_probe, shortcut_test, subgroup_metrics
from . import EvalRequest, TaskResult, _timed, register_task
from .calibration import _same_items

logger = logging.getLogger(__name__)


PREDICTORS = ("zero-shot", "linear-probe")
"""Whose predictions are measured: zero-shot CLIP, or a linear probe trained on the dataset's
train split (C chosen on validation), which learns whatever shortcut the train split holds."""


def _probe_probs(request: EvalRequest, data, x) -> np.ndarray:
    from ...adapt.linear import LinearProbe

    train, val = request.train_val()
    if _same_items(train, data):
        raise UsageError(f"--predictor linear-probe needs a train split of {data.name} other than the "
                         "evaluated images")
    xt, yt, _ = request.labelled_features(train, "train")
    xv, yv, _ = request.labelled_features(val, "val")
    probe = LinearProbe(refit=True, random_state=request.seeds[0] if request.seeds else 0)
    probe.fit(xt, yt, X_val=xv, y_val=yv)
    probs = np.zeros((len(x), len(data.classnames)))
    probs[:, probe.classes_] = probe.predict_proba(x)
    return probs


def _majority(labels, attribute) -> dict:
    """``{label: the attribute value most frequent with it}``."""
    out = {}
    for lab in np.unique(labels):
        vals, counts = np.unique(attribute[labels == lab], return_counts=True)
        out[int(lab)] = str(vals[counts.argmax()])
    return out


def _run(request: EvalRequest, data) -> TaskResult:
    if not data.attributes:
        raise UsageError(f"{data.name} has no attributes to group by; give a CSV with group columns "
                         "(filepath,label,sex,...) or a ShapesWorld subgroup task")
    names = [a.strip() for a in (request.options.get("attributes") or ",".join(data.attributes)).split(",")
             if a.strip()]
    unknown = [a for a in names if a not in data.attributes]
    if unknown:
        raise UsageError(f"{data.name} has no attribute {unknown[0]!r}; it has {', '.join(data.attributes)}")
    positive = request.options.get("positive")
    if positive is not None and positive not in data.classnames:
        raise UsageError(f"--positive {positive!r} is not a class of {data.name} ({', '.join(data.classnames)})")
    if positive is None and len(data.classnames) == 2:
        positive = data.classnames[1]
    shortcut = request.options.get("shortcut")
    if shortcut is not None and shortcut not in data.attributes:
        raise UsageError(f"--shortcut {shortcut!r} is not an attribute of {data.name}")
    predictor = request.options.get("predictor") or "zero-shot"
    if predictor not in PREDICTORS:
        raise UsageError(f"--predictor must be one of {', '.join(PREDICTORS)}, got {predictor!r}")

    timings: dict = {}
    templates = request.templates_for(data)
    with _timed(timings, "text_features"):
        w = class_weights(request.backbone, list(data.classnames), templates, store=request.store,
                          progress=request.progress)
    with _timed(request.timings, "image_features"):
        from ...features import image_features

        x, kept, skipped = image_features(request.backbone, data.items, store=request.store,
                                          progress=request.progress)
    kept = np.asarray(kept, dtype=np.int64)
    y = np.asarray(data.labels)[kept]
    if predictor == "linear-probe":
        with _timed(timings, "fit"):
            probs = _probe_probs(request, data, x)
    else:
        probs = softmax(request.backbone.logit_scale * (x @ w.T))
    pred = probs.argmax(axis=1)
    pos = data.classnames.index(positive) if positive is not None else None
    metrics, groups, probes = {"acc1": float(np.mean(pred == y))}, {}, {}
    with _timed(timings, "metrics"):
        for a in names:
            attr = data.attributes[a][kept]
            res = subgroup_metrics(y, pred, attr, positive=pos, scores=probs[:, pos] if pos is not None else None)
            groups[a] = res
            metrics[f"{a}:worst_accuracy"] = res["worst"]["accuracy"]
            metrics[f"{a}:accuracy_gap"] = res["gaps"]["accuracy"]
            if pos is not None:
                for k in ("auroc", "tpr", "fnr"):
                    metrics[f"{a}:{k}_gap"] = res["gaps"][k]
                metrics[f"{a}:equalized_odds_difference"] = res["equalized_odds_difference"]
                metrics[f"{a}:demographic_parity_difference"] = res["demographic_parity_difference"]
    with _timed(timings, "probes"):
        for a in names:
            try:
                probes[a] = attribute_probe(x, data.attributes[a][kept], seed=request.seeds[0] if request.seeds else 0)
            except UsageError as e:
                logger.warning("%s: no probe for attribute %r: %s", data.name, a, e)
                continue
            metrics[f"{a}:probe_auroc"] = probes[a]["auroc"]
    details = {"groups": groups, "probes": probes, "positive": positive, "attributes": names, "predictor": predictor,
               "classnames": list(data.classnames), "templates": templates, "n_test": int(len(y))}
    if shortcut is not None:
        train = request.load(split="train", n=request.n_train or request.n)
        if _same_items(train, data) or shortcut not in train.attributes:
            source, aligned = "evaluated images", _majority(y, data.attributes[shortcut][kept])
        else:
            source, aligned = "train split", _majority(np.asarray(train.labels), train.attributes[shortcut])
        res = shortcut_test(y, pred, data.attributes[shortcut][kept], aligned=aligned)
        metrics[f"{shortcut}:shortcut_gap"] = res["gap"]
        details["shortcut"] = {"attribute": shortcut, "aligned_from": source,
                               "aligned": {data.classnames[k]: v for k, v in aligned.items()}, **res}
    return TaskResult("fairness", data.name, metrics, details, timings, skipped)


def subgroup_plot(record: dict) -> bytes:
    """Per-group accuracy (and TPR/FNR with a positive class) of each attribute, probe AUROC in the title."""
    from ..report import figure_png, new_figure

    d = record["cliplab"]
    names = d["attributes"]
    fig = new_figure(max(4.0, 3.6 * len(names)), 3.6)
    for i, a in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        groups = d["groups"][a]["groups"]
        keys = ["accuracy"] + (["tpr", "fnr"] if d.get("positive") else [])
        labels = list(groups)
        width = 0.8 / len(keys)
        for j, k in enumerate(keys):
            xs = np.arange(len(labels)) + (j - (len(keys) - 1) / 2) * width
            bars = ax.bar(xs, [100 * groups[g][k] for g in labels], width, label=k, color=f"C{j}")
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(range(len(labels)), [f"{g}\n(n={groups[g]['n']})" for g in labels], fontsize=8)
        ax.set_ylim(0, 110)
        ax.set_ylabel("%")
        probe = d.get("probes", {}).get(a)
        title = a if not probe else (f"{a}: probe AUROC {probe['auroc']:.2f} "
                                     f"[{probe['auroc_low']:.2f}, {probe['auroc_high']:.2f}]")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    return figure_png(fig)


@register_task("fairness", data="classification", run=_run,
               options={"attributes": "comma-separated attributes (CSV columns) to group by (default: all)",
                        "positive": "the positive class for TPR/FPR/FNR/AUROC (default: the 2nd of two classes)",
                        "shortcut": "an attribute to run the shortcut test on (aligned vs conflicting accuracy)",
                        "predictor": "whose predictions: zero-shot (default) or linear-probe "
                                     "(trained on the train split)"},
               report={"heading": "Subgroups", "plot": subgroup_plot,
                       "explain": "Per-subgroup accuracy (and true-positive / false-negative rates of the "
                                  "positive class) of each attribute; the title gives how well a linear probe "
                                  "recovers the attribute from the image embeddings (AUROC, 95% interval)."},
               help="subgroup accuracy/AUROC/TPR/FNR gaps (fairlearn), a shortcut test and attribute probes")
def fairness(request: EvalRequest, data) -> TaskResult:
    """Subgroup fairness of zero-shot CLIP (see the module docstring)."""
    return _run(request, data)
