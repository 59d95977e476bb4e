"""Long-CLIP: long captions against full image features, short captions against their primary components.

Long-CLIP: Unlocking the Long-Text Capability of CLIP (Zhang et al., ECCV 2024,
arXiv:2403.15378).  Reference code: ``beichenzbc/Long-CLIP``,
``model/model_longclip.py`` (``CLIP.PCA``, ``CLIP.forward``) and ``train/train.py``.

With L2-normalised image features x_i (B x D), features l_i of image i's long caption,
s_i of its short caption (``ModelOutputs.extra_text_features[:, 0]``), the temperature
t, and CE_ls the cross-entropy with label smoothing 0.1:

    (PCM) X^ = PCA_k(X): centre X on its batch mean m, take the top-k right singular
          vectors V_k of X - m, X^ = (X - m) V_k V_k^T + m  (no re-normalisation)
    (L)   L_long  = [CE_ls(t X L^T, I) + CE_ls(t L X^T, I)] / 2
    (S)   L_short = [CE_ls(t X^ S^T, I) + CE_ls(t S X^T^, I)] / 2
    (T)   L = L_long + L_short

Defaults are the reference's: k = 32, label smoothing 0.1, both terms weight 1.  The
short caption is the caption the data gives as the item's one extra caption (the
reference uses the long caption's first sentence; ShapesWorld has a written summary,
:attr:`cliplab.data.shapes.Scene.short_caption`).  During training the first ``keep``
rows of the stretched positional table get no gradient (:meth:`LongCLIPLoss.forward_model`),
as the reference's frozen ``positional_embedding`` for rows < 20 beside its trainable
``positional_embedding_res`` for the rest.

Deviations:

- under DDP the features are gathered with gradient and every rank computes the
  loss of the global batch (open_clip's ``ClipLoss`` convention); the reference
  computes per-rank rows against gathered columns.  The PCA runs on each rank's own
  batch, as the reference's;
- the Trainer's AdamW exempts embeddings, gains, biases and the temperature from weight
  decay (the reference decays every parameter), and the temperature starts at the
  model's own value (the reference resets it to ln 100, which OpenAI CLIP already has).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import register_loss
from .base import Batch, ModelOutputs, Objective, gather_with_grad

__all__ = ["LongCLIPLoss", "primary_components", "smoothed_clip_loss"]

PCA_DIM = 32
"""Components kept by primary component matching (the reference's ``PCA(..., 32)``)."""

LABEL_SMOOTHING = 0.1
"""The reference's label smoothing of both cross-entropies."""


def primary_components(features: torch.Tensor, k: int = PCA_DIM) -> torch.Tensor:
    """Eq. (PCM): ``features`` projected on their top-``k`` principal directions, mean added back.

    Parameters
    ----------
    features : torch.Tensor of shape (N, D)
    k : int, default 32
        Components kept; k >= min(N, D) returns ``features`` (up to rounding).

    Returns
    -------
    torch.Tensor of shape (N, D), float32
        Not re-normalised (the reference's).
    """
    mean = features.mean(dim=0, keepdim=True)                     # (1, D)
    centred = (features - mean).float()                           # (N, D)
    _, _, vt = torch.linalg.svd(centred, full_matrices=False)     # (min(N, D), D)
    v = vt.T[:, :k]                                               # (D, k)
    return (centred @ v) @ v.T + mean                             # eq. (PCM)


def smoothed_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                       logit_scale: torch.Tensor | float, label_smoothing: float = LABEL_SMOOTHING) -> torch.Tensor:
    """Symmetric InfoNCE of paired (N, D) features with label smoothing (eqs. L and S).

    Returns
    -------
    torch.Tensor
        A scalar, ``[CE_ls(t X Y^T, I) + CE_ls(t Y X^T, I)] / 2``.
    """
    logits = logit_scale * image_features @ text_features.T       # (N, N)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
            + F.cross_entropy(logits.T, labels, label_smoothing=label_smoothing)) / 2


