"""MobileCLIP's distillation loss on reinforced data (``DRClipLoss``), from stored teacher embeddings.

MobileCLIP: Fast Image-Text Models through Multi-Modal Reinforced Training (Vasu et al.,
CVPR 2024, arXiv:2311.17049), section 3; reference apple/ml-mobileclip,
``training/open_clip_v2.patch`` (``DistillClipLoss`` with ``average_after_softmax``,
``DRClipLoss``).  Numbered as in the code below, with student features x_i, y_j
(L2-normalised), the student temperature t, teacher m's stored features X^m, Y^m of the
same images and captions and its fixed temperature s_m:

    (S)   student logits  S = t X Y^T
    (T)   teacher targets P_i2t = 1/M sum_m softmax_rows(s_m X^m Y^m^T),
          P_t2i = 1/M sum_m softmax_rows(s_m Y^m X^m^T)   (ensemble averaged after the softmax)
    (D)   L_distill = 1/2 [CE(P_i2t, S) + CE(P_t2i, S^T)],   CE(P, S) = -1/N sum_i sum_j P_ij log softmax(S_i)_j
          (the KL divergence KL(P || softmax S) plus the teachers' entropy, a constant: the same gradient)
    (C)   L_clip = 1/2 [CE(S, I) + CE(S^T, I)]               (CLIP's InfoNCE)
    (L)   L = (1 - lambda) (L_clip(real) + L_clip(syn)) + lambda (L_distill(real) + L_distill(syn))

summed over the batch of (image, real caption) pairs and the batch of (image, synthetic
caption) pairs, as the reference sums them.

Defaults: teacher temperature s_m = 100 for every member (``--distill-logit-scale 100``
of the reference's DataCompDR runs), lambda = 0.75 (its DataCompDR-1B setting; 1.0 for
DataCompDR-12M), the learnable student temperature starting at 1/0.07.

The teacher features come from :class:`cliplab.train.reinforce.ReinforcedSet` (no teacher
forward at training time): ``Batch.teacher`` holds ``image_m``, ``text_m`` and
``syn_text_m`` (B, D_m) for every member m, and the synthetic caption of each image is
its one extra caption.

Deviation: none in the loss; the reference's weights are ``[1 - lambda, lambda]``
(``--distill-loss-weights``).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import register_loss
from .base import Batch, ModelOutputs, Objective, gather_with_grad
from .infonce import symmetric_cross_entropy


def ensemble_targets(feats_a: Sequence[torch.Tensor], feats_b: Sequence[torch.Tensor],
                     scales: Sequence[float]) -> torch.Tensor:
    """Teacher targets of eq. (T): the mean over members of ``softmax(s_m A_m B_m^T)`` by rows.

    Parameters
    ----------
    feats_a, feats_b : sequence of torch.Tensor of shape (N, D_m)
        One pair per ensemble member (rows of ``A`` are the queries).
    scales : sequence of float
        The members' temperatures s_m.

    Returns
    -------
    torch.Tensor of shape (N, N)
        Rows sum to 1.
    """
    probs = [F.softmax(s * a @ b.T, dim=1) for a, b, s in zip(feats_a, feats_b, scales)]  # M x (N, N)
    return sum(probs) / len(probs)                                                        # eq. (T)


def soft_cross_entropy(targets: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``-1/N sum_i sum_j P_ij log softmax(S_i)_j``: CE of eq. (D) for (N, N) targets and logits."""
    return -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean(dim=0)


