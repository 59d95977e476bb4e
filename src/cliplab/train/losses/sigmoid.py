"""Sigmoid loss of SigLIP.

Sigmoid Loss for Language Image Pre-Training (Zhai et al., ICCV 2023,
arXiv:2303.15343).

Every image-text pair is an independent binary problem.  With logits
``z_ij = t * x_i . y_j + b`` and labels ``l_ij = +1`` if i = j else -1,

    L = -1/N  sum_i sum_j  log sigmoid(l_ij z_ij)

summed over all N^2 pairs and divided by the batch size N.  The model starts
at t = 10 (``logit_scale = log 10``) and b = -10, encoding the prior that
almost all pairs are negatives.  :class:`SigmoidLoss` delegates to open_clip's
``SigLipLoss``: under DDP each rank scores its images against the texts of
all ranks, passed around the ring, so the mean over ranks (what DDP's
gradient averaging computes) is the loss of the global batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from open_clip.loss import SigLipLoss

from . import register_loss
from .base import Batch, ModelOutputs, Objective


def sigmoid_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                 logit_scale: torch.Tensor | float, logit_bias: torch.Tensor | float) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss of paired (N, D) features.

    Parameters
    ----------
    image_features, text_features : torch.Tensor of shape (N, D)
        L2-normalised; row i of both is a matching pair.
    logit_scale : torch.Tensor or float
        The temperature t (already exponentiated).
    logit_bias : torch.Tensor or float
        The bias b.

    Returns
    -------
    torch.Tensor
        A scalar.
    """
    n = image_features.shape[0]
    logits = logit_scale * image_features @ text_features.T + logit_bias  # (N, N)
    labels = 2 * torch.eye(n, dtype=logits.dtype, device=logits.device) - 1  # +1 diagonal, -1 elsewhere
    return -F.logsigmoid(labels * logits).sum() / n


@register_loss("sigmoid", help="SigLIP's pairwise sigmoid loss (open_clip SigLipLoss)")
class SigmoidLoss(Objective):
    """SigLIP's sigmoid loss with open_clip's ring exchange for DDP.

    Parameters
    ----------
    rank : int, default 0
    world_size : int, default 1
        The distributed position.
    dist_impl : {"bidir", "shift", "reduce", "gather"}, default "bidir"
        How text features travel between ranks (open_clip's options).

    Attributes
    ----------
    init_logit_scale : float
        log(10).
    init_logit_bias : float
        -10.
    """

    init_logit_scale = math.log(10.0)
    init_logit_bias = -10.0

    def __init__(self, *, rank: int = 0, world_size: int = 1, dist_impl: str = "bidir"):
        super().__init__(rank=rank, world_size=world_size)
        self._loss = SigLipLoss(rank=rank, world_size=world_size, dist_impl=dist_impl)

    def forward(self, outputs: ModelOutputs, batch: Batch | None = None) -> dict:
        """Return ``{"contrastive": scalar}``; the model must have a ``logit_bias``."""
        if outputs.logit_bias is None:
            raise ValueError("the sigmoid loss needs a logit_bias; build the model with init_logit_bias")
        return {"contrastive": self._loss(outputs.image_features, outputs.text_features, outputs.logit_scale,
                                          outputs.logit_bias)}
