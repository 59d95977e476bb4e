"""HQ-CLIP: negative descriptions as extra hard negatives, and short-tag classification.

HQ-CLIP: Leveraging Large Vision-Language Models to Create High-Quality Image-Text
Datasets and CLIP Models (Wei et al., ICCV 2025, arXiv:2507.22431).  The paper's
data pipeline gives every image a long negative description (plausible but wrong)
and short positive tags; its training adds two signals to CLIP's loss.  No
reference code was available to us; the equations follow the paper's description.

With L2-normalised image features x_i, text features y_j, the K negative
descriptions n_ik of image i (``ModelOutputs.extra_text_features``), the
features e_v of the V tag words and the temperature t, numbered here as they
appear in the code below:

    (HNI) hard-negative identification: image i's own negative descriptions are
          extra columns of its image->text softmax,
          L_i2t = -1/N sum_i log( e^{t x_i.y_i} / (sum_j e^{t x_i.y_j} + sum_k e^{t x_i.n_ik}) )
          while text->image stays CLIP's: L_t2i = CE(t Y X^T, I)
    (STC) short-tag classification, multi-label over the tag vocabulary:
          L_tag = mean_{i,v} BCE( sigmoid(t x_i.e_v), m_iv ),  m_i the multi-hot tags of image i
    (L)   L = (L_i2t + L_t2i) / 2 + lambda L_tag

Defaults: K from the data (ShapesWorld gives one caption with one attribute
swapped), ``tag_weight`` lambda = 1 (the paper's weight was not available to us),
the learnable CLIP temperature starting at 1/0.07.

Deviations:

- the tag classifier has no parameters of its own: its class weights are the
  text tower's embeddings e_v of the tag words (each word alone as the prompt),
  so the tag loss also trains the text tower on the tag words; the Trainer
  trains the model's parameters only, and this keeps every checkpoint a plain
  open_clip model.  The tag term uses the temperature but does not train it;
- negative tags (the paper's "short negative tags") are not used: every tag not
  in m_i is a 0-label;
- only image i's own negatives enter row i (the paper's variant with all N
  images' negatives in every row is not implemented).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ...data.shapes import TAGS
from . import register_loss
from .base import Batch, ModelOutputs, Objective, gather_with_grad


def negative_description_nce(image_features: torch.Tensor, text_features: torch.Tensor,
                             negative_features: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """CLIP's InfoNCE with each image's negative descriptions as extra image->text columns.

    Parameters
    ----------
    image_features, text_features : torch.Tensor of shape (N, D)
        L2-normalised; row i of both is a matching pair.
    negative_features : torch.Tensor of shape (N, K, D)
        L2-normalised features of the K negative descriptions of each image.
    logit_scale : torch.Tensor or float
        The temperature t (already exponentiated).

    Returns
    -------
    torch.Tensor
        The scalar ``(L_i2t + L_t2i) / 2`` of eq. (HNI).
    """
    logits = logit_scale * image_features @ text_features.T                                   # (N, N)
    hard = logit_scale * torch.einsum("nd,nkd->nk", image_features, negative_features)        # (N, K)
    labels = torch.arange(logits.shape[0], device=logits.device)
    i2t = F.cross_entropy(torch.cat([logits, hard], dim=1), labels)                           # eq. (HNI)
    t2i = F.cross_entropy(logits.T, labels)
    return (i2t + t2i) / 2


def tag_classification_loss(image_features: torch.Tensor, tag_features: torch.Tensor,
                            targets: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Multi-label BCE of images against the tag vocabulary (eq. STC).

    Parameters
    ----------
    image_features : torch.Tensor of shape (N, D)
        L2-normalised.
    tag_features : torch.Tensor of shape (V, D)
        L2-normalised class weights, one per tag.
    targets : torch.Tensor of shape (N, V)
        Multi-hot tags (1 where image i has tag v).
    logit_scale : torch.Tensor or float

    Returns
    -------
    torch.Tensor
        A scalar, the mean over the N x V entries.
    """
    logits = logit_scale * image_features @ tag_features.T                                    # (N, V)
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))               # eq. (STC)


