"""Eval task ``zeroshot_segmentation``: dense methods of :mod:`cliplab.dense` scored by mIoU.

Options (``cliplab eval --task zeroshot_segmentation --method sclip --window 64 --stride 32``):
the dense method, sliding windows and the background threshold.  Metrics as
mmsegmentation's ``IoUMetric`` (:func:`cliplab.eval.metrics.mean_iou`).
"""

from __future__ import annotations

import numpy as np

from ...errors import DataError, UsageError
from ..metrics import mean_iou
from . import EvalRequest, TaskResult, _timed, register_task


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


def _run(request: EvalRequest, data) -> TaskResult:
    o = request.options
    number = lambda key, cast: None if o.get(key) in (None, "") else cast(o[key])  # noqa: E731
    try:
        kwargs = {"window": number("window", int), "stride": number("stride", int),
                  "prob_thd": number("prob_thd", float) or 0.0}
    except ValueError as e:
        raise UsageError(f"zeroshot_segmentation options: {e}") from None
    return zeroshot_segmentation(request.backbone, data, method=o.get("method") or "sclip",
                                 templates=request.templates, progress=request.progress, **kwargs)


@register_task("zeroshot_segmentation", data="segmentation", run=_run,
               options={"method": "dense method of zeroshot_segmentation (default sclip; cliplab segment --help)",
                        "window": "sliding-window side in pixels (default: one resize to the model input)",
                        "stride": "sliding-window stride in pixels (default: half the window)",
                        "prob_thd": "below this top probability a pixel is background (class 0)"},
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
    from ...dense import segment

    timings: dict = {}
    images, maps, classnames, ignore = _segmentation_fields(data)
    if templates is None:
        templates = data.meta.get("templates") or "openai-80"
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
