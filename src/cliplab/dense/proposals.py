"""Class-agnostic box proposals for open-vocabulary detection (:func:`cliplab.dense.detect`).

Each proposal method is registered in :data:`PROPOSALS` with a one-line ``help``; a
detector's ``proposals="dense+windows"`` takes the union of the named methods' boxes.

- ``windows``: multi-scale sliding windows.  Window sides are fractions of the image's
  short side (``window_scales``), placed every ``window_stride`` of a side in mmseg's
  ``slide_inference`` layout (:func:`cliplab.dense.segment.window_boxes`: the last row and
  column are moved in to end at the border).
- ``dense``: boxes of connected regions of dense class maps.  A training-free dense
  method (:func:`cliplab.dense.segment`, SCLIP by default) gives per-class probability
  maps; for every class and every threshold of ``dense_thresholds`` the 8-connected
  components of ``p_c >= t`` with at least ``min_area`` pixels become boxes (the class
  is dropped: the region is rescored by crop-and-encode).  With a background class its
  own maps give no boxes.

Boxes are float32 ``(x0, y0, x1, y1)`` in pixels of the original image, ``x1``/``y1``
exclusive (a region's pixel columns are ``x0 .. x1 - 1``), as
:class:`cliplab.data.datasets.DetectionData` stores them; duplicates are removed.

This module imports nothing heavy at import time (the command line reads the registry).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import UsageError
from ..registry import Registry

__all__ = ["PROPOSALS", "ProposalOptions", "parse_proposals", "region_boxes", "propose"]

#: Proposal methods by name (``detect(proposals="dense+windows")``, ``cliplab detect --proposals``).
PROPOSALS: Registry = Registry("proposal method")


@dataclass
class ProposalOptions:
    """Settings of the proposal methods (each reads its own).

    Attributes
    ----------
    window_scales : tuple of float
        ``windows``: window sides as fractions of the image's short side.
    window_stride : float
        ``windows``: step as a fraction of the window side.
    dense_method : str
        ``dense``: the method of :data:`cliplab.dense.DENSE_METHODS`.
    dense_thresholds : tuple of float
        ``dense``: probability thresholds of the class maps.
    dense_options : dict
        ``dense``: other arguments of :func:`cliplab.dense.segment` (``window``, ``stride``...).
    min_area : int
        ``dense``: smallest region in pixels.
    templates, background
        Prompts of the dense class maps (as the detector's).
    """

    window_scales: tuple = (0.125, 0.25, 0.5)
    window_stride: float = 0.5
    dense_method: str = "sclip"
    dense_thresholds: tuple = (0.3, 0.6, 0.9)
    dense_options: dict = field(default_factory=dict)
    min_area: int = 16
    templates: object = "openai-80"
    background: object = None


def parse_proposals(spec: str) -> list[str]:
    """``"dense+windows"`` -> ``["dense", "windows"]``, each checked against :data:`PROPOSALS`.

    Raises
    ------
    UsageError
        An empty or unknown name.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(f"proposals must be names of {', '.join(PROPOSALS.names())} joined by '+'; got {spec!r}")
    names = [s.strip() for s in spec.split("+")]
    for name in names:
        PROPOSALS.get(name)                                   # UsageError naming the choices
    return list(dict.fromkeys(names))


def region_boxes(mask: np.ndarray, min_area: int = 1) -> np.ndarray:
    """Boxes of the 8-connected regions of a bool mask (H, W): float32 (K, 4), ``x1``/``y1`` exclusive."""
    from scipy import ndimage

    lab, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if not n:
        return np.zeros((0, 4), np.float32)
    areas = np.bincount(lab.ravel(), minlength=n + 1)[1:]                  # (K,)
    boxes = [(sx.start, sy.start, sx.stop, sy.stop)
             for (sy, sx), a in zip(ndimage.find_objects(lab), areas) if a >= min_area]
    return np.asarray(boxes, np.float32).reshape(-1, 4)


@PROPOSALS.register("windows", help="multi-scale sliding windows (sides as fractions of the short side)")
def window_proposals(backbone, images: list, classes, opts: ProposalOptions) -> list[np.ndarray]:
    """Sliding windows of every scale over each image (uint8 arrays (H, W, 3)): float32 (P_i, 4) each."""
    from .detect import window_boxes

    out = []
    for img in images:
        h, w = img.shape[:2]
        boxes = []
        for scale in opts.window_scales:
            side = max(1, round(scale * min(h, w)))
            stride = max(1, round(opts.window_stride * side))
            boxes += [(x0, y0, x1, y1) for y0, x0, y1, x1 in window_boxes(h, w, side, stride)]
        out.append(np.unique(np.asarray(boxes, np.float32).reshape(-1, 4), axis=0))
    return out


@PROPOSALS.register("dense", help="connected regions of thresholded class-probability maps of a dense method")
def dense_proposals(backbone, images: list, classes, opts: ProposalOptions) -> list[np.ndarray]:
    """Boxes of thresholded :func:`~cliplab.dense.segment` probability maps: float32 (P_i, 4) each."""
    from .detect import _segment

    res = _segment(backbone, images, classes, method=opts.dense_method, templates=opts.templates,
                  background=opts.background, return_probs=True, progress=False, **opts.dense_options)
    first = 0 if opts.background is None else 1                             # no boxes of the background
    out = []
    for probs in res.probs:                                                 # (C, H, W)
        boxes = [region_boxes(probs[c] >= t, opts.min_area) for c in range(first, len(probs))
                 for t in opts.dense_thresholds]
        out.append(np.unique(np.concatenate(boxes or [np.zeros((0, 4), np.float32)]), axis=0))
    return out


def propose(backbone, images: list, classes, methods: list[str], opts: ProposalOptions) -> list[np.ndarray]:
    """The union of the proposals of ``methods`` for each image: float32 (P_i, 4), no duplicates."""
    per_method = [PROPOSALS.get(m)(backbone, images, classes, opts) for m in methods]
    return [np.unique(np.concatenate(boxes), axis=0) for boxes in zip(*per_method)]
