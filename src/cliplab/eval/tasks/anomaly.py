"""Eval task ``anomaly``: anomaly detection methods of :mod:`cliplab.dense.anomaly` on anomaly datasets.

``cliplab eval --task anomaly --dataset shapes:inspection --method winclip`` or, on a real
MVTec AD / VisA folder in MVTec layout, ``--dataset mvtec_ad/`` (read unchanged by
:func:`cliplab.data.datasets.anomaly_from_mvtec`).  Per category it calls
:func:`cliplab.eval.anomaly.evaluate_categories`; the metrics are the mean over categories,
as the papers report them (image AUROC / AP / F1-max; pixel AUROC / AUPRO with FPR <= 0.3 /
F1-max), plus ``<metric>/<category>`` per category.

Few-shot methods (``winclip+``) take their normal references from the train split, one run
per k of ``--shots`` (metrics ``<metric>@<k>shot``, references drawn with the first of
``--seeds``); zero-shot methods ignore ``--shots``.  AnomalyCLIP needs ``--prompts PATH``.
"""

from __future__ import annotations

import numpy as np

from ...errors import UsageError
from . import EvalRequest, TaskResult, _timed, register_task

_MAIN = ("image_auroc", "image_ap", "pixel_auroc", "pixel_aupro")


def _train_split(request: EvalRequest, n_categories: int, k: int):
    """The normal training images: ``k`` per category of a ShapesWorld task, all of a folder."""
    n = k * n_categories if str(request.dataset).startswith("shapes:") else None
    return request.load(split="train", n=n)


def _run(request: EvalRequest, data) -> TaskResult:
    from ...dense.anomaly import ANOMALY_METHODS

    o = request.options
    method = o.get("method") or "winclip"
    if method not in ANOMALY_METHODS:
        raise UsageError(f"unknown anomaly method {method!r}; choose from {', '.join(ANOMALY_METHODS.names())}")
    if o.get("prompts") and method != "anomalyclip":
        raise UsageError("--prompts is an option of --method anomalyclip")
    method_options = {"prompts": o["prompts"]} if o.get("prompts") else {}
    few_shot = ANOMALY_METHODS.get(method).needs_references
    return anomaly(request.backbone, data, method=method, shots=list(request.shots) if few_shot else [0],
                   seed=request.seeds[0] if request.seeds else 0, method_options=method_options,
                   train=(lambda k: _train_split(request, len(set(data.categories)), k)) if few_shot else None,
                   progress=request.progress)


def anomaly_plot(record: dict) -> bytes:
    """Per-category image and pixel AUROC of an ``anomaly`` record (bars), the mean dashed."""
    from ..report import figure_png, new_figure

    per = record["cliplab"]["per_category"]
    key = next(iter(per))
    cats = [c for c in per[key] if c != "mean"]
    fig = new_figure(max(5, 0.7 * len(cats) + 2), 3.6)
    ax = fig.add_subplot()
    x = np.arange(len(cats))
    for j, (metric, label) in enumerate([("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC")]):
        vals = [per[key][c].get(metric, np.nan) for c in cats]
        ax.bar(x + (j - 0.5) * 0.38, vals, 0.38, label=label, color=f"C{j}")
        ax.axhline(per[key]["mean"].get(metric, np.nan), color=f"C{j}", linestyle="--", linewidth=1)
    ax.axhline(0.5, color="k", linewidth=0.8)
    ax.set_xticks(x, cats, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title(f"{record['cliplab'].get('method', '')} {key}", fontsize=9)
    ax.legend(fontsize=8)
    return figure_png(fig)


@register_task("anomaly", data="anomaly", run=_run,
               options={"method": "method of the task (anomaly: default winclip, cliplab anomaly --help lists them; "
                                  "zeroshot_segmentation: default sclip, cliplab segment --help)",
                        "prompts": "learned AnomalyCLIP prompts (.safetensors) for --method anomalyclip"},
               report={"heading": "Anomaly detection",
                       "plot": anomaly_plot,
                       "explain": "Per category: image AUROC (is the image defective?) and pixel AUROC (which "
                                  "pixels are defective?); dashed = mean over categories, black = chance."},
               help="zero-/few-shot anomaly detection: image AUROC/AP, pixel AUROC, AUPRO per category and mean")
def anomaly(backbone, data, *, method: str = "winclip", shots=(0,), seed: int = 0, method_options=None,
            train=None, batch_size: int = 32, progress=None) -> TaskResult:
    """Evaluate an anomaly method on an :class:`~cliplab.data.datasets.AnomalyData`, category by category.

    Parameters
    ----------
    backbone : Backbone
    data : AnomalyData
        Test images with labels, masks and categories.
    method : str
        A name of :data:`cliplab.dense.anomaly.ANOMALY_METHODS`.
    shots : sequence of int
        ``[0]`` for a zero-shot method; the k values of a few-shot one.
    seed : int
        Draws the references.
    method_options : dict, optional
        Further arguments of the method (``prompts``).
    train : callable, optional
        ``train(k) -> AnomalyData`` of normal images with at least k per category (few-shot).

    Returns
    -------
    TaskResult
        Metrics: the mean over categories of each metric (``@<k>shot`` suffixed for few-shot
        methods) and ``<metric>/<category>``; details: ``per_category`` (``{"0-shot" or
        "<k>-shot": {category: metrics, "mean": ...}}``), ``method``, ``shots``, ``n``.
    """
    from ..anomaly import categories_of, evaluate_categories

    timings: dict = {}
    metrics, per = {}, {}
    for k in shots:
        refs = train(k) if k else None
        cats = categories_of(data, refs)
        with _timed(timings, "anomaly"):
            res = evaluate_categories(backbone, cats, method=method, shots=k, seed=seed, batch_size=batch_size,
                                      method_options=method_options, progress=progress)
        suffix = f"@{k}shot" if k else ""
        per[f"{k}-shot"] = res
        metrics.update({f"{m}{suffix}": v for m, v in res["mean"].items()})
        for cat in (c for c in res if c != "mean"):
            metrics.update({f"{m}{suffix}/{cat}": res[cat][m] for m in _MAIN if m in res[cat]})
    details = {"per_category": per, "method": method, "shots": list(shots), "n": len(data),
               "categories": sorted(set(data.categories))}
    return TaskResult("anomaly", getattr(data, "name", "anomaly"), metrics, details, timings)
