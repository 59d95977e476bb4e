"""Training-free open-vocabulary segmentation: the shared protocol, written once.

:func:`segment` runs any method of :data:`cliplab.dense.DENSE_METHODS` the way the
reference repositories (SCLIP, ClearCLIP, MaskCLIP) evaluate them:

1. **Class queries.**  Each class is one name or several synonyms; every name is encoded
   with a prompt ensemble (:func:`cliplab.zeroshot.class_weights`: each template's text
   feature normalised, averaged, renormalised; the 80 OpenAI ImageNet templates by
   default).  A class's probability is the maximum over its queries.
2. **Windows.**  ``window=None``: the whole image resized to the model input (one
   window).  ``window=W``: the image (optionally resized to a short side of ``size``) is
   cut into W x W windows every ``stride`` pixels, mmseg's ``slide_inference`` layout (the
   last row and column of windows are shifted in to end at the border); the windows of
   all images are batched together; a window whose patch grid differs from the tower's
   gets its positional embedding interpolated (bicubic).  Images smaller than a window are
   padded (with the normalisation mean) on the bottom and right.
3. **Logits.**  Per window, the method's patch features are L2-normalised, compared by
   cosine with the queries, refined by the method if it does so, and upsampled
   bilinearly to the window's pixels; overlapping windows are averaged.
4. **Prediction.**  The image's logits are upsampled bilinearly to its original size,
   multiplied by the logit scale, softmaxed over the queries and max-pooled per class;
   the class map is the argmax.  With ``prob_thd``, pixels whose top probability is
   below it get class 0 (the background class, which must then be ``classes[0]``, or be
   added with ``background=``).

Protocol source: SCLIP ``clip_segmentor.py`` (``forward_slide``, ``postprocess_result``),
ClearCLIP ``clearclip_segmentor.py``; see also the docs page ``docs/segmentation.md``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .._progress import progress_bar
from ..data.images import load_image
from ..errors import UsageError
from ..validation import check_backbone, check_number, check_positive_int
from ..zeroshot import class_weights, get_templates
from . import DENSE_METHODS
from .base import DenseMethod

logger = logging.getLogger(__name__)

__all__ = ["SegmentationResult", "segment", "class_queries", "window_boxes", "make_method", "prepare_images"]


@dataclass
class SegmentationResult:
    """Class maps of a list of images.

    Attributes
    ----------
    masks : list of ndarray (H_i, W_i) int32
        One class map per image, at the image's original size; values index ``classes``.
    classes : list of str
        Class names (a class given as synonyms is named by its first one; an added
        background class is ``"background"``, index 0).
    probs : list of ndarray (C, H_i, W_i) float32, or None
        Per-class probabilities (max over each class's queries of the softmax over all
        queries), with ``return_probs=True``.
    method : str
    timings : dict of str -> float
        Seconds per stage (``text``, ``images``, ``model``, ``post``).
    n_windows : int
        Windows run through the model.
    """

    masks: list
    classes: list
    probs: list | None = None
    method: str = ""
    timings: dict = field(default_factory=dict)
    n_windows: int = 0


def make_method(method, **options) -> DenseMethod:
    """A :class:`DenseMethod` from a registered name and its options, or an instance as it is."""
    if isinstance(method, DenseMethod):
        if options:
            raise UsageError("method options are given to the method's constructor; pass a name, not an instance, "
                             "to give them here")
        return method
    cls = DENSE_METHODS.get(method)
    try:
        return cls(**options)
    except TypeError as e:
        raise UsageError(f"dense method {method!r}: {e}") from None


def class_queries(backbone, classes: Sequence, templates) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Prompt-ensembled text queries of classes given as names or lists of synonyms.

    Parameters
    ----------
    backbone : Backbone
    classes : sequence of str or of sequences of str (C,)
        A class is one name or a list of synonyms (each a query).
    templates : template spec
        As :func:`cliplab.zeroshot.get_templates` takes it.

    Returns
    -------
    names : list of str (C,)
        The first synonym of each class.
    queries : ndarray (Q, D) float32
        L2-normalised query embeddings.
    owner : ndarray (Q,) int64
        The class of each query.
    """
    if isinstance(classes, str) or not len(classes):
        raise UsageError("classes must be a non-empty list of names (or of lists of synonyms)")
    words, owner, names = [], [], []
    for c, entry in enumerate(classes):
        syn = [entry] if isinstance(entry, str) else list(entry)
        syn = [str(s).strip() for s in syn]
        if not syn or not all(syn):
            raise UsageError(f"class {c} has an empty name; give every class a name")
        names.append(syn[0])
        words += syn
        owner += [c] * len(syn)
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UsageError(f"duplicate class names: {', '.join(map(repr, dup))}; keep one of each")
    unique = list(dict.fromkeys(words))                   # a word shared by two classes is encoded once
    emb = class_weights(backbone, unique, get_templates(templates), ties="warn", progress=False)  # (U, D)
    index = {w: i for i, w in enumerate(unique)}
    queries = emb[[index[w] for w in words]]              # (Q, D)
    return names, queries.astype(np.float32), np.asarray(owner, dtype=np.int64)


