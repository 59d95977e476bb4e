"""SCLIP: correlative self-attention in CLIP's last block.

Wang, Mei, Yuille, "SCLIP: Rethinking Self-Attention for Dense Vision-Language
Inference", ECCV 2024, arXiv:2312.01597; reference code wangf3014/SCLIP
(``clip/model.py`` ``custom_attn(csa=True)``, ``clip_segmentor.py``).

Algorithm (last block only, per head, ``s = d_head^-1/2``)::

    A = softmax(s q qᵀ) + softmax(s k kᵀ)          (correlative self-attention; rows sum to 2)
    z = x + W_o (A v);  z += MLP(LN2(z))           (residual and FFN kept)
    f = ln_post(z) @ proj;  logits = 40 * cos(f, t_c)

Defaults of the reference: logit scale 40, crop 224 / stride 112 sliding windows over
images resized to a short side of 336, 80 ImageNet templates, ``prob_thd`` 0.1 with a
background class (VOC21), PAMR off.

Deviations: the reference's ``area_thd`` (classes covering < 10 % of the predicted
foreground zeroed) and PAMR are not implemented; the Backbone's precision is used (the
reference casts CLIP to fp16).  Parity: on a random-weight open_clip ViT-B-16-quickgelu,
the reference's ``VisionTransformer.forward(return_all=True, csa=True)`` and these features
agree to 3e-6 at 224 px and at 320 px (positional embedding interpolated the reference's way,
``positions = "scale"``).
"""

from __future__ import annotations

from . import DENSE_METHODS
from .attention import qq_kk_attention
from .base import LastBlockMethod

__all__ = ["SCLIP"]


@DENSE_METHODS.register("sclip", help="SCLIP: q-q + k-k correlative attention in the last block")
class SCLIP(LastBlockMethod):
    """SCLIP's correlative self-attention (see the module docstring)."""

    attention = staticmethod(qq_kk_attention)
    residual = True
    ffn = True
    logit_scale = 40.0
    positions = "scale"
