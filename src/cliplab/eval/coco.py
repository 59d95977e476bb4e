"""COCO box AP of detections, scored by ``pycocotools`` itself.

- :func:`coco_ground_truth`: a :class:`~cliplab.data.datasets.DetectionData` as a COCO
  instances dict (``images``, ``annotations``, ``categories``);
- :func:`coco_results`: detections as a COCO results list (``image_id``, ``category_id``,
  ``bbox``, ``score``), what ``COCO.loadRes`` reads;
- :func:`coco_box_ap`: ``COCOeval(..., "bbox")`` of the two: AP, AP50, AP75, AP by size,
  AR@1/10/100 by name.

Conventions: image ids are ``1..N`` in dataset order; ``category_id`` is the class index
``+ 1`` (the ids of ShapesWorld's COCO export, where class 0 is the background of the class
maps); boxes ``[x0, y0, x1, y1]`` (``x1``/``y1`` exclusive) become ``bbox = [x0, y0,
x1 - x0, y1 - y0]``; a ground-truth box's ``area`` is its box area.
"""

from __future__ import annotations

import contextlib
import io
from typing import Sequence

import numpy as np

from ..errors import UsageError

__all__ = ["COCO_METRICS", "coco_ground_truth", "coco_results", "coco_box_ap"]

#: Names of ``COCOeval.stats`` (bbox), in order.
COCO_METRICS = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR@1", "AR@10", "AR@100",
                "AR_small", "AR_medium", "AR_large")


def _bbox(box) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


def coco_ground_truth(data, *, sizes: Sequence[tuple[int, int]] | None = None) -> dict:
    """COCO instances dict of a DetectionData.

    Parameters
    ----------
    data : DetectionData
    sizes : sequence of (H, W), optional
        Image sizes (default: read from uint8 array items; other items need it).

    Returns
    -------
    dict
        ``images`` (``id``, ``width``, ``height``), ``annotations`` (``id``, ``image_id``,
        ``category_id``, ``bbox``, ``area``, ``iscrowd``), ``categories`` (``id``, ``name``).
    """
    if sizes is None:
        if not all(isinstance(x, np.ndarray) for x in data.items):
            raise UsageError("coco_ground_truth needs sizes= unless the items are image arrays")
        sizes = [x.shape[:2] for x in data.items]
    images, anns = [], []
    for i, ((h, w), boxes, labels) in enumerate(zip(sizes, data.boxes, data.labels), start=1):
        images.append({"id": i, "width": int(w), "height": int(h)})
        for box, y in zip(boxes, labels):
            bbox = _bbox(box)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(y) + 1, "bbox": bbox,
                         "area": bbox[2] * bbox[3], "iscrowd": 0})
    cats = [{"id": c + 1, "name": str(n)} for c, n in enumerate(data.classnames)]
    return {"images": images, "annotations": anns, "categories": cats}


def coco_results(detections: Sequence, image_ids: Sequence[int] | None = None) -> list[dict]:
    """COCO results list of per-image detections (anything with ``boxes``, ``scores``, ``labels``).

    ``image_ids`` default ``1..N``; ``category_id`` is ``label + 1``; boxes and scores as Python floats.
    """
    ids = range(1, len(detections) + 1) if image_ids is None else image_ids
    return [{"image_id": int(i), "category_id": int(y) + 1, "bbox": _bbox(b), "score": float(s)}
            for i, det in zip(ids, detections) for b, s, y in zip(det.boxes, det.scores, det.labels)]


def coco_box_ap(ground_truth: dict, results: list[dict], *, details: bool = False):
    """COCO box AP of results against ground truth, by ``pycocotools.cocoeval.COCOeval``.

    Parameters
    ----------
    ground_truth : dict
        COCO instances (:func:`coco_ground_truth`).
    results : list of dict
        COCO results (:func:`coco_results`).
    details : bool, default=False
        Also return per-class AP and the precision-recall curve at IoU 0.5.

    Returns
    -------
    metrics : dict of str -> float
        :data:`COCO_METRICS` (``-1`` where undefined, as COCOeval writes it; every value is 0
        when there are no results).
    extra : dict, with ``details=True``
        ``class_ap``: AP of each category in ``ground_truth["categories"]`` order (None
        where it has no ground truth); ``recall`` (101,) and ``precision50`` (101,): COCO's
        interpolated precision at IoU 0.5, all areas, 100 detections, mean over categories.

    Notes
    -----
    COCOeval's defaults: IoU thresholds 0.50:0.05:0.95, 101 recall points, ``maxDets``
    1, 10, 100 per image (give at most 100 detections per image: more are not scored).
    """
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:  # pragma: no cover - a core dependency
        raise UsageError("COCO AP needs pycocotools: pip install pycocotools") from None
    gt = COCO()
    gt.dataset = {k: list(v) for k, v in ground_truth.items()}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        if not results:
            zero = dict.fromkeys(COCO_METRICS, 0.0)
            cats = ground_truth["categories"]
            return (zero, {"class_ap": [0.0] * len(cats), "recall": np.linspace(0, 1, 101).tolist(),
                           "precision50": [0.0] * 101}) if details else zero
        dt = gt.loadRes([dict(r) for r in results])
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    metrics = {k: float(v) for k, v in zip(COCO_METRICS, ev.stats)}
    if not details:
        return metrics
    prec = ev.eval["precision"][:, :, :, 0, -1]                          # (T IoUs, 101 recalls, K cats)
    class_ap = []
    for k in range(prec.shape[2]):
        p = prec[:, :, k]
        class_ap.append(float(p[p > -1].mean()) if (p > -1).any() else None)
    p50 = prec[0]                                                          # (101, K), IoU 0.5
    curve = [float(row[row > -1].mean()) if (row > -1).any() else 0.0 for row in p50]
    return metrics, {"class_ap": class_ap, "recall": [float(r) for r in ev.params.recThrs], "precision50": curve}
