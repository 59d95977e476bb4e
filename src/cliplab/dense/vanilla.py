"""Vanilla CLIP patch tokens as a segmentation baseline.

The tower's own output tokens (``ln_post`` and ``proj`` applied to every patch token of
the unchanged last block) compared with the class queries by cosine; the baseline every
training-free method of this package improves on (SCLIP's table: 14.1 mIoU averaged over
eight benchmarks with OpenAI ViT-B/16).  Default logit scale 100 (CLIP's).

Deviations: none; the features equal ``model.visual``'s output tokens projected by ``proj``
(tested to 1e-5) and SCLIP's ``csa=False`` path (3e-6 on a random ViT-B-16).
"""

from __future__ import annotations

from . import DENSE_METHODS
from .attention import vanilla_attention
from .base import LastBlockMethod

__all__ = ["Vanilla"]


@DENSE_METHODS.register("vanilla", help="CLIP's own patch tokens (baseline)")
class Vanilla(LastBlockMethod):
    """CLIP's unchanged last block: the patch tokens of ``model.visual``.

    Examples
    --------
    >>> from cliplab.dense import segment                                  # doctest: +SKIP
    >>> segment(cliplab.load("shapes-tiny"), images, ["circle", "square"], method="vanilla")  # doctest: +SKIP
    """

    attention = staticmethod(vanilla_attention)
    residual = True
    ffn = True
    logit_scale = 100.0
