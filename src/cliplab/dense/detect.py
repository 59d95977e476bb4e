"""Training-free open-vocabulary detection: proposals, crop-and-encode scoring, Soft-NMS.

:func:`detect` finds free-text classes in images with nothing but a CLIP Backbone, the
recipe of the CLIP open-vocabulary detectors (ViLD's "crop and encode" baseline, Gu et al.,
"Open-vocabulary Object Detection via Vision and Language Knowledge Distillation", ICLR
2022, arXiv:2104.13921, section 3.2) with Soft-NMS (Bodla et al., "Soft-NMS -- Improving
Object Detection With One Line of Code", ICCV 2017, arXiv:1704.04503):

1. **Proposals** (class-agnostic; :mod:`cliplab.dense.proposals`): the union of the named
   methods' boxes, by default connected regions of a dense method's class-probability maps
   and multi-scale sliding windows.
2. **Region scores.**  Each proposal is cropped as a square around its centre with side
   ``context`` x its longer side (ViLD enlarges crops 1.5x), resized to the model input
   (``torchvision.ops.roi_align``: bilinear, averaging ``ceil(side / input)`` samples per
   output pixel, so large crops are low-pass filtered; outside the image the mean colour),
   by default with the pixels outside the box set to the mean colour (``blank=True``), and
   encoded; the crops of several images share a batch.  Class queries are prompt
   ensembles (:func:`cliplab.dense.segment.class_queries`, synonyms allowed);
   ``p = softmax(logit_scale * cos(crop, queries))``, max-pooled over each class's
   queries.  A class's score of a box is its ``p``; background queries (``background=``)
   take part in the softmax and give no detections.
3. **Suppression** per class (:func:`suppress`): ``"soft-linear"`` / ``"soft-gaussian"``
   (:func:`cliplab.ops.soft_nms`, the paper's eqs. 2 and 3), ``"hard"``
   (``torchvision.ops.batched_nms``) or ``"none"``; then the ``max_dets`` best
   detections of the image (COCO scores 100).

Defaults: ``iou_thr=0.3`` (N_t) and ``sigma=0.5`` as the Soft-NMS reference; score threshold
0.05, as Detectron's test threshold.  Deviations from ViLD's baseline: proposals come from
windows and dense maps, not a trained RPN; no objectness term (``p`` alone ranks boxes);
crops are blanked outside the box unless ``blank=False`` (in crowded ShapesWorld scenes the
neighbours inside a context crop halve the accuracy of shapes-tiny on ground-truth boxes:
33 % with the context kept, 65 % blanked, both at ``context=3``, in a side check on 20
``shapes:det`` test scenes; see ``docs/anomaly_detection.md``).

Examples
--------
>>> import cliplab
>>> from cliplab.dense.detect import detect
>>> bb = cliplab.load("shapes-tiny")                                        # doctest: +SKIP
>>> dets = detect(bb, ["scene.png"], ["circle", "square"], nms="soft-gaussian")  # doctest: +SKIP
>>> dets[0].boxes.shape, dets[0].scores.shape, dets[0].labels.shape         # doctest: +SKIP
((100, 4), (100,), (100,))
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .._progress import progress_bar
from ..errors import UsageError
from ..validation import check_backbone, check_choice, check_number, check_positive_int
from .proposals import ProposalOptions, parse_proposals, propose
from .segment import _mean_std, _to_pil, class_queries, window_boxes
from .segment import segment as _segment

# Importing a submodule binds its name in the package to the module; keep the package's
# ``segment`` the function, as ``from cliplab.dense import segment`` documents it.
sys.modules[__package__].segment = _segment

logger = logging.getLogger(__name__)

__all__ = ["Detections", "NMS_METHODS", "detect", "crop_regions", "prepare_image", "score_regions", "suppress"]

#: Suppression rules of :func:`suppress`: Soft-NMS (``cliplab.ops.soft_nms`` method), hard NMS, none.
NMS_METHODS = {"soft-linear": "linear", "soft-gaussian": "gaussian", "hard": "hard", "none": None}


@dataclass
class Detections:
    """The detections of one image, best first.

    Attributes
    ----------
    boxes : ndarray (K, 4) float32
        ``x0, y0, x1, y1`` in pixels of the image, ``x1``/``y1`` exclusive (as
        :class:`cliplab.data.datasets.DetectionData`).
    scores : ndarray (K,) float32
        After suppression (Soft-NMS lowers the scores of overlapping boxes).
    labels : ndarray (K,) int64
        Index into ``classes``.
    classes : list of str
        The class names (first synonym of each class; no background).
    n_proposals : int
        Proposals scored in this image.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    classes: list = field(default_factory=list)
    n_proposals: int = 0

    def __len__(self) -> int:
        return len(self.scores)