def dr_clip_terms(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                  teacher_image: Sequence[torch.Tensor], teacher_text: Sequence[torch.Tensor],
                  teacher_scales: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_clip, L_distill)`` of eqs. (C) and (D) for one batch of image-caption pairs.

    Parameters
    ----------
    image_features, text_features : torch.Tensor of shape (N, D)
        The student's, L2-normalised; row i of both is a matching pair.
    logit_scale : torch.Tensor or float
        The student temperature t (already exponentiated).
    teacher_image, teacher_text : sequence of torch.Tensor of shape (N, D_m)
        Each member's features of the same images and captions.
    teacher_scales : sequence of float
        s_m.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        Scalars, unweighted.
    """
    logits = logit_scale * image_features @ text_features.T                              # eq. (S), (N, N)
    clip = symmetric_cross_entropy(logits)                                               # eq. (C)
    p_i2t = ensemble_targets(teacher_image, teacher_text, teacher_scales)                # (N, N)
    p_t2i = ensemble_targets(teacher_text, teacher_image, teacher_scales)                # (N, N)
    distill = (soft_cross_entropy(p_i2t, logits) + soft_cross_entropy(p_t2i, logits.T)) / 2  # eq. (D)
    return clip, distill


def teacher_members(teacher: dict, prefix: str, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """``teacher[prefix_0], teacher[prefix_1], ...`` as ``dtype``: one (B, D_m) tensor per ensemble member."""
    out, m = [], 0
    while f"{prefix}_{m}" in teacher:
        out.append(teacher[f"{prefix}_{m}"].to(dtype))
        m += 1
    return out


@register_loss("mobileclip-dr", help="MobileCLIP: KL to stored teacher similarities + InfoNCE on reinforced shards "
                                     "(arXiv:2311.17049)")
class MobileCLIPDRLoss(Objective):
    """MobileCLIP's reinforced-data loss (``DRClipLoss``), eq. (L).

    Training items are those of :class:`cliplab.train.reinforce.ReinforcedSet`
    (``cliplab train --data SHARDS --loss mobileclip-dr``, SHARDS written by ``cliplab
    reinforce``).

    Parameters
    ----------
    rank : int, default 0
    world_size : int, default 1
    distill_weight : float, default 0.75
        lambda of eq. (L).
    teacher_scale : float or sequence of float, default 100.0
        s_m of eq. (T), one for all members or one per member.

    Attributes
    ----------
    init_logit_scale : float
        log(1 / 0.07), CLIP's.
    """

    init_logit_scale = math.log(1 / 0.07)
    init_logit_bias = None
    needs_teacher = True
    needs_extra_captions = True

    def __init__(self, *, rank: int = 0, world_size: int = 1, distill_weight: float = 0.75,
                 teacher_scale: float | Sequence[float] = 100.0):
        super().__init__(rank=rank, world_size=world_size)
        if not 0.0 <= float(distill_weight) <= 1.0:
            raise ValueError(f"distill_weight (lambda) must be in [0, 1], got {distill_weight}")
        self.distill_weight = float(distill_weight)
        self.teacher_scale = teacher_scale

    def _scales(self, m: int) -> list[float]:
        if isinstance(self.teacher_scale, (int, float)):
            return [float(self.teacher_scale)] * m
        scales = [float(s) for s in self.teacher_scale]
        if len(scales) != m:
            raise ValueError(f"{len(scales)} teacher scales for {m} teachers")
        return scales

    def forward(self, outputs: ModelOutputs, batch: Batch | None = None) -> dict:
        """Return ``{"contrastive": (1 - lambda) sum L_clip, "distill": lambda sum L_distill}`` (eq. L).

        Raises
        ------
        ValueError
            No teacher embeddings in the batch, a logit bias.
        """
        if outputs.logit_bias is not None:
            raise ValueError("the mobileclip-dr loss takes no logit_bias; build the model without one")
        teacher = batch.teacher if batch is not None else None
        if not teacher:
            raise ValueError("the mobileclip-dr loss needs stored teacher embeddings (batch.teacher)")
        dtype = outputs.image_features.dtype
        t_img, t_txt = teacher_members(teacher, "image", dtype), teacher_members(teacher, "text", dtype)
        t_syn = teacher_members(teacher, "syn_text", dtype)
        if not t_img or len(t_img) != len(t_txt):
            raise ValueError("batch.teacher needs image_m and text_m for every teacher m = 0, 1, ...")
        scales = self._scales(len(t_img))
        m = len(t_img)
        img, txt = outputs.image_features, outputs.text_features                             # (B, D)
        syn = outputs.extra_text_features[:, 0] if outputs.extra_text_features is not None else None
        mixed = outputs.extras.get("synthetic")                                                # (B,) bool
        if mixed is not None:  # one caption per image, real or synthetic: its teachers' features follow it
            t_txt = [torch.where(mixed[:, None], s_, t_) for s_, t_ in zip(t_syn, t_txt)]
            syn, t_syn = None, []
        tensors = [img, txt, *t_img, *t_txt] + ([syn, *t_syn] if syn is not None and t_syn else [])
        gathered = gather_with_grad(tensors, self.world_size)
        img, txt, t_img, t_txt = gathered[0], gathered[1], gathered[2:2 + m], gathered[2 + m:2 + 2 * m]
        clip, distill = dr_clip_terms(img, txt, outputs.logit_scale, t_img, t_txt, scales)
        if len(gathered) > 2 + 2 * m:                                                         # synthetic captions
            syn, t_syn = gathered[2 + 2 * m], gathered[3 + 2 * m:]
            clip_s, distill_s = dr_clip_terms(img, syn, outputs.logit_scale, t_img, t_syn, scales)
            clip, distill = clip + clip_s, distill + distill_s
        return {"contrastive": (1 - self.distill_weight) * clip, "distill": self.distill_weight * distill}  # eq. (L)


@register_loss("mobileclip-dr-mix", help="mobileclip-dr with one caption per image, real or synthetic at random "
                                         "(the reference's --dataset-reinforcement-mix-synthetic): InfoNCE's cost")
class MobileCLIPDRMixLoss(MobileCLIPDRLoss):
    """:class:`MobileCLIPDRLoss` on one batch of pairs whose caption is synthetic with probability ``synthetic_ratio``.

    The reference's ``--dataset-reinforcement-mix-synthetic`` (``preprocess_dr``): each
    image's caption is its synthetic one with probability r, else its real one, and the
    loss has one (image, caption) batch instead of two, so a step costs what an InfoNCE
    step costs.  The choice of sample j at step t on rank k is ``u < r`` for the j-th
    number of ``default_rng([4, t, k])``.

    Parameters
    ----------
    synthetic_ratio : float, default 0.5
        r (the reference's default is 0.0, all real captions).
    rank, world_size, distill_weight, teacher_scale
        As :class:`MobileCLIPDRLoss`.
    """

    def __init__(self, *, synthetic_ratio: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= float(synthetic_ratio) <= 1.0:
            raise ValueError(f"synthetic_ratio must be in [0, 1], got {synthetic_ratio}")
        self.synthetic_ratio = float(synthetic_ratio)

    def forward_model(self, model, batch: Batch) -> ModelOutputs:
        """One text pass over each image's chosen caption; the choice in ``extras["synthetic"]`` (B,)."""
        b = batch.tokens.shape[0]
        u = np.random.default_rng([4, int(batch.step), self.rank]).random(b)
        mask = torch.as_tensor(u < self.synthetic_ratio, device=batch.tokens.device)            # (B,)
        tokens = torch.where(mask[:, None], batch.extra_tokens[:, 0], batch.tokens)             # (B, T)
        out = ModelOutputs.from_clip(model(batch.images, tokens))
        out.extras["synthetic"] = mask
        return out
