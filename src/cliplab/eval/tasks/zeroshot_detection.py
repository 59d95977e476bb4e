"""Eval task ``zeroshot_detection``: training-free open-vocabulary detection scored by COCO box AP.

Options (``cliplab eval --task zeroshot_detection --dataset shapes:det --nms soft-linear``):
the proposal methods, the suppression rule and its thresholds; everything else as
:func:`cliplab.dense.detect`.  Metrics: ``COCOeval`` of ``pycocotools`` on the boxes
(:func:`cliplab.eval.coco.coco_box_ap`): ``AP`` (IoU 0.50:0.95), ``AP50``, ``AP75``, AP by
object size, ``AR@1/10/100`` and ``AP/<class>``.
"""

from __future__ import annotations

import numpy as np

from ...errors import DataError, UsageError
from . import EvalRequest, TaskResult, _timed, register_task

#: Options of the task and the :func:`cliplab.dense.detect` argument each sets, with its type.
_OPTIONS = {"proposals": ("method", str), "nms": ("nms", str), "iou_thr": ("iou_thr", float),
            "sigma": ("sigma", float), "score_thr": ("score_thr", float), "max_dets": ("max_dets", int),
            "context": ("context", float)}


def _run(request: EvalRequest, data) -> TaskResult:
    kwargs = {}
    for key, (arg, cast) in _OPTIONS.items():
        value = request.options.get(key)
        if value in (None, ""):
            continue
        try:
            kwargs[arg] = cast(value)
        except ValueError:
            raise UsageError(f"zeroshot_detection: --{key.replace('_', '-')} takes a {cast.__name__}, "
                             f"got {value!r}") from None
    return zeroshot_detection(request.backbone, data, templates=request.templates, progress=request.progress,
                              **kwargs)


def pr_plot(record: dict) -> bytes:
    """Precision-recall curve at IoU 0.5 (mean over classes), the report's figure of one record."""
    from ..report import figure_png, model_label, new_figure

    d = record["cliplab"]
    fig = new_figure(5.0, 4.0)
    ax = fig.add_subplot()
    ax.plot(d["recall"], d["precision50"], color="tab:blue")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision (IoU 0.5)")
    m = record["metrics"]
    ax.set_title(f"{model_label(record)} — {record['dataset']}, {d['nms']}\n"
                 f"AP {100 * m['AP']:.1f}, AP50 {100 * m['AP50']:.1f}", fontsize=9)
    return figure_png(fig)


@register_task("zeroshot_detection", data="detection", run=_run,
               options={"proposals": "proposal methods joined by + (dense, windows; default dense+windows)",
                        "nms": "suppression: soft-linear (default), soft-gaussian, hard or none",
                        "iou_thr": "IoU threshold N_t of linear Soft-NMS and hard NMS (default 0.3)",
                        "sigma": "Gaussian Soft-NMS width: s * exp(-IoU^2 / sigma) (default 0.5)",
                        "score_thr": "detections scoring below this are dropped (default 0.05)",
                        "max_dets": "detections kept per image (default 100; COCOeval scores at most 100)",
                        "context": "crop side / the proposal's longer side (default 1.5)"},
               report={"heading": "Open-vocabulary detection", "plot": pr_plot,
                       "explain": "Interpolated precision against recall at IoU 0.5, mean over the classes "
                                  "(COCOeval, up to max_dets detections per image); the area under it is AP50."},
               help="training-free open-vocabulary detection: proposals, crop-and-encode, Soft-NMS (COCO AP)")
def zeroshot_detection(backbone, data, *, method: str = "dense+windows", nms: str = "soft-linear", templates=None,
                       progress=None, **detect_options) -> TaskResult:
    """Detect the classes of a DetectionData in its images and score the boxes by COCO AP.

    ``data`` needs ``items`` (paths, PIL images or uint8 arrays), ``boxes`` and ``labels``
    per image and ``classnames`` (the text queries).  The boxes come from
    :func:`cliplab.dense.detect` with ``method``, ``nms`` and ``detect_options``.

    Metrics: :data:`cliplab.eval.coco.COCO_METRICS` and ``AP/<class>`` for each class with
    ground truth; details: ``class_ap``, ``recall`` / ``precision50`` (the PR curve at IoU 0.5),
    ``classnames``, ``proposals``, ``nms``, the options given, ``n``, ``proposals_per_image``.
    """
    from ...data.images import load_image
    from ...dense.detect import detect
    from ..coco import coco_box_ap, coco_ground_truth, coco_results

    timings: dict = {}
    if not len(data.items):
        raise DataError(f"{data.name} has no images")
    if templates is None:
        templates = data.meta.get("templates") or "openai-80"
    classnames = list(data.classnames)
    with _timed(timings, "detect"):
        dets = detect(backbone, data.items, classnames, method=method, nms=nms, templates=templates,
                      progress=progress, **detect_options)
    with _timed(timings, "metrics"):
        sizes = [x.shape[:2] if isinstance(x, np.ndarray) else load_image(x).size[::-1] for x in data.items]
        metrics, extra = coco_box_ap(coco_ground_truth(data, sizes=sizes), coco_results(dets), details=True)
    metrics.update({f"AP/{c}": ap for c, ap in zip(classnames, extra["class_ap"]) if ap is not None})
    details = {**extra, "classnames": classnames, "proposals": method, "nms": nms,
               **{k: v for k, v in detect_options.items()}, "n": len(data.items),
               "proposals_per_image": float(sum(d.n_proposals for d in dets) / len(dets))}
    return TaskResult("zeroshot_detection", getattr(data, "name", "detection"), metrics, details, timings)