def crop_regions(image: torch.Tensor, boxes: np.ndarray, size: int, context: float = 1.5,
                 blank: bool = True) -> torch.Tensor:
    """Square crops around boxes, resized to ``size``: (P, 3, size, size).

    Parameters
    ----------
    image : Tensor (3, H, W)
        Normalised image (zero = the normalisation mean).
    boxes : ndarray (P, 4)
        ``x0, y0, x1, y1`` in pixels.
    size : int
        Output side (the model input).
    context : float, default=1.5
        Crop side = ``context`` x the box's longer side, centred on the box.
    blank : bool, default=True
        Show only the box: crop pixels outside it get the mean colour (zero), so that
        neighbouring objects do not enter the crop; ``False`` keeps the surrounding image.

    Notes
    -----
    ``torchvision.ops.roi_align`` with ``aligned=True`` and adaptive sampling
    (``ceil(crop side / size)`` bilinear samples per output pixel and axis, averaged);
    samples outside the image are zero (the mean colour).
    """
    from torchvision.ops import roi_align

    b = torch.as_tensor(np.asarray(boxes, np.float32).reshape(-1, 4))
    centre = (b[:, :2] + b[:, 2:]) / 2                                          # (P, 2)
    half = (b[:, 2:] - b[:, :2]).amax(dim=1, keepdim=True).clamp_min(1) * context / 2   # (P, 1)
    rois = torch.cat([torch.zeros(len(b), 1), centre - half, centre + half], dim=1)     # (P, 5)
    crops = roi_align(image[None].float(), rois, output_size=(size, size), spatial_scale=1.0,
                      sampling_ratio=-1, aligned=True)                         # (P, 3, size, size)
    if blank:
        lo = (b[:, :2] - (centre - half)) / (2 * half) * size                   # (P, 2) box in crop pixels
        hi = (b[:, 2:] - (centre - half)) / (2 * half) * size
        mid = torch.arange(size) + 0.5                                          # pixel centres
        inside_x = (mid >= lo[:, :1]) & (mid < hi[:, :1])                       # (P, size)
        inside_y = (mid >= lo[:, 1:]) & (mid < hi[:, 1:])
        crops = crops * (inside_y[:, :, None] & inside_x[:, None, :])[:, None]  # (P, 3, size, size)
    return crops


