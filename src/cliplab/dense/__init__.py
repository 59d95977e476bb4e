"""Dense prediction from CLIP patch and word tokens.

- segmentation: :func:`segment` and the ``dense method`` registry (below);
- :mod:`.anomaly`: zero- and few-shot anomaly maps (the ``anomaly method`` registry);
- :mod:`.misalignment`: CLIPScore, RefCLIPScore, CLIP4DM word attribution and F-CLIPScore;
- :mod:`.detect`: open-vocabulary detection, ``cliplab.dense.detect.detect`` (class-agnostic
  proposals of the ``proposal method`` registry in :mod:`.proposals`, crop-and-encode
  region scores, Soft-NMS).
- :mod:`.cloc`: CLOC's promptable region embeddings (a Prompter trained on a frozen Backbone)
  and the crop-and-encode and RoI-mean baselines.

:func:`segment` turns images and free-text classes into per-pixel class maps with any
registered dense method; every method is registered in :data:`DENSE_METHODS` where its
class is defined (``@DENSE_METHODS.register("sclip", help=...)``), and ``cliplab segment
--method`` reads its choices from there.  The shared machinery — last-block attention
variants (:mod:`cliplab.dense.attention`), sliding windows with overlap averaging and
positional-embedding interpolation, prompt-ensembled class queries with synonyms and
background handling — is written once, in :mod:`cliplab.dense.segment` and
:mod:`cliplab.dense.base`.

Adding a method is one new module in this package with a :class:`DenseMethod` subclass
carrying the decorator.  The classes are imported on first use, so that ``import
cliplab.dense`` (and building the command-line parser from :data:`DENSE_METHODS`) stays cheap.
"""

from __future__ import annotations

from ..lazy import lazy_exports
from ..registry import Registry

#: Dense (segmentation) methods by CLI name, each with a one-line ``help``.
DENSE_METHODS: Registry = Registry("dense method", package=__name__)

__getattr__, __dir__, _LAZY_NAMES = lazy_exports(__name__, {
    ".base": ["DenseMethod", "DenseFeatures", "LastBlockMethod"],
    ".segment": ["segment", "SegmentationResult", "class_queries", "window_boxes"],
})

__all__ = ["DENSE_METHODS", *_LAZY_NAMES]
