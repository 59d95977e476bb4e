"""Image preprocessing shared by the Backbone and the Trainer.

The eval transform is open_clip's (resize, centre crop, to tensor, normalise); for
``uint8`` arrays already at the model's input size, :func:`uint8_to_tensor` does the
same arithmetic in one vectorised step, without a round trip through PIL.

Bounded resize
--------------
open_clip's default (``resize_mode="shortest"``) resizes the short side to the model
size *before* the centre crop, so the intermediate image grows with the aspect ratio:
an 8000 x 1 strip becomes 1,792,000 x 224 pixels (1.6 GB) on the way to a 224 x 224
input.  :func:`make_preprocess` therefore adds one step in front: when that resize
would produce more than :data:`MAX_RESIZE_RATIO` times the model input's pixels, the
image is resized and cropped in one PIL call (``Image.resize`` with a ``box``: the
source region the crop covers is resampled straight to the model size).  Every image
up to that aspect ratio goes through open_clip's transform unchanged, bit for bit;
beyond it the result is the same crop at the same scale, up to PIL's rounding between
its two resampling passes, and memory stays at the decoded source plus one model input.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import UsageError

__all__ = ["MAX_RESIZE_RATIO", "default_preprocess_cfg", "make_preprocess", "uint8_to_tensor",
           "images_to_tensor"]

MAX_RESIZE_RATIO = 64
"""Largest resize output of the eval transform, in multiples of the model input's pixels.