def score_regions(backbone, images: Sequence[torch.Tensor], boxes: Sequence[np.ndarray], queries: np.ndarray,
                  owner: np.ndarray, *, context: float = 1.5, blank: bool = True,
                  logit_scale: float | None = None,
                  batch_size: int = 256, bar=None) -> list[np.ndarray]:
    """Class probabilities of every box by crop-and-encode: float32 (P_i, C) per image.

    Parameters
    ----------
    backbone : Backbone
    images : sequence of Tensor (3, H_i, W_i)
        Normalised images.
    boxes : sequence of ndarray (P_i, 4)
    queries : ndarray (Q, D)
        L2-normalised text queries (:func:`~cliplab.dense.segment.class_queries`).
    owner : ndarray (Q,) int
        Class of each query; C = ``owner.max() + 1``.
    context, blank
        As :func:`crop_regions`.
    logit_scale : float, optional
        Default: the model's.
    batch_size : int
        Crops per forward pass; crops of consecutive images share a batch.
    bar : tqdm, optional
        Updated with the number of crops encoded.

    Returns
    -------
    list of ndarray (P_i, C) float32
        ``softmax(logit_scale * cos)`` over the queries, max over each class's queries.
    """
    scale = float(backbone.logit_scale if logit_scale is None else logit_scale)
    q = torch.from_numpy(np.asarray(queries, np.float32))                       # (Q, D)
    n_classes = int(owner.max()) + 1
    jobs = [(i, s) for i, b in enumerate(boxes) for s in range(0, len(b), batch_size)]
    probs: list[list] = [[] for _ in boxes]
    pending: list = []                                                          # (image, crops)

    def flush():
        crops = torch.cat([c for _, c in pending])                              # (B, 3, S, S)
        feats = torch.from_numpy(backbone.encode_images(crops, batch_size=batch_size, progress=False,
                                                        workers=0).features)   # (B, D)
        p = torch.softmax(scale * feats @ q.T, dim=1)                           # (B, Q)
        per_class = torch.full((len(p), n_classes), -1.0).scatter_reduce(
            1, torch.from_numpy(np.asarray(owner, np.int64)).expand(len(p), -1), p, reduce="amax")  # (B, C)
        start = 0
        for i, c in pending:
            probs[i].append(per_class[start:start + len(c)].numpy())
            start += len(c)
        if bar is not None:
            bar.update(len(crops))
        pending.clear()

    n_pending = 0
    for i, s in jobs:
        crops = crop_regions(images[i], boxes[i][s:s + batch_size], backbone.image_size, context, blank)
        pending.append((i, crops))
        n_pending += len(crops)
        if n_pending >= batch_size:
            flush()
            n_pending = 0
    if pending:
        flush()
    return [np.concatenate(p).astype(np.float32) if p else np.zeros((0, n_classes), np.float32) for p in probs]


def suppress(boxes: np.ndarray, scores: np.ndarray, *, nms: str = "soft-linear", score_thr: float = 0.05,
             iou_thr: float = 0.3, sigma: float = 0.5, max_dets: int = 100) -> tuple[np.ndarray, ...]:
    """Per-class suppression of scored boxes, then the ``max_dets`` best.

    Parameters
    ----------
    boxes : ndarray (P, 4)
    scores : ndarray (P, C)
        Score of every box for every class.
    nms : {"soft-linear", "soft-gaussian", "hard", "none"}
        Soft-NMS rescoring (:func:`cliplab.ops.soft_nms`, linear with N_t = ``iou_thr`` or
        Gaussian with ``sigma``), hard NMS at ``iou_thr`` (``torchvision.ops.batched_nms``),
        or no suppression.
    score_thr : float
        Box-class pairs scoring below it are dropped, before and after Soft-NMS.
    iou_thr, sigma : float
    max_dets : int

    Returns
    -------
    boxes (K, 4) float32, scores (K,) float32, labels (K,) int64
        Sorted by decreasing score (ties: class, then proposal order).
    """
    check_choice("nms", nms, tuple(NMS_METHODS))
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    scores = np.asarray(scores, np.float32).reshape(len(boxes), -1)
    idx, cls = np.nonzero(scores >= score_thr)                                  # candidate (box, class) pairs
    order = np.lexsort((idx, cls))                                              # class, then box
    idx, cls = idx[order], cls[order]
    s = scores[idx, cls]
    if nms == "hard":
        from torchvision.ops import batched_nms

        keep = batched_nms(torch.from_numpy(boxes[idx]), torch.from_numpy(s), torch.from_numpy(cls),
                           iou_thr).numpy()
        idx, cls, s = idx[keep], cls[keep], s[keep]
    elif nms != "none":
        from ..ops import soft_nms

        kept_i, kept_c, kept_s = [], [], []
        for c in np.unique(cls):
            sel = np.flatnonzero(cls == c)
            keep, new = soft_nms(boxes[idx[sel]], s[sel], method=NMS_METHODS[nms], sigma=sigma,
                                 iou_threshold=iou_thr, score_threshold=score_thr)
            kept_i.append(idx[sel][keep])
            kept_c.append(np.full(len(keep), c))
            kept_s.append(new.astype(np.float32))
        idx, cls, s = (np.concatenate(a) if a else np.zeros(0, t) for a, t in
                       ((kept_i, np.int64), (kept_c, np.int64), (kept_s, np.float32)))
        ok = s >= score_thr
        idx, cls, s = idx[ok], cls[ok], s[ok]
    best = np.lexsort((idx, cls, -s))[:max_dets]
    return boxes[idx[best]].reshape(-1, 4), s[best].astype(np.float32), cls[best].astype(np.int64)


