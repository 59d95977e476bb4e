"""ClearCLIP: q-q attention without residual or FFN in CLIP's last block.

Lan, Chen, Meng, Zhou, Chan, Wu, "ClearCLIP: Decomposing CLIP Representations for Dense
Vision-Language Inference", ECCV 2024, arXiv:2407.12442; reference code mc-lan/ClearCLIP
(``open_clip/transformer.py`` ``VisionTransformer.forward(model_type='ClearCLIP',
ignore_residual=True)``, ``custom_attn``; ``clearclip_segmentor.py``).

Algorithm (last block only)::

    z = W_o (softmax(s q qᵀ) v)                    (no residual connection, no FFN)
    f = ln_post(z) @ proj;  logits = 50 * cos(f, t_c)

Defaults of the reference: logit scale 50, crop 448 / stride 224 windows, fp16,
``prob_thd`` 0.5 on VOC21 with the single word "background".

Deviations: the Backbone's precision is used (the reference runs fp16).  Parity: on a
random-weight open_clip ViT-B-16-quickgelu the reference's vendored open_clip
(``model_type='ClearCLIP', ignore_residual=True``) and these features agree to 4e-6, at 224
and 320 px (positional embedding interpolated the reference's way, ``positions = "scale"``).
"""

from __future__ import annotations

from . import DENSE_METHODS
from .attention import qq_attention
from .base import LastBlockMethod

__all__ = ["ClearCLIP"]


@DENSE_METHODS.register("clearclip", help="ClearCLIP: q-q attention, no residual, no FFN in the last block")
class ClearCLIP(LastBlockMethod):
    """ClearCLIP's residual-free last block (see the module docstring)."""

    attention = staticmethod(qq_attention)
    residual = False
    ffn = False
    logit_scale = 50.0
    positions = "scale"