With a 224-px model: 64 x 224 x 224 = 3.2 M pixels (12.8 MB); reached by images whose
aspect ratio exceeds 64 : 1.  Beyond it the crop is taken before the resize (see the
module docstring).
"""


def default_preprocess_cfg(model_cfg: dict) -> dict:
    """open_clip's default preprocessing with the model's input size."""
    from open_clip.transform import PreprocessCfg

    cfg = asdict(PreprocessCfg())
    size = model_cfg.get("vision_cfg", {}).get("image_size", 224)
    cfg["size"] = size if isinstance(size, int) else tuple(size)
    cfg.update(model_cfg.get("preprocess_cfg", {}))
    return cfg


class _CropBeforeResize:
    """Resize-then-centre-crop in one step for images whose resize would be too large.

    Stands in front of open_clip's ``shortest`` transform (``Resize`` or
    ``ResizeKeepRatio``, then ``CenterCrop``).  It computes the size that resize would
    produce (torchvision's rule for a square target, ``ResizeKeepRatio``'s for a
    rectangular one) and the offset of the centre crop; if the resized image would hold
    more than ``max_ratio`` times the crop's pixels, it resamples only the source region
    under the crop, to the crop size, with ``Image.resize(size, resample, box)``.  The
    following resize and crop then leave that image as it is.  Smaller images pass
    through untouched.
    """

    def __init__(self, size, interpolation: str, max_ratio: int = MAX_RESIZE_RATIO):
        self.size = (size, size) if isinstance(size, int) else tuple(size)  # (h, w)
        self.resample = Image.BILINEAR if interpolation == "bilinear" else Image.BICUBIC
        self.max_ratio = max_ratio

    def _resized(self, w: int, h: int) -> tuple[int, int]:
        th, tw = self.size
        if th == tw:  # torchvision Resize(int): short side -> th, long side truncated
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(th * long / short)
            return (th, new_long) if w <= h else (new_long, th)
        ratio = min(h / th, w / tw)  # open_clip ResizeKeepRatio(longest=0)
        return round(w / ratio), round(h / ratio)

    def __call__(self, img: Image.Image) -> Image.Image:
        th, tw = self.size
        w, h = img.size
        nw, nh = self._resized(w, h)
        if nw * nh <= self.max_ratio * th * tw:
            return img
        left, top = int(round((nw - tw) / 2.0)), int(round((nh - th) / 2.0))  # CenterCrop's offsets
        sx, sy = w / nw, h / nh
        box = (left * sx, top * sy, (left + tw) * sx, (top + th) * sy)
        return img.resize((tw, th), self.resample, box=box)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, max_ratio={self.max_ratio})"


class _KeepOnePixel:
    """In front of open_clip's ``longest`` transform: a side that its ``ResizeKeepRatio``
    would round to 0 pixels (aspect ratio above twice the model size) is kept at 1.

    The image is resized here to that size, which the following ``ResizeKeepRatio``
    leaves as it is and ``CenterCropOrPad`` pads, instead of PIL refusing a 0-pixel
    side.  Other images pass through untouched.
    """

    def __init__(self, size, interpolation: str):
        self.size = (size, size) if isinstance(size, int) else tuple(size)  # (h, w)
        self.resample = Image.BILINEAR if interpolation == "bilinear" else Image.BICUBIC

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        ratio = max(h / self.size[0], w / self.size[1])  # ResizeKeepRatio(longest=1)
        nw, nh = round(w / ratio), round(h / ratio)
        if nw >= 1 and nh >= 1:
            return img
        return img.resize((max(nw, 1), max(nh, 1)), self.resample)


def make_preprocess(preprocess_cfg: dict) -> Callable:
    """The eval-time transform: PIL image -> (3, H, W) float tensor.

    open_clip's ``image_transform_v2(cfg, is_train=False)``; with the ``shortest``
    resize mode (the default) a :class:`_CropBeforeResize` step in front bounds the
    resize output to :data:`MAX_RESIZE_RATIO` times the model input (see the module
    docstring).  The ``longest`` and ``squash`` modes never enlarge beyond the input;
    with ``longest`` a :class:`_KeepOnePixel` step keeps a side that would round to 0
    pixels at 1 (open_clip's transform raises ``ValueError`` there).
    """
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from torchvision.transforms import Compose

    fields = PreprocessCfg.__dataclass_fields__
    cfg = PreprocessCfg(**{k: v for k, v in preprocess_cfg.items() if k in fields})
    transform = image_transform_v2(cfg, is_train=False)
    mode, interpolation = cfg.resize_mode or "shortest", cfg.interpolation or "bicubic"
    if mode == "shortest":
        transform = Compose([_CropBeforeResize(cfg.size, interpolation), *transform.transforms])
    elif mode == "longest":
        transform = Compose([_KeepOnePixel(cfg.size, interpolation), *transform.transforms])
    return transform


def _size(preprocess_cfg: dict | None) -> tuple[int, int] | None:
    size = (preprocess_cfg or {}).get("size")
    if size is None:
        return None
    return (size, size) if isinstance(size, int) else tuple(size)


def uint8_to_tensor(arrays: np.ndarray | Sequence[np.ndarray], preprocess_cfg: dict | None) -> torch.Tensor:
    """uint8 (B, H, W, 3) at the model size -> normalised float (B, 3, H, W).

    x = (pixels / 255 - mean) / std, exactly what the eval transform computes
    when no resize or crop is needed.  Mean and std default to OpenAI's.
    """
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    cfg = preprocess_cfg or {}
    mean = torch.tensor(cfg.get("mean") or OPENAI_DATASET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get("std") or OPENAI_DATASET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    x = torch.from_numpy(np.ascontiguousarray(np.stack(arrays))).permute(0, 3, 1, 2)  # (B, 3, H, W)
    return x.float().div_(255).sub_(mean).div_(std)


def is_model_sized(array, preprocess_cfg: dict | None) -> bool:
    hw = _size(preprocess_cfg)
    return (hw is not None and isinstance(array, np.ndarray) and array.dtype == np.uint8
            and array.shape == (*hw, 3))


def images_to_tensor(images, preprocess: Callable | None, preprocess_cfg: dict | None) -> torch.Tensor:
    """A batch of images -> normalised (B, 3, H, W) float tensor.

    uint8 arrays already at the model's size take :func:`uint8_to_tensor`;
    anything else (PIL images, other sizes) goes through ``preprocess`` one by one.
    """
    if len(images) and all(is_model_sized(a, preprocess_cfg) for a in images):
        return uint8_to_tensor(images, preprocess_cfg)
    if preprocess is None:
        raise UsageError("images are not uint8 arrays at the model's size; pass a preprocess transform")
    pils = [Image.fromarray(x) if isinstance(x, np.ndarray) else x.convert("RGB") for x in images]
    return torch.stack([preprocess(p) for p in pils])  # (B, 3, H, W)