def prepare_image(backbone, item) -> tuple[np.ndarray, torch.Tensor]:
    """An image (path, PIL image or uint8 array) as uint8 (H, W, 3) and normalised float32 (3, H, W).

    Normalised with the Backbone's mean and std, at the image's own size (zero = the mean colour).

    Raises
    ------
    BadImage
        An image that cannot be read.
    """
    mean, std = _mean_std(backbone)
    arr = np.array(_to_pil(item), dtype=np.uint8)                                # a writable copy
    t = torch.from_numpy(arr).permute(2, 0, 1).float().div_(255)
    return arr, (t - mean) / std


def _items(images) -> list:
    if isinstance(images, (str, os.PathLike)) or (isinstance(images, np.ndarray) and images.ndim in (2, 3)):
        return [images]
    if hasattr(images, "size") and hasattr(images, "convert"):                  # one PIL image
        return [images]
    return list(images)


@torch.inference_mode()
def detect(backbone, images, classes: Sequence, *, method: str = "dense+windows", nms: str = "soft-linear",
           score_thr: float = 0.05, iou_thr: float = 0.3, sigma: float = 0.5, max_dets: int = 100,
           window_scales: Sequence[float] = (0.125, 0.25, 0.5), window_stride: float = 0.5,
           dense_method: str = "sclip", dense_thresholds: Sequence[float] = (0.3, 0.6, 0.9),
           min_area: int = 16, context: float = 1.5, blank: bool = True, background=None,
           templates="openai-80",
           logit_scale: float | None = None, batch_size: int = 256, image_batch: int = 16,
           progress: bool | None = None, **dense_options) -> list[Detections]:
    """Detect free-text classes in images: proposals, crop-and-encode scores, (Soft-)NMS.

    Parameters
    ----------
    backbone : Backbone
        Any image tower for ``windows`` proposals; a ViT for ``dense``.
    images : path, PIL image, uint8 array (H, W, 3), or a sequence of them
    classes : sequence of str or of sequences of str (C,), or ndarray (C, D)
        Class names; a class may be a list of synonyms (its score is the max over them).
        An array gives the class embeddings themselves; the classes are then named
        ``"0"``, ``"1"``...
    method : str, default="dense+windows"
        Proposal methods of :data:`cliplab.dense.proposals.PROPOSALS` joined by ``+``.
    nms : {"soft-linear", "soft-gaussian", "hard", "none"}, default="soft-linear"
        Suppression (:func:`suppress`).
    score_thr : float in [0, 1], default=0.05
    iou_thr : float in [0, 1], default=0.3
        N_t of linear Soft-NMS and of hard NMS.
    sigma : float > 0, default=0.5
        Gaussian Soft-NMS: ``s * exp(-IoU**2 / sigma)``.
    max_dets : int, default=100
        Detections kept per image.
    window_scales, window_stride : floats
        ``windows`` proposals: sides as fractions of the short side; step as a fraction of the side.
    dense_method, dense_thresholds, min_area
        ``dense`` proposals: method of :data:`cliplab.dense.DENSE_METHODS`, probability
        thresholds, smallest region in pixels; ``dense_options`` go to :func:`~cliplab.dense.segment`.
    context : float >= 1, default=1.5
        Crop side / the box's longer side.
    blank : bool, default=True
        Crops show only the box, on the mean colour (:func:`crop_regions`).
    background : str or sequence of str, optional
        Background queries: compete in the softmax, never detected.
    templates : template spec, default="openai-80"
    logit_scale : float, optional
        Default: the model's.
    batch_size : int, default=256
        Crops per forward pass.
    image_batch : int, default=16
        Images decoded, proposed and scored together (bounds memory).
    progress : bool, optional

    Returns
    -------
    list of Detections
        One per image, in input order.

    Raises
    ------
    UsageError
        Bad classes (empty, duplicate), options or proposal names.
    BadImage
        An image that cannot be read.
    """
    check_backbone("backbone", backbone)
    methods = parse_proposals(method)
    check_choice("nms", nms, tuple(NMS_METHODS))
    score_thr = check_number("score_thr", score_thr, minimum=0, maximum=1)
    iou_thr = check_number("iou_thr", iou_thr, minimum=0, maximum=1)
    sigma = check_number("sigma", sigma, minimum=0, strict_minimum=True)
    max_dets = check_positive_int("max_dets", max_dets)
    context = check_number("context", context, minimum=1)
    batch_size = check_positive_int("batch_size", batch_size)
    image_batch = check_positive_int("image_batch", image_batch)
    window_scales = tuple(check_number("window_scales", s, minimum=0, maximum=1, strict_minimum=True)
                          for s in window_scales)
    window_stride = check_number("window_stride", window_stride, minimum=0, maximum=1, strict_minimum=True)
    dense_thresholds = tuple(check_number("dense_thresholds", t, minimum=0, maximum=1) for t in dense_thresholds)
    if "windows" in methods and not window_scales:
        raise UsageError("windows proposals need at least one window scale")
    if isinstance(classes, np.ndarray):
        if classes.ndim != 2 or classes.shape[1] != backbone.embed_dim or background is not None:
            raise UsageError(f"class embeddings must be (C, {backbone.embed_dim}) and come without background=; "
                             f"got {classes.shape}")
        queries = classes / np.linalg.norm(classes, axis=1, keepdims=True)     # (C, D)
        names, owner = [str(i) for i in range(len(classes))], np.arange(len(classes))
    elif isinstance(classes, str):
        raise UsageError("classes must be a list of names (or of lists of synonyms), not one string")
    else:
        classes = list(classes)
        queries_of = [[background] if isinstance(background, str) else list(background), *classes] \
            if background is not None else classes
        names, queries, owner = class_queries(backbone, queries_of, templates)
    first = 0 if background is None else 1
    names = names[first:]
    opts = ProposalOptions(window_scales, window_stride, dense_method, dense_thresholds, dict(dense_options),
                           check_positive_int("min_area", min_area), templates, background)
    items = _items(images)
    out: list[Detections] = []
    timings = {"proposals": 0.0, "scores": 0.0, "nms": 0.0}
    with progress_bar(total=len(items), progress=progress, desc="detect", unit="img") as bar:
        for g in range(0, len(items), image_batch):
            decoded = [prepare_image(backbone, it) for it in items[g:g + image_batch]]
            t0 = time.perf_counter()
            boxes = propose(backbone, [a for a, _ in decoded], classes, methods, opts)
            t1 = time.perf_counter()
            probs = score_regions(backbone, [t for _, t in decoded], boxes, queries, owner, context=context,
                                  blank=bool(blank), logit_scale=logit_scale, batch_size=batch_size)
            t2 = time.perf_counter()
            for b, p in zip(boxes, probs):
                kb, ks, kl = suppress(b, p[:, first:], nms=nms, score_thr=score_thr, iou_thr=iou_thr,
                                      sigma=sigma, max_dets=max_dets)
                out.append(Detections(kb, ks, kl, list(names), len(b)))
            timings["proposals"] += t1 - t0
            timings["scores"] += t2 - t1
            timings["nms"] += time.perf_counter() - t2
            bar.update(len(decoded))
    logger.debug("detect: %d images, %s", len(items), {k: round(v, 3) for k, v in timings.items()})
    return out
