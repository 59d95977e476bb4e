"""InfoNCE: the symmetric contrastive loss of CLIP.

Learning Transferable Visual Models From Natural Language Supervision
(Radford et al., ICML 2021, arXiv:2103.00020).

With L2-normalised image features x_i, text features y_j and temperature
t = exp(logit_scale), the logits are ``z_ij = t * x_i . y_j`` and

    L = 1/2 [ CE(z, I) + CE(z^T, I) ]

the mean of the image->text and text->image cross-entropies with the matching
pair as the label.  :class:`InfoNCELoss` delegates to open_clip's ``ClipLoss``
and so reuses its cross-rank feature gather (``gather_with_grad=True``): under
DDP every rank computes the loss of the global batch, and the averaged
gradients equal those of one process on that batch.

Deviation from open_clip's training script: ``local_loss`` is off, so the loss
value logged on each rank is the global-batch loss, not a per-rank share.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from . import register_loss
from .base import Batch, ModelOutputs, Objective


def symmetric_cross_entropy(logits: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """InfoNCE of an (N, N) matching-score matrix: the mean of the row and column
    cross-entropies against the diagonal, ``[CE(Z, I) + CE(Z^T, I)] / 2``.

    Parameters
    ----------
    logits : torch.Tensor of shape (N, N)
        Row i of images against column j of texts, already scaled by the temperature.
    label_smoothing : float, default 0.0
        As :func:`torch.nn.functional.cross_entropy` (Long-CLIP uses 0.1).

    Returns
    -------
    torch.Tensor
        A scalar.
    """
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
            + F.cross_entropy(logits.T, labels, label_smoothing=label_smoothing)) / 2


def infonce_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                 logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE of paired (N, D) features.

    Parameters
    ----------
    image_features, text_features : torch.Tensor of shape (N, D)
        L2-normalised; row i of both is a matching pair.
    logit_scale : torch.Tensor or float
        The temperature t (already exponentiated).

    Returns
    -------
    torch.Tensor
        A scalar.
    """
    return symmetric_cross_entropy(logit_scale * image_features @ text_features.T)  # (N, N) logits


@register_loss("infonce", help="CLIP's symmetric contrastive loss (open_clip ClipLoss)")
class InfoNCELoss(Objective):
    """CLIP's InfoNCE loss with the all-gather of open_clip for DDP.

    Parameters
    ----------
    rank : int, default 0
    world_size : int, default 1
        The distributed position; features are gathered from all ranks
        (with gradient) when ``world_size > 1``.

    Attributes
    ----------
    init_logit_scale : float
        log(1 / 0.07), CLIP's initial temperature.
    init_logit_bias : None
        InfoNCE has no bias.
    """

    init_logit_scale = math.log(1 / 0.07)
    init_logit_bias = None

    def __init__(self, *, rank: int = 0, world_size: int = 1):
        super().__init__(rank=rank, world_size=world_size)
        self._loss = ClipLoss(local_loss=False, gather_with_grad=True, rank=rank, world_size=world_size)

    def forward(self, outputs: ModelOutputs, batch: Batch | None = None) -> dict:
        """Return ``{"contrastive": scalar}``; ``outputs.logit_bias`` must be ``None``."""
        if outputs.logit_bias is not None:
            raise ValueError("the infonce loss takes no logit_bias; build the model without one")
        return {"contrastive": self._loss(outputs.image_features, outputs.text_features, outputs.logit_scale)}
