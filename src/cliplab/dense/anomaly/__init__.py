"""Anomaly detection with CLIP: methods that score images and draw anomaly maps.

Every method is registered in :data:`ANOMALY_METHODS` (``cliplab anomaly --method NAME``)
and follows one contract::

    method = ANOMALY_METHODS.get("winclip")(backbone, category="bottle")
    method.fit(normal_images)          # few-shot memory; zero-shot methods need none
    result = method.predict(images)    # AnomalyResult: scores (N,), maps (N, S, S)

Images are file paths, PIL images or uint8 arrays (H, W, 3); maps are at the model's input
resolution S (the centre crop the backbone sees).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...registry import Registry

__all__ = ["ANOMALY_METHODS", "AnomalyResult", "AnomalyMethod"]

#: Anomaly detection methods, by name.
ANOMALY_METHODS = Registry("anomaly method", package=__name__)


@dataclass
class AnomalyResult:
    """Scores of a batch of images.

    Attributes
    ----------
    scores : ndarray of float32, shape (N,)
        Image-level anomaly scores, higher = more anomalous.
    maps : ndarray of float32, shape (N, S, S)
        Pixel anomaly maps at the model's input resolution.
    """

    scores: np.ndarray
    maps: np.ndarray


class AnomalyMethod:
    """Base of the registered methods: ``fit`` (optional memory of normal images), ``predict``.

    Parameters
    ----------
    backbone : Backbone
    category : str, default="object"
        The object name that fills the prompts ("bottle", "metal nut").
    batch_size : int, default=32
        Images per forward pass.
    """

    #: Whether :meth:`fit` needs normal reference images.
    needs_references = False

    def __init__(self, backbone, *, category: str = "object", batch_size: int = 32):
        from ...validation import check_positive_int

        self.backbone = backbone
        self.category = category
        self.batch_size = check_positive_int("batch_size", batch_size)

    def fit(self, normal_images) -> "AnomalyMethod":
        """Remember normal reference images (few-shot methods); returns ``self``."""
        return self

    def predict(self, images) -> AnomalyResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def _pixels(self, images):
        """Paths, PIL images or uint8 arrays -> the backbone's preprocessed batch (B, 3, S, S) on its device."""
        import torch

        from ...data.images import load_image

        pre = self.backbone.preprocess
        out = []
        for im in images:
            if isinstance(im, np.ndarray):
                from PIL import Image

                im = Image.fromarray(im)
            elif not hasattr(im, "convert"):
                im = load_image(im)
            out.append(pre(im.convert("RGB")))
        return torch.stack(out).to(self.backbone.device)
