"""Image preprocessing shared by the Backbone and the Trainer.

The eval transform is open_clip's (resize, centre crop, to tensor, normalise); for
``uint8`` arrays already at the model's input size, :func:`uint8_to_tensor` does the
same arithmetic in one vectorised step, without a round trip through PIL.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import UsageError

__all__ = ["default_preprocess_cfg", "make_preprocess", "uint8_to_tensor", "images_to_tensor"]


def default_preprocess_cfg(model_cfg: dict) -> dict:
    """open_clip's default preprocessing with the model's input size."""
    from open_clip.transform import PreprocessCfg

    cfg = asdict(PreprocessCfg())
    size = model_cfg.get("vision_cfg", {}).get("image_size", 224)
    cfg["size"] = size if isinstance(size, int) else tuple(size)
    cfg.update(model_cfg.get("preprocess_cfg", {}))
    return cfg


def make_preprocess(preprocess_cfg: dict) -> Callable:
    """The eval-time transform: PIL image -> (3, H, W) float tensor."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    fields = PreprocessCfg.__dataclass_fields__
    return image_transform_v2(PreprocessCfg(**{k: v for k, v in preprocess_cfg.items() if k in fields}),
                              is_train=False)


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
