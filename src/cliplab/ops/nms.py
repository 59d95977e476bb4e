"""Soft-NMS: rescoring overlapping detections instead of deleting them.

Bodla, Singh, Chellappa and Davis, "Soft-NMS -- Improving Object Detection With One Line of
Code", ICCV 2017, arXiv:1704.04503.  Reference code: bharatsingh430/soft-nms,
``lib/nms/cpu_nms.pyx::cpu_soft_nms`` (commit b8e69bd).

Algorithm 1 of the paper, as the reference runs it.  While boxes remain:

1. move the box M with the highest current score to the front (it is kept, in this order);
2. for every remaining box b_i with a positive overlap with M, o_i = IoU(M, b_i):

   - linear (eq. 2):   s_i <- s_i (1 - o_i)   if o_i > N_t, else s_i;
   - Gaussian (eq. 3): s_i <- s_i exp(-o_i^2 / sigma);
   - hard (eq. 1, the "original NMS" of the reference): s_i <- 0 if o_i > N_t;

3. drop every rescored box whose score fell below ``score_threshold``.

Defaults are the reference's: ``sigma=0.5``, ``N_t=0.3``, threshold 0.001, linear.  Notes on
conventions (mmcv ``soft_nms`` has the same): the Gaussian divides by sigma, not by 2 sigma
(TensorFlow's ``soft_nms_sigma`` does); the reference measures widths as ``x2 - x1 + 1``
(``offset=1`` here), torchvision and mmcv's default as ``x2 - x1`` (``offset=0``, the default
here); the threshold only drops boxes that were rescored (a box that overlaps nothing keeps
its score, however small), and among equal scores the reference picks the first in its
working array, whose order its swap-with-last deletions permute.  :func:`soft_nms` reproduces
all of these, so its output equals the reference's element for element.

:func:`soft_nms` is vectorised over the remaining boxes (one NumPy pass per kept box);
:func:`soft_nms_loop` is the one-pair-at-a-time loop of the reference written in Python, kept
as the oracle for tests and ``benchmarks/soft_nms.py``.
"""

from __future__ import annotations

import math

import numpy as np

from ..validation import check_choice, check_number

__all__ = ["soft_nms", "soft_nms_loop", "METHODS"]

#: Rescoring rules, with the reference's method codes (``cpu_soft_nms(..., method=)``).
METHODS = {"hard": 0, "linear": 1, "gaussian": 2}


def _check(boxes, scores, method, sigma, iou_threshold, score_threshold, offset):
    torch_in = type(boxes).__module__.startswith("torch")
    b = boxes.detach().cpu().numpy() if torch_in else np.asarray(boxes)
    s = scores.detach().cpu().numpy() if hasattr(scores, "detach") else np.asarray(scores)
    if b.size == 0:
        b = b.reshape(0, 4)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must be an (N, 4) array of x1, y1, x2, y2; got shape {b.shape}")
    if s.shape != (len(b),):
        raise ValueError(f"scores must be an (N,) array with N = {len(b)} boxes; got shape {s.shape}")
    dtype = np.result_type(b.dtype, s.dtype, np.float32)
    if dtype not in (np.float32, np.float64):
        dtype = np.dtype(np.float64)
    b, s = b.astype(dtype), s.astype(dtype)
    if not (np.isfinite(b).all() and np.isfinite(s).all()):
        raise ValueError("boxes and scores must be finite")
    check_choice("method", method, tuple(METHODS))
    check_number("sigma", sigma, minimum=0, strict_minimum=True)
    check_number("iou_threshold", iou_threshold, minimum=0, maximum=1)
    check_number("score_threshold", score_threshold, minimum=0)
    check_choice("offset", offset, (0, 1))
    return b, s, torch_in