@register_loss("longclip", help="Long-CLIP: long captions vs image features + short captions vs their "
                                "top-32 principal components (arXiv:2403.15378)")
class LongCLIPLoss(Objective):
    """Long-CLIP's fine-tuning objective (eq. T), for a model stretched by
    :func:`cliplab.surgery.stretch_positions`.

    Training items are ``(image, [long caption], {"extra_captions": [short caption]})``
    (:class:`cliplab.train.longclip.LongCaptionSet` on ShapesWorld).

    Parameters
    ----------
    rank, world_size : int
    pca_dim : int or None, default 32
        k of eq. (PCM); None matches short captions with the full image features (the
        paper's "w/o PCM" ablation).
    short_weight : float, default 1.0
        Weight of eq. (S); 0 trains on the long captions only.
    keep : int, default 20
        Leading rows of the positional table that get no gradient; 0 trains them all.
    label_smoothing : float, default 0.1

    Attributes
    ----------
    init_logit_scale : float
        log 100 (the reference's ``--log_scale``); used only for a freshly built model.
    """

    init_logit_scale = math.log(100)
    init_logit_bias = None
    needs_extra_captions = True

    def __init__(self, *, rank: int = 0, world_size: int = 1, pca_dim: int | None = PCA_DIM,
                 short_weight: float = 1.0, keep: int = 20, label_smoothing: float = LABEL_SMOOTHING):
        super().__init__(rank=rank, world_size=world_size)
        if pca_dim is not None and pca_dim < 1:
            raise ValueError(f"pca_dim must be >= 1 or None, got {pca_dim}")
        if keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
        self.pca_dim, self.short_weight, self.keep = pca_dim, float(short_weight), int(keep)
        self.label_smoothing = float(label_smoothing)

    def forward_model(self, model, batch: Batch) -> ModelOutputs:
        """The model's outputs with the first ``keep`` positional rows held fixed.

        ``P + (P.detach() - P) * kept`` equals ``P`` exactly in value (the added term
        is 0), so the forward pass is open_clip's bit for bit, while the gradient of
        the kept rows cancels to 0: they stay as they are under AdamW (the Trainer does
        not decay embeddings).
        """
        pos = model.positional_embedding
        if not self.keep or not isinstance(pos, torch.nn.Parameter) or not pos.requires_grad:
            return super().forward_model(model, batch)
        kept = (torch.arange(pos.shape[0], device=pos.device) < self.keep).unsqueeze(1).to(pos.dtype)  # (L, 1)
        held = pos + (pos.detach() - pos) * kept                   # (L, W), rows < keep constant
        model._parameters["positional_embedding"] = held          # in place of the Parameter, order kept
        try:
            return super().forward_model(model, batch)
        finally:
            model._parameters["positional_embedding"] = pos

    def forward(self, outputs: ModelOutputs, batch: Batch | None = None) -> dict:
        """Return ``{"long": eq. (L), "short": short_weight * eq. (S)}`` on the global batch."""
        if outputs.logit_bias is not None:
            raise ValueError("the longclip loss takes no logit_bias; build the model without one")
        if outputs.extra_text_features is None:
            raise ValueError("the longclip loss needs the short captions (one extra caption per item)")
        x = outputs.image_features                                                         # (B, D)
        short_image = x if self.pca_dim is None else primary_components(x, self.pca_dim)   # (B, D) eq. (PCM)
        short_text = outputs.extra_text_features[:, 0]                                     # (B, D)
        x, long_text, short_image, short_text = gather_with_grad(
            [x, outputs.text_features, short_image, short_text], self.world_size)
        t = outputs.logit_scale
        terms = {"long": smoothed_clip_loss(x, long_text, t, self.label_smoothing)}        # eq. (L)
        if self.short_weight:
            terms["short"] = self.short_weight * smoothed_clip_loss(short_image, short_text, t,
                                                                     self.label_smoothing)  # eq. (S)
        return terms
