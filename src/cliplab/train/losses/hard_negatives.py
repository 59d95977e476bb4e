"""Hard-negative InfoNCE with false-negative filtering (the usable part of UniME).

Breaking the Modality Barrier: Universal Embedding Learning with Multimodal LLMs
(UniME; Gu et al., ACM MM 2025, arXiv:2504.17432), stage 2 "hard negative enhanced
instruction tuning"; reference code github.com/deepglint/UniME ``loss.py``
(``SimpleContrastiveLossBatchRank``; commit d565584).  The importance weighting
of the kept negatives is that of Contrastive Learning with Hard Negative Samples
(HCL; Robinson et al., ICLR 2021, arXiv:2010.04592).

With L2-normalised queries q_i and keys k_j (images and texts, then texts and
images), similarities s_ij = q_i.k_j and z_ij = t s_ij (t the temperature), the
equations, numbered here as they appear in the code below:

    (F)   false-negative filter: key j != i is dropped for query i when
          s_ij > s_ii + margin (it is more similar than the positive: likely a duplicate
          caption or a near-identical image), the reference's ``threshold_value``
    (K)   mining: N_i = the ``topk`` most similar keys that survive (F)
    (W)   weighting: w_ij = |N_i| softmax_{j in N_i}(hardness z_ij), so sum_j w_ij = |N_i|
          (HCL's importance weights; hardness 0 gives w_ij = 1)
    (L)   L_i = -log( e^{z_ii} / (e^{z_ii} + sum_{j in N_i} w_ij e^{z_ij}) )

and the loss is the mean of L_i over both directions (image->text, text->image).
With ``topk`` >= N-1, ``margin = inf`` and ``hardness = 0`` it is exactly CLIP's
InfoNCE.  Defaults are UniME's: ``topk = 8``, ``margin = 0.1``, temperature
1/0.02 = 50 (``init_logit_scale = log 50``), no weighting (``hardness = 0``).

Deviations from the reference code:

- symmetric (both directions), where UniME scores queries against keys only;
- the temperature is the model's learnable ``logit_scale`` started at 50, where
  UniME fixes tau = 0.02;
- a query with fewer than ``topk`` surviving negatives uses the ones it has: the
  reference's ``topk`` then also picks filtered entries (set to -inf only for the
  ranking) and the positive itself, whose real scores enter its softmax;
- the weights (W) are treated as constants (no gradient through them); UniME has
  no weighting, HCL's code differentiates through its reweighting factor;
- under DDP the features are gathered with their gradient and every rank computes
  the global-batch loss (UniME gathers without gradient and scales by world size).
"""

from __future__ import annotations

import math

import torch

from . import register_loss
from .base import Batch, ModelOutputs, Objective, gather_with_grad


def hard_negative_nce(queries: torch.Tensor, keys: torch.Tensor, logit_scale: torch.Tensor | float, *,
                      topk: int | None = 8, margin: float = 0.1, hardness: float = 0.0) -> torch.Tensor:
    """One direction of hard-negative InfoNCE: query i against key i and its mined negatives.

    Parameters
    ----------
    queries, keys : torch.Tensor of shape (N, D)
        L2-normalised; row i of both is a matching pair.
    logit_scale : torch.Tensor or float
        The temperature t (already exponentiated).
    topk : int or None, default 8
        Negatives kept per query after filtering; None keeps all of them.
    margin : float, default 0.1
        False-negative filter: key j is dropped for query i when
        ``s_ij > s_ii + margin`` (cosine similarities); ``inf`` keeps all.
    hardness : float, default 0.0
        HCL's concentration: weights ``proportional to exp(hardness * z_ij)``
        over the kept negatives, normalised to mean 1; 0 weighs them equally.

    Returns
    -------
    torch.Tensor
        A scalar, the mean over queries of eq. (L).
    """
    n = queries.shape[0]
    sim = queries @ keys.T                                                                # (N, N) s_ij
    logits = logit_scale * sim                                                            # (N, N) z_ij
    eye = torch.eye(n, dtype=torch.bool, device=sim.device)
    with torch.no_grad():
        kept = ~eye & ~(sim >= sim.diagonal()[:, None] + margin)                          # eq. (F)
        k = n - 1 if topk is None else max(0, min(int(topk), n - 1))
        rank_by = sim.masked_fill(~kept, float("-inf"))
        index = rank_by.topk(k, dim=1).indices                                            # eq. (K), (N, k)
        chosen = kept.gather(1, index)                                                    # (N, k) a real negative?
        count = chosen.sum(1, keepdim=True).to(logits.dtype)                             # (N, 1) |N_i|
        score = (hardness * logits.gather(1, index)).masked_fill(~chosen, float("-inf"))
        score = torch.where(count > 0, score, torch.zeros_like(score))                    # rows with no negative
        log_w = torch.log_softmax(score, dim=1) + count.clamp(min=1).log()               # eq. (W), (N, k)
    negatives = (logits.gather(1, index) + log_w).masked_fill(~chosen, float("-inf"))    # (N, k) log(w e^z)
    positive = logits.diagonal()[:, None]                                                 # (N, 1)
    return (torch.logsumexp(torch.cat([positive, negatives], 1), 1) - positive[:, 0]).mean()  # eq. (L)


@register_loss("hard-negatives", help="InfoNCE on mined hard negatives with false-negative filtering (UniME)")
class HardNegativeLoss(Objective):
    """Symmetric hard-negative InfoNCE (UniME's stage-2 loss), features gathered across ranks.

    Parameters
    ----------
    rank : int, default 0
    world_size : int, default 1
    topk : int or None, default 8
        Hard negatives per query (UniME's ``topk``); None keeps every negative.
    margin : float, default 0.1
        False-negative margin on cosine similarity (UniME's ``threshold_value``).
    hardness : float, default 0.0
        Weighting of the kept negatives (HCL's beta); 0 is UniME's plain top-k.

    Attributes
    ----------
    init_logit_scale : float
        log 50, UniME's temperature 0.02.
    init_logit_bias : None
    """

    init_logit_scale = math.log(1 / 0.02)
    init_logit_bias = None

    def __init__(self, *, rank: int = 0, world_size: int = 1, topk: int | None = 8, margin: float = 0.1,
                 hardness: float = 0.0):
        super().__init__(rank=rank, world_size=world_size)
        if topk is not None and topk < 1:
            raise ValueError(f"topk must be >= 1 or None, got {topk}")
        self.topk, self.margin, self.hardness = topk, float(margin), float(hardness)

    def forward(self, outputs: ModelOutputs, batch: Batch | None = None) -> dict:
        """Return ``{"contrastive": scalar}``, the mean of both directions on the global batch."""
        if outputs.logit_bias is not None:
            raise ValueError("the hard-negatives loss takes no logit_bias; build the model without one")
        img, txt = gather_with_grad([outputs.image_features, outputs.text_features], self.world_size)
        opts = {"topk": self.topk, "margin": self.margin, "hardness": self.hardness}
        i2t = hard_negative_nce(img, txt, outputs.logit_scale, **opts)
        t2i = hard_negative_nce(txt, img, outputs.logit_scale, **opts)
        return {"contrastive": (i2t + t2i) / 2}
