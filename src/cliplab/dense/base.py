"""The interface of a dense method, and the last-block methods built on it.

A :class:`DenseMethod` maps a batch of model-input windows (B, 3, H, W) to patch features
in the joint image-text space, (B, h, w, D), plus whatever its refinement step needs
(keys, affinities).  :func:`cliplab.dense.segment` does the rest once for every method:
windows, class queries, cosine logits, overlap averaging, upsampling, softmax,
background.  A method may refine the per-window cosine logits (:meth:`DenseMethod.refine`)
or, with ``splice = True``, aggregate the spliced token grid of a whole image
(:meth:`DenseMethod.aggregate`) before the logits are taken.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .attention import check_tower, last_block, prelast_tokens, project_tokens

__all__ = ["DenseMethod", "DenseFeatures", "LastBlockMethod"]


@dataclass
class DenseFeatures:
    """Patch features of a batch of windows.

    Attributes
    ----------
    tokens : Tensor (B, h, w, D)
        Patch features in the joint space (not normalised).
    extras : dict
        Method-specific tensors for :meth:`DenseMethod.refine` (e.g. ``keys`` (B, h*w, W));
        :func:`~cliplab.dense.segment` adds ``query_owner`` (Q,), the class index of each query.
    """

    tokens: torch.Tensor
    extras: dict = field(default_factory=dict)


class DenseMethod:
    """Base class of the methods in :data:`cliplab.dense.DENSE_METHODS`.

    Subclasses implement :meth:`features`; the keyword arguments of their ``__init__`` are
    the method's options (``segment(..., method="maskclip", ks_thresh=1.0)``).

    Attributes
    ----------
    logit_scale : float
        Multiplier of the cosine logits before the softmax over queries (the reference's
        default; ``segment(logit_scale=...)`` overrides it).
    splice : bool
        ``True`` for methods that splice window tokens into one grid per image before
        aggregating (Trident); :meth:`aggregate` then runs on each image's grid.
    """

    logit_scale: float = 100.0
    splice: bool = False
    name: str = "method"

    def prepare(self, backbone) -> None:
        """Check that the method can run on ``backbone`` (raise :class:`UsageError` if not)."""
        check_tower(backbone.model.visual)

    def text_queries(self, backbone, names, queries, owner, *, background: bool = False):
        """The class queries (Q, D) the method compares with; unchanged by default.

        Called by :func:`cliplab.dense.segment` once per call, before any window, with the
        class names (C,), the prompt-ensembled queries (Q, D) float32 and their classes
        ``owner`` (Q,); ``background`` says class 0 is the added background.  Methods that
        change the text side (ExCEL's text enrichment) override it.
        """
        return queries

    def features(self, backbone, images: torch.Tensor) -> DenseFeatures:
        """Patch features of preprocessed windows ``images`` (B, 3, H, W)."""
        raise NotImplementedError

    def refine(self, logits: torch.Tensor, feats: DenseFeatures) -> torch.Tensor:
        """Refine cosine logits (B, Q, h, w) of one batch of windows; identity by default."""
        return logits

    @property
    def refines_prediction(self) -> bool:
        """Whether :func:`~cliplab.dense.segment` calls :meth:`refine_prediction` on each image."""
        return False

    def refine_prediction(self, probs: torch.Tensor, pred: torch.Tensor, image):
        """Refine one image's probabilities (C, H, W) and class map (H, W) at its original size.

        ``image`` is the image, uint8 (H, W, 3).  Identity by default; methods that refine
        with another model (Trident's mask model) override it and :attr:`refines_prediction`.
        """
        return probs, pred

    def aggregate(self, grid: torch.Tensor, image: torch.Tensor, backbone) -> torch.Tensor:
        """Splicing methods: features (h, w, D) of one image's spliced grid -> (h', w', D)."""
        return grid

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


class LastBlockMethod(DenseMethod):
    """Blocks 1..L-1 unchanged; block L with another attention, optionally without residual / FFN.

    Class attributes ``attention`` (a function of ``(q, k, v, scale)`` from
    :mod:`cliplab.dense.attention`), ``residual`` and ``ffn`` define the method;
    ``positions`` is the ``mode`` of :func:`~cliplab.dense.attention.interpolate_positions`.
    """

    attention: Callable = staticmethod(lambda q, k, v, scale: v)
    residual: bool = True
    ffn: bool = True
    positions: str = "size"   # positional-embedding resizing, see attention.interpolate_positions

    def last_tokens(self, backbone, images: torch.Tensor):
        """(tokens out of the modified last block (B, 1 + h*w, W), tokens into it, grid)."""
        visual = backbone.model.visual
        x, grid = prelast_tokens(visual, images, positions=self.positions)
        z = last_block(visual.transformer.resblocks[-1], x, self.attention, residual=self.residual, ffn=self.ffn)
        return z, x, grid

    def features(self, backbone, images: torch.Tensor) -> DenseFeatures:
        z, _, grid = self.last_tokens(backbone, images)
        tokens = project_tokens(backbone.model.visual, z[:, 1:])         # (B, h*w, D)
        return DenseFeatures(tokens.reshape(len(images), *grid, -1))
