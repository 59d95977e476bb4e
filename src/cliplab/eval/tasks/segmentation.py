"""Eval task ``zeroshot_segmentation``: dense methods of :mod:`cliplab.dense` scored by mIoU.

Options (``cliplab eval --task zeroshot_segmentation --method sclip --window 64 --stride 32``):
the dense method, sliding windows, the background threshold and the number of overlay
pictures kept in the record.  Metrics as mmsegmentation's ``IoUMetric``
(:func:`cliplab.eval.metrics.mean_iou`).  The report's section (:func:`segmentation_plot`)
shows the per-class IoU and, for the first scenes, image | ground truth | prediction.
"""

from __future__ import annotations

import base64
import io

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
        if number("overlays", int) is not None:
            kwargs["overlays"] = number("overlays", int)
    except ValueError as e:
        raise UsageError(f"zeroshot_segmentation options: {e}") from None
    return zeroshot_segmentation(request.backbone, data, method=o.get("method") or "sclip",
                                 templates=request.templates, progress=request.progress, **kwargs)


#: Side in pixels of each panel of an overlay picture kept in the record.
OVERLAY_SIDE = 96


def overlay_strip(image, truth: np.ndarray, pred: np.ndarray, n_classes: int, ignore_index: int = 255,
                  side: int = OVERLAY_SIDE) -> bytes:
    """PNG bytes of ``image | ground truth | prediction`` (class colours blended on the image), each ``side`` px high.

    Ignored ground-truth pixels are blended with white.  The PNG is paletted (128 colours),
    a few kB for a ShapesWorld scene and under 15 kB for a picture of pure noise.
    """
    from PIL import Image

    from ...data.images import load_image
    from ...dense.visualize import overlay, palette

    img = Image.fromarray(image) if isinstance(image, np.ndarray) else load_image(image)
    colors = np.concatenate([palette(n_classes), [[255, 255, 255]]]).astype(np.uint8)
    truth = np.where(np.asarray(truth) == ignore_index, n_classes, np.clip(truth, 0, n_classes - 1))
    h, w = truth.shape
    size = (max(1, round(side * w / h)), side)
    panels = [img.convert("RGB").resize(size, Image.BILINEAR),
              overlay(img, truth, colors).resize(size, Image.NEAREST),
              overlay(img, np.asarray(pred), colors).resize(size, Image.NEAREST)]
    strip = Image.new("RGB", (3 * size[0] + 4, size[1]), "white")
    for i, p in enumerate(panels):
        strip.paste(p, (i * (size[0] + 2), 0))
    buf = io.BytesIO()
    strip.quantize(colors=128).save(buf, format="PNG", optimize=True)   # paletted: about 3x smaller
    return buf.getvalue()


def segmentation_plot(record: dict) -> bytes:
    """Per-class IoU bars (in the class colours), then image | ground truth | prediction for the scenes kept."""
    from PIL import Image

    from ..report import figure_png, new_figure

    ours = record["cliplab"]
    names = ours.get("classnames") or []
    ious = ours.get("IoU") or []
    strips = [np.asarray(Image.open(io.BytesIO(base64.b64decode(o["png"]))).convert("RGB"))
              for o in ours.get("overlays") or []]
    rows = 1 + len(strips)
    fig = new_figure(max(6.0, 0.45 * len(names) + 2), 2.8 + 1.6 * len(strips))
    grid = fig.add_gridspec(rows, 1, height_ratios=[2.2] + [1.4] * len(strips))
    ax = fig.add_subplot(grid[0])
    vals = [100 * v if v is not None else 0.0 for v in ious]
    from ...dense.visualize import palette

    colors = palette(len(names)) / 255.0                                  # the overlays' class colours
    bars = ax.bar(range(len(names)), vals, color=colors, edgecolor="black", linewidth=0.5)
    ax.bar_label(bars, labels=["–" if v is None else f"{100 * v:.0f}" for v in ious], fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("IoU (%)")
    miou = record["metrics"].get("mIoU")
    ax.set_title(f"{ours.get('method', '')} — mIoU {100 * miou:.1f}" if miou is not None else "per-class IoU")
    for i, (strip, o) in enumerate(zip(strips, ours.get("overlays") or [])):
        a = fig.add_subplot(grid[i + 1])
        a.imshow(strip)
        a.set_axis_off()
        a.set_title(f"scene {o['index']}: image | ground truth | prediction", fontsize=8)
    return figure_png(fig)


@register_task("zeroshot_segmentation", data="segmentation", run=_run,
               options={"method": "dense method of zeroshot_segmentation (default sclip; cliplab segment --help)",
                        "window": "sliding-window side in pixels (default: one resize to the model input)",
                        "stride": "sliding-window stride in pixels (default: half the window)",
                        "prob_thd": "below this top probability a pixel is background (class 0)",
                        "overlays": "scenes drawn as image | truth | prediction in the report (default 4)"},
               report={"heading": "Segmentation", "plot": segmentation_plot,
                       "explain": "Per-class IoU (%) of each segmentation result (– where a class is absent from "
                                  "both the ground truth and the prediction), then the first scenes: the image, "
                                  "its ground truth and the prediction, class colours blended on the image "
                                  "(white: pixels the metric ignores)."},
               help="training-free open-vocabulary segmentation (mIoU as mmsegmentation computes it)")
def zeroshot_segmentation(backbone, data, *, method: str = "sclip", templates=None, window: int | None = None,
                          stride: int | None = None, prob_thd: float = 0.0, batch_size: int = 32,
                          progress=None, overlays: int = 4, **method_options) -> TaskResult:
    """Segment every image of a segmentation dataset with a dense method and score the class maps.

    ``data`` needs ``images`` (or ``items``: paths, PIL images or uint8 arrays), class maps
    ``masks`` (or ``targets``; int arrays (H, W) at each image's size), ``classnames`` (class
    i of the maps is ``classnames[i]``; with ``prob_thd`` class 0 is the background) and
    optionally ``ignore_index`` (default 255) and ``name``.  The method runs through
    :func:`cliplab.dense.segment` with the other arguments.

    Metrics: ``mIoU``, ``aAcc``, ``mAcc`` (:func:`~cliplab.eval.metrics.mean_iou`) and
    ``IoU/<class>`` for each class with a non-zero union (the report's per-class table); details:
    per-class ``IoU`` and ``Acc`` (None where undefined), ``classnames``, ``method``,
    ``window``, ``stride``, ``n``, ``windows`` and ``overlays``: for the first ``overlays``
    scenes (at most 4 are useful in a report) ``{"index", "png"}``, a base64 PNG of
    :func:`overlay_strip` (panels 96 px high, a few kB each).
    """
    from ...dense import segment

    timings: dict = {}
    images, maps, classnames, ignore = _segmentation_fields(data)
    if templates is None:
        templates = getattr(data, "meta", {}).get("templates") or "openai-80"
    if overlays < 0:
        raise UsageError(f"overlays must be >= 0; got {overlays}")
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
               "windows": res.n_windows,
               "overlays": [{"index": i, "png": base64.b64encode(overlay_strip(
                   images[i], maps[i], res.masks[i], len(classnames), ignore)).decode("ascii")}
                   for i in range(min(overlays, len(images)))]}
    return TaskResult("zeroshot_segmentation", getattr(data, "name", "segmentation"), metrics, details, timings)
