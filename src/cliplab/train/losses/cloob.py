"""CLOOB: InfoLOOB on embeddings retrieved from modern Hopfield networks.

CLOOB: Modern Hopfield Networks with InfoLOOB Outperform CLIP (Fürst et al.,
NeurIPS 2022, arXiv:2110.11316); reference code github.com/ml-jku/cloob
(``src/training/methods.py``: ``cloob``, ``infoLOOB_loss``, ``hopfield_retrieval``;
commit 357adda).

With L2-normalised image features X = (x_i) and text features Y = (y_i), both
(N, D), inverse temperature ``inv_tau = 1/tau`` and Hopfield inverse temperature
``beta``, the equations, numbered here as they appear in the code below:

    (H)   ret(S, P) = normalize( softmax(beta S P^T) P )     a parameter-free Hopfield
          layer: each state row of S retrieves a softmax-weighted recombination of
          the stored rows of P, re-normalised to unit length
    (R)   U_x = ret(X, X)   U_y = ret(Y, X)   V_x = ret(X, Y)   V_y = ret(Y, Y)
          (images and texts retrieved from the image memory X, and from the text memory Y)
    (L)   L_LOOB(A, B) = 1/N sum_i [ -inv_tau a_i.b_i + log sum_{j != i} exp(inv_tau a_i.b_j) ]
          InfoLOOB: the positive is left out of the denominator
    (C)   L = tau ( L_LOOB(U_x, U_y) + L_LOOB(V_y, V_x) )

The reference multiplies by tau "to keep the gradient scale" and sums the two
directions (no 1/2).  Defaults are the reference's: ``init_inv_tau = 14.3`` and
``scale_hopfield = 14.3`` (its README's Conceptual Captions run uses 30 and 8),
both fixed: the model's ``logit_scale`` starts at log 14.3 and is not trained
unless ``learnable_inv_tau=True`` (the reference's ``--learnable-inv-tau``; like the
Trainer it then clamps log(inv_tau) to [0, ln 100]).  Only the loss changes; the
encoders are standard CLIP.  Under DDP the features are gathered from all ranks
first, so the Hopfield memory is the global batch (the reference's ``--aggregate``).

Deviations from the reference code:

- the diagonal is removed from the log-sum-exp with ``-inf``, where the reference
  puts ``-1000`` there; the values differ by ``exp(-1000 - lse)``, zero in float;
- the Hopfield inverse temperature is a constant (``scale_hopfield``), not a
  learnable parameter of an ``hflayers.Hopfield`` layer: the layer the reference
  builds has no projections and no normalisation, so it is exactly (H);
- the gathered batch keeps rank order (the reference puts the local rank first,
  which permutes rows and columns alike and leaves the loss unchanged).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import register_loss
from .base import Batch, ModelOutputs, Objective, gather_with_grad, held_fixed


def hopfield_retrieval(state: torch.Tensor, stored: torch.Tensor, beta: float) -> torch.Tensor:
    """Retrieve from a modern Hopfield network storing the rows of ``stored``, re-normalised.

    Parameters
    ----------
    state : torch.Tensor of shape (N, D)
        State (query) patterns.
    stored : torch.Tensor of shape (M, D)
        Stored patterns, which also serve as the values.
    beta : float
        Inverse temperature of the softmax; large ``beta`` retrieves the stored
        pattern nearest (by dot product) to each state.

    Returns
    -------
    torch.Tensor of shape (N, D)
        ``normalize(softmax(beta * state @ stored.T) @ stored)``, each row unit length.
    """
    attention = torch.softmax(beta * state @ stored.T, dim=1)        # (N, M)
    return F.normalize(attention @ stored, dim=1)                    # eq. (H), (N, D)


def infoloob_loss(anchors: torch.Tensor, candidates: torch.Tensor, inv_tau: torch.Tensor | float) -> torch.Tensor:
    """InfoLOOB of row i of ``anchors`` against row i of ``candidates``, positive left out of the denominator.

    Parameters
    ----------
    anchors, candidates : torch.Tensor of shape (N, D)
        Row i of both is a matching pair; N >= 2.
    inv_tau : torch.Tensor or float
        Inverse temperature.

    Returns
    -------
    torch.Tensor
        The scalar ``mean_i [ -z_ii + logsumexp_{j != i} z_ij ]`` with
        ``z = inv_tau * anchors @ candidates.T`` (not multiplied by tau).

    Raises
    ------
    ValueError
        Fewer than 2 rows: the leave-one-out denominator would be empty.
    """
    n = anchors.shape[0]
    if n < 2:
        raise ValueError(f"InfoLOOB needs at least 2 pairs per batch (the positive is left out), got {n}")
    logits = inv_tau * anchors @ candidates.T                                             # (N, N)
    eye = torch.eye(n, dtype=torch.bool, device=logits.device)
    negatives = torch.logsumexp(logits.masked_fill(eye, float("-inf")), dim=1)          # (N,) j != i
    return (negatives - logits.diagonal()).mean()                                         # eq. (L)


def cloob_loss(image_features: torch.Tensor, text_features: torch.Tensor, inv_tau: torch.Tensor | float,
               beta: float) -> torch.Tensor:
    """The CLOOB loss of paired (N, D) features (the reference's ``cloob``).

    Parameters
    ----------
    image_features, text_features : torch.Tensor of shape (N, D)
        L2-normalised; row i of both is a matching pair.
    inv_tau : torch.Tensor or float
        Inverse temperature of InfoLOOB (``exp(logit_scale)``).
    beta : float
        Inverse temperature of the Hopfield retrieval.

    Returns
    -------
    torch.Tensor
        A scalar.
    """
    x, y = image_features, text_features
    u_x, u_y = hopfield_retrieval(x, x, beta), hopfield_retrieval(y, x, beta)   # eq. (R), image memory
    v_x, v_y = hopfield_retrieval(x, y, beta), hopfield_retrieval(y, y, beta)   # eq. (R), text memory
    return (infoloob_loss(u_x, u_y, inv_tau) + infoloob_loss(v_y, v_x, inv_tau)) / inv_tau  # eq. (C)


@register_loss("cloob", help="CLOOB: InfoLOOB on modern-Hopfield retrievals, fixed temperature (arXiv:2110.11316)")
class CLOOBLoss(Objective):
    """CLOOB's loss with the reference's fixed temperatures; features gathered across ranks.

    Parameters
    ----------
    rank : int, default 0
    world_size : int, default 1
    scale_hopfield : float, default 14.3
        Inverse temperature beta of the Hopfield retrieval.
    learnable_inv_tau : bool, default False
        Train the model's ``logit_scale`` (the InfoLOOB inverse temperature);
        by default it stays at ``init_logit_scale``.

    Attributes
    ----------
    init_logit_scale : float
        log 14.3, the reference's ``--init-inv-tau``.
    init_logit_bias : None
    """

    init_logit_scale = math.log(14.3)
    init_logit_bias = None

    def __init__(self, *, rank: int = 0, world_size: int = 1, scale_hopfield: float = 14.3,
                 learnable_inv_tau: bool = False):
        super().__init__(rank=rank, world_size=world_size)
        self.scale_hopfield = float(scale_hopfield)
        self.learnable_inv_tau = bool(learnable_inv_tau)

    def forward(self, outputs: ModelOutputs, batch: Batch | None = None) -> dict:
        """Return ``{"contrastive": scalar}``, the global-batch CLOOB loss."""
        if outputs.logit_bias is not None:
            raise ValueError("the cloob loss takes no logit_bias; build the model without one")
        inv_tau = outputs.logit_scale if self.learnable_inv_tau else held_fixed(outputs.logit_scale)  # fixed tau
        img, txt = gather_with_grad([outputs.image_features, outputs.text_features], self.world_size)
        return {"contrastive": cloob_loss(img, txt, inv_tau, self.scale_hopfield)}