def window_boxes(height: int, width: int, window: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Window boxes ``(y0, x0, y1, x1)`` over an image, in mmseg's ``slide_inference`` layout.

    ``ceil((H - window) / stride) + 1`` rows (at least one), the last moved in to end at the
    border; likewise for columns.  An image side shorter than ``window`` gives boxes of
    that side's length.
    """
    def starts(n):
        count = max(n - window + stride - 1, 0) // stride + 1
        out = []
        for i in range(count):
            end = min(i * stride + window, n)
            out.append((max(end - window, 0), end))
        return out

    return [(y0, x0, y1, x1) for y0, y1 in starts(height) for x0, x1 in starts(width)]


def _mean_std(backbone) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = backbone.preprocess_cfg
    mean = torch.tensor(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)), dtype=torch.float32)
    std = torch.tensor(cfg.get("std", (0.26862954, 0.26130258, 0.27577711)), dtype=torch.float32)
    return mean.view(3, 1, 1), std.view(3, 1, 1)


def _to_pil(item) -> Image.Image:
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim not in (2, 3) or (item.ndim == 3 and item.shape[2] != 3):
            raise UsageError(f"image arrays must be uint8 (H, W) or (H, W, 3); got {item.dtype} {item.shape}")
        return Image.fromarray(item).convert("RGB")
    return load_image(item)


def _image_items(images) -> list:
    """One image or a sequence of them, as a list."""
    return [images] if isinstance(images, (str, Image.Image)) or (
        isinstance(images, np.ndarray) and images.ndim in (2, 3)) else list(images)


def prepare_images(backbone, images, *, window: int | None, size: int | None = None, multiple: int = 1):
    """Decode, resize and normalise images for :func:`segment`.

    Returns a list of ``(tensor (3, H', W'), (H, W) original size, (h, w) size before padding)``:
    with ``window=None`` each image is resized to the model input; otherwise to a short
    side of ``size`` (when given) and padded to at least ``window`` per side and to a
    multiple of ``multiple`` (splicing methods: the patch size).
    """
    mean, std = _mean_std(backbone)
    out = []
    for item in _image_items(images):
        img = _to_pil(item)
        W0, H0 = img.size
        if window is None:
            side = backbone.image_size
            img = img.resize((side, side), Image.BICUBIC)
        elif size is not None:
            s = size / min(W0, H0)
            img = img.resize((max(1, round(W0 * s)), max(1, round(H0 * s))), Image.BICUBIC)
        t = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)
        t = (t - mean) / std                                                    # (3, h, w)
        h, w = t.shape[1:]
        if window is not None:
            ph, pw = max(h, window), max(w, window)
            ph, pw = -(-ph // multiple) * multiple, -(-pw // multiple) * multiple
            if (ph, pw) != (h, w):
                t = F.pad(t, (0, pw - w, 0, ph - h))                             # zeros = the mean colour
        out.append((t, (H0, W0), (h, w)))
    return out


def _check_window(backbone, window, stride):
    visual = backbone.model.visual
    patch = visual.patch_size[0] if isinstance(visual.patch_size, tuple) else int(visual.patch_size)
    if window is None:
        if stride is not None:
            raise UsageError("stride needs a window; give window=... (e.g. the model input size) as well")
        return None, None
    if window is True:
        window = backbone.image_size
    window = check_positive_int("window", window)
    if window % patch:
        raise UsageError(f"window {window} is not a multiple of the patch size {patch}")
    stride = window // 2 if stride is None else check_positive_int("stride", stride)
    if stride > window:
        raise UsageError(f"stride {stride} is larger than the window {window}: pixels between windows would "
                         "get no prediction")
    return window, stride


@torch.inference_mode()
def segment(backbone, images, classes: Sequence, *, method="sclip", window: int | None = None,
            stride: int | None = None, size: int | None = None, prob_thd: float = 0.0,
            background=None, templates="openai-80", logit_scale: float | None = None,
            batch_size: int = 32, return_probs: bool = False, progress: bool | None = None,
            **method_options) -> SegmentationResult:
    """Segment images into free-text classes with a training-free dense method.

    Parameters
    ----------
    backbone : Backbone
        With an open_clip ViT image tower.
    images : path, PIL image, uint8 array (H, W, 3), or a sequence of them
    classes : sequence of str or of sequences of str (C,), or ndarray (C, D)
        Class names; a class may be a list of synonyms (its probability is the max over them).
        An array gives the class embeddings themselves (e.g. a classifier's weights); the
        classes are then named ``"0"``, ``"1"``...
    method : str or DenseMethod, default="sclip"
        A name in :data:`cliplab.dense.DENSE_METHODS` (``vanilla``, ``maskclip``, ``sclip``,
        ``clearclip``, ...) or an instance; ``method_options`` go to its constructor.
    window : int or True, optional
        Sliding-window side in pixels (``True``: the model input size); ``None`` resizes
        each whole image to the model input instead.
    stride : int, optional
        Window step (default ``window // 2``).
    size : int, optional
        With windows: resize each image to this short side first (the references use 336
        or 448); default: keep its size.
    prob_thd : float in [0, 1], default=0
        Pixels whose top class probability is below it get class 0 (background).
    background : str or sequence of str, optional
        Background queries: a class ``"background"`` with these synonyms is put first
        (index 0) and the classes follow from 1.
    templates : template spec, default="openai-80"
        Prompt templates of the queries.
    logit_scale : float, optional
        Multiplier of the cosines before the softmax (default: the method's, e.g. 40 for SCLIP).
    batch_size : int, default=32
        Windows per forward pass (windows of several images share a batch).
    return_probs : bool, default=False
        Also return per-class probability maps.
    progress : bool, optional

    Returns
    -------
    SegmentationResult

    Raises
    ------
    UsageError
        Bad classes, window, stride or options; a tower the method cannot run on.
    BadImage
        An image that cannot be read.

    Examples
    --------
    >>> import cliplab
    >>> from cliplab.dense import segment
    >>> bb = cliplab.load("shapes-tiny")                                       # doctest: +SKIP
    >>> res = segment(bb, ["scene.png"], ["circle", "square"], method="sclip",
    ...               background="background", window=64, stride=32)          # doctest: +SKIP
    >>> res.masks[0].shape                                                     # doctest: +SKIP
    (256, 256)
    """
    check_backbone("backbone", backbone)
    timings: dict = {}
    meth = make_method(method, **method_options)
    meth.prepare(backbone)
    window, stride = _check_window(backbone, window, stride)
    if size is not None:
        size = check_positive_int("size", size)
    prob_thd = check_number("prob_thd", prob_thd, minimum=0, maximum=1)
    batch_size = check_positive_int("batch_size", batch_size)
    scale = meth.logit_scale if logit_scale is None else check_number("logit_scale", logit_scale, minimum=0,
                                                                      strict_minimum=True)
    if isinstance(classes, np.ndarray):
        if classes.ndim != 2 or classes.shape[1] != backbone.embed_dim or background is not None:
            raise UsageError(f"class embeddings must be (C, {backbone.embed_dim}) and come without background=; "
                             f"got {classes.shape}")
    elif not isinstance(classes, str):
        classes = list(classes)
    if background is not None:
        classes = [[background] if isinstance(background, str) else list(background), *classes]

    t0 = time.perf_counter()
    if isinstance(classes, np.ndarray):
        queries = classes / np.linalg.norm(classes, axis=1, keepdims=True)
        names, owner = [str(i) for i in range(len(classes))], np.arange(len(classes))
    else:
        names, queries, owner = class_queries(backbone, classes, templates)
    if background is not None:
        names[0] = "background"
    queries = meth.text_queries(backbone, names, queries, owner, background=background is not None)
    q = torch.from_numpy(np.asarray(queries, np.float32)).to(backbone.device)     # (Q, D)
    owner_t = torch.from_numpy(np.asarray(owner, np.int64))                      # (Q,) class of each query
    timings["text"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    patch = backbone.model.visual.patch_size
    patch = patch[0] if isinstance(patch, tuple) else int(patch)
    images = _image_items(images)
    prepared = prepare_images(backbone, images, window=window, size=size, multiple=patch if meth.splice else 1)
    timings["images"] = time.perf_counter() - t0

    jobs = []                                                                    # (image, box)
    for i, (t, _, _) in enumerate(prepared):
        H, W = t.shape[1:]
        boxes = [(0, 0, H, W)] if window is None else window_boxes(H, W, window, stride)
        jobs += [(i, b) for b in boxes]
    sums = [torch.zeros(len(owner), *t.shape[1:]) for t, _, _ in prepared]       # (Q, H', W') each
    counts = [torch.zeros(1, *t.shape[1:]) for t, _, _ in prepared]
    grids = [None] * len(prepared)                                              # splicing methods
    t_model = 0.0
    device = backbone.device
    with progress_bar(total=len(jobs), progress=progress if len(jobs) > batch_size else False,
                      desc=f"segment ({meth.name})", unit="window") as bar:
        for s in range(0, len(jobs), batch_size):
            chunk = jobs[s:s + batch_size]
            by_shape: dict = {}
            for i, (y0, x0, y1, x1) in chunk:
                by_shape.setdefault((y1 - y0, x1 - x0), []).append((i, (y0, x0, y1, x1)))
            for (h, w), group in by_shape.items():
                crops = torch.stack([prepared[i][0][:, y0:y1, x0:x1] for i, (y0, x0, y1, x1) in group])
                t0 = time.perf_counter()
                feats = meth.features(backbone, crops.to(device))
                t_model += time.perf_counter() - t0
                if meth.splice:
                    _splice(meth, feats, group, grids, prepared, backbone)
                    continue
                tok = F.normalize(feats.tokens.float(), dim=-1)                  # (B, h', w', D)
                logits = torch.einsum("bhwd,qd->bqhw", tok, q)                  # (B, Q, h', w')
                feats.extras.setdefault("query_owner", owner_t)                 # for refinements by class
                logits = meth.refine(logits, feats)
                logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False).cpu()
                for (i, (y0, x0, y1, x1)), lg in zip(group, logits):
                    sums[i][:, y0:y1, x0:x1] += lg
                    counts[i][:, y0:y1, x0:x1] += 1
            bar.update(len(chunk))
    timings["model"] = t_model

    t0 = time.perf_counter()
    masks, probs = [], []
    for i, (t, (H0, W0), (h, w)) in enumerate(prepared):
        if meth.splice:
            logits = _spliced_logits(meth, grids[i], t, q, backbone)             # (Q, H', W')
        else:
            logits = sums[i] / counts[i]                                         # (Q, H', W')
        logits = logits[:, :h, :w]
        if (h, w) != (H0, W0):
            logits = F.interpolate(logits[None], size=(H0, W0), mode="bilinear", align_corners=False)[0]
        p = torch.softmax(logits * scale, dim=0)                                # (Q, H, W)
        if len(names) != len(owner):
            p = torch.stack([p[owner_t == c].amax(dim=0) for c in range(len(names))])   # (C, H, W)
        top, pred = p.max(dim=0)
        if prob_thd > 0:
            pred[top < prob_thd] = 0
        if meth.refines_prediction:                                              # e.g. Trident's mask model
            p, pred = meth.refine_prediction(p, pred, np.asarray(_to_pil(images[i])))
        masks.append(pred.numpy().astype(np.int32))
        if return_probs:
            probs.append(p.numpy().astype(np.float32))
    timings["post"] = time.perf_counter() - t0
    return SegmentationResult(masks, names, probs if return_probs else None, meth.name, timings, len(jobs))


def _splice(meth, feats, group, grids, prepared, backbone) -> None:
    """Add window token grids into each image's token grid (splicing methods)."""
    visual = backbone.model.visual
    patch = visual.patch_size[0] if isinstance(visual.patch_size, tuple) else int(visual.patch_size)
    for (i, (y0, x0, y1, x1)), tok in zip(group, feats.tokens.float().cpu()):
        if grids[i] is None:
            H, W = prepared[i][0].shape[1:]
            grids[i] = [torch.zeros(H // patch, W // patch, tok.shape[-1]), torch.zeros(H // patch, W // patch, 1)]
        if y0 % patch or x0 % patch:
            raise UsageError(f"{meth.name} splices window tokens: stride and image size must be multiples of "
                             f"the patch size {patch}")
        gy, gx = y0 // patch, x0 // patch
        grids[i][0][gy:gy + tok.shape[0], gx:gx + tok.shape[1]] += tok
        grids[i][1][gy:gy + tok.shape[0], gx:gx + tok.shape[1]] += 1


def _spliced_logits(meth, grid, image, q, backbone) -> torch.Tensor:
    tokens = grid[0] / grid[1].clamp_min(1)                                      # (h, w, D)
    tokens = meth.aggregate(tokens.to(backbone.device), image.to(backbone.device), backbone)
    tok = F.normalize(tokens.float(), dim=-1)
    logits = torch.einsum("hwd,qd->qhw", tok, q)[None]                          # (1, Q, h, w)
    return F.interpolate(logits, size=tuple(image.shape[1:]), mode="bilinear", align_corners=False)[0].cpu()