def soft_nms(boxes, scores, *, method: str = "linear", sigma: float = 0.5, iou_threshold: float = 0.3,
             score_threshold: float = 0.001, offset: int = 0):
    """Soft-NMS (Bodla et al. 2017, Algorithm 1), vectorised over the remaining boxes.

    Parameters
    ----------
    boxes : array-like or torch.Tensor, shape (N, 4)
        Corners ``x1, y1, x2, y2`` (``x2 >= x1``, ``y2 >= y1``).
    scores : array-like or torch.Tensor, shape (N,)
    method : {"linear", "gaussian", "hard"}, default="linear"
        Rescoring rule (module docstring); ``"hard"`` is classical NMS.
    sigma : float, default=0.5
        Gaussian width: ``s * exp(-IoU**2 / sigma)``.
    iou_threshold : float, default=0.3
        N_t of the linear and hard rules (rescoring when ``IoU > N_t``).
    score_threshold : float, default=0.001
        Rescored boxes whose score falls below it are dropped.
    offset : {0, 1}, default=0
        Added to widths and heights: 0 for continuous coordinates (torchvision), 1 for the
        reference's inclusive pixel coordinates.

    Returns
    -------
    keep : ndarray or torch.Tensor of int64, shape (K,)
        Indices into ``boxes`` of the kept boxes, in the order they were selected.
    new_scores : ndarray or torch.Tensor, shape (K,)
        Their scores after rescoring (float32 unless the input was float64).  Torch input
        gives tensors on the input's device.

    Raises
    ------
    ValueError
        Shapes other than (N, 4) and (N,), non-finite values, or a bad parameter.

    Notes
    -----
    The computation is done in the input's precision (at least float32) in the order of the
    reference's C code, so float32 results equal it to the last bit in practice.

    References
    ----------
    N. Bodla, B. Singh, R. Chellappa, L. S. Davis, "Soft-NMS -- Improving Object Detection
    With One Line of Code", ICCV 2017, arXiv:1704.04503.

    Examples
    --------
    >>> import numpy as np
    >>> boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], dtype=np.float32)
    >>> keep, s = soft_nms(boxes, np.array([0.9, 0.8, 0.7]), method="gaussian", offset=1)
    >>> keep.tolist(), np.round(s, 4).tolist()
    ([0, 2, 1], [0.9, 0.7, 0.2967])
    """
    b, s, torch_in = _check(boxes, scores, method, sigma, iou_threshold, score_threshold, offset)
    dt = b.dtype.type
    rule, sig, nt, thr = METHODS[method], dt(sigma), dt(iou_threshold), dt(score_threshold)
    x1, y1, x2, y2 = (np.ascontiguousarray(c) for c in b.T)
    # the reference adds the offset as a C double, so some steps are in double precision
    f64 = np.float64
    wh = ((x2 - x1).astype(f64) + offset) * ((y2 - y1).astype(f64) + offset)   # (N,) in double
    areas = wh.astype(dt)
    s = s.copy()
    order = np.arange(len(b))       # the reference's working array: position -> box index
    n, i = len(b), 0
    while i < n:
        m = i + int(np.argmax(s[order[i:n]]))                      # first maximum, as the reference
        order[i], order[m] = order[m], order[i]
        t, rest = order[i], order[i + 1:n]                         # M; the (L,) remaining boxes
        iw = ((np.minimum(x2[t], x2[rest]) - np.maximum(x1[t], x1[rest])).astype(f64) + offset).astype(dt)
        ih = ((np.minimum(y2[t], y2[rest]) - np.maximum(y1[t], y1[rest])).astype(f64) + offset).astype(dt)
        hit = (iw > 0) & (ih > 0)                                  # only these are rescored
        inter = iw * ih
        union = ((wh[t] + areas[rest].astype(f64)) - inter.astype(f64)).astype(dt)
        with np.errstate(divide="ignore", invalid="ignore"):       # boxes not hit are not rescored
            ov = inter / union                                     # IoU(M, b_i)
            if rule == 1:
                w = np.where(ov > nt, dt(1) - ov, dt(1))           # eq. (2)
            elif rule == 2:
                w = np.exp((-(ov * ov) / sig).astype(np.float64)).astype(dt)   # eq. (3)
            else:
                w = np.where(ov > nt, dt(0), dt(1))                # eq. (1)
            new = np.where(hit, w * s[rest], s[rest])
        s[rest] = new
        drop = hit & (new < thr)
        if drop.any():
            # the reference deletes by moving the last remaining box into the hole: holes in the
            # first K places are filled, left to right, by the survivors behind them, last first
            k = len(rest) - int(drop.sum())
            kept = rest[:k].copy()
            kept[np.flatnonzero(drop[:k])] = rest[k:][~drop[k:]][::-1]
            order[i + 1:i + 1 + k] = kept
            n = i + 1 + k
        i += 1
    keep, new_scores = order[:n].astype(np.int64), s[order[:n]]
    if torch_in:
        import torch

        return (torch.from_numpy(keep).to(boxes.device),
                torch.from_numpy(new_scores).to(device=boxes.device))
    return keep, new_scores


def soft_nms_loop(boxes, scores, *, method: str = "linear", sigma: float = 0.5, iou_threshold: float = 0.3,
                  score_threshold: float = 0.001, offset: int = 0):
    """Soft-NMS one box pair at a time, as the reference's ``cpu_soft_nms`` loop (slow: O(N^2) Python).

    The same parameters and return values as :func:`soft_nms` (NumPy arrays).  Each
    statement follows the reference loop: swap the best remaining box to position i, rescore
    the boxes behind it, delete a box by moving the last one into its place.  Arithmetic is
    on NumPy scalars of the input's precision, as the reference's C floats.
    """
    b, s, _ = _check(boxes, scores, method, sigma, iou_threshold, score_threshold, offset)
    dt = b.dtype.type
    rule, off = METHODS[method], float(offset)
    sigma, iou_threshold, score_threshold = dt(sigma), dt(iou_threshold), dt(score_threshold)
    rows = [[*box, score, j] for j, (box, score) in enumerate(zip(b, s))]
    n = len(rows)
    for i in range(len(rows)):
        if i >= n:
            break
        m = i
        for pos in range(i + 1, n):
            if rows[m][4] < rows[pos][4]:
                m = pos
        rows[i], rows[m] = rows[m], rows[i]
        tx1, ty1, tx2, ty2 = rows[i][:4]
        t_area = (float(tx2 - tx1) + off) * (float(ty2 - ty1) + off)    # double, as the reference
        pos = i + 1
        while pos < n:
            x1, y1, x2, y2, sc = rows[pos][:5]
            area = dt((float(x2 - x1) + off) * (float(y2 - y1) + off))
            iw = dt(float(min(tx2, x2) - max(tx1, x1)) + off)
            if iw > 0:
                ih = dt(float(min(ty2, y2) - max(ty1, y1)) + off)
                if ih > 0:
                    ov = iw * ih / dt(t_area + float(area) - float(iw * ih))
                    if rule == 1:
                        weight = dt(1) - ov if ov > iou_threshold else dt(1)
                    elif rule == 2:
                        weight = dt(math.exp(-(ov * ov) / sigma))
                    else:
                        weight = dt(0) if ov > iou_threshold else dt(1)
                    rows[pos][4] = weight * sc
                    if rows[pos][4] < score_threshold:
                        rows[pos] = rows[n - 1]
                        n -= 1
                        pos -= 1
            pos += 1
    keep = np.array([r[5] for r in rows[:n]], dtype=np.int64)
    return keep, np.array([r[4] for r in rows[:n]], dtype=b.dtype)