@register_loss("hqclip", help="HQ-CLIP: negative descriptions as hard negatives + short-tag BCE (arXiv:2507.22431)")
class HQCLIPLoss(Objective):
    """HQ-CLIP's loss: hard-negative identification plus short-tag classification.

    Training items are ``(image, captions, {"extra_captions": [K negative
    descriptions], "targets": {"tags": multi-hot (V,)}})``; ShapesWorld makes
    them with ``ShapesTrainSet(world, negatives=1, tags=True)`` (the
    ``shapes-tiny`` recipe does so for this loss).

    Parameters
    ----------
    rank : int, default 0
    world_size : int, default 1
    tags : sequence of str, default :data:`cliplab.data.shapes.TAGS`
        The tag vocabulary; ``targets["tags"]`` has one column per word.
    tag_weight : float, default 1.0
        lambda of eq. (L); 0 leaves only the hard-negative contrastive term.

    Attributes
    ----------
    init_logit_scale : float
        log(1 / 0.07), CLIP's.
    init_logit_bias : None
    """

    init_logit_scale = math.log(1 / 0.07)
    init_logit_bias = None
    needs_extra_captions = True
    needs_targets = True

    def __init__(self, *, rank: int = 0, world_size: int = 1, tags: Sequence[str] = TAGS, tag_weight: float = 1.0):
        super().__init__(rank=rank, world_size=world_size)
        self.tags = tuple(tags)
        self.tag_weight = float(tag_weight)
        self._tag_tokens: torch.Tensor | None = None

    def forward_model(self, model, batch: Batch) -> ModelOutputs:
        """CLIP's outputs, the negatives' features, and the tag words' features in ``extras["tag_features"]``."""
        outputs = super().forward_model(model, batch)
        if self._tag_tokens is None or self._tag_tokens.device != batch.images.device:
            from open_clip import tokenize  # CLIP's BPE, the tokenizer of every model the Trainer builds

            self._tag_tokens = tokenize(list(self.tags), context_length=model.context_length).to(
                batch.images.device)                                                          # (V, T)
        outputs.extras["tag_features"] = model.encode_text(self._tag_tokens, normalize=True)  # (V, D)
        return outputs

    def forward(self, outputs: ModelOutputs, batch: Batch | None = None) -> dict:
        """Return ``{"contrastive": eq. (HNI), "tags": lambda * eq. (STC)}`` on the global batch.

        The Trainer always supplies the negatives and the tags (this objective
        declares ``needs_extra_captions`` and ``needs_targets``).  Called without
        negatives, eq. (HNI) has no extra columns (CLIP's InfoNCE); without tags
        (``batch.targets["tags"]`` and ``outputs.extras["tag_features"]``) the
        ``tags`` term is left out.

        Raises
        ------
        ValueError
            A logit bias; tags whose width is not the vocabulary's.
        """
        if outputs.logit_bias is not None:
            raise ValueError("the hqclip loss takes no logit_bias; build the model without one")
        img, txt = outputs.image_features, outputs.text_features                              # (B, D)
        neg = outputs.extra_text_features
        if neg is None:
            neg = img.new_zeros(img.shape[0], 0, img.shape[1])                                # (B, 0, D)
        tags = (batch.targets or {}).get("tags") if batch is not None else None
        tag_features = outputs.extras.get("tag_features")
        if tags is not None and tags.shape[-1] != len(self.tags):
            raise ValueError(f"targets['tags'] has {tags.shape[-1]} columns but the tag vocabulary has "
                             f"{len(self.tags)} words")
        img, txt, neg = gather_with_grad([img, txt, neg], self.world_size)
        terms = {"contrastive": negative_description_nce(img, txt, neg, outputs.logit_scale)}
        if tags is not None and tag_features is not None:
            (tags,) = gather_with_grad([tags], self.world_size)
            terms["tags"] = self.tag_weight * tag_classification_loss(
                img, tag_features, tags, outputs.logit_scale.detach())                        # eq. (L)
        return terms
