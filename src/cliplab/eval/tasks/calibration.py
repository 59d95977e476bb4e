"""Eval task ``calibration``: ECE, adaptive ECE, Brier and NLL of zero-shot probabilities,
before and after temperature scaling fitted on the validation split only.

Zero-shot probabilities are ``softmax(logit_scale * cos(image, class prompts))`` with the
prompt-ensemble class weights of ``zeroshot_classification``.  The temperature is fitted
on the dataset's ``val`` split; a dataset without split folders (where ``val`` is the
evaluated images themselves) is cut in two halves instead (seed 0): the temperature is
fitted on one and every metric is measured on the other, and ``details["val_source"]``
says so.  Metrics and their definitions: :mod:`cliplab.eval.calibration`.
"""

from __future__ import annotations

import numpy as np

from ...errors import DataError
from ...features import item_key
from ...zeroshot import class_weights
from ..calibration import TemperatureScaling, calibration_metrics, reliability_bins, softmax
from . import EvalRequest, TaskResult, _timed, register_task


def zero_shot_logits(request: EvalRequest, data, weights) -> tuple[np.ndarray, np.ndarray]:
    """``(logits (N, C) = logit_scale * cos, labels (N,))`` of the readable images of ``data``."""
    x, y, _ = request.labelled_features(data, data.meta.get("split", request.split))
    if not len(y):
        raise DataError(f"none of the {len(data.items)} images of {data.name} could be read")
    return request.backbone.logit_scale * (x @ weights.T), y


def _same_items(a, b) -> bool:
    if len(a.items) != len(b.items):
        return False
    return all(item_key(p) == item_key(q) for p, q in zip(a.items[:8], b.items[:8]))


def _run(request: EvalRequest, data) -> TaskResult:
    timings: dict = {}
    templates = request.templates_for(data)
    with _timed(timings, "text_features"):
        w = class_weights(request.backbone, list(data.classnames), templates, store=request.store,
                          progress=request.progress)                                   # (C, D)
    val = request.load(split="val", n=request.n)
    if _same_items(val, data):                          # no split folders: fit on one half, measure the other
        order = np.random.default_rng(0).permutation(len(data.items))
        half = len(order) // 2
        if half < 1:
            raise DataError(f"{data.name}: calibration needs at least 2 images")
        val, data = data.subset(np.sort(order[:half])), data.subset(np.sort(order[half:]))
        val_source = "half of the evaluated images (no val split), seed 0"
    else:
        val_source = "val split"
    z_val, y_val = zero_shot_logits(request, val, w)
    z, y = zero_shot_logits(request, data, w)
    with _timed(timings, "metrics"):
        ts = TemperatureScaling().fit(z_val, y_val)
        before, after = softmax(z), ts.predict_proba(z)
        metrics = calibration_metrics(before, y)
        metrics.update({f"{k}_ts": v for k, v in calibration_metrics(after, y).items() if k != "acc1"})
        metrics["temperature"] = ts.temperature_
        val_before, val_after = calibration_metrics(softmax(z_val), y_val), calibration_metrics(
            ts.predict_proba(z_val), y_val)
        metrics.update({"val_ece": val_before["ece"], "val_ece_ts": val_after["ece"]})
    details = {"reliability": reliability_bins(before, y), "reliability_ts": reliability_bins(after, y),
               "val_source": val_source, "n_test": int(len(y)), "n_val": int(len(y_val)), "templates": templates,
               "classnames": list(data.classnames), "logit_scale": float(request.backbone.logit_scale)}
    return TaskResult("calibration", data.name, metrics, details, timings)


def reliability_plot(record: dict) -> bytes:
    """Reliability diagrams of a ``calibration`` record: before and after temperature scaling."""
    from ..report import figure_png, new_figure

    fig = new_figure(8, 3.8)
    d, m = record["cliplab"], record["metrics"]
    for col, (key, title, ece) in enumerate([("reliability", "zero-shot", m.get("ece")),
                                             ("reliability_ts", f"temperature {m.get('temperature', 1):.2f}",
                                              m.get("ece_ts"))]):
        ax = fig.add_subplot(1, 2, col + 1)
        b = d[key]
        edges = np.asarray(b["edges"])
        centers, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
        acc = np.nan_to_num(np.asarray(b["accuracy"], float))
        conf = np.nan_to_num(np.asarray(b["confidence"], float))
        ax.bar(centers, acc, width, color="C0", edgecolor="white", label="accuracy")
        ax.bar(centers, conf - acc, width, bottom=acc, color="C3", alpha=0.35, label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{title}: ECE {100 * ece:.1f}%" if ece is not None else title)
        ax.legend(fontsize=8, loc="upper left")
    return figure_png(fig)


@register_task("calibration", data="classification", run=_run,
               report={"heading": "Calibration",
                       "plot": reliability_plot,
                       "explain": "Reliability diagrams: test images binned by top-1 confidence (15 bins); "
                                  "bar = accuracy in the bin, shaded = gap to the mean confidence, dashed = "
                                  "perfect calibration. Right: after temperature scaling fitted on validation."},
               help="ECE, adaptive ECE, Brier, NLL of zero-shot probabilities, before/after temperature scaling")
def calibration(request: EvalRequest, data) -> TaskResult:
    """Calibration of zero-shot CLIP on a classification dataset (see the module docstring).

    Metrics: ``acc1``, ``ece`` (15 equal-width bins), ``adaptive_ece``, ``brier``, ``nll``,
    the same with ``_ts`` after temperature scaling, ``temperature``, and ``val_ece`` /
    ``val_ece_ts`` on the validation images.  Details: ``reliability`` and
    ``reliability_ts`` (:func:`cliplab.eval.calibration.reliability_bins`).
    """
    return _run(request, data)
